//! lmd-model: pure compute with candle — the latent MAE, mask-ratio schedulers (VAEs to come).
//!
//! It reads weights, never datasets: inputs are tensors, outputs are tensors.

pub mod backend;
pub mod checkpoint;
pub mod classifier;
mod cpu;
pub mod error;
pub mod mae;
pub mod nn;
pub mod precision;
pub mod preset;
mod rng;
pub mod rowops;
pub mod schedule;
#[cfg(test)]
mod test_util;
pub mod vae;
pub mod vit;

pub use backend::{Backend, Kernels, KERNELS_ENV};
pub use checkpoint::{read_tensors, write_tensors, CheckpointFormat};
pub use classifier::{ClassifierConfig, VitClassifier};
pub use error::{Error, Result};
pub use mae::{LatentMae, MaeConfig, MaeOutput, Masking, Pool};
pub use precision::Precision;
pub use preset::Preset;
pub use schedule::MaskSchedule;

/// candle, re-exported so that callers use the same version.
pub use candle_core as candle;
pub use candle_nn;

/// The largest absolute elementwise difference of two tensors of one shape, as f32: what the
/// parity checks against the PyTorch reference vectors compare.
pub fn max_abs_diff(a: &candle::Tensor, b: &candle::Tensor) -> candle::Result<f32> {
    (a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(candle::DType::F32)?
        .to_scalar::<f32>()
}
