//! `lmd-inspect`: summarise a shard or a dataset directory, and optionally verify every block.

use crate::Result;
use lmd_data::shard::{Manifest, ShardMeta, ShardReader, MANIFEST_FILE};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What to inspect.
#[derive(Debug, Clone)]
pub struct InspectOptions {
    /// A `.lmds` shard, or a dataset directory (with `index.json`, or loose shards).
    pub path: PathBuf,
    /// Check every block's checksum and, for a dataset, every shard's size and hash.
    pub verify: bool,
}

/// One problem found by `--verify` (or while opening).
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub shard: String,
    pub error: String,
}

/// The summary `lmd-inspect` prints (`--json` prints it as one object).
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub path: String,
    /// `shard` or `dataset`.
    pub kind: &'static str,
    pub records: usize,
    pub shards: usize,
    pub blocks: usize,
    pub latent_shape: [usize; 3],
    pub dtype: String,
    pub layout: serde_json::Value,
    pub labels: bool,
    /// Distinct label values (when labelled).
    pub classes: Option<usize>,
    pub vae: serde_json::Value,
    pub preprocessing: serde_json::Value,
    pub scaling: serde_json::Value,
    pub writer: String,
    pub fingerprint: String,
    pub bytes: u64,
    pub bytes_per_record: f64,
    /// `bytes_per_record` over the bytes of the same tensors as raw f32.
    pub ratio_vs_f32: f64,
    pub first_keys: Vec<String>,
    /// Whether `--verify` ran.
    pub verified: bool,
    pub problems: Vec<Problem>,
}

impl InspectReport {
    /// Whether nothing bad was found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

fn shards_of(dir: &Path) -> Result<(Vec<PathBuf>, Option<Manifest>, Vec<Problem>)> {
    let mpath = dir.join(MANIFEST_FILE);
    if mpath.exists() {
        let m = Manifest::load(dir)?;
        let paths = m.shards.iter().map(|s| dir.join(&s.file)).collect();
        return Ok((paths, Some(m), Vec::new()));
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| crate::Error::io(dir, "read directory", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == lmd_data::shard::format::EXTENSION)
        })
        .collect();
    paths.sort();
    let problems = vec![Problem {
        shard: mpath.display().to_string(),
        error: "no index.json: listing the loose .lmds files (an unfinished precompute?)".into(),
    }];
    Ok((paths, None, problems))
}

