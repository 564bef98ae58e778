//! The gemm wrapper: every matrix product of the CPU kernels goes through [`gemm_raw`] (the
//! `gemm` crate, which candle's CPU matmul also uses), and a Linear's forward and backward on
//! plain row-major buffers.
//!
//! Rules: row-wide products split over candle's thread count ([`parallelism`]); per-(sample,
//! head) products inside rayon tasks run single-threaded (`gemm::Parallelism::None`).

use rayon::prelude::*;

use super::rows::{col_sums, ROW_GROUP};
use super::simd;

/// A raw pointer shared by parallel tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: only used for writes to disjoint regions, one region per task (see the callers).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

pub(crate) fn parallelism() -> gemm::Parallelism {
    parallelism_of(candle_core::utils::get_num_threads())
}

pub(crate) fn parallelism_of(threads: usize) -> gemm::Parallelism {
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst[m, n] (+)= scale · A[m, k] · B[k, n]` with explicit (row, column) strides.
///
/// # Safety
/// Every pointer with its strides must describe an in-bounds matrix of the given size, and
/// `dst` must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    scale: f32,
    par: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// `out[rows, out_d] = base + bias + x[rows, in_d] · W[out_d, in_d]^T` (`base` optional).
pub(crate) fn linear(x: &[f32], w: &[f32], bias: &[f32], base: Option<&[f32]>, out: &mut [f32]) {
    let (out_d, in_d) = (bias.len(), w.len() / bias.len());
    let rows = x.len() / in_d;
    assert_eq!(out.len(), rows * out_d);
    match base {
        Some(base) => out
            .par_chunks_mut(out_d * ROW_GROUP)
            .zip(base.par_chunks(out_d * ROW_GROUP))
            .for_each(|(o, s)| simd::add_rows(s, bias, o)),
        None => out
            .par_chunks_mut(out_d)
            .for_each(|o| o.copy_from_slice(bias)),
    }
    // SAFETY: x is [rows, in_d], W^T is read from W's [out_d, in_d] storage, out is
    // [rows, out_d]; all contiguous and in bounds (lengths checked above).
    unsafe {
        gemm_raw(
            (rows, out_d, in_d),
            out.as_mut_ptr(),
            out_d,
            true,
            (x.as_ptr(), in_d, 1),
            (w.as_ptr(), 1, in_d),
            1.0,
            parallelism(),
        )
    }
}

/// `dst[rows, n] = a[rows, k] · w[k, n]` (the input gradient of a Linear with `w [out, in]`).
fn matmul_nn(a: &[f32], w: &[f32], k: usize, dst: &mut [f32], par: gemm::Parallelism) {
    let n = w.len() / k;
    let rows = a.len() / k;
    assert_eq!(dst.len(), rows * n);
    // SAFETY: contiguous [rows, k], [k, n] and [rows, n], sizes checked above.
    unsafe {
        gemm_raw(
            (rows, n, k),
            dst.as_mut_ptr(),
            n,
            false,
            (a.as_ptr(), k, 1),
            (w.as_ptr(), n, 1),
            1.0,
            par,
        )
    }
}

/// `dw[out, in] = g[rows, out]^T · x[rows, in]` (a Linear's weight gradient).
fn matmul_tn(g: &[f32], x: &[f32], out_d: usize, dw: &mut [f32], par: gemm::Parallelism) {
    let rows = g.len() / out_d;
    let in_d = x.len() / rows;
    assert_eq!(dw.len(), out_d * in_d);
    // SAFETY: g^T is read from g's [rows, out_d] storage; x is [rows, in_d]; dw is
    // [out_d, in_d]; sizes checked above.
    unsafe {
        gemm_raw(
            (out_d, in_d, rows),
            dw.as_mut_ptr(),
            in_d,
            false,
            (g.as_ptr(), 1, out_d),
            (x.as_ptr(), in_d, 1),
            1.0,
            par,
        )
    }
}

/// A Linear's backward from the output gradient `g [rows, out]`: `dx = g · W`,
/// `dW = g^T · x`, `db = Σ_rows g`. The input and weight gradients are independent, so they run
/// side by side, each gemm on half the threads: for these shapes that beats one gemm after the
/// other on all threads (2 threads: 172-212 against 141-205 GFLOP/s, `dW`'s long reduction
/// splitting badly).
pub(crate) fn linear_backward(
    g: &[f32],
    x: &[f32],
    w: &[f32],
    dx: &mut [f32],
    (dw, db): (&mut [f32], &mut [f32]),
) {
    let out_d = db.len();
    let threads = candle_core::utils::get_num_threads();
    if threads < 2 {
        matmul_nn(g, w, out_d, dx, gemm::Parallelism::None);
        matmul_tn(g, x, out_d, dw, gemm::Parallelism::None);
        col_sums(g, db);
        return;
    }
    let half = threads / 2;
    rayon::join(
        || matmul_nn(g, w, out_d, dx, parallelism_of(half)),
        || {
            matmul_tn(g, x, out_d, dw, parallelism_of(threads - half));
            col_sums(g, db);
        },
    );
}
