//! `lmd-quickstart`: the whole toolkit end to end on a small default, in one output folder.
//!
//! 1. **Precompute** the training and validation images to TAESD latents
//!    (`latents/train`, `latents/val`).
//! 2. **Pretrain** a small latent MAE with LMD's cosine mask schedule (`pretrain/`: metrics,
//!    checkpoints, TAESD-decoded reconstruction previews, `curves.svg`).
//! 3. **Fine-tune** its encoder on the labels (`finetune/`, best weights in `finetune/best/`),
//!    and **linear-probe** it (`linprobe/`).
//! 4. Print and save (`quickstart.json`) the results: pretrain loss, top-1 of both.
//!
//! Default data: `$LMD_SHARED/data/imagenette` (our machines); elsewhere the user names their own
//! inputs (anything `lmd-precompute` reads). VAE weights: `$LMD_SHARED/weights/taesd` when it
//! exists, else the hub (`hf:madebyollin/taesd`). Every stage resumes: rerunning the same command
//! continues where a killed run stopped and redoes nothing that finished.

use crate::finetune::{EvalResult, FinetuneConfig};
use crate::precompute::PrecomputeConfig;
use crate::train::TrainConfig;
use crate::{Error, Result};
use lmd_model::{MaeConfig, MaskSchedule};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// Quickstart settings (the defaults are the README's first command).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuickstartConfig {
    pub out: PathBuf,
    /// Training inputs (labelled). Empty: the shared imagenette train shards.
    pub train: Vec<String>,
    /// Validation inputs (labelled). Empty: the shared imagenette val shards.
    pub val: Vec<String>,
    /// TAESD weights (directory or `hf:OWNER/REPO`). None: `$LMD_SHARED/weights/taesd`, else
    /// the hub.
    pub vae_weights: Option<String>,
    /// Already precomputed latents (labelled): skip the precompute stage and use these.
    pub train_latents: Option<PathBuf>,
    pub val_latents: Option<PathBuf>,
    /// Image size (latents are size/8 square).
    pub size: u32,
    /// Input samples taken from each of train/val (0: all).
    pub limit_train: u64,
    pub limit_val: u64,
    pub model: MaeConfig,
    pub schedule: MaskSchedule,
    pub pretrain_steps: u64,
    pub finetune_epochs: u64,
    pub linprobe_epochs: u64,
    pub seed: u64,
    /// Where the data is fetched from when none is given and `$LMD_SHARED` is unset
    /// (fast.ai's Imagenette 160 px .tgz), and the cache it goes into (None:
    /// [`crate::download::cache_dir`]).
    pub download_url: String,
    pub cache_dir: Option<PathBuf>,
}

impl Default for QuickstartConfig {
    fn default() -> Self {
        QuickstartConfig {
            out: PathBuf::from("lmd-quickstart"),
            train: vec![],
            val: vec![],
            vae_weights: None,
            train_latents: None,
            val_latents: None,
            size: 64,
            limit_train: 0,
            limit_val: 0,
            model: Self::model_for(64),
            schedule: MaskSchedule::lmd_cosine(),
            pretrain_steps: 600,
            finetune_epochs: 15,
            linprobe_epochs: 15,
            seed: 0,
            download_url: crate::download::IMAGENETTE_160_URL.into(),
            cache_dir: None,
        }
    }
}

impl QuickstartConfig {
    /// The quickstart's model: a 4-block ViT (96 wide, 3 heads), decoder 64 x 2, patch 2, on
    /// `size/8` latents; plain (not per-patch normalised) targets, as the latents are already
    /// near unit scale.
    pub fn model_for(size: u32) -> MaeConfig {
        let s = (size / 8) as usize;
        MaeConfig {
            in_chans: 4,
            img_size: [s, s],
            patch_size: 2,
            embed_dim: 96,
            depth: 4,
            num_heads: 3,
            decoder_embed_dim: 64,
            decoder_depth: 2,
            decoder_num_heads: 4,
            mlp_ratio: 4.0,
            norm_pix_loss: false,
            norm_eps: 1e-6,
        }
    }

    /// Seed and logging of every run of this pipeline.
    fn run_settings(&self) -> crate::RunSettings {
        crate::RunSettings {
            seed: self.seed,
            log_every: 10,
            ..Default::default()
        }
    }

