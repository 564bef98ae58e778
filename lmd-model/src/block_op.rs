//! One pre-norm transformer block (timm's `Block`, as MAE uses it) as a single graph node:
//! forward and backward written out by hand, for f32 on the CPU.
//!
//! Why: candle's backward zero-fills and adds a gradient for every node, and a block built from
//! ops has about 25 of them (views, copies of q/k/v, the head merge, residual adds), several
//! the size of the activations. Here a block is one node. Its twelve parameters enter as one
//! packed vector (a `cat` of the flattened parameters, whose backward hands each parameter its
//! slice). The forward saves what the backward needs inside the op; the backward is eight
//! row-wide gemms, the attention products per (sample, head) and a few passes over rows.
//!
//! Rules:
//! - Row-wide products are one gemm over all `B·N` rows, split over candle's threads; attention
//!   runs one (sample, head) per rayon task with single-threaded gemms. Forward and backward run
//!   on a rayon worker, so every fork is local to the pool.
//! - Results are bit-reproducible: partial sums are added in a fixed order, never by rayon's
//!   stealing-dependent `reduce` (resumed training must match uninterrupted training).
//! - Activations are saved only when an input tracks gradients. The backward takes them, and
//!   recomputes them if they are gone (a second backward through the same graph).
//! - Stochastic depth is per-sample factors on the two residual branches.
//! - f64, other devices, and threads where [`set_fused_blocks`] switched it off use the
//!   composite block in `crate::mae`; the tests here compare the two, forward and every
//!   gradient.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::kernels;

/// Rows per rayon task in the row passes (LayerNorm, column sums).
const ROW_GROUP: usize = 32;
/// Elements per rayon task in the elementwise passes (GELU).
const CHUNK: usize = 1 << 14;

/// The block's sizes: `x [b, n, c]`, `heads` heads, MLP width `hidden`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    n: usize,
    c: usize,
    heads: usize,
    hidden: usize,
    eps: f64,
}

impl Dims {
    fn rows(&self) -> usize {
        self.b * self.n
    }

    /// Element counts of the packed parameters, in [`PARAM_ORDER`].
    fn sizes(&self) -> [usize; 12] {
        let (c, m) = (self.c, self.hidden);
        [c, c, 3 * c * c, 3 * c, c * c, c, c, c, m * c, m, c * m, c]
    }

    fn pack_len(&self) -> usize {
        self.sizes().iter().sum()
    }
}

/// The parameters in packing order (timm's names, relative to the block).
pub(crate) const PARAM_ORDER: [&str; 12] = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
];

/// The packed vector cut into the twelve parameters.
fn split<'a, T>(mut s: &'a mut [T], d: &Dims) -> [&'a mut [T]; 12] {
    let mut parts: [&mut [T]; 12] = Default::default();
    for (p, len) in parts.iter_mut().zip(d.sizes()) {
        let (a, rest) = std::mem::take(&mut s).split_at_mut(len);
        *p = a;
        s = rest;
    }
    parts
}

fn split_ref<'a>(s: &'a [f32], d: &Dims) -> [&'a [f32]; 12] {
    let mut out: [&[f32]; 12] = [&[]; 12];
    let mut at = 0;
    for (o, len) in out.iter_mut().zip(d.sizes()) {
        *o = &s[at..at + len];
        at += len;
    }
    out
}

/// What the forward keeps for the backward.
struct Saved {
    xhat1: Vec<f32>, // [R, C] norm1's input, normalised
    rstd1: Vec<f32>, // [R]
    a1: Vec<f32>,    // [R, C] norm1's output
    qkv: Vec<f32>,   // [R, 3C]
    p: Vec<f32>,     // [B, H, N, N] attention probabilities
    att: Vec<f32>,   // [R, C] heads merged, proj's input
    xhat2: Vec<f32>, // [R, C]
    rstd2: Vec<f32>, // [R]
    a2: Vec<f32>,    // [R, C] norm2's output
    h: Vec<f32>,     // [R, M] fc1's output
    g: Vec<f32>,     // [R, M] GELU(h)
}

/// A raw pointer shared by parallel tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used for writes to disjoint regions, one region per task (see the callers).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

