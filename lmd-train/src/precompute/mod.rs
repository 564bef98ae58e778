//! `lmd-precompute`: datasets -> latent shards, once, restartable.
//!
//! Flow: [`lmd_data::pipeline::Pipeline`] (reader -> decode/transform workers on other cores ->
//! ordered batches) feeds this thread, which runs the VAE on each batch and appends records to
//! the current [`ShardWriter`]; a shard is finished (atomically) every `records_per_shard`
//! records. Decoding therefore runs ahead of the VAE, bounded by the pipeline's queues.
//!
//! Output directory (one per worker when `num_workers > 1`: `OUT/worker-III-of-NNN/`):
//! `shard-000000.lmds ...`, `index.json` (manifest), `precompute.json` (the resolved config),
//! `state.json` (resume point), `skipped.jsonl` (every skipped sample and failed shard),
//! `summary.json`.
//!
//! Stages, each its own module: [`plan`] (inputs, transform, VAE and shard metadata, fixed before
//! any image is read), decode ([`lmd_data::pipeline`], on other threads), [`encode`] (the VAE on
//! this thread) and [`commit`] (records into shards, and the resume state beside them).
//!
//! Resume rules: shard `k` holds the `k`-th run of `records_per_shard` delivered samples in input
//! order, so the output does not depend on timing. After each shard the skip report, manifest and
//! state (the input position after the shard's last sample) are rewritten atomically, in that
//! order. A rerun with the same config starts the inputs at that position and rewrites nothing
//! that is complete; a rerun with another config is refused, naming the differences.

mod commit;
mod encode;
mod plan;
pub use plan::Split;

use crate::{Error, Result};
use lmd_data::pipeline::Pipeline;
use lmd_data::source::InputKind;
use lmd_data::transform::{CropMode, Filter, TransformConfig};
use lmd_data::DType;
use lmd_model::vae::VaeKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use commit::Output;
use encode::{Encoded, Encoder, ENCODED_QUEUE};
use plan::Plan;

/// What each record stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Store {
    /// The latent (the posterior mean for KL VAEs, scaled).
    Latent,
    /// The posterior mean (KL VAEs), scaled.
    Mean,
    /// Mean and log-variance (KL VAEs), both in the scaled space: sample `mean + exp(logvar/2)·ε`.
    MeanLogvar,
}

impl std::str::FromStr for Store {
    type Err = Error;

    fn from_str(s: &str) -> Result<Store> {
        match s.trim() {
            "latent" => Ok(Store::Latent),
            "mean" => Ok(Store::Mean),
            "mean-logvar" => Ok(Store::MeanLogvar),
            o => Err(Error::Invalid(format!(
                "store {o:?}: expected latent, mean or mean-logvar"
            ))),
        }
    }
}

/// How each image is cut: [`CropMode`] by name (the default scale and ratio ranges).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Crop {
    /// Resize(S) + CenterCrop(S).
    #[default]
    Center,
    /// RandomResizedCrop(S, scale 0.2-1, ratio 3/4-4/3), one per view.
    #[serde(alias = "rrc")]
    RandomResizedCrop,
}

impl Crop {
    pub fn mode(self) -> CropMode {
        match self {
            Crop::Center => CropMode::Center,
            Crop::RandomResizedCrop => CropMode::rrc_default(),
        }
    }
}

impl std::str::FromStr for Crop {
    type Err = Error;

    fn from_str(s: &str) -> Result<Crop> {
        match s.trim() {
            "center" => Ok(Crop::Center),
            "random-resized-crop" | "rrc" => Ok(Crop::RandomResizedCrop),
            o => Err(Error::Invalid(format!(
                "crop {o:?}: expected center or random-resized-crop"
            ))),
        }
    }
}

