//! LayerNorm and softmax over the last dimension as one op each way, on any device, the exact
//! GELU likewise, and a ViT's multi-head attention on its packed qkv: the `rows` kernel
//! setting ([`crate::Kernels::Rows`], `LMD_KERNELS=rows`).
//!
//! Why: written in candle's primitive ops, a LayerNorm is about 11 kernel launches forward and
//! 25 backward, a softmax 5 and 6. On a GPU each launch also allocates and builds a tensor on
//! the host, and LMD's ViT works on 13 to 49 tokens a sample: its train step is bound by
//! launches, not by the GPU (`lmd-bench train-step`'s `host_fraction`). LayerNorm alone was
//! about 45% of a block's ops; candle's GELU backward is 14 more. Here each direction is one
//! kernel; the LayerNorm's parameter gradients are two column sums (candle's) of the backward
//! kernel's second output. Attention in candle's ops is the split into q, k and v (three
//! copies forward; backward, three zero-padded concatenations and two sums over the whole
//! qkv), the scale, two batched products, the softmax and the merge of the heads, each way:
//! here one kernel forward and two backward, which recompute the probabilities.
//!
//! Rules:
//! - Operands are contiguous (made so here). LayerNorm and softmax take f32: the backend widens
//!   half precision before and narrows after ([`crate::Backend::layer_norm`]). GELU takes f32
//!   or bf16 (the dtype of mixed precision's products) and computes in f32. Attention takes
//!   f32 (widened likewise) and computes in f32, products included.
//! - On the CPU the ops run the fused CPU path's row code ([`crate::cpu`]); on CUDA the
//!   kernels of `kernels.cu`, compiled to PTX by `build.rs` under the `cuda` feature, one warp
//!   per row ([`WARPS_PER_BLOCK`] rows per block, [`grid`] blocks). Attention on the CPU is the
//!   fused path's ([`crate::cpu::attention`]); on CUDA a row is one (sample, head, token).
//! - The kernels' arithmetic and indexing are tested on the CPU, by compiling `kernels.cu` as
//!   C++ with emulated warps (`tests/rowops_emulated.rs`), against these ops' CPU results. What
//!   only a GPU shows (the PTX, the launch) is the device check's `parity-rows` and
//!   `train-step-rows` steps.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use crate::cpu::attention::{attention_backward as attention_bwd, attention_forward, Heads};
use crate::cpu::ops::{ln_rows, softmax_backward_rows, softmax_rows};
use crate::cpu::rows::{filled_later, gelu_backward, gelu_forward};
use crate::cpu::{f32_slice, on_pool};

#[cfg(feature = "cuda")]
mod cuda;

/// Rows (warps of 32 lanes) per thread block of every row kernel.
pub const WARPS_PER_BLOCK: u32 = 4;

/// Blocks of a row kernel's launch over `rows` rows.
pub fn grid(rows: usize) -> u32 {
    u32::try_from(rows.div_ceil(WARPS_PER_BLOCK as usize)).expect("rows within u32 x 4")
}

/// `(rows, cols)` of a tensor's layout, rows over every dim but the last.
fn rows_cols(l: &Layout) -> (usize, usize) {
    let cols = l.dims().last().copied().unwrap_or(1);
    (l.shape().elem_count() / cols.max(1), cols)
}

/// The f32 weight and bias of a LayerNorm must be `[cols]` for rows of `cols`.
fn check_affine(op: &str, x: &Layout, w: &Layout, b: &Layout) -> Result<()> {
    let (_, cols) = rows_cols(x);
    if w.shape().elem_count() != cols || b.shape().elem_count() != cols {
        candle_core::bail!(
            "{op}: x {:?} with weight {:?} and bias/gradient {:?}",
            x.dims(),
            w.dims(),
            b.dims()
        )
    }
    Ok(())
}

