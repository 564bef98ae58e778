//! Writing one shard, atomically.
//!
//! Rules: records stream in through [`ShardWriter::push_f32`] / [`ShardWriter::push_raw`]; a block
//! is compressed and written as soon as it fills, so memory stays at one block. Everything goes to
//! a temporary file `<name>.tmp-<pid>-<n>` beside the target; [`ShardWriter::finish`] writes the
//! index and footer, fsyncs, renames to the final name and fsyncs the directory. A writer dropped
//! before `finish` deletes its temporary file; a process killed mid-write leaves only a `.tmp-*`
//! file, which has no footer and never opens as a complete shard.

use super::format::{self, BLOCK_MAGIC, END_MAGIC, FLAG_LABELS, MAGIC, VERSION};
use super::meta::ShardMeta;
use super::shuffle;
use crate::{Error, Result};
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Target uncompressed block size when `records_per_block` is not given.
pub const DEFAULT_BLOCK_BYTES: usize = 128 * 1024;
/// Default zstd level: fast to write, and decompression speed hardly depends on it.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// How records are packed (does not change the stored values or the fingerprint).
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Records per block; `None` picks enough for about [`DEFAULT_BLOCK_BYTES`].
    pub records_per_block: Option<usize>,
    pub zstd_level: i32,
    pub byte_shuffle: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            records_per_block: None,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            byte_shuffle: true,
        }
    }
}

/// What a finished shard is: the manifest entry's raw material.
#[derive(Debug, Clone)]
pub struct ShardInfo {
    pub path: PathBuf,
    pub records: usize,
    pub bytes: u64,
    /// XXH3-128 of the whole file, hex.
    pub xxh3_128: String,
}

struct BlockEntry {
    offset: u64,
    comp_len: u32,
    n_records: u32,
    checksum: u64,
}

