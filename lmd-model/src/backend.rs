//! The one place where the compute path is chosen: lmd's fused CPU kernels ([`crate::cpu`]) or
//! candle's own ops (the graph every device runs, CUDA included).
//!
//! Rules:
//! - A model resolves its [`Backend`] once, in its constructor, from the device and dtype of its
//!   `VarBuilder` and the [`Kernels`] setting, and hands it to every layer. No layer looks at a
//!   tensor's device or dtype to pick a path; it calls the op on its backend.
//! - [`Kernels::Auto`] takes `LMD_KERNELS` from the environment (`auto`, `fused`, `ops`,
//!   `candle`, `rows`; unset means `auto`), then picks `Fused` for f32 on the CPU, `Rows` for
//!   bf16 on the CPU (measured faster there) and `Candle` for anything else.
//!   `LMD_KERNELS=candle` runs the pure-candle graph on the CPU: that is how the tests check
//!   the graph a GPU runs. `rows` is that graph with LayerNorm, softmax and the GELU as one op
//!   each way ([`crate::rowops`]: a kernel each on CUDA); `auto` does not pick it on a GPU
//!   until one has measured it (the device check's `train-step-rows` step).
//! - Asking for fused kernels where they do not exist (a GPU, f64, bf16) is an error that names
//!   the device and dtype, never a silent fallback.
//! - Mixed precision is a backend too ([`Backend::CandleBf16`], from [`Backend::for_training`]):
//!   f32 weights stay the model's; [`linear`](Backend::linear), the attention products and the
//!   convolutions cast their operands to bf16 and return bf16 (their backward casts the
//!   gradients back to f32, so the master weights get f32 gradients); [`layer_norm`]
//!   (Backend::layer_norm) and [`softmax_last_dim`](Backend::softmax_last_dim) compute in f32.
//!   A model returns a branch to its f32 residual stream, a concatenation or a loss through
//!   [`full`](Backend::full): PyTorch autocast's rules, which promote `f32 + bf16` to f32.

use std::str::FromStr;

use candle_core::{DType, Device, IndexOp, Result, Tensor, D};

use crate::Precision;
use serde::{Deserialize, Serialize};

/// The environment variable read by [`Kernels::Auto`].
pub const KERNELS_ENV: &str = "LMD_KERNELS";

/// The kernel setting: what a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// `LMD_KERNELS` if set, else fused for f32 on the CPU, the row ops for bf16 on the CPU,
    /// and candle's ops elsewhere.
    #[default]
    Auto,
    /// The fused CPU kernels: whole transformer blocks as one node (f32 on the CPU only).
    Fused,
    /// The fused single-layer ops (Linear, LayerNorm, softmax, GELU), blocks from those ops:
    /// the baseline of `lmd-bench train-step --composite-baseline`.
    Ops,
    /// candle's own ops only: the graph a GPU runs.
    Candle,
    /// candle's ops, with LayerNorm, softmax and GELU one op each way ([`crate::rowops`]).
    Rows,
}

impl Kernels {
    pub const ALL: [Kernels; 5] = [
        Kernels::Auto,
        Kernels::Fused,
        Kernels::Ops,
        Kernels::Candle,
        Kernels::Rows,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kernels::Auto => "auto",
            Kernels::Fused => "fused",
            Kernels::Ops => "ops",
            Kernels::Candle => "candle",
            Kernels::Rows => "rows",
        }
    }

    /// The setting in `LMD_KERNELS` (unset or empty: `Auto`).
    pub fn from_env() -> crate::Result<Kernels> {
        match std::env::var(KERNELS_ENV) {
            Ok(v) if !v.trim().is_empty() => v
                .parse()
                .map_err(|e: crate::Error| crate::Error::Config(format!("{KERNELS_ENV}: {e}"))),
            _ => Ok(Kernels::Auto),
        }
    }
}

