//! The lines of the training logs (`metrics.jsonl`): what pretraining and fine-tuning write per
//! logged step, and what the plots ([`crate::report`]) and the progress bars read.

use serde::{Deserialize, Serialize};

/// One line of pretraining's `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub mask_ratio: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples_per_s: f64,
    /// Fraction of the interval's wall time spent waiting for the loader.
    pub data_wait_fraction: f64,
    /// Fraction of the interval's wall time spent in collectives (gradient all-reduce; 0 on
    /// one process).
    #[serde(default)]
    pub comm_fraction: f64,
}

/// One line of fine-tuning's `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples_per_s: f64,
    pub data_wait_fraction: f64,
    #[serde(default)]
    pub comm_fraction: f64,
}
