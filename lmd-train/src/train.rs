//! `lmd-train`: masked latent pretraining over latent shards.
//!
//! Each step: a batch from [`LatentLoader`], the mask ratio from the schedule at `step/steps`,
//! LatentMae forward with masking noise seeded by `(seed, step)`, backward, global grad-norm
//! clipping, AdamW at MAE's per-step warmup + half-cosine learning rate
//! (`lr = blr · batch / 256`).
//!
//! Run directory: `config.json` (resolved), `metrics.jsonl` (one line per logged step),
//! `checkpoints/step-NNNNNNNN/{model,optimizer}.safetensors + state.json` and
//! `checkpoints/latest` (the name of the newest complete one). A checkpoint is written into a
//! temporary directory and renamed into place, then `latest` is replaced atomically, so a crash
//! never leaves a half checkpoint named as complete; the newest `keep_checkpoints` are kept and
//! temporaries of a killed run are removed on the next start. At each checkpoint,
//! `previews/step-NNNNNNNN.png` (input | masked | prediction | prediction + visible, decoded
//! through the VAE when `vae_weights` is set) and `curves.svg` (loss, mask ratio, lr) are
//! written (see [`crate::report`]). `--resume` restores weights, optimizer
//! moments, step and loader position: the loss sequence continues as if never stopped.