/// The resolved configuration of a precompute job (saved as `precompute.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrecomputeConfig {
    /// Inputs: shard patterns, ILSVRC tars, ImageFolder directories.
    pub inputs: Vec<String>,
    /// Input kind for all inputs (`wds`, `ilsvrc-train`, `ilsvrc-val`, `folder`); none: detected.
    pub kind: Option<InputKind>,
    /// `LOC_synset_mapping.txt` for ILSVRC inputs.
    pub synsets: Option<PathBuf>,
    /// `LOC_val_solution.csv`: makes a flat tar an ILSVRC val input.
    pub val_labels: Option<PathBuf>,
    pub output: PathBuf,
    pub vae: VaeKind,
    /// A directory, or `hf:OWNER/REPO[/SUBFOLDER]`; none: the VAE's default hub repository.
    pub vae_weights: Option<PathBuf>,
    pub size: u32,
    pub crop: Crop,
    pub views: usize,
    pub flip: bool,
    pub filter: Filter,
    pub store: Store,
    pub dtype: DType,
    pub records_per_shard: usize,
    pub batch_size: usize,
    pub decode_threads: usize,
    pub device: crate::DeviceSpec,
    /// The VAE's compute precision (bf16/f16 on a GPU); the stored format is `dtype`.
    pub vae_precision: lmd_model::Precision,
    pub num_workers: usize,
    pub worker_index: usize,
    /// Samples without a label are skipped (`true`) or stored unlabelled (`false`).
    pub require_labels: bool,
    /// Stop after this many input samples (0: all). For trials and tests.
    pub limit: u64,
    /// Local directory where shards are written before their upload to a remote `output`
    /// (none: `<temp>/lmd-staging/<hash of the URL>`). A finished shard is deleted here once
    /// uploaded, so this holds about one shard.
    pub staging_dir: Option<PathBuf>,
}

impl Default for PrecomputeConfig {
    fn default() -> Self {
        PrecomputeConfig {
            inputs: vec![],
            kind: None,
            synsets: None,
            val_labels: None,
            output: PathBuf::from("latents"),
            vae: VaeKind::Taesd,
            vae_weights: None,
            size: 224,
            crop: Crop::Center,
            views: 1,
            flip: false,
            filter: Filter::Bilinear,
            store: Store::Latent,
            dtype: DType::F16,
            records_per_shard: 5000,
            batch_size: 16,
            decode_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            device: crate::DeviceSpec::Cpu,
            vae_precision: lmd_model::Precision::F32,
            num_workers: 1,
            worker_index: 0,
            require_labels: true,
            limit: 0,
            staging_dir: None,
        }
    }
}

impl PrecomputeConfig {
    /// Worker defaults from a Slurm array job (`SLURM_ARRAY_TASK_COUNT`, `SLURM_ARRAY_TASK_ID`
    /// minus `SLURM_ARRAY_TASK_MIN`), an MPI launcher (`mpirun`, `srun --mpi=...`: rank and
    /// world size, see [`crate::dist::LaunchEnv`]; precompute needs no collective, so no MPI
    /// build either), the tasks of one `srun` step (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`), or
    /// a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`; the count must then be given).
    pub fn worker_from_env() -> (Option<usize>, Option<usize>) {
        Self::worker_from_lookup(|k| std::env::var(k).ok())
    }

    /// [`worker_from_env`](Self::worker_from_env) over a variable lookup.
    pub fn worker_from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> (Option<usize>, Option<usize>) {
        let num = |k: &str| get(k).and_then(|v| v.trim().parse::<usize>().ok());
        if let Some(count) = num("SLURM_ARRAY_TASK_COUNT") {
            let index =
                num("SLURM_ARRAY_TASK_ID").map(|id| id - num("SLURM_ARRAY_TASK_MIN").unwrap_or(0));
            return (Some(count), index);
        }
        let launch = crate::dist::LaunchEnv::from_lookup(&get);
        if launch.launcher != crate::dist::Launcher::None {
            return (Some(launch.world_size), Some(launch.rank));
        }
        if let (Some(n), Some(i)) = (num("SLURM_STEP_NUM_TASKS"), num("SLURM_PROCID")) {
            return (Some(n), Some(i));
        }
        (None, num("JOB_COMPLETION_INDEX"))
    }

    fn transform(&self) -> Result<TransformConfig> {
        let crop = self.crop.mode();
        if crop == CropMode::Center && self.views != 1 {
            return Err(Error::Invalid(
                "--views > 1 needs --crop random-resized-crop".into(),
            ));
        }
        Ok(TransformConfig {
            size: self.size,
            crop,
            views: self.views.max(1),
            flip: self.flip,
            filter: self.filter,
        })
    }

    /// The directory (or URL prefix) this worker writes.
    pub fn worker_dir(&self) -> PathBuf {
        if self.num_workers > 1 {
            lmd_data::storage::join(
                &self.output,
                &format!("worker-{:03}-of-{:03}", self.worker_index, self.num_workers),
            )
        } else {
            self.output.clone()
        }
    }

    /// Where this worker stages shards for the remote destination `url`.
    pub(crate) fn staging_dir(&self, url: &std::path::Path) -> PathBuf {
        let base = self
            .staging_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("lmd-staging"));
        let h = xxhash_rust::xxh3::xxh3_64(url.to_string_lossy().as_bytes());
        base.join(format!("{h:016x}"))
    }

    /// Settings that decide the output; a rerun must match them to resume.
    fn resume_key(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("serializes");
        let o = v.as_object_mut().expect("object");
        for k in [
            "batch_size",
            "decode_threads",
            "device",
            "output",
            "staging_dir",
        ] {
            o.remove(k);
        }
        v
    }
}

