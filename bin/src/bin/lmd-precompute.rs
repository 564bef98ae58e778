//! lmd-precompute: encode image datasets into latent shards, once.

use clap::Parser;
use lmd_bin::flags::precompute::{config, Args};

pub fn main() -> std::process::ExitCode {
    lmd_bin::program_main("lmd-precompute", run)
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    let cfg = config(&a)?;
    let bar = if a.no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    let mut styled = false;
    let mut progress = |n: usize, total: Option<u64>, key: &str| {
        if !styled {
            styled = true;
            let style = match total {
                Some(t) => {
                    bar.set_length(t);
                    "{elapsed_precise} [{bar:30}] {pos}/{len} images {per_sec} ETA {eta} {msg}"
                }
                None => "{spinner} {elapsed_precise} {pos} images {per_sec} {msg}",
            };
            bar.set_style(indicatif::ProgressStyle::with_template(style).expect("template"));
        }
        bar.set_position(n as u64);
        bar.set_message(key.to_string());
    };
    let summary = lmd_train::precompute::run(&cfg, &mut progress)?;
    bar.finish_and_clear();
    eprintln!(
        "lmd-precompute: {} images written ({} resumed earlier), {} skipped, {} failed shards/inputs",
        summary.written, summary.resumed_records, summary.skipped, summary.failed_shards
    );
    for (reason, n) in &summary.skipped_by_reason {
        eprintln!("  skipped {n:>6}  {reason}");
    }
    eprintln!(
        "  {} shards, {} bytes ({:.0} bytes/image), {:.1} s",
        summary.shards, summary.bytes, summary.bytes_per_image, summary.wall_s
    );
    eprintln!("  {}", summary.rates_line());
    eprintln!("  output: {}", summary.output.display());
    match summary.split {
        lmd_train::precompute::Split::ByFile { files, of } => {
            eprintln!("  split by file: this worker read {files} of {of} input files")
        }
        lmd_train::precompute::Split::BySample => eprintln!(
            "  split by sample: fewer input files than workers, each read all and kept its share"
        ),
        lmd_train::precompute::Split::Single => {}
    }
    Ok(())
}
