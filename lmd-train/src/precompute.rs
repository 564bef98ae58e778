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
//! Resume rules: shard `k` holds the `k`-th run of `records_per_shard` delivered samples in input
//! order, so the output does not depend on timing. After each shard the skip report, manifest and
//! state (the input position after the shard's last sample) are rewritten atomically, in that
//! order. A rerun with the same config starts the inputs at that position and rewrites nothing
//! that is complete; a rerun with another config is refused, naming the differences.

use crate::run_dir::write_json;
use crate::{Error, Result};
use lmd_data::pipeline::{Pipeline, PipelineConfig, PipelineItem, Prepared};
use lmd_data::shard::{
    writer::write_atomic, Field, Manifest, Preprocessing, RecordLayout, Scaling, ShardMeta,
    ShardWriter, VaeIdentity, WeightFile, WriterOptions,
};
use lmd_data::source::{InputSpec, Labels, ShardFailure, Skip};
use lmd_data::transform::{CropMode, Filter, TransformConfig};
use lmd_data::DType;
use lmd_model::candle::{Device, Tensor};
use lmd_model::vae::Vae;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// The resolved configuration of a precompute job (saved as `precompute.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrecomputeConfig {
    /// Inputs: shard patterns, ILSVRC tars, ImageFolder directories.
    pub inputs: Vec<String>,
    /// Input kind for all inputs (`wds`, `ilsvrc-train`, `ilsvrc-val`, `folder`); none: detected.
    pub kind: Option<String>,
    /// `LOC_synset_mapping.txt` for ILSVRC inputs.
    pub synsets: Option<PathBuf>,
    /// `LOC_val_solution.csv`: makes a flat tar an ILSVRC val input.
    pub val_labels: Option<PathBuf>,
    pub output: PathBuf,
    /// `taesd` or `sd-vae`.
    pub vae: String,
    /// A directory, or `hf:OWNER/REPO[/SUBFOLDER]`; none: the VAE's default hub repository.
    pub vae_weights: Option<PathBuf>,
    pub size: u32,
    /// `center` or `random-resized-crop`.
    pub crop: String,
    pub views: usize,
    pub flip: bool,
    pub filter: String,
    pub store: Store,
    pub dtype: DType,
    pub records_per_shard: usize,
    pub batch_size: usize,
    pub decode_threads: usize,
    pub device: String,
    pub num_workers: usize,
    pub worker_index: usize,
    /// Samples without a label are skipped (`true`) or stored unlabelled (`false`).
    pub require_labels: bool,
    /// Stop after this many input samples (0: all). For trials and tests.
    pub limit: u64,
}

impl Default for PrecomputeConfig {
    fn default() -> Self {
        PrecomputeConfig {
            inputs: vec![],
            kind: None,
            synsets: None,
            val_labels: None,
            output: PathBuf::from("latents"),
            vae: "taesd".into(),
            vae_weights: None,
            size: 224,
            crop: "center".into(),
            views: 1,
            flip: false,
            filter: "bilinear".into(),
            store: Store::Latent,
            dtype: DType::F16,
            records_per_shard: 5000,
            batch_size: 16,
            decode_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            device: "cpu".into(),
            num_workers: 1,
            worker_index: 0,
            require_labels: true,
            limit: 0,
        }
    }
}