fn parallelism() -> gemm::Parallelism {
    parallelism_of(candle_core::utils::get_num_threads())
}

fn parallelism_of(threads: usize) -> gemm::Parallelism {
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
unsafe fn gemm_raw(
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
fn linear(x: &[f32], w: &[f32], bias: &[f32], base: Option<&[f32]>, out: &mut [f32]) {
    let (out_d, in_d) = (bias.len(), w.len() / bias.len());
    let rows = x.len() / in_d;
    assert_eq!(out.len(), rows * out_d);
    match base {
        Some(base) => out
            .par_chunks_mut(out_d * ROW_GROUP)
            .zip(base.par_chunks(out_d * ROW_GROUP))
            .for_each(|(o, s)| kernels::add_rows(s, bias, o)),
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
fn linear_backward(
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

/// Adds up per-chunk partial sums in chunk order. (Rayon's `reduce` combines them in a tree
/// that depends on work stealing, so float results would differ from run to run; training must
/// be bit-reproducible for resumed runs to match uninterrupted ones.)
fn sum_in_order(partials: Vec<Vec<f32>>, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; d];
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    out
}

/// Sums of the columns of `g [rows, d]` into `dst [d]` (a bias gradient).
fn col_sums(g: &[f32], dst: &mut [f32]) {
    let d = dst.len();
    let partials = g
        .par_chunks(d * ROW_GROUP * 4)
        .map(|grp| {
            let mut acc = vec![0f32; d];
            kernels::add_col_sums(grp, &mut acc);
            acc
        })
        .collect::<Vec<_>>();
    let sums = sum_in_order(partials, d);
    dst.copy_from_slice(&sums);
}

/// LayerNorm forward per row: `xhat = (x - mean) · rstd`, `out = xhat · w + b`.
fn ln_forward(
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
        .for_each(|(((o, xh), rs), x)| kernels::layer_norm_rows(x, w, b, eps as f32, xh, rs, o));
}

/// LayerNorm backward: adds the input gradient into `dx`, writes `dw` and `db`.
/// `dx += rstd · (gxn - mean(gxn) - xhat · mean(gxn · xhat))` with `gxn = g · w`.
fn ln_backward(
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
            kernels::layer_norm_backward_rows(g, w, xh, rs, dx, aw, ab, scratch);
            acc.truncate(2 * d);
            acc
        })
        .collect::<Vec<_>>();
    let sums = sum_in_order(partials, 2 * d);
    dw.copy_from_slice(&sums[..d]);
    db.copy_from_slice(&sums[d..]);
}

fn gelu_forward(h: &[f32], g: &mut [f32]) {
    g.par_chunks_mut(CHUNK)
        .zip(h.par_chunks(CHUNK))
        .for_each(|(g, h)| kernels::gelu_forward(h, g));
}

/// `dg *= Φ(h) + h·φ(h)` in place (GELU's derivative).
fn gelu_backward(h: &[f32], dg: &mut [f32]) {
    dg.par_chunks_mut(CHUNK)
        .zip(h.par_chunks(CHUNK))
        .for_each(|(dg, h)| kernels::gelu_backward(h, dg));
}

/// Attention forward: per (sample, head), `P = softmax(q k^T / sqrt(hd))` into `p`, and
/// `P v` into that head's columns of `att [R, C]`.
fn attention_forward(d: &Dims, qkv: &[f32], p: &mut [f32], att: &mut [f32]) {
    let (n, c, heads) = (d.n, d.c, d.heads);
    let (hd, c3) = (c / heads, 3 * c);
    let scale = 1.0 / (hd as f32).sqrt();
    assert_eq!(qkv.len(), d.rows() * c3);
    assert_eq!(att.len(), d.rows() * c);
    let att = SharedMut(att.as_mut_ptr());
    p.par_chunks_mut(n * n).enumerate().for_each(|(bh, pm)| {
        let (bi, h) = (bh / heads, bh % heads);
        let q = qkv[bi * n * c3 + h * hd..].as_ptr();
        // SAFETY: q, k, v are [n, hd] views (row stride 3C) inside this sample's rows of qkv;
        // pm is this task's own [n, n]; the output is this (sample, head)'s [n, hd] block of
        // att (row stride C), written by no other task.
        unsafe {
            let (k, v) = (q.add(c), q.add(2 * c));
            gemm_raw(
                (n, n, hd),
                pm.as_mut_ptr(),
                n,
                false,
                (q, c3, 1),
                (k, 1, c3),
                scale,
                gemm::Parallelism::None,
            );
            kernels::softmax_rows(pm, n);
            gemm_raw(
                (n, hd, n),
                att.at(bi * n * c + h * hd),
                c,
                false,
                (pm.as_ptr(), n, 1),
                (v, c3, 1),
                1.0,
                gemm::Parallelism::None,
            );
        }
    });
}

/// Attention backward: from `datt [R, C]` (the gradient at the merged heads) to
/// `dqkv [R, 3C]`, per (sample, head).
fn attention_backward(d: &Dims, qkv: &[f32], p: &[f32], datt: &[f32], dqkv: &mut [f32]) {
    let (n, c, heads) = (d.n, d.c, d.heads);
    let (hd, c3) = (c / heads, 3 * c);
    let scale = 1.0 / (hd as f32).sqrt();
    assert_eq!(dqkv.len(), d.rows() * c3);
    assert_eq!(datt.len(), d.rows() * c);
    assert_eq!(p.len(), d.b * heads * n * n);
    let dqkv = SharedMut(dqkv.as_mut_ptr());
    (0..d.b * heads).into_par_iter().for_each_init(
        || vec![0f32; n * n],
        |ds, bh| {
            let (bi, h) = (bh / heads, bh % heads);
            let pm = &p[bh * n * n..(bh + 1) * n * n];
            let base = bi * n * c3 + h * hd;
            let q = qkv[base..].as_ptr();
            let d_o = datt[bi * n * c + h * hd..].as_ptr();
            // SAFETY: as in `attention_forward`; ds is this task's own [n, n] scratch, and
            // dq, dk, dv are this (sample, head)'s [n, hd] blocks of dqkv (row stride 3C),
            // written by no other task.
            unsafe {
                let (k, v) = (q.add(c), q.add(2 * c));
                // dP = dO v^T
                gemm_raw(
                    (n, n, hd),
                    ds.as_mut_ptr(),
                    n,
                    false,
                    (d_o, c, 1),
                    (v, 1, c3),
                    1.0,
                    gemm::Parallelism::None,
                );
                // dS = P (dP - rowsum(dP P)) · scale
                kernels::softmax_backward_rows(ds, pm, n, scale);
                // dv = P^T dO
                gemm_raw(
                    (n, hd, n),
                    dqkv.at(base + 2 * c),
                    c3,
                    false,
                    (pm.as_ptr(), 1, n),
                    (d_o, c, 1),
                    1.0,
                    gemm::Parallelism::None,
                );
                // dq = dS k
                gemm_raw(
                    (n, hd, n),
                    dqkv.at(base),
                    c3,
                    false,
                    (ds.as_ptr(), n, 1),
                    (k, c3, 1),
                    1.0,
                    gemm::Parallelism::None,
                );
                // dk = dS^T q
                gemm_raw(
                    (n, hd, n),
                    dqkv.at(base + c),
                    c3,
                    false,
                    (ds.as_ptr(), 1, n),
                    (q, c3, 1),
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        },
    );
}

/// `out = base + keep[sample] · out` (a residual add whose branch is scaled per sample:
/// stochastic depth); `keep` has one factor per sample, rows split evenly among them.
fn scaled_residual(base: &[f32], keep: &[f32], out: &mut [f32]) {
    let per = out.len() / keep.len();
    out.par_chunks_mut(per)
        .zip(base.par_chunks(per))
        .zip(keep)
        .for_each(|((o, s), &k)| o.iter_mut().zip(s).for_each(|(o, s)| *o = s + k * *o));
}

/// `g` with each sample's rows scaled by its `keep` factor.
fn scale_rows(g: &[f32], keep: &[f32]) -> Vec<f32> {
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
fn filled_later(n: usize) -> Vec<f32> {
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

/// The block's forward on plain buffers: the output `[R, C]`, and the saved activations.
fn forward(
    d: &Dims,
    x: &[f32],
    pack: &[f32],
    keep: Option<&[Vec<f32>; 2]>,
    save: bool,
) -> (Vec<f32>, Option<Saved>) {
    let (r, c, m) = (d.rows(), d.c, d.hidden);
    let [n1w, n1b, qkv_w, qkv_b, proj_w, proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, fc2_b] =
        split_ref(pack, d);
    let (mut xhat1, mut rstd1, mut a1) =
        (filled_later(r * c), filled_later(r), filled_later(r * c));
    ln_forward(x, (n1w, n1b), d.eps, &mut xhat1, &mut rstd1, &mut a1);
    let mut qkv = filled_later(r * 3 * c);
    linear(&a1, qkv_w, qkv_b, None, &mut qkv);
    let mut p = filled_later(d.b * d.heads * d.n * d.n);
    let mut att = filled_later(r * c);
    attention_forward(d, &qkv, &mut p, &mut att);
    let mut y1 = filled_later(r * c);
    match keep {
        None => linear(&att, proj_w, proj_b, Some(x), &mut y1), // x + proj(att)
        Some([k1, _]) => {
            linear(&att, proj_w, proj_b, None, &mut y1);
            scaled_residual(x, k1, &mut y1); // x + k1 · proj(att)
        }
    }
    let (mut xhat2, mut rstd2, mut a2) =
        (filled_later(r * c), filled_later(r), filled_later(r * c));
    ln_forward(&y1, (n2w, n2b), d.eps, &mut xhat2, &mut rstd2, &mut a2);
    let mut h = filled_later(r * m);
    linear(&a2, fc1_w, fc1_b, None, &mut h);
    let mut g = filled_later(r * m);
    gelu_forward(&h, &mut g);
    let mut y = filled_later(r * c);
    match keep {
        None => linear(&g, fc2_w, fc2_b, Some(&y1), &mut y), // y1 + fc2(gelu(fc1(norm2(y1))))
        Some([_, k2]) => {
            linear(&g, fc2_w, fc2_b, None, &mut y);
            scaled_residual(&y1, k2, &mut y);
        }
    }
    let saved = save.then_some(Saved {
        xhat1,
        rstd1,
        a1,
        qkv,
        p,
        att,
        xhat2,
        rstd2,
        a2,
        h,
        g,
    });
    (y, saved)
}

/// The block's backward on plain buffers: `(dx, dpack)` from the output gradient `dy`.
fn backward(
    d: &Dims,
    pack: &[f32],
    keep: Option<&[Vec<f32>; 2]>,
    s: Saved,
    dy: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (r, c, m) = (d.rows(), d.c, d.hidden);
    let [n1w, _, qkv_w, _, proj_w, _, n2w, _, fc1_w, _, fc2_w, _] = split_ref(pack, d);
    let mut dpack = vec![0f32; pack.len()];
    let [dn1w, dn1b, dqkv_w, dqkv_b, dproj_w, dproj_b, dn2w, dn2b, dfc1_w, dfc1_b, dfc2_w, dfc2_b] =
        split(&mut dpack, d);
    // fc2
    let mut dh = filled_later(r * m);
    // the MLP branch's output gradient: dy, scaled per sample under drop path
    let dy_mlp = keep.map(|[_, k2]| scale_rows(dy, k2));
    let dy_mlp = dy_mlp.as_deref().unwrap_or(dy);
    linear_backward(dy_mlp, &s.g, fc2_w, &mut dh, (dfc2_w, dfc2_b));
    drop(s.g);
    // GELU, fc1
    gelu_backward(&s.h, &mut dh);
    drop(s.h);
    let mut da = filled_later(r * c);
    linear_backward(&dh, &s.a2, fc1_w, &mut da, (dfc1_w, dfc1_b));
    drop(dh);
    // norm2, and the residual: dy1 = dy + norm2's input gradient
    let mut dy1 = dy.to_vec();
    ln_backward(&da, n2w, &s.xhat2, &s.rstd2, &mut dy1, (dn2w, dn2b));
    // proj
    let dy_att = keep.map(|[k1, _]| scale_rows(&dy1, k1));
    let dy_att = dy_att.as_deref().unwrap_or(&dy1);
    linear_backward(dy_att, &s.att, proj_w, &mut da, (dproj_w, dproj_b)); // da is now d(att)
                                                                          // attention
    let mut dqkv = filled_later(r * 3 * c);
    attention_backward(d, &s.qkv, &s.p, &da, &mut dqkv);
    drop((s.p, s.qkv));
    // qkv
    linear_backward(&dqkv, &s.a1, qkv_w, &mut da, (dqkv_w, dqkv_b)); // da is now d(a1)
                                                                     // norm1, and the residual: dx = dy1 + norm1's input gradient
    let mut dx = dy1;
    ln_backward(&da, n1w, &s.xhat1, &s.rstd1, &mut dx, (dn1w, dn1b));
    (dx, dpack)
}

/// Run `f` on a rayon worker thread. The gemms and row passes inside then fork from a worker
/// (work-stealing from its own deque) instead of injecting each job into the pool from outside
/// and sleeping on a latch until it ends: hundreds of cold hand-offs per block otherwise.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("the scope ran")
}

struct BlockOp {
    dims: Dims,
    /// Per-sample factors of the attention and MLP branches (stochastic depth), or none.
    keep: Option<[Vec<f32>; 2]>,
    save: bool,
    saved: Mutex<Option<Saved>>,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("lmd-block: {what} must be f32")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("lmd-block: {what} must be contiguous"),
    }
}

/// Run `f` on the f32 data of a contiguous CPU tensor.
fn with_data<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok(f(f32_slice(s, layout, what)?)),
        _ => candle_core::bail!("lmd-block: {what} must be on the CPU"),
    }
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "lmd-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let pack = f32_slice(s2, l2, "the packed parameters")?;
        let (y, saved) = on_pool(|| forward(&self.dims, x, pack, self.keep.as_ref(), self.save));
        *self.saved.lock().expect("lmd-block: poisoned lock") = saved;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().expect("lmd-block: poisoned lock").take();
        let grad = grad.contiguous()?;
        let (dx, dpack) = with_data(x, "x", |xs| {
            with_data(pack, "the packed parameters", |ps| {
                with_data(&grad, "the gradient", |gs| {
                    let saved = saved.unwrap_or_else(|| {
                        forward(&self.dims, xs, ps, self.keep.as_ref(), true)
                            .1
                            .expect("saved")
                    });
                    on_pool(|| backward(&self.dims, ps, self.keep.as_ref(), saved, gs))
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dpack, pack.shape(), pack.device())?),
        ))
    }
}

thread_local! {
    static FUSED_BLOCKS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Turn the fused block node on or off for models run on this thread (on by default). Off,
/// every block runs as candle ops: the baseline of `lmd-bench train-step --composite-baseline`,
/// and a way to rule the fused op out when debugging. Per thread, so that tests running side by
/// side in one process do not switch each other's path.
pub fn set_fused_blocks(on: bool) {
    FUSED_BLOCKS.with(|f| f.set(on));
}

/// Whether [`block`] runs the fused node for this input (f32 on the CPU, `[B, N, C]`, not
/// switched off on this thread by [`set_fused_blocks`]).
pub(crate) fn supported(x: &Tensor) -> bool {
    FUSED_BLOCKS.with(|f| f.get())
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() == 3
}

/// The block `y = x + attn(norm1(x)); y + mlp(norm2(y))` as one node. `params` in
/// [`PARAM_ORDER`], PyTorch layouts (`[out, in]` weights). With `keep = [k1, k2]` (one factor
/// per sample each: stochastic depth) the branches are scaled: `x + k1·attn(..)`, `y + k2·mlp(..)`.
pub(crate) fn block(
    x: &Tensor,
    params: [&Tensor; 12],
    heads: usize,
    eps: f64,
    keep: Option<[Vec<f32>; 2]>,
) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    // the MLP width from fc1.weight `[hidden, c]` (not from a bias: a wrong bias must be named
    // as itself, not make its weight look wrong)
    let hidden = match params[8].dims() {
        [m, _] => *m,
        d => candle_core::bail!("lmd-block: mlp.fc1.weight is {d:?}, want [hidden, {c}]"),
    };
    let dims = Dims {
        b,
        n,
        c,
        heads,
        hidden,
        eps,
    };
    if heads == 0 || c % heads != 0 {
        candle_core::bail!("lmd-block: width {c} is not a multiple of {heads} heads")
    }
    for ((p, want), name) in params.iter().zip(dims.sizes()).zip(PARAM_ORDER) {
        if p.elem_count() != want || p.dtype() != DType::F32 {
            candle_core::bail!(
                "lmd-block: {name} is {:?} {:?}, want {want} f32 elements for width {c}, MLP {hidden}",
                p.dtype(),
                p.dims()
            )
        }
    }
    if let Some(k) = &keep {
        if k.iter().any(|k| k.len() != b) {
            candle_core::bail!("lmd-block: drop-path factors must have one entry per sample ({b})")
        }
    }
    let flat = params
        .iter()
        .map(|p| p.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    let pack = Tensor::cat(&flat, 0)?;
    debug_assert_eq!(pack.elem_count(), dims.pack_len());
    let save = x.track_op() || pack.track_op();
    x.contiguous()?.apply_op2(
        &pack,
        BlockOp {
            dims,
            keep,
            save,
            saved: Mutex::new(None),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mae::Block;
    use crate::test_util::maxdiff;
    use candle_core::{Device, Module, Var};
    use candle_nn::{VarBuilder, VarMap};

    /// A block with every parameter random (LayerNorm affines too), and its variables by name.
    fn random_block(dim: usize, heads: usize, seed: u64) -> (Block, Vec<(String, Var)>) {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let block = Block::new(dim, heads, 4.0, 1e-6, vb).unwrap();
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut rng = crate::mae::SplitMix(seed);
        for (_, v) in &vars {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| (rng.uniform() * 2.0 - 1.0) as f32 * 0.5)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &dev).unwrap())
                .unwrap();
        }
        assert_eq!(vars.len(), 12);
        (block, vars)
    }

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::mae::SplitMix(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The fused block equals the composite one: output, input gradient and all twelve
    /// parameter gradients, over shapes with 1 and several heads and odd token counts.
    #[test]
    fn fused_block_matches_composite_forward_and_every_gradient() {
        for (b, n, dim, heads, seed) in [(3, 7, 12, 3, 1), (2, 50, 16, 1, 2), (4, 13, 24, 4, 3)] {
            let (block, vars) = random_block(dim, heads, seed);
            let x = Var::from_tensor(&random(&[b, n, dim], seed + 10)).unwrap();
            assert!(supported(x.as_tensor()));
            let fused = super::block(x.as_tensor(), block.params(), heads, 1e-6, None).unwrap();
            let composite = block.forward_composite(x.as_tensor()).unwrap();
            assert_same(&fused, &composite, &x, vars, seed);
        }
    }

    /// With stochastic depth: each sample's attention and MLP branches scaled by its factors
    /// (0 drops the branch), against the composite block with the same factors.
    #[test]
    fn fused_block_with_drop_path_matches_composite() {
        let (b, n, dim, heads) = (4, 9, 12, 3);
        let (block, vars) = random_block(dim, heads, 31);
        let x = Var::from_tensor(&random(&[b, n, dim], 32)).unwrap();
        let keep = [vec![1.25, 0.0, 1.25, 1.25], vec![0.0, 1.25, 1.25, 0.0]];
        let fused = super::block(
            x.as_tensor(),
            block.params(),
            heads,
            1e-6,
            Some(keep.clone()),
        )
        .unwrap();
        let composite = block.forward_composite_keep(x.as_tensor(), &keep).unwrap();
        assert_same(&fused, &composite, &x, vars, 33);
        // the drop-path forward of the block takes the fused path and draws the same factors
        let mut r1 = crate::mae::SplitMix(5);
        let mut r2 = crate::mae::SplitMix(5);
        let y = block
            .forward_drop_path(x.as_tensor(), 0.5, &mut r1)
            .unwrap();
        let keep: [Vec<f32>; 2] = std::array::from_fn(|_| {
            (0..b)
                .map(|_| if r2.uniform() < 0.5 { 2.0 } else { 0.0 })
                .collect()
        });
        let want = block.forward_composite_keep(x.as_tensor(), &keep).unwrap();
        assert!(maxdiff(&y, &want) < 2e-5);
        let err = super::block(
            x.as_tensor(),
            block.params(),
            heads,
            1e-6,
            Some([vec![1.0], vec![1.0]]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("one entry per sample"), "{err}");
    }

    /// `fused` and `composite` (outputs of `x`) agree, and so do the gradients of `sum(y · probe)`
    /// for `x` and every variable.
    fn assert_same(
        fused: &Tensor,
        composite: &Tensor,
        x: &Var,
        vars: Vec<(String, Var)>,
        seed: u64,
    ) {
        let d = maxdiff(fused, composite);
        assert!(d < 2e-5, "forward differs by {d}");
        let probe = random(fused.dims(), seed + 20);
        let g1 = (fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (composite * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut checked = 0;
        for (name, v) in std::iter::once(("x".to_string(), x.clone())).chain(vars) {
            let (a, c) = (
                g1.get(v.as_tensor()).expect("fused gradient"),
                g2.get(v.as_tensor()).expect("composite gradient"),
            );
            let scale = c
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = maxdiff(a, c);
            assert!(scale > 0.0, "{name}: zero gradient");
            assert!(
                d <= 2e-5 * (1.0 + scale),
                "{name}: gradient differs by {d} (max {scale})"
            );
            checked += 1;
        }
        assert_eq!(checked, 13);
    }

    /// Regression (resumed training runs diverged from uninterrupted ones in the 10th digit):
    /// the parameter-gradient sums used rayon's `reduce`, whose combining order follows work
    /// stealing. The same inputs must give bit-identical gradients every time.
    #[test]
    fn gradients_are_bit_identical_from_run_to_run() {
        let (block, vars) = random_block(16, 2, 21);
        let x = Var::from_tensor(&random(&[8, 300, 16], 22)).unwrap();
        let grads = || {
            let loss = block
                .forward(x.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            vars.iter()
                .map(|(_, v)| {
                    g.get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect::<Vec<_>>()
        };
        let first = grads();
        for _ in 0..12 {
            assert!(grads() == first, "gradients differ between identical runs");
        }
    }

    /// A second backward through the same graph finds the saved activations gone and
    /// recomputes them: the same gradients.
    #[test]
    fn second_backward_recomputes_the_saved_activations() {
        let (block, vars) = random_block(12, 2, 7);
        let x = Var::from_tensor(&random(&[2, 9, 12], 8)).unwrap();
        let loss = block
            .forward(x.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let g1 = loss.backward().unwrap();
        let g2 = loss.backward().unwrap();
        for v in std::iter::once(&x).chain(vars.iter().map(|(_, v)| v)) {
            let d = maxdiff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert_eq!(d, 0.0);
        }
    }

    /// Without gradients to track (inference) the op saves nothing and gives the same output.
    #[test]
    fn inference_forward_saves_nothing_and_matches() {
        let (block, _) = random_block(12, 3, 9);
        let x = random(&[2, 5, 12], 10);
        let params: Vec<Tensor> = block.params().iter().map(|p| p.detach()).collect();
        let p: [&Tensor; 12] = std::array::from_fn(|i| &params[i]);
        let y = super::block(&x, p, 3, 1e-6, None).unwrap();
        assert!(!y.track_op());
        let d = maxdiff(&y, &block.forward_composite(&x).unwrap());
        assert!(d < 2e-5, "{d}");
    }

    #[test]
    fn mismatched_parameters_are_named_as_themselves_a_wrong_fc1_bias_too() {
        let (block, _) = random_block(12, 3, 11);
        let mut p = block.params();
        let wrong = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        p[9] = &wrong; // fc1.bias
        let err = super::block(&random(&[1, 4, 12], 1), p, 3, 1e-6, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mlp.fc1.bias") && !err.contains("fc1.weight"),
            "{err}"
        );
        let mut p = block.params();
        let wrong_w = Tensor::zeros((48, 5), DType::F32, &Device::Cpu).unwrap();
        p[8] = &wrong_w; // fc1.weight
        let err = super::block(&random(&[1, 4, 12], 1), p, 3, 1e-6, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("mlp.fc1.weight"), "{err}");
        let p = block.params();
        let err = super::block(&random(&[1, 4, 12], 1), p, 5, 1e-6, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a multiple of 5 heads"), "{err}");
    }
}
