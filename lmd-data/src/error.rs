//! The one error type of `lmd-data`: every variant names the file it is about and, where it
//! applies, the block or record, so a user can find the bad bytes.

use std::path::PathBuf;

/// Result alias for lmd-data.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on `path`.
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the shard magic.
    #[error("{path}: not an lmd latent shard (magic {found:?}, expected {expected:?})")]
    BadMagic {
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// The format version is one this build cannot read.
    #[error(
        "{path}: shard format version {version} is not supported (this build reads {supported})"
    )]
    UnsupportedVersion {
        path: PathBuf,
        version: u32,
        supported: u32,
    },
    /// The file ends early: an interrupted write or a cut copy.
    #[error("{path}: truncated shard ({file_len} bytes): {detail}")]
    Truncated {
        path: PathBuf,
        file_len: u64,
        detail: String,
    },
    /// A checksum did not match: `what` is `header`, `index`, `footer` or `block N`.
    #[error("{path}: {what}: checksum mismatch (stored {stored:016x}, computed {computed:016x})")]
    Checksum {
        path: PathBuf,
        what: String,
        stored: u64,
        computed: u64,
    },
    /// Structurally invalid content in `what` (`header`, `index`, `block N`, ...).
    #[error("{path}: {what}: corrupt: {detail}")]
    Corrupt {
        path: PathBuf,
        what: String,
        detail: String,
    },
    /// A record index past the end.
    #[error("{path}: record {index} out of range ({len} records)")]
    OutOfRange {
        path: PathBuf,
        index: usize,
        len: usize,
    },
    /// The caller handed in something inconsistent (wrong length, mixed labels, ...).
    #[error("{context}: invalid input: {detail}")]
    InvalidInput { context: String, detail: String },
    /// An image member that does not decode: the reason (the caller knows the file and key).
    #[error("{reason}")]
    Decode { reason: String },
    /// An image that decoded but cannot be transformed (resize failure): the reason.
    #[error("{key}: {reason}")]
    Transform { key: String, reason: String },
    /// An object-store request that failed (after its retries): the URL, the operation, and
    /// for reads the byte offset reached.
    #[error("{url}: {op}: {detail}")]
    Storage {
        url: String,
        op: &'static str,
        detail: String,
    },
    /// A dataset manifest problem (missing shard, size or fingerprint mismatch, ...).
    #[error("{path}: manifest: {detail}")]
    Manifest { path: PathBuf, detail: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        what: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            path: path.into(),
            what: what.into(),
            detail: detail.into(),
        }
    }
}