use crate::optim::{lr_at, AdamW, AdamWConfig};
use crate::{Error, Result};
use lmd_data::loader::{LatentLoader, LoaderConfig, LoaderState};
use lmd_data::shard::writer::write_atomic;
use lmd_data::shard::LatentDataset;
use lmd_model::candle::{Device, Tensor};
use lmd_model::{LatentMae, MaeConfig, MaskSchedule};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Training configuration (TOML presets in `configs/pretrain-*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Model preset (tiny, small, base, large, base_patch4), unless `model` is given.
    pub preset: String,
    /// Full model configuration (overrides `preset`).
    pub model: Option<MaeConfig>,
    pub schedule: MaskSchedule,
    pub data: Vec<PathBuf>,
    pub out: PathBuf,
    pub steps: u64,
    pub batch_size: usize,
    /// Base learning rate: lr = blr · batch_size / 256.
    pub blr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub optimizer: AdamWConfig,
    /// Max global grad norm (0: no clipping).
    pub grad_clip: f64,
    pub seed: u64,
    /// `cpu` or `cuda:N` (CUDA: a build with `--features cuda`; the fused CPU kernels fall
    /// back to composite candle ops there).
    pub device: String,
    /// Loader shuffle window (records).
    pub window: usize,
    pub checkpoint_every: u64,
    pub log_every: u64,
    /// Stop (after checkpointing) once this step is reached, without changing the schedule.
    pub stop_after: Option<u64>,
    /// Checkpoints kept (the newest ones; 0 keeps all).
    pub keep_checkpoints: usize,
    /// Samples in each reconstruction preview (0: no previews). Previews and the curve plot
    /// are written at every checkpoint and at the end.
    pub preview_samples: usize,
    /// VAE weights for decoded previews: a directory or `hf:OWNER/REPO` (the VAE named in the
    /// shards' metadata). Without it, previews show latent channels 0-2 in false colour.
    pub vae_weights: Option<String>,
    /// Start from these weights instead of a random init (an `lmd-train` checkpoint, or an
    /// official MAE/LMD safetensors or `.pth`; an encoder-only file leaves the decoder fresh).
    /// Ignored on `--resume` (the checkpoint holds the weights).
    pub init: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            preset: "tiny".into(),
            model: None,
            schedule: MaskSchedule::lmd_cosine(),
            data: vec![],
            out: PathBuf::from("runs/pretrain"),
            steps: 1000,
            batch_size: 64,
            blr: 1.5e-4,
            min_lr: 0.0,
            warmup_steps: 50,
            optimizer: AdamWConfig::default(),
            grad_clip: 3.0,
            seed: 0,
            device: "cpu".into(),
            window: 8192,
            checkpoint_every: 200,
            log_every: 10,
            stop_after: None,
            keep_checkpoints: 3,
            preview_samples: 4,
            vae_weights: None,
            init: None,
        }
    }
}

impl TrainConfig {
    pub fn model_config(&self) -> Result<MaeConfig> {
        resolve_model(&self.preset, self.model.as_ref())
    }
}

/// `model` when given, else the named preset.
pub(crate) fn resolve_model(preset: &str, model: Option<&MaeConfig>) -> Result<MaeConfig> {
    match model {
        Some(m) => Ok(m.clone()),
        None => MaeConfig::preset(preset)
            .ok_or_else(|| Error::Invalid(format!("unknown model preset {preset:?}"))),
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub mask_ratio: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples_per_s: f64,
    /// Fraction of the interval's wall time spent waiting for the loader.
    pub data_wait_fraction: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CkptState {
    step: u64,
    loader: LoaderState,
    config: TrainConfig,
}

/// Settings that may change between a run and its resumption (they do not change the numbers).
/// (`device` may change too: the run continues, though not bit-identically across devices.)
const RUN_ONLY_KEYS: [&str; 9] = [
    "init",
    "device",
    "stop_after",
    "checkpoint_every",
    "log_every",
    "out",
    "keep_checkpoints",
    "preview_samples",
    "vae_weights",
];

/// Open data directories: a dataset dir (with `index.json`) or a precompute output whose
/// `worker-*` subdirectories are datasets.
pub fn open_data(dirs: &[PathBuf]) -> Result<LatentDataset> {
    let mut all = Vec::new();
    for d in dirs {
        if d.join(lmd_data::shard::MANIFEST_FILE).exists() {
            all.push(d.clone());
            continue;
        }
        let mut subs: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| Error::io(d, "read directory", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join(lmd_data::shard::MANIFEST_FILE).exists())
            .collect();
        subs.sort();
        if subs.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no index.json (not a latent dataset)",
                d.display()
            )));
        }
        all.extend(subs);
    }
    Ok(LatentDataset::open_many(&all)?)
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub first_step: u64,
    pub last_step: u64,
    pub final_loss: f64,
    pub wall_s: f64,
}

/// The newest complete checkpoint directory of a run, if any.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(out.join("checkpoints/latest")).ok()?;
    let p = out.join("checkpoints").join(name.trim());
    p.is_dir().then_some(p)
}

/// Train. `on_log` sees every logged line (progress bars).
pub fn run(
    cfg: &TrainConfig,
    resume: bool,
    on_log: &mut dyn FnMut(&Metrics),
) -> Result<TrainSummary> {
    let mcfg = cfg.model_config()?;
    mcfg.validate().map_err(Error::Invalid)?;
    // nonsense settings are refused before any work, naming the setting
    cfg.schedule
        .validate_for(mcfg.num_patches())
        .map_err(|e| Error::Invalid(format!("schedule: {e}")))?;
    if cfg.steps == 0 || cfg.batch_size == 0 {
        return Err(Error::Invalid(format!(
            "steps ({}) and batch_size ({}) must be at least 1",
            cfg.steps, cfg.batch_size
        )));
    }
    let ds = Arc::new(open_data(&cfg.data)?);
    let [c, h, w] = ds.meta().latent_shape;
    if [c, h, w] != [mcfg.in_chans, mcfg.img_size[0], mcfg.img_size[1]] {
        return Err(Error::Invalid(format!(
            "the data has latents {c}x{h}x{w}; the model expects {}x{}x{}",
            mcfg.in_chans, mcfg.img_size[0], mcfg.img_size[1]
        )));
    }
    std::fs::create_dir_all(cfg.out.join("checkpoints"))
        .map_err(|e| Error::io(&cfg.out, "create", e))?;
    write_atomic(
        &cfg.out.join("config.json"),
        &serde_json::to_vec_pretty(cfg).expect("serializes"),
    )?;
    let dev = crate::device(&cfg.device)?;
    let varmap = lmd_model::candle_nn::VarMap::new();
    let model = LatentMae::init(&mcfg, &varmap, cfg.seed, &dev)?;
    let resuming = resume && latest_checkpoint(&cfg.out).is_some();
    if let (Some(init), false) = (&cfg.init, resuming) {
        let names = model.init_from(&varmap, init)?;
        eprintln!(
            "lmd-train: initialised {} tensors from {}{}",
            names.len(),
            init.display(),
            if names.iter().any(|n| n.starts_with("decoder")) {
                ""
            } else {
                " (encoder only: the decoder starts fresh)"
            }
        );
    }
    let mut opt = AdamW::over_varmap(&varmap, |_| true, cfg.optimizer)?.on_backend(model.backend());
    let mut loader = LatentLoader::new(
        ds.clone(),
        LoaderConfig {
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            window: cfg.window,
            ..Default::default()
        },
    )?;
    let preview = Preview::new(cfg, &loader, &dev)?;
    remove_stale_temporaries(&cfg.out.join("checkpoints"));
    let mut step = 0u64;
    if resume {
        if let Some(ck) = latest_checkpoint(&cfg.out) {
            let st: CkptState = serde_json::from_slice(
                &std::fs::read(ck.join("state.json"))
                    .map_err(|e| Error::io(ck.join("state.json"), "read", e))?,
            )
            .map_err(|e| Error::Invalid(format!("{}: {e}", ck.join("state.json").display())))?;
            let (mut a, mut b) = (
                serde_json::to_value(&st.config).expect("v"),
                serde_json::to_value(cfg).expect("v"),
            );
            for v in [&mut a, &mut b] {
                let o = v.as_object_mut().expect("object");
                for k in RUN_ONLY_KEYS {
                    o.remove(k);
                }
            }
            if a != b {
                return Err(Error::Invalid(format!(
                    "{}: the checkpoint was made with another configuration; resume with the same one",
                    ck.display()
                )));
            }
            let mut vm = varmap.clone();
            vm.load(ck.join("model.safetensors"))?;
            opt.load(&ck.join("optimizer.safetensors"))?;
            loader.set_state(st.loader);
            step = st.step;
        }
    }
    // metrics.jsonl: keep what precedes the resume point
    let mpath = cfg.out.join("metrics.jsonl");
    let kept: Vec<String> = std::fs::read_to_string(&mpath)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<Metrics>(l)
                .map(|x| x.step <= step)
                .unwrap_or(false)
        })
        .map(str::to_string)
        .collect();
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    write_atomic(&mpath, text.as_bytes())?;
    let mut mfile = std::fs::OpenOptions::new()
        .append(true)
        .open(&mpath)
        .map_err(|e| Error::io(&mpath, "open", e))?;

    let lr_peak = cfg.blr * cfg.batch_size as f64 / 256.0;
    let first_step = step;
    let t0 = Instant::now();
    let (mut t_int, mut wait, mut n_int) = (Instant::now(), 0f64, 0usize);
    let mut last_loss = f64::NAN;
    let stop = cfg.stop_after.unwrap_or(cfg.steps).min(cfg.steps);
    'outer: while step < stop {
        let mut it = loader.epoch();
        loop {
            if step >= stop {
                break 'outer;
            }
            let tw = Instant::now();
            let Some(batch) = it.next() else { break };
            wait += tw.elapsed().as_secs_f64();
            let batch = batch?;
            let x = Tensor::from_vec(batch.data, batch.shape.to_vec(), &dev)?;
            let ratio = cfg.schedule.ratio(step as usize, cfg.steps as usize);
            let noise_seed = cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step;
            let out = model.forward(&x, ratio, noise_seed)?;
            let loss = out.loss.to_scalar::<f32>()? as f64;
            if !loss.is_finite() {
                return Err(Error::Invalid(format!("loss is {loss} at step {step}")));
            }
            let mut grads = out.loss.backward()?;
            let norm = opt.clip_grad_norm(&mut grads, cfg.grad_clip)?;
            let lr = lr_at(step, cfg.steps, cfg.warmup_steps, lr_peak, cfg.min_lr);
            opt.step(&grads, lr)?;
            step += 1;
            n_int += cfg.batch_size;
            last_loss = loss;
            if step.is_multiple_of(cfg.log_every.max(1)) || step == stop {
                let dt = t_int.elapsed().as_secs_f64();
                let line = Metrics {
                    step,
                    epoch: batch.epoch,
                    loss,
                    mask_ratio: ratio,
                    lr,
                    grad_norm: norm,
                    samples_per_s: n_int as f64 / dt.max(1e-9),
                    data_wait_fraction: wait / dt.max(1e-9),
                };
                writeln!(
                    mfile,
                    "{}",
                    serde_json::to_string(&line).expect("serializes")
                )
                .map_err(|e| Error::io(&mpath, "write", e))?;
                on_log(&line);
                (t_int, wait, n_int) = (Instant::now(), 0.0, 0);
            }
            if step.is_multiple_of(cfg.checkpoint_every.max(1)) || step == stop {
                checkpoint(cfg, &model, &varmap, &opt, step, it.state())?;
                preview.write(cfg, &model, step)?;
            }
        }
    }
    Ok(TrainSummary {
        out: cfg.out.clone(),
        first_step,
        last_step: step,
        final_loss: last_loss,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

fn checkpoint(
    cfg: &TrainConfig,
    model: &LatentMae,
    varmap: &lmd_model::candle_nn::VarMap,
    opt: &AdamW,
    step: u64,
    loader: LoaderState,
) -> Result<()> {
    let dir = cfg.out.join("checkpoints");
    let name = format!("step-{step:08}");
    let tmp = dir.join(format!("{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
    model.save(varmap, &tmp.join("model.safetensors"))?;
    opt.save(&tmp.join("optimizer.safetensors"))?;
    let st = CkptState {
        step,
        loader,
        config: cfg.clone(),
    };
    write_atomic(
        &tmp.join("state.json"),
        &serde_json::to_vec_pretty(&st).expect("serializes"),
    )?;
    let fin = dir.join(&name);
    let _ = std::fs::remove_dir_all(&fin);
    std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, "rename", e))?;
    write_atomic(&dir.join("latest"), name.as_bytes())?;
    if cfg.keep_checkpoints > 0 {
        let mut old: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, "read directory", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-") && !n.contains(".tmp"))
            })
            .collect();
        old.sort();
        let n = old.len().saturating_sub(cfg.keep_checkpoints);
        for p in &old[..n] {
            std::fs::remove_dir_all(p).map_err(|e| Error::io(p, "remove old checkpoint", e))?;
        }
    }
    Ok(())
}

/// Remove checkpoint directories a killed run left half-written (`*.tmp-PID`).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(".tmp-"))
        {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}

/// The fixed samples previews show, and the VAE that decodes them.
struct Preview {
    x: Option<Tensor>,
    vae: Option<Box<dyn lmd_model::vae::Vae>>,
}

impl Preview {
    fn new(cfg: &TrainConfig, loader: &LatentLoader, dev: &Device) -> Result<Self> {
        let n = cfg.preview_samples.min(loader.dataset().len());
        if n == 0 {
            return Ok(Preview { x: None, vae: None });
        }
        let b = loader.make_batch(0, 0, &(0..n).collect::<Vec<_>>())?;
        let x = Tensor::from_vec(b.data, b.shape.to_vec(), dev)?;
        let vae = match &cfg.vae_weights {
            None => None,
            Some(w) => {
                let name = &loader.dataset().meta().vae.name;
                Some(lmd_model::vae::load_vae(name, Path::new(w), dev)?)
            }
        };
        Ok(Preview { x: Some(x), vae })
    }

    /// `previews/step-N.png` and `curves.svg`.
    fn write(&self, cfg: &TrainConfig, model: &LatentMae, step: u64) -> Result<()> {
        if let Some(x) = &self.x {
            let ratio = cfg.schedule.ratio(step as usize, cfg.steps as usize);
            let r = crate::report::reconstruct(model, x, ratio, cfg.seed ^ 0x7072_6576)?;
            let img = crate::report::reconstruction_grid(&r, self.vae.as_deref())?;
            let dir = cfg.out.join("previews");
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create", e))?;
            crate::report::save_png(&img, &dir.join(format!("step-{step:08}.png")))?;
        }
        crate::report::plot_curves(
            &cfg.out.join("metrics.jsonl"),
            &format!("lmd-train {}", cfg.out.display()),
            &cfg.out.join("curves.svg"),
        )
    }
}
