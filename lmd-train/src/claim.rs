//! `lmd-experiment claim`: LMD's headline measured. Pixel-space MAE and LMD pretrain the same
//! encoder and decoder for the same wall-clock budget on the same images; each is judged by
//! k-NN top-1 during pretraining and by linear probing and fine-tuning at the end, beside the
//! same encoder trained from scratch on the labels.
//!
//! Arms (encoder and decoder: the quickstart's model; `S` the image side):
//! - `pixel-mae`: RGB `S x S` in patches of `pixel_patch`, MAE's fixed ratio 0.75, images
//!   decoded with MAE's augmentation every epoch;
//! - `lmd`: TAESD latents of the same images (`S/8`, precomputed once; the precompute time is
//!   reported apart) in patches of `latent_patch`, LMD's cosine schedule 0.15 -> 0.75;
//! - `latent-mae`: the same latents at a fixed 0.75 (separates the latent space from the
//!   schedule);
//! - `scratch-pixels` and `scratch-latents`: the classifier trained on the labels from a random
//!   init, for as many epochs as the fine-tunes.
//!
//! Equal wall clock: each arm first trains a few steps to measure its seconds per step, then
//! gets `budget_s / that` steps (the schedules span them). The table reports the seconds it
//! actually trained (checkpoints, previews and k-NN not counted). `pixel-mae` and `lmd` run
//! with `seeds` seeds (mean ± half the range), `latent-mae` with one.
//!
//! Output: `OUT/claim.json` (every number), `OUT/CLAIM.md` (the table), `OUT/claim-knn.svg`
//! (k-NN top-1 against training seconds, every arm and seed); with `doc`, the table replaces
//! the block between `<!-- lmd-claim:begin -->` and `<!-- lmd-claim:end -->` of that file and
//! the plot is written beside it. Every run resumes, so a killed experiment continues.

use crate::finetune::EvalResult;
use crate::knn::KnnResult;
use crate::quickstart::{prepare_latents, QuickstartConfig};
use crate::train::TrainConfig;
use crate::train_data::Input;
use crate::{Error, Result};
use lmd_model::{MaeConfig, MaskSchedule};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

const BEGIN: &str = "<!-- lmd-claim:begin -->";
const END: &str = "<!-- lmd-claim:end -->";
/// Steps of the rate measurement before each arm (the first two are not timed).
const CALIBRATION_STEPS: u64 = 12;

/// The claim experiment's settings.
#[derive(Debug, Clone)]
pub struct ClaimConfig {
    /// Data (image inputs: both arms read the same images), image size, encoder (`model`'s
    /// widths and depths), fine-tune and linear-probe epochs, seed.
    pub base: QuickstartConfig,
    /// Pretraining seconds per arm.
    pub budget_s: f64,
    pub pixel_patch: usize,
    pub latent_patch: usize,
    /// Seeds of the headline arms (pixel-mae, lmd).
    pub seeds: u64,
    /// k-NN evaluations per pretraining run (at evenly spaced checkpoints).
    pub knn_points: u64,
    pub batch_size: usize,
    /// A markdown file whose marked block receives the table (the plot goes beside it).
    pub doc: Option<PathBuf>,
    /// The command line that reproduces the run (written under the table).
    pub command: String,
}

impl Default for ClaimConfig {
    fn default() -> Self {
        ClaimConfig {
            base: QuickstartConfig {
                out: PathBuf::from("lmd-claim"),
                ..Default::default()
            },
            budget_s: 240.0,
            pixel_patch: 8,
            latent_patch: 2,
            seeds: 2,
            knn_points: 8,
            batch_size: 64,
            doc: None,
            command: String::new(),
        }
    }
}

/// One pretraining run (an arm and a seed) and what it gave.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub arm: String,
    pub seed: u64,
    pub input: Input,
    pub tokens: usize,
    /// Counted multiply-accumulates of one training sample at the schedule's mean ratio.
    pub gmac_per_sample: f64,
    pub steps: u64,
    /// Seconds per step the calibration measured.
    pub calibrated_s_per_step: f64,
    pub train_s: f64,
    pub samples_per_s: f64,
    /// Fraction of the run's logged time spent waiting for data (mean over logged lines).
    pub data_wait_fraction: f64,
    pub knn: Vec<KnnResult>,
    pub linprobe: Option<EvalResult>,
    pub finetune: Option<EvalResult>,
}