/// Inspect a shard or dataset. Errors only when nothing can be read at all; damaged shards are
/// listed in `problems`.
pub fn run(opts: &InspectOptions) -> Result<InspectReport> {
    if lmd_data::storage::is_url(&opts.path.to_string_lossy()) {
        // a remote shard is fetched to a temporary file, a remote dataset through the cache
        let tmp = std::env::temp_dir().join(format!("lmd-inspect-{}", std::process::id()));
        let local = if opts
            .path
            .extension()
            .is_some_and(|x| x == lmd_data::shard::format::EXTENSION)
        {
            std::fs::create_dir_all(&tmp).map_err(|e| crate::Error::io(&tmp, "create", e))?;
            let p = tmp.join(opts.path.file_name().unwrap_or_default());
            lmd_data::storage::download(&opts.path, &p)?;
            p
        } else {
            lmd_data::storage::Cache::default().mirror(&opts.path)?.0
        };
        let report = run(&InspectOptions {
            path: local,
            ..opts.clone()
        });
        let _ = std::fs::remove_dir_all(&tmp);
        let mut report = report?;
        report.path = opts.path.display().to_string();
        return Ok(report);
    }
    let is_dir = opts.path.is_dir();
    let (paths, manifest, mut problems) = if is_dir {
        shards_of(&opts.path)?
    } else {
        // a path that is not there is one error, not a shard problem
        std::fs::metadata(&opts.path).map_err(|e| crate::Error::io(&opts.path, "open", e))?;
        (vec![opts.path.clone()], None, Vec::new())
    };
    let mut meta: Option<ShardMeta> = None;
    let (mut records, mut blocks, mut bytes) = (0usize, 0usize, 0u64);
    let mut classes = std::collections::BTreeSet::new();
    let mut first_keys = Vec::new();
    let mut opened = 0usize;
    for p in &paths {
        let name = p.display().to_string();
        let r = match ShardReader::open(p) {
            Ok(r) => r,
            Err(e) => {
                problems.push(Problem {
                    shard: name,
                    error: e.to_string(),
                });
                continue;
            }
        };
        opened += 1;
        let m0 = meta.get_or_insert_with(|| r.meta().clone());
        let diff = m0.differences(r.meta());
        if !diff.is_empty() {
            problems.push(Problem {
                shard: name.clone(),
                error: format!("metadata differs from the first shard: {}", diff.join("; ")),
            });
        }
        records += r.len();
        blocks += r.num_blocks();
        bytes += r.file_bytes();
        if let Some(l) = r.labels() {
            classes.extend(l.iter().copied());
        }
        for i in 0..r.len().min(3usize.saturating_sub(first_keys.len())) {
            first_keys.push(r.key(i)?.to_owned());
        }
        if opts.verify {
            problems.extend(verify_shard(&r, manifest.as_ref())?);
        }
    }
    let Some(meta) = meta else {
        return Err(crate::Error::Invalid(format!(
            "{}: no readable shard ({})",
            opts.path.display(),
            problems
                .iter()
                .map(|p| format!("{}: {}", p.shard, p.error))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    };
    match &manifest {
        Some(m) if m.fingerprint != meta.fingerprint() => problems.push(Problem {
            shard: opts.path.join(MANIFEST_FILE).display().to_string(),
            error: format!(
                "fingerprint {} differs from the shards' {}",
                m.fingerprint,
                meta.fingerprint()
            ),
        }),
        _ => {}
    }
    let f32_bytes = (meta.record_elems() * 4) as f64;
    let bpr = ratio(bytes as f64, records as f64);
    Ok(InspectReport {
        path: opts.path.display().to_string(),
        kind: if is_dir { "dataset" } else { "shard" },
        records,
        shards: opened,
        blocks,
        latent_shape: meta.latent_shape,
        dtype: meta.dtype.to_string(),
        layout: serde_json::to_value(&meta.layout).expect("serializes"),
        labels: meta.labels,
        classes: meta.labels.then_some(classes.len()),
        vae: serde_json::to_value(&meta.vae).expect("serializes"),
        preprocessing: serde_json::to_value(&meta.preprocessing).expect("serializes"),
        scaling: serde_json::to_value(&meta.scaling).expect("serializes"),
        writer: meta.writer.clone(),
        fingerprint: meta.fingerprint(),
        bytes,
        bytes_per_record: bpr,
        ratio_vs_f32: ratio(bpr, f32_bytes),
        first_keys,
        verified: opts.verify,
        problems,
    })
}

/// `a / b`, or 0 for an empty denominator.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// `--verify` on one shard: every block's checksum, and the file against `index.json`.
fn verify_shard(
    r: &ShardReader,
    manifest: Option<&lmd_data::shard::Manifest>,
) -> Result<Vec<Problem>> {
    let shard = r.path().display().to_string();
    let mut problems: Vec<Problem> = (r.verify().errors.iter())
        .map(|e| Problem {
            shard: shard.clone(),
            error: e.to_string(),
        })
        .collect();
    if let Some(m) = manifest {
        problems.extend(check_file_hash(r.path(), m)?);
    }
    Ok(problems)
}

/// A shard's file hash and size against its `index.json` entry: a problem when they differ.
fn check_file_hash(p: &std::path::Path, m: &lmd_data::shard::Manifest) -> Result<Option<Problem>> {
    let file = p
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(entry) = m.shards.iter().find(|s| s.file == file) else {
        return Ok(None);
    };
    let data = std::fs::read(p).map_err(|e| crate::Error::io(p, "read", e))?;
    let h = format!("{:032x}", lmd_data::shard::format::checksum128(&data));
    Ok(
        (h != entry.xxh3_128 || data.len() as u64 != entry.bytes).then(|| Problem {
            shard: p.display().to_string(),
            error: format!(
                "file hash/size {h}/{} differs from index.json's {}/{}",
                data.len(),
                entry.xxh3_128,
                entry.bytes
            ),
        }),
    )
}

impl std::fmt::Display for InspectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [c, h, w] = self.latent_shape;
        writeln!(f, "{} ({})", self.path, self.kind)?;
        writeln!(
            f,
            "  records      {} in {} shard(s), {} block(s)",
            self.records, self.shards, self.blocks
        )?;
        writeln!(
            f,
            "  latent       {c}x{h}x{w} {}, layout {}",
            self.dtype, self.layout
        )?;
        match self.classes {
            Some(n) => writeln!(f, "  labels       yes, {n} distinct")?,
            None => writeln!(f, "  labels       no")?,
        }
        let vae_name = self.vae.get("name").and_then(|v| v.as_str()).unwrap_or("?");
        writeln!(f, "  vae          {vae_name}")?;
        if let Some(ws) = self.vae.get("weights").and_then(|v| v.as_array()) {
            for wf in ws {
                writeln!(
                    f,
                    "               {} sha256 {}",
                    wf.get("file").and_then(|v| v.as_str()).unwrap_or("?"),
                    wf.get("sha256").and_then(|v| v.as_str()).unwrap_or("?")
                )?;
            }
        }
        writeln!(f, "  preprocess   {}", self.preprocessing)?;
        writeln!(f, "  scaling      {}", self.scaling)?;
        writeln!(f, "  writer       {}", self.writer)?;
        writeln!(f, "  fingerprint  {}", self.fingerprint)?;
        writeln!(
            f,
            "  size         {} bytes, {:.1} bytes/record ({:.3}x raw f32)",
            self.bytes, self.bytes_per_record, self.ratio_vs_f32
        )?;
        writeln!(f, "  first keys   {}", self.first_keys.join(", "))?;
        if self.verified {
            if self.problems.is_empty() {
                writeln!(f, "  verify       OK: every block's checksum matches")?;
            } else {
                writeln!(f, "  verify       {} problem(s)", self.problems.len())?;
            }
        }
        for p in &self.problems {
            writeln!(f, "  PROBLEM      {}: {}", p.shard, p.error)?;
        }
        Ok(())
    }
}
