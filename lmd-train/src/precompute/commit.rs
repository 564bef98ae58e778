//! Stage 4, commit: records into shards, and the resume state beside them.
//!
//! Rules (see the module above for the output layout): a shard is finished atomically every
//! `records_per_shard` records; then the skip report, the manifest and the state (the input
//! position after the shard's last sample) are rewritten atomically, in that order. Opening an
//! output resumes it: only the shards the state vouches for are kept, their keys are known
//! (a key seen twice is stored once, the repeat reported), and a different configuration is
//! refused, naming each difference.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use lmd_data::pipeline::{Batch, Prepared};
use lmd_data::shard::{
    writer::write_atomic, Manifest, ShardMeta, ShardWriter, WriterOptions, MANIFEST_FILE,
};
use lmd_data::source::{ShardFailure, Skip};
use lmd_data::storage;
use serde::Deserialize;

use super::{reason_class, PrecomputeConfig, ReportLine, State, Summary};
use crate::run_dir::write_json;
use crate::{Error, Result};

/// Files of an output directory beside the shards, published in this order after each shard.
const REPORT: &str = "skipped.jsonl";
const STATE: &str = "state.json";
const CONFIG: &str = "precompute.json";
const SUMMARY: &str = "summary.json";

/// A worker's output directory, open for appending records.
pub(super) struct Output<'a> {
    cfg: &'a PrecomputeConfig,
    meta: ShardMeta,
    /// Where files are written first (the destination itself when it is local).
    dir: PathBuf,
    /// The destination when it is a URL: each file is uploaded from `dir` once complete.
    remote: Option<PathBuf>,
    pub(super) manifest: Manifest,
    pub(super) state: State,
    report: Vec<ReportLine>,
    /// Report lines of the shard being written (committed with it).
    pending: Vec<ReportLine>,
    seen: HashSet<String>,
    writer: Option<ShardWriter>,
    /// Input position of the last record pushed.
    last_seq: u64,
    pub(super) written: usize,
    pub(super) resumed_records: usize,
}

