//! `lmd-bench train-step` and `finetune-step`: full training steps of the models, with the
//! same model on other kernels (`--baseline-kernels`, e.g. `ops`: `--composite-baseline`) or
//! PyTorch (`--torch-anchor`) as the baseline.

use crate::{Error, Result};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `lmd-bench train-step`.
#[derive(Debug, Clone)]
pub struct TrainStepOptions {
    /// Model preset (default `tiny`: ViT-Ti, patch 2 on 4x28x28, decoder 128 x 4).
    pub preset: lmd_model::Preset,
    pub batch: usize,
    /// Mask ratios to measure, one JSON line each.
    pub ratios: Vec<f64>,
    /// Timed steps per ratio (after one warm-up step).
    pub steps: usize,
    /// Also run this PyTorch baseline (`tools/torch_mae_train_step.py`, the `tiny` sizes) with
    /// the same batch, ratios, steps and thread count, and report ours / PyTorch per ratio.
    pub torch_anchor: Option<PathBuf>,
    /// Also run each ratio on these kernels (the same model over the same variables; `ops`:
    /// the fused block node off, every block as single-layer ops) and report ours / that.
    pub baseline: Option<lmd_model::Kernels>,
    /// Pixel MAE beside LMD on latents with the same encoder: `image_size` px in patches of
    /// `pixel_patch` (fixed 0.75) against latents of `image_size / 8` in patches of
    /// `latent_patch` (0.75 and the cosine schedule's mean); `ratios` are not used. The
    /// defaults are the paper's: ViT/16 on 224 px (14 x 14 tokens) against ViT/4 on 28 x 28
    /// latents (7 x 7).
    pub pixels: bool,
    pub image_size: usize,
    pub pixel_patch: usize,
    pub latent_patch: usize,
    /// Where and in what precision the steps run (the trainer's rules: [`crate::RunSettings`]).
    pub target: StepTarget,
}

/// The device and precision of the timed steps, opened as the trainer opens them (TF32 on for
/// f32 matmuls on a GPU, as `lmd-train`'s default).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTarget {
    pub device: crate::DeviceSpec,
    pub precision: lmd_model::Precision,
}

impl StepTarget {
    fn settings(&self) -> crate::RunSettings {
        crate::RunSettings {
            device: self.device,
            precision: self.precision,
            ..Default::default()
        }
    }

    /// The device (opened once) and the backend the trainer would use on it.
    pub(crate) fn open(&self) -> Result<(lmd_model::candle::Device, lmd_model::Backend)> {
        let run = self.settings();
        let dev = run.open_device()?;
        let backend = run.backend(&dev)?;
        Ok((dev, backend))
    }

    /// The backend of a baseline on `kernels` (`--baseline-kernels`), and the model's
    /// variables `vm` (f32 master weights) to build it over: refused where those kernels
    /// cannot run (the fused CPU kernels: f32 on the CPU), naming the flags.
    fn baseline_vars<'a>(
        &self,
        kernels: Option<lmd_model::Kernels>,
        vm: &candle_nn::VarMap,
        dev: &lmd_model::candle::Device,
    ) -> Result<Option<(lmd_model::Backend, candle_nn::VarBuilder<'a>)>> {
        let Some(kernels) = kernels else {
            return Ok(None);
        };
        let b = lmd_model::Backend::for_training(kernels, dev, self.precision).map_err(|e| {
            Error::Invalid(format!(
                "--baseline-kernels {kernels} with --device {} --precision {}: {e}",
                self.device, self.precision
            ))
        })?;
        let vb = candle_nn::VarBuilder::from_varmap(vm, lmd_model::candle::DType::F32, dev);
        Ok(Some((b, vb)))
    }

    /// The JSON fields naming this target.
    pub(crate) fn fields(&self) -> serde_json::Value {
        json!({"device": self.device.to_string(), "precision": self.precision.to_string()})
    }
}

