//! The one error type of `lmd-model`.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle error (shape mismatch, missing tensor in a VarBuilder, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A weight file that does not fit the model: names the file and what was expected.
    #[error("{path}: {detail}")]
    Weights { path: PathBuf, detail: String },
    /// An invalid configuration.
    #[error("invalid config: {0}")]
    Config(String),
}
