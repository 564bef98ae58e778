//! `lmd-bench` figures. Each figure is one JSON object (one line on stdout), with any baseline
//! measured in the same invocation so that ratios survive a noisy machine.

use crate::testvectors;
use crate::{Error, Result};
use lmd_data::shard::{RecordLayout, ShardMeta, ShardReader, ShardWriter, WriterOptions};
use lmd_data::DType;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `lmd-bench shards`.
#[derive(Debug, Clone)]
pub struct ShardBenchOptions {
    /// Records in the benchmark shard.
    pub records: usize,
    /// Random `get` calls to time.
    pub random_gets: usize,
    /// Where `testvectors/taesd_*.safetensors` is looked for (`$LMD_SHARED` by default).
    pub shared: Option<PathBuf>,
    /// Scratch directory for the shard files (a temp dir by default).
    pub workdir: Option<PathBuf>,
}

impl Default for ShardBenchOptions {
    fn default() -> Self {
        ShardBenchOptions {
            records: 16384,
            random_gets: 4000,
            shared: testvectors::shared_dir(),
            workdir: None,
        }
    }
}

/// Distinct real latents (f32, 4x28x28 each) and where they came from; synthetic smooth
/// random fields when the reference file is absent.
pub(crate) fn source_latents(
    shared: Option<&PathBuf>,
) -> Result<(Vec<Vec<f32>>, [usize; 3], String)> {
    if let Some(dir) = shared {
        let p = dir.join("testvectors/taesd_imagenette_val16.safetensors");
        if p.exists() {
            let t = testvectors::read_f32(&p, "latents")?;
            if t.shape.len() != 4 {
                return Err(Error::Tensors {
                    path: p,
                    detail: format!("latents shape {:?}, expected [N,C,H,W]", t.shape),
                });
            }
            let shape = [t.shape[1], t.shape[2], t.shape[3]];
            let n: usize = shape.iter().product();
            let lat = t.data.chunks_exact(n).map(|c| c.to_vec()).collect();
            return Ok((
                lat,
                shape,
                format!("real: {} (TAESD latents of imagenette val)", p.display()),
            ));
        }
    }
    // Deterministic pseudo-latents: sums of random sinusoids plus noise (an LCG, no deps).
    let shape = [4, 28, 28];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) as f32 - 0.5
    };
    let mut lat = Vec::new();
    for _ in 0..16 {
        let mut v = vec![0f32; 4 * 28 * 28];
        for c in 0..4 {
            let (a, b, ph) = (rnd() * 0.6, rnd() * 0.6, rnd() * 6.0);
            for y in 0..28 {
                for x in 0..28 {
                    v[c * 784 + y * 28 + x] =
                        2.0 * ((a * x as f32 + b * y as f32 + ph).sin()) + 0.5 * rnd();
                }
            }
        }
        lat.push(v);
    }
    Ok((lat, shape, "synthetic (LMD_SHARED not set)".into()))
}

pub(crate) fn bench_meta(dtype: DType, shape: [usize; 3]) -> ShardMeta {
    lmd_data::synthetic::taesd_like_meta(
        dtype,
        RecordLayout::single(),
        shape,
        &format!("lmd-bench {}", env!("CARGO_PKG_VERSION")),
    )
}

