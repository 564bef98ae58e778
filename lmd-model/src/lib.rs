//! lmd-model: pure compute with candle — VAEs, the latent MAE, mask-ratio schedulers.
//!
//! It reads weights, never datasets: inputs are tensors, outputs are tensors.

pub mod error;
pub mod schedule;

pub use error::{Error, Result};
pub use schedule::MaskSchedule;