/// A classifier trained from scratch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScratchResult {
    pub arm: String,
    pub input: Input,
    pub train_s: f64,
    pub finetune: Option<EvalResult>,
}

/// Everything the experiment measured (`claim.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimReport {
    pub image_size: u32,
    pub train_images: usize,
    pub val_images: usize,
    pub precompute_s: f64,
    pub budget_s: f64,
    pub threads: usize,
    pub runs: Vec<RunResult>,
    pub scratch: Vec<ScratchResult>,
    pub total_s: f64,
}

/// An arm: its name, input, schedule and seeds.
struct Arm {
    name: &'static str,
    input: Input,
    schedule: MaskSchedule,
    seeds: u64,
}

impl ClaimConfig {
    fn model(&self, input: Input) -> MaeConfig {
        let m = &self.base.model;
        let s = self.base.size as usize;
        match input {
            Input::Pixels => MaeConfig {
                norm_pix_loss: true, // MAE's pixel recipe
                ..m.on_input(3, s, self.pixel_patch)
            },
            Input::Latents => m.on_input(4, s / 8, self.latent_patch),
        }
    }

    fn arms(&self) -> [Arm; 3] {
        [
            Arm {
                name: "pixel-mae",
                input: Input::Pixels,
                schedule: MaskSchedule::mae(),
                seeds: self.seeds.max(1),
            },
            Arm {
                name: "lmd",
                input: Input::Latents,
                schedule: MaskSchedule::lmd_cosine(),
                seeds: self.seeds.max(1),
            },
            Arm {
                name: "latent-mae",
                input: Input::Latents,
                schedule: MaskSchedule::mae(),
                seeds: 1,
            },
        ]
    }

    fn validate(&self) -> Result<()> {
        let s = self.base.size as usize;
        for input in [Input::Pixels, Input::Latents] {
            let m = self.model(input);
            m.validate().map_err(|e| {
                Error::Invalid(format!(
                    "--size {s}, --pixel-patch {}, --latent-patch {}: {e}",
                    self.pixel_patch, self.latent_patch
                ))
            })?;
        }
        if self.base.limit_train > 0 || self.base.limit_val > 0 {
            return Err(Error::Invalid(
                "claim compares both arms on the whole inputs: drop --limit-train/--limit-val \
                 (give smaller inputs instead)"
                    .into(),
            ));
        }
        if self.base.train_latents.is_some() || self.base.val_latents.is_some() {
            return Err(Error::Invalid(
                "claim needs the images (the pixel arm reads them): give --train/--val, not \
                 precomputed latents"
                    .into(),
            ));
        }
        if self.budget_s.is_nan()
            || self.budget_s <= 0.0
            || self.knn_points == 0
            || self.batch_size == 0
        {
            return Err(Error::Invalid(
                "--budget-s, --knn-points and --batch-size must be positive".into(),
            ));
        }
        Ok(())
    }

    /// A pretraining configuration of `arm` with `seed` into `out`.
    fn pretrain(
        &self,
        arm: &Arm,
        seed: u64,
        (data, val): (&[PathBuf], &[PathBuf]),
        steps: u64,
        out: PathBuf,
    ) -> TrainConfig {
        TrainConfig {
            input: arm.input,
            model: Some(self.model(arm.input)),
            schedule: arm.schedule.clone(),
            data: data.to_vec(),
            knn_data: val.to_vec(),
            out,
            steps,
            batch_size: self.batch_size,
            blr: 1.5e-3,
            warmup_steps: (steps / 20).max(1),
            run: crate::RunSettings {
                seed,
                log_every: 1,
                ..Default::default()
            },
            window: 4096,
            checkpoint_every: (steps / self.knn_points).max(1),
            keep_checkpoints: 1,
            preview_samples: 4,
            ..Default::default()
        }
    }

    /// Fine-tuning (or linear probing) of `arm`'s input from `pretrained` (None: scratch).
    fn finetune(
        &self,
        input: Input,
        (data, val): (&[PathBuf], &[PathBuf]),
        pretrained: Option<PathBuf>,
        out: PathBuf,
        linear_probe: bool,
    ) -> crate::finetune::FinetuneConfig {
        let mut fc = self.base.finetune_config(
            PathBuf::new(),
            PathBuf::new(),
            pretrained,
            out,
            linear_probe,
        );
        fc.input = input;
        fc.model = Some(self.model(input));
        fc.data = data.to_vec();
        fc.val_data = val.to_vec();
        fc.batch_size = self.batch_size;
        fc
    }
}