impl<'a> Output<'a> {
    /// Open (or resume) `cfg.worker_dir()` for shards described by `meta`.
    pub(super) fn open(cfg: &'a PrecomputeConfig, meta: &ShardMeta) -> Result<Self> {
        let dest = cfg.worker_dir();
        let remote = storage::is_url(&dest.to_string_lossy()).then(|| dest.clone());
        let dir = match &remote {
            Some(url) => cfg.staging_dir(url),
            None => dest,
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create directory", e))?;
        remove_stale_temporaries(&dir)?;
        if let Some(url) = &remote {
            // the destination's files are the truth: a rerun anywhere resumes from them
            for name in [CONFIG, STATE, MANIFEST_FILE, REPORT] {
                let local = dir.join(name);
                match storage::read_opt(&storage::join(url, name))? {
                    Some(b) => write_atomic(&local, &b)?,
                    None => storage::remove(&local)?,
                }
            }
        }
        refuse_other_config(&dir, cfg)?;
        let mut manifest = match Manifest::load(&dir) {
            Ok(m) => {
                if m.fingerprint != meta.fingerprint() {
                    return Err(Error::Invalid(format!(
                        "{}: existing shards were made differently ({}); refusing to mix",
                        dir.display(),
                        m.meta.differences(meta).join("; ")
                    )));
                }
                m
            }
            Err(_) => Manifest::new(meta.clone()),
        };
        write_json(&dir.join(CONFIG), cfg)?;
        publish(&dir, remote.as_deref(), CONFIG)?;
        let state: State = read_json(&dir.join(STATE))?.unwrap_or_default();
        // Keep only the shards the state vouches for (a later one may be rewritten identically).
        manifest.shards.truncate(state.shards);
        let report: Vec<ReportLine> = match std::fs::read_to_string(dir.join(REPORT)) {
            Ok(t) => t
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect(),
            Err(_) => Vec::new(),
        };
        // Keys already stored (a key seen twice, e.g. the same image in two shards, is stored
        // once and the repeat reported as a skip).
        let mut seen = HashSet::new();
        for e in &manifest.shards {
            let local = dir.join(&e.file);
            if let Some(url) = &remote {
                // committed shards live at the destination: fetch each once for its keys
                storage::download(&storage::join(url, &e.file), &local)?;
            }
            let r = lmd_data::shard::ShardReader::open(&local)?;
            for i in 0..r.len() {
                seen.insert(r.key(i)?.to_string());
            }
            if remote.is_some() {
                drop(r);
                storage::remove(&local)?;
            }
        }
        Ok(Output {
            cfg,
            meta: meta.clone(),
            manifest,
            report,
            pending: Vec::new(),
            seen,
            writer: None,
            last_seq: state.next_seq,
            written: 0,
            resumed_records: state.records,
            state,
            dir,
            remote,
        })
    }

    /// A decoded batch and its records: skips and images in input order.
    pub(super) fn add_batch(&mut self, b: Batch, records: Vec<Vec<f32>>) -> Result<()> {
        let mut skips = b.skipped.into_iter().peekable();
        for (p, data) in b.items.iter().zip(records) {
            while skips.peek().is_some_and(|(pos, _)| *pos < p.seq) {
                let (_, sk) = skips.next().expect("peeked");
                self.pending.push(skip_line(sk));
            }
            self.push(p, &data)?;
        }
        for (_, sk) in skips {
            self.pending.push(skip_line(sk));
        }
        Ok(())
    }

    fn push(&mut self, p: &Prepared, data: &[f32]) -> Result<()> {
        if !self.seen.insert(p.key.clone()) {
            self.pending.push(ReportLine::Skip {
                source: p.source.clone(),
                key: p.key.clone(),
                offset: p.offset,
                reason: "duplicate key: already stored from an earlier sample".into(),
            });
            return Ok(());
        }
        let w = match self.writer.as_mut() {
            Some(w) => w,
            None => self.writer.insert(ShardWriter::create(
                self.dir
                    .join(format!("shard-{:06}.lmds", self.state.shards)),
                self.meta.clone(),
                WriterOptions::default(),
            )?),
        };
        let label = if self.cfg.require_labels {
            p.label
        } else {
            None
        };
        w.push_f32(&p.key, label, data)?;
        self.written += 1;
        self.last_seq = p.seq;
        if w.len() >= self.cfg.records_per_shard.max(1) {
            self.commit()?;
        }
        Ok(())
    }

    /// An input shard that failed part-way, or an input that could not be opened.
    pub(super) fn failed(&mut self, line: ReportLine) {
        self.pending.push(line);
    }

    /// Finish the current shard, then the report, manifest and state, in that order.
    fn commit(&mut self) -> Result<()> {
        let Some(w) = self.writer.take() else {
            return Ok(());
        };
        let wmeta = w.meta().clone();
        let info = w.finish()?;
        let file = info
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // the shard is complete at the destination before anything names it
        self.publish(&file)?;
        self.report.append(&mut self.pending);
        write_report(&self.dir.join(REPORT), &self.report)?;
        self.publish(REPORT)?;
        self.manifest.add(&info, &wmeta)?;
        self.manifest.save(&self.dir)?;
        self.publish(MANIFEST_FILE)?;
        self.state.shards += 1;
        self.state.records += info.records;
        self.state.next_seq = self.last_seq + 1;
        write_json(&self.dir.join(STATE), &self.state)?;
        self.publish(STATE)?;
        if self.remote.is_some() {
            storage::remove(&self.dir.join(&file))?;
        }
        Ok(())
    }

    /// Upload `dir/name` to the remote destination (nothing for a local one).
    fn publish(&self, name: &str) -> Result<()> {
        publish(&self.dir, self.remote.as_deref(), name)
    }

    /// The last shard, the final report, `done` in the state, and the summary.
    pub(super) fn finish(
        mut self,
        t_start: Instant,
        rates: super::StageRates,
        split: super::Split,
    ) -> Result<Summary> {
        if !self.state.done {
            self.commit()?;
            self.report.append(&mut self.pending);
            write_report(&self.dir.join(REPORT), &self.report)?;
            self.publish(REPORT)?;
            if self.manifest.shards.is_empty() {
                self.manifest.save(&self.dir)?;
                self.publish(MANIFEST_FILE)?;
            }
            self.state.done = true;
            write_json(&self.dir.join(STATE), &self.state)?;
            self.publish(STATE)?;
        }
        self.summary(t_start, rates, split)
    }

    fn summary(
        &self,
        t_start: Instant,
        rates: super::StageRates,
        split: super::Split,
    ) -> Result<Summary> {
        let mut by_reason = BTreeMap::new();
        let (mut skipped, mut failed) = (0, 0);
        for l in &self.report {
            match l {
                ReportLine::Skip { reason, .. } => {
                    skipped += 1;
                    *by_reason.entry(reason_class(reason)).or_insert(0) += 1;
                }
                _ => failed += 1,
            }
        }
        let wall = t_start.elapsed().as_secs_f64();
        let m = &self.manifest;
        let s = Summary {
            output: self.remote.clone().unwrap_or_else(|| self.dir.clone()),
            written: self.written,
            skipped,
            skipped_by_reason: by_reason,
            failed_shards: failed,
            shards: m.shards.len(),
            bytes: m.bytes,
            bytes_per_image: if m.records > 0 {
                m.bytes as f64 / m.records as f64
            } else {
                0.0
            },
            wall_s: wall,
            images_per_s: self.written as f64 / wall.max(1e-9),
            rates,
            resumed_records: self.resumed_records,
            split,
        };
        write_json(&self.dir.join(SUMMARY), &s)?;
        self.publish(SUMMARY)?;
        if m.records == 0 {
            return Err(nothing_written(&s.output, &self.report));
        }
        Ok(s)
    }
}

/// Refuse to mix with an earlier run of another configuration, naming the differences.
fn refuse_other_config(dir: &Path, cfg: &PrecomputeConfig) -> Result<()> {
    let Some(old) = read_json::<PrecomputeConfig>(&dir.join("precompute.json"))? else {
        return Ok(());
    };
    let (a, b) = (old.resume_key(), cfg.resume_key());
    if a == b {
        return Ok(());
    }
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
    Err(Error::Invalid(format!(
        "{} holds the output of another configuration; refusing to mix ({}). Use another --output or remove it.",
        dir.display(),
        diffs.join("; ")
    )))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, "read", e)),
    }
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
        storage::join(dir, REPORT).display()
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

pub(super) fn skip_line(s: Skip) -> ReportLine {
    ReportLine::Skip {
        source: s.source,
        key: s.key,
        offset: s.offset,
        reason: s.reason,
    }
}

pub(super) fn failure_line(f: ShardFailure) -> ReportLine {
    ReportLine::ShardFailed {
        source: f.source,
        offset: f.offset,
        message: f.message,
    }
}

/// Upload `dir/name` to `remote/name` when the destination is remote.
fn publish(dir: &Path, remote: Option<&Path>, name: &str) -> Result<()> {
    match remote {
        Some(url) => Ok(storage::upload(&dir.join(name), &storage::join(url, name))?),
        None => Ok(()),
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