impl PrecomputeConfig {
    /// Worker defaults from a Slurm array job (`SLURM_ARRAY_TASK_COUNT`, `SLURM_ARRAY_TASK_ID`
    /// minus `SLURM_ARRAY_TASK_MIN`) or a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`; the
    /// count must then be given).
    pub fn worker_from_env() -> (Option<usize>, Option<usize>) {
        let get = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        };
        let count = get("SLURM_ARRAY_TASK_COUNT");
        let index = match (get("SLURM_ARRAY_TASK_ID"), get("SLURM_ARRAY_TASK_MIN")) {
            (Some(id), min) => Some(id - min.unwrap_or(0)),
            _ => get("JOB_COMPLETION_INDEX"),
        };
        (count, index)
    }

    fn transform(&self) -> Result<TransformConfig> {
        let crop = match self.crop.as_str() {
            "center" => CropMode::Center,
            "random-resized-crop" | "rrc" => CropMode::rrc_default(),
            o => {
                return Err(Error::Invalid(format!(
                    "crop {o:?}: expected center or random-resized-crop"
                )))
            }
        };
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
            filter: self.filter.parse::<Filter>().map_err(Error::Invalid)?,
        })
    }

    /// The directory this worker writes.
    pub fn worker_dir(&self) -> PathBuf {
        if self.num_workers > 1 {
            self.output.join(format!(
                "worker-{:03}-of-{:03}",
                self.worker_index, self.num_workers
            ))
        } else {
            self.output.clone()
        }
    }

    /// Settings that decide the output; a rerun must match them to resume.
    fn resume_key(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("serializes");
        let o = v.as_object_mut().expect("object");
        for k in ["batch_size", "decode_threads", "device", "output"] {
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
    pub images_per_s: f64,
    /// Images/s of the VAE while it was busy (the bound when decoding keeps up).
    pub vae_images_per_s: f64,
    /// Fraction of the wall time this thread waited for decoded batches.
    pub data_wait_fraction: f64,
    /// Records already present when this run started (resumed).
    pub resumed_records: usize,
}

fn reason_class(r: &str) -> String {
    let r = r.split(':').next().unwrap_or(r);
    let r = r.split('(').next().unwrap_or(r).trim();
    r.chars().take(60).collect()
}

fn read_json<T: for<'a> Deserialize<'a>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, "read", e)),
    }
}

/// Progress callback: (records written in this run, expected total for this run if known,
/// last key).
pub type Progress<'a> = &'a mut dyn FnMut(usize, Option<u64>, &str);

