//! lmd-train: where lmd's data layer (`lmd-data`) meets its models (`lmd-model`).
//!
//! Each program in `bin/` is a thin argument parser over a `run` here, so every job is also a
//! library call: [`inspect`] (shard and dataset summaries, verification), [`bench`] (the
//! `lmd-bench` figures), [`testvectors`] (reading the PyTorch reference files).

pub mod bench;
pub mod error;
pub mod experiment;
pub mod finetune;
pub mod inspect;
pub mod optim;
pub mod precompute;
pub mod quickstart;
pub mod report;
pub mod testvectors;
pub mod train;

pub use error::{Error, Result};
pub use lmd_data as data;
pub use lmd_model as model;