/// Run `lmd-bench shards`; returns the JSON lines (also meant to be printed as they are).
pub fn shards(opts: &ShardBenchOptions, mut emit: impl FnMut(serde_json::Value)) -> Result<()> {
    let (lat, shape, source) = source_latents(opts.shared.as_ref())?;
    let distinct = lat.len();
    let tmp;
    let dir = match &opts.workdir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("lmd-bench-{}", std::process::id()));
            tmp
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create", e))?;
    let elems: usize = shape.iter().product();

    // Compression: every block holds the distinct latents once (records_per_block = distinct),
    // so no block can compress one latent against a copy of itself.
    for (dtype, shuffle) in [
        (DType::F32, false),
        (DType::F32, true),
        (DType::BF16, false),
        (DType::BF16, true),
        (DType::F16, false),
        (DType::F16, true),
    ] {
        let path = dir.join(format!("size-{dtype}-{shuffle}.lmds"));
        let mut w = ShardWriter::create(
            &path,
            bench_meta(dtype, shape),
            WriterOptions {
                records_per_block: Some(distinct),
                byte_shuffle: shuffle,
                ..Default::default()
            },
        )?;
        let n = distinct * 8;
        for i in 0..n {
            w.push_f32(
                &format!("k{i:08}"),
                Some((i % 10) as i64),
                &lat[i % distinct],
            )?;
        }
        let info = w.finish()?;
        let bpr = info.bytes as f64 / n as f64;
        emit(json!({
            "bench": "shards", "figure": "bytes_per_record", "dtype": dtype.name(), "byte_shuffle": shuffle,
            "bytes_per_record": bpr, "raw_f32_bytes_per_record": elems * 4,
            "ratio_vs_f32": bpr / (elems * 4) as f64, "records_per_block": distinct, "source": source,
        }));
        let _ = std::fs::remove_file(&path);
    }

    // Throughput shard: f16 + shuffle, blocks of `distinct` records.
    let path = dir.join("throughput-f16.lmds");
    let mut w = ShardWriter::create(
        &path,
        bench_meta(DType::F16, shape),
        WriterOptions {
            records_per_block: Some(distinct),
            ..Default::default()
        },
    )?;
    let n = opts.records.max(distinct);
    let t0 = Instant::now();
    for i in 0..n {
        w.push_f32(
            &format!("k{i:08}"),
            Some((i % 10) as i64),
            &lat[i % distinct],
        )?;
    }
    let info = w.finish()?;
    let write_s = t0.elapsed().as_secs_f64();
    emit(
        json!({"bench": "shards", "figure": "write", "dtype": "f16", "records": n,
        "records_per_s": n as f64 / write_s, "file_bytes": info.bytes}),
    );

    let r = ShardReader::open(&path)?;
    let raw_bytes = (n * elems * 2) as f64;
    // Warm the page cache so both sides read memory, not disk.
    let _ = r.verify();

    // Baseline: a plain memcpy of the same decompressed bytes (one buffer of the whole size,
    // so it is bound by memory like the real read, not by cache).
    let src = vec![1u8; n * r.meta().record_bytes()];
    let mut dst = vec![0u8; src.len()];
    dst.copy_from_slice(&src); // fault the pages in first
    let t0 = Instant::now();
    dst.copy_from_slice(&src);
    std::hint::black_box(&mut dst);
    let memcpy_s = t0.elapsed().as_secs_f64();
    drop((src, dst));

    // Sequential read + checksum + decompress + unshuffle, block by block (raw f16 bytes).
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    let mut sum = 0u64;
    for k in 0..r.num_blocks() {
        r.read_block_into(k, &mut out, &mut scratch)?;
        sum = sum.wrapping_add(out[out.len() / 2] as u64);
    }
    std::hint::black_box(sum);
    let seq_s = t0.elapsed().as_secs_f64();
    emit(
        json!({"bench": "shards", "figure": "sequential_read", "dtype": "f16", "records": n,
        "records_per_s": n as f64 / seq_s, "gb_per_s": raw_bytes / seq_s / 1e9,
        "memcpy_gb_per_s": raw_bytes / memcpy_s / 1e9, "ratio_vs_memcpy": memcpy_s / seq_s, "threads": 1}),
    );

    // Sequential records as f32 (what a loader hands on).
    let t0 = Instant::now();
    let mut count = 0usize;
    for rec in r.iter() {
        let rec = rec?;
        count += 1;
        std::hint::black_box(&rec.data);
    }
    let it_s = t0.elapsed().as_secs_f64();
    emit(
        json!({"bench": "shards", "figure": "sequential_iter_f32", "dtype": "f16", "records": count,
        "records_per_s": count as f64 / it_s, "gb_per_s_f16": raw_bytes / it_s / 1e9, "threads": 1}),
    );

    // Random access: each get decompresses its block (a cache miss nearly always).
    let mut state = 12345u64;
    let t0 = Instant::now();
    for _ in 0..opts.random_gets {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (state >> 33) as usize % n;
        std::hint::black_box(r.get(i)?);
    }
    let rnd_s = t0.elapsed().as_secs_f64();
    emit(
        json!({"bench": "shards", "figure": "random_get", "dtype": "f16", "gets": opts.random_gets,
        "records_per_s": opts.random_gets as f64 / rnd_s, "records_per_block": distinct, "threads": 1}),
    );
    drop(r);
    let _ = std::fs::remove_file(&path);
    if opts.workdir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Options of `lmd-bench train-step`.
