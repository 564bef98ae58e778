//! lmd-precompute: encode image datasets into latent shards, once.

use clap::Parser;
use lmd_train::precompute::{PrecomputeConfig, Store};
use std::path::PathBuf;

/// Encode image datasets (tar shards, ImageNet tars, folders) into latent shards, once.
///
/// Resumable: rerun the same command after a crash and only the missing work is done; a run
/// with another configuration into the same --output is refused. Settings come from the
/// defaults, then --config FILE (TOML, see configs/precompute-*.toml), then these flags.
/// The resolved config is saved as OUTPUT/precompute.json; skipped samples go to
/// OUTPUT/skipped.jsonl, a summary to OUTPUT/summary.json.
///
/// Several machines: give each the same flags plus --num-workers N --worker-index I (defaults
/// from a Slurm array job or a Kubernetes Indexed Job); worker I writes OUTPUT/worker-I-of-N/,
/// and training takes all of them.
#[derive(Parser, Debug)]
#[command(name = "lmd-precompute", version)]
struct Args {
    /// Inputs: WebDataset shard patterns (`train-{000000..000146}.tar`, globs), an ILSVRC train
    /// tar (tar of per-class tars), an ILSVRC val tar (with --val-labels), or an ImageFolder dir.
    #[arg(long, num_args = 1..)]
    input: Vec<String>,
    /// Input kind, when detection guesses wrong: wds, ilsvrc-train, ilsvrc-val, folder.
    #[arg(long, value_parser = ["wds", "ilsvrc-train", "ilsvrc-val", "folder"])]
    kind: Option<String>,
    /// Output directory.
    #[arg(long)]
    output: Option<PathBuf>,
    /// TOML config file (flags given here override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// LOC_synset_mapping.txt (official ImageNet class order) for ILSVRC inputs.
    #[arg(long)]
    synsets: Option<PathBuf>,
    /// LOC_val_solution.csv: labels of an ILSVRC val tar.
    #[arg(long)]
    val_labels: Option<PathBuf>,
    /// VAE: taesd (CPU default) or sd-vae (a diffusers AutoencoderKL).
    #[arg(long)]
    vae: Option<String>,
    /// VAE weights: a directory (taesd_{encoder,decoder}.safetensors, or a diffusers vae/ folder
    /// with config.json), or hf:OWNER/REPO[/SUBFOLDER]. Default: hf:madebyollin/taesd for taesd,
    /// hf:stabilityai/sd-vae-ft-mse for sd-vae (needs internet once; cached by hf-hub).
    #[arg(long)]
    vae_weights: Option<PathBuf>,
    /// Image side in pixels (latents are size/8).
    #[arg(long)]
    size: Option<u32>,
    /// center or random-resized-crop.
    #[arg(long)]
    crop: Option<String>,
    /// Views per image (random-resized-crop only).
    #[arg(long)]
    views: Option<usize>,
    /// Also store each view flipped horizontally.
    #[arg(long)]
    flip: bool,
    /// Resampling filter: bilinear, bicubic, lanczos3, nearest.
    #[arg(long)]
    filter: Option<String>,
    /// What to store: latent, mean, mean-logvar (the last two need sd-vae).
    #[arg(long, value_parser = ["latent", "mean", "mean-logvar"])]
    store: Option<String>,
    /// Storage dtype: f16 (default), bf16, f32.
    #[arg(long)]
    dtype: Option<String>,
    /// Records per output shard.
    #[arg(long)]
    records_per_shard: Option<usize>,
    /// Images per VAE batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Decode threads (default: one per core).
    #[arg(long)]
    decode_threads: Option<usize>,
    /// cpu or cuda:N.
    #[arg(long)]
    device: Option<lmd_train::DeviceSpec>,
    /// Number of workers splitting the inputs (default: $SLURM_ARRAY_TASK_COUNT or 1).
    #[arg(long)]
    num_workers: Option<usize>,
    /// This worker's index (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, or $JOB_COMPLETION_INDEX, or 0).
    #[arg(long)]
    worker_index: Option<usize>,
    /// Keep samples without a label (stored unlabelled) instead of skipping them.
    #[arg(long)]
    unlabeled: bool,
    /// Only the first N input samples (a trial run).
    #[arg(long)]
    limit: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn main() -> anyhow::Result<()> {
    lmd_bin::init_allocator();
    let a = Args::parse();
    let mut cfg: PrecomputeConfig = lmd_bin::load_config(a.config.as_deref())?;
    let (env_n, env_i) = PrecomputeConfig::worker_from_env();
    if let Some(n) = env_n {
        cfg.num_workers = n;
    }
    if let Some(i) = env_i {
        cfg.worker_index = i;
    }
    if !a.input.is_empty() {
        cfg.inputs = a.input.clone();
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f.clone() { cfg.$f = v.into(); } )* };
    }
    set!(
        output,
        vae,
        vae_weights,
        size,
        crop,
        views,
        filter,
        records_per_shard,
        batch_size,
        decode_threads,
        device
    );
    set!(num_workers, worker_index, limit);
    if a.kind.is_some() {
        cfg.kind = a.kind.clone();
    }
    if a.synsets.is_some() {
        cfg.synsets = a.synsets.clone();
    }
    if a.val_labels.is_some() {
        cfg.val_labels = a.val_labels.clone();
    }
    if a.flip {
        cfg.flip = true;
    }
    if a.unlabeled {
        cfg.require_labels = false;
    }
    if let Some(s) = &a.store {
        cfg.store = match s.as_str() {
            "mean" => Store::Mean,
            "mean-logvar" => Store::MeanLogvar,
            _ => Store::Latent,
        };
    }
    if let Some(d) = &a.dtype {
        cfg.dtype = d.parse().map_err(anyhow::Error::msg)?;
    }
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
        "  {} shards, {} bytes ({:.0} bytes/image), {:.1} s, {:.1} images/s (VAE alone {:.1}/s, data wait {:.0}%)",
        summary.shards,
        summary.bytes,
        summary.bytes_per_image,
        summary.wall_s,
        summary.images_per_s,
        summary.vae_images_per_s,
        summary.data_wait_fraction * 100.0
    );
    eprintln!("  output: {}", summary.output.display());
    Ok(())
}
