//! `lmd-finetune` and `lmd-eval`: classification on labelled latent shards with a pretrained
//! latent-MAE encoder (MAE's `main_finetune.py` / `main_linprobe.py`, on latents).
//!
//! - **Full fine-tuning**: [`VitClassifier`] (global pooling + `fc_norm` by default), AdamW
//!   (0.9, 0.999) with MAE's layer-wise lr decay, weight decay except norms/biases/tokens, label
//!   smoothing, stochastic depth (masks seeded by `(seed, step)`), per-step warmup then
//!   half-cosine lr (`lr = blr · batch / 256`). Not built: mixup/cutmix and RandAugment (pixel
//!   augmentations have no latent counterpart here beyond the stored views/flips).
//! - **Linear probing** (`linear_probe`): the encoder is frozen (only `head.1` is optimised, no
//!   weight decay), features are normalised by their mean/variance over the training set (MAE's
//!   `BatchNorm1d(affine=False)` head, computed once since the encoder does not change).
//! - **Evaluation** each epoch on the val shards: top-1, top-5 (when more than 5 classes), loss,
//!   over every val record. The best epoch's weights are kept.
//!
//! Run directory: `config.json`, `metrics.jsonl` (train steps), `eval.jsonl` (one line per
//! epoch), `curves.svg` (loss, lr, val top-1), `checkpoints/last/` (weights, optimizer, state:
//! `--resume` continues from the last finished epoch) and `best/` (`model.safetensors`,
//! `classifier.json`, `eval.json`), which `lmd-eval` reads.