#[derive(Debug, Clone)]
pub struct TrainStepOptions {
    /// Model preset (default `tiny`: ViT-Ti, patch 2 on 4x28x28, decoder 128 x 4).
    pub preset: String,
    pub batch: usize,
    /// Mask ratios to measure, one JSON line each.
    pub ratios: Vec<f64>,
    /// Timed steps per ratio (after one warm-up step).
    pub steps: usize,
    /// Also run this PyTorch baseline (`tools/torch_mae_train_step.py`, the `tiny` sizes) with
    /// the same batch, ratios, steps and thread count, and report ours / PyTorch per ratio.
    pub torch_anchor: Option<PathBuf>,
    /// Also run each ratio with the fused block node switched off (every block as candle ops)
    /// and report ours / that.
    pub composite_baseline: bool,
}

impl Default for TrainStepOptions {
    fn default() -> Self {
        TrainStepOptions {
            preset: "tiny".into(),
            batch: 64,
            ratios: vec![0.75, 0.15],
            steps: 3,
            torch_anchor: None,
            composite_baseline: false,
        }
    }
}

/// A training step's forward to the loss, from a seed.
type StepForward<'a> = dyn FnMut(u64) -> Result<lmd_model::candle::Tensor> + 'a;

/// Full training steps timed: one warm-up step (seed 0), then `steps` timed ones (seeds 1..),
/// each `forward(seed)` (to the loss), backward, and an AdamW update at `lr`. With a
/// `baseline` (the same model over the same variables on the `ops` backend: every block as
/// fused single-layer ops) the same steps run again through it.
/// Returns the JSON fields (samples/s, the best step, seconds per phase, the last loss, and the
/// baseline's samples/s with ours / that) and our samples/s.
fn timed_steps(
    (steps, batch): (usize, usize),
    opt: &mut crate::optim::AdamW,
    lr: f64,
    forward: &mut StepForward<'_>,
    baseline: Option<&mut StepForward<'_>>,
) -> Result<(serde_json::Value, f64)> {
    // total seconds, seconds in forward / backward / optimizer, the best step, the last loss
    let mut measure = |forward: &mut StepForward<'_>| -> Result<(f64, [f64; 3], f64, f32)> {
        let mut step = |seed: u64, phases: &mut [f64; 3]| -> Result<f32> {
            let t = Instant::now();
            let loss = forward(seed)?;
            let value = loss.to_scalar::<f32>()?;
            phases[0] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let grads = loss.backward()?;
            phases[1] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            opt.step(&grads, lr)?;
            phases[2] += t.elapsed().as_secs_f64();
            Ok(value)
        };
        step(0, &mut [0.0; 3])?;
        let mut phases = [0f64; 3];
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
    let per_step = |v: f64| (v / steps as f64 * 1e3).round() / 1e3;
    let mut fields = json!({
        "samples_per_s": rate(secs), "s_per_step": secs / steps as f64, "best_s_per_step": best,
        "forward_s": per_step(phases[0]), "backward_s": per_step(phases[1]),
        "optimizer_s": per_step(phases[2]), "loss": loss,
    });
    if let Some(base) = baseline {
        let (bsecs, _, _, _) = measure(base)?;
        fields["composite_samples_per_s"] = json!(rate(bsecs));
        fields["vs_composite"] = json!(bsecs / secs);
    }
    Ok((fields, rate(secs)))
}

/// `line` with `fields`' entries added.
fn merged(mut line: serde_json::Value, fields: serde_json::Value) -> serde_json::Value {
    if let (Some(l), serde_json::Value::Object(f)) = (line.as_object_mut(), fields) {
        l.extend(f);
    }
    line
}

/// Options of `lmd-bench finetune-step`.
#[derive(Debug, Clone)]
pub struct FinetuneStepOptions {
    /// Encoder preset (default `tiny`).
    pub preset: String,
    pub batch: usize,
    pub classes: usize,
    /// Stochastic depth of the last block (MAE fine-tuning: 0.1).
    pub drop_path: f64,
    /// Timed steps (after one warm-up step).
    pub steps: usize,
    /// Also time the steps with the fused block node off, and report ours / that.
    pub composite_baseline: bool,
}

impl Default for FinetuneStepOptions {
    fn default() -> Self {
        FinetuneStepOptions {
            preset: "tiny".into(),
            batch: 64,
            classes: 10,
            drop_path: 0.1,
            steps: 3,
            composite_baseline: false,
        }
    }
}

