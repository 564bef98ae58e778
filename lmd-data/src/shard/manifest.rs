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
use std::sync::{Arc, Mutex};

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
///
/// A shard is either open (local, or a remote dataset mirrored whole into the cache) or
/// *streamed*: listed by its manifest entry and fetched into the cache when first read
/// ([`LatentDataset::reader`]), then let go again ([`LatentDataset::release`]). Record
/// counts and block boundaries of a streamed shard come from its manifest entry and
/// `records_per_block`, and are checked against the file when it arrives.
pub struct LatentDataset {
    meta: ShardMeta,
    fingerprint: String,
    shards: Vec<Slot>,
    /// `starts[s]` = global index of shard `s`'s first record.
    starts: Vec<usize>,
    len: usize,
    stream: Option<Stream>,
}

enum Slot {
    Open(Arc<ShardReader>),
    Streamed(Streamed),
}

/// A shard of a streamed remote dataset.
struct Streamed {
    /// The shard's URL, its place in the cache, its manifest entry, and the manifest's URL.
    src: PathBuf,
    local: PathBuf,
    entry: ShardEntry,
    manifest: PathBuf,
    /// Records per block, from the first shard's header (the manifest's copy of the metadata
    /// may predate the writer's choice).
    records_per_block: usize,
    reader: Mutex<Option<Arc<ShardReader>>>,
}

/// How a streamed dataset uses its cache.
struct Stream {
    cache: crate::storage::Cache,
    /// Bytes of streamed shards the loader holds at once per group (half the limit).
    group_bytes: u64,
    /// Serialises fetches (and the eviction before each).
    fetching: Mutex<()>,
    resident: Mutex<std::collections::BTreeSet<usize>>,
    stats: Mutex<crate::storage::CacheStats>,
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
    /// read through `cache` (see [`crate::storage::Cache`]), local ones in place. When the
    /// remote datasets together fit under the cache limit (or there is none) they are mirrored
    /// whole now; otherwise they are streamed (see the type's doc).
    pub fn discover_cached(
        dirs: &[PathBuf],
        cache: &crate::storage::Cache,
    ) -> Result<(Self, crate::storage::CacheStats)> {
        let all = dataset_dirs(dirs)?;
        let remote: Vec<&PathBuf> = all
            .iter()
            .filter(|d| crate::storage::is_url(&d.to_string_lossy()))
            .collect();
        let mut stats = crate::storage::CacheStats::default();
        if remote.is_empty() {
            return Ok((Self::open_many(&all)?, stats));
        }
        let mut manifests = Vec::new();
        for d in &remote {
            manifests.push(cache.remote(d)?);
        }
        let total: u64 = manifests.iter().map(|m| m.1.bytes).sum();
        if cache.limit == 0 || total <= cache.limit {
            let mut local = Vec::new();
            for d in &all {
                if crate::storage::is_url(&d.to_string_lossy()) {
                    let (l, st) = cache.mirror(d)?;
                    stats.add(st);
                    local.push(l);
                } else {
                    local.push(d.clone());
                }
            }
            return Ok((Self::open_many(&local)?, stats));
        }
        let is_remote = |d: &Path| crate::storage::is_url(&d.to_string_lossy());
        Ok((
            Self::streamed(&all, manifests, cache, total, is_remote)?,
            stats,
        ))
    }

    /// Stream the datasets `dirs` through `cache` whatever their size: each is a URL, or a
    /// local directory standing in for one (its shards are copied into the cache as a remote
    /// one's would be downloaded). `cache.limit` must be set.
    pub fn open_streamed(dirs: &[PathBuf], cache: &crate::storage::Cache) -> Result<Self> {
        if cache.limit == 0 {
            return Err(Error::InvalidInput {
                context: cache.dir.display().to_string(),
                detail: "streaming needs a cache limit".into(),
            });
        }
        let manifests = dirs
            .iter()
            .map(|d| cache.remote(d))
            .collect::<Result<Vec<_>>>()?;
        let total = manifests.iter().map(|m| m.1.bytes).sum();
        Self::streamed(dirs, manifests, cache, total, |_| true)
    }