    /// The pretraining configuration of one quickstart (or experiment) run.
    pub fn pretrain_config(&self, data: PathBuf, out: PathBuf) -> TrainConfig {
        TrainConfig {
            model: Some(self.model.clone()),
            schedule: self.schedule.clone(),
            data: vec![data],
            out,
            steps: self.pretrain_steps,
            batch_size: 64,
            blr: 1.5e-3,
            warmup_steps: (self.pretrain_steps / 20).max(1),
            run: self.run_settings(),
            window: 4096,
            checkpoint_every: (self.pretrain_steps / 3).max(1),
            keep_checkpoints: 1,
            ..Default::default()
        }
    }

    /// The fine-tuning (or linear-probing) configuration on a pretrained checkpoint.
    pub fn finetune_config(
        &self,
        train: PathBuf,
        val: PathBuf,
        pretrained: Option<PathBuf>,
        out: PathBuf,
        linear_probe: bool,
    ) -> FinetuneConfig {
        let base = if linear_probe {
            FinetuneConfig {
                epochs: self.linprobe_epochs,
                ..FinetuneConfig::linear_probe()
            }
        } else {
            FinetuneConfig {
                epochs: self.finetune_epochs,
                blr: 5e-3,
                ..Default::default()
            }
        };
        FinetuneConfig {
            model: Some(self.model.clone()),
            pretrained,
            data: vec![train],
            val_data: vec![val],
            out,
            batch_size: 64,
            run: self.run_settings(),
            window: 4096,
            ..base
        }
    }
}

/// What the quickstart did (also `quickstart.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuickstartReport {
    pub out: PathBuf,
    pub train_records: usize,
    pub val_records: usize,
    pub precompute_s: f64,
    /// Pretraining, fine-tuning and the linear probe (their keys at the top level of
    /// `quickstart.json`).
    #[serde(flatten)]
    pub stages: StageResults,
    pub total_s: f64,
}

/// The inputs and VAE weights the quickstart uses when none are given.
pub(crate) fn defaults(cfg: &QuickstartConfig) -> Result<(Vec<String>, Vec<String>, String)> {
    let shared = std::env::var_os("LMD_SHARED").map(PathBuf::from);
    let (train, val) = if cfg.train_latents.is_some() && cfg.val_latents.is_some() {
        (vec![], vec![])
    } else if cfg.train.is_empty() || cfg.val.is_empty() {
        let Some(sh) = shared
            .as_ref()
            .filter(|p| p.join("data/imagenette").is_dir())
        else {
            // a fresh online machine: fast.ai's Imagenette, downloaded once into the cache
            let dir = cfg
                .cache_dir
                .clone()
                .unwrap_or_else(crate::download::cache_dir);
            let tgz = crate::download::fetch(
                &cfg.download_url,
                &dir,
                crate::download::IMAGENETTE_160_MD5,
                true,
            )
            .map_err(|e| {
                Error::Invalid(format!(
                    "no data given and LMD_SHARED is unset, so the quickstart tried to download \
                     Imagenette: {e}. Offline, point it at local data: --train and --val \
                     (labelled WebDataset shards, ILSVRC tars, ImageFolder directories or \
                     ARCHIVE.tgz#ROOT), or set LMD_SHARED to a folder holding data/imagenette"
                ))
            })?;
            let root = tgz.display().to_string();
            return Ok((
                vec![format!("{root}#imagenette2-160/train")],
                vec![format!("{root}#imagenette2-160/val")],
                vae_default(cfg, None),
            ));
        };
        let d = sh.join("data/imagenette");
        (
            vec![d.join("imagenette-train-*.tar").display().to_string()],
            vec![d.join("imagenette-val-*.tar").display().to_string()],
        )
    } else {
        (cfg.train.clone(), cfg.val.clone())
    };
    Ok((train, val, vae_default(cfg, shared)))
}

/// `--vae-weights`, else `$LMD_SHARED/weights/taesd`, else TAESD from the Hugging Face hub.
fn vae_default(cfg: &QuickstartConfig, shared: Option<PathBuf>) -> String {
    match &cfg.vae_weights {
        Some(w) => w.clone(),
        None => match shared
            .map(|s| s.join("weights/taesd"))
            .filter(|p| p.is_dir())
        {
            Some(p) => p.display().to_string(),
            None => "hf:madebyollin/taesd".into(),
        },
    }
}