/// Metrics lines of a run directory (empty when there are none).
fn metrics_of(dir: &Path) -> Vec<crate::metrics::Metrics> {
    crate::report::read_metrics(&dir.join("metrics.jsonl")).unwrap_or_default()
}

/// Mean seconds per step of a calibration run's logged steps after the first two (epoch
/// starts and slow steps included: they recur in the real run).
fn s_per_step(lines: &[crate::metrics::Metrics], batch: usize) -> Option<f64> {
    let v: Vec<f64> = lines
        .iter()
        .skip(2)
        .filter(|m| m.samples_per_s > 0.0)
        .map(|m| batch as f64 / m.samples_per_s)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Seconds per step of the calibration run `cal` (run unless a finished one is there).
fn calibrate(
    cal: &TrainConfig,
    batch: usize,
    log: &mut dyn FnMut(&str),
    arm: &str,
    seed: u64,
) -> Result<f64> {
    let lines = metrics_of(&cal.out);
    if let Some(s) = s_per_step(&lines, batch).filter(|_| lines.len() as u64 == cal.steps) {
        return Ok(s);
    }
    log(&format!(
        "== {arm} seed {seed}: measuring its step time ({} steps)",
        cal.steps
    ));
    // a timing run starts afresh: what an unfinished one left is not resumed
    match std::fs::remove_dir_all(&cal.out) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(&cal.out, "remove an unfinished calibration", e))
        }
        _ => {}
    }
    crate::train::run(cal, false, &mut |_| {})?;
    s_per_step(&metrics_of(&cal.out), batch)
        .ok_or_else(|| Error::Invalid(format!("{}: no timed steps", cal.out.display())))
}

