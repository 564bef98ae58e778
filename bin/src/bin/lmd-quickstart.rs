//! lmd-quickstart: precompute, pretrain, fine-tune and linear-probe on a small default.

use clap::Parser;
use lmd_train::quickstart::QuickstartConfig;
use std::path::PathBuf;

/// Run lmd end to end on a small dataset and print the top-1 it reaches.
///
/// Precomputes TAESD latents of the training and validation images, pretrains a small latent
/// MAE with LMD's cosine mask schedule, fine-tunes and linear-probes its encoder, and leaves
/// everything in one folder: latents/, pretrain/ (previews/*.png, curves.svg), finetune/ and
/// linprobe/ (curves.svg, best/), quickstart.json. Default data: $LMD_SHARED/data/imagenette,
/// else fast.ai's Imagenette downloaded once into a cache (a cut download resumes); or pass
/// --train and --val. Rerunning the same command resumes.
#[derive(Parser, Debug)]
#[command(name = "lmd-quickstart", version)]
struct Args {
    /// Output folder.
    #[arg(long, default_value = "lmd-quickstart")]
    out: PathBuf,
    #[command(flatten)]
    pipeline: lmd_bin::PipelineArgs,
    /// Mask-ratio schedule for pretraining: constant, linear, piecewise, cosine.
    #[arg(long, default_value = "cosine")]
    schedule: lmd_train::model::MaskSchedule,
    /// Where the data comes from when no --train/--val is given and LMD_SHARED is unset
    /// (fast.ai's Imagenette 160 px; checked against its MD5).
    #[arg(long, default_value = lmd_train::download::IMAGENETTE_160_URL)]
    download_url: String,
    /// Download cache (default: $LMD_CACHE, else $XDG_CACHE_HOME/lmd, else ~/.cache/lmd).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

pub fn main() -> std::process::ExitCode {
    lmd_bin::program_main("lmd-quickstart", run)
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    let cfg = QuickstartConfig {
        schedule: a.schedule,
        download_url: a.download_url,
        cache_dir: a.cache_dir,
        ..a.pipeline.config(a.out)
    };
    let r = lmd_train::quickstart::run(&cfg, &mut |l| eprintln!("{l}"))?;
    let pct = |e: &Option<lmd_train::finetune::EvalResult>| {
        e.as_ref()
            .map(|e| format!("{:.1}%", 100.0 * e.top1))
            .unwrap_or_else(|| "-".into())
    };
    let o = r.out.display();
    println!(
        "\nlmd-quickstart done in {:.0} s ({} train / {} val images)\n\
         pretrain loss      {:.4} -> {:.4}\n\
         fine-tune top-1    {}\n\
         linear-probe top-1 {}\n\
         look at: {o}/pretrain/previews/ (input | masked | prediction | prediction + visible)\n\
         \x20        {o}/pretrain/curves.svg, {o}/finetune/curves.svg, {o}/quickstart.json",
        r.total_s,
        r.train_records,
        r.val_records,
        r.stages.pretrain_first_loss,
        r.stages.pretrain_final_loss,
        pct(&r.stages.finetune),
        pct(&r.stages.linprobe),
    );
    Ok(())
}