/// The latents a quickstart or experiment works on.
#[derive(Debug, Clone)]
pub struct Latents {
    pub train: PathBuf,
    pub val: PathBuf,
    pub train_records: usize,
    pub val_records: usize,
    /// VAE weights (for decoded previews when the latents are TAESD's).
    pub vae_weights: String,
    pub seconds: f64,
}

/// Stage 1: precompute the train and val inputs into `out/latents/{train,val}` (resumable), or
/// take the given latents.
pub fn prepare_latents(cfg: &QuickstartConfig, log: &mut dyn FnMut(&str)) -> Result<Latents> {
    let tp = Instant::now();
    let (train_in, val_in, vae) = defaults(cfg)?;
    let out = &cfg.out;
    let mut counts = [0usize; 2];
    let given = cfg.train_latents.clone().zip(cfg.val_latents.clone());
    for (i, (name, inputs, limit)) in [
        ("train", &train_in, cfg.limit_train),
        ("val", &val_in, cfg.limit_val),
    ]
    .into_iter()
    .enumerate()
    {
        if let Some((t, v)) = &given {
            let dir = if i == 0 { t } else { v };
            counts[i] = crate::train::open_data(std::slice::from_ref(dir))?.len();
            log(&format!(
                "[1/4] {name} latents: {} ({} records)",
                dir.display(),
                counts[i]
            ));
            continue;
        }
        log(&format!(
            "[1/4] precompute {name}: {} -> TAESD latents",
            inputs.join(" ")
        ));
        let pc = PrecomputeConfig {
            inputs: inputs.clone(),
            output: out.join("latents").join(name),
            vae_weights: Some(PathBuf::from(&vae)),
            size: cfg.size,
            records_per_shard: 2000,
            limit,
            ..Default::default()
        };
        let mut last = Instant::now();
        let s = crate::precompute::run(&pc, &mut |n, total, _| {
            if last.elapsed().as_secs_f64() > 10.0 {
                last = Instant::now();
                log(&format!(
                    "      {n}{} images",
                    total.map(|t| format!("/{t}")).unwrap_or_default()
                ));
            }
        })?;
        counts[i] = s.written + s.resumed_records;
        log(&format!(
            "      {} images ({} skipped) at {:.1} images/s",
            counts[i], s.skipped, s.images_per_s
        ));
    }
    let (train, val) = given.unwrap_or((out.join("latents/train"), out.join("latents/val")));
    Ok(Latents {
        train,
        val,
        train_records: counts[0],
        val_records: counts[1],
        vae_weights: vae,
        seconds: tp.elapsed().as_secs_f64(),
    })
}

/// What stages 2-4 gave.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageResults {
    pub schedule: String,
    pub pretrain_s: f64,
    pub pretrain_first_loss: f64,
    pub pretrain_final_loss: f64,
    pub finetune_s: f64,
    pub finetune: Option<EvalResult>,
    pub linprobe_s: f64,
    pub linprobe: Option<EvalResult>,
}

