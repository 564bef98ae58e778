//! Fused CPU kernels with a backward, for the hot spots of training on CPU.
//!
//! Composite candle graphs spend most of a CPU step outside matmul: one pass over memory per
//! elementwise op, and gradient sums over leading (non-contiguous) dimensions for every bias and
//! LayerNorm affine. These ops do the forward in one pass per row, and compute parameter
//! gradients as `ones[1, rows] @ g[rows, D]` (a gemm) instead of a strided reduction.
//!
//! Each op falls back to the differentiable composite form (`crate::nn`) off the CPU, and the
//! tests compare both forms and check gradients against finite differences.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};

fn rows_of(t: &Tensor) -> Result<(usize, usize)> {
    let d = t.dim(D::Minus1)?;
    Ok((t.elem_count() / d.max(1), d))
}

/// Sum over all leading dims as a gemm: `g [.., D]` -> `[D]`.
fn sum_rows(g: &Tensor) -> Result<Tensor> {
    let (r, d) = rows_of(g)?;
    let ones = Tensor::ones((1, r), g.dtype(), g.device())?;
    ones.matmul(&g.reshape((r, d))?)?.reshape(d)
}

macro_rules! slice_of {
    ($s:expr, $l:expr, $t:ty, $variant:ident) => {{
        let CpuStorage::$variant(v) = $s else {
            candle_core::bail!("fused op: unexpected dtype")
        };
        match $l.contiguous_offsets() {
            Some((a, b)) => &v[a..b] as &[$t],
            None => candle_core::bail!("fused op: input not contiguous"),
        }
    }};
}

// ---------------------------------------------------------------------------------------------
// bias add: x [.., D] + b [D]

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "lmd-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        macro_rules! go {
            ($t:ty, $v:ident) => {{
                let x = slice_of!(s1, l1, $t, $v);
                let b = slice_of!(s2, l2, $t, $v);
                let mut out = x.to_vec();
                for row in out.chunks_exact_mut(b.len()) {
                    for (o, bb) in row.iter_mut().zip(b) {
                        *o += *bb;
                    }
                }
                Ok((CpuStorage::$v(out), l1.shape().clone()))
            }};
        }
        match s1 {
            CpuStorage::F32(_) => go!(f32, F32),
            CpuStorage::F64(_) => go!(f64, F64),
            _ => candle_core::bail!("lmd-bias-add: only f32 and f64 are supported"),
        }
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.clone()), Some(sum_rows(g)?)))
    }
}

/// `x + b` with `b` broadcast over the last dimension.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu_float(x) {
        x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
    } else {
        x.broadcast_add(b)
    }
}

// ---------------------------------------------------------------------------------------------
// Linear: x [.., in] · W[out, in]^T + b [out] as one node

/// `y = x W^T + b` in one op: the output starts as `b` in every row and one gemm adds `x W^T`
/// (split over candle's threads). As one graph node it replaces candle's reshape, transposed
/// view, matmul, bias add and reshape, whose gradients the backward would otherwise zero-fill
/// and add up one by one.
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
        let threads = candle_core::utils::get_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        macro_rules! go {
            ($t:ty, $v:ident) => {{
                let x = slice_of!(s1, l1, $t, $v);
                let w = slice_of!(s2, l2, $t, $v);
                let b = slice_of!(s3, l3, $t, $v);
                let rows = x.len() / in_d.max(1);
                let mut y: Vec<$t> = Vec::with_capacity(rows * out_d);
                for _ in 0..rows {
                    y.extend_from_slice(b);
                }
                // SAFETY: y is rows x out_d (row stride out_d), x is rows x in_d (row stride
                // in_d), W^T is read from W's [out_d, in_d] storage (column stride in_d).
                unsafe {
                    gemm::gemm(
                        rows,
                        out_d,
                        in_d,
                        y.as_mut_ptr(),
                        1,
                        out_d as isize,
                        true,
                        x.as_ptr(),
                        1,
                        in_d as isize,
                        w.as_ptr(),
                        in_d as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    )
                }
                let mut shape = l1.dims().to_vec();
                *shape.last_mut().expect("rank >= 1") = out_d;
                Ok((CpuStorage::$v(y), Shape::from(shape)))
            }};
        }
        match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => go!(f32, F32),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => go!(f64, F64),
            _ => candle_core::bail!("lmd-linear: f32 or f64, all three the same"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_d, in_d) = w.dims2()?;
        let rows = g.elem_count() / out_d.max(1);
        // detached: these products need no graph of their own
        let g2 = g.detach().contiguous()?.reshape((rows, out_d))?;
        let x2 = x.detach().reshape((rows, in_d))?;
        let gx = g2.matmul(&w.detach())?.reshape(x.dims())?;
        let gw = g2.t()?.matmul(&x2)?;
        let gb = sum_rows(&g2)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// `x W^T + b` (PyTorch's `[out, in]` weight layout) over the last dim: one fused node for f32
