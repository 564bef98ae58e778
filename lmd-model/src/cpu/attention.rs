//! Multi-head attention on plain buffers, forward and backward: one rayon task per (sample,
//! head), each running single-threaded gemms on strided views of the packed `qkv [R, 3C]`.

use rayon::prelude::*;

use super::gemm::{gemm_raw, SharedMut};
use super::simd;

/// Sizes of an attention call: `b` samples of `n` tokens, width `c` split into `heads`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub(crate) b: usize,
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) heads: usize,
}

impl Heads {
    fn rows(&self) -> usize {
        self.b * self.n
    }
}

/// Attention forward: per (sample, head), `P = softmax(q k^T / sqrt(hd))` into `p`, and
/// `P v` into that head's columns of `att [R, C]`.
pub(crate) fn attention_forward(d: &Heads, qkv: &[f32], p: &mut [f32], att: &mut [f32]) {
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
            simd::softmax_rows(pm, n);
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
pub(crate) fn attention_backward(
    d: &Heads,
    qkv: &[f32],
    p: &[f32],
    datt: &[f32],
    dqkv: &mut [f32],
) {
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
                simd::softmax_backward_rows(ds, pm, n, scale);
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
