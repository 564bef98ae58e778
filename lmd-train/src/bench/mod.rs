//! `lmd-bench` figures. Each figure is one JSON object (one line on stdout), with any baseline
//! measured in the same invocation so that ratios survive a noisy machine. One module per
//! subcommand family: [`shards`], [`steps`] (train-step, finetune-step), [`media`] (vae,
//! decode), [`optimizer`], [`loader`], [`python`] (python-reader), [`allreduce`] (under mpirun).

pub mod allreduce;
pub mod loader;
pub mod media;
pub mod optimizer;
pub mod python;
pub mod shards;
pub mod steps;

pub use allreduce::{allreduce, AllreduceBenchOptions};
pub use loader::{loader, LoaderBenchOptions};
pub use media::{decode, vae, DecodeBenchOptions, VaeBenchOptions};
pub use optimizer::{optimizer, OptimizerBenchOptions};
pub use python::{python_reader, PythonReaderBenchOptions};
pub use shards::{shards, ShardBenchOptions};
pub use steps::{finetune_step, train_step, FinetuneStepOptions, StepTarget, TrainStepOptions};

pub(crate) use shards::{bench_meta, source_latents};

use crate::{Error, Result};
use std::path::PathBuf;

/// A fresh scratch directory under the system temp dir.
pub(crate) fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "lmd-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, "create", e))?;
    Ok(d)
}
