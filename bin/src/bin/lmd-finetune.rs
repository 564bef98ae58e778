//! lmd-finetune: classification fine-tuning or linear probing on labelled latent shards.

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
struct Args {
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue from the last finished epoch.
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    set: Settings,
}

/// The flags that set a [`FinetuneConfig`] key of the same name (see `lmd_bin::settings`).
#[derive(clap::Args, Serialize, Debug)]
struct Settings {
    /// Labelled training latents (lmd-precompute outputs).
    #[arg(long, num_args = 1..)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    data: Vec<PathBuf>,
    /// Labelled validation latents.
    #[arg(long, num_args = 1..)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    val_data: Vec<PathBuf>,
    /// Pretrained MAE weights: an lmd-train checkpoint (checkpoints/step-N/model.safetensors)
    /// or an official MAE/LMD checkpoint, .pth as released (mae_pretrain_vit_base.pth, or a
    /// main_pretrain.py training checkpoint) or converted to safetensors.
    #[arg(long)]
    pretrained: Option<PathBuf>,
    /// Run directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Freeze the encoder and train a linear head on normalised features (without --config:
    /// the linear-probe defaults).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    linear_probe: bool,
    /// Epochs over the training data.
    #[arg(long)]
    epochs: Option<u64>,
    /// Samples per step (per process).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Base learning rate (lr = blr * batch / 256).
    #[arg(long)]
    blr: Option<f64>,
    /// Encoder preset: tiny, small, base, large, base_patch4 (must match the checkpoint).
    #[arg(long)]
    preset: Option<Preset>,
    /// Seed of the head, drop path and loader order.
    #[arg(long)]
    seed: Option<u64>,
    /// cpu or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long)]
    device: Option<lmd_train::DeviceSpec>,
}

/// The settings: defaults (the linear-probe ones with --linear-probe and no --config), then
/// `--config`, then the flags.
fn config(a: &Args) -> anyhow::Result<FinetuneConfig> {
    let defaults = match (&a.config, a.set.linear_probe) {
        (None, true) => FinetuneConfig::linear_probe(),
        _ => FinetuneConfig::default(),
    };
    lmd_bin::settings::merge(&defaults, a.config.as_deref(), &a.set)
}

fn main() -> anyhow::Result<()> {
    lmd_bin::init_allocator();
    let a = Args::parse();
    let cfg = config(&a)?;
    let bar = lmd_bin::progress_bar(cfg.epochs, "epoch", a.no_progress);
    let mut on_log = |s: &lmd_train::finetune::StepMetrics| {
        bar.set_message(format!(
            "step {} loss {:.4} lr {:.2e} {:.1} samples/s",
            s.step, s.loss, s.lr, s.samples_per_s
        ));
    };
    let mut on_eval = |e: &lmd_train::finetune::EvalResult| {
        bar.set_position(e.epoch);
        let line = format!(
            "epoch {}: val top-1 {:.2}% top-5 {:.2}% loss {:.4} ({} records)",
            e.epoch,
            100.0 * e.top1,
            100.0 * e.top5,
            e.loss,
            e.records
        );
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let s = lmd_train::finetune::run(&cfg, a.resume, &mut on_log, &mut on_eval)?;
    bar.finish_and_clear();
    if let Some(b) = &s.best {
        eprintln!(
            "lmd-finetune: best val top-1 {:.2}% (epoch {}) in {:.1} s; weights in {}",
            100.0 * b.top1,
            b.epoch,
            s.wall_s,
            s.out.join("best").display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_sets_its_key_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "epochs = 3\nblr = 0.5\nwindow = 16\n").unwrap();
        let c = f.to_str().unwrap();
        let a = Args::try_parse_from([
            "lmd-finetune",
            "--config",
            c,
            "--data",
            "t",
            "--val-data",
            "v1",
            "v2",
            "--pretrained",
            "p.pth",
            "--out",
            "o",
            "--linear-probe",
            "--epochs",
            "4",
            "--batch-size",
            "32",
            "--blr",
            "0.25",
            "--preset",
            "base_patch4",
            "--seed",
            "2",
            "--device",
            "cpu",
        ])
        .unwrap();
        let cfg = config(&a).unwrap();
        assert_eq!(cfg.data, [PathBuf::from("t")]);
        assert_eq!(cfg.val_data, [PathBuf::from("v1"), PathBuf::from("v2")]);
        assert_eq!(cfg.pretrained, Some(PathBuf::from("p.pth")));
        assert_eq!(cfg.out, PathBuf::from("o"));
        assert!(cfg.linear_probe);
        assert_eq!((cfg.epochs, cfg.batch_size, cfg.blr), (4, 32, 0.25));
        assert_eq!(
            (cfg.preset, cfg.run.seed, cfg.window),
            (Preset::BasePatch4, 2, 16)
        );
        // --linear-probe without a file: the linear-probe defaults
        let a = Args::try_parse_from(["lmd-finetune", "--linear-probe"]).unwrap();
        assert_eq!(config(&a).unwrap(), FinetuneConfig::linear_probe());
        let a = Args::try_parse_from(["lmd-finetune"]).unwrap();
        assert_eq!(config(&a).unwrap(), FinetuneConfig::default());
    }
}
