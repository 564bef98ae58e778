//! Row and elementwise passes over plain f32 buffers, split over rayon in fixed groups: the
//! one LayerNorm (forward and backward), GELU, bias-gradient and residual code of the CPU path.
//!
//! Rules: results are bit-reproducible; partial sums are added in chunk order
//! ([`sum_in_order`]), never by rayon's stealing-dependent `reduce`.

use rayon::prelude::*;

use super::simd;

/// Rows per rayon task in the row passes (LayerNorm, column sums).
pub(crate) const ROW_GROUP: usize = 32;
/// Elements per rayon task in the elementwise passes (GELU).
pub(crate) const CHUNK: usize = 1 << 14;

/// Adds up per-chunk partial sums in chunk order. (Rayon's `reduce` combines them in a tree
/// that depends on work stealing, so float results would differ from run to run; training must
/// be bit-reproducible for resumed runs to match uninterrupted ones.)
pub(crate) fn sum_in_order(partials: Vec<Vec<f32>>, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; d];
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    out
}

/// Sums of the columns of `g [rows, d]` into `dst [d]` (a bias gradient).
pub(crate) fn col_sums(g: &[f32], dst: &mut [f32]) {
    let d = dst.len();
    let partials = g
        .par_chunks(d * ROW_GROUP * 4)
        .map(|grp| {
            let mut acc = vec![0f32; d];
            simd::add_col_sums(grp, &mut acc);
            acc
        })
        .collect::<Vec<_>>();
    let sums = sum_in_order(partials, d);
    dst.copy_from_slice(&sums);
}

/// LayerNorm forward per row: `xhat = (x - mean) · rstd`, `out = xhat · w + b`.
pub(crate) fn ln_forward(
    x: &[f32],
    (w, b): (&[f32], &[f32]),
    eps: f64,
    xhat: &mut [f32],
    rstd: &mut [f32],
    out: &mut [f32],
) {
    let d = w.len();
    out.par_chunks_mut(d * ROW_GROUP)
        .zip(xhat.par_chunks_mut(d * ROW_GROUP))
        .zip(rstd.par_chunks_mut(ROW_GROUP))
        .zip(x.par_chunks(d * ROW_GROUP))
        .for_each(|(((o, xh), rs), x)| simd::layer_norm_rows(x, w, b, eps as f32, xh, rs, o));
}

/// LayerNorm backward: adds the input gradient into `dx`, writes `dw` and `db`.
/// `dx += rstd · (gxn - mean(gxn) - xhat · mean(gxn · xhat))` with `gxn = g · w`.
pub(crate) fn ln_backward(
    g: &[f32],
    w: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    (dw, db): (&mut [f32], &mut [f32]),
) {
    let d = w.len();
    let partials = dx
        .par_chunks_mut(d * ROW_GROUP)
        .zip(g.par_chunks(d * ROW_GROUP))
        .zip(xhat.par_chunks(d * ROW_GROUP))
        .zip(rstd.par_chunks(ROW_GROUP))
        .map(|(((dx, g), xh), rs)| {
            let mut acc = vec![0f32; 3 * d];
            let (aw, rest) = acc.split_at_mut(d);
            let (ab, scratch) = rest.split_at_mut(d);
            simd::layer_norm_backward_rows(g, w, xh, rs, dx, aw, ab, scratch);
            acc.truncate(2 * d);
            acc
        })
        .collect::<Vec<_>>();
    let sums = sum_in_order(partials, 2 * d);
    dw.copy_from_slice(&sums[..d]);
    db.copy_from_slice(&sums[d..]);
}

pub(crate) fn gelu_forward(h: &[f32], g: &mut [f32]) {
    g.par_chunks_mut(CHUNK)
        .zip(h.par_chunks(CHUNK))
        .for_each(|(g, h)| simd::gelu_forward(h, g));
}

/// `dg *= Φ(h) + h·φ(h)` in place (GELU's derivative).
pub(crate) fn gelu_backward(h: &[f32], dg: &mut [f32]) {
    dg.par_chunks_mut(CHUNK)
        .zip(h.par_chunks(CHUNK))
        .for_each(|(dg, h)| simd::gelu_backward(h, dg));
}

/// `out = base + keep[sample] · out` (a residual add whose branch is scaled per sample:
/// stochastic depth); `keep` has one factor per sample, rows split evenly among them.
pub(crate) fn scaled_residual(base: &[f32], keep: &[f32], out: &mut [f32]) {
    let per = out.len() / keep.len();
    out.par_chunks_mut(per)
        .zip(base.par_chunks(per))
        .zip(keep)
        .for_each(|((o, s), &k)| o.iter_mut().zip(s).for_each(|(o, s)| *o = s + k * *o));
}

/// `g` with each sample's rows scaled by its `keep` factor.
pub(crate) fn scale_rows(g: &[f32], keep: &[f32]) -> Vec<f32> {
    let per = g.len() / keep.len();
    let mut out = filled_later(g.len());
    out.par_chunks_mut(per)
        .zip(g.par_chunks(per))
        .zip(keep)
        .for_each(|((o, g), &k)| o.iter_mut().zip(g).for_each(|(o, g)| *o = k * g));
    out
}

/// A buffer of `n` floats whose every element the caller writes before any is read (each
/// producer here — LayerNorm rows, gemm without `read_dst`, bias rows, GELU — covers its whole
/// output). Skipping `vec![0.0; n]`'s zero fill saves a pass over every activation: about 1 GB
/// per step at ViT-Ti, batch 64.
/// (candle's own `alloc_uninit` for CPU storage does the same.)
#[allow(clippy::uninit_vec)]
pub(crate) fn filled_later(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns, and callers write every element before reading
    // it (see above; in debug builds the buffer starts as NaN, which the tests comparing against
    // the composite block would see).
    unsafe { v.set_len(n) };
    // debug builds (the tests) start from NaN, so that a read before a write shows
    if cfg!(debug_assertions) {
        v.fill(f32::NAN);
    }
    v
}