/// and f64 on the CPU, candle's reshape + matmul + broadcast add otherwise.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu_float(x) && x.dtype() == w.dtype() && x.dtype() == b.dtype() {
        return x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearOp);
    }
    let dims = x.dims();
    let (inp, out) = (dims[dims.len() - 1], w.dim(0)?);
    let rows = x.elem_count() / inp;
    let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
    let y = bias_add(&y, b)?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("non-empty") = out;
    y.reshape(shape)
}

fn cpu_float(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Run `f(row_in.., row_out)` over rows in parallel (rayon), for each dtype.
macro_rules! rows_par {
    ($out:expr, $d:expr, $body:expr) => {{
        use rayon::prelude::*;
        $out.par_chunks_mut($d).enumerate().for_each($body);
    }};
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dim: (x, w, b) -> (x - mean) / sqrt(var + eps) * w + b

struct LayerNormOp {
    eps: f64,
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
        macro_rules! go {
            ($t:ty, $v:ident) => {{
                let x = slice_of!(s1, l1, $t, $v);
                let w = slice_of!(s2, l2, $t, $v);
                let b = slice_of!(s3, l3, $t, $v);
                let d = w.len();
                let eps = self.eps;
                let mut out = vec![0 as $t; x.len()];
                rows_par!(out, d, |(r, o): (usize, &mut [$t])| {
                    let xr = &x[r * d..(r + 1) * d];
                    let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                    let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                    let rstd = 1.0 / (var + eps).sqrt();
                    let (mean, rstd) = (mean as $t, rstd as $t);
                    for i in 0..d {
                        o[i] = (xr[i] - mean) * rstd * w[i] + b[i];
                    }
                });
                Ok((CpuStorage::$v(out), l1.shape().clone()))
            }};
        }
        match s1 {
            CpuStorage::F32(_) => go!(f32, F32),
            CpuStorage::F64(_) => go!(f64, F64),
            _ => candle_core::bail!("lmd-layer-norm: only f32 and f64 are supported"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let xn = x.apply_op1_no_bwd(&LnNormalize { eps: self.eps })?;
        let gx = x.apply_op3_no_bwd(w, &g, &LnGradX { eps: self.eps })?;
        let gw = sum_rows(&(&g * &xn)?)?;
        let gb = sum_rows(&g)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// `(x - mean) / sqrt(var + eps)` per row (no affine), for the backward.
struct LnNormalize {
    eps: f64,
}

impl CustomOp1 for LnNormalize {
    fn name(&self) -> &'static str {
        "lmd-ln-normalize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1);
        macro_rules! go {
            ($t:ty, $v:ident) => {{
                let x = slice_of!(s, l, $t, $v);
                let eps = self.eps;
                let mut out = vec![0 as $t; x.len()];
                rows_par!(out, d, |(r, o): (usize, &mut [$t])| {
                    let xr = &x[r * d..(r + 1) * d];
                    let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                    let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                    let rstd = (1.0 / (var + eps).sqrt()) as $t;
                    let mean = mean as $t;
                    for i in 0..d {
                        o[i] = (xr[i] - mean) * rstd;
                    }
                });
                Ok((CpuStorage::$v(out), l.shape().clone()))
            }};
        }
        match s {
            CpuStorage::F32(_) => go!(f32, F32),
            CpuStorage::F64(_) => go!(f64, F64),
            _ => candle_core::bail!("lmd-ln-normalize: only f32 and f64 are supported"),
        }
    }
}

/// The LayerNorm input gradient, one pass per row:
/// `rstd * (gxn - mean(gxn) - xn * mean(gxn * xn))` with `gxn = g * w`.
struct LnGradX {
    eps: f64,
}

impl CustomOp3 for LnGradX {
    fn name(&self) -> &'static str {
        "lmd-ln-grad-x"
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
        macro_rules! go {
            ($t:ty, $v:ident) => {{
                let x = slice_of!(s1, l1, $t, $v);
                let w = slice_of!(s2, l2, $t, $v);
                let g = slice_of!(s3, l3, $t, $v);
                let d = w.len();
                let eps = self.eps;
                let mut out = vec![0 as $t; x.len()];
                rows_par!(out, d, |(r, o): (usize, &mut [$t])| {
                    let xr = &x[r * d..(r + 1) * d];
                    let gr = &g[r * d..(r + 1) * d];
                    let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                    let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                    let rstd = 1.0 / (var + eps).sqrt();
                    let (mut s1, mut s2) = (0f64, 0f64);
                    for i in 0..d {
                        let gxn = (gr[i] * w[i]) as f64;
                        let xn = (xr[i] as f64 - mean) * rstd;
                        s1 += gxn;
                        s2 += gxn * xn;
                    }
                    let (m1, m2) = (s1 / d as f64, s2 / d as f64);
                    for i in 0..d {
                        let gxn = (gr[i] * w[i]) as f64;
                        let xn = (xr[i] as f64 - mean) * rstd;
                        o[i] = (rstd * (gxn - m1 - xn * m2)) as $t;
                    }
                });
                Ok((CpuStorage::$v(out), l1.shape().clone()))
            }};
        }
        match s1 {
            CpuStorage::F32(_) => go!(f32, F32),
            CpuStorage::F64(_) => go!(f64, F64),
            _ => candle_core::bail!("lmd-ln-grad-x: only f32 and f64 are supported"),
        }
    }
}

/// LayerNorm over the last dimension with a backward (fused on CPU).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_float(x) {
        x.contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps })
    } else {
        crate::nn::layer_norm_composite(x, w, b, eps)
    }
}

