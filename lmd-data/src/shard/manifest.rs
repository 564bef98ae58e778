//! Dataset directories: the `index.json` manifest and [`LatentDataset`], all shards as one.
//!
//! The manifest lists each shard's file name, record count, byte size and XXH3-128, and the
//! dataset fingerprint ([`ShardMeta::fingerprint`]). It is rewritten atomically after each shard
//! is finished, so it only ever names complete shards. A shard whose metadata has another
//! fingerprint is refused with the differing fields named.

use super::meta::ShardMeta;
use super::reader::{Record, ShardReader};
use super::writer::{write_atomic, ShardInfo};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the manifest inside a dataset directory.
pub const MANIFEST_FILE: &str = "index.json";
/// `format` value of a manifest.
pub const MANIFEST_FORMAT: &str = "lmd-latent-dataset";

/// One shard of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name relative to the dataset directory.
    pub file: String,
    pub records: usize,
    pub bytes: u64,
    /// XXH3-128 of the whole file, lowercase hex.
    pub xxh3_128: String,
}

/// The `index.json` of a dataset directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub fingerprint: String,
    pub records: usize,
    pub bytes: u64,
    /// Metadata shared by all shards (as written in the first one).
    pub meta: ShardMeta,
    pub shards: Vec<ShardEntry>,
}

impl Manifest {
    /// An empty manifest for shards with this metadata.
    pub fn new(meta: ShardMeta) -> Self {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: 1,
            fingerprint: meta.fingerprint(),
            records: 0,
            bytes: 0,
            meta,
            shards: Vec::new(),
        }
    }

    /// Path of the manifest in `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Read `dir/index.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = Self::path_in(dir);
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, "read", e))?;
        Self::from_slice(&path, &text)
    }

    /// Parse the manifest `text` read from `path` (a file or a URL, for messages).
    pub fn from_slice(path: &Path, text: &[u8]) -> Result<Self> {
        let path = path.to_path_buf();
        let m: Manifest = serde_json::from_slice(text).map_err(|e| Error::Manifest {
            path: path.clone(),
            detail: format!("invalid JSON: {e}"),
        })?;
        if m.format != MANIFEST_FORMAT || m.version != 1 {
            return Err(Error::Manifest {
                path,
                detail: format!(
                    "format {:?} version {} (expected {MANIFEST_FORMAT:?} 1)",
                    m.format, m.version
                ),
            });
        }
        Ok(m)
    }

    /// Write `dir/index.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("manifest serializes");
        write_atomic(&Self::path_in(dir), &text)
    }

    /// Add (or replace, by file name) a finished shard. Its metadata must match the dataset's.
    pub fn add(&mut self, info: &ShardInfo, meta: &ShardMeta) -> Result<()> {
        if meta.fingerprint() != self.fingerprint {
            return Err(Error::Manifest {
                path: info.path.clone(),
                detail: format!(
                    "shard does not match the dataset (fingerprint {} vs {}): {}",
                    meta.fingerprint(),
                    self.fingerprint,
                    self.meta.differences(meta).join("; ")
                ),
            });
        }
        let file = info
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.shards.retain(|s| s.file != file);
        self.shards.push(ShardEntry {
            file,
            records: info.records,
            bytes: info.bytes,
            xxh3_128: info.xxh3_128.clone(),
        });
        self.shards.sort_by(|a, b| a.file.cmp(&b.file));
        self.records = self.shards.iter().map(|s| s.records).sum();
        self.bytes = self.shards.iter().map(|s| s.bytes).sum();
        Ok(())
    }

    /// Rebuild a manifest by opening every `*.lmds` file in `dir` (sorted by name). Files that
    /// do not open as complete shards (e.g. left-over temporaries) are returned as errors
    /// beside the manifest, not added.
    pub fn scan(dir: &Path) -> Result<(Option<Manifest>, Vec<Error>)> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, "read directory", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == super::format::EXTENSION))
            .collect();
        names.sort();
        let mut manifest: Option<Manifest> = None;
        let mut errors = Vec::new();
        for p in names {
            match ShardReader::open(&p).and_then(|r| {
                let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, "read", e))?;
                let info = ShardInfo {
                    path: p.clone(),
                    records: r.len(),
                    bytes: bytes.len() as u64,
                    xxh3_128: format!("{:032x}", super::format::checksum128(&bytes)),
                };
                let m = manifest.get_or_insert_with(|| Manifest::new(r.meta().clone()));
                m.add(&info, r.meta())
            }) {
                Ok(()) => {}
                Err(e) => errors.push(e),
            }
        }
        Ok((manifest, errors))
    }
}

/// All shards of one or more dataset directories as one indexable collection
/// (`Dataset { get, len }` in the burn sense).
pub struct LatentDataset {
    meta: ShardMeta,
    fingerprint: String,
    shards: Vec<ShardReader>,
    /// `starts[s]` = global index of shard `s`'s first record.
    starts: Vec<usize>,
    len: usize,
}

