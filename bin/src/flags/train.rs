//! The flags of `lmd-train` and the settings they give.

use clap::Parser;
use lmd_train::model::{MaskSchedule, Preset};
use lmd_train::train::TrainConfig;
use serde::Serialize;
use std::path::PathBuf;

/// Pretrain a latent MAE on latent shards, with a progressive mask-ratio schedule.
///
/// Settings: defaults, then --config FILE (TOML; configs/pretrain-tiny.toml,
/// configs/pretrain-lmd-base.toml), then these flags. The run directory gets config.json,
/// metrics.jsonl (step, epoch, loss, mask_ratio, lr, grad_norm, samples_per_s,
/// data_wait_fraction), checkpoints/ (weights with the official MAE names, optimizer state,
/// loader position), previews/step-N.png (input | masked | prediction | prediction + visible)
/// and curves.svg (loss, mask ratio, lr), both refreshed at every checkpoint. Stop it any
/// time; --resume continues exactly where the last checkpoint was.
#[derive(Parser, Debug)]
#[command(name = "lmd-train", version)]
pub struct Args {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Or: total epochs over the data (converted to steps).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub set: Settings,
}

/// The flags that set a [`TrainConfig`] key of the same name (see [`crate::settings`]).
#[derive(clap::Args, Serialize, Debug)]
pub struct Settings {
    /// Latent dataset directories (lmd-precompute outputs; worker-* subdirectories are found),
    /// or with --input pixels image inputs as lmd-precompute takes them (WebDataset shard
    /// patterns, ILSVRC tars, image folders).
    #[arg(long, num_args = 1..)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<PathBuf>,
    /// Run directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Total optimizer steps (the schedules span them).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Write a checkpoint (and preview, curves) every this many steps.
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Mask-ratio schedule: constant (MAE 0.75), linear, piecewise, cosine (0.15 -> 0.75).
    #[arg(long)]
    pub schedule: Option<MaskSchedule>,
    /// Model preset: tiny, small, base, large, base_patch4. On pixels its encoder and decoder
    /// take 8x the latent side in 8x the latent patch (tiny: ViT-Ti/16 on 224 px).
    #[arg(long)]
    pub preset: Option<Preset>,
    /// What --data holds: latents (LMD) or pixels (image shards decoded every epoch with MAE's
    /// RandomResizedCrop + flip and ImageNet normalisation: the pixel-MAE baseline).
    #[arg(long)]
    pub input: Option<lmd_train::train_data::Input>,
    /// Samples per step on each rank (the global batch is this x the world size; MAE's lr rule
    /// uses the global one). On --resume at another world size the checkpoint's global batch
    /// is kept.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// VAE weights (directory or hf:OWNER/REPO) to decode the reconstruction previews to
    /// pixels; without it previews show latent channels in false colour.
    #[arg(long)]
    pub vae_weights: Option<String>,
    /// Checkpoints kept, newest first (0: all).
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Start from these weights (an lmd-train checkpoint: file, checkpoint directory or run
    /// directory for its latest; or an official MAE/LMD safetensors or
    /// .pth such as mae_pretrain_vit_base.pth; encoder-only files leave the decoder fresh).
    /// Weights whose run records another encoder than this run's are refused, naming both.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Labelled validation data of the same kind as --data: the encoder's k-NN top-1 (k = 20,
    /// cosine, DINO's weighted vote; the training data against this) at every checkpoint,
    /// with the training seconds so far, in knn.jsonl.
    #[arg(long, num_args = 1..)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub knn_data: Vec<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: super::RunFlags,
}

/// The settings: defaults, then `--config`, then the flags; `--epochs` counts the data in
/// global batches (`batch_size` x `world` ranks).
pub fn config(a: &Args, world: usize) -> anyhow::Result<TrainConfig> {
    let mut cfg: TrainConfig =
        crate::settings::merge(&TrainConfig::default(), a.config.as_deref(), &a.set)?;
    if let Some(e) = a.epochs {
        let n = lmd_train::train::samples_in(&cfg)? as u64;
        cfg.steps = e * (n / (cfg.batch_size * world.max(1)) as u64).max(1);
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_sets_its_key_over_the_file() {
        let (_dir, c, a) = crate::flags::parse_with_config::<Args>(
            "steps = 3\nseed = 5\nbatch_size = 8\n",
            &[
                "lmd-train --config {c} --data d1 d2 --out o --steps 7 --checkpoint-every 2 ",
                "--log-every 1 --schedule constant --preset small --seed 9 --device cpu ",
                "--vae-weights w --keep-checkpoints 4 --init i.pth --tf32 false --input pixels --knn-data v",
            ],
        );
        let c = c.as_str();
        let cfg = config(&a, 1).unwrap();
        assert_eq!(cfg.data, [PathBuf::from("d1"), PathBuf::from("d2")]);
        assert_eq!(cfg.out, PathBuf::from("o"));
        assert_eq!(
            (cfg.steps, cfg.checkpoint_every, cfg.run.log_every),
            (7, 2, 1)
        );
        assert_eq!(cfg.schedule, MaskSchedule::by_name("constant").unwrap());
        assert_eq!(
            (cfg.preset, cfg.run.seed, cfg.batch_size),
            (Preset::Small, 9, 8)
        );
        assert_eq!(cfg.vae_weights.as_deref(), Some("w"));
        assert_eq!(cfg.keep_checkpoints, 4);
        assert_eq!(cfg.input, lmd_train::train_data::Input::Pixels);
        assert_eq!(cfg.knn_data, [PathBuf::from("v")]);
        assert_eq!(cfg.init, Some(PathBuf::from("i.pth")));
        assert!(!cfg.run.tf32 && TrainConfig::default().run.tf32);
        // without flags: the file over the defaults
        let a = Args::try_parse_from(["lmd-train", "--config", c]).unwrap();
        let cfg = config(&a, 1).unwrap();
        assert_eq!((cfg.steps, cfg.run.seed), (3, 5));
        assert_eq!(cfg.schedule, TrainConfig::default().schedule);
        assert!(Args::try_parse_from(["lmd-train", "--preset", "huge"]).is_err());
    }
}