    /// Remote datasets too large for the cache: their shards are listed, not fetched.
    fn streamed(
        all: &[PathBuf],
        manifests: Vec<(PathBuf, Manifest, Vec<u8>)>,
        cache: &crate::storage::Cache,
        total: u64,
        is_remote: impl Fn(&Path) -> bool,
    ) -> Result<Self> {
        let group_bytes = cache.limit / 2;
        let mut manifests = manifests.into_iter();
        let mut shards = Vec::new();
        let mut first: Option<(ShardMeta, String, PathBuf)> = None;
        for d in all {
            let (m, mpath, local) = if is_remote(d) {
                let (local, m, _) = manifests.next().expect("one manifest per remote dir");
                (m, crate::storage::join(d, MANIFEST_FILE), Some(local))
            } else {
                (Manifest::load(d)?, Manifest::path_in(d), None)
            };
            check_fingerprint(&mut first, &m, &mpath)?;
            match local {
                None => {
                    for s in &m.shards {
                        let r = open_listed(d, s, &m, &mpath)?;
                        shards.push(Slot::Open(Arc::new(r)));
                    }
                }
                Some(local) => {
                    let records_per_block = match m.shards.first() {
                        Some(s) => {
                            let src = crate::storage::join(d, &s.file);
                            let mut r = crate::storage::open_read(&src)?;
                            super::read_header(&src, &mut *r)?.records_per_block
                        }
                        None => 1,
                    };
                    for s in &m.shards {
                        if s.bytes > group_bytes {
                            return Err(Error::InvalidInput {
                                context: crate::storage::join(d, &s.file).display().to_string(),
                                detail: format!(
                                    "the datasets take {total} bytes, more than the cache limit \
                                     of {} bytes, so they are streamed in groups of at most half \
                                     the limit; this shard alone takes {} bytes (raise \
                                     --cache-limit to at least {})",
                                    cache.limit,
                                    s.bytes,
                                    2 * s.bytes
                                ),
                            });
                        }
                        shards.push(Slot::Streamed(Streamed {
                            src: crate::storage::join(d, &s.file),
                            local: local.join(&s.file),
                            entry: s.clone(),
                            manifest: mpath.clone(),
                            records_per_block,
                            reader: Mutex::new(None),
                        }));
                    }
                }
            }
        }
        let (meta, fingerprint, _) = first.expect("at least one remote dataset");
        let mut ds = Self::assemble(meta, fingerprint, shards);
        ds.stream = Some(Stream {
            cache: cache.clone(),
            group_bytes,
            fetching: Mutex::new(()),
            resident: Mutex::new(Default::default()),
            stats: Mutex::new(Default::default()),
        });
        Ok(ds)
    }

    /// Open several dataset directories (e.g. the outputs of several precompute workers) as one;
    /// they must share a fingerprint.
    pub fn open_many(dirs: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut first: Option<(ShardMeta, String, PathBuf)> = None;
        for dir in dirs {
            let m = Manifest::load(dir)?;
            let mpath = Manifest::path_in(dir);
            check_fingerprint(&mut first, &m, &mpath)?;
            for s in &m.shards {
                shards.push(Slot::Open(Arc::new(open_listed(dir, s, &m, &mpath)?)));
            }
        }
        let (meta, fingerprint, _) = first.ok_or_else(|| Error::InvalidInput {
            context: "LatentDataset::open_many".into(),
            detail: "no dataset directories given".into(),
        })?;
        Ok(Self::assemble(meta, fingerprint, shards))
    }

