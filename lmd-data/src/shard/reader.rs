//! Reading one shard through a memory map.
//!
//! Opening checks the header, footer and index (magic, version, checksums, bounds); block payloads
//! are checked when they are read ([`ShardReader::get`], [`ShardReader::iter`]) or all at once by
//! [`ShardReader::verify`]. A file without a valid footer is reported as truncated, with a scan
//! of its blocks saying where it was cut.

use super::format::{self, u32_at, u64_at, BLOCK_MAGIC};
use super::meta::{Field, ShardMeta};
use super::shuffle;
use crate::{Error, Result};
use memmap2::Mmap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

thread_local! {
    /// One zstd decompression context per thread, reused across blocks.
    static DECOMPRESSOR: std::cell::RefCell<zstd::bulk::Decompressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().expect("zstd context"));
}

use super::open::{self, BlockEntry};

/// One decoded record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub key: String,
    pub label: Option<i64>,
    /// All tensors of the record as f32, in layout order (see [`super::RecordLayout`]).
    pub data: Vec<f32>,
    /// Elements per tensor (C·H·W).
    pub tensor_elems: usize,
}

impl Record {
    /// Tensor `idx` of the record (layout order).
    pub fn tensor(&self, idx: usize) -> &[f32] {
        &self.data[idx * self.tensor_elems..(idx + 1) * self.tensor_elems]
    }
}

/// What [`ShardReader::verify`] found.
#[derive(Debug)]
pub struct VerifyReport {
    pub path: PathBuf,
    pub blocks: usize,
    pub records: usize,
    /// One error per bad block (empty when the shard is sound).
    pub errors: Vec<Error>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// A memory-mapped shard. Cheap to share across threads (`&self` methods only).
pub struct ShardReader {
    path: PathBuf,
    map: Mmap,
    meta: ShardMeta,
    blocks: Vec<BlockEntry>,
    labels: Option<Vec<i64>>,
    key_ends: Vec<u32>,
    keys: String,
    record_bytes: usize,
    cache: Mutex<Option<(usize, Arc<Vec<u8>>)>>,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader")
            .field("path", &self.path)
            .field("records", &self.len())
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl ShardReader {
    /// Open and check a shard (header, footer, index); block payloads are checked on read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, "open", e))?;
        // SAFETY: the map is read-only; shards are immutable once renamed into place. A file
        // changed underneath us is caught by the checksums, not trusted.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, "mmap", e))?;
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::WillNeed);
        Self::from_map(path, map)
    }