impl Default for TrainStepOptions {
    fn default() -> Self {
        TrainStepOptions {
            preset: lmd_model::Preset::Tiny,
            batch: 64,
            ratios: vec![0.75, 0.15],
            steps: 3,
            torch_anchor: None,
            baseline: None,
            pixels: false,
            image_size: 224,
            pixel_patch: 16,
            latent_patch: 4,
            target: StepTarget::default(),
        }
    }
}

/// A training step's forward to the loss, from a seed.
type StepForward<'a> = dyn FnMut(u64) -> Result<lmd_model::candle::Tensor> + 'a;

/// Full training steps timed: one warm-up step (seed 0), then `steps` timed ones (seeds 1..),
/// each `forward(seed)` (to the loss), backward, and an AdamW update at `lr`. With a
/// `baseline` (the same model over the same variables on other kernels, named) the same steps
/// run again through it.
/// Returns the JSON fields (samples/s, the best step, seconds per phase, the last loss, and the
/// baseline's kernels and samples/s with ours / that) and our samples/s.
fn timed_steps(
    dev: &lmd_model::candle::Device,
    (steps, batch): (usize, usize),
    opt: &mut crate::optim::AdamW,
    lr: f64,
    forward: &mut StepForward<'_>,
    baseline: Option<(lmd_model::Backend, &mut StepForward<'_>)>,
) -> Result<(serde_json::Value, f64)> {
    // total seconds; seconds in forward / backward / optimizer, then the host's share of each
    // (until the call returned, before the device was waited for); the best step; the last loss
    let mut measure = |forward: &mut StepForward<'_>| -> Result<(f64, [f64; 6], f64, f32)> {
        let mut step = |seed: u64, phases: &mut [f64; 6]| -> Result<f32> {
            let t = Instant::now();
            let loss = forward(seed)?;
            phases[3] += t.elapsed().as_secs_f64();
            let value = loss.to_scalar::<f32>()?;
            phases[0] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let grads = loss.backward()?;
            phases[4] += t.elapsed().as_secs_f64();
            // a GPU queues the work: wait for it inside each phase's timing
            dev.synchronize()?;
            phases[1] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            opt.step(&grads, lr)?;
            phases[5] += t.elapsed().as_secs_f64();
            dev.synchronize()?;
            phases[2] += t.elapsed().as_secs_f64();
            Ok(value)
        };
        step(0, &mut [0.0; 6])?;
        let mut phases = [0f64; 6];
        let t0 = Instant::now();
        let (mut loss, mut best) = (0.0, f64::INFINITY);
        for s in 0..steps {
            let t = Instant::now();
            loss = step(1 + s as u64, &mut phases)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok((t0.elapsed().as_secs_f64(), phases, best, loss))
    };
    let (secs, phases, best, loss) = measure(forward)?;
    let rate = |secs: f64| (steps * batch) as f64 / secs;
    let per_step = |v: f64| (v / steps as f64 * 1e5).round() / 1e5;
    // On a GPU candle queues each op and returns: a phase whose host time is near its total
    // was bound by launching ops (host_fraction near 1), not by the device. On the CPU every
    // op runs when called, so it is 1 there.
    let mut fields = json!({
        "samples_per_s": rate(secs), "s_per_step": secs / steps as f64, "best_s_per_step": best,
        "forward_s": per_step(phases[0]), "backward_s": per_step(phases[1]),
        "optimizer_s": per_step(phases[2]), "forward_host_s": per_step(phases[3]),
        "backward_host_s": per_step(phases[4]), "optimizer_host_s": per_step(phases[5]),
        "host_fraction": (phases[3] + phases[4] + phases[5]) / (phases[0] + phases[1] + phases[2]),
        "loss": loss,
    });
    if let Some((backend, base)) = baseline {
        let (bsecs, _, _, _) = measure(base)?;
        fields["baseline_backend"] = json!(backend.as_str());
        fields["baseline_samples_per_s"] = json!(rate(bsecs));
        fields["vs_baseline"] = json!(bsecs / secs);
    }
    Ok((fields, rate(secs)))
}

/// `line` with `fields`' entries added.
pub(super) fn merged(mut line: serde_json::Value, fields: serde_json::Value) -> serde_json::Value {
    if let (Some(l), serde_json::Value::Object(f)) = (line.as_object_mut(), fields) {
        l.extend(f);
    }
    line
}

/// Options of `lmd-bench finetune-step`.
#[derive(Debug, Clone)]
pub struct FinetuneStepOptions {
    /// Encoder preset (default `tiny`).
    pub preset: lmd_model::Preset,
    pub batch: usize,
    pub classes: usize,
    /// Stochastic depth of the last block (MAE fine-tuning: 0.1).
    pub drop_path: f64,
    /// Timed steps (after one warm-up step).
    pub steps: usize,
    /// Also time the steps on these kernels (as [`TrainStepOptions::baseline`]).
    pub baseline: Option<lmd_model::Kernels>,
    pub target: StepTarget,
}

impl Default for FinetuneStepOptions {
    fn default() -> Self {
        FinetuneStepOptions {
            preset: lmd_model::Preset::Tiny,
            batch: 64,
            classes: 10,
            drop_path: 0.1,
            steps: 3,
            baseline: None,
            target: StepTarget::default(),
        }
    }
}

/// Run `lmd-bench finetune-step`: full fine-tuning steps of a VitClassifier (encoder with drop
/// path, global pool, head; label-smoothed cross-entropy, backward, AdamW) on random latents.
pub fn finetune_step(
    opts: &FinetuneStepOptions,
    mut emit: impl FnMut(serde_json::Value),
) -> Result<()> {
    use lmd_model::candle::Tensor;
    let encoder = opts.preset.config();
    let cfg = lmd_model::ClassifierConfig {
        encoder,
        num_classes: opts.classes,
        global_pool: true,
        drop_path: opts.drop_path,
        linear_probe: false,
    };
    let (dev, backend) = opts.target.open()?;
    let vm = candle_nn::VarMap::new();
    let clf = lmd_model::VitClassifier::init_on(&cfg, backend, &vm, 0, 2e-5, &dev)?;
    let base = match opts.target.baseline_vars(opts.baseline, &vm, &dev)? {
        Some((b, vb)) => Some((b, lmd_model::VitClassifier::new_on(&cfg, b, vb)?)),
        None => None,
    };
    // the trainer's optimizer (AdamW with per-parameter weight decay and state)
    let mut opt = crate::optim::AdamW::over_varmap(&vm, |_| true, Default::default())?
        .on_backend(clf.backend());
    let [h, w] = cfg.encoder.img_size;
    let x = Tensor::randn(0f32, 1.0, (opts.batch, cfg.encoder.in_chans, h, w), &dev)?;
    let labels: Vec<u32> = (0..opts.batch as u32)
        .map(|i| i % opts.classes as u32)
        .collect();
    let y = Tensor::from_vec(labels, opts.batch, &dev)?;
    let step = |clf: &lmd_model::VitClassifier, seed: u64| {
        let logits = clf.forward_t(&x, Some(seed))?;
        crate::finetune::cross_entropy(&logits, &y, 0.1)
    };
    let mut base_fwd = base.as_ref().map(|(k, b)| (*k, move |seed| step(b, seed)));
    let (fields, _) = timed_steps(
        &dev,
        (opts.steps, opts.batch),
        &mut opt,
        1e-4,
        &mut |seed| step(&clf, seed),
        base_fwd
            .as_mut()
            .map(|(k, f)| (*k, f as &mut StepForward<'_>)),
    )?;
    let line = json!({
        "bench": "finetune-step", "preset": opts.preset, "batch": opts.batch,
        "drop_path": opts.drop_path, "tokens": cfg.encoder.num_patches(), "steps": opts.steps,
        "threads": lmd_model::candle::utils::get_num_threads(), "backend": clf.backend().as_str(),
    });
    emit(merged(merged(line, opts.target.fields()), fields));
    Ok(())
}

/// One model's training steps at each of `ratios`: one JSON line each (`line` plus the timing
/// fields, the tokens kept and the counted GMAC per sample), and (ratio, samples/s) for each.
fn model_steps(
    cfg: &lmd_model::MaeConfig,
    opts: &TrainStepOptions,
    ratios: &[f64],
    line: &serde_json::Value,
    emit: &mut dyn FnMut(serde_json::Value),
) -> Result<Vec<(f64, f64)>> {
    use lmd_model::candle::Tensor;
    let (dev, backend) = opts.target.open()?;
    let vm = candle_nn::VarMap::new();
    let model = lmd_model::LatentMae::init_on(cfg, backend, &vm, 0, &dev)
        .map_err(lmd_model::Error::from)?;
    let base = match opts.target.baseline_vars(opts.baseline, &vm, &dev)? {
        Some((b, vb)) => {
            let m = lmd_model::LatentMae::new_on(cfg, b, vb).map_err(lmd_model::Error::from)?;
            Some((b, m))
        }
        None => None,
    };
    // the trainer's optimizer (AdamW with per-parameter weight decay and state)
    let mut opt = crate::optim::AdamW::over_varmap(&vm, |_| true, Default::default())?
        .on_backend(model.backend());
    let [h, w] = cfg.img_size;
    let x = Tensor::randn(0f32, 1.0, (opts.batch, cfg.in_chans, h, w), &dev)
        .map_err(lmd_model::Error::from)?;
    let mut rates = Vec::new();
    for &ratio in ratios {
        let step = |m: &lmd_model::LatentMae, seed: u64| -> Result<lmd_model::candle::Tensor> {
            Ok(m.forward(&x, ratio, seed)
                .map_err(lmd_model::Error::from)?
                .loss)
        };
        let mut base_fwd = base.as_ref().map(|(k, b)| (*k, move |seed| step(b, seed)));
        let (fields, rate) = timed_steps(
            &dev,
            (opts.steps, opts.batch),
            &mut opt,
            1.5e-4,
            &mut |seed| step(&model, seed),
            base_fwd
                .as_mut()
                .map(|(k, f)| (*k, f as &mut StepForward<'_>)),
        )?;
        let mut l = merged(merged(line.clone(), opts.target.fields()), fields);
        l["backend"] = json!(model.backend().as_str());
        l["mask_ratio"] = json!(ratio);
        l["tokens"] = json!(cfg.num_patches());
        l["kept_tokens"] = json!(cfg.kept_tokens(ratio));
        l["gmac_per_sample"] = json!((cfg.train_macs(ratio) / 1e6).round() / 1e3);
        emit(l);
        rates.push((ratio, rate));
    }
    Ok(rates)
}

/// `lmd-bench train-step --pixels`: pixel MAE (3 x S x S, patch p, MAE's fixed 0.75) and LMD
/// on latents (4 x S/8 x S/8, patch q, at 0.75 and at the cosine schedule's mean ratio) with
/// the same encoder and decoder; a last line with each latent rate over the pixel one.
fn pixels_vs_latents(
    opts: &TrainStepOptions,
    emit: &mut dyn FnMut(serde_json::Value),
) -> Result<()> {
    let (s, p, q) = (opts.image_size, opts.pixel_patch, opts.latent_patch);
    if s % 8 != 0 || p == 0 || q == 0 || s % p != 0 || (s / 8) % q != 0 {
        return Err(Error::Invalid(format!(
            "--image-size {s} must be a multiple of 8 (the VAE's factor) divisible by \
             --pixel-patch {p}, and its latent side {} by --latent-patch {q}",
            s / 8
        )));
    }
    let enc = opts.preset.config();
    let pixel = enc.on_input(3, s, p);
    let latent = enc.on_input(4, s / 8, q);
    let threads = lmd_model::candle::utils::get_num_threads();
    let line = |arm: &str, c: &lmd_model::MaeConfig| {
        json!({
            "bench": "train-step", "arm": arm, "preset": opts.preset, "batch": opts.batch,
            "input": [c.in_chans, c.img_size[0], c.img_size[1]], "patch": c.patch_size,
            "steps": opts.steps, "threads": threads,
        })
    };
    let px = model_steps(&pixel, opts, &[0.75], &line("pixel-mae", &pixel), emit)?[0].1;
    let cosine = lmd_model::MaskSchedule::lmd_cosine().mean_ratio();
    let lat = model_steps(
        &latent,
        opts,
        &[0.75, cosine],
        &line("lmd-latent", &latent),
        emit,
    )?;
    let gmac = |c: &lmd_model::MaeConfig, r: f64| c.train_macs(r);
    emit(json!({
        "bench": "train-step", "summary": "latent-vs-pixel", "preset": opts.preset,
        "pixel_samples_per_s": px,
        "latent_fixed_samples_per_s": lat[0].1, "latent_cosine_mean_samples_per_s": lat[1].1,
        "cosine_mean_ratio": cosine,
        "speedup_fixed": lat[0].1 / px, "speedup_cosine_mean": lat[1].1 / px,
        "gmac_ratio_fixed": gmac(&pixel, 0.75) / gmac(&latent, 0.75),
        "gmac_ratio_cosine_mean": gmac(&pixel, 0.75) / gmac(&latent, cosine),
    }));
    Ok(())
}

/// The arguments that make `tools/torch_mae_train_step.py` time the model `cfg` the way ours
/// is timed: the same sizes, batch, steps, threads, device and precision (bf16: autocast).
fn torch_anchor_args(
    cfg: &lmd_model::MaeConfig,
    opts: &TrainStepOptions,
    threads: usize,
) -> Vec<String> {
    let mut a: Vec<String> = [
        ("--batch", opts.batch),
        ("--steps", opts.steps),
        ("--threads", threads),
        ("--chans", cfg.in_chans),
        ("--size", cfg.img_size[0]),
        ("--patch", cfg.patch_size),
        ("--dim", cfg.embed_dim),
        ("--depth", cfg.depth),
        ("--heads", cfg.num_heads),
        ("--ddim", cfg.decoder_embed_dim),
        ("--ddepth", cfg.decoder_depth),
        ("--dheads", cfg.decoder_num_heads),
    ]
    .iter()
    .flat_map(|(k, v)| [k.to_string(), v.to_string()])
    .collect();
    a.extend(["--device".into(), opts.target.device.to_string()]);
    if opts.target.precision != lmd_model::Precision::F32 {
        a.extend(["--precision".into(), opts.target.precision.to_string()]);
    }
    a
}

/// Run `lmd-bench train-step`: full steps (forward, backward, AdamW update) of a LatentMae.
pub fn train_step(opts: &TrainStepOptions, mut emit: impl FnMut(serde_json::Value)) -> Result<()> {
    if opts.pixels {
        if opts.torch_anchor.is_some() {
            return Err(Error::Invalid(
                "--pixels and --torch-anchor are separate benchmarks".into(),
            ));
        }
        return pixels_vs_latents(opts, &mut emit);
    }
    let cfg = opts.preset.config();
    let threads = lmd_model::candle::utils::get_num_threads();
    let line = json!({
        "bench": "train-step", "preset": opts.preset, "batch": opts.batch,
        "steps": opts.steps, "threads": threads,
    });
    let ours = model_steps(&cfg, opts, &opts.ratios, &line, &mut emit)?;
    if let Some(anchor) = &opts.torch_anchor {
        let ratios: Vec<String> = opts.ratios.iter().map(|r| r.to_string()).collect();
        let out = std::process::Command::new("python3")
            .arg(anchor)
            .args(torch_anchor_args(&cfg, opts, threads))
            .args(["--ratios", &ratios.join(",")])
            .output()
            .map_err(|e| Error::io(anchor, "run", e))?;
        if !out.status.success() {
            return Err(Error::Invalid(format!(
                "{}: {}",
                anchor.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(mut v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let r = v["mask_ratio"].as_f64();
            let t = v["samples_per_s"].as_f64();
            let o = ours.iter().find(|(x, _)| Some(*x) == r).map(|(_, s)| *s);
            v["bench"] = json!("train-step");
            v["ours_vs_pytorch"] = json!(o.zip(t).map(|(o, t)| o / t));
            emit(v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_anchor_lines_carry_ours_over_pytorch_and_failures_name_the_script() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in for tools/torch_mae_train_step.py: echoes the arguments it was given in the
        // real script's line format, at 1 sample/s, after a line that is not JSON.
        let script = dir.path().join("anchor.py");
        std::fs::write(
            &script,
            "import json, sys\na = sys.argv\nv = lambda k: a[a.index(k) + 1]\nprint('warming up')\n\
             for r in v('--ratios').split(','):\n    print(json.dumps({'baseline': 'pytorch', \
             'mask_ratio': float(r), 'samples_per_s': 1.0, 'batch': int(v('--batch')), \
             'threads': int(v('--threads')), 'args': a[1:]}))\n",
        )
        .unwrap();
        let mut opts = TrainStepOptions {
            batch: 2,
            ratios: vec![0.75, 0.5],
            steps: 1,
            torch_anchor: Some(script),
            ..Default::default()
        };
        let mut lines = Vec::new();
        train_step(&opts, |v| lines.push(v)).unwrap();
        assert_eq!(lines.len(), 4, "{lines:?}");
        for (ours, torch) in lines[..2].iter().zip(&lines[2..]) {
            assert_eq!(torch["baseline"], "pytorch");
            assert_eq!(torch["mask_ratio"], ours["mask_ratio"]);
            assert_eq!(torch["batch"], 2);
            assert_eq!(torch["threads"], ours["threads"]);
            // PyTorch "ran" at 1 sample/s, so the ratio is our own figure
            assert_eq!(torch["ours_vs_pytorch"], ours["samples_per_s"]);
            assert_eq!(
                (ours["device"].as_str(), ours["precision"].as_str()),
                (Some("cpu"), Some("f32"))
            );
        }
        // the anchor is told the model's sizes and the device; f32 needs no precision flag
        let args: Vec<String> = serde_json::from_value(lines[2]["args"].clone()).unwrap();
        let arg = |k: &str| {
            args.iter()
                .position(|a| a == k)
                .map(|i| args[i + 1].clone())
        };
        let tiny = lmd_model::Preset::Tiny.config();
        assert_eq!(arg("--dim"), Some(tiny.embed_dim.to_string()));
        assert_eq!(arg("--depth"), Some(tiny.depth.to_string()));
        assert_eq!(arg("--ddim"), Some(tiny.decoder_embed_dim.to_string()));
        assert_eq!(arg("--patch"), Some(tiny.patch_size.to_string()));
        assert_eq!(arg("--device"), Some("cpu".into()));
        assert_eq!(arg("--precision"), None);

        // bf16: our steps in mixed precision, and the anchor asked for autocast
        let mut bf16 = opts.clone();
        bf16.ratios = vec![0.75];
        bf16.target.precision = lmd_model::Precision::Bf16;
        let mut lines = Vec::new();
        train_step(&bf16, |v| lines.push(v)).unwrap();
        assert_eq!(lines[0]["precision"], "bf16");
        assert!(lines[0]["loss"].as_f64().unwrap().is_finite(), "{lines:?}");
        // the host's share of the phases: all of them on the CPU, where ops run when called
        let host = lines[0]["host_fraction"].as_f64().unwrap();
        assert!(host > 0.0 && host <= 1.0, "{lines:?}");
        let args: Vec<String> = serde_json::from_value(lines[1]["args"].clone()).unwrap();
        assert!(
            args.windows(2).any(|w| w == ["--precision", "bf16"]),
            "{args:?}"
        );
        // the fused CPU kernels (the composite baseline's) run f32 only
        bf16.torch_anchor = None;
        bf16.baseline = Some(lmd_model::Kernels::Ops);
        let e = train_step(&bf16, |_| {}).unwrap_err().to_string();
        assert!(
            e.contains("--baseline-kernels ops") && e.contains("bf16"),
            "{e}"
        );

        let bad = dir.path().join("bad.py");
        std::fs::write(&bad, "import sys\nsys.exit('no module named torch')\n").unwrap();
        opts.torch_anchor = Some(bad);
        opts.ratios = vec![0.75];
        let e = train_step(&opts, |_| {}).unwrap_err().to_string();
        assert!(
            e.contains("bad.py") && e.contains("no module named torch"),
            "{e}"
        );
    }

    #[test]
    fn pixels_bench_times_both_arms_with_one_encoder_and_reports_the_ratio() {
        let opts = TrainStepOptions {
            batch: 2,
            steps: 1,
            pixels: true,
            image_size: 32,
            pixel_patch: 16,
            latent_patch: 2,
            ..Default::default()
        };
        let mut lines = Vec::new();
        train_step(&opts, |v| lines.push(v)).unwrap();
        assert_eq!(lines.len(), 4, "{lines:?}");
        let (px, fixed, mean, sum) = (&lines[0], &lines[1], &lines[2], &lines[3]);
        assert_eq!(
            (px["arm"].as_str(), px["input"].clone()),
            (Some("pixel-mae"), json!([3, 32, 32]))
        );
        assert_eq!(
            (px["patch"].as_u64(), px["tokens"].as_u64()),
            (Some(16), Some(4))
        );
        assert_eq!(fixed["input"], json!([4, 4, 4]));
        assert_eq!(
            (fixed["patch"].as_u64(), fixed["tokens"].as_u64()),
            (Some(2), Some(4))
        );
        assert_eq!(
            mean["mask_ratio"].as_f64(),
            Some(lmd_model::MaskSchedule::lmd_cosine().mean_ratio())
        );
        let rate = |v: &serde_json::Value| v["samples_per_s"].as_f64().unwrap();
        let sp = sum["speedup_fixed"].as_f64().unwrap();
        assert!((sp - rate(fixed) / rate(px)).abs() < 1e-9 * sp, "{sum}");
        let sp = sum["speedup_cosine_mean"].as_f64().unwrap();
        assert!((sp - rate(mean) / rate(px)).abs() < 1e-9 * sp, "{sum}");
        // same tokens, 3·256 vs 4·4 values per patch: the pixel step counts more MACs
        assert!(sum["gmac_ratio_fixed"].as_f64().unwrap() > 1.0, "{sum}");
        let bad = TrainStepOptions {
            latent_patch: 3,
            ..opts
        };
        let e = train_step(&bad, |_| {}).unwrap_err().to_string();
        assert!(e.contains("--latent-patch 3"), "{e}");
    }

    #[test]
    fn baseline_kernels_and_finetune_step_report_ours_over_the_baseline() {
        // a baseline on other kernels: a second figure per ratio, named, and their ratio; the
        // composite one (ops), and the row ops under the candle graph (the device check's pair)
        for (k, ours_backend, base_backend) in [
            (lmd_model::Kernels::Ops, "fused", "ops"),
            (lmd_model::Kernels::Rows, "fused", "rows"),
        ] {
            let opts2 = TrainStepOptions {
                batch: 2,
                ratios: vec![0.5],
                steps: 1,
                baseline: Some(k),
                ..Default::default()
            };
            let mut lines = Vec::new();
            train_step(&opts2, |v| lines.push(v)).unwrap();
            assert_eq!(lines.len(), 1);
            let (ours, base) = (
                lines[0]["samples_per_s"].as_f64().unwrap(),
                lines[0]["baseline_samples_per_s"].as_f64().unwrap(),
            );
            let ratio = lines[0]["vs_baseline"].as_f64().unwrap();
            assert!(
                base > 0.0 && (ratio - ours / base).abs() < 1e-6 * ratio,
                "{lines:?}"
            );
            assert_eq!(lines[0]["backend"], ours_backend, "{lines:?}");
            assert_eq!(lines[0]["baseline_backend"], base_backend, "{lines:?}");
        }

        let mut lines = Vec::new();
        let ft = FinetuneStepOptions {
            batch: 4,
            steps: 1,
            drop_path: 0.5,
            baseline: Some(lmd_model::Kernels::Ops),
            ..Default::default()
        };
        finetune_step(&ft, |v| lines.push(v)).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["bench"], "finetune-step");
        assert!(lines[0]["loss"].as_f64().unwrap().is_finite());
        assert!(lines[0]["vs_baseline"].as_f64().unwrap() > 0.0, "{lines:?}");
    }
}
