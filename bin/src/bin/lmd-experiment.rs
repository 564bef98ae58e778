//! lmd-experiment: compare mask-ratio schedules under the same budget.

use clap::Parser;
use lmd_train::experiment::ExperimentConfig;
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
    #[command(flatten)]
    pipeline: lmd_bin::PipelineArgs,
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
        base: a.pipeline.config(a.out),
        schedules: a.schedules,
        from_scratch: !a.no_scratch,
        doc: a.doc,
        command,
    };
    lmd_train::experiment::run(&cfg, &mut |l| eprintln!("{l}"))?;
    let text = std::fs::read_to_string(cfg.base.out.join("EXPERIMENTS.md"))?;
    println!("{text}");
    Ok(())
}
