//! lmd-experiment: compare mask-ratio schedules under the same budget.

use clap::Parser;
use lmd_train::experiment::ExperimentConfig;
use lmd_train::quickstart::QuickstartConfig;
use std::path::PathBuf;

/// Pretrain with each mask schedule for the same budget, fine-tune and linear-probe each, and
/// write one table (pretrain wall time, final pretrain loss, fine-tune and linear-probe top-1).
///
/// Data and model are the quickstart's (default data: $LMD_SHARED/data/imagenette, or --train
/// / --val, or already precomputed --train-latents / --val-latents). The table goes to
/// OUT/EXPERIMENTS.md and, with --doc FILE, into the marked block of FILE.
#[derive(Parser, Debug)]
#[command(name = "lmd-experiment", version)]
struct Args {
    #[arg(long, default_value = "lmd-experiment")]
    out: PathBuf,
    /// Schedules (comma-separated): constant, linear, piecewise, cosine.
    #[arg(long, value_delimiter = ',', default_values_t = ["constant".to_string(), "linear".into(), "piecewise".into(), "cosine".into()])]
    schedules: Vec<String>,
    /// Skip the fine-tune-from-scratch reference row.
    #[arg(long)]
    no_scratch: bool,
    /// Markdown file to update (its lmd-experiment block), e.g. docs/EXPERIMENTS.md.
    #[arg(long)]
    doc: Option<PathBuf>,
    #[arg(long, num_args = 1..)]
    train: Vec<String>,
    #[arg(long, num_args = 1..)]
    val: Vec<String>,
    #[arg(long)]
    train_latents: Option<PathBuf>,
    #[arg(long)]
    val_latents: Option<PathBuf>,
    #[arg(long)]
    vae_weights: Option<String>,
    #[arg(long, default_value_t = 64)]
    size: u32,
    #[arg(long, default_value_t = 600)]
    pretrain_steps: u64,
    #[arg(long, default_value_t = 15)]
    finetune_epochs: u64,
    #[arg(long, default_value_t = 15)]
    linprobe_epochs: u64,
}

fn main() -> anyhow::Result<()> {
    lmd_bin::init_allocator();
    let command = std::env::args()
        .enumerate()
        .map(|(i, a)| if i == 0 { "lmd-experiment".into() } else { a })
        .collect::<Vec<_>>()
        .join(" ");
    let a = Args::parse();
    let cfg = ExperimentConfig {
        base: QuickstartConfig {
            out: a.out,
            train: a.train,
            val: a.val,
            train_latents: a.train_latents,
            val_latents: a.val_latents,
            vae_weights: a.vae_weights,
            size: a.size,
            model: QuickstartConfig::model_for(a.size),
            pretrain_steps: a.pretrain_steps,
            finetune_epochs: a.finetune_epochs,
            linprobe_epochs: a.linprobe_epochs,
            ..Default::default()
        },
        schedules: a.schedules,
        from_scratch: !a.no_scratch,
        doc: a.doc,
        command,
    };
    let rows = lmd_train::experiment::run(&cfg, &mut |l| eprintln!("{l}"))?;
    let text = std::fs::read_to_string(cfg.base.out.join("EXPERIMENTS.md"))?;
    println!("{text}");
    let _ = rows;
    Ok(())
}