/// Resume point (`state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    shards: usize,
    records: usize,
    next_seq: u64,
    done: bool,
}

/// One line of `skipped.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ReportLine {
    Skip {
        source: String,
        key: String,
        offset: u64,
        reason: String,
    },
    ShardFailed {
        source: String,
        offset: Option<u64>,
        message: String,
    },
    InputFailed {
        message: String,
    },
}

/// What a run did (also `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub output: PathBuf,
    pub written: usize,
    pub skipped: usize,
    pub skipped_by_reason: BTreeMap<String, usize>,
    pub failed_shards: usize,
    pub shards: usize,
    pub bytes: u64,
    pub bytes_per_image: f64,
    pub wall_s: f64,
    /// End to end: images written per second of wall time.
    pub images_per_s: f64,
    /// Where the time went, stage by stage.
    #[serde(flatten)]
    pub rates: StageRates,
    /// Records already present when this run started (resumed).
    pub resumed_records: usize,
    /// How this worker's share of the inputs was chosen (by file, or by sample when there
    /// are fewer input files than workers).
    #[serde(flatten)]
    pub split: plan::Split,
}

/// Each stage's rate and busy fraction in one run (`summary.json`, flattened). With overlap the
/// end-to-end rate is bounded by the slowest stage: decode when `data_wait_fraction` is large,
/// the VAE when `vae_busy_fraction` is near 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageRates {
    /// Images/s the decode workers give when they never wait (decode-only: these cores'
    /// bound), from their busy time.
    pub decode_images_per_s: f64,
    /// Images/s of the VAE while it was busy (variants counted).
    pub vae_images_per_s: f64,
    /// Fraction of the wall time the VAE's device was busy (a batch's launch to its latents on
    /// the host): the GPU's busy fraction on a GPU.
    pub vae_busy_fraction: f64,
    /// Fraction of the wall time the encoder waited for decoded batches.
    pub data_wait_fraction: f64,
    /// Fraction of the wall time the writer spent writing and uploading shards.
    pub write_busy_fraction: f64,
}

/// Images in ImageNet-1k's train split (ILSVRC-2012), for the projected precompute time.
pub const IMAGENET_TRAIN_IMAGES: u64 = 1_281_167;

impl Summary {
    /// Seconds ImageNet-1k's train split would take at this run's end-to-end rate.
    pub fn projected_imagenet_s(&self) -> Option<f64> {
        (self.images_per_s > 0.0).then(|| IMAGENET_TRAIN_IMAGES as f64 / self.images_per_s)
    }

    /// One line of the stage rates: end to end, decode alone, the VAE alone and its busy
    /// fraction, the waits, and the projected ImageNet-1k time.
    pub fn rates_line(&self) -> String {
        let r = &self.rates;
        let projected = match self.projected_imagenet_s() {
            Some(s) if s >= 3600.0 => format!("{:.1} h", s / 3600.0),
            Some(s) => format!("{:.1} min", s / 60.0),
            None => "-".into(),
        };
        format!(
            "{:.1} images/s end to end; decode alone {:.1}/s, VAE alone {:.1}/s (busy {:.0}%), \
             data wait {:.0}%, writing {:.0}%; ImageNet-1k train ({IMAGENET_TRAIN_IMAGES} \
             images) at this rate: {projected}",
            self.images_per_s,
            r.decode_images_per_s,
            r.vae_images_per_s,
            r.vae_busy_fraction * 100.0,
            r.data_wait_fraction * 100.0,
            r.write_busy_fraction * 100.0,
        )
    }
}

fn reason_class(r: &str) -> String {
    let r = r.split(':').next().unwrap_or(r);
    let r = r.split('(').next().unwrap_or(r).trim();
    r.chars().take(60).collect()
}

/// Progress callback: (records written in this run, expected total for this run if known,
/// last key).
pub type Progress<'a> = &'a mut dyn FnMut(usize, Option<u64>, &str);

/// Run a precompute job: plan, then decode -> encode -> commit until the inputs end.
pub fn run(cfg: &PrecomputeConfig, progress: Progress<'_>) -> Result<Summary> {
    run_inner(cfg, progress).map_err(|e| match lmd_data::storage::first_fault() {
        // a lost server fails uploads too: name the read that failed as well
        Some(f) if f.to_string() != e.to_string() => {
            Error::Invalid(format!("{e} (and a read failed before: {f})"))
        }
        _ => e,
    })
}

