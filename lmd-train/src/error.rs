//! The one error type of `lmd-train`.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the data layer (already names file, block, record).
    #[error(transparent)]
    Data(#[from] lmd_data::Error),
    /// From the model layer.
    #[error(transparent)]
    Model(#[from] lmd_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] lmd_model::candle::Error),
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file that cannot be read or lacks what we need.
    #[error("{path}: {detail}")]
    Tensors { path: PathBuf, detail: String },
    /// Bad arguments or configuration.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }
}
