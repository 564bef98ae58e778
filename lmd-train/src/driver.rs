//! The step driver shared by pretraining (`train`) and fine-tuning (`finetune`): batches from
//! the loader with the wait timed, one optimisation step from a loss, and the throughput of
//! each logging interval, on one process or on every rank of a data-parallel job.
//!
//! Rules:
//! - One step is: backward; under several ranks the gradients averaged in flat buckets
//!   ([`crate::dist::average_gradients`]) and the loss and the stop request summed over the
//!   ranks in one small all-reduce; the global loss checked finite (else an error naming the
//!   step, on every rank alike); global gradient-norm clipping; one AdamW update at the given
//!   learning rate. The caller computes the loss (that is what differs between the programs)
//!   and the learning rate.
//! - `samples_per_s` counts every rank's samples; `data_wait_fraction` and `comm_fraction`
//!   are this rank's, over the interval since the last logged line (or
//!   [`Driver::reset_interval`]).
//! - [`Stepped::stop`] is the signal any rank received before the step ended: every rank sees
//!   the same value after the same step, so all stop there together.

use std::path::Path;
use std::time::Instant;

use lmd_data::loader::LatentBatch;
use lmd_model::candle::{Device, Tensor};
use lmd_model::candle_nn::VarMap;

use crate::dist::{average_gradients, Job, BUCKET_ELEMS};
use crate::optim::AdamW;
use crate::{Error, Result};

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stepped {
    /// The loss averaged over all ranks.
    pub loss: f64,
    pub grad_norm: f64,
    /// A stop signal received by any rank (SIGTERM, SIGUSR1).
    pub stop: Option<i32>,
}

/// Throughput over a logging interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// Samples per second over all ranks.
    pub samples_per_s: f64,
    /// Fraction of the interval's wall time spent waiting for the loader.
    pub data_wait_fraction: f64,
    /// Fraction of the interval's wall time spent in collectives (0 on one process).
    pub comm_fraction: f64,
}

/// Runs the steps of one training job.
pub struct Driver {
    pub opt: AdamW,
    grad_clip: f64,
    log_every: u64,
    since: Instant,
    wait_s: f64,
    comm_s: f64,
    samples: usize,
}

impl Driver {
    pub fn new(opt: AdamW, grad_clip: f64, log_every: u64) -> Self {
        Driver {
            opt,
            grad_clip,
            log_every: log_every.max(1),
            since: Instant::now(),
            wait_s: 0.0,
            comm_s: 0.0,
            samples: 0,
        }
    }

    /// Continue from the checkpoint directory `ck`: the model's weights into `varmap`, the
    /// optimiser's moments and step into this driver.
    pub fn restore(&mut self, varmap: &VarMap, ck: &Path) -> Result<()> {
        let mut vm = varmap.clone();
        vm.load(ck.join(crate::run_dir::MODEL_FILE))?;
        self.opt.load(&ck.join(crate::run_dir::OPTIMIZER_FILE))
    }

    /// The next batch of the epoch (the wait counted), or `None` at its end.
    pub fn next_batch(
        &mut self,
        it: &mut impl Iterator<Item = lmd_data::Result<LatentBatch>>,
    ) -> Option<Result<LatentBatch>> {
        let t = Instant::now();
        let b = it.next();
        self.wait_s += t.elapsed().as_secs_f64();
        b.map(|b| b.map_err(Error::from))
    }

    /// A batch's latents as a `[B, C, H, W]` tensor on `dev` (moved out of the batch).
    pub fn latents(batch: &mut LatentBatch, dev: &Device) -> Result<Tensor> {
        let data = std::mem::take(&mut batch.data);
        Ok(Tensor::from_vec(data, batch.shape.to_vec(), dev)?)
    }

    /// One optimisation step from `loss` (a scalar: this rank's mean) at learning rate `lr`;
    /// `step` is the number of steps done before it (named in errors), `samples` this rank's
    /// batch size.
    pub fn step(
        &mut self,
        job: &Job,
        loss: &Tensor,
        step: u64,
        lr: f64,
        samples: usize,
    ) -> Result<Stepped> {
        let local = loss.to_scalar::<f32>()? as f64;
        let mut grads = loss.backward()?;
        let world = job.dist.world_size();
        let t = Instant::now();
        // [loss sum, stop signal (any rank's, max by sum of one-hot rank slots)]
        let mut small = vec![0f64; 1 + world];
        small[0] = local;
        small[1 + job.dist.rank()] = job.stop.requested().unwrap_or(0) as f64;
        job.dist.comm().all_reduce_sum_f64(&mut small)?;
        let value = small[0] / world as f64;
        let stop = small[1..].iter().map(|&s| s as i32).find(|&s| s != 0);
        if !value.is_finite() {
            return Err(Error::Invalid(format!(
                "loss is {value} at step {step}{}",
                if world > 1 {
                    " (averaged over the ranks)"
                } else {
                    ""
                }
            )));
        }
        average_gradients(&job.dist, &self.opt.vars(), &mut grads, BUCKET_ELEMS)?;
        self.comm_s += if world > 1 {
            t.elapsed().as_secs_f64()
        } else {
            0.0
        };
        let grad_norm = self.opt.clip_and_step(&mut grads, self.grad_clip, lr)?;
        self.samples += samples * world;
        Ok(Stepped {
            loss: value,
            grad_norm,
            stop,
        })
    }

    /// Whether the step count `step` (after the step) is a logging step.
    pub fn log_due(&self, step: u64) -> bool {
        step.is_multiple_of(self.log_every)
    }

    /// The interval's throughput, and a new interval.
    pub fn take_rates(&mut self) -> Rates {
        let dt = self.since.elapsed().as_secs_f64().max(1e-9);
        let r = Rates {
            samples_per_s: self.samples as f64 / dt,
            data_wait_fraction: self.wait_s / dt,
            comm_fraction: self.comm_s / dt,
        };
        self.reset_interval();
        r
    }

    /// Start a new interval (e.g. after an evaluation that should not count).
    pub fn reset_interval(&mut self) {
        (self.since, self.wait_s, self.comm_s, self.samples) = (Instant::now(), 0.0, 0.0, 0);
    }
}
