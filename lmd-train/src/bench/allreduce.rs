//! `lmd-bench allreduce` (run under `mpirun -np N`): the gradient all-reduce of data-parallel
//! training ([`crate::dist::average_gradients`]: tensors packed into flat buckets, summed,
//! scaled, unpacked) against MPI's own `MPI_Allreduce` on a plain buffer of the same size, in
//! the same invocation. Bandwidths are bus bandwidths (bytes x 2(N-1)/N per second, NCCL-tests'
//! convention). Rank 0 prints one JSON line per size.

use std::time::Instant;

use lmd_model::candle::{Device, Tensor, Var};

use crate::dist::{average_gradients, Dist, BUCKET_ELEMS};
use crate::{Error, Result};

/// What to measure.
#[derive(Debug, Clone)]
pub struct AllreduceBenchOptions {
    /// Total f32 values per all-reduce (the gradient size), one line each.
    pub sizes: Vec<usize>,
    /// Timed repetitions per size (after one warm-up).
    pub iters: usize,
    /// Tensors the gradient is split into (parameters of a model).
    pub tensors: usize,
}

/// Run the measurement on every rank of `dist`; `emit` is called on rank 0.
pub fn allreduce(
    dist: &Dist,
    o: &AllreduceBenchOptions,
    mut emit: impl FnMut(serde_json::Value),
) -> Result<()> {
    let n = dist.world_size();
    if n < 2 {
        return Err(Error::Invalid(
            "lmd-bench allreduce needs several ranks: run it under mpirun -np 2 (a build with \
             --features mpi)"
                .into(),
        ));
    }
    let bus = 2.0 * (n as f64 - 1.0) / n as f64;
    for &elems in &o.sizes {
        let bytes = (elems * 4) as f64;
        // MPI's own all-reduce on a plain buffer
        let send = vec![1f32; elems];
        let mut recv = vec![0f32; elems];
        dist.comm().all_reduce_into_f32(&send, &mut recv)?;
        dist.comm().barrier()?;
        let t = Instant::now();
        for _ in 0..o.iters {
            dist.comm().all_reduce_into_f32(&send, &mut recv)?;
        }
        let raw_s = t.elapsed().as_secs_f64() / o.iters as f64;
        // the training path: gradients of `tensors` variables, averaged in buckets
        let per = elems.div_ceil(o.tensors.max(1));
        let vars: Vec<Var> = (0..o.tensors.max(1))
            .map(|i| {
                let k = per.min(elems.saturating_sub(i * per)).max(1);
                Var::from_tensor(&Tensor::ones(
                    k,
                    lmd_model::candle::DType::F32,
                    &Device::Cpu,
                )?)
            })
            .collect::<lmd_model::candle::Result<_>>()?;
        let refs: Vec<&Var> = vars.iter().collect();
        let mut loss = vars[0].as_tensor().sum_all()?;
        for v in &vars[1..] {
            loss = (loss + v.as_tensor().sum_all()?)?;
        }
        let mut grads = loss.backward()?;
        let calls = average_gradients(dist.comm(), &refs, &mut grads, BUCKET_ELEMS)?;
        dist.comm().barrier()?;
        let t = Instant::now();
        for _ in 0..o.iters {
            average_gradients(dist.comm(), &refs, &mut grads, BUCKET_ELEMS)?;
        }
        let ours_s = t.elapsed().as_secs_f64() / o.iters as f64;
        if dist.is_root() {
            emit(serde_json::json!({
                "bench": "allreduce",
                "world_size": n,
                "elems": elems,
                "bytes": elems * 4,
                "tensors": vars.len(),
                "bucket_calls": calls,
                "mpi_allreduce_busbw_gbps": bus * bytes / raw_s / 1e9,
                "buckets_busbw_gbps": bus * bytes / ours_s / 1e9,
                "buckets_vs_mpi": raw_s / ours_s,
                "mpi_allreduce_ms": raw_s * 1e3,
                "buckets_ms": ours_s * 1e3,
            }));
        }
    }
    Ok(())
}