    fn assemble(meta: ShardMeta, fingerprint: String, shards: Vec<Slot>) -> Self {
        let mut starts = Vec::with_capacity(shards.len());
        let mut len = 0;
        for s in &shards {
            starts.push(len);
            len += match s {
                Slot::Open(r) => r.len(),
                Slot::Streamed(x) => x.entry.records,
            };
        }
        LatentDataset {
            meta,
            fingerprint,
            shards,
            starts,
            len,
            stream: None,
        }
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

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// Records in shard `s`.
    pub fn shard_len(&self, s: usize) -> usize {
        let next = self.starts.get(s + 1).copied().unwrap_or(self.len);
        next - self.starts[s]
    }

    /// Bytes the cache must hold to read shard `s` (0 for a shard that is always open).
    pub fn streamed_bytes(&self, s: usize) -> u64 {
        match &self.shards[s] {
            Slot::Open(_) => 0,
            Slot::Streamed(x) => x.entry.bytes,
        }
    }

    /// Bytes of streamed shards the loader may hold per group: half the cache limit for a
    /// streamed dataset, 0 (all shards open at once) otherwise.
    pub fn group_bytes(&self) -> u64 {
        self.stream.as_ref().map_or(0, |s| s.group_bytes)
    }

    /// What the cache did for the streamed shards so far.
    pub fn cache_stats(&self) -> crate::storage::CacheStats {
        self.stream
            .as_ref()
            .map(|s| *s.stats.lock().expect("stats lock"))
            .unwrap_or_default()
    }

    /// Streamed shards currently held open.
    pub fn resident(&self) -> Vec<usize> {
        self.stream.as_ref().map_or_else(Vec::new, |s| {
            s.resident
                .lock()
                .expect("resident lock")
                .iter()
                .copied()
                .collect()
        })
    }

    /// `(first record, record count)` of every block of shard `s`, without reading it.
    pub fn block_ranges(&self, s: usize) -> Vec<(usize, usize)> {
        match &self.shards[s] {
            Slot::Open(r) => r.block_ranges(),
            Slot::Streamed(x) => uniform_blocks(x.entry.records, x.records_per_block),
        }
    }

    /// Block of record `r` of shard `s`, without reading it.
    pub fn block_of_record(&self, s: usize, r: usize) -> Result<usize> {
        match &self.shards[s] {
            Slot::Open(x) => x.block_of_record(r),
            Slot::Streamed(x) if r < x.entry.records => Ok(r / x.records_per_block.max(1)),
            Slot::Streamed(x) => Err(Error::InvalidInput {
                context: x.src.display().to_string(),
                detail: format!("record {r} out of range ({} records)", x.entry.records),
            }),
        }
    }

    /// Shard `s`, opened; a streamed shard is fetched into the cache first (verified, after
    /// evicting least-recently-used shards that are not held) and then held until
    /// [`release`](Self::release).
    pub fn reader(&self, s: usize) -> Result<Arc<ShardReader>> {
        let x = match &self.shards[s] {
            Slot::Open(r) => return Ok(r.clone()),
            Slot::Streamed(x) => x,
        };
        if let Some(r) = x.reader.lock().expect("reader lock").as_ref() {
            return Ok(r.clone());
        }
        let st = self.stream.as_ref().expect("a streamed shard has a stream");
        let _one = st.fetching.lock().expect("fetch lock");
        if let Some(r) = x.reader.lock().expect("reader lock").as_ref() {
            return Ok(r.clone());
        }
        let keep: Vec<PathBuf> = st
            .resident
            .lock()
            .expect("resident lock")
            .iter()
            .filter_map(|&k| match &self.shards[k] {
                Slot::Streamed(o) => Some(o.local.clone()),
                Slot::Open(_) => None,
            })
            .collect();
        let got = st.cache.fetch_shard(&x.src, &x.entry, &x.local, &keep)?;
        st.stats.lock().expect("stats lock").add(got);
        let r = ShardReader::open(&x.local)?;
        let fp = r.meta().fingerprint();
        let blocks = uniform_blocks(x.entry.records, x.records_per_block);
        if r.len() != x.entry.records || fp != self.fingerprint || r.block_ranges() != blocks {
            return Err(Error::Manifest {
                path: x.manifest.clone(),
                detail: format!(
                    "shard {}: {} records in {} blocks, fingerprint {fp}; the manifest says {} \
                     records ({} blocks of up to {}), fingerprint {}",
                    x.entry.file,
                    r.len(),
                    r.num_blocks(),
                    x.entry.records,
                    blocks.len(),
                    x.records_per_block,
                    self.fingerprint
                ),
            });
        }
        let r = Arc::new(r);
        *x.reader.lock().expect("reader lock") = Some(r.clone());
        st.resident.lock().expect("resident lock").insert(s);
        Ok(r)
    }

    /// Let go of a streamed shard (a no-op for an open one): its memory map is dropped once
    /// no reader is left, and its cached file may be evicted to make room for others.
    pub fn release(&self, s: usize) {
        if let (Slot::Streamed(x), Some(st)) = (&self.shards[s], &self.stream) {
            if x.reader.lock().expect("reader lock").take().is_some() {
                crate::storage::cache::touch(&x.local);
            }
            st.resident.lock().expect("resident lock").remove(&s);
        }
    }

    /// Each shard in turn (a streamed one fetched, then released): for passes over the whole
    /// dataset that need the files, such as collecting labels.
    pub fn for_each_shard(&self, mut f: impl FnMut(&ShardReader) -> Result<()>) -> Result<()> {
        for s in 0..self.shards.len() {
            let held = self.resident().contains(&s);
            let r = self.reader(s)?;
            let out = f(&r);
            if !held {
                self.release(s);
            }
            out?;
        }
        Ok(())
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
        self.reader(s)?.get(r)
    }
}

/// Blocks of `records_per_block` records, the last one shorter: how the writer cuts a shard.
fn uniform_blocks(records: usize, records_per_block: usize) -> Vec<(usize, usize)> {
    let rpb = records_per_block.max(1);
    (0..records)
        .step_by(rpb)
        .map(|f| (f, rpb.min(records - f)))
        .collect()
}

/// Remember the first manifest's metadata; refuse a later one with another fingerprint.
fn check_fingerprint(
    first: &mut Option<(ShardMeta, String, PathBuf)>,
    m: &Manifest,
    mpath: &Path,
) -> Result<()> {
    match first {
        None => *first = Some((m.meta.clone(), m.fingerprint.clone(), mpath.to_path_buf())),
        Some((meta0, fp0, p0)) if *fp0 != m.fingerprint => {
            return Err(Error::Manifest {
                path: mpath.to_path_buf(),
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
    Ok(())
}

/// Open shard `s` of `dir`, checked against its manifest entry.
fn open_listed(dir: &Path, s: &ShardEntry, m: &Manifest, mpath: &Path) -> Result<ShardReader> {
    let r = ShardReader::open(dir.join(&s.file))?;
    let fp = r.meta().fingerprint();
    if r.len() != s.records || r.file_bytes() != s.bytes || fp != m.fingerprint {
        return Err(Error::Manifest {
            path: mpath.to_path_buf(),
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
    Ok(r)
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