/// Stages 2-4 into `dir`: pretrain (`dir/pretrain`) with `cfg.schedule`, then fine-tune
/// (`dir/finetune`) and linear-probe (`dir/linprobe`) its encoder. All resumable.
pub fn pretrain_and_evaluate(
    cfg: &QuickstartConfig,
    lat: &Latents,
    dir: &std::path::Path,
    log: &mut dyn FnMut(&str),
) -> Result<StageResults> {
    let tp = Instant::now();
    let mut tc = cfg.pretrain_config(lat.train.clone(), dir.join("pretrain"));
    // previews decode through the VAE the latents came from (TAESD here)
    let data_vae = crate::train::open_data(std::slice::from_ref(&lat.train))?
        .meta()
        .vae
        .name
        .clone();
    if data_vae == "taesd" {
        tc.vae_weights = Some(lat.vae_weights.clone());
    }
    log(&format!(
        "[2/4] pretrain: {} steps, {} mask schedule, batch {}",
        tc.steps,
        tc.schedule.name(),
        tc.batch_size
    ));
    crate::train::run(&tc, true, &mut |m| {
        if m.step.is_multiple_of(100) {
            log(&format!(
                "      step {} loss {:.4} mask ratio {:.3} ({:.0} samples/s)",
                m.step, m.loss, m.mask_ratio, m.samples_per_s
            ));
        }
    })?;
    let lines = crate::report::read_metrics(&tc.out.join("metrics.jsonl"))?;
    let pretrain_first_loss = lines.first().map_or(f64::NAN, |l| l.loss);
    let pretrain_final_loss = lines.last().map_or(f64::NAN, |l| l.loss);
    let pretrain_s = tp.elapsed().as_secs_f64();
    let ckpt = crate::train::latest_checkpoint(&tc.out)
        .ok_or_else(|| Error::Invalid(format!("{}: no checkpoint", tc.out.display())))?
        .join(crate::run_dir::MODEL_FILE);
    let mut results = [None, None];
    let mut secs = [0f64; 2];
    for (i, (name, lp)) in [("finetune", false), ("linprobe", true)]
        .into_iter()
        .enumerate()
    {
        let tf = Instant::now();
        let fc = cfg.finetune_config(
            lat.train.clone(),
            lat.val.clone(),
            Some(ckpt.clone()),
            dir.join(name),
            lp,
        );
        log(&format!(
            "[{}/4] {}: {} epochs",
            3 + i,
            if lp {
                "linear probe (frozen encoder)"
            } else {
                "fine-tune"
            },
            fc.epochs
        ));
        let s = crate::finetune::run(&fc, true, &mut |_| {}, &mut |e| {
            log(&format!(
                "      epoch {} val top-1 {:.1}% top-5 {:.1}%",
                e.epoch,
                100.0 * e.top1,
                100.0 * e.top5
            ))
        })?;
        results[i] = s.best;
        secs[i] = tf.elapsed().as_secs_f64();
    }
    let [finetune, linprobe] = results;
    Ok(StageResults {
        schedule: cfg.schedule.name().into(),
        pretrain_s,
        pretrain_first_loss,
        pretrain_final_loss,
        finetune_s: secs[0],
        finetune,
        linprobe_s: secs[1],
        linprobe,
    })
}

/// Run the quickstart; `log` gets one line per stage event.
pub fn run(cfg: &QuickstartConfig, log: &mut dyn FnMut(&str)) -> Result<QuickstartReport> {
    let t0 = Instant::now();
    defaults(cfg)?; // no data: say so before creating anything
    let out = &cfg.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, "create", e))?;
    lmd_data::shard::writer::write_atomic(
        &out.join("quickstart-config.json"),
        &serde_json::to_vec_pretty(cfg).expect("serializes"),
    )?;
    let lat = prepare_latents(cfg, log)?;
    let report = QuickstartReport {
        out: out.clone(),
        train_records: lat.train_records,
        val_records: lat.val_records,
        precompute_s: lat.seconds,
        stages: pretrain_and_evaluate(cfg, &lat, out, log)?,
        total_s: t0.elapsed().as_secs_f64(),
    };
    lmd_data::shard::writer::write_atomic(
        &out.join("quickstart.json"),
        &serde_json::to_vec_pretty(&report).expect("serializes"),
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_keeps_the_stage_keys_at_the_top_level_of_quickstart_json() {
        let report = QuickstartReport {
            out: "q".into(),
            train_records: 3,
            val_records: 1,
            precompute_s: 1.0,
            stages: StageResults {
                schedule: "cosine".into(),
                pretrain_s: 2.0,
                pretrain_first_loss: 1.5,
                pretrain_final_loss: 0.5,
                finetune_s: 3.0,
                finetune: None,
                linprobe_s: 4.0,
                linprobe: None,
            },
            total_s: 10.0,
        };
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["pretrain_final_loss"], 0.5);
        assert_eq!(v["linprobe_s"], 4.0);
        assert_eq!(v["schedule"], "cosine");
        assert!(v.get("stages").is_none(), "{v}");
        let back: QuickstartReport = serde_json::from_value(v).unwrap();
        assert_eq!(back.stages.finetune_s, 3.0);
    }
}