impl FromStr for Kernels {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Kernels> {
        Kernels::ALL
            .into_iter()
            .find(|k| k.as_str() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                crate::Error::Config(format!(
                    "unknown kernel setting {s:?} (expected auto, fused, ops, candle or rows)"
                ))
            })
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The resolved compute path of one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Fused blocks and fused ops ([`crate::cpu`]), f32 on the CPU.
    Fused,
    /// Fused single-layer ops, blocks composed of them.
    Ops,
    /// candle's ops (any device and dtype).
    Candle,
    /// candle's ops in mixed precision: bf16 matmuls and convolutions, f32 weights, norms,
    /// softmax and residual stream.
    CandleBf16,
    /// candle's ops with LayerNorm, softmax, GELU and attention as lmd's row ops ([`crate::rowops`]).
    Rows,
    /// [`Backend::Rows`] in mixed precision, as [`Backend::CandleBf16`].
    RowsBf16,
}

impl Backend {
    /// The backend for a model on `dev` in `dtype` under `kernels`.
    pub fn resolve(kernels: Kernels, dev: &Device, dtype: DType) -> crate::Result<Backend> {
        let kernels = match kernels {
            Kernels::Auto => Kernels::from_env()?,
            k => k,
        };
        let fusable = dev.is_cpu() && dtype == DType::F32;
        match kernels {
            Kernels::Auto if fusable => Ok(Backend::Fused),
            // bf16 on the CPU: the row ops' train step is 1.14-1.21x candle's (BENCHMARKS.md)
            Kernels::Auto if dev.is_cpu() && dtype == DType::BF16 => Ok(Backend::Rows),
            Kernels::Auto | Kernels::Candle => Ok(Backend::Candle),
            Kernels::Fused | Kernels::Ops if !fusable => Err(crate::Error::Config(format!(
                "the fused kernels ({kernels}) run f32 on the CPU only, not {dtype:?} on {dev:?}: \
                 use auto or candle"
            ))),
            Kernels::Fused => Ok(Backend::Fused),
            Kernels::Ops => Ok(Backend::Ops),
            Kernels::Rows if dtype == DType::F64 => Err(crate::Error::Config(format!(
                "the row kernels (rows) compute in f32, not {dtype:?} on {dev:?}: use auto or \
                 candle"
            ))),
            Kernels::Rows => Ok(Backend::Rows),
        }
    }

    /// The backend for a model with f32 (master) weights on `dev` that computes in
    /// `precision`: [`resolve`](Self::resolve) for f32, [`Backend::CandleBf16`] for bf16 (the
    /// fused kernels have no bf16: asking for them is refused), f16 refused
    /// ([`Precision::check_trainable`]).
    pub fn for_training(
        kernels: Kernels,
        dev: &Device,
        precision: Precision,
    ) -> crate::Result<Backend> {
        match precision.check_trainable()? {
            Precision::Bf16 => match Backend::resolve(kernels, dev, DType::BF16)? {
                Backend::Candle => Ok(Backend::CandleBf16),
                Backend::Rows => Ok(Backend::RowsBf16),
                b => unreachable!("resolve gave {b} for bf16"),
            },
            _ => Backend::resolve(kernels, dev, DType::F32),
        }
    }

