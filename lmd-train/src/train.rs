//! `lmd-train`: masked latent pretraining over latent shards.
//!
//! Each step: a batch from [`LatentLoader`], the mask ratio from the schedule at `step/steps`,
//! LatentMae forward with each sample's masking noise seeded by `(seed, global sample
//! position)`, backward, global grad-norm clipping, AdamW at MAE's per-step warmup +
//! half-cosine learning rate (`lr = blr · global batch / 256`).
//!
//! Data parallel (see [`crate::dist`]): under `mpirun`/`srun` every rank takes `batch_size`
//! samples of each global batch (`batch_size x world`), gradients are averaged, rank 0 writes
//! the run directory; a resume at another world size keeps the checkpoint's global batch and
//! continues its sample order. SIGTERM/SIGUSR1 write a checkpoint at the next step boundary and
//! stop ([`TrainSummary::stopped_by`]).
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

use crate::dist::Job;
use crate::driver::Driver;
use crate::optim::{lr_at, AdamW, AdamWConfig};
use crate::report::Render;
use crate::run_dir::write_json;
use crate::start::{start, CheckpointState, JobSettings, Start};
use crate::train_data::{Input, TrainData};
use crate::{Error, Result};
use lmd_data::loader::{LatentLoader, LoaderConfig, LoaderState};
use lmd_data::pixel_loader::PixelTransform;
use lmd_data::shard::LatentDataset;
use lmd_data::source::Labels;
use lmd_model::candle::{Device, Tensor};
use lmd_model::{LatentMae, MaeConfig, MaskSchedule};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Training configuration (TOML presets in `configs/pretrain-*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Model preset (tiny, small, base, large, base_patch4), unless `model` is given. On
    /// pixels the preset's encoder and decoder take 3 x 8h x 8w images in patches of 8p (its
    /// latents are 4 x h x w in patches of p): `tiny` is ViT-Ti/16 on 224 px.
    pub preset: lmd_model::Preset,
    /// What `data` holds: `latents` (latent shards: LMD) or `pixels` (image shards decoded and
    /// augmented every epoch: pixel-space MAE, with MAE's RandomResizedCrop + flip and
    /// ImageNet normalisation).
    pub input: crate::train_data::Input,
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
    /// Seed, device, logging (top-level keys: `seed`, `device`, `log_every`).
    #[serde(flatten)]
    pub run: crate::RunSettings,
    /// Loader shuffle window (records).
    pub window: usize,
    pub checkpoint_every: u64,
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
    /// Labelled validation data (the same kind as `data`): with it, the encoder's k-NN top-1
    /// (training data against this, [`crate::knn`]) at every checkpoint, in `knn.jsonl`.
    pub knn_data: Vec<PathBuf>,
    pub knn: crate::knn::KnnConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            preset: lmd_model::Preset::Tiny,
            input: crate::train_data::Input::Latents,
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
            run: crate::RunSettings::default(),
            window: 8192,
            checkpoint_every: 200,
            stop_after: None,
            keep_checkpoints: 3,
            preview_samples: 4,
            vae_weights: None,
            init: None,
            knn_data: vec![],
            knn: crate::knn::KnnConfig::default(),
        }
    }
}

impl JobSettings for TrainConfig {
    const PROGRAM: &'static str = "lmd-train";
    const RUN_ONLY_KEYS: &'static [&'static str] = &RUN_ONLY_KEYS;
    fn out(&self) -> &Path {
        &self.out
    }
    fn batch_size(&mut self) -> &mut usize {
        &mut self.batch_size
    }
    fn loader_config(&self, rank_world: (usize, usize)) -> LoaderConfig {
        crate::train_data::loader_config(self.batch_size, self.run.seed, self.window, rank_world)
    }
}

impl TrainConfig {
    pub fn model_config(&self) -> Result<MaeConfig> {
        resolve_model(self.preset, self.model.as_ref(), self.input)
    }
}

/// `model` when given, else the named preset: on pixels its encoder and decoder on
/// 3 x 8h x 8w in patches of 8p (the preset's latents are 4 x h x w in patches of p).
pub(crate) fn resolve_model(
    preset: lmd_model::Preset,
    model: Option<&MaeConfig>,
    input: Input,
) -> Result<MaeConfig> {
    Ok(match (model, input) {
        (Some(m), _) => m.clone(),
        (None, Input::Latents) => preset.config(),
        (None, Input::Pixels) => {
            let m = preset.config();
            m.on_input(3, 8 * m.img_size[0], 8 * m.patch_size)
        }
    })
}

pub use crate::metrics::Metrics;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CkptState {
    step: u64,
    loader: LoaderState,
    config: TrainConfig,
    /// The world size that wrote it (its global batch: `config.batch_size` x this).
    #[serde(default = "crate::start::one_rank")]
    world_size: usize,
    /// Training seconds up to this checkpoint (checkpoints, previews and k-NN not counted),
    /// summed over resumptions.
    #[serde(default)]
    train_s: f64,
}

impl CheckpointState<TrainConfig> for CkptState {
    fn settings(&self) -> (&TrainConfig, usize) {
        (&self.config, self.world_size)
    }
}

/// Settings that may change between a run and its resumption (they do not change the numbers).
/// (`device` may change too: the run continues, though not bit-identically across devices.)
const RUN_ONLY_KEYS: [&str; 13] = [
    "knn_data",
    "knn",
    "init",
    "device",
    "stop_after",
    "checkpoint_every",
    "log_every",
    "out",
    "keep_checkpoints",
    "preview_samples",
    "vae_weights",
    "cache_dir",
    "cache_limit",
];

/// Open data directories: a dataset dir (with `index.json`) or a precompute output whose
/// `worker-*` subdirectories are datasets ([`LatentDataset::discover`]).
pub fn open_data(dirs: &[PathBuf]) -> Result<LatentDataset> {
    Ok(LatentDataset::discover(dirs)?)
}

/// The number of samples `cfg.data` holds (for `--epochs`): latent records, or images.
pub fn samples_in(cfg: &TrainConfig) -> Result<usize> {
    Ok(match cfg.input {
        Input::Latents => open_data(&cfg.data)?.len(),
        Input::Pixels => crate::train_data::open_images(&cfg.data, Labels::Optional, false)?.len(),
    })
}

/// [`open_data`] for a run: remote datasets come through `cache` (said on stderr by rank 0).
pub fn open_data_cached(
    dirs: &[PathBuf],
    cache: &lmd_data::storage::Cache,
    say: bool,
) -> Result<LatentDataset> {
    let (ds, st) = LatentDataset::discover_cached(dirs, cache)?;
    if say && ds.group_bytes() > 0 {
        eprintln!(
            "data cache {}: streaming {} shards ({:.1} MB of data, more than the limit of \
             {:.1} MB) in groups of at most {:.1} MB",
            cache.dir.display(),
            ds.num_shards(),
            (0..ds.num_shards())
                .map(|s| ds.streamed_bytes(s))
                .sum::<u64>() as f64
                / 1e6,
            cache.limit as f64 / 1e6,
            ds.group_bytes() as f64 / 1e6
        );
    }
    if say && st.hits + st.fetched > 0 {
        eprintln!(
            "data cache {}: {} shards fetched ({:.1} MB), {} already cached, {} evicted",
            cache.dir.display(),
            st.fetched,
            st.bytes_fetched as f64 / 1e6,
            st.hits,
            st.evicted
        );
    }
    Ok(ds)
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub out: PathBuf,
    pub first_step: u64,
    pub last_step: u64,
    pub final_loss: f64,
    pub wall_s: f64,
    /// The signal that stopped the run early (after writing a checkpoint at `last_step`).
    pub stopped_by: Option<i32>,
    /// Samples this rank left out of their batches because they did not decode (pixels).
    pub skipped: u64,
    /// Training seconds (checkpoints, previews and k-NN not counted), over resumptions.
    pub train_s: f64,
    /// The last k-NN evaluation (with `knn_data`).
    pub knn: Option<crate::knn::KnnResult>,
}

/// The checkpoint directory `checkpoints/latest` names, if it exists (not verified: resuming
/// verifies, see [`crate::run_dir::RunDir::resume_point`]).
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(out.join("checkpoints/latest")).ok()?;
    let p = out.join("checkpoints").join(name.trim());
    p.is_dir().then_some(p)
}

/// The model configuration, after refusing nonsense settings before any work (naming the
/// setting).
fn validated(cfg: &TrainConfig) -> Result<MaeConfig> {
    let mcfg = cfg.model_config()?;
    mcfg.validate()?;
    cfg.schedule.validate_for(mcfg.num_patches())?;
    cfg.run.precision.check_trainable()?;
    if cfg.steps == 0 || cfg.batch_size == 0 {
        return Err(Error::Invalid(format!(
            "steps ({}) and batch_size ({}) must be at least 1",
            cfg.steps, cfg.batch_size
        )));
    }
    Ok(mcfg)
}

/// The training data, checked against the model's input shape, as rank `rank` of `world`
/// reads it.
fn open_checked(
    cfg: &TrainConfig,
    mcfg: &MaeConfig,
    rank_world: (usize, usize),
    say: bool,
) -> Result<TrainData> {
    let lcfg = cfg.loader_config(rank_world);
    match cfg.input {
        Input::Latents => {
            let ds = Arc::new(open_data_cached(&cfg.data, &cfg.run.cache()?, say)?);
            let [c, h, w] = ds.meta().latent_shape;
            if [c, h, w] != [mcfg.in_chans, mcfg.img_size[0], mcfg.img_size[1]] {
                return Err(Error::Invalid(format!(
                    "the data has latents {c}x{h}x{w}; the model expects {}x{}x{} (the presets \
                     take 224 px images' 4x28x28; for other data give the whole model as a \
                     [model] table in the --config file, as in configs/mae-tiny.toml, with \
                     in_chans = {c} and img_size = [{h}, {w}])",
                    mcfg.in_chans, mcfg.img_size[0], mcfg.img_size[1]
                )));
            }
            Ok(TrainData::Latents(LatentLoader::new(ds, lcfg)?))
        }
        Input::Pixels => {
            let [h, w] = mcfg.img_size;
            if mcfg.in_chans != 3 || h != w {
                return Err(Error::Invalid(format!(
                    "pixel input is RGB and square; the model expects {}x{h}x{w}",
                    mcfg.in_chans
                )));
            }
            let set = Arc::new(crate::train_data::open_images(
                &cfg.data,
                Labels::Optional,
                say,
            )?);
            if say {
                eprintln!(
                    "lmd-train: {} images ({:.1} MB encoded) decoded every epoch at {h}x{w}",
                    set.len(),
                    set.bytes() as f64 / 1e6
                );
            }
            TrainData::pixels(set, lcfg, PixelTransform::mae_pretrain(h as u32))
        }
    }
}

/// The weights file `--init` names (a checkpoint, or a checkpoint or run directory, verified),
/// refused before any data is read when it records another encoder than `mcfg` on `input`.
fn init_weights(init: &Path, mcfg: &MaeConfig, input: Input) -> Result<PathBuf> {
    let file = crate::run_dir::weights_file(init)?;
    crate::recorded::check_encoder(&file, mcfg, input, crate::recorded::Remedy::GiveSame)?;
    Ok(file)
}

/// Initialise from the `--init` weights `init` (a fresh run only), saying what was loaded
/// (rank 0).
fn init_from(
    model: &LatentMae,
    varmap: &lmd_model::candle_nn::VarMap,
    init: &Path,
    say: bool,
) -> Result<()> {
    let names = model.init_from(varmap, init)?;
    if !say {
        return Ok(());
    }
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
    Ok(())
}

/// Train in this process alone. `on_log` sees every logged line (progress bars).
pub fn run(
    cfg: &TrainConfig,
    resume: bool,
    on_log: &mut dyn FnMut(&Metrics),
) -> Result<TrainSummary> {
    run_job(&Job::single(), cfg, resume, on_log)
}

/// Train as one rank of `job` (data-parallel under several ranks: see [`crate::dist`]).
/// `cfg.batch_size` is per rank; rank 0 writes the run directory and calls `on_log`.
pub fn run_job(
    job: &Job,
    cfg: &TrainConfig,
    resume: bool,
    on_log: &mut dyn FnMut(&Metrics),
) -> Result<TrainSummary> {
    let mcfg = validated(cfg)?;
    // a fresh start's --init is resolved and checked first (a resume that finds no
    // checkpoint does it where it starts afresh)
    let init = match (&cfg.init, resume) {
        (Some(p), false) => Some(init_weights(p, &mcfg, cfg.input)?),
        _ => None,
    };
    let (rank, world) = (job.dist.rank(), job.dist.world_size());
    let root = job.dist.is_root();
    let loader = open_checked(cfg, &mcfg, (rank, world), root)?;
    let Start {
        run,
        resumed,
        cfg,
        mut loader,
        global_batch,
    } = start::<_, CkptState>(job, cfg, resume, loader, |run| {
        run.resume_point(&mut |w| eprintln!("lmd-train: {w}"))
    })?;
    let cfg = &cfg;
    let dev = cfg.run.open_device_for(&job.dist)?;
    let varmap = lmd_model::candle_nn::VarMap::new();
    let backend = cfg.run.backend(&dev)?;
    let model = LatentMae::init_on(&mcfg, backend, &varmap, cfg.run.seed, &dev)?;
    let opt = AdamW::over_varmap(&varmap, |_| true, cfg.optimizer)?.on_backend(model.backend());
    let mut driver = Driver::new(opt, cfg.grad_clip, cfg.run.log_every);
    let mut step = 0;
    match &resumed {
        Some((ck, st)) => {
            driver.restore(&varmap, ck)?;
            loader.set_state(st.loader);
            step = st.step;
        }
        None => {
            let init = match (init, &cfg.init) {
                (Some(file), _) => Some(file),
                (None, Some(p)) => Some(init_weights(p, &mcfg, cfg.input)?),
                (None, None) => None,
            };
            if let Some(file) = init {
                init_from(&model, &varmap, &file, root)?;
            }
        }
    }
    job.dist
        .check_same("the parameters at the start", || driver.opt.param_hash())?;
    let preview = match root {
        true => Some(Preview::new(cfg, &loader, &dev)?),
        false => None,
    };
    // metrics.jsonl: keep what precedes the resume point
    let mut log = match &run {
        Some(run) => Some(run.log("metrics.jsonl", step)?),
        None => None,
    };
    let lr_peak = cfg.blr * global_batch as f64 / 256.0;
    let first_step = step;
    let train_s0 = resumed.as_ref().map_or(0.0, |r| r.1.train_s);
    // k-NN at each checkpoint (rank 0): the training data in order, against `knn_data`
    let knn_sets = match (root, cfg.knn_data.is_empty()) {
        (true, false) => {
            let shape = [mcfg.in_chans, mcfg.img_size[0], mcfg.img_size[1]];
            let val = crate::train_data::Samples::open(
                cfg.input,
                &cfg.knn_data,
                shape,
                &cfg.run.cache()?,
                "k-NN validation",
                true,
            )?;
            Some((loader.in_order()?, val))
        }
        _ => None,
    };
    let mut knn_log = match (&run, &knn_sets) {
        (Some(run), Some(_)) => Some(run.log("knn.jsonl", step)?),
        _ => None,
    };
    let mut last_knn = None;
    let mut overhead = std::time::Duration::ZERO;
    let t0 = Instant::now();
    let mut last_loss = f64::NAN;
    let mut stopped_by = None;
    let mut skipped = 0;
    let stop = cfg.stop_after.unwrap_or(cfg.steps).min(cfg.steps);
    let noise_seed = cfg.run.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    'outer: while step < stop {
        let mut it = loader.epoch();
        while step < stop {
            let Some(batch) = driver.next_batch(&mut it) else {
                break;
            };
            let mut batch = batch?;
            let x = Driver::latents(&mut batch, &dev)?;
            let ratio = cfg.schedule.ratio(step as usize, cfg.steps as usize);
            // each sample's mask from its global position: step x global batch + offset
            let first = step * global_batch as u64 + (rank * cfg.batch_size) as u64;
            let out = model.forward_at(&x, ratio, noise_seed, first)?;
            let lr = lr_at(step, cfg.steps, cfg.warmup_steps, lr_peak, cfg.min_lr);
            let done = driver.step(job, &out.loss, step, lr, cfg.batch_size)?;
            step += 1;
            last_loss = done.loss;
            if driver.log_due(step) || step == stop || done.stop.is_some() {
                let rates = driver.take_rates();
                let line = Metrics {
                    step,
                    epoch: batch.epoch,
                    loss: done.loss,
                    mask_ratio: ratio,
                    lr,
                    grad_norm: done.grad_norm,
                    samples_per_s: rates.samples_per_s,
                    data_wait_fraction: rates.data_wait_fraction,
                    comm_fraction: rates.comm_fraction,
                };
                if let Some(log) = log.as_mut() {
                    log.append(&line)?;
                    on_log(&line);
                }
                for sk in it.take_skipped() {
                    skipped += 1;
                    eprintln!(
                        "lmd-train: rank {rank}: left out of its batch: {}",
                        crate::train_data::describe(&sk)
                    );
                }
            }
            let due = step.is_multiple_of(cfg.checkpoint_every.max(1)) || step == stop;
            if due || done.stop.is_some() {
                let t_ck = Instant::now();
                let train_s = train_s0 + (t0.elapsed() - overhead).as_secs_f64();
                job.dist
                    .check_same(&format!("the parameters after step {step}"), || {
                        driver.opt.param_hash()
                    })?;
                let state = CkptState {
                    step,
                    loader: it.state(),
                    config: cfg.clone(),
                    world_size: world,
                    train_s,
                };
                if let (Some(run), Some(preview)) = (&run, &preview) {
                    run.save_step(step, cfg.keep_checkpoints, |dir| {
                        model.save(&varmap, &dir.join(crate::run_dir::MODEL_FILE))?;
                        driver.opt.save(&dir.join(crate::run_dir::OPTIMIZER_FILE))?;
                        write_json(&dir.join("state.json"), &state)
                    })?;
                    preview.write(cfg, &model, step)?;
                }
                if let (Some((train, val)), Some(klog)) = (&knn_sets, knn_log.as_mut()) {
                    let r = crate::knn::evaluate(&model, train, val, &cfg.knn, (step, train_s))?;
                    klog.append(&r)?;
                    last_knn = Some(r);
                }
                if knn_sets.is_some() {
                    // the others wait for rank 0's k-NN
                    job.dist.comm().barrier()?;
                }
                overhead += t_ck.elapsed();
                driver.reset_interval();
            }
            if let Some(sig) = done.stop {
                if root {
                    eprintln!(
                        "lmd-train: {} received: stopped after step {step} with a checkpoint; \
                         rerun the command with --resume to continue",
                        crate::dist::signal_name(sig)
                    );
                }
                stopped_by = Some(sig);
                break 'outer;
            }
        }
    }
    // no rank leaves before rank 0 has written the last checkpoint
    job.dist.comm().barrier()?;
    Ok(TrainSummary {
        out: cfg.out.clone(),
        first_step,
        last_step: step,
        final_loss: last_loss,
        wall_s: t0.elapsed().as_secs_f64(),
        stopped_by,
        skipped,
        train_s: train_s0 + (t0.elapsed() - overhead).as_secs_f64(),
        knn: last_knn,
    })
}

/// The fixed samples previews show, and how they are drawn.
struct Preview {
    x: Option<Tensor>,
    vae: Option<Box<dyn lmd_model::vae::Vae>>,
    pixels: Option<PixelTransform>,
}

impl Preview {
    fn new(cfg: &TrainConfig, loader: &TrainData, dev: &Device) -> Result<Self> {
        let n = cfg.preview_samples.min(loader.len());
        let pixels = match loader {
            TrainData::Pixels(l) => Some(l.transform().clone()),
            TrainData::Latents(_) => None,
        };
        if n == 0 {
            return Ok(Preview {
                x: None,
                vae: None,
                pixels,
            });
        }
        let b = loader.first(n)?;
        let x = Tensor::from_vec(b.data, b.shape.to_vec(), dev)?;
        let vae = match (&cfg.vae_weights, loader) {
            (Some(w), TrainData::Latents(l)) => {
                let kind = l.dataset().meta().vae.name.parse()?;
                Some(lmd_model::vae::load_vae(
                    kind,
                    Path::new(w),
                    dev,
                    lmd_model::Precision::F32,
                )?)
            }
            _ => None,
        };
        Ok(Preview {
            x: Some(x),
            vae,
            pixels,
        })
    }

    /// `previews/step-N.png` and `curves.svg`.
    fn write(&self, cfg: &TrainConfig, model: &LatentMae, step: u64) -> Result<()> {
        if let Some(x) = &self.x {
            let ratio = cfg.schedule.ratio(step as usize, cfg.steps as usize);
            let r = crate::report::reconstruct(model, x, ratio, cfg.run.seed ^ 0x7072_6576)?;
            let render = match (&self.pixels, &self.vae) {
                (Some(t), _) => Render::Pixels {
                    mean: t.mean,
                    std: t.std,
                },
                (None, Some(v)) => Render::Vae(v.as_ref()),
                (None, None) => Render::FalseColour,
            };
            let img = crate::report::reconstruction_grid(&r, &render)?;
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
