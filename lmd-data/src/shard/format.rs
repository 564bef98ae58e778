//! Byte-level constants of the shard format, version 1 (see `docs/FORMAT.md`).
//!
//! All integers are little-endian. Checksums are XXH3-64 (seed 0).
//!
//! ```text
//! header   : magic "LMDSHARD" | u32 version | u32 meta_len | u64 xxh3(meta) | meta (JSON, UTF-8)
//! block k  : magic "LMDBLOCK" | u32 k | u32 n_records | u32 comp_len | u32 0 | u64 xxh3(payload)
//!            | payload (one zstd frame, comp_len bytes)
//! index    : one zstd frame (see docs/FORMAT.md for its content)
//! footer   : u64 index_offset | u64 index_len | u64 xxh3(index) | u64 n_records
//!            | u64 xxh3(previous 32 bytes) | magic "LMDS_END"
//! ```

/// First 8 bytes of every shard.
pub const MAGIC: &[u8; 8] = b"LMDSHARD";
/// First 8 bytes of every block frame header.
pub const BLOCK_MAGIC: &[u8; 8] = b"LMDBLOCK";
/// Last 8 bytes of every complete shard.
pub const END_MAGIC: &[u8; 8] = b"LMDS_END";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Fixed part of the header before the JSON metadata.
pub const HEADER_FIXED: usize = 24;
/// Size of a block frame header.
pub const BLOCK_HEADER: usize = 32;
/// Size of the footer.
pub const FOOTER: usize = 48;
/// Size of one block entry in the index.
pub const INDEX_ENTRY: usize = 24;
/// Index flag: labels are present.
pub const FLAG_LABELS: u32 = 1;
/// Conventional file extension of a shard.
pub const EXTENSION: &str = "lmds";

/// XXH3-64 with seed 0, the format's checksum.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// XXH3-128 with seed 0, the whole-file hash recorded in manifests.
pub fn checksum128(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}