/// Run `lmd-bench finetune-step`: full fine-tuning steps of a VitClassifier (encoder with drop
/// path, global pool, head; label-smoothed cross-entropy, backward, AdamW) on random latents.
pub fn finetune_step(
    opts: &FinetuneStepOptions,
    mut emit: impl FnMut(serde_json::Value),
) -> Result<()> {
    use lmd_model::candle::{Device, Tensor};
    let encoder = lmd_model::MaeConfig::preset(&opts.preset)
        .ok_or_else(|| Error::Invalid(format!("unknown preset {:?}", opts.preset)))?;
    let cfg = lmd_model::ClassifierConfig {
        encoder,
        num_classes: opts.classes,
        global_pool: true,
        drop_path: opts.drop_path,
        linear_probe: false,
    };
    let dev = Device::Cpu;
    let vm = candle_nn::VarMap::new();
    let clf = lmd_model::VitClassifier::init(&cfg, &vm, 0, 2e-5, &dev)?;
    let base = if opts.composite_baseline {
        let vb =
            lmd_model::candle_nn::VarBuilder::from_varmap(&vm, lmd_model::candle::DType::F32, &dev);
        Some(lmd_model::VitClassifier::new_on(
            &cfg,
            lmd_model::Backend::Ops,
            vb,
        )?)
    } else {
        None
    };
    // the trainer's optimizer (AdamW with per-parameter weight decay and state)
    let mut opt = crate::optim::AdamW::over_varmap(&vm, |_| true, Default::default())?;
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
    let mut base_fwd = base.as_ref().map(|b| move |seed| step(b, seed));
    let (fields, _) = timed_steps(
        (opts.steps, opts.batch),
        &mut opt,
        1e-4,
        &mut |seed| step(&clf, seed),
        base_fwd.as_mut().map(|f| f as &mut StepForward<'_>),
    )?;
    let line = json!({
        "bench": "finetune-step", "preset": opts.preset, "batch": opts.batch,
        "drop_path": opts.drop_path, "tokens": cfg.encoder.num_patches(), "steps": opts.steps,
        "threads": lmd_model::candle::utils::get_num_threads(),
    });
    emit(merged(line, fields));
    Ok(())
}

/// Run `lmd-bench train-step`: full steps (forward, backward, AdamW update) of a LatentMae.
pub fn train_step(opts: &TrainStepOptions, mut emit: impl FnMut(serde_json::Value)) -> Result<()> {
    use lmd_model::candle::{Device, Tensor};
    let cfg = lmd_model::MaeConfig::preset(&opts.preset)
        .ok_or_else(|| Error::Invalid(format!("unknown preset {:?}", opts.preset)))?;
    let dev = Device::Cpu;
    let vm = candle_nn::VarMap::new();
    let model = lmd_model::LatentMae::init(&cfg, &vm, 0, &dev).map_err(lmd_model::Error::from)?;
    let base = if opts.composite_baseline {
        let vb =
            lmd_model::candle_nn::VarBuilder::from_varmap(&vm, lmd_model::candle::DType::F32, &dev);
        Some(
            lmd_model::LatentMae::new_on(&cfg, lmd_model::Backend::Ops, vb)
                .map_err(lmd_model::Error::from)?,
        )
    } else {
        None
    };
    // the trainer's optimizer (AdamW with per-parameter weight decay and state)
    let mut opt = crate::optim::AdamW::over_varmap(&vm, |_| true, Default::default())?;
    let [h, w] = cfg.img_size;
    let x = Tensor::randn(0f32, 1.0, (opts.batch, cfg.in_chans, h, w), &dev)
        .map_err(lmd_model::Error::from)?;
    if opts.torch_anchor.is_some() && opts.preset != "tiny" {
        return Err(Error::Invalid(
            "--torch-anchor mirrors the `tiny` preset only".into(),
        ));
    }
    let threads = lmd_model::candle::utils::get_num_threads();
    let mut ours = Vec::new();
    for &ratio in &opts.ratios {
        let step = |m: &lmd_model::LatentMae, seed: u64| -> Result<lmd_model::candle::Tensor> {
            Ok(m.forward(&x, ratio, seed)
                .map_err(lmd_model::Error::from)?
                .loss)
        };
        let mut base_fwd = base.as_ref().map(|b| move |seed| step(b, seed));
        let (fields, rate) = timed_steps(
            (opts.steps, opts.batch),
            &mut opt,
            1.5e-4,
            &mut |seed| step(&model, seed),
            base_fwd.as_mut().map(|f| f as &mut StepForward<'_>),
        )?;
        let line = json!({
            "bench": "train-step", "preset": opts.preset, "mask_ratio": ratio, "batch": opts.batch,
            "tokens": cfg.num_patches(), "steps": opts.steps, "threads": threads,
        });
        emit(merged(line, fields));
        ours.push((ratio, rate));
    }
    if let Some(anchor) = &opts.torch_anchor {
        let ratios: Vec<String> = opts.ratios.iter().map(|r| r.to_string()).collect();
        let out = std::process::Command::new("python3")
            .arg(anchor)
            .args([
                "--batch",
                &opts.batch.to_string(),
                "--steps",
                &opts.steps.to_string(),
            ])
            .args([
                "--threads",
                &threads.to_string(),
                "--ratios",
                &ratios.join(","),
            ])
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

/// Options of `lmd-bench vae`.
#[derive(Debug, Clone)]
pub struct VaeBenchOptions {
    /// `taesd` or `sd-vae`.
    pub vae: String,
    pub weights: PathBuf,
    pub batch: usize,
    pub size: usize,
    /// Minimum seconds to time each direction (after one warm-up batch).
    pub seconds: f64,
}

/// Run `lmd-bench vae`: encode and decode throughput on random images, one JSON line.
pub fn vae(opts: &VaeBenchOptions, mut emit: impl FnMut(serde_json::Value)) -> Result<()> {
    use lmd_model::candle::{Device, Tensor};
    let dev = Device::Cpu;
    let vae = lmd_model::vae::load_vae(&opts.vae, &opts.weights, &dev)?;
    let x = Tensor::rand(0f32, 1.0, (opts.batch, 3, opts.size, opts.size), &dev)?;
    let x = vae.input_range().from_unit(&x)?;
    let timed = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        f()?; // warm-up
        let t0 = Instant::now();
        let mut n = 0usize;
        while n == 0 || t0.elapsed().as_secs_f64() < opts.seconds {
            f()?;
            n += 1;
        }
        Ok((n * opts.batch) as f64 / t0.elapsed().as_secs_f64())
    };
    let z = vae.encode(&x)?.latent;
    let enc = timed(&|| vae.encode(&x).map(|_| ()).map_err(Error::from))?;
    let dec = timed(&|| vae.decode(&z).map(|_| ()).map_err(Error::from))?;
    emit(json!({
        "bench": "vae", "vae": opts.vae, "batch": opts.batch, "size": opts.size,
        "encode_images_per_s": enc, "decode_images_per_s": dec,
        "threads": lmd_model::candle::utils::get_num_threads(),
    }));
    Ok(())
}

/// Options of `lmd-bench decode`.
#[derive(Debug, Clone)]
pub struct DecodeBenchOptions {
    /// A shard pattern, an ILSVRC tar or an ImageFolder directory.
    pub input: String,
    /// Thread counts to measure (one JSON line each).
    pub threads: Vec<usize>,
    pub size: u32,
    /// Passes over the images per measurement.
    pub repeat: usize,
    /// `pillow_decode.py` to run on the same input in the same invocation (single tar inputs).
    pub pillow_anchor: Option<PathBuf>,
}

/// Run `lmd-bench decode`: decode + Resize(S) + CenterCrop(S) to CHW f32, images/s.
pub fn decode(opts: &DecodeBenchOptions, mut emit: impl FnMut(serde_json::Value)) -> Result<()> {
    use lmd_data::source::{InputSpec, Labels, SourceEvent};
    use lmd_data::transform::{prepare, TransformConfig};
    let spec = InputSpec::detect(&opts.input, None, None)?;
    let mut images = Vec::new();
    spec.read(Labels::Optional, &mut |ev| {
        if let SourceEvent::Sample(s) = ev {
            images.push((s.key, s.image));
        }
        true
    })?;
    if images.is_empty() {
        return Err(Error::Invalid(format!("{}: no images", opts.input)));
    }
    let cfg = TransformConfig {
        size: opts.size,
        ..Default::default()
    };
    let mut per_core_1 = None;
    let mut pixels: Vec<u64> = images
        .iter()
        .filter_map(|(_, b)| lmd_data::decode::decode_rgb8(b, u64::MAX).ok())
        .map(|i| i.width as u64 * i.height as u64)
        .collect();
    pixels.sort_unstable();
    let median_mpx = pixels[pixels.len() / 2] as f64 / 1e6;
    for &t in &opts.threads {
        let t = t.max(1);
        let t0 = Instant::now();
        let failures = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for w in 0..t {
                let (images, cfg, failures) = (&images, &cfg, &failures);
                sc.spawn(move || {
                    let mut resizer = lmd_data::transform::Resizer::new();
                    let mut img = lmd_data::decode::Rgb8::default();
                    for _ in 0..opts.repeat.max(1) {
                        for (key, bytes) in images.iter().skip(w).step_by(t) {
                            let ok = lmd_data::decode::decode_rgb8_region_into(
                                bytes,
                                lmd_data::decode::DEFAULT_MAX_PIXELS,
                                |w, h| cfg.source_region(w, h),
                                &mut img,
                            )
                            .and_then(|()| prepare(&img, key, cfg, &mut resizer));
                            match ok {
                                Ok(v) => {
                                    std::hint::black_box(v);
                                }
                                Err(_) => {
                                    failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                        }
                    }
                });
            }
        });
        let secs = t0.elapsed().as_secs_f64();
        let n = images.len() * opts.repeat.max(1);
        let ips = n as f64 / secs;
        if t == 1 {
            per_core_1 = Some(ips);
        }
        emit(json!({
            "bench": "decode", "input": opts.input, "images": images.len(), "median_megapixels": median_mpx,
            "threads": t, "size": opts.size, "images_per_s": ips, "images_per_s_per_thread": ips / t as f64,
            "jpeg_decoder": lmd_data::decode::JPEG_DECODER,
            "scaling_vs_1_thread": per_core_1.map(|b| ips / b / t as f64),
            "failed": failures.load(std::sync::atomic::Ordering::Relaxed) / opts.repeat.max(1),
        }));
    }
    if let Some(anchor) = &opts.pillow_anchor {
        let out = std::process::Command::new("python3")
            .arg(anchor)
            .arg(&opts.input)
            .output()
            .map_err(|e| Error::io(anchor, "run", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "pillow N images T s R images/s/core"
        let rate = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[1] == "images/s/core")
            .and_then(|w| w[0].parse::<f64>().ok());
        emit(json!({
            "bench": "decode", "baseline": "pillow", "input": opts.input, "threads": 1,
            "images_per_s": rate, "ours_per_core_vs_pillow": rate.and_then(|r| per_core_1.map(|o| o / r)),
            "stderr": String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""),
        }));
    }
    Ok(())
}

/// Options of `lmd-bench loader`.
#[derive(Debug, Clone)]
pub struct LoaderBenchOptions {
    /// Latent dataset directories; empty: a synthetic 4x28x28 f16 dataset of `records`.
    pub data: Vec<PathBuf>,
    pub records: usize,
    pub batch: usize,
    pub window: usize,
    /// Minimum seconds timed for the loader alone.
    pub seconds: f64,
    /// Then train this many steps of `preset` on the same data and report the trainer's
    /// consumption and data-wait fraction (0: skip).
    pub train_steps: u64,
    pub preset: String,
}

impl Default for LoaderBenchOptions {
    fn default() -> Self {
        LoaderBenchOptions {
            data: vec![],
            records: 4096,
            batch: 64,
            window: 8192,
            seconds: 5.0,
            train_steps: 0,
            preset: "tiny".into(),
        }
    }
}

/// Run `lmd-bench loader`: the latent loader alone (batches/s, GB/s of f32 latents handed out),
/// against a sequential decode of the same shards (the baseline), and optionally beside the
/// trainer's consumption on the same data.
pub fn loader(opts: &LoaderBenchOptions, mut emit: impl FnMut(serde_json::Value)) -> Result<()> {
    use lmd_data::loader::{LatentLoader, LoaderConfig};
    let scratch = tempfile_dir()?;
    let (data, source) = if opts.data.is_empty() {
        let d = scratch.join("synthetic");
        lmd_data::synthetic::write_dataset(
            &d,
            &lmd_data::synthetic::SyntheticSpec {
                records: opts.records,
                latent_shape: [4, 28, 28],
                records_per_shard: 2048,
                ..Default::default()
            },
        )?;
        (vec![d], "synthetic 4x28x28 f16")
    } else {
        (opts.data.clone(), "given")
    };
    let ds = std::sync::Arc::new(crate::train::open_data(&data)?);
    let rec_f32_bytes = ds.meta().tensor_elems() * 4;
    let file_bytes: u64 = ds.shards().iter().map(|s| s.file_bytes()).sum();

    // baseline: every record decoded in file order
    let t0 = Instant::now();
    let mut n_seq = 0usize;
    while t0.elapsed().as_secs_f64() < opts.seconds / 2.0 || n_seq == 0 {
        for s in ds.shards() {
            for r in s.iter() {
                std::hint::black_box(r?);
                n_seq += 1;
            }
        }
    }
    let seq_rps = n_seq as f64 / t0.elapsed().as_secs_f64();

    let mut loader = LatentLoader::new(
        ds.clone(),
        LoaderConfig {
            batch_size: opts.batch,
            window: opts.window,
            ..Default::default()
        },
    )?;
    let t0 = Instant::now();
    let mut batches = 0usize;
    while t0.elapsed().as_secs_f64() < opts.seconds || batches == 0 {
        for b in loader.epoch() {
            std::hint::black_box(b?);
            batches += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let samples_per_s = (batches * opts.batch) as f64 / secs;
    emit(json!({
        "bench": "loader", "source": source, "records": ds.len(), "latent_shape": ds.meta().latent_shape,
        "dtype": ds.meta().dtype, "batch": opts.batch, "window": opts.window,
        "batches_per_s": batches as f64 / secs, "samples_per_s": samples_per_s,
        "gb_per_s": samples_per_s * rec_f32_bytes as f64 / 1e9,
        "file_mb_per_s": samples_per_s * (file_bytes as f64 / ds.len() as f64) / 1e6,
        "sequential_records_per_s": seq_rps, "ratio_vs_sequential": samples_per_s / seq_rps,
    }));

    if opts.train_steps > 0 {
        let cfg = crate::train::TrainConfig {
            preset: opts.preset.clone(),
            data: data.clone(),
            out: scratch.join("run"),
            steps: opts.train_steps,
            batch_size: opts.batch,
            window: opts.window,
            warmup_steps: 1,
            checkpoint_every: u64::MAX,
            log_every: opts.train_steps,
            preview_samples: 0,
            ..Default::default()
        };
        let mut last = None;
        crate::train::run(&cfg, false, &mut |m| last = Some(m.clone()))?;
        let m = last.ok_or_else(|| Error::Invalid("no training metrics".into()))?;
        emit(json!({
            "bench": "loader-vs-trainer", "preset": opts.preset, "batch": opts.batch, "steps": opts.train_steps,
            "trainer_samples_per_s": m.samples_per_s, "loader_samples_per_s": samples_per_s,
            "loader_headroom": samples_per_s / m.samples_per_s, "data_wait_fraction": m.data_wait_fraction,
        }));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// A fresh scratch directory under the system temp dir.
fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "lmd-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, "create", e))?;
    Ok(d)
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
             'threads': int(v('--threads'))}))\n",
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
        }

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
    fn composite_baseline_and_finetune_step_report_ours_over_the_baseline() {
        // the composite baseline: a second figure per ratio, and their ratio
        let opts2 = TrainStepOptions {
            batch: 2,
            ratios: vec![0.5],
            steps: 1,
            composite_baseline: true,
            ..Default::default()
        };
        let mut lines = Vec::new();
        train_step(&opts2, |v| lines.push(v)).unwrap();
        assert_eq!(lines.len(), 1);
        let (ours, base) = (
            lines[0]["samples_per_s"].as_f64().unwrap(),
            lines[0]["composite_samples_per_s"].as_f64().unwrap(),
        );
        let ratio = lines[0]["vs_composite"].as_f64().unwrap();
        assert!(
            base > 0.0 && (ratio - ours / base).abs() < 1e-6 * ratio,
            "{lines:?}"
        );

        let mut lines = Vec::new();
        let ft = FinetuneStepOptions {
            batch: 4,
            steps: 1,
            drop_path: 0.5,
            composite_baseline: true,
            ..Default::default()
        };
        finetune_step(&ft, |v| lines.push(v)).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["bench"], "finetune-step");
        assert!(lines[0]["loss"].as_f64().unwrap().is_finite());
        assert!(
            lines[0]["vs_composite"].as_f64().unwrap() > 0.0,
            "{lines:?}"
        );
    }
}