    fn from_map(path: PathBuf, map: Mmap) -> Result<Self> {
        let opened = open::check(&path, &map)?;
        Ok(ShardReader {
            path,
            map,
            record_bytes: opened.meta.record_bytes(),
            meta: opened.meta,
            blocks: opened.index.blocks,
            labels: opened.index.labels,
            key_ends: opened.index.key_ends,
            keys: opened.index.keys,
            cache: Mutex::new(None),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.key_ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.key_ends.is_empty()
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// `(first record, record count)` of every block, in order.
    pub fn block_ranges(&self) -> Vec<(usize, usize)> {
        self.blocks
            .iter()
            .map(|b| (b.first_record, b.n_records as usize))
            .collect()
    }

    /// Block index of record `i`.
    pub fn block_of_record(&self, i: usize) -> Result<usize> {
        self.check_index(i)?;
        Ok(self.block_of(i))
    }

    /// Decompressed records of block `k` (raw stored bytes), through the one-block cache.
    pub fn block_bytes(&self, k: usize) -> Result<Arc<Vec<u8>>> {
        self.cached_block(k)
    }

    /// Size of the file in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    /// The key of record `i` (no decompression).
    pub fn key(&self, i: usize) -> Result<&str> {
        self.check_index(i)?;
        let start = if i == 0 {
            0
        } else {
            self.key_ends[i - 1] as usize
        };
        Ok(&self.keys[start..self.key_ends[i] as usize])
    }

    /// The label of record `i`, if the shard has labels (no decompression).
    pub fn label(&self, i: usize) -> Result<Option<i64>> {
        self.check_index(i)?;
        Ok(self.labels.as_ref().map(|l| l[i]))
    }

    /// All labels, if the shard has them.
    pub fn labels(&self) -> Option<&[i64]> {
        self.labels.as_deref()
    }

    fn check_index(&self, i: usize) -> Result<()> {
        if i >= self.len() {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                index: i,
                len: self.len(),
            });
        }
        Ok(())
    }

    /// Block holding record `i` (assumes `i < len`).
    fn block_of(&self, i: usize) -> usize {
        self.blocks
            .partition_point(|b| b.first_record + b.n_records as usize <= i)
    }

    /// Decompress block `k` into `out` (its records' raw little-endian bytes, unshuffled);
    /// `scratch` is reused between calls. Checks the block's frame header and checksum.
    pub fn read_block_into(
        &self,
        k: usize,
        out: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        let e = *self.blocks.get(k).ok_or_else(|| {
            Error::corrupt(
                &self.path,
                format!("block {k}"),
                format!("no such block ({} blocks)", self.blocks.len()),
            )
        })?;
        let what = || format!("block {k}");
        let off = e.offset as usize;
        let b: &[u8] = &self.map;
        let h = &b[off..off + format::BLOCK_HEADER];
        if &h[0..8] != BLOCK_MAGIC
            || u32_at(h, 8) as usize != k
            || u32_at(h, 12) != e.n_records
            || u32_at(h, 16) != e.comp_len
            || u32_at(h, 20) != 0
            || u64_at(h, 24) != e.checksum
        {
            return Err(Error::corrupt(
                &self.path,
                what(),
                format!("frame header at offset {off} disagrees with the index"),
            ));
        }
        let payload =
            &b[off + format::BLOCK_HEADER..off + format::BLOCK_HEADER + e.comp_len as usize];
        let computed = format::checksum(payload);
        if computed != e.checksum {
            return Err(Error::Checksum {
                path: self.path.clone(),
                what: format!("block {k} (offset {off})"),
                stored: e.checksum,
                computed,
            });
        }
        let raw_len = e.n_records as usize * self.record_bytes;
        let target: &mut Vec<u8> = if self.meta.byte_shuffle {
            scratch
        } else {
            &mut *out
        };
        target.clear();
        target.reserve(raw_len);
        let n = DECOMPRESSOR
            .with(|d| d.borrow_mut().decompress_to_buffer(payload, target))
            .map_err(|err| Error::corrupt(&self.path, what(), format!("zstd: {err}")))?;
        if n != raw_len {
            return Err(Error::corrupt(
                &self.path,
                what(),
                format!("decompressed to {n} bytes, expected {raw_len}"),
            ));
        }
        if self.meta.byte_shuffle {
            out.clear();
            out.resize(raw_len, 0);
            shuffle::unshuffle(scratch, self.meta.dtype.size(), out);
        }
        Ok(())
    }

    fn cached_block(&self, k: usize) -> Result<Arc<Vec<u8>>> {
        if let Some((ck, buf)) = self.cache.lock().expect("cache lock").as_ref() {
            if *ck == k {
                return Ok(buf.clone());
            }
        }
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        self.read_block_into(k, &mut out, &mut scratch)?;
        let buf = Arc::new(out);
        *self.cache.lock().expect("cache lock") = Some((k, buf.clone()));
        Ok(buf)
    }

    /// Raw stored bytes of record `i` (dtype little-endian, all tensors).
    pub fn get_raw(&self, i: usize) -> Result<Vec<u8>> {
        self.check_index(i)?;
        let k = self.block_of(i);
        let buf = self.cached_block(k)?;
        let r = i - self.blocks[k].first_record;
        Ok(buf[r * self.record_bytes..(r + 1) * self.record_bytes].to_vec())
    }

    /// Record `i`: decompresses its block (the last block read is cached).
    pub fn get(&self, i: usize) -> Result<Record> {
        self.check_index(i)?;
        let k = self.block_of(i);
        let buf = self.cached_block(k)?;
        let r = i - self.blocks[k].first_record;
        self.decode_record(i, &buf[r * self.record_bytes..(r + 1) * self.record_bytes])
    }

    fn decode_record(&self, i: usize, bytes: &[u8]) -> Result<Record> {
        let mut data = vec![0f32; self.meta.record_elems()];
        self.meta.dtype.decode_to_f32(bytes, &mut data);
        Ok(Record {
            key: self.key(i)?.to_owned(),
            label: self.label(i)?,
            data,
            tensor_elems: self.meta.tensor_elems(),
        })
    }

    /// One tensor of record `i` as f32 (`view`, `flipped` variant, `field`).
    pub fn tensor(&self, i: usize, view: usize, flipped: bool, field: Field) -> Result<Vec<f32>> {
        let t = self
            .meta
            .layout
            .tensor_index(view, flipped, field)
            .ok_or_else(|| Error::InvalidInput {
                context: self.path.display().to_string(),
                detail: format!(
                    "no tensor view={view} flipped={flipped} field={field:?} in {:?}",
                    self.meta.layout
                ),
            })?;
        let rec = self.get(i)?;
        Ok(rec.tensor(t).to_vec())
    }

    /// Sequential iterator: each block is decompressed once.
    pub fn iter(&self) -> ShardIter<'_> {
        ShardIter {
            reader: self,
            next: 0,
            block: usize::MAX,
            buf: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Check every block (frame header, checksum, decompressed size); reports each bad block.
    pub fn verify(&self) -> VerifyReport {
        let mut errors = Vec::new();
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        for k in 0..self.blocks.len() {
            if let Err(e) = self.read_block_into(k, &mut out, &mut scratch) {
                errors.push(e);
            }
        }
        VerifyReport {
            path: self.path.clone(),
            blocks: self.blocks.len(),
            records: self.len(),
            errors,
        }
    }
}

/// Sequential records of a shard ([`ShardReader::iter`]).
pub struct ShardIter<'a> {
    reader: &'a ShardReader,
    next: usize,
    block: usize,
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

impl Iterator for ShardIter<'_> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        let r = self.reader;
        if self.next >= r.len() {
            return None;
        }
        let i = self.next;
        let k = r.block_of(i);
        if k != self.block {
            if let Err(e) = r.read_block_into(k, &mut self.buf, &mut self.scratch) {
                // Skip the bad block so the caller can go on with the next one.
                self.next = r.blocks[k].first_record + r.blocks[k].n_records as usize;
                self.block = usize::MAX;
                return Some(Err(e));
            }
            self.block = k;
        }
        self.next += 1;
        let off = (i - r.blocks[k].first_record) * r.record_bytes;
        Some(r.decode_record(i, &self.buf[off..off + r.record_bytes]))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.reader.len() - self.next;
        (n, Some(n))
    }
}