/// Run a precompute job.
pub fn run(cfg: &PrecomputeConfig, progress: Progress<'_>) -> Result<Summary> {
    if cfg.inputs.is_empty() {
        return Err(Error::Invalid("no --input given".into()));
    }
    if cfg.num_workers == 0 || cfg.worker_index >= cfg.num_workers {
        return Err(Error::Invalid(format!(
            "--worker-index {} is not below --num-workers {}",
            cfg.worker_index, cfg.num_workers
        )));
    }
    let tcfg = cfg.transform()?;
    // Inputs first: a typo in a path should not wait for (or download) the VAE.
    let inputs = cfg
        .inputs
        .iter()
        .map(|i| match &cfg.kind {
            Some(k) => {
                InputSpec::with_kind(i, k, cfg.synsets.as_deref(), cfg.val_labels.as_deref())
            }
            None => InputSpec::detect(i, cfg.synsets.as_deref(), cfg.val_labels.as_deref()),
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let dev = crate::device(&cfg.device)?;
    let weights = cfg.vae_weights.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "hf:{}",
            lmd_model::vae::hub::default_repo(&cfg.vae)
        ))
    });
    let vae = lmd_model::vae::load_vae(&cfg.vae, &weights, &dev)?;
    let is_kl = vae.id().name != "taesd";
    let fields = match (cfg.store, is_kl) {
        (Store::Latent, _) => vec![Field::Latent],
        (Store::Mean, true) => vec![Field::Mean],
        (Store::MeanLogvar, true) => vec![Field::Mean, Field::Logvar],
        (s, false) => {
            return Err(Error::Invalid(format!(
                "--store {s:?} needs a KL VAE (sd-vae); {} has no posterior",
                vae.id().name
            )))
        }
    };
    let layout = RecordLayout {
        fields,
        views: tcfg.views,
        flip: tcfg.flip,
    };
    let down = vae.downsample();
    let s = cfg.size as usize;
    let latent_shape = [vae.latent_channels(), s / down, s / down];
    let meta = ShardMeta {
        latent_shape,
        dtype: cfg.dtype,
        layout: layout.clone(),
        labels: cfg.require_labels,
        vae: VaeIdentity {
            name: vae.id().name.clone(),
            weights: vae
                .id()
                .weights
                .iter()
                .map(|w| WeightFile {
                    file: w.file.clone(),
                    sha256: w.sha256.clone(),
                })
                .collect(),
        },
        preprocessing: Preprocessing {
            size: cfg.size,
            resize: "shorter-side".into(),
            crop: tcfg.crop.name().into(),
            filter: tcfg.filter.name().into(),
            views: tcfg.views,
            flip: tcfg.flip,
            input_range: vae.input_range().as_str().into(),
        },
        scaling: Scaling {
            factor: vae.scaling_factor(),
            applied: true,
        },
        writer: format!("lmd-precompute {}", env!("CARGO_PKG_VERSION")),
        records_per_block: 0,
        byte_shuffle: true,
        zstd_level: 3,
    };

    let dir = cfg.worker_dir();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create directory", e))?;
    remove_stale_temporaries(&dir)?;
    // Refuse to mix with an earlier run of another config.
    let cfg_path = dir.join("precompute.json");
    if let Some(old) = read_json::<PrecomputeConfig>(&cfg_path)? {
        let (a, b) = (old.resume_key(), cfg.resume_key());
        if a != b {
            let diffs: Vec<String> = a
                .as_object()
                .expect("object")
                .iter()
                .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, v)| {
                    format!(
                        "{k}: {v} -> {}",
                        b.get(k.as_str()).cloned().unwrap_or_default()
                    )
                })
                .collect();
            return Err(Error::Invalid(format!(
                "{} holds the output of another configuration; refusing to mix ({}). Use another --output or remove it.",
                dir.display(),
                diffs.join("; ")
            )));
        }
    }
    let mut manifest = match Manifest::load(&dir) {
        Ok(m) => {
            if m.fingerprint != meta.fingerprint() {
                return Err(Error::Invalid(format!(
                    "{}: existing shards were made differently ({}); refusing to mix",
                    dir.display(),
                    m.meta.differences(&meta).join("; ")
                )));
            }
            m
        }
        Err(_) => Manifest::new(meta.clone()),
    };
    write_json(&cfg_path, cfg)?;
    let state_path = dir.join("state.json");
    let mut state: State = read_json(&state_path)?.unwrap_or_default();
    // Keep only the shards the state vouches for (a later one may be rewritten identically).
    manifest.shards.truncate(state.shards);
    let report_path = dir.join("skipped.jsonl");
    let mut report: Vec<ReportLine> = match std::fs::read_to_string(&report_path) {
        Ok(t) => t
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    let resumed_records = state.records;
    // Keys already stored (a key seen twice, e.g. the same image in two shards, is stored once
    // and the repeat reported as a skip).
    let mut seen = std::collections::HashSet::new();
    for e in &manifest.shards {
        let r = lmd_data::shard::ShardReader::open(dir.join(&e.file))?;
        for i in 0..r.len() {
            seen.insert(r.key(i)?.to_string());
        }
    }
    let t_start = Instant::now();
    if state.done {
        return finish_summary(
            &dir,
            &manifest,
            &report,
            0,
            t_start,
            0.0,
            0.0,
            resumed_records,
        );
    }

    // Expected samples for this run (progress bar ETA), from headers only.
    let total = inputs
        .iter()
        .map(|i| i.count_samples())
        .sum::<Option<u64>>()
        .map(|n| if cfg.limit > 0 { n.min(cfg.limit) } else { n })
        .map(|n| n.saturating_sub(state.next_seq) / cfg.num_workers as u64);
    let pcfg = PipelineConfig {
        transform: tcfg.clone(),
        batch_size: cfg.batch_size.max(1),
        workers: cfg.decode_threads.max(1),
        labels: if cfg.require_labels {
            Labels::Required
        } else {
            Labels::Optional
        },
        start_seq: state.next_seq,
        split: (cfg.num_workers as u64, cfg.worker_index as u64),
        limit: cfg.limit,
        ..Default::default()
    };
    let pipeline = Pipeline::start(inputs, pcfg);
    let rec_elems = meta.record_elems();
    let variants = tcfg.variants();
    let mut writer: Option<ShardWriter> = None;
    let mut shard_skips: Vec<ReportLine> = Vec::new();
    let (mut written, mut vae_s, mut wait_s) = (0usize, 0f64, 0f64);
    let mut last_seq = state.next_seq;
    let mut t_wait = Instant::now();

    let commit = |w: ShardWriter,
                  last_seq: u64,
                  shard_skips: &mut Vec<ReportLine>,
                  report: &mut Vec<ReportLine>,
                  manifest: &mut Manifest,
                  state: &mut State|
     -> Result<()> {
        let wmeta = w.meta().clone();
        let info = w.finish()?;
        report.append(shard_skips);
        write_report(&report_path, report)?;
        manifest.add(&info, &wmeta)?;
        manifest.save(&dir)?;
        state.shards += 1;
        state.records += info.records;
        state.next_seq = last_seq + 1;
        write_json(&state_path, state)?;
        Ok(())
    };

    for item in pipeline {
        wait_s += t_wait.elapsed().as_secs_f64();
        match item {
            PipelineItem::Batch(b) => {
                // Interleave skips and images by input position; encode the images in one go.
                let latents = if b.items.is_empty() {
                    Vec::new()
                } else {
                    let t0 = Instant::now();
                    let out = encode_batch(
                        vae.as_ref(),
                        &b.items,
                        &tcfg,
                        &dev,
                        &layout,
                        rec_elems,
                        variants,
                    )?;
                    vae_s += t0.elapsed().as_secs_f64();
                    out
                };
                let mut skips = b.skipped.into_iter().peekable();
                for (p, data) in b.items.iter().zip(latents) {
                    while skips.peek().is_some_and(|(pos, _)| *pos < p.seq) {
                        let (_, sk) = skips.next().expect("peeked");
                        shard_skips.push(skip_line(sk));
                    }
                    if !seen.insert(p.key.clone()) {
                        shard_skips.push(ReportLine::Skip {
                            source: p.source.clone(),
                            key: p.key.clone(),
                            offset: p.offset,
                            reason: "duplicate key: already stored from an earlier sample".into(),
                        });
                        continue;
                    }
                    let w = match writer.as_mut() {
                        Some(w) => w,
                        None => writer.insert(ShardWriter::create(
                            dir.join(format!("shard-{:06}.lmds", state.shards)),
                            meta.clone(),
                            WriterOptions::default(),
                        )?),
                    };
                    w.push_f32(
                        &p.key,
                        if cfg.require_labels { p.label } else { None },
                        &data,
                    )?;
                    written += 1;
                    last_seq = p.seq;
                    if w.len() >= cfg.records_per_shard.max(1) {
                        let w = writer.take().expect("just used");
                        commit(
                            w,
                            last_seq,
                            &mut shard_skips,
                            &mut report,
                            &mut manifest,
                            &mut state,
                        )?;
                    }
                }
                for (_, sk) in skips {
                    shard_skips.push(skip_line(sk));
                }
                progress(
                    written,
                    total,
                    b.items.last().map(|p| p.key.as_str()).unwrap_or(""),
                );
            }
            PipelineItem::ShardFailed(f) => shard_skips.push(failure_line(f)),
            PipelineItem::InputFailed(m) => {
                shard_skips.push(ReportLine::InputFailed { message: m })
            }
        }
        t_wait = Instant::now();
    }
    if let Some(w) = writer.take() {
        commit(
            w,
            last_seq,
            &mut shard_skips,
            &mut report,
            &mut manifest,
            &mut state,
        )?;
    }
    report.append(&mut shard_skips);
    write_report(&report_path, &report)?;
    if manifest.shards.is_empty() {
        manifest.save(&dir)?;
    }
    state.done = true;
    write_json(&state_path, &state)?;
    let wall = t_start.elapsed().as_secs_f64();
    let vae_ips = if vae_s > 0.0 {
        written as f64 * variants as f64 / vae_s
    } else {
        0.0
    };
    finish_summary(
        &dir,
        &manifest,
        &report,
        written,
        t_start,
        vae_ips,
        wait_s / wall.max(1e-9),
        resumed_records,
    )
}

