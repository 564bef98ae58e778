//! lmd-finetune: classification fine-tuning or linear probing on labelled latent shards.

use clap::Parser;
use lmd_train::finetune::FinetuneConfig;
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
    /// Labelled training latents (lmd-precompute outputs).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Labelled validation latents.
    #[arg(long, num_args = 1..)]
    val_data: Vec<PathBuf>,
    /// Pretrained MAE weights: an lmd-train checkpoint (checkpoints/step-N/model.safetensors)
    /// or an official MAE/LMD checkpoint, .pth as released (mae_pretrain_vit_base.pth, or a
    /// main_pretrain.py training checkpoint) or converted to safetensors.
    #[arg(long)]
    pretrained: Option<PathBuf>,
    /// Run directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Freeze the encoder and train a linear head on normalised features.
    #[arg(long)]
    linear_probe: bool,
    #[arg(long)]
    epochs: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    /// Base learning rate (lr = blr * batch / 256).
    #[arg(long)]
    blr: Option<f64>,
    /// Encoder preset: tiny, small, base, large, base_patch4 (must match the checkpoint).
    #[arg(long)]
    preset: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
    /// cpu or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long)]
    device: Option<lmd_train::DeviceSpec>,
    /// Continue from the last finished epoch.
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn main() -> anyhow::Result<()> {
    lmd_bin::init_allocator();
    let a = Args::parse();
    let mut cfg: FinetuneConfig = match (&a.config, a.linear_probe) {
        (None, true) => FinetuneConfig::linear_probe(),
        _ => lmd_bin::load_config(a.config.as_deref())?,
    };
    cfg.linear_probe |= a.linear_probe;
    if !a.data.is_empty() {
        cfg.data = a.data.clone();
    }
    if !a.val_data.is_empty() {
        cfg.val_data = a.val_data.clone();
    }
    if a.pretrained.is_some() {
        cfg.pretrained = a.pretrained.clone();
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f.clone() { cfg.$f = v; } )* };
    }
    set!(out, epochs, batch_size, blr, preset, seed, device);
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