impl LatentDataset {
    /// Open the dataset in `dir` through its manifest; each shard must exist with the listed
    /// record count, size and fingerprint.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_many(&[dir.as_ref().to_path_buf()])
    }

    /// Open what the programs are given as data: each of `dirs` is a dataset directory (with
    /// `index.json`) or a precompute output whose `worker-*` subdirectories are datasets (in name
    /// order). Used by training, fine-tuning, evaluation and the benchmarks alike.
    pub fn discover(dirs: &[PathBuf]) -> Result<Self> {
        Ok(Self::discover_cached(dirs, &crate::storage::Cache::default())?.0)
    }

    /// [`discover`](Self::discover) where any of `dirs` may be a URL: remote datasets are
    /// read through `cache` (see [`crate::storage::Cache`]), local ones in place.
    pub fn discover_cached(
        dirs: &[PathBuf],
        cache: &crate::storage::Cache,
    ) -> Result<(Self, crate::storage::CacheStats)> {
        let mut local = Vec::new();
        let mut stats = crate::storage::CacheStats::default();
        for d in dataset_dirs(dirs)? {
            if crate::storage::is_url(&d.to_string_lossy()) {
                let (l, st) = cache.mirror(&d)?;
                stats.hits += st.hits;
                stats.fetched += st.fetched;
                stats.bytes_fetched += st.bytes_fetched;
                stats.evicted += st.evicted;
                local.push(l);
            } else {
                local.push(d);
            }
        }
        Ok((Self::open_many(&local)?, stats))
    }

    /// Open several dataset directories (e.g. the outputs of several precompute workers) as one;
    /// they must share a fingerprint.
    pub fn open_many(dirs: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut first: Option<(ShardMeta, String, PathBuf)> = None;
        for dir in dirs {
            let m = Manifest::load(dir)?;
            let mpath = Manifest::path_in(dir);
            match &first {
                None => first = Some((m.meta.clone(), m.fingerprint.clone(), mpath.clone())),
                Some((meta0, fp0, p0)) if *fp0 != m.fingerprint => {
                    return Err(Error::Manifest {
                        path: mpath,
                        detail: format!(
                            "fingerprint {} differs from {} ({}): {}",
                            m.fingerprint,
                            fp0,
                            p0.display(),
                            meta0.differences(&m.meta).join("; ")
                        ),
                    })
                }
                Some(_) => {}
            }
            for s in &m.shards {
                let p = dir.join(&s.file);
                let r = ShardReader::open(&p)?;
                let fp = r.meta().fingerprint();
                if r.len() != s.records || r.file_bytes() != s.bytes || fp != m.fingerprint {
                    return Err(Error::Manifest {
                        path: mpath.clone(),
                        detail: format!(
                            "shard {}: {} records, {} bytes, fingerprint {fp}; manifest says {} records, {} bytes, fingerprint {}",
                            s.file,
                            r.len(),
                            r.file_bytes(),
                            s.records,
                            s.bytes,
                            m.fingerprint
                        ),
                    });
                }
                shards.push(r);
            }
        }
        let (meta, fingerprint, _) = first.ok_or_else(|| Error::InvalidInput {
            context: "LatentDataset::open_many".into(),
            detail: "no dataset directories given".into(),
        })?;
        let mut starts = Vec::with_capacity(shards.len());
        let mut len = 0;
        for s in &shards {
            starts.push(len);
            len += s.len();
        }
        Ok(LatentDataset {
            meta,
            fingerprint,
            shards,
            starts,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn shards(&self) -> &[ShardReader] {
        &self.shards
    }

    /// (shard, record within shard) of global index `i`.
    pub fn locate(&self, i: usize) -> Result<(usize, usize)> {
        if i >= self.len {
            return Err(Error::InvalidInput {
                context: "LatentDataset".into(),
                detail: format!("record {i} out of range ({} records)", self.len),
            });
        }
        let s = self.starts.partition_point(|&st| st <= i) - 1;
        Ok((s, i - self.starts[s]))
    }

    /// Record `i` of the whole dataset.
    pub fn get(&self, i: usize) -> Result<Record> {
        let (s, r) = self.locate(i)?;
        self.shards[s].get(r)
    }
}

/// The dataset directories `dirs` stand for: a directory with `index.json` itself, else its
/// subdirectories that have one (a multi-worker precompute output), sorted; a directory with
/// neither is an error naming it.
pub fn dataset_dirs(dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut all = Vec::new();
    for d in dirs {
        if crate::storage::is_url(&d.to_string_lossy()) {
            // a dataset prefix, or a precompute output with worker-* datasets under it
            let prefix = format!("{}/", d.to_string_lossy().trim_end_matches('/'));
            let mut found: Vec<PathBuf> = crate::storage::list(&prefix)?
                .into_iter()
                .filter_map(|o| {
                    let s = o.location.to_string_lossy().into_owned();
                    let rest = s.strip_prefix(&prefix)?.strip_suffix(MANIFEST_FILE)?;
                    (rest.is_empty()
                        || (rest.ends_with('/') && !rest[..rest.len() - 1].contains('/')))
                    .then(|| PathBuf::from(s.trim_end_matches(MANIFEST_FILE).trim_end_matches('/')))
                })
                .collect();
            found.sort();
            if found
                .first()
                .is_some_and(|f| f.to_string_lossy() == prefix.trim_end_matches('/'))
            {
                found.truncate(1);
            }
            if found.is_empty() {
                return Err(Error::InvalidInput {
                    context: d.display().to_string(),
                    detail: format!("no {MANIFEST_FILE} under it (not a latent dataset)"),
                });
            }
            all.extend(found);
            continue;
        }
        if d.join(MANIFEST_FILE).exists() {
            all.push(d.clone());
            continue;
        }
        let mut subs: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| Error::io(d, "read directory", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join(MANIFEST_FILE).exists())
            .collect();
        subs.sort();
        if subs.is_empty() {
            return Err(Error::InvalidInput {
                context: d.display().to_string(),
                detail: format!("no {MANIFEST_FILE} (not a latent dataset)"),
            });
        }
        all.extend(subs);
    }
    Ok(all)
}