    /// [`resolve`](Self::resolve) with [`Kernels::Auto`] for a model built from `vb`, as a
    /// candle error (for the models' `new(cfg, vb)`).
    pub fn of(vb: &candle_nn::VarBuilder) -> Result<Backend> {
        Backend::resolve(Kernels::Auto, vb.device(), vb.dtype()).map_err(candle_core::Error::wrap)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Fused => "fused",
            Backend::Ops => "ops",
            Backend::Candle => "candle",
            Backend::CandleBf16 => "candle-bf16",
            Backend::Rows => "rows",
            Backend::RowsBf16 => "rows-bf16",
        }
    }

    /// The dtype the products compute in where it is not the weights' (mixed precision).
    pub fn half_dtype(self) -> Option<DType> {
        match self {
            Backend::CandleBf16 | Backend::RowsBf16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// `x` in the products' dtype (unchanged unless mixed).
    fn half(self, x: &Tensor) -> Result<Tensor> {
        match self.half_dtype() {
            Some(d) => x.to_dtype(d),
            None => Ok(x.clone()),
        }
    }

    /// `x` back in the residual stream's dtype: f32 under mixed precision, unchanged otherwise.
    /// Every product's output that joins the stream, a concatenation or a loss passes here.
    pub fn full(self, x: &Tensor) -> Result<Tensor> {
        match self.half_dtype() {
            Some(_) => x.to_dtype(DType::F32),
            None => Ok(x.clone()),
        }
    }

    /// Whether the single-layer ops (and the optimiser's update) are the fused CPU ones.
    pub fn fused_ops(self) -> bool {
        self.cpu_ops()
    }

    fn cpu_ops(self) -> bool {
        matches!(self, Backend::Fused | Backend::Ops)
    }

    /// Whether LayerNorm, softmax and GELU are [`crate::rowops`]'.
    fn row_ops(self) -> bool {
        matches!(self, Backend::Rows | Backend::RowsBf16)
    }

    /// `f` on `x` widened to f32 (half precision in, as a bf16 VAE's attention gives): the
    /// result in f32 under mixed precision (it joins the f32 stream), else in `x`'s dtype.
    fn in_f32(self, x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let dtype = x.dtype();
        let y = match dtype {
            DType::BF16 | DType::F16 => f(&x.to_dtype(DType::F32)?)?,
            _ => f(x)?,
        };
        match self.half_dtype() {
            Some(_) => Ok(y),
            None => y.to_dtype(dtype),
        }
    }

    /// Whether a transformer block runs as one fused node ([`crate::cpu::block`]).
    pub(crate) fn fused_blocks(self) -> bool {
        self == Backend::Fused
    }

    /// `x W^T + b` over the last dim (PyTorch's `[out, in]` weight layout).
    pub fn linear(self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        if self.cpu_ops() {
            return crate::cpu::ops::linear(x, w, b);
        }
        let (x, w, b) = (&self.half(x)?, &self.half(w)?, &self.half(b)?);
        let dims = x.dims();
        let (inp, out) = (dims[dims.len() - 1], w.dim(0)?);
        let rows = x.elem_count() / inp.max(1);
        let y = x.reshape((rows, inp))?.matmul(&w.t()?)?.broadcast_add(b)?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("non-empty") = out;
        y.reshape(shape)
    }

    /// LayerNorm over the last dimension (PyTorch's: biased variance, `eps` inside the root).
    pub fn layer_norm(self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        if self.cpu_ops() {
            return crate::cpu::ops::layer_norm(x, w, b, eps);
        }
        if self.row_ops() {
            let (w, b) = (&w.to_dtype(DType::F32)?, &b.to_dtype(DType::F32)?);
            return self.in_f32(x, |x| crate::rowops::layer_norm(x, w, b, eps));
        }
        // candle-nn's fused layer_norm records no backward: primitive ops only
        let x = &self.full(x)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        xn.broadcast_mul(w)?.broadcast_add(b)
    }

    /// Softmax over the last dimension.
    pub fn softmax_last_dim(self, x: &Tensor) -> Result<Tensor> {
        if self.cpu_ops() {
            return crate::cpu::ops::softmax_last_dim(x);
        }
        if self.row_ops() {
            return self.in_f32(x, crate::rowops::softmax_last_dim);
        }
        // candle-nn's softmax_last_dim records no backward; the max shift is detached (it
        // cancels)
        self.in_f32(x, |x| {
            let m = x.max_keepdim(D::Minus1)?.detach();
            let e = x.broadcast_sub(&m)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        })
    }

    /// Exact (erf) GELU.
    pub fn gelu_erf(self, x: &Tensor) -> Result<Tensor> {
        if self.cpu_ops() {
            crate::cpu::ops::gelu_erf(x)
        } else if self.row_ops() && matches!(x.dtype(), DType::F32 | DType::BF16) {
            crate::rowops::gelu_erf(x)
        } else {
            x.gelu_erf()
        }
    }

    /// Multi-head attention `softmax(scale q k^T) v` on timm's packed `qkv [B, N, 3C]` (q, k,
    /// v, each `heads` heads), into the merged heads `[B, N, C]`. The row ops take it as one op
    /// each way ([`crate::rowops::attention`], which scales by `1 / sqrt(C / heads)`, the
    /// only `scale` a ViT passes); the others as the split, the products and the softmax.
    pub fn attention(self, qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
        let (b, n, c3) = qkv.dims3()?;
        let (c, hd) = (c3 / 3, c3 / 3 / heads.max(1));
        if self.row_ops() && (scale - 1.0 / (hd as f64).sqrt()).abs() < 1e-12 {
            return self.in_f32(qkv, |qkv| crate::rowops::attention(qkv, heads));
        }
        // [B, N, 3C] -> [3, B, H, N, hd]
        let qkv = qkv
            .reshape((b, n, 3, heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.i(0)?.contiguous()? * scale)?;
        let key = qkv.i(1)?.contiguous()?;
        let v = qkv.i(2)?.contiguous()?;
        let attn = self.softmax_last_dim(&self.batched_matmul(&q, &key.t()?)?)?; // [B, H, N, N]
        self.batched_matmul(&attn, &v)?
            .transpose(1, 2)?
            .reshape((b, n, c)) // [B, N, C]
    }

    /// `[.., m, k] @ [.., k, n]` with equal batch dims (attention's products).
    pub fn batched_matmul(self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if self.cpu_ops() {
            crate::cpu::ops::batched_matmul(a, b)
        } else {
            self.half(a)?.matmul(&self.half(b)?)
        }
    }

    /// A 3x3, stride-1, padding-1 convolution (inference): `x [N, Cin, H, W]`,
    /// `w [Cout, Cin, 3, 3]`.
    pub fn conv3x3(self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        if self.cpu_ops() {
            return crate::cpu::conv::conv3x3(x, w, b);
        }
        let y = conv2d(&self.half(x)?, &self.half(w)?, 1, 1)?;
        match b {
            Some(b) => y.broadcast_add(&self.half(b)?.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// candle's `conv2d`, with bf16 on the CPU (where candle has no bf16 gemm for convolutions)
/// widened to f32 for the product and rounded back: the result a GPU's bf16 convolution with
/// f32 accumulation gives.
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::BF16 {
        let y = x
            .to_dtype(DType::F32)?
            .conv2d(&w.to_dtype(DType::F32)?, padding, stride, 1, 1)?;
        return y.to_dtype(DType::BF16);
    }
    x.conv2d(w, padding, stride, 1, 1)
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_only_for_f32_on_the_cpu_and_asking_elsewhere_is_refused() {
        let cpu = Device::Cpu;
        assert_eq!(
            Backend::resolve(Kernels::Fused, &cpu, DType::F32).unwrap(),
            Backend::Fused
        );
        assert_eq!(
            Backend::resolve(Kernels::Ops, &cpu, DType::F32).unwrap(),
            Backend::Ops
        );
        assert_eq!(
            Backend::resolve(Kernels::Candle, &cpu, DType::F32).unwrap(),
            Backend::Candle
        );
        let e = Backend::resolve(Kernels::Fused, &cpu, DType::F64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("F64") && e.contains("CPU only"), "{e}");
        // the row ops: any device in f32 (and half precision, widened), mixed for training
        assert_eq!(
            Backend::resolve(Kernels::Rows, &cpu, DType::F32).unwrap(),
            Backend::Rows
        );
        assert_eq!(
            Backend::for_training(Kernels::Rows, &cpu, Precision::Bf16).unwrap(),
            Backend::RowsBf16
        );
        assert_eq!(Backend::RowsBf16.half_dtype(), Some(DType::BF16));
        // what auto takes without LMD_KERNELS: the fused kernels for f32 on the CPU, the row
        // ops for bf16 there (training in mixed precision), candle's ops for the rest
        if std::env::var_os(KERNELS_ENV).is_none() {
            let auto = |d| Backend::resolve(Kernels::Auto, &cpu, d).unwrap();
            assert_eq!(
                [
                    auto(DType::F32),
                    auto(DType::BF16),
                    auto(DType::F16),
                    auto(DType::F64)
                ],
                [
                    Backend::Fused,
                    Backend::Rows,
                    Backend::Candle,
                    Backend::Candle
                ]
            );
            assert_eq!(
                Backend::for_training(Kernels::Auto, &cpu, Precision::Bf16).unwrap(),
                Backend::RowsBf16
            );
        }
        let e = Backend::resolve(Kernels::Rows, &cpu, DType::F64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("F64") && e.contains("f32"), "{e}");
        for s in ["auto", "fused", "ops", "candle", " Candle ", "rows"] {
            assert!(s.parse::<Kernels>().is_ok(), "{s}");
        }
        let e = "gpu".parse::<Kernels>().unwrap_err().to_string();
        assert!(e.contains("\"gpu\"") && e.contains("candle"), "{e}");
    }
}