/// Run the experiment; `log` gets one line per event.
pub fn run(cfg: &ClaimConfig, log: &mut dyn FnMut(&str)) -> Result<ClaimReport> {
    let t0 = Instant::now();
    cfg.validate()?;
    let out = cfg.base.out.clone();
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, "create", e))?;
    let (train_in, val_in, _) = crate::quickstart::defaults(&cfg.base)?;
    let images = |v: &[String]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
    let (train_img, val_img) = (images(&train_in), images(&val_in));
    let q = QuickstartConfig {
        train: train_in.clone(),
        val: val_in.clone(),
        ..cfg.base.clone()
    };
    let lat = prepare_latents(&q, log)?;
    let (train_lat, val_lat) = (vec![lat.train.clone()], vec![lat.val.clone()]);
    let data_of = |input: Input| match input {
        Input::Pixels => (train_img.as_slice(), val_img.as_slice()),
        Input::Latents => (train_lat.as_slice(), val_lat.as_slice()),
    };
    let mut runs = Vec::new();
    for arm in cfg.arms() {
        for seed in cfg.base.seed..cfg.base.seed + arm.seeds {
            let dir = out.join(format!("{}-seed{seed}", arm.name));
            let data = data_of(arm.input);
            // the rate of this arm on this machine: a short run of the same configuration
            let cal_dir = dir.join("calibrate");
            let mut cal = cfg.pretrain(&arm, seed, data, CALIBRATION_STEPS, cal_dir.clone());
            (cal.knn_data, cal.preview_samples) = (vec![], 0);
            // (then again for 1/20 of the budget when 12 steps are much shorter than that)
            let mut sps = calibrate(&cal, cfg.batch_size, &mut *log, arm.name, seed)?;
            let longer = (cfg.budget_s / 20.0 / sps).round() as u64;
            if longer > 2 * CALIBRATION_STEPS {
                cal.steps = longer;
                cal.out = dir.join("calibrate-long");
                cal.checkpoint_every = longer;
                sps = calibrate(&cal, cfg.batch_size, &mut *log, arm.name, seed)?;
            }
            let steps = ((cfg.budget_s / sps).round() as u64).max(cfg.knn_points);
            let tc = cfg.pretrain(&arm, seed, data, steps, dir.join("pretrain"));
            log(&format!(
                "== {} seed {seed}: {steps} steps ({:.3} s/step measured) for {:.0} s",
                arm.name, sps, cfg.budget_s
            ));
            let s = crate::train::run(&tc, true, &mut |m| {
                if m.step.is_multiple_of((steps / 10).max(1)) {
                    log(&format!(
                        "      step {}/{steps} loss {:.4} ratio {:.2} ({:.0} samples/s, data \
                         wait {:.0}%)",
                        m.step,
                        m.loss,
                        m.mask_ratio,
                        m.samples_per_s,
                        100.0 * m.data_wait_fraction
                    ))
                }
            })?;
            let knn: Vec<KnnResult> = std::fs::read_to_string(tc.out.join("knn.jsonl"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            if let Some(k) = knn.last() {
                log(&format!(
                    "      k-NN top-1 {:.1}% after {:.0} s",
                    100.0 * k.top1,
                    k.train_s
                ));
            }
            let lines = metrics_of(&tc.out);
            let wait =
                lines.iter().map(|m| m.data_wait_fraction).sum::<f64>() / lines.len().max(1) as f64;
            let ckpt = crate::train::latest_checkpoint(&tc.out)
                .ok_or_else(|| Error::Invalid(format!("{}: no checkpoint", tc.out.display())))?
                .join(crate::run_dir::MODEL_FILE);
            let mut evals = [None, None];
            for (i, lp) in [true, false].into_iter().enumerate() {
                let name = if lp { "linprobe" } else { "finetune" };
                let fc = cfg.finetune(arm.input, data, Some(ckpt.clone()), dir.join(name), lp);
                log(&format!("      {name}: {} epochs", fc.epochs));
                let r = crate::finetune::run(&fc, true, &mut |_| {}, &mut |_| {})?;
                if let Some(b) = &r.best {
                    log(&format!("      {name} top-1 {:.1}%", 100.0 * b.top1));
                }
                evals[i] = r.best;
            }
            let [linprobe, finetune] = evals;
            let m = cfg.model(arm.input);
            runs.push(RunResult {
                arm: arm.name.into(),
                seed,
                input: arm.input,
                tokens: m.num_patches(),
                gmac_per_sample: m.train_macs(arm.schedule.mean_ratio()) / 1e9,
                steps,
                calibrated_s_per_step: sps,
                train_s: s.train_s,
                samples_per_s: (steps as usize * cfg.batch_size) as f64 / s.train_s.max(1e-9),
                data_wait_fraction: wait,
                knn,
                linprobe,
                finetune,
            });
        }
    }
    let mut scratch = Vec::new();
    for (name, input) in [
        ("scratch-pixels", Input::Pixels),
        ("scratch-latents", Input::Latents),
    ] {
        log(&format!("== {name}: the classifier from a random init"));
        let t = Instant::now();
        let fc = cfg.finetune(input, data_of(input), None, out.join(name), false);
        let r = crate::finetune::run(&fc, true, &mut |_| {}, &mut |_| {})?;
        if let Some(b) = &r.best {
            log(&format!("      top-1 {:.1}%", 100.0 * b.top1));
        }
        scratch.push(ScratchResult {
            arm: name.into(),
            input,
            train_s: t.elapsed().as_secs_f64(),
            finetune: r.best,
        });
    }
    let report = ClaimReport {
        image_size: cfg.base.size,
        train_images: lat.train_records,
        val_images: lat.val_records,
        precompute_s: lat.seconds,
        budget_s: cfg.budget_s,
        threads: lmd_model::candle::utils::get_num_threads(),
        runs,
        scratch,
        total_s: t0.elapsed().as_secs_f64(),
    };
    write_outputs(cfg, &report)?;
    log(&format!(
        "claim done in {:.0} s",
        t0.elapsed().as_secs_f64()
    ));
    Ok(report)
}

/// `claim.json`, `CLAIM.md`, `claim-knn.svg`, and the doc's block and plot.
fn write_outputs(cfg: &ClaimConfig, r: &ClaimReport) -> Result<()> {
    let out = &cfg.base.out;
    let w = |p: &Path, text: &str| -> Result<()> {
        lmd_data::shard::writer::write_atomic(p, text.as_bytes())?;
        Ok(())
    };
    w(
        &out.join("claim.json"),
        &serde_json::to_string_pretty(r).expect("serializes"),
    )?;
    let svg = plot(r)?;
    w(&out.join("claim-knn.svg"), &svg)?;
    let plot_name = "claim-knn.svg";
    let block = table(cfg, r, plot_name);
    w(&out.join("CLAIM.md"), &block)?;
    if let Some(doc) = &cfg.doc {
        let text = std::fs::read_to_string(doc).unwrap_or_default();
        w(
            doc,
            &crate::experiment::splice_between(&text, &block, BEGIN, END),
        )?;
        let beside = doc.parent().unwrap_or(Path::new(".")).join(plot_name);
        w(&beside, &svg)?;
    }
    Ok(())
}

/// k-NN top-1 (%) against training seconds, one line per arm and seed.
fn plot(r: &ClaimReport) -> Result<String> {
    let series: Vec<crate::report::Panel> = r
        .runs
        .iter()
        .map(|run| {
            (
                format!("{} (seed {})", run.arm, run.seed),
                run.knn
                    .iter()
                    .map(|k| (k.train_s, 100.0 * k.top1))
                    .collect(),
            )
        })
        .collect();
    crate::report::series_svg(
        &format!(
            "k-NN top-1 during pretraining, {} px, equal wall clock",
            r.image_size
        ),
        "training seconds",
        "k-NN top-1 (%)",
        &series,
    )
}

/// The k-NN top-1 of `knn` at training second `t`, linearly between checkpoints (`None`
/// before the first or after the last).
pub fn knn_at(knn: &[KnnResult], t: f64) -> Option<f64> {
    let first = knn.first()?;
    if t < first.train_s {
        return None;
    }
    for w in knn.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if t <= b.train_s {
            let f = if b.train_s > a.train_s {
                (t - a.train_s) / (b.train_s - a.train_s)
            } else {
                1.0
            };
            return Some(a.top1 + f * (b.top1 - a.top1));
        }
    }
    let last = knn.last()?;
    (t <= last.train_s + 1e-9).then_some(last.top1)
}

