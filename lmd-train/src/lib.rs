//! lmd-train: where lmd's data layer (`lmd-data`) meets its models (`lmd-model`).
//!
//! Each program in `bin/` is a thin argument parser over a `run` here, so every job is also a
//! library call: [`inspect`] (shard and dataset summaries, verification), [`bench`] (the
//! `lmd-bench` figures), [`testvectors`] (reading the PyTorch reference files).

pub mod bench;
pub mod claim;
pub mod device;
pub mod dist;
pub mod download;
pub mod driver;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod export;
pub mod finetune;
pub mod inspect;
pub mod knn;
pub mod metrics;
pub mod optim;
pub mod parity;
pub mod precompute;
pub mod quickstart;
pub mod recorded;
pub mod report;
pub mod run_dir;
pub mod settings;
pub mod start;
pub mod testvectors;
pub mod train;
pub mod train_data;

pub use device::DeviceSpec;
pub use error::{Error, Result};
pub use lmd_data as data;
pub use lmd_model as model;
pub use settings::RunSettings;

/// A candle device from its name: `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` feature).
pub fn device(name: &str) -> Result<model::candle::Device> {
    name.parse::<DeviceSpec>()
        .map_err(|e| Error::Invalid(e.to_string()))?
        .open()
}
