//! The latent shard format (`.lmds` files) and datasets of shards.
//!
//! A shard holds records (one sample each: its key, optional label and latent tensors) in blocks,
//! each block an independent zstd frame with its own checksum, so reading record `i` decompresses
//! one small block. `docs/FORMAT.md` is the normative byte layout; [`format`] holds its constants.
//!
//! - [`ShardWriter`] writes one shard atomically (temporary name, fsync, rename).
//! - [`ShardReader`] memory-maps one shard: `len`, `get`, `iter`, `verify`.
//! - [`Manifest`] (`index.json`) lists the shards of a dataset directory with counts, sizes,
//!   hashes and the fingerprint that tells a stale cache from a good one; [`LatentDataset`]
//!   opens all of them as one indexable collection.

pub mod format;
pub mod manifest;
pub mod meta;
mod open;
pub mod reader;
pub mod shuffle;
pub mod writer;

pub use manifest::{LatentDataset, Manifest, ShardEntry, MANIFEST_FILE};
pub use meta::{Field, Preprocessing, RecordLayout, Scaling, ShardMeta, VaeIdentity, WeightFile};
pub use open::read_header;
pub use reader::{Record, ShardIter, ShardReader, VerifyReport};
pub use writer::{ShardInfo, ShardWriter, WriterOptions};
