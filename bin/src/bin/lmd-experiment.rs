//! lmd-experiment: the experiments behind docs/EXPERIMENTS.md (`schedules`, `claim`).

use clap::{Parser, Subcommand};
use lmd_train::claim::ClaimConfig;
use lmd_train::experiment::ExperimentConfig;
use std::path::PathBuf;

/// The experiments behind docs/EXPERIMENTS.md: `claim` (pixel MAE against LMD at equal wall
/// clock) and `schedules` (mask-ratio schedules at an equal step budget).
///
/// Data: $LMD_SHARED/data/imagenette, or --train / --val (labelled inputs lmd-precompute
/// reads). Every run inside resumes: rerunning a killed experiment continues it.
#[derive(Parser, Debug)]
#[command(name = "lmd-experiment", version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// LMD's claim measured: pixel-space MAE (fixed 0.75), LMD (latents, cosine 0.15 -> 0.75)
    /// and latent MAE (fixed 0.75) pretrain one encoder for the same wall-clock seconds each;
    /// k-NN top-1 at every checkpoint, then linear probe and fine-tune, beside the classifier
    /// trained from scratch on pixels and on latents. Writes OUT/CLAIM.md (the table),
    /// OUT/claim.json and OUT/claim-knn.svg (k-NN against training seconds); with --doc the
    /// table goes into the file's lmd-claim block and the plot beside it.
    Claim {
        /// Output folder (every run of the experiment lives in it).
        #[arg(long, default_value = "lmd-claim")]
        out: PathBuf,
        /// Pretraining seconds per arm and seed (each arm measures its step time first and
        /// gets budget / that many steps).
        #[arg(long, default_value_t = 240.0)]
        budget_s: f64,
        /// Seeds of the headline arms (pixel-mae, lmd); latent-mae runs one.
        #[arg(long, default_value_t = 2)]
        seeds: u64,
        /// Pixel patch (tokens: (size / this)^2).
        #[arg(long, default_value_t = 8)]
        pixel_patch: usize,
        /// Latent patch (tokens: (size / 8 / this)^2; the default gives 1/4 of the pixel
        /// tokens, as the paper's ViT/16 on 224 px against ViT/4 on 28 x 28 latents).
        #[arg(long, default_value_t = 2)]
        latent_patch: usize,
        /// k-NN evaluations per pretraining run.
        #[arg(long, default_value_t = 8)]
        knn_points: u64,
        /// Samples per pretraining and fine-tuning step.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// First seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Markdown file to update (its lmd-claim block), e.g. docs/EXPERIMENTS.md.
        #[arg(long)]
        doc: Option<PathBuf>,
        #[command(flatten)]
        pipeline: lmd_bin::PipelineArgs,
    },
    /// Pretrain with each mask schedule for the same number of steps, fine-tune and
    /// linear-probe each, and write one table (OUT/EXPERIMENTS.md; with --doc FILE, into the
    /// file's lmd-experiment block).
    Schedules {
        /// Output folder (every run of the experiment lives in it).
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
    },
}

pub fn main() -> std::process::ExitCode {
    lmd_bin::program_main("lmd-experiment", run)
}

fn run() -> anyhow::Result<()> {
    let command = std::env::args()
        .enumerate()
        .map(|(i, a)| if i == 0 { "lmd-experiment".into() } else { a })
        .collect::<Vec<_>>()
        .join(" ");
    match Args::parse().cmd {
        Cmd::Claim {
            out,
            budget_s,
            seeds,
            pixel_patch,
            latent_patch,
            knn_points,
            batch_size,
            seed,
            doc,
            pipeline,
        } => {
            let mut base = pipeline.config(out);
            base.seed = seed;
            let cfg = ClaimConfig {
                base,
                budget_s,
                pixel_patch,
                latent_patch,
                seeds,
                knn_points,
                batch_size,
                doc,
                command,
            };
            lmd_train::claim::run(&cfg, &mut |l| eprintln!("{l}"))?;
            println!(
                "{}",
                std::fs::read_to_string(cfg.base.out.join("CLAIM.md"))?
            );
        }
        Cmd::Schedules {
            out,
            schedules,
            no_scratch,
            doc,
            pipeline,
        } => {
            let cfg = ExperimentConfig {
                base: pipeline.config(out),
                schedules,
                from_scratch: !no_scratch,
                doc,
                command,
            };
            lmd_train::experiment::run(&cfg, &mut |l| eprintln!("{l}"))?;
            let text = std::fs::read_to_string(cfg.base.out.join("EXPERIMENTS.md"))?;
            println!("{text}");
        }
    }
    Ok(())
}