#[allow(clippy::too_many_arguments)]
fn finish_summary(
    dir: &Path,
    manifest: &Manifest,
    report: &[ReportLine],
    written: usize,
    t_start: Instant,
    vae_ips: f64,
    wait_frac: f64,
    resumed_records: usize,
) -> Result<Summary> {
    let mut by_reason = BTreeMap::new();
    let (mut skipped, mut failed) = (0, 0);
    for l in report {
        match l {
            ReportLine::Skip { reason, .. } => {
                skipped += 1;
                *by_reason.entry(reason_class(reason)).or_insert(0) += 1;
            }
            _ => failed += 1,
        }
    }
    let wall = t_start.elapsed().as_secs_f64();
    let s = Summary {
        output: dir.to_path_buf(),
        written,
        skipped,
        skipped_by_reason: by_reason,
        failed_shards: failed,
        shards: manifest.shards.len(),
        bytes: manifest.bytes,
        bytes_per_image: if manifest.records > 0 {
            manifest.bytes as f64 / manifest.records as f64
        } else {
            0.0
        },
        wall_s: wall,
        images_per_s: written as f64 / wall.max(1e-9),
        vae_images_per_s: vae_ips,
        data_wait_fraction: wait_frac,
        resumed_records,
    };
    write_json(&dir.join("summary.json"), &s)?;
    if manifest.records == 0 {
        return Err(nothing_written(dir, report));
    }
    Ok(s)
}