use crate::dist::Job;
use crate::driver::Driver;
use crate::optim::{layer_decay_scale, lr_at, AdamW, AdamWConfig};
use crate::run_dir::{write_json, RunDir};
use crate::start::{start, CheckpointState, JobSettings, Start};
use crate::train_data::{Input, Samples, TrainData};
use crate::{Error, Result};
use lmd_data::loader::{LatentLoader, LoaderConfig, LoaderState};
use lmd_data::pixel_loader::PixelTransform;
use lmd_model::candle::{DType, Device, Tensor};
use lmd_model::candle_nn::VarMap;
use lmd_model::{ClassifierConfig, MaeConfig, VitClassifier};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Fine-tuning configuration (TOML presets in `configs/finetune-*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// Encoder preset (tiny, small, base, large, base_patch4), unless `model` is given.
    /// None: the architecture the `pretrained` weights record (their run's `config.json` or
    /// `classifier.json`, see [`crate::recorded`]), else tiny.
    pub preset: Option<lmd_model::Preset>,
    pub model: Option<MaeConfig>,
    /// What `data` and `val_data` hold: `latents` (latent shards) or `pixels` (image inputs,
    /// decoded every epoch: RandomResizedCrop(0.08-1) + flip for training, Resize + CenterCrop
    /// for evaluation; the pixel-MAE arm).
    pub input: Input,
    /// Pretrained MAE weights (an `lmd-train` checkpoint's `model.safetensors`, or an official
    /// MAE/LMD checkpoint converted to safetensors). None: train from scratch.
    pub pretrained: Option<PathBuf>,
    pub data: Vec<PathBuf>,
    pub val_data: Vec<PathBuf>,
    pub out: PathBuf,
    pub epochs: u64,
    pub batch_size: usize,
    /// Base learning rate: lr = blr · batch_size / 256.
    pub blr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub layer_decay: f64,
    pub optimizer: AdamWConfig,
    pub label_smoothing: f64,
    pub drop_path: f64,
    /// Global average pooling + fc_norm (MAE fine-tuning) or the cls token. None: global
    /// pooling for fine-tuning, the cls token for linear probing (MAE's defaults).
    pub global_pool: Option<bool>,
    pub linear_probe: bool,
    /// Classes (None: the largest training label + 1).
    pub num_classes: Option<usize>,
    /// Max global grad norm (0: none, MAE's fine-tuning default).
    pub grad_clip: f64,
    /// Seed, device, logging (top-level keys: `seed`, `device`, `log_every`).
    #[serde(flatten)]
    pub run: crate::RunSettings,
    pub window: usize,
    pub eval_batch_size: usize,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            preset: None,
            model: None,
            input: Input::Latents,
            pretrained: None,
            data: vec![],
            val_data: vec![],
            out: PathBuf::from("runs/finetune"),
            epochs: 10,
            batch_size: 64,
            blr: 1e-3,
            min_lr: 1e-6,
            warmup_epochs: 1.0,
            layer_decay: 0.75,
            optimizer: AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.05,
            },
            label_smoothing: 0.1,
            drop_path: 0.1,
            global_pool: None,
            linear_probe: false,
            num_classes: None,
            grad_clip: 0.0,
            run: crate::RunSettings::default(),
            window: 8192,
            eval_batch_size: 256,
        }
    }
}

impl JobSettings for FinetuneConfig {
    const PROGRAM: &'static str = "lmd-finetune";
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

impl FinetuneConfig {
    /// The linear-probing defaults (MAE's `main_linprobe.py`, with AdamW instead of LARS).
    pub fn linear_probe() -> Self {
        FinetuneConfig {
            linear_probe: true,
            blr: 0.05,
            min_lr: 0.0,
            layer_decay: 1.0,
            label_smoothing: 0.0,
            drop_path: 0.0,
            optimizer: AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            ..Default::default()
        }
    }

    /// The encoder to fine-tune and the pretrained weights file (a checkpoint or run directory
    /// resolved to its `model.safetensors` and verified, once): `model` when given, else
    /// `preset`, else the architecture the weights record, else tiny. An encoder that is not
    /// the one the weights record is refused here, naming both, before any data is read.
    pub fn encoder_and_weights(&self) -> Result<(MaeConfig, Option<PathBuf>)> {
        let weights = match &self.pretrained {
            Some(p) => Some(crate::run_dir::weights_file(p)?),
            None => None,
        };
        // read once: the architecture to take, and the one to check a given one against
        let recorded = weights.as_deref().and_then(crate::recorded::recorded_model);
        let enc = match (&recorded, &self.model, self.preset) {
            (Some(r), None, None) => r.model.clone(),
            _ => crate::train::resolve_model(
                self.preset.unwrap_or(lmd_model::Preset::Tiny),
                self.model.as_ref(),
                self.input,
            )?,
        };
        if let (Some(r), Some(w)) = (&recorded, &weights) {
            r.check(w, &enc, self.input, crate::recorded::Remedy::TakeRecorded)?;
        }
        Ok((enc, weights))
    }
}

pub use crate::eval::{cross_entropy, eval_checkpoint, evaluate, load_classifier, EvalResult};
pub use crate::metrics::StepMetrics;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    /// Epochs finished.
    epochs_done: u64,
    step: u64,
    /// Batches of epoch `epochs_done` already done (a checkpoint a stop signal wrote
    /// mid-epoch; 0 at an epoch's end).
    #[serde(default)]
    batch_in_epoch: u64,
    /// The loader's shard-group size for that epoch (see `LoaderState::group_bytes`).
    #[serde(default)]
    group_bytes: u64,
    best: Option<EvalResult>,
    config: FinetuneConfig,
    /// The world size that wrote it (its global batch: `config.batch_size` x this).
    #[serde(default = "crate::start::one_rank")]
    world_size: usize,
}

impl CheckpointState<FinetuneConfig> for State {
    fn settings(&self) -> (&FinetuneConfig, usize) {
        (&self.config, self.world_size)
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneSummary {
    pub out: PathBuf,
    pub best: Option<EvalResult>,
    pub last: Option<EvalResult>,
    pub wall_s: f64,
    /// The signal that stopped the run early (after a checkpoint of the step it reached).
    pub stopped_by: Option<i32>,
}

/// Write a classifier directory (`best`, `checkpoints/last`) completely or not at all: the
/// weights, `classifier.json` and `extra` files.
fn save_classifier(
    run: &RunDir,
    dir: &Path,
    clf: &VitClassifier,
    varmap: &VarMap,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    run.save_dir(dir, |tmp| {
        clf.save(varmap, &tmp.join(crate::run_dir::MODEL_FILE))?;
        write_json(&tmp.join("classifier.json"), clf.config())?;
        extra(tmp)
    })
}

/// Settings that may change between a fine-tuning run and its resumption.
const RUN_ONLY_KEYS: [&str; 7] = [
    "out",
    "log_every",
    "eval_batch_size",
    "pretrained",
    "device",
    "cache_dir",
    "cache_limit",
];

/// The labels of a batch as a `[B]` tensor (a record without one is an error).
fn batch_labels(batch: &lmd_data::loader::LatentBatch, dev: &Device) -> Result<Tensor> {
    let y: Vec<u32> = batch
        .labels
        .iter()
        .map(|l| {
            l.map(|v| v as u32)
                .ok_or_else(|| Error::Invalid("a record without a label".into()))
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::from_vec(y, batch.shape[0], dev)?)
}

/// The classifier configuration for `cfg`, from the training labels.
fn classifier_config(
    cfg: &FinetuneConfig,
    enc: MaeConfig,
    train_labels: &[i64],
) -> Result<ClassifierConfig> {
    let num_classes = match cfg.num_classes {
        Some(k) => k,
        None => train_labels.iter().copied().max().unwrap_or(0).max(1) as usize + 1,
    };
    if let Some(bad) = train_labels
        .iter()
        .find(|&&l| l < 0 || l as usize >= num_classes)
    {
        return Err(Error::Invalid(format!(
            "training label {bad} is outside 0..{num_classes}"
        )));
    }
    Ok(ClassifierConfig {
        encoder: enc,
        num_classes,
        global_pool: cfg.global_pool.unwrap_or(!cfg.linear_probe),
        drop_path: if cfg.linear_probe { 0.0 } else { cfg.drop_path },
        linear_probe: cfg.linear_probe,
    })
}

/// The training data as the loader reads it (augmented) and in order without augmentation
/// (labels, linear-probe statistics), and the validation samples, all checked against the
/// encoder's input.
fn open_finetune_data(
    cfg: &FinetuneConfig,
    enc: &MaeConfig,
    lcfg: LoaderConfig,
    say: bool,
) -> Result<(TrainData, Samples, Samples)> {
    let cache = cfg.run.cache()?;
    if cfg.val_data.is_empty() {
        return Err(Error::Invalid("no validation data (--val-data)".into()));
    }
    let shape = [enc.in_chans, enc.img_size[0], enc.img_size[1]];
    let plain = Samples::open(cfg.input, &cfg.data, shape, &cache, "training", say)?;
    let val = Samples::open(cfg.input, &cfg.val_data, shape, &cache, "validation", say)?;
    let train = match &plain {
        Samples::Latents(l) => TrainData::Latents(LatentLoader::new(l.shared_dataset(), lcfg)?),
        Samples::Pixels(l) => TrainData::pixels(
            l.shared_images(),
            lcfg,
            PixelTransform::finetune(shape[1] as u32),
        )?,
    };
    Ok((train, plain, val))
}

/// The checkpoint a resumed run continues from: `checkpoints/last` when it verifies; a damaged
/// one is reported and not loaded (the run starts over).
fn last_checkpoint(run: &RunDir) -> Result<Option<PathBuf>> {
    let last = run.checkpoints().join("last");
    if !last.join("state.json").exists() {
        return Ok(None);
    }
    match crate::run_dir::verify_dir(&last) {
        Ok(()) => Ok(Some(last)),
        Err(e) => {
            eprintln!(
                "lmd-finetune: {} does not verify ({e}); no older checkpoint: starting over",
                last.display()
            );
            Ok(None)
        }
    }
}

/// A fresh classifier (its encoder from `--pretrained`), and the step driver with its
/// optimiser: linear probing trains `head.1` only (MAE freezes everything else, `fc_norm`
/// included); fine-tuning everything, with layer-wise lr decay.
fn classifier_and_driver(
    cfg: &FinetuneConfig,
    ccfg: &ClassifierConfig,
    pretrained: Option<&Path>,
    dev: &Device,
) -> Result<(VitClassifier, VarMap, Driver)> {
    let varmap = VarMap::new();
    let head_std = if cfg.linear_probe { 0.01 } else { 2e-5 };
    let backend = cfg.run.backend(dev)?;
    let clf = VitClassifier::init_on(ccfg, backend, &varmap, cfg.run.seed, head_std, dev)?;
    if let Some(p) = pretrained {
        clf.load_pretrained(&varmap, p)?;
    } else if cfg.linear_probe {
        return Err(Error::Invalid(
            "linear probing needs --pretrained (a frozen random encoder is not a result)".into(),
        ));
    }
    let mut opt = AdamW::over_varmap(
        &varmap,
        |k| !cfg.linear_probe || k.starts_with("head.1."),
        cfg.optimizer,
    )?
    .on_backend(clf.backend());
    let (depth, ld) = (ccfg.encoder.depth, cfg.layer_decay);
    opt.set_lr_scales(|n| layer_decay_scale(n, depth, ld));
    let driver = Driver::new(opt, cfg.grad_clip, cfg.run.log_every);
    Ok((clf, varmap, driver))
}

/// Fine-tune (or linear-probe) in this process alone. `on_log` sees every logged step,
/// `on_eval` every evaluation.
pub fn run(
    cfg: &FinetuneConfig,
    resume: bool,
    on_log: &mut dyn FnMut(&StepMetrics),
    on_eval: &mut dyn FnMut(&EvalResult),
) -> Result<FinetuneSummary> {
    run_job(&Job::single(), cfg, resume, on_log, on_eval)
}

/// Fine-tune as one rank of `job` (data-parallel under several ranks, see [`crate::dist`]):
/// `cfg.batch_size` is per rank; rank 0 evaluates, writes the run directory and calls the
/// callbacks while the others wait.
pub fn run_job(
    job: &Job,
    cfg: &FinetuneConfig,
    resume: bool,
    on_log: &mut dyn FnMut(&StepMetrics),
    on_eval: &mut dyn FnMut(&EvalResult),
) -> Result<FinetuneSummary> {
    let t0 = Instant::now();
    cfg.run.precision.check_trainable()?;
    let say = job.dist.is_root();
    let (rank, world) = (job.dist.rank(), job.dist.world_size());
    let (enc, pretrained) = cfg.encoder_and_weights()?;
    enc.validate()?;
    let (loader, plain, val) =
        open_finetune_data(cfg, &enc, cfg.loader_config((rank, world)), say)?;
    let ccfg = classifier_config(cfg, enc, &plain.labels("training")?)?;
    let Start {
        run,
        resumed,
        cfg,
        mut loader,
        global_batch,
    } = start::<_, State>(job, cfg, resume, loader, last_checkpoint)?;
    let cfg = &cfg;
    let dev = cfg.run.open_device_for(&job.dist)?;
    let (clf, varmap, mut driver) = classifier_and_driver(cfg, &ccfg, pretrained.as_deref(), &dev)?;
    let bpe = loader.batches_per_epoch() as u64;
    let total = cfg.epochs * bpe;
    let warmup = (cfg.warmup_epochs * bpe as f64).round() as u64;
    let lr_peak = cfg.blr * global_batch as f64 / 256.0;
    let mut state = State {
        epochs_done: 0,
        step: 0,
        batch_in_epoch: 0,
        group_bytes: loader.group_bytes(),
        best: None,
        config: cfg.clone(),
        world_size: world,
    };
    if let Some((ck, st)) = &resumed {
        driver.restore(&varmap, ck)?;
        loader.set_state(LoaderState {
            epoch: st.epochs_done,
            batch: st.batch_in_epoch,
            group_bytes: st.group_bytes,
        });
        state = State {
            config: cfg.clone(),
            world_size: world,
            ..st.clone()
        };
    }
    job.dist
        .check_same("the parameters at the start", || driver.opt.param_hash())?;
    if cfg.linear_probe && state.epochs_done == 0 {
        set_feature_stats(&clf, &varmap, &plain)?;
    }
    // logs: keep what precedes the resume point
    let (mut mlog, mut elog) = match &run {
        Some(run) => (
            Some(run.log("metrics.jsonl", state.step)?),
            Some(run.log("eval.jsonl", state.step)?),
        ),
        None => (None, None),
    };
    let mut last_eval = None;
    let mut stopped_by = None;
    let mut step = state.step;
    let drop_seed = cfg.run.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for epoch in state.epochs_done..cfg.epochs {
        driver.reset_interval();
        let mut it = loader.epoch();
        while let Some(batch) = driver.next_batch(&mut it) {
            let mut batch = batch?;
            let x = Driver::latents(&mut batch, &dev)?;
            let y = batch_labels(&batch, &dev)?;
            let logits = if cfg.linear_probe {
                let f = clf.features(&x, None)?.detach();
                clf.head(&f)?
            } else {
                // stochastic depth per sample from its global position
                let first = step * global_batch as u64 + (rank * cfg.batch_size) as u64;
                clf.forward_at(&x, drop_seed, first)?
            };
            let loss = cross_entropy(&logits, &y, cfg.label_smoothing)?;
            let lr = lr_at(step, total, warmup, lr_peak, cfg.min_lr);
            let done = driver.step(job, &loss, step, lr, cfg.batch_size)?;
            step += 1;
            if driver.log_due(step) {
                let rates = driver.take_rates();
                let line = StepMetrics {
                    step,
                    epoch,
                    loss: done.loss,
                    lr,
                    grad_norm: done.grad_norm,
                    samples_per_s: rates.samples_per_s,
                    data_wait_fraction: rates.data_wait_fraction,
                    comm_fraction: rates.comm_fraction,
                };
                if let Some(mlog) = mlog.as_mut() {
                    mlog.append(&line)?;
                    on_log(&line);
                }
            }
            if let Some(sig) = done.stop {
                // a mid-epoch checkpoint: weights, optimizer and the loader's place
                job.dist
                    .check_same(&format!("the parameters after step {step}"), || {
                        driver.opt.param_hash()
                    })?;
                (state.epochs_done, state.step) = (epoch, step);
                state.batch_in_epoch = it.state().batch;
                state.group_bytes = it.state().group_bytes;
                if let Some(run) = &run {
                    save_last(run, &clf, &varmap, &driver.opt, &state)?;
                    eprintln!(
                        "lmd-finetune: {} received: stopped after step {step} (epoch {}) with a \
                         checkpoint; rerun the command with --resume to continue",
                        crate::dist::signal_name(sig),
                        epoch + 1
                    );
                }
                stopped_by = Some(sig);
                break;
            }
        }
        drop(it);
        if stopped_by.is_some() {
            break;
        }
        job.dist
            .check_same(&format!("the parameters after epoch {}", epoch + 1), || {
                driver.opt.param_hash()
            })?;
        if let (Some(run), Some(elog)) = (&run, elog.as_mut()) {
            let ev = end_epoch(
                cfg,
                run,
                &clf,
                &varmap,
                &val,
                &driver.opt,
                &mut state,
                epoch,
                step,
            )?;
            elog.append(&ev)?;
            on_eval(&ev);
            last_eval = Some(ev);
        }
        // the others wait for rank 0's evaluation and checkpoint
        job.dist.comm().barrier()?;
    }
    job.dist.comm().barrier()?;
    Ok(FinetuneSummary {
        out: cfg.out.clone(),
        best: state.best,
        last: last_eval,
        wall_s: t0.elapsed().as_secs_f64(),
        stopped_by,
    })
}

/// After epoch `epoch` (ending at `step`): evaluate, keep `best/` when it improved, write
/// `checkpoints/last/` (weights, optimizer, state) and the curves.
#[allow(clippy::too_many_arguments)]
fn end_epoch(
    cfg: &FinetuneConfig,
    run: &RunDir,
    clf: &VitClassifier,
    varmap: &VarMap,
    val: &Samples,
    opt: &AdamW,
    state: &mut State,
    epoch: u64,
    step: u64,
) -> Result<EvalResult> {
    let mut ev = evaluate(clf, val, cfg.eval_batch_size)?;
    (ev.epoch, ev.step) = (epoch + 1, step);
    if state.best.as_ref().is_none_or(|b| ev.top1 > b.top1) {
        save_classifier(run, &run.path("best"), clf, varmap, |d| {
            write_json(&d.join("eval.json"), &ev)
        })?;
        state.best = Some(ev.clone());
    }
    (state.epochs_done, state.step, state.batch_in_epoch) = (epoch + 1, step, 0);
    save_last(run, clf, varmap, opt, state)?;
    plot(cfg)?;
    Ok(ev)
}

/// `checkpoints/last/`: weights, optimizer, state.
fn save_last(
    run: &RunDir,
    clf: &VitClassifier,
    varmap: &VarMap,
    opt: &AdamW,
    state: &State,
) -> Result<()> {
    let last = run.checkpoints().join("last");
    save_classifier(run, &last, clf, varmap, |d| {
        write_json(&d.join("state.json"), state)?;
        opt.save(&d.join(crate::run_dir::OPTIMIZER_FILE))
    })
}

/// Linear probing: the frozen encoder's feature mean and variance over one pass of the
/// training data, stored as `head.0.running_mean` / `running_var`.
fn set_feature_stats(clf: &VitClassifier, varmap: &VarMap, data: &Samples) -> Result<()> {
    let d = clf.config().encoder.embed_dim;
    let (mut s1, mut s2) = (vec![0f64; d], vec![0f64; d]);
    let idx: Vec<usize> = (0..data.len()).collect();
    let mut count = 0usize;
    for chunk in idx.chunks(256) {
        let Some(b) = data.batch(chunk)? else {
            continue;
        };
        count += b.shape[0];
        let x = Tensor::from_vec(b.data, b.shape.to_vec(), clf.device())?;
        let f: Vec<Vec<f32>> = clf.features(&x, None).and_then(|t| t.to_vec2())?;
        for row in f {
            for (j, v) in row.into_iter().enumerate() {
                s1[j] += v as f64;
                s2[j] += (v as f64) * (v as f64);
            }
        }
    }
    let n = count.max(1) as f64;
    let mean: Vec<f32> = s1.iter().map(|s| (s / n) as f32).collect();
    let var: Vec<f32> = s1
        .iter()
        .zip(&s2)
        .map(|(a, b)| ((b / n) - (a / n).powi(2)).max(0.0) as f32)
        .collect();
    let data = varmap.data().lock().expect("varmap");
    let dev = clf.device();
    data["head.0.running_mean"].set(&Tensor::from_vec(mean, d, dev)?)?;
    data["head.0.running_var"].set(&Tensor::from_vec(var, d, dev)?.to_dtype(DType::F32)?)?;
    Ok(())
}

/// `curves.svg`: train loss, lr, val top-1 against the step.
fn plot(cfg: &FinetuneConfig) -> Result<()> {
    let read = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let pts = |v: &[serde_json::Value], k: &str| -> Vec<(f64, f64)> {
        v.iter()
            .filter_map(|x| Some((x.get("step")?.as_f64()?, x.get(k)?.as_f64()?)))
            .collect()
    };
    let train = read(&cfg.out.join("metrics.jsonl"));
    let eval = read(&cfg.out.join("eval.jsonl"));
    let title = format!(
        "lmd-finetune{} {}",
        if cfg.linear_probe {
            " (linear probe)"
        } else {
            ""
        },
        cfg.out.display()
    );
    let svg = crate::report::panels_svg(
        &title,
        "step",
        &[
            ("train loss".into(), pts(&train, "loss")),
            ("learning rate".into(), pts(&train, "lr")),
            ("val top-1".into(), pts(&eval, "top1")),
        ],
    )?;
    lmd_data::shard::writer::write_atomic(&cfg.out.join("curves.svg"), svg.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::score;

    #[test]
    fn cross_entropy_with_smoothing_matches_the_formula() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2.0f32, 0.0, -1.0], [0.5, 0.5, 3.0]], &dev).unwrap();
        let y = Tensor::new(&[0u32, 1], &dev).unwrap();
        let lp = |r: [f64; 3], k: usize| {
            let z: f64 = r.iter().map(|v| v.exp()).sum();
            r[k] - z.ln()
        };
        let rows = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]];
        let nll = -(lp(rows[0], 0) + lp(rows[1], 1)) / 2.0;
        let smooth = -(0..3).map(|k| lp(rows[0], k) + lp(rows[1], k)).sum::<f64>() / 6.0;
        let got = cross_entropy(&logits, &y, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((got - (0.9 * nll + 0.1 * smooth)).abs() < 1e-5, "{got}");
        let (t1, t5, l) = score(&logits, &[0, 1]).unwrap();
        assert_eq!((t1, t5), (1, 2));
        assert!((l / 2.0 - nll).abs() < 1e-5);
    }
}
