//! One custom op per layer, f32 on the CPU, each with its backward: Linear, LayerNorm,
//! softmax, exact GELU and the batched matmul of attention. They run the same kernels as the
//! fused block ([`super::rows`], [`super::gemm`], [`super::simd`]).
//!
//! Why: composite candle graphs spend most of a CPU step outside matmul: one pass over memory
//! per elementwise op, and gradient sums over leading (non-contiguous) dimensions for every
//! bias and LayerNorm affine. Here the forward is one pass per row, and parameter gradients
//! are column sums in a fixed order.
//!
//! Rules: inputs are made contiguous before the op; every op refuses a non-f32 or non-CPU
//! operand by name (the choice of this path is [`crate::Backend`]'s, never made here).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::rows::{filled_later, gelu_backward, gelu_forward, ln_backward, ln_forward, ROW_GROUP};
use super::{f32_slice, gemm, on_pool, simd, with_data};

fn width(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

// ---------------------------------------------------------------------------------------------
// Linear: x [.., in] W[out, in]^T + b [out]

/// `x W^T + b` as one node: candle's reshape, transposed view, matmul, bias add and reshape
/// would each add a gradient node the backward zero-fills and adds up.
struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "lmd-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out_d, in_d) = l2.shape().dims2()?;
        if l1.dims().last() != Some(&in_d) || l3.shape().elem_count() != out_d {
            candle_core::bail!(
                "lmd-linear: shapes {:?} x {:?}^T + {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let x = f32_slice(s1, l1, "lmd-linear", "x")?;
        let w = f32_slice(s2, l2, "lmd-linear", "the weight")?;
        let b = f32_slice(s3, l3, "lmd-linear", "the bias")?;
        let mut y = filled_later(x.len() / in_d.max(1) * out_d);
        on_pool(|| gemm::linear(x, w, b, None, &mut y));
        let mut shape = l1.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = out_d;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let names = ["x", "the weight", "the gradient"];
        let (dx, dw, db) = with_data(&[x, w, &g], "lmd-linear", &names, |s| {
            let (xs, ws, gs) = (s[0], s[1], s[2]);
            let mut dx = filled_later(xs.len());
            let mut dw = filled_later(ws.len());
            let mut db = filled_later(b.elem_count());
            on_pool(|| gemm::linear_backward(gs, xs, ws, &mut dx, (&mut dw, &mut db)));
            (dx, dw, db)
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `x W^T + b` (PyTorch's `[out, in]` weight layout) over the last dim.
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearOp)
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * w + b

struct LayerNormOp {
    eps: f64,
}

/// `(xhat, rstd, out)` of a LayerNorm over rows of `w.len()`.
pub(crate) fn ln_rows(x: &[f32], w: &[f32], b: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / w.len().max(1);
    let (mut xhat, mut rstd, mut out) = (
        filled_later(x.len()),
        filled_later(rows),
        filled_later(x.len()),
    );
    on_pool(|| ln_forward(x, (w, b), eps, &mut xhat, &mut rstd, &mut out));
    (xhat, rstd, out)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "lmd-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "lmd-layer-norm", "x")?;
        let w = f32_slice(s2, l2, "lmd-layer-norm", "the weight")?;
        let b = f32_slice(s3, l3, "lmd-layer-norm", "the bias")?;
        if w.len() != width(l1) || b.len() != w.len() {
            candle_core::bail!(
                "lmd-layer-norm: x {:?} with weight {:?} and bias {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let (_, _, out) = ln_rows(x, w, b, self.eps);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let names = ["x", "the weight", "the bias", "the gradient"];
        let (dx, dw, db) = with_data(&[x, w, b, &g], "lmd-layer-norm", &names, |s| {
            let (xs, ws, bs, gs) = (s[0], s[1], s[2], s[3]);
            // the normalised rows again (cheaper to recompute than to keep)
            let (xhat, rstd, _) = ln_rows(xs, ws, bs, self.eps);
            let mut dx = vec![0f32; xs.len()];
            let (mut dw, mut db) = (filled_later(ws.len()), filled_later(ws.len()));
            on_pool(|| ln_backward(gs, ws, &xhat, &rstd, &mut dx, (&mut dw, &mut db)));
            (dx, dw, db)
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// LayerNorm over the last dimension (biased variance, `eps` inside the square root).
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps })
}

// ---------------------------------------------------------------------------------------------
// softmax over the last dim

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "lmd-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "lmd-softmax", "x")?;
        let out = softmax_rows(x, width(l));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let n = x.dim(D::Minus1)?.max(1);
        let g = g.contiguous()?;
        let names = ["the output", "the gradient"];
        let dx = with_data(&[res, &g], "lmd-softmax", &names, |s| {
            softmax_backward_rows(s[0], s[1], n)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Softmax of each row of width `n` in `x`.
pub(crate) fn softmax_rows(x: &[f32], n: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    on_pool(|| {
        out.par_chunks_mut(n * ROW_GROUP)
            .for_each(|rows| simd::softmax_rows(rows, n))
    });
    out
}

/// The softmax's input gradient `p (g - sum(g p))` per row of width `n`, from its output `p`
/// and the output's gradient `g`.
pub(crate) fn softmax_backward_rows(p: &[f32], g: &[f32], n: usize) -> Vec<f32> {
    let mut dx = g.to_vec();
    on_pool(|| {
        dx.par_chunks_mut(n * ROW_GROUP)
            .zip(p.par_chunks(n * ROW_GROUP))
            .for_each(|(d, p)| simd::softmax_backward_rows(d, p, n, 1.0))
    });
    dx
}

/// Softmax over the last dimension.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxOp)
}

// ---------------------------------------------------------------------------------------------
// exact (erf) GELU: 0.5 x (1 + erf(x / sqrt 2))

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "lmd-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "lmd-gelu-erf", "x")?;
        let mut out = filled_later(x.len());
        on_pool(|| gelu_forward(x, &mut out));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.contiguous()?;
        let dx = with_data(&[x, &g], "lmd-gelu-erf", &["x", "the gradient"], |s| {
            let mut dx = s[1].to_vec();
            on_pool(|| gelu_backward(s[0], &mut dx));
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Exact (erf) GELU, multi-threaded.
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluOp)
}

// ---------------------------------------------------------------------------------------------
// batched matmul: [B, m, k] @ [B, k, n], batch items in parallel

/// Offsets of each batch item of a `[.., r, c]` layout (any strides on every dim).
fn batch_offsets(l: &Layout) -> Vec<usize> {
    let dims = l.dims();
    let strides = l.stride();
    let nb = dims.len() - 2;
    let count: usize = dims[..nb].iter().product();
    let mut out = Vec::with_capacity(count);
    let mut idx = vec![0usize; nb];
    for _ in 0..count {
        out.push(l.start_offset() + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>());
        for d in (0..nb).rev() {
            idx[d] += 1;
            if idx[d] < dims[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

struct BatchedMatmul;

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "lmd-batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("lmd-batched-matmul: f32 only")
        };
        let (da, db) = (l1.dims(), l2.dims());
        let r = da.len();
        if r < 3 || db.len() != r || da[..r - 2] != db[..r - 2] || da[r - 1] != db[r - 2] {
            candle_core::bail!("lmd-batched-matmul: shapes {da:?} @ {db:?}")
        }
        let (m, k, n) = (da[r - 2], da[r - 1], db[r - 1]);
        let (sa, sb) = (l1.stride(), l2.stride());
        let (a_rs, a_cs, b_rs, b_cs) = (sa[r - 2], sa[r - 1], sb[r - 2], sb[r - 1]);
        let (oa, ob) = (batch_offsets(l1), batch_offsets(l2));
        let mut out = vec![0f32; oa.len() * m * n];
        out.par_chunks_mut((m * n).max(1))
            .zip(oa.par_iter().zip(ob.par_iter()))
            .for_each(|(dst, (&pa, &pb))| {
                // SAFETY: the pointers and strides describe in-bounds [m, k] and [k, n]
                // views of the inputs (from their layouts) and a contiguous [m, n] output.
                unsafe {
                    ::gemm::gemm(
                        m,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr().add(pa),
                        a_cs as isize,
                        a_rs as isize,
                        b.as_ptr().add(pb),
                        b_cs as isize,
                        b_rs as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        ::gemm::Parallelism::None,
                    )
                }
            });
        let mut shape = da.to_vec();
        shape[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // C = A B: dA = dC B^T, dB = A^T dC (strided views, no copies)
        let ga = g.apply_op2_no_bwd(&b.t()?, &BatchedMatmul)?;
        let gb = a.t()?.apply_op2_no_bwd(g, &BatchedMatmul)?;
        Ok((Some(ga), Some(gb)))
    }
}

/// Batched matmul `[.., m, k] @ [.., k, n]` (equal batch dims) with a backward: batch items
/// run in parallel, each a single-threaded gemm (candle runs them one after the other, each
/// split over threads: slow for attention's many small products). Without a batch to split
/// (one item), candle's matmul.
pub(crate) fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let batched = a.rank() >= 3 && a.dims()[..a.rank() - 2].iter().product::<usize>() >= 2;
    if batched {
        a.apply_op2(b, BatchedMatmul)
    } else {
        a.matmul(b)
    }
}