/// A backward kernel's two row operands must have one shape.
fn same_shape(op: &str, (a, la): (&str, &Layout), (b, lb): (&str, &Layout)) -> Result<()> {
    if la.dims() != lb.dims() {
        candle_core::bail!("{op}: {a} {:?}, {b} {:?}", la.dims(), lb.dims())
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "lmd-rows-layer-norm"
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
        check_affine(self.name(), l1, l2, l3)?;
        let x = f32_slice(s1, l1, self.name(), "x")?;
        let w = f32_slice(s2, l2, self.name(), "the weight")?;
        let b = f32_slice(s3, l3, self.name(), "the bias")?;
        let (_, _, out) = ln_rows(x, w, b, self.eps);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        check_affine(self.name(), l1, l2, l3)?;
        let (rows, cols) = rows_cols(l1);
        let ins = [(s1, l1, "x"), (s2, l2, "the weight"), (s3, l3, "the bias")];
        let out = cuda::launch::<f32>(cuda::Kernel::LayerNorm, &ins, rows, cols, Some(self.eps))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = layer_norm_backward(x, w, g, self.eps)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The backward's one kernel: `[2, rows, cols]`, the input gradient and `g · xhat`.
struct LayerNormBwdOp {
    eps: f64,
}

impl CustomOp3 for LayerNormBwdOp {
    fn name(&self) -> &'static str {
        "lmd-rows-layer-norm-bwd"
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
        check_affine(self.name(), l1, l2, l2)?;
        same_shape(self.name(), ("x", l1), ("the gradient", l3))?;
        let x = f32_slice(s1, l1, self.name(), "x")?;
        let w = f32_slice(s2, l2, self.name(), "the weight")?;
        let g = f32_slice(s3, l3, self.name(), "the gradient")?;
        let (rows, cols) = rows_cols(l1);
        let zeros = vec![0f32; cols];
        let (xhat, rstd, _) = ln_rows(x, w, &zeros, self.eps);
        let mut out = vec![0f32; 2 * x.len()];
        let (dx, gx) = out.split_at_mut(x.len());
        let (mut dw, mut db) = (vec![0f32; cols], vec![0f32; cols]);
        on_pool(|| crate::cpu::rows::ln_backward(g, w, &xhat, &rstd, dx, (&mut dw, &mut db)));
        gx.iter_mut()
            .zip(g.iter().zip(&xhat))
            .for_each(|(o, (g, xh))| *o = g * xh);
        Ok((CpuStorage::F32(out), Shape::from((2, rows, cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        check_affine(self.name(), l1, l2, l2)?;
        same_shape(self.name(), ("x", l1), ("the gradient", l3))?;
        let (rows, cols) = rows_cols(l1);
        let ins = [
            (s1, l1, "x"),
            (s2, l2, "the weight"),
            (s3, l3, "the gradient"),
        ];
        let k = cuda::Kernel::LayerNormBwd;
        let out = cuda::launch::<f32>(k, &ins, rows, cols, Some(self.eps))?;
        Ok((out, Shape::from((2, rows, cols))))
    }
}

/// LayerNorm over the last dimension (PyTorch's: biased variance, `eps` inside the root), one
/// op forward and one backward. f32 operands.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps })
}

/// `(dx, dw, db)` of [`layer_norm`] for the output gradient `g`: the backward kernel, then the
/// column sums of `g · xhat` and of `g` (the affine's gradients).
pub fn layer_norm_backward(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (x, g) = (x.contiguous()?, g.contiguous()?);
    let both = x.apply_op3_no_bwd(&w.contiguous()?, &g, &LayerNormBwdOp { eps })?;
    let dx = both.get(0)?.reshape(x.shape())?;
    let dw = both.get(1)?.sum(0)?.reshape(w.shape())?;
    let cols = w.elem_count();
    let db = g
        .reshape((x.elem_count() / cols.max(1), cols))?
        .sum(0)?
        .reshape(w.shape())?;
    Ok((dx, dw, db))
}

// ---------------------------------------------------------------------------------------------
// softmax

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "lmd-rows-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name(), "x")?;
        let (_, cols) = rows_cols(l);
        Ok((
            CpuStorage::F32(softmax_rows(x, cols.max(1))),
            l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = rows_cols(l);
        let out = cuda::launch::<f32>(cuda::Kernel::Softmax, &[(s, l, "x")], rows, cols, None)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(softmax_backward(res, g)?))
    }
}

/// The softmax's backward kernel: `y (g - sum(g y))` from the forward's output `y`.
struct SoftmaxBwdOp;

impl CustomOp2 for SoftmaxBwdOp {
    fn name(&self) -> &'static str {
        "lmd-rows-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape(self.name(), ("the output", l1), ("the gradient", l2))?;
        let y = f32_slice(s1, l1, self.name(), "the output")?;
        let g = f32_slice(s2, l2, self.name(), "the gradient")?;
        let (_, cols) = rows_cols(l1);
        let dx = softmax_backward_rows(y, g, cols.max(1));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        same_shape(self.name(), ("the output", l1), ("the gradient", l2))?;
        let (rows, cols) = rows_cols(l1);
        let ins = [(s1, l1, "the output"), (s2, l2, "the gradient")];
        let out = cuda::launch::<f32>(cuda::Kernel::SoftmaxBwd, &ins, rows, cols, None)?;
        Ok((out, l1.shape().clone()))
    }
}

/// Softmax over the last dimension, one op forward and one backward. f32 operand.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxOp)
}

/// The input gradient of [`softmax_last_dim`] from its output `y` and the output's gradient.
pub fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwdOp)
}

