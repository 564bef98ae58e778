//! lmd-inspect: summarise (and verify) a latent shard or a dataset directory.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// Summarise a latent shard (.lmds) or a dataset directory; --verify checks every block.
///
/// Prints records, shards, latent shape, dtype, record layout, labels, the VAE (name and sha256
/// of its weights), preprocessing, scaling, fingerprint and size. Exit status: 0 when everything
/// read is sound, 1 when --verify (or opening) found a bad shard or block, 2 on usage errors.
#[derive(Parser, Debug)]
#[command(name = "lmd-inspect", version)]
struct Args {
    /// A .lmds shard file, or a dataset directory (with index.json).
    path: PathBuf,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Check every block's checksum (and each shard's hash against index.json).
    #[arg(long)]
    verify: bool,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    let opts = lmd_train::inspect::InspectOptions {
        path: args.path.clone(),
        verify: args.verify,
    };
    match lmd_train::inspect::run(&opts) {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&report).expect("report serializes")
                );
            } else {
                print!("{report}");
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                for p in &report.problems {
                    eprintln!("lmd-inspect: {}: {}", p.shard, p.error);
                }
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("lmd-inspect: {e}");
            ExitCode::from(1)
        }
    }
}
