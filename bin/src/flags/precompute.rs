//! The flags of `lmd-precompute` and the settings they give.

use clap::Parser;
use lmd_train::data::source::InputKind;
use lmd_train::data::transform::Filter;
use lmd_train::data::DType;
use lmd_train::model::vae::VaeKind;
use lmd_train::precompute::{Crop, PrecomputeConfig, Store};
use serde::Serialize;
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
pub struct Args {
    /// TOML config file (flags given here override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Keep samples without a label (stored unlabelled) instead of skipping them.
    #[arg(long)]
    pub unlabeled: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub set: Settings,
}

/// The flags that set a [`PrecomputeConfig`] key of the same name (see [`crate::settings`]).
#[derive(clap::Args, Serialize, Debug, Clone)]
pub struct Settings {
    /// Inputs: WebDataset shard patterns (`train-{000000..000146}.tar`, globs), an ILSVRC train
    /// tar (tar of per-class tars), an ILSVRC val tar (with --val-labels), or an ImageFolder dir.
    /// Tars may be URLs (s3://, gs://, az://, http(s)://), streamed; globs in s3/gs/az URLs
    /// are expanded by listing.
    #[arg(long = "input", num_args = 1..)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// Input kind, when detection guesses wrong: wds, ilsvrc-train, ilsvrc-val, folder.
    #[arg(long)]
    pub kind: Option<InputKind>,
    /// Output directory, or a URL prefix (s3://BUCKET/PREFIX, gs://, az://): each shard is
    /// uploaded once finished, before the manifest and the resume state name it.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Local directory for shards before their upload to a remote --output (default: the
    /// system temp dir). Holds about one shard.
    #[arg(long)]
    pub staging_dir: Option<PathBuf>,
    /// LOC_synset_mapping.txt (official ImageNet class order) for ILSVRC inputs.
    #[arg(long)]
    pub synsets: Option<PathBuf>,
    /// LOC_val_solution.csv: labels of an ILSVRC val tar.
    #[arg(long)]
    pub val_labels: Option<PathBuf>,
    /// VAE: taesd (CPU default) or sd-vae (a diffusers AutoencoderKL).
    #[arg(long)]
    pub vae: Option<VaeKind>,
    /// VAE weights: a directory (taesd_{encoder,decoder}.safetensors, or a diffusers vae/ folder
    /// with config.json), or hf:OWNER/REPO[/SUBFOLDER]. Default: hf:madebyollin/taesd for taesd,
    /// hf:stabilityai/sd-vae-ft-mse for sd-vae (needs internet once; cached by hf-hub).
    #[arg(long)]
    pub vae_weights: Option<PathBuf>,
    /// Image side in pixels (latents are size/8).
    #[arg(long)]
    pub size: Option<u32>,
    /// center or random-resized-crop.
    #[arg(long)]
    pub crop: Option<Crop>,
    /// Views per image (random-resized-crop only).
    #[arg(long)]
    pub views: Option<usize>,
    /// Also store each view flipped horizontally.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub flip: bool,
    /// Resampling filter: bilinear, bicubic, lanczos3, nearest.
    #[arg(long)]
    pub filter: Option<Filter>,
    /// What to store: latent, mean, mean-logvar (the last two need sd-vae).
    #[arg(long)]
    pub store: Option<Store>,
    /// Storage dtype: f16 (default), bf16, f32.
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Records per output shard.
    #[arg(long)]
    pub records_per_shard: Option<usize>,
    /// Images per VAE batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Decode threads (default: one per core).
    #[arg(long)]
    pub decode_threads: Option<usize>,
    /// cpu or cuda:N.
    #[arg(long)]
    pub device: Option<lmd_train::DeviceSpec>,
    /// The VAE's compute precision: f32 (default), bf16 or f16 (a GPU's fast paths; the
    /// stored latents keep --dtype).
    #[arg(long)]
    pub vae_precision: Option<lmd_train::model::Precision>,
    /// Number of workers splitting the inputs (default: $SLURM_ARRAY_TASK_COUNT or 1).
    #[arg(long)]
    pub num_workers: Option<usize>,
    /// This worker's index (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, or $JOB_COMPLETION_INDEX, or 0).
    #[arg(long)]
    pub worker_index: Option<usize>,
    /// Only the first N input samples (a trial run).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Set by --unlabeled.
    #[arg(skip)]
    pub require_labels: Option<bool>,
}

/// The settings: defaults, then `--config`, then the job array's worker variables, then the
/// flags.
pub fn config(a: &Args) -> anyhow::Result<PrecomputeConfig> {
    let mut set = a.set.clone();
    let (env_n, env_i) = PrecomputeConfig::worker_from_env();
    set.num_workers = set.num_workers.or(env_n);
    set.worker_index = set.worker_index.or(env_i);
    set.require_labels = a.unlabeled.then_some(false);
    crate::settings::merge(&PrecomputeConfig::default(), a.config.as_deref(), &set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_sets_its_key_over_the_file() {
        let (_dir, c, a) = crate::flags::parse_with_config::<Args>(
            "size = 64\nviews = 2\nrecords_per_shard = 10\n",
            &[
                "lmd-precompute --config {c} --input a.tar b.tar --kind wds --output o ",
                "--synsets s.txt --val-labels v.csv --vae sd-vae --vae-weights w --size 128 ",
                "--crop random-resized-crop --flip --filter bicubic --store mean-logvar --dtype ",
                "bf16 --batch-size 3 --decode-threads 2 --device cpu --vae-precision f16 --num-workers 4 ",
                "--worker-index 1 --limit 50 --unlabeled --staging-dir st",
            ],
        );
        let c = c.as_str();
        let cfg = config(&a).unwrap();
        assert_eq!(cfg.inputs, ["a.tar", "b.tar"]);
        assert_eq!(cfg.kind, Some(InputKind::Wds));
        assert_eq!(cfg.output, PathBuf::from("o"));
        assert_eq!(cfg.synsets, Some(PathBuf::from("s.txt")));
        assert_eq!(cfg.val_labels, Some(PathBuf::from("v.csv")));
        assert_eq!(
            (cfg.vae, cfg.vae_weights.clone()),
            (VaeKind::SdVae, Some("w".into()))
        );
        assert_eq!((cfg.size, cfg.views, cfg.records_per_shard), (128, 2, 10));
        assert_eq!(
            (cfg.crop, cfg.flip, cfg.filter),
            (Crop::RandomResizedCrop, true, Filter::Bicubic)
        );
        assert_eq!((cfg.store, cfg.dtype), (Store::MeanLogvar, DType::BF16));
        assert_eq!((cfg.batch_size, cfg.decode_threads), (3, 2));
        assert_eq!(cfg.vae_precision, lmd_train::model::Precision::F16);
        assert_eq!((cfg.num_workers, cfg.worker_index, cfg.limit), (4, 1, 50));
        assert!(!cfg.require_labels);
        assert_eq!(cfg.staging_dir, Some(PathBuf::from("st")));
        let a = Args::try_parse_from(["lmd-precompute", "--config", c]).unwrap();
        let cfg = config(&a).unwrap();
        assert_eq!((cfg.size, cfg.flip, cfg.require_labels), (64, false, true));
        assert_eq!(cfg.crop, Crop::Center);
        for bad in [
            ["--crop", "square"],
            ["--kind", "zip"],
            ["--store", "all"],
            ["--vae", "x"],
        ] {
            assert!(
                Args::try_parse_from(["lmd-precompute", bad[0], bad[1]]).is_err(),
                "{bad:?}"
            );
        }
    }
}
