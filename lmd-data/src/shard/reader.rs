//! Reading one shard through a memory map.
//!
//! Opening checks the header, footer and index (magic, version, checksums, bounds); block payloads
//! are checked when they are read ([`ShardReader::get`], [`ShardReader::iter`]) or all at once by
//! [`ShardReader::verify`]. A file without a valid footer is reported as truncated, with a scan
//! of its blocks saying where it was cut.

use super::format::{self, u32_at, u64_at, BLOCK_MAGIC, END_MAGIC, FLAG_LABELS, MAGIC, VERSION};
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

#[derive(Debug, Clone, Copy)]
struct BlockEntry {
    offset: u64,
    comp_len: u32,
    n_records: u32,
    checksum: u64,
    first_record: usize,
}

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
        let b: &[u8] = &map;
        let len = b.len() as u64;
        let truncated = |detail: String| Error::Truncated {
            path: path.clone(),
            file_len: len,
            detail,
        };
        if b.len() < 8 || &b[0..8] != MAGIC {
            if b.len() < 8 && MAGIC.starts_with(b) {
                return Err(truncated("cut inside the header magic".into()));
            }
            return Err(Error::BadMagic {
                path: path.clone(),
                found: String::from_utf8_lossy(&b[..b.len().min(8)]).into_owned(),
                expected: String::from_utf8_lossy(MAGIC).into_owned(),
            });
        }
        if b.len() < format::HEADER_FIXED {
            return Err(truncated("cut inside the fixed header".into()));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.clone(),
                version,
                supported: VERSION,
            });
        }
        let meta_len = u32_at(b, 12) as usize;
        let data_start = format::HEADER_FIXED + meta_len;
        if data_start > b.len() {
            // Either a cut file or a corrupt length: the footer tells which.
            if b.len() >= format::FOOTER && &b[b.len() - 8..] == END_MAGIC {
                return Err(Error::corrupt(
                    &path,
                    "header",
                    format!("metadata length {meta_len} exceeds the file"),
                ));
            }
            return Err(truncated(format!(
                "cut inside the header metadata ({meta_len} bytes)"
            )));
        }
        let meta_bytes = &b[format::HEADER_FIXED..data_start];
        let stored = u64_at(b, 16);
        let computed = format::checksum(meta_bytes);
        if stored != computed {
            return Err(Error::Checksum {
                path: path.clone(),
                what: "header".into(),
                stored,
                computed,
            });
        }
        let meta: ShardMeta = serde_json::from_slice(meta_bytes)
            .map_err(|e| Error::corrupt(&path, "header", format!("metadata JSON: {e}")))?;
        let record_bytes = meta.record_bytes();

        // Footer.
        if b.len() < data_start + format::FOOTER || &b[b.len() - 8..] != END_MAGIC {
            return Err(truncated(scan_blocks(b, data_start)));
        }
        let f = &b[b.len() - format::FOOTER..];
        let stored = u64_at(f, 32);
        let computed = format::checksum(&f[0..32]);
        if stored != computed {
            return Err(Error::Checksum {
                path: path.clone(),
                what: "footer".into(),
                stored,
                computed,
            });
        }
        let index_offset = u64_at(f, 0);
        let index_len = u64_at(f, 8);
        let index_sum = u64_at(f, 16);
        let n_records = u64_at(f, 24) as usize;
        let footer_start = (b.len() - format::FOOTER) as u64;
        if index_offset < data_start as u64
            || index_offset.checked_add(index_len) != Some(footer_start)
        {
            return Err(Error::corrupt(
                &path,
                "footer",
                format!("index at {index_offset}+{index_len} does not end at the footer ({footer_start})"),
            ));
        }
        let index_comp = &b[index_offset as usize..footer_start as usize];
        let computed = format::checksum(index_comp);
        if computed != index_sum {
            return Err(Error::Checksum {
                path: path.clone(),
                what: "index".into(),
                stored: index_sum,
                computed,
            });
        }
        let index = zstd::decode_all(index_comp)
            .map_err(|e| Error::corrupt(&path, "index", format!("zstd: {e}")))?;
        let bad_index = |d: String| Error::corrupt(&path, "index", d);
        if index.len() < 8 {
            return Err(bad_index("shorter than its 8-byte head".into()));
        }
        let n_blocks = u32_at(&index, 0) as usize;
        let flags = u32_at(&index, 4);
        let has_labels = flags & FLAG_LABELS != 0;
        if has_labels != meta.labels {
            return Err(bad_index(format!(
                "labels flag {has_labels} but metadata says {}",
                meta.labels
            )));
        }
        let need = 8usize
            .checked_add(n_blocks.saturating_mul(format::INDEX_ENTRY))
            .and_then(|v| v.checked_add(n_records.saturating_mul(if has_labels { 12 } else { 4 })))
            .ok_or_else(|| bad_index("sizes overflow".into()))?;
        if index.len() < need {
            return Err(bad_index(format!(
                "{} bytes, needs at least {need}",
                index.len()
            )));
        }
        let mut blocks = Vec::with_capacity(n_blocks);
        let mut pos = 8;
        let mut first = 0usize;
        let mut expect_offset = data_start as u64;
        for k in 0..n_blocks {
            let e = BlockEntry {
                offset: u64_at(&index, pos),
                comp_len: u32_at(&index, pos + 8),
                n_records: u32_at(&index, pos + 12),
                checksum: u64_at(&index, pos + 16),
                first_record: first,
            };
            pos += format::INDEX_ENTRY;
            if e.offset != expect_offset
                || e.n_records == 0
                || e.n_records as usize > meta.records_per_block
            {
                return Err(bad_index(format!(
                    "block {k}: entry (offset {}, {} records) inconsistent (expected offset {expect_offset}, 1..={} records)",
                    e.offset, e.n_records, meta.records_per_block
                )));
            }
            expect_offset = e.offset + format::BLOCK_HEADER as u64 + e.comp_len as u64;
            first += e.n_records as usize;
            blocks.push(e);
        }
        if expect_offset != index_offset || first != n_records {
            return Err(bad_index(format!(
                "blocks cover {first} records up to offset {expect_offset}, footer says {n_records} records, index at {index_offset}"
            )));
        }
        let labels = if has_labels {
            let v: Vec<i64> = index[pos..pos + 8 * n_records]
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
                .collect();
            pos += 8 * n_records;
            Some(v)
        } else {
            None
        };
        let key_ends: Vec<u32> = index[pos..pos + 4 * n_records]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        pos += 4 * n_records;
        let keys = String::from_utf8(index[pos..].to_vec())
            .map_err(|e| bad_index(format!("keys: {e}")))?;
        let mut prev = 0u32;
        for (i, &end) in key_ends.iter().enumerate() {
            if end <= prev || end as usize > keys.len() || !keys.is_char_boundary(end as usize) {
                return Err(bad_index(format!("record {i}: bad key end {end}")));
            }
            prev = end;
        }
        if prev as usize != keys.len() {
            return Err(bad_index(format!(
                "key bytes {} but keys end at {prev}",
                keys.len()
            )));
        }
        Ok(ShardReader {
            path,
            map,
            meta,
            blocks,
            labels,
            key_ends,
            keys,
            record_bytes,
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

/// Explain where a file without a footer was cut, by walking its block frames.
fn scan_blocks(b: &[u8], data_start: usize) -> String {
    let mut pos = data_start;
    let mut k = 0usize;
    loop {
        if pos == b.len() {
            return if k == 0 {
                "no blocks, no index and no footer after the header (an interrupted write?)".into()
            } else {
                format!("ends after block {} at offset {pos}: no index or footer (an interrupted write?)", k - 1)
            };
        }
        let m = (b.len() - pos).min(8);
        if b[pos..pos + m] != BLOCK_MAGIC[..m] {
            return format!(
                "no footer; after block {} the bytes at offset {pos} are not a block (cut in the index or footer?)",
                k as i64 - 1
            );
        }
        if b.len() - pos < format::BLOCK_HEADER {
            return format!("cut inside the frame header of block {k} at offset {pos}");
        }
        let comp_len = u32_at(b, pos + 16) as usize;
        let end = pos + format::BLOCK_HEADER + comp_len;
        if end > b.len() {
            return format!(
                "cut in block {k} at offset {pos}: it needs {} bytes, {} remain",
                format::BLOCK_HEADER + comp_len,
                b.len() - pos
            );
        }
        pos = end;
        k += 1;
    }
}
