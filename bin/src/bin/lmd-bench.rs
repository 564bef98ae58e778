//! lmd-bench: lmd's benchmarks, one JSON line per figure.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Benchmarks printing one JSON line per figure, baselines measured in the same run.
#[derive(Parser, Debug)]
#[command(name = "lmd-bench", version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Latent shard format: bytes per record by dtype, sequential and random read speed.
    ///
    /// Uses the real TAESD latents in $LMD_SHARED/testvectors when present (else synthetic
    /// ones, said in each line's "source").
    Shards {
        /// Records in the throughput shard.
        #[arg(long, default_value_t = 16384)]
        records: usize,
        /// Random get() calls to time.
        #[arg(long, default_value_t = 4000)]
        random_gets: usize,
        /// The shared data directory (default: $LMD_SHARED).
        #[arg(long, env = "LMD_SHARED")]
        shared: Option<PathBuf>,
        /// Scratch directory for the shard files (default: a temporary directory).
        #[arg(long)]
        workdir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Shards {
            records,
            random_gets,
            shared,
            workdir,
        } => {
            let opts = lmd_train::bench::ShardBenchOptions {
                records,
                random_gets,
                shared,
                workdir,
            };
            lmd_train::bench::shards(&opts, |v| println!("{v}"))?;
        }
    }
    Ok(())
}
