//! Opening a shard: the checks [`super::reader::ShardReader::open`] makes before any block is
//! read, one function per part of the file: [`header`] (magic, version, metadata and its
//! checksum), [`footer`] (end magic, checksum, where the index lies), [`index`] (its checksum,
//! block entries that tile the data region, labels, keys). A file without a valid footer is
//! reported as truncated, with a scan of its blocks ([`scan_blocks`]) saying where it was cut.

use super::format::{self, u32_at, u64_at, BLOCK_MAGIC, END_MAGIC, FLAG_LABELS, MAGIC, VERSION};
use super::meta::ShardMeta;
use crate::{Error, Result};
use std::path::Path;

/// Where one block lies and which records it holds.
#[derive(Debug, Clone, Copy)]
pub(super) struct BlockEntry {
    pub offset: u64,
    pub comp_len: u32,
    pub n_records: u32,
    pub checksum: u64,
    pub first_record: usize,
}

/// The decoded index: block entries, labels, and the keys (one string, with end offsets).
pub(super) struct Index {
    pub blocks: Vec<BlockEntry>,
    pub labels: Option<Vec<i64>>,
    pub key_ends: Vec<u32>,
    pub keys: String,
}

/// What the footer says.
#[derive(Clone, Copy)]
struct Footer {
    index_offset: u64,
    index_sum: u64,
    n_records: usize,
}

/// A checked shard, ready to read.
pub(super) struct Opened {
    pub meta: ShardMeta,
    pub index: Index,
}

fn truncated(path: &Path, b: &[u8], detail: String) -> Error {
    Error::Truncated {
        path: path.to_path_buf(),
        file_len: b.len() as u64,
        detail,
    }
}

fn checksum(path: &Path, what: &str, stored: u64, computed: u64) -> Error {
    Error::Checksum {
        path: path.to_path_buf(),
        what: what.into(),
        stored,
        computed,
    }
}

/// Check the whole file `b` except the block payloads.
pub(super) fn check(path: &Path, b: &[u8]) -> Result<Opened> {
    let (meta, data_start) = header(path, b)?;
    let f = footer(path, b, data_start)?;
    let index = index(path, b, &meta, data_start, &f)?;
    Ok(Opened { meta, index })
}

/// The metadata of the shard `r` streams (its header only is read), checked as on open.
pub fn read_header(path: &Path, r: &mut dyn std::io::Read) -> Result<ShardMeta> {
    use std::io::Read;
    let mut b = vec![0u8; format::HEADER_FIXED];
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, "read", e)),
        }
    }
    b.truncate(got);
    if b.len() == format::HEADER_FIXED && &b[0..8] == MAGIC {
        let meta_len = u32_at(&b, 12) as usize;
        let mut rest = Vec::new();
        r.take(meta_len as u64)
            .read_to_end(&mut rest)
            .map_err(|e| Error::io(path, "read", e))?;
        b.extend_from_slice(&rest);
    }
    Ok(header(path, &b)?.0)
}

/// Magic, version and metadata; returns the metadata and where the data region starts.
fn header(path: &Path, b: &[u8]) -> Result<(ShardMeta, usize)> {
    if b.len() < 8 || &b[0..8] != MAGIC {
        if b.len() < 8 && MAGIC.starts_with(b) {
            return Err(truncated(path, b, "cut inside the header magic".into()));
        }
        return Err(Error::BadMagic {
            path: path.to_path_buf(),
            found: String::from_utf8_lossy(&b[..b.len().min(8)]).into_owned(),
            expected: String::from_utf8_lossy(MAGIC).into_owned(),
        });
    }
    if b.len() < format::HEADER_FIXED {
        return Err(truncated(path, b, "cut inside the fixed header".into()));
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
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
                path,
                "header",
                format!("metadata length {meta_len} exceeds the file"),
            ));
        }
        return Err(truncated(
            path,
            b,
            format!("cut inside the header metadata ({meta_len} bytes)"),
        ));
    }
    let meta_bytes = &b[format::HEADER_FIXED..data_start];
    let stored = u64_at(b, 16);
    let computed = format::checksum(meta_bytes);
    if stored != computed {
        return Err(checksum(path, "header", stored, computed));
    }
    let meta: ShardMeta = serde_json::from_slice(meta_bytes)
        .map_err(|e| Error::corrupt(path, "header", format!("metadata JSON: {e}")))?;
    Ok((meta, data_start))
}

/// The footer, after checking that the file ends with one.
fn footer(path: &Path, b: &[u8], data_start: usize) -> Result<Footer> {
    if b.len() < data_start + format::FOOTER || &b[b.len() - 8..] != END_MAGIC {
        return Err(truncated(path, b, scan_blocks(b, data_start)));
    }
    let f = &b[b.len() - format::FOOTER..];
    let stored = u64_at(f, 32);
    let computed = format::checksum(&f[0..32]);
    if stored != computed {
        return Err(checksum(path, "footer", stored, computed));
    }
    let index_offset = u64_at(f, 0);
    let index_len = u64_at(f, 8);
    let index_sum = u64_at(f, 16);
    let n_records = u64_at(f, 24) as usize;
    let footer_start = (b.len() - format::FOOTER) as u64;
    if index_offset < data_start as u64 || index_offset.checked_add(index_len) != Some(footer_start)
    {
        return Err(Error::corrupt(
            path,
            "footer",
            format!(
                "index at {index_offset}+{index_len} does not end at the footer ({footer_start})"
            ),
        ));
    }
    Ok(Footer {
        index_offset,
        index_sum,
        n_records,
    })
}

/// The index between `data_start` and the footer.
fn index(path: &Path, b: &[u8], meta: &ShardMeta, data_start: usize, f: &Footer) -> Result<Index> {
    let Footer {
        index_offset,
        index_sum,
        n_records,
    } = *f;
    let footer_start = b.len() - format::FOOTER;
    let index_comp = &b[index_offset as usize..footer_start];
    let computed = format::checksum(index_comp);
    if computed != index_sum {
        return Err(checksum(path, "index", index_sum, computed));
    }
    let index = zstd::decode_all(index_comp)
        .map_err(|e| Error::corrupt(path, "index", format!("zstd: {e}")))?;
    let bad_index = |d: String| Error::corrupt(path, "index", d);
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
    let (labels, key_ends, keys) =
        labels_and_keys(&index[pos..], n_records, has_labels).map_err(bad_index)?;
    Ok(Index {
        blocks,
        labels,
        key_ends,
        keys,
    })
}

/// The index after the block entries: labels (when present), key end offsets, key bytes.
type LabelsAndKeys = (Option<Vec<i64>>, Vec<u32>, String);

fn labels_and_keys(
    index: &[u8],
    n_records: usize,
    has_labels: bool,
) -> std::result::Result<LabelsAndKeys, String> {
    let mut pos = 0;
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
    let keys = String::from_utf8(index[pos..].to_vec()).map_err(|e| format!("keys: {e}"))?;
    let mut prev = 0u32;
    for (i, &end) in key_ends.iter().enumerate() {
        if end <= prev || end as usize > keys.len() || !keys.is_char_boundary(end as usize) {
            return Err(format!("record {i}: bad key end {end}"));
        }
        prev = end;
    }
    if prev as usize != keys.len() {
        return Err(format!("key bytes {} but keys end at {prev}", keys.len()));
    }
    Ok((labels, key_ends, keys))
}

/// Explain where a file without a footer was cut, by walking its block frames.
pub(super) fn scan_blocks(b: &[u8], data_start: usize) -> String {
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
