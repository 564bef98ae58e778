//! The flags of `lmd-finetune` and the settings they give.

use clap::Parser;
use lmd_train::finetune::FinetuneConfig;
use lmd_train::model::Preset;
use serde::Serialize;
use std::path::PathBuf;

/// Fine-tune (or linear-probe) a pretrained latent-MAE encoder on labelled latent shards.
///
/// Settings: defaults (or the linear-probe defaults with --linear-probe), then --config FILE
/// (TOML; configs/finetune-tiny.toml, configs/linprobe-tiny.toml), then these flags. Each
/// epoch ends with top-1/top-5 on --val-data. The run directory gets config.json,
/// metrics.jsonl, eval.jsonl, curves.svg, checkpoints/last/ (for --resume) and best/ (the best
/// epoch: model.safetensors + classifier.json, what lmd-eval reads).
#[derive(Parser, Debug)]
#[command(name = "lmd-finetune", version)]
pub struct Args {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue from the last finished epoch.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub set: Settings,
}

/// The flags that set a [`FinetuneConfig`] key of the same name (see [`crate::settings`]).
#[derive(clap::Args, Serialize, Debug)]
pub struct Settings {
    /// Labelled training latents (lmd-precompute outputs).
    #[arg(long, num_args = 1..)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<PathBuf>,
    /// Labelled validation latents.
    #[arg(long, num_args = 1..)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub val_data: Vec<PathBuf>,
    /// Pretrained MAE weights: an lmd-train checkpoint (its model.safetensors, its directory
    /// checkpoints/step-N/, or the run directory for its latest checkpoint; verified against
    /// SHA256SUMS) or an official MAE/LMD checkpoint, .pth as released (mae_pretrain_vit_base.pth, or a
    /// main_pretrain.py training checkpoint) or converted to safetensors.
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    /// Run directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Freeze the encoder and train a linear head on normalised features (without --config:
    /// the linear-probe defaults).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub linear_probe: bool,
    /// Epochs over the training data.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Samples per step (per process).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Base learning rate (lr = blr * batch / 256).
    #[arg(long)]
    pub blr: Option<f64>,
    /// Encoder preset: tiny, small, base, large, base_patch4. Default: the architecture
    /// --pretrained records (its lmd-train run's config.json, or classifier.json beside it),
    /// else tiny; one that differs from what the checkpoint records is refused.
    #[arg(long)]
    pub preset: Option<Preset>,
    /// What --data and --val-data hold: latents, or pixels (image inputs as lmd-precompute
    /// takes them, decoded every epoch: the pixel-MAE arm; the preset's encoder on 8x the
    /// latent side, as lmd-train --input pixels).
    #[arg(long)]
    pub input: Option<lmd_train::train_data::Input>,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: super::RunFlags,
}

/// The settings: defaults (the linear-probe ones with --linear-probe and no --config), then
/// `--config`, then the flags.
pub fn config(a: &Args) -> anyhow::Result<FinetuneConfig> {
    let defaults = match (&a.config, a.set.linear_probe) {
        (None, true) => FinetuneConfig::linear_probe(),
        _ => FinetuneConfig::default(),
    };
    crate::settings::merge(&defaults, a.config.as_deref(), &a.set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_sets_its_key_over_the_file() {
        let (_dir, _, a) = crate::flags::parse_with_config::<Args>(
            "epochs = 3\nblr = 0.5\nwindow = 16\n",
            &[
                "lmd-finetune --config {c} --data t --val-data v1 v2 --pretrained p.pth --out o ",
                "--linear-probe --epochs 4 --batch-size 32 --blr 0.25 --preset base_patch4 --input pixels ",
                "--seed 2 --device cpu --log-every 7",
            ],
        );
        let cfg = config(&a).unwrap();
        assert_eq!(cfg.data, [PathBuf::from("t")]);
        assert_eq!(cfg.val_data, [PathBuf::from("v1"), PathBuf::from("v2")]);
        assert_eq!(cfg.pretrained, Some(PathBuf::from("p.pth")));
        assert_eq!(cfg.out, PathBuf::from("o"));
        assert!(cfg.linear_probe);
        assert_eq!(cfg.run.log_every, 7);
        assert_eq!((cfg.epochs, cfg.batch_size, cfg.blr), (4, 32, 0.25));
        assert_eq!(
            (cfg.preset, cfg.run.seed, cfg.window),
            (Some(Preset::BasePatch4), 2, 16)
        );
        assert_eq!(cfg.input, lmd_train::train_data::Input::Pixels);
        // --linear-probe without a file: the linear-probe defaults
        let a = Args::try_parse_from(["lmd-finetune", "--linear-probe"]).unwrap();
        assert_eq!(config(&a).unwrap(), FinetuneConfig::linear_probe());
        let a = Args::try_parse_from(["lmd-finetune"]).unwrap();
        assert_eq!(config(&a).unwrap(), FinetuneConfig::default());
    }
}