// ---------------------------------------------------------------------------------------------
// exact (erf) GELU, elementwise, f32 or bf16

/// The f32 values of a contiguous f32 or bf16 CPU storage (bf16 widened).
fn widened<'a>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<Cow<'a, [f32]>> {
    match s {
        CpuStorage::BF16(v) => match l.contiguous_offsets() {
            Some((a, b)) => Ok(Cow::Owned(v[a..b].iter().map(|x| x.to_f32()).collect())),
            None => candle_core::bail!("{op}: {what} must be contiguous"),
        },
        _ => Ok(Cow::Borrowed(f32_slice(s, l, op, what)?)),
    }
}

/// `v` in `dtype` (f32, or bf16 rounded to nearest even).
fn narrowed(v: Vec<f32>, dtype: DType) -> CpuStorage {
    match dtype {
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    }
}

/// The GELU kernel for `dtype` (forward or backward), refused by name for any other.
#[cfg(feature = "cuda")]
fn gelu_kernel(op: &str, dtype: DType, backward: bool) -> Result<cuda::Kernel> {
    use cuda::Kernel::*;
    Ok(match (dtype, backward) {
        (DType::F32, false) => GeluF32,
        (DType::F32, true) => GeluBwdF32,
        (DType::BF16, false) => GeluBf16,
        (DType::BF16, true) => GeluBwdBf16,
        _ => candle_core::bail!("{op}: {dtype:?} has no kernel (f32, bf16)"),
    })
}

/// Run the GELU `kernel` over `ins` in their dtype.
#[cfg(feature = "cuda")]
fn gelu_launch(
    kernel: cuda::Kernel,
    ins: &[(&candle_core::CudaStorage, &Layout, &str)],
) -> Result<candle_core::CudaStorage> {
    let (rows, cols) = rows_cols(ins[0].1);
    match ins[0].0.dtype() {
        DType::BF16 => cuda::launch::<half::bf16>(kernel, ins, rows, cols, None),
        _ => cuda::launch::<f32>(kernel, ins, rows, cols, None),
    }
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "lmd-rows-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = widened(s, l, self.name(), "x")?;
        let mut out = filled_later(x.len());
        on_pool(|| gelu_forward(&x, &mut out));
        Ok((narrowed(out, s.dtype()), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let k = gelu_kernel(self.name(), s.dtype(), false)?;
        Ok((gelu_launch(k, &[(s, l, "x")])?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gelu_erf_backward(x, g)?))
    }
}

/// The GELU's backward kernel: `g (Phi(x) + x phi(x))`.
struct GeluBwdOp;

impl GeluBwdOp {
    fn check(&self, (d1, l1): (DType, &Layout), (d2, l2): (DType, &Layout)) -> Result<()> {
        same_shape(self.name(), ("x", l1), ("the gradient", l2))?;
        if d1 != d2 {
            candle_core::bail!("{}: x in {d1:?}, the gradient in {d2:?}", self.name())
        }
        Ok(())
    }
}

impl CustomOp2 for GeluBwdOp {
    fn name(&self) -> &'static str {
        "lmd-rows-gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check((s1.dtype(), l1), (s2.dtype(), l2))?;
        let x = widened(s1, l1, self.name(), "x")?;
        let mut dx = widened(s2, l2, self.name(), "the gradient")?.into_owned();
        on_pool(|| gelu_backward(&x, &mut dx));
        Ok((narrowed(dx, s1.dtype()), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check((s1.dtype(), l1), (s2.dtype(), l2))?;
        let k = gelu_kernel(self.name(), s1.dtype(), true)?;
        let out = gelu_launch(k, &[(s1, l1, "x"), (s2, l2, "the gradient")])?;
        Ok((out, l1.shape().clone()))
    }
}

/// Exact (erf) GELU, one op forward and one backward; f32 or bf16, computed in f32.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluOp)
}

/// The input gradient of [`gelu_erf`] at `x` for the output gradient `g` (both one dtype).
pub fn gelu_erf_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &GeluBwdOp)
}