// ---------------------------------------------------------------------------------------------
// softmax over the last dim

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "lmd-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims().last().copied().unwrap_or(1);
        macro_rules! go {
            ($t:ty, $v:ident) => {{
                let x = slice_of!(s, l, $t, $v);
                let mut out = vec![0 as $t; x.len()];
                rows_par!(out, d, |(r, o): (usize, &mut [$t])| {
                    let xr = &x[r * d..(r + 1) * d];
                    let m = xr.iter().copied().fold(<$t>::NEG_INFINITY, <$t>::max);
                    // exp in its own loop (vectorises), then the serial sum
                    for (o, &v) in o.iter_mut().zip(xr) {
                        *o = (v - m).fast_exp();
                    }
                    let inv = 1.0 / o.iter().sum::<$t>();
                    for v in o.iter_mut() {
                        *v *= inv;
                    }
                });
                Ok((CpuStorage::$v(out), l.shape().clone()))
            }};
        }
        match s {
            CpuStorage::F32(_) => go!(f32, F32),
            CpuStorage::F64(_) => go!(f64, F64),
            _ => candle_core::bail!("lmd-softmax: only f32 and f64 are supported"),
        }
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

/// `y * (g - sum(g * y))` per row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "lmd-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l1.dims().last().copied().unwrap_or(1);
        macro_rules! go {
            ($t:ty, $v:ident) => {{
                let y = slice_of!(s1, l1, $t, $v);
                let g = slice_of!(s2, l2, $t, $v);
                let mut out = vec![0 as $t; y.len()];
                rows_par!(out, d, |(r, o): (usize, &mut [$t])| {
                    let yr = &y[r * d..(r + 1) * d];
                    let gr = &g[r * d..(r + 1) * d];
                    let dot: $t = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                    for i in 0..d {
                        o[i] = yr[i] * (gr[i] - dot);
                    }
                });
                Ok((CpuStorage::$v(out), l1.shape().clone()))
            }};
        }
        match s1 {
            CpuStorage::F32(_) => go!(f32, F32),
            CpuStorage::F64(_) => go!(f64, F64),
            _ => candle_core::bail!("lmd-softmax-grad: only f32 and f64 are supported"),
        }
    }
}

