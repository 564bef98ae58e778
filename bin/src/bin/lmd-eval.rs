//! lmd-eval: top-1/top-5 of a saved classifier on labelled latent shards.

use clap::Parser;
use std::path::PathBuf;

/// Evaluate a fine-tuned classifier (lmd-finetune's best/ or checkpoints/last/) on latent shards.
///
/// Prints a summary; with --json one line: {"top1", "top5", "loss", "records",
/// "latents_per_s", ...}.
#[derive(Parser, Debug)]
#[command(name = "lmd-eval", version)]
struct Args {
    /// model.safetensors with classifier.json beside it, its directory (best/), or the
    /// lmd-finetune run directory (its best/).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Labelled latent dataset directories, or image inputs (shard patterns, ILSVRC tars,
    /// folders) for a classifier whose encoder takes RGB (fine-tuned with --input pixels).
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Samples per evaluation batch.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// cpu or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: lmd_train::DeviceSpec,
    /// One JSON line instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn main() -> std::process::ExitCode {
    lmd_bin::program_main("lmd-eval", run)
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    let r = lmd_train::finetune::eval_checkpoint(&a.checkpoint, &a.data, a.batch_size, a.device)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  over {} records ({:.0} latents/s)",
            a.checkpoint.display(),
            100.0 * r.top1,
            100.0 * r.top5,
            r.loss,
            r.records,
            r.latents_per_s
        );
    }
    Ok(())
}
