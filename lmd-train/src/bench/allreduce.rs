//! `lmd-bench allreduce` (run under `mpirun -np N`, or alone on a GPU): the gradient
//! all-reduce of data-parallel training ([`crate::dist::reduce_buckets`]: tensors packed into
//! flat buckets, summed, scaled, unpacked) against the engine's own all-reduce on a plain
//! buffer of the same size, in the same invocation: `MPI_Allreduce` for CPU tensors, and
//! `ncclAllReduce` on a device buffer for CUDA tensors in a build with `nccl` (which runs at
//! one rank too). The averaged gradients of ones must be ones (`buckets_max_abs_error`).
//! Bandwidths are bus bandwidths (bytes x 2(N-1)/N per second, NCCL-tests' convention; at one
//! rank the algorithm bandwidth, bytes per second). Rank 0 prints one JSON line per size.

use std::time::Instant;

use lmd_model::candle::{DType, Device, Tensor, Var};

use crate::dist::{reduce_buckets, Dist, Reducer, BUCKET_ELEMS};
use crate::{DeviceSpec, Error, Result};

/// What to measure.
#[derive(Debug, Clone)]
pub struct AllreduceBenchOptions {
    /// Total f32 values per all-reduce (the gradient size), one line each.
    pub sizes: Vec<usize>,
    /// Timed repetitions per size (after one warm-up).
    pub iters: usize,
    /// Tensors the gradient is split into (parameters of a model).
    pub tensors: usize,
    /// Where the gradients live: the CPU (MPI through host buffers) or `cuda:N` (NCCL on the
    /// device in a build with `nccl`, else MPI through host copies).
    pub device: DeviceSpec,
}

/// Run the measurement on every rank of `dist`; `emit` is called on rank 0.
pub fn allreduce(
    dist: &Dist,
    o: &AllreduceBenchOptions,
    mut emit: impl FnMut(serde_json::Value),
) -> Result<()> {
    let n = dist.world_size();
    let dev = dist.device_for(o.device).open()?;
    let reducer = dist.reducer(&dev)?;
    let on_host = matches!(reducer, Reducer::Host(_));
    if n < 2 && on_host {
        return Err(Error::Invalid(
            "lmd-bench allreduce through MPI needs several ranks: run it under mpirun -np 2 (a \
             build with --features mpi); one rank measures NCCL only (--device cuda:0, a build \
             with --features nccl)"
                .into(),
        ));
    }
    let (base, bus) = match on_host {
        true => ("mpi_allreduce", 2.0 * (n as f64 - 1.0) / n as f64),
        // at one rank NCCL's bus factor is 0: the algorithm bandwidth (bytes / s) instead
        false => (
            "nccl_allreduce",
            (2.0 * (n as f64 - 1.0) / n as f64).max(1.0),
        ),
    };
    for &elems in &o.sizes {
        let bytes = (elems * 4) as f64;
        // the engine's own all-reduce on one plain buffer of the same size
        let raw_s = match reducer {
            Reducer::Host(comm) => {
                let send = vec![1f32; elems];
                let mut recv = vec![0f32; elems];
                comm.all_reduce_into_f32(&send, &mut recv)?;
                timed(dist, &dev, o.iters, || {
                    comm.all_reduce_into_f32(&send, &mut recv)
                })?
            }
            #[cfg(feature = "nccl")]
            Reducer::Nccl(nccl) => {
                let buf = Tensor::zeros(elems, DType::F32, &dev)?;
                nccl.all_reduce_sum(&buf)?;
                timed(dist, &dev, o.iters, || nccl.all_reduce_sum(&buf))?
            }
        };
        // the training path: gradients of `tensors` variables, averaged in buckets
        let per = elems.div_ceil(o.tensors.max(1));
        let vars: Vec<Var> = (0..o.tensors.max(1))
            .map(|i| {
                let k = per.min(elems.saturating_sub(i * per)).max(1);
                Var::from_tensor(&Tensor::ones(k, DType::F32, &dev)?)
            })
            .collect::<lmd_model::candle::Result<_>>()?;
        let refs: Vec<&Var> = vars.iter().collect();
        let mut loss = vars[0].as_tensor().sum_all()?;
        for v in &vars[1..] {
            loss = (loss + v.as_tensor().sum_all()?)?;
        }
        let mut grads = loss.backward()?;
        let calls = reduce_buckets(reducer, n, &refs, &mut grads, BUCKET_ELEMS)?;
        // every rank's gradient is ones, so their average is ones
        let mut worst = 0f32;
        for v in &vars {
            let g = grads.get(v.as_tensor()).expect("a gradient per variable");
            let e = (g - 1.0)?.abs()?.max_all()?.to_scalar::<f32>()?;
            worst = worst.max(e);
        }
        let ours_s = timed(dist, &dev, o.iters, || {
            reduce_buckets(reducer, n, &refs, &mut grads, BUCKET_ELEMS).map(|_| ())
        })?;
        if dist.is_root() {
            let mut line = serde_json::json!({
                "bench": "allreduce",
                "device": o.device.to_string(),
                "reducer": reducer.name(),
                "world_size": n,
                "elems": elems,
                "bytes": elems * 4,
                "tensors": vars.len(),
                "bucket_calls": calls,
                "buckets_max_abs_error": worst,
                "buckets_busbw_gbps": bus * bytes / ours_s / 1e9,
                "buckets_ms": ours_s * 1e3,
            });
            let short = base.trim_end_matches("_allreduce");
            line[format!("{base}_busbw_gbps")] = (bus * bytes / raw_s / 1e9).into();
            line[format!("{base}_ms")] = (raw_s * 1e3).into();
            line[format!("buckets_vs_{short}")] = (raw_s / ours_s).into();
            emit(line);
        }
        if worst > 1e-6 {
            return Err(Error::Invalid(format!(
                "allreduce: the averaged gradients of ones are off by {worst} ({})",
                reducer.name()
            )));
        }
    }
    Ok(())
}

/// Seconds per call of `f`, over `iters` calls that start together on every rank (a barrier)
/// and end when the device has finished them.
fn timed(
    dist: &Dist,
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    dev.synchronize()?;
    dist.comm().barrier()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
}
