//! lmd-train: masked latent pretraining over latent shards.

use clap::Parser;
use lmd_train::train::TrainConfig;
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
struct Args {
    /// TOML config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Latent dataset directories (lmd-precompute outputs; worker-* subdirectories are found).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Run directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Total optimizer steps (the schedules span them).
    #[arg(long)]
    steps: Option<u64>,
    /// Or: total epochs over the data (converted to steps).
    #[arg(long)]
    epochs: Option<u64>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    #[arg(long)]
    log_every: Option<u64>,
    /// Mask-ratio schedule: constant (MAE 0.75), linear, piecewise, cosine.
    #[arg(long)]
    schedule: Option<String>,
    /// Model preset: tiny, small, base, large, base_patch4.
    #[arg(long)]
    preset: Option<String>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// cpu or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long)]
    device: Option<lmd_train::DeviceSpec>,
    /// VAE weights (directory or hf:OWNER/REPO) to decode the reconstruction previews to
    /// pixels; without it previews show latent channels in false colour.
    #[arg(long)]
    vae_weights: Option<String>,
    /// Checkpoints kept, newest first (0: all).
    #[arg(long)]
    keep_checkpoints: Option<usize>,
    /// Start from these weights (an lmd-train checkpoint, or an official MAE/LMD safetensors or
    /// .pth such as mae_pretrain_vit_base.pth; encoder-only files leave the decoder fresh).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn main() -> anyhow::Result<()> {
    lmd_bin::init_allocator();
    let a = Args::parse();
    let mut cfg: TrainConfig = lmd_bin::load_config(a.config.as_deref())?;
    if !a.data.is_empty() {
        cfg.data = a.data.clone();
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f.clone() { cfg.$f = v; } )* };
    }
    set!(
        out,
        steps,
        checkpoint_every,
        log_every,
        preset,
        batch_size,
        seed,
        keep_checkpoints,
        device
    );
    if a.init.is_some() {
        cfg.init = a.init.clone();
    }
    if a.vae_weights.is_some() {
        cfg.vae_weights = a.vae_weights.clone();
    }
    if let Some(s) = &a.schedule {
        cfg.schedule = lmd_train::model::MaskSchedule::by_name(s).ok_or_else(|| {
            anyhow::anyhow!("unknown schedule {s:?} (constant, linear, piecewise, cosine)")
        })?;
    }
    if let Some(e) = a.epochs {
        let n = lmd_train::train::open_data(&cfg.data)?.len() as u64;
        cfg.steps = e * (n / cfg.batch_size as u64).max(1);
    }
    let bar = lmd_bin::progress_bar(cfg.steps, "step", a.no_progress);
    let mut on_log = |m: &lmd_train::train::Metrics| {
        bar.set_position(m.step);
        bar.set_message(format!(
            "loss {:.4} mask {:.3} lr {:.2e} {:.1} samples/s",
            m.loss, m.mask_ratio, m.lr, m.samples_per_s
        ));
    };
    let s = lmd_train::train::run(&cfg, a.resume, &mut on_log)?;
    bar.finish_and_clear();
    eprintln!(
        "lmd-train: steps {}..{} in {:.1} s, final loss {:.4}; run directory {}",
        s.first_step,
        s.last_step,
        s.wall_s,
        s.final_loss,
        s.out.display()
    );
    Ok(())
}