/// Streams records into one shard file. See the module docs for the atomicity rules.
pub struct ShardWriter {
    final_path: PathBuf,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    offset: u64,
    meta: ShardMeta,
    record_bytes: usize,
    block_raw: Vec<u8>,
    block_records: usize,
    scratch: Vec<u8>,
    compressor: zstd::bulk::Compressor<'static>,
    blocks: Vec<BlockEntry>,
    labels: Vec<i64>,
    key_ends: Vec<u32>,
    keys: Vec<u8>,
    seen: HashSet<String>,
    hasher: xxhash_rust::xxh3::Xxh3,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl ShardWriter {
    /// Start a shard at `path` (written under a temporary name until [`finish`](Self::finish)).
    pub fn create(
        path: impl AsRef<Path>,
        mut meta: ShardMeta,
        opts: WriterOptions,
    ) -> Result<Self> {
        let final_path = path.as_ref().to_path_buf();
        let ctx = final_path.display().to_string();
        if meta.tensor_elems() == 0 || meta.layout.tensors() == 0 {
            return Err(Error::InvalidInput {
                context: ctx,
                detail: format!(
                    "empty records: latent_shape {:?}, {} tensors per record",
                    meta.latent_shape,
                    meta.layout.tensors()
                ),
            });
        }
        let record_bytes = meta.record_bytes();
        meta.records_per_block = opts
            .records_per_block
            .unwrap_or_else(|| (DEFAULT_BLOCK_BYTES / record_bytes).max(1))
            .max(1);
        meta.byte_shuffle = opts.byte_shuffle;
        meta.zstd_level = opts.zstd_level;
        let name = final_path
            .file_name()
            .ok_or_else(|| Error::InvalidInput {
                context: ctx.clone(),
                detail: "shard path has no file name".into(),
            })?
            .to_string_lossy()
            .into_owned();
        let tmp_path = final_path.with_file_name(format!(
            "{name}.tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&tmp_path).map_err(|e| Error::io(&tmp_path, "create", e))?;
        let compressor = zstd::bulk::Compressor::new(opts.zstd_level)
            .map_err(|e| Error::io(&tmp_path, "zstd init", e))?;
        let mut w = ShardWriter {
            final_path,
            tmp_path,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            offset: 0,
            record_bytes,
            block_raw: Vec::with_capacity(record_bytes * meta.records_per_block),
            block_records: 0,
            scratch: Vec::new(),
            compressor,
            blocks: Vec::new(),
            labels: Vec::new(),
            key_ends: Vec::new(),
            keys: Vec::new(),
            seen: HashSet::new(),
            hasher: xxhash_rust::xxh3::Xxh3::new(),
            meta,
        };
        let meta_json = serde_json::to_vec(&w.meta).expect("metadata serializes");
        let mut head = Vec::with_capacity(format::HEADER_FIXED + meta_json.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(meta_json.len() as u32).to_le_bytes());
        head.extend_from_slice(&format::checksum(&meta_json).to_le_bytes());
        head.extend_from_slice(&meta_json);
        w.write(&head)?;
        Ok(w)
    }

    /// The metadata being written (with the packing fields resolved).
    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }

    /// Records pushed so far.
    pub fn len(&self) -> usize {
        self.key_ends.len()
    }

    /// Whether no record was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.key_ends.is_empty()
    }

    /// The path the shard will have once finished.
    pub fn path(&self) -> &Path {
        &self.final_path
    }

    /// Append a record given as f32 values (converted to the shard's dtype):
    /// `record_elems()` values, tensors in layout order.
    pub fn push_f32(&mut self, key: &str, label: Option<i64>, data: &[f32]) -> Result<()> {
        let want = self.meta.record_elems();
        if data.len() != want {
            return Err(self.invalid(format!(
                "record {key:?}: {} values, expected {want} ({} tensors of {:?})",
                data.len(),
                self.meta.layout.tensors(),
                self.meta.latent_shape
            )));
        }
        self.check_record(key, label)?;
        self.meta.dtype.encode_f32(data, &mut self.block_raw);
        self.commit_record(key, label)
    }

    /// Append a record given as little-endian bytes already in the shard's dtype.
    pub fn push_raw(&mut self, key: &str, label: Option<i64>, bytes: &[u8]) -> Result<()> {
        if bytes.len() != self.record_bytes {
            return Err(self.invalid(format!(
                "record {key:?}: {} bytes, expected {}",
                bytes.len(),
                self.record_bytes
            )));
        }
        self.check_record(key, label)?;
        self.block_raw.extend_from_slice(bytes);
        self.commit_record(key, label)
    }

    fn invalid(&self, detail: String) -> Error {
        Error::InvalidInput {
            context: self.final_path.display().to_string(),
            detail,
        }
    }

    fn check_record(&self, key: &str, label: Option<i64>) -> Result<()> {
        if self.out.is_none() {
            return Err(self.invalid("writer already failed; start a new shard".into()));
        }
        if key.is_empty() {
            return Err(self.invalid("empty sample key".into()));
        }
        if label.is_some() != self.meta.labels {
            return Err(self.invalid(format!(
                "record {key:?}: label {label:?} but the shard metadata says labels={}",
                self.meta.labels
            )));
        }
        if self.seen.contains(key) {
            return Err(self.invalid(format!("duplicate sample key {key:?}")));
        }
        if self.keys.len() + key.len() > u32::MAX as usize {
            return Err(self.invalid("more than 4 GiB of keys in one shard".into()));
        }
        Ok(())
    }

    fn commit_record(&mut self, key: &str, label: Option<i64>) -> Result<()> {
        self.seen.insert(key.to_owned());
        self.keys.extend_from_slice(key.as_bytes());
        self.key_ends.push(self.keys.len() as u32);
        if let Some(l) = label {
            self.labels.push(l);
        }
        self.block_records += 1;
        if self.block_records == self.meta.records_per_block {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> Result<()> {
        if self.block_records == 0 {
            return Ok(());
        }
        // With byte shuffling each byte plane is its own zstd frame (concatenated): zstd's
        // literal entropy coder then fits one table per plane instead of one for the mix.
        let comp = if self.meta.byte_shuffle {
            let size = self.meta.dtype.size();
            shuffle::shuffle(&self.block_raw, size, &mut self.scratch);
            let plane = self.scratch.len() / size;
            let mut comp = Vec::new();
            for p in self.scratch.chunks(plane.max(1)) {
                let c = self
                    .compressor
                    .compress(p)
                    .map_err(|e| Error::io(&self.tmp_path, "zstd compress", e))?;
                comp.extend_from_slice(&c);
            }
            comp
        } else {
            self.compressor
                .compress(&self.block_raw)
                .map_err(|e| Error::io(&self.tmp_path, "zstd compress", e))?
        };
        let checksum = format::checksum(&comp);
        let entry = BlockEntry {
            offset: self.offset,
            comp_len: u32::try_from(comp.len())
                .map_err(|_| self.invalid("block over 4 GiB".into()))?,
            n_records: self.block_records as u32,
            checksum,
        };
        let mut head = [0u8; format::BLOCK_HEADER];
        head[0..8].copy_from_slice(BLOCK_MAGIC);
        head[8..12].copy_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        head[12..16].copy_from_slice(&entry.n_records.to_le_bytes());
        head[16..20].copy_from_slice(&entry.comp_len.to_le_bytes());
        head[24..32].copy_from_slice(&checksum.to_le_bytes());
        self.write(&head)?;
        self.write(&comp)?;
        self.blocks.push(entry);
        self.block_raw.clear();
        self.block_records = 0;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().ok_or_else(|| Error::InvalidInput {
            context: self.final_path.display().to_string(),
            detail: "writer already failed".into(),
        })?;
        if let Err(e) = out.write_all(bytes) {
            self.out = None;
            return Err(Error::io(&self.tmp_path, "write", e));
        }
        self.hasher.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Write the index and footer, fsync, and rename into place. Returns what the manifest needs.
    pub fn finish(mut self) -> Result<ShardInfo> {
        self.flush_block()?;
        let n_records = self.key_ends.len();
        let mut index = Vec::with_capacity(
            8 + self.blocks.len() * format::INDEX_ENTRY + n_records * 12 + self.keys.len(),
        );
        index.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        index.extend_from_slice(&(if self.meta.labels { FLAG_LABELS } else { 0 }).to_le_bytes());
        for b in &self.blocks {
            index.extend_from_slice(&b.offset.to_le_bytes());
            index.extend_from_slice(&b.comp_len.to_le_bytes());
            index.extend_from_slice(&b.n_records.to_le_bytes());
            index.extend_from_slice(&b.checksum.to_le_bytes());
        }
        for l in &self.labels {
            index.extend_from_slice(&l.to_le_bytes());
        }
        for e in &self.key_ends {
            index.extend_from_slice(&e.to_le_bytes());
        }
        index.extend_from_slice(&self.keys);
        let comp = self
            .compressor
            .compress(&index)
            .map_err(|e| Error::io(&self.tmp_path, "zstd compress", e))?;
        let index_offset = self.offset;
        self.write(&comp)?;
        let mut footer = [0u8; format::FOOTER];
        footer[0..8].copy_from_slice(&index_offset.to_le_bytes());
        footer[8..16].copy_from_slice(&(comp.len() as u64).to_le_bytes());
        footer[16..24].copy_from_slice(&format::checksum(&comp).to_le_bytes());
        footer[24..32].copy_from_slice(&(n_records as u64).to_le_bytes());
        let fsum = format::checksum(&footer[0..32]);
        footer[32..40].copy_from_slice(&fsum.to_le_bytes());
        footer[40..48].copy_from_slice(END_MAGIC);
        self.write(&footer)?;

        let out = self.out.take().expect("checked by write");
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp_path, "flush", e.into_error()))?;
        file.sync_all()
            .map_err(|e| Error::io(&self.tmp_path, "fsync", e))?;
        drop(file);
        std::fs::rename(&self.tmp_path, &self.final_path)
            .map_err(|e| Error::io(&self.final_path, "rename", e))?;
        sync_parent_dir(&self.final_path)?;
        Ok(ShardInfo {
            path: self.final_path.clone(),
            records: n_records,
            bytes: self.offset,
            xxh3_128: format!("{:032x}", self.hasher.digest128()),
        })
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // Not finished (or failed): the temporary file must not survive. After a successful
        // `finish` the temporary name no longer exists and this is a no-op.
        if self.tmp_path.exists() {
            self.out = None;
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// fsync the directory holding `path`, so a rename survives a power cut.
pub(crate) fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    #[cfg(unix)]
    {
        let f = File::open(&dir).map_err(|e| Error::io(&dir, "open directory", e))?;
        f.sync_all()
            .map_err(|e| Error::io(&dir, "fsync directory", e))?;
    }
    Ok(())
}

/// A fresh temporary name beside `path`: `NAME.tmp-PID-N` (never taken for `NAME`; removed by
/// whoever finds it with its process gone).
pub fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        "{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Write `bytes` to `path` atomically: temporary file, fsync, rename, fsync directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_name(path);
    let res = (|| {
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        f.write_all(bytes)
            .map_err(|e| Error::io(&tmp, "write", e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, "fsync", e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, "rename", e))?;
        sync_parent_dir(path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