/// Softmax over the last dimension with a backward (fused on CPU).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if cpu_float(x) {
        x.contiguous()?.apply_op1(SoftmaxOp)
    } else {
        crate::nn::softmax_composite(x)
    }
}

// ---------------------------------------------------------------------------------------------
// exact (erf) GELU: 0.5 x (1 + erf(x / sqrt 2))

/// `e^x` for f32 without a libm call (Cephes `expf`: range reduction by ln 2, degree-6
/// polynomial, exponent by bit arithmetic; relative error ~2e-7; inputs are clamped to
/// [-87.3, 88.3], so it never returns 0 or infinity). Branch-free, so loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.336_55, 88.376_26);
    // n = round(x / ln 2), by the 1.5 * 2^23 trick (vectorisable, unlike `round`): t's low
    // mantissa bits hold n + 2^22 as an integer.
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from t's bits: integer ops only (a float -> int cast saturates, and would not
    // vectorise)
    let pow2n = (t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127)) << 23;
    e * f32::from_bits(pow2n)
}

/// `exp` through [`exp_f32`] for f32 and `f64::exp` for f64, for the ops generic over both.
trait FastExp {
    fn fast_exp(self) -> Self;
}

impl FastExp for f32 {
    #[inline(always)]
    fn fast_exp(self) -> f32 {
        exp_f32(self)
    }
}

impl FastExp for f64 {
    #[inline(always)]
    fn fast_exp(self) -> f64 {
        self.exp()
    }
}

/// erf for f32 (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): one `exp` and a polynomial,
/// instead of the f64 series candle's `gelu_erf` evaluates per element.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    erf_and_gauss_f32(x).0
}

/// `(erf(x), e^(-x²))`: the exponential is part of the erf formula, and GELU's derivative needs
/// it again (`φ(v) ∝ e^(-v²/2)` with `x = v/√2`), so it is computed once for both.
#[inline(always)]
pub(crate) fn erf_and_gauss_f32(x: f32) -> (f32, f32) {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let g = exp_f32(-a * a);
    ((1.0 - poly * g).copysign(x), g)
}

const CHUNK: usize = 1 << 14;

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "lmd-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = slice_of!(s, l, f32, F32);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| crate::kernels::gelu_forward(x, o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluGrad)?))
    }
}

/// `g · (Φ(x) + x·φ(x))`, the derivative of `x·Φ(x)`.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "lmd-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = slice_of!(s1, l1, f32, F32);
        let g = slice_of!(s2, l2, f32, F32);
        let mut out = g.to_vec();
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| crate::kernels::gelu_backward(x, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Exact (erf) GELU with a backward: fused and multi-threaded for f32 on the CPU, candle's
/// `gelu_erf` otherwise.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(GeluOp)
    } else {
        x.gelu_erf()
    }
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
        use rayon::prelude::*;
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
                    gemm::gemm(
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
                        gemm::Parallelism::None,
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

/// Batched matmul `[.., m, k] @ [.., k, n]` (equal batch dims) with a backward: on the CPU in
/// f32, batch items run in parallel, each a single-threaded gemm (candle runs them one after
/// the other, each split over threads: slow for attention's many small products).
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let batched = a.rank() >= 3 && a.dims()[..a.rank() - 2].iter().product::<usize>() >= 2;
    if batched && a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        a.apply_op2(b, BatchedMatmul)
    } else {
        a.matmul(b)
    }
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_f32_is_within_3e7_relative_of_f64_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64 - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e4) > 0.0 && exp_f32(-1e4) < 1e-37);
        assert!(exp_f32(1e4).is_finite());
    }
}