/// The first training second at which `knn` reaches `target`, linearly between checkpoints.
pub fn time_to(knn: &[KnnResult], target: f64) -> Option<f64> {
    let first = knn.first()?;
    if first.top1 >= target {
        return Some(first.train_s);
    }
    knn.windows(2).find_map(|w| {
        let (a, b) = (&w[0], &w[1]);
        (b.top1 >= target)
            .then(|| a.train_s + (target - a.top1) / (b.top1 - a.top1) * (b.train_s - a.train_s))
    })
}

/// "mean ± half range" of `v` (one value: itself), formatted with `f`.
fn spread(v: &[f64], f: impl Fn(f64) -> String) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    if v.len() == 1 {
        return f(mean);
    }
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    format!("{} ± {}", f(mean), f((hi - lo) / 2.0))
}

/// The markdown block (between the markers).
pub fn table(cfg: &ClaimConfig, r: &ClaimReport, plot: &str) -> String {
    let m = &cfg.base.model;
    // equal wall clock: the time every run has a k-NN point at or after
    let equal_t = r
        .runs
        .iter()
        .map(|x| x.knn.last().map_or(0.0, |k| k.train_s))
        .fold(f64::MAX, f64::min);
    let pixel_final: Vec<f64> = r
        .runs
        .iter()
        .filter(|x| x.arm == "pixel-mae")
        .filter_map(|x| x.knn.last().map(|k| k.top1))
        .collect();
    let target = pixel_final.iter().sum::<f64>() / pixel_final.len().max(1) as f64;
    let pct = |v: f64| format!("{:.1}", 100.0 * v);
    let num = |v: f64| format!("{v:.0}");
    let mut s = format!(
        "{BEGIN}\n\
         {} training / {} validation images at {} px; encoder ViT {} wide, depth {}, {} heads; \
         decoder {} x {}; batch {}; {:.0} s of pretraining per arm (measured rate x budget); \
         fine-tune and linear probe {} and {} epochs; {} threads. TAESD precompute of all \
         images: {:.0} s (once, not in the pretraining seconds). k-NN: k = 20, cosine, \
         weighted vote, on the training images against the validation images.\n\n\
         | arm | input (patch, tokens) | mask ratio | GMAC/sample | samples/s | data wait | \
         pretrain s | k-NN @ {:.0} s (%) | final k-NN (%) | s to pixel-MAE's k-NN | linear probe (%) | fine-tune (%) |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        r.train_images,
        r.val_images,
        r.image_size,
        m.embed_dim,
        m.depth,
        m.num_heads,
        m.decoder_embed_dim,
        m.decoder_depth,
        cfg.batch_size,
        r.budget_s,
        cfg.base.finetune_epochs,
        cfg.base.linprobe_epochs,
        r.threads,
        r.precompute_s,
        equal_t,
    );
    for arm in cfg.arms() {
        let runs: Vec<&RunResult> = r.runs.iter().filter(|x| x.arm == arm.name).collect();
        let Some(first) = runs.first() else { continue };
        let col = |f: &dyn Fn(&RunResult) -> Option<f64>, fmt: &dyn Fn(f64) -> String| {
            let v: Vec<f64> = runs.iter().filter_map(|x| f(x)).collect();
            if v.len() < runs.len() {
                "-".to_string()
            } else {
                spread(&v, fmt)
            }
        };
        let reach: Vec<Option<f64>> = runs.iter().map(|x| time_to(&x.knn, target)).collect();
        let reach = if reach.iter().all(Option::is_some) {
            spread(&reach.iter().flatten().copied().collect::<Vec<_>>(), num)
        } else {
            format!(
                "not reached in {}/{}",
                reach.iter().filter(|x| x.is_none()).count(),
                runs.len()
            )
        };
        s.push_str(&format!(
            "| {}{} | {} ({}, {}) | {} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            arm.name,
            if runs.len() > 1 {
                format!(" ({} seeds)", runs.len())
            } else {
                String::new()
            },
            first.input,
            if first.input == Input::Pixels {
                cfg.pixel_patch
            } else {
                cfg.latent_patch
            },
            first.tokens,
            match arm.schedule {
                MaskSchedule::Constant { ratio } => format!("{ratio}"),
                _ => format!(
                    "{} (mean {:.2})",
                    arm.schedule.name(),
                    arm.schedule.mean_ratio()
                ),
            },
            first.gmac_per_sample,
            col(&|x| Some(x.samples_per_s), &num),
            col(&|x| Some(100.0 * x.data_wait_fraction), &|v| format!(
                "{v:.0}%"
            )),
            col(&|x| Some(x.train_s), &num),
            col(&|x| knn_at(&x.knn, equal_t), &pct),
            col(&|x| x.knn.last().map(|k| k.top1), &pct),
            reach,
            col(&|x| x.linprobe.as_ref().map(|e| e.top1), &pct),
            col(&|x| x.finetune.as_ref().map(|e| e.top1), &pct),
        ));
    }
    for sc in &r.scratch {
        s.push_str(&format!(
            "| {} | {} | - | - | - | - | - | - | - | - | - | {} |\n",
            sc.arm,
            sc.input,
            sc.finetune.as_ref().map_or("-".into(), |e| pct(e.top1))
        ));
    }
    s.push_str(&format!(
        "\n![k-NN top-1 against training seconds]({plot})\n\nReproduce: `{}` (total {:.0} s)\n{END}\n",
        cfg.command, r.total_s
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(t: f64, top1: f64) -> KnnResult {
        KnnResult {
            step: 0,
            train_s: t,
            top1,
            k: 20,
            train_samples: 1,
            val_samples: 1,
            eval_s: 0.0,
        }
    }

    #[test]
    fn knn_interpolates_between_checkpoints_and_finds_when_a_target_is_reached() {
        let v = [k(10.0, 0.2), k(20.0, 0.4), k(30.0, 0.3)];
        assert_eq!(knn_at(&v, 5.0), None);
        assert!((knn_at(&v, 15.0).unwrap() - 0.3).abs() < 1e-12);
        assert!((knn_at(&v, 25.0).unwrap() - 0.35).abs() < 1e-12);
        assert_eq!(knn_at(&v, 30.0), Some(0.3));
        assert_eq!(knn_at(&v, 31.0), None);
        assert!((time_to(&v, 0.3).unwrap() - 15.0).abs() < 1e-12);
        assert_eq!(time_to(&v, 0.1), Some(10.0));
        assert_eq!(time_to(&v, 0.5), None);
        assert_eq!(spread(&[1.0, 3.0], |x| format!("{x:.1}")), "2.0 ± 1.0");
        assert_eq!(spread(&[2.0], |x| format!("{x:.1}")), "2.0");
    }
}
