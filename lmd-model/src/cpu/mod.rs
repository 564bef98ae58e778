//! The fused CPU path: hand-written f32 forward and backward kernels for the hot spots of
//! training on the CPU, each one candle custom op.
//!
//! Layers, bottom up (each imports only those above it):
//! - [`math`]: branch-free scalar `exp`/`erf`;
//! - [`simd`]: the row kernels (LayerNorm, softmax, GELU, sums), compiled for AVX-512,
//!   AVX2+FMA and the baseline and chosen at run time;
//! - [`rows`]: those kernels over whole buffers, split over rayon in a fixed order;
//! - [`gemm`]: the one gemm wrapper and a Linear's forward and backward;
//! - [`attention`]: multi-head attention per (sample, head);
//! - [`ops`] (one op per layer: Linear, LayerNorm, softmax, GELU, batched matmul), [`block`]
//!   (a whole transformer block as one node) and [`conv`] (the VAEs' 3x3 convolution).
//!
//! Rules: everything here is f32 on the CPU and is called only through [`crate::Backend`],
//! which is where the choice between this path and candle's own ops is made. There is exactly
//! one LayerNorm, one softmax and one Linear kernel: the single-layer ops and the block share
//! them. Results are bit-reproducible from run to run.

pub(crate) mod attention;
pub(crate) mod block;
pub(crate) mod conv;
pub(crate) mod gemm;
pub(crate) mod math;
pub(crate) mod ops;
pub(crate) mod rows;
pub(crate) mod simd;

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// The f32 data of a contiguous CPU storage; errors name the op and the operand.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!(
            "{op}: {what} must be f32, not {:?}",
            candle_core::backend::BackendStorage::dtype(s)
        )
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// Run `f` on the f32 data of contiguous CPU tensors (`names` name them in errors), in the
/// order given: what an op's backward reads.
pub(crate) fn with_data<R>(
    ts: &[&Tensor],
    op: &str,
    names: &[&str],
    f: impl FnOnce(&[&[f32]]) -> R,
) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for ((storage, layout), what) in guards.iter().zip(names) {
        match &**storage {
            Storage::Cpu(s) => slices.push(f32_slice(s, layout, op, what)?),
            _ => candle_core::bail!("{op}: {what} must be on the CPU"),
        }
    }
    Ok(f(&slices))
}

/// Run `f` on a rayon worker thread. The gemms and row passes inside then fork from a worker
/// (work-stealing from its own deque) instead of injecting each job into the pool from outside
/// and sleeping on a latch until it ends: hundreds of cold hand-offs per block otherwise.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("the scope ran")
}