fn run_inner(cfg: &PrecomputeConfig, progress: Progress<'_>) -> Result<Summary> {
    let plan = Plan::make(cfg)?;
    let mut out = Output::open(cfg, &plan.meta)?;
    let t_start = Instant::now();
    if out.state.done {
        return out.finish(t_start, StageRates::default(), plan.split);
    }
    let start = out.state.next_seq;
    let total = plan.expected(cfg, start);
    let pipeline = Pipeline::start(plan.inputs.clone(), plan.pipeline(cfg, start));
    let decode = pipeline.decode_stats();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Encoded>(ENCODED_QUEUE);
    // decode (the pipeline's threads) -> encode (its own thread) -> write (this thread)
    let plan_ref = &plan;
    let (encoded, write_s) = std::thread::scope(|s| {
        // the encoder owns the sender: its end closes the writer's loop
        let encoder = std::thread::Builder::new()
            .name("lmd-encode".into())
            .spawn_scoped(s, move || Encoder::new(plan_ref).run(pipeline, &tx))
            .map_err(|e| Error::Invalid(format!("spawn the encode thread: {e}")));
        let written = encoder
            .as_ref()
            .ok()
            .map(|_| write_all(&rx, &mut out, total, progress));
        // a failed write hangs up: the encoder stops at its next hand-over
        drop(rx);
        let encoded = encoder?
            .join()
            .map_err(|_| Error::Invalid("the encode thread panicked".into()))?;
        // the encoder's error first: a write error after it is its consequence
        let times = encoded?;
        Ok::<_, Error>((times, written.expect("spawned")?))
    })?;
    if let Some(e) = lmd_data::storage::first_fault() {
        return Err(e.into());
    }
    let wall = t_start.elapsed().as_secs_f64().max(1e-9);
    let rates = StageRates {
        decode_images_per_s: decode.stats().images_per_s(),
        vae_images_per_s: if encoded.busy_s > 0.0 {
            encoded.images as f64 / encoded.busy_s
        } else {
            0.0
        },
        vae_busy_fraction: encoded.busy_s / wall,
        data_wait_fraction: encoded.wait_s / wall,
        write_busy_fraction: write_s / wall,
    };
    out.finish(t_start, rates, plan.split)
}

/// The writer: encoded batches into shards, in order, until the encoder is done; the seconds
/// spent writing (and uploading).
fn write_all(
    rx: &std::sync::mpsc::Receiver<Encoded>,
    out: &mut Output<'_>,
    total: Option<u64>,
    progress: Progress<'_>,
) -> Result<f64> {
    let mut busy = 0f64;
    for msg in rx {
        // a lost connection is not a damaged input: stop before committing anything after it
        // (the rerun resumes at the last committed shard)
        if let Some(e) = lmd_data::storage::first_fault() {
            return Err(e.into());
        }
        let t = Instant::now();
        match msg {
            Encoded::Batch(b, records) => {
                let last = b.items.last().map(|p| p.key.clone()).unwrap_or_default();
                out.add_batch(b, records)?;
                progress(out.written, total, &last);
            }
            Encoded::Failed(line) => out.failed(line),
        }
        busy += t.elapsed().as_secs_f64();
    }
    Ok(busy)
}

#[cfg(test)]
mod tests {
    use super::PrecomputeConfig;
    use std::collections::HashMap;

    fn workers(pairs: &[(&str, &str)]) -> (Option<usize>, Option<usize>) {
        let m: HashMap<&str, &str> = pairs.iter().copied().collect();
        PrecomputeConfig::worker_from_lookup(|k| m.get(k).map(|v| v.to_string()))
    }

    #[test]
    fn workers_come_from_an_array_job_a_launcher_an_srun_step_or_an_indexed_job() {
        assert_eq!(workers(&[]), (None, None));
        let array = [
            ("SLURM_ARRAY_TASK_COUNT", "8"),
            ("SLURM_ARRAY_TASK_ID", "12"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
        ];
        assert_eq!(workers(&array), (Some(8), Some(2)));
        let mpirun = [("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "4")];
        assert_eq!(workers(&mpirun), (Some(4), Some(3)));
        let srun = [("SLURM_STEP_NUM_TASKS", "16"), ("SLURM_PROCID", "5")];
        assert_eq!(workers(&srun), (Some(16), Some(5)));
        assert_eq!(workers(&[("JOB_COMPLETION_INDEX", "7")]), (None, Some(7)));
    }
}
