//! The AdamW update of every parameter at once, as flat vectors: PyTorch's `foreach` AdamW,
//! the update on a GPU ([`super::Update::Auto`]).
//!
//! Why: candle runs each op as its own kernel launch on a GPU, with an allocation and a result
//! tensor on the host. Written per parameter the update is about fourteen ops and the global
//! norm three more, so LMD's ViT-B/4 MAE (252 parameter tensors) launched ~4,300 kernels a
//! step for its optimiser alone, more than its forward and backward together. Here
//! the gradients and the parameters are gathered into one vector each (one copy a parameter),
//! updated in about twenty ops whatever the model's size, and written back (one copy a
//! parameter).
//!
//! Rules:
//! - The flat vectors hold the parameters end to end in the optimiser's order, in the
//!   parameters' dtype, on their device. [`Moments`] persist between steps (the parameters'
//!   own moments are views of them); the parameters are gathered anew each step, so nothing
//!   that sets a parameter (a checkpoint, a broadcast) can leave a stale copy here.
//! - Each parameter's weight decay and lr scale become per-element vectors once
//!   ([`Coeffs`]); an lr scale of 1 everywhere needs none.
//! - The global norm is summed in rows of [`NORM_ROW`] squares, the rows in f64, and read
//!   back once; clipping scales the moments' gradient coefficients, not the gradients.
//! - It takes a step only when every parameter has a gradient of its own shape, and all share
//!   one dtype and device ([`applies`]); otherwise that step runs per parameter.

use super::AdamWConfig;
use lmd_model::candle::{DType, Result, Tensor, Var};

/// Both moments of every parameter, end to end.
pub(super) struct Moments {
    pub(super) m: Tensor,
    pub(super) v: Tensor,
}

impl Moments {
    /// The parameters' own moments, concatenated.
    pub(super) fn gather<'a>(mv: impl Iterator<Item = (&'a Tensor, &'a Tensor)>) -> Result<Self> {
        let (m, v): (Vec<_>, Vec<_>) = mv.unzip();
        Ok(Moments {
            m: gather(m.into_iter())?,
            v: gather(v.into_iter())?,
        })
    }
}

/// Per-element coefficients: each parameter's `wd · lr_scale` (0 where it has no weight
/// decay), and its lr scale unless every scale is 1.
pub(super) struct Coeffs {
    decay: Tensor,
    scale: Option<Tensor>,
}

impl Coeffs {
    /// From `(elements, lr_scale, weight_decay)` per parameter, in order, in `like`'s dtype and
    /// on its device.
    pub(super) fn new(per: impl Iterator<Item = (usize, f64, f64)>, like: &Tensor) -> Result<Self> {
        let per: Vec<_> = per.collect();
        let expand = |f: &dyn Fn(f64, f64) -> f64| -> Result<Tensor> {
            let mut v = Vec::with_capacity(like.elem_count());
            for &(n, scale, wd) in &per {
                v.extend(std::iter::repeat_n(f(scale, wd) as f32, n));
            }
            Tensor::from_vec(v, like.elem_count(), like.device())?.to_dtype(like.dtype())
        };
        let decay = expand(&|scale, wd| wd * scale)?;
        let scale = match per.iter().all(|&(_, s, _)| s == 1.0) {
            true => None,
            false => Some(expand(&|scale, _| scale)?),
        };
        Ok(Coeffs { decay, scale })
    }
}

/// Whether the flat update can take a step over these `(parameter, gradient)` pairs.
pub(super) fn applies<'a>(pairs: impl Iterator<Item = (&'a Var, Option<&'a Tensor>)>) -> bool {
    let mut first: Option<(DType, lmd_model::candle::DeviceLocation)> = None;
    let mut any = false;
    for (var, g) in pairs {
        let Some(g) = g else { return false };
        let here = (var.dtype(), var.device().location());
        if g.shape() != var.shape() || (g.dtype(), g.device().location()) != here {
            return false;
        }
        if *first.get_or_insert(here) != here {
            return false;
        }
        any = true;
    }
    any
}

/// The tensors flattened and concatenated (one copy each).
pub(super) fn gather<'a>(ts: impl Iterator<Item = &'a Tensor>) -> Result<Tensor> {
    let flat = ts.map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&flat, 0)
}

/// Values per partial sum of [`squared_norm`].
const NORM_ROW: usize = 1024;

/// `Σ g²`, read back (the step's one host synchronisation): partial sums of [`NORM_ROW`]
/// squares in `g`'s dtype, added in f64. (A single f32 sum of a hundred million squares loses
/// whole terms; converting the whole vector to f64 first costs more than the update on a CPU.)
pub(super) fn squared_norm(g: &Tensor) -> Result<f64> {
    let sq = g.sqr()?;
    let n = sq.elem_count();
    let rows = n / NORM_ROW;
    let mut parts = vec![];
    if rows > 0 {
        let body = sq
            .narrow(0, 0, rows * NORM_ROW)?
            .reshape((rows, NORM_ROW))?;
        parts.push(body.sum(1)?.to_dtype(DType::F64)?.sum_all()?);
    }
    if n > rows * NORM_ROW {
        let tail = sq.narrow(0, rows * NORM_ROW, n - rows * NORM_ROW)?;
        parts.push(tail.sum_all()?.to_dtype(DType::F64)?);
    }
    match parts.len() {
        0 => Ok(0.0),
        _ => Tensor::stack(&parts, 0)?.sum_all()?.to_scalar::<f64>(),
    }
}

/// One AdamW update of the parameters `vars` (gathered here) from the flat gradient `g`
/// scaled by `g_scale` (clipping), at learning rate `lr` with the bias corrections
/// `(1 − β1^t, 1 − β2^t)`: the new flat parameters and moments.
pub(super) fn update(
    cfg: &AdamWConfig,
    moments: &Moments,
    coeffs: &Coeffs,
    (g, g_scale): (&Tensor, f64),
    lr: f64,
    (c1, c2): (f64, f64),
    vars: &[&Var],
) -> Result<(Tensor, Moments)> {
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let theta = gather(vars.iter().map(|v| v.as_tensor()))?;
    // θ·(1 − lr·wd·scale)
    let theta = theta.mul(&coeffs.decay.affine(-lr, 1.0)?)?;
    let m = (moments.m.affine(b1, 0.0)? + g.affine((1.0 - b1) * g_scale, 0.0)?)?;
    let v = (moments.v.affine(b2, 0.0)? + g.sqr()?.affine((1.0 - b2) * g_scale * g_scale, 0.0)?)?;
    let denom = v.affine(1.0 / c2, 0.0)?.sqrt()?.affine(1.0, cfg.eps)?;
    let step = m.affine(lr / c1, 0.0)?.div(&denom)?;
    let step = match &coeffs.scale {
        Some(s) => step.mul(s)?,
        None => step,
    };
    Ok(((theta - step)?, Moments { m, v }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmd_model::candle::Device;

    /// The norm's partial sums cover every value once: lengths below, at and past a row, and
    /// the f64 sum of the same squares.
    #[test]
    fn squared_norm_sums_every_square_once() {
        for n in [0, 1, 7, NORM_ROW, NORM_ROW + 1, 3 * NORM_ROW - 5] {
            let v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.61).sin()).collect();
            let want: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
            let g = Tensor::from_vec(v, n, &Device::Cpu).unwrap();
            let got = squared_norm(&g).unwrap();
            assert!(
                (got - want).abs() <= 1e-5 * want.max(1.0),
                "{n}: {got} vs {want}"
            );
        }
    }
}