/// The error of a run that wrote no record: the failed inputs named (the first few), the
/// rest in `skipped.jsonl`.
fn nothing_written(dir: &Path, report: &[ReportLine]) -> Error {
    let failures: Vec<String> = report
        .iter()
        .filter_map(|l| match l {
            ReportLine::ShardFailed {
                source,
                offset,
                message,
            } => Some(match offset {
                Some(o) => format!("{source} at byte {o}: {message}"),
                None => format!("{source}: {message}"),
            }),
            ReportLine::InputFailed { message } => Some(message.clone()),
            ReportLine::Skip { .. } => None,
        })
        .collect();
    let skipped = report.len() - failures.len();
    let shown: Vec<&str> = failures.iter().take(5).map(String::as_str).collect();
    Error::Invalid(format!(
        "no record written to {}: {} failed inputs, {skipped} skipped samples{}{} (all in {})",
        dir.display(),
        failures.len(),
        if shown.is_empty() { "" } else { ": " },
        shown.join("; "),
        dir.join("skipped.jsonl").display()
    ))
}

/// Delete `NAME.tmp-PID-N` files left in `dir` by writers that were killed (their process is
/// gone). They never open as shards, but would pile up over restarts.
fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    let me = std::process::id();
    for e in std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, "read directory", e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((_, rest)) = name.rsplit_once(".tmp-") else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = match pid {
            Some(p) if p == me => true,
            Some(p) => Path::new(&format!("/proc/{p}")).exists(),
            None => continue,
        };
        if !alive {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|err| Error::io(&p, "remove stale temporary", err))?;
        }
    }
    Ok(())
}

fn skip_line(s: Skip) -> ReportLine {
    ReportLine::Skip {
        source: s.source,
        key: s.key,
        offset: s.offset,
        reason: s.reason,
    }
}

fn failure_line(f: ShardFailure) -> ReportLine {
    ReportLine::ShardFailed {
        source: f.source,
        offset: f.offset,
        message: f.message,
    }
}

fn write_report(path: &Path, lines: &[ReportLine]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&serde_json::to_string(l).expect("serializes"));
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Encode a batch: every variant of every image through the VAE; returns one record (all
/// tensors in layout order) per image.
fn encode_batch(
    vae: &dyn Vae,
    items: &[Prepared],
    tcfg: &TransformConfig,
    dev: &Device,
    layout: &RecordLayout,
    rec_elems: usize,
    variants: usize,
) -> Result<Vec<Vec<f32>>> {
    let s = tcfg.size as usize;
    let mut flat = Vec::with_capacity(items.len() * tcfg.values_per_image());
    for p in items {
        flat.extend_from_slice(&p.pixels);
    }
    let x = Tensor::from_vec(flat, (items.len() * variants, 3, s, s), dev)?;
    let x = vae.input_range().from_unit(&x)?;
    let enc = vae.encode(&x)?;
    let to_rows = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let per_tensor = rec_elems / layout.tensors();
    let mut field_data = Vec::new();
    for f in &layout.fields {
        let t = match (f, &enc.mean_logvar) {
            (Field::Latent, _) => &enc.latent,
            (Field::Mean, Some((mean, _))) => mean,
            (Field::Logvar, Some((_, lv))) => lv,
            _ => return Err(Error::Invalid(format!("the VAE gives no {f:?}"))),
        };
        field_data.push(to_rows(t)?);
    }
    let mut out = Vec::with_capacity(items.len());
    for i in 0..items.len() {
        let mut rec = Vec::with_capacity(rec_elems);
        for v in 0..variants {
            let row = i * variants + v;
            for fd in &field_data {
                rec.extend_from_slice(&fd[row * per_tensor..(row + 1) * per_tensor]);
            }
        }
        out.push(rec);
    }
    Ok(out)
}