// ---------------------------------------------------------------------------------------------
// multi-head attention on the packed qkv, f32

/// The sizes of an attention call on a qkv `[b, n, 3c]` split into `heads`, checked.
fn heads_of(op: &str, l: &Layout, heads: usize) -> Result<Heads> {
    let Ok((b, n, c3)) = l.shape().dims3() else {
        candle_core::bail!(
            "{op}: qkv must be [batch, tokens, 3 x width], not {:?}",
            l.dims()
        )
    };
    if heads == 0 || c3 % (3 * heads) != 0 {
        candle_core::bail!(
            "{op}: qkv {:?} does not split into 3 x {heads} heads",
            l.dims()
        )
    }
    Ok(Heads {
        b,
        n,
        c: c3 / 3,
        heads,
    })
}

/// The scale of the scores, `1 / sqrt(head dim)`, as the CPU path and the kernels use it.
#[cfg(feature = "cuda")]
fn score_scale(d: &Heads) -> f32 {
    1.0 / ((d.c / d.heads) as f32).sqrt()
}

struct AttentionOp {
    heads: usize,
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "lmd-rows-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = heads_of(self.name(), l, self.heads)?;
        let qkv = f32_slice(s, l, self.name(), "qkv")?;
        let mut p = filled_later(d.b * d.heads * d.n * d.n);
        let mut att = filled_later(d.b * d.n * d.c);
        on_pool(|| attention_forward(&d, qkv, &mut p, &mut att));
        Ok((CpuStorage::F32(att), Shape::from((d.b, d.n, d.c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = heads_of(self.name(), l, self.heads)?;
        let out = cuda::attention(&d, score_scale(&d), (s, l), None)?;
        Ok((out, Shape::from((d.b, d.n, d.c))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(attention_backward(qkv, g, self.heads)?))
    }
}

/// The attention's backward: `dqkv [b, n, 3c]` from qkv and the merged heads' gradient.
struct AttentionBwdOp {
    heads: usize,
}

impl AttentionBwdOp {
    fn check(&self, lq: &Layout, lg: &Layout) -> Result<Heads> {
        let d = heads_of(self.name(), lq, self.heads)?;
        if lg.dims() != [d.b, d.n, d.c] {
            candle_core::bail!(
                "{}: qkv {:?}, the gradient {:?}",
                self.name(),
                lq.dims(),
                lg.dims()
            )
        }
        Ok(d)
    }
}

impl CustomOp2 for AttentionBwdOp {
    fn name(&self) -> &'static str {
        "lmd-rows-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.check(l1, l2)?;
        let qkv = f32_slice(s1, l1, self.name(), "qkv")?;
        let g = f32_slice(s2, l2, self.name(), "the gradient")?;
        // the probabilities again (the forward keeps no state), then the backward
        let mut p = filled_later(d.b * d.heads * d.n * d.n);
        let mut att = filled_later(d.b * d.n * d.c);
        let mut dqkv = filled_later(qkv.len());
        on_pool(|| {
            attention_forward(&d, qkv, &mut p, &mut att);
            attention_bwd(&d, qkv, &p, g, &mut dqkv);
        });
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.check(l1, l2)?;
        let out = cuda::attention(&d, score_scale(&d), (s1, l1), Some((s2, l2)))?;
        Ok((out, l1.shape().clone()))
    }
}

/// Multi-head attention `softmax(q k^T / sqrt(hd)) v` on timm's packed `qkv [b, n, 3c]` (q, k,
/// v, each `heads` heads), into the merged heads `[b, n, c]`: one op forward (one kernel on
/// CUDA) and one backward (two kernels), in place of the split, the scale, two batched
/// products, the softmax and the merge, and their backward (the split's alone is three
/// zero-padded concatenations and two full-size sums in candle). f32 operand.
pub fn attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(AttentionOp { heads })
}

/// The gradient of [`attention`]'s qkv for the merged heads' gradient `g`.
pub fn attention_backward(qkv: &Tensor, g: &Tensor, heads: usize) -> Result<Tensor> {
    qkv.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &AttentionBwdOp { heads })
}
