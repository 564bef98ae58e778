//! The update in three in-place passes for contiguous f32 CPU tensors (moments, then the
//! parameter), instead of about twelve candle ops that each allocate a result: the update
//! of the fused CPU backend. The tensors may be views (a parameter's moments are views of
//! the flat moments of [`super::flat`]): the passes write through their layout's offsets.

use super::AdamWConfig;
use lmd_model::candle::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

/// Whether the in-place passes can take these tensors as laid out (contiguous, the same
/// shape; the device and dtype are the backend's to decide).
pub(super) fn applies(theta: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> bool {
    [theta, m, v, g].iter().all(|t| t.is_contiguous()) && theta.shape() == g.shape()
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => lmd_model::candle::bail!("adamw: contiguous f32 expected"),
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => lmd_model::candle::bail!("adamw: contiguous f32 expected"),
    }
}

/// `m = β·m + (1−β)·g` (or `g²` for the second moment), in place.
struct Moment {
    beta: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "lmd-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (m, g) = (slice_mut(s1, l1)?, slice(s2, l2)?);
        let (b, a) = (self.beta, 1.0 - self.beta);
        if self.square {
            m.iter_mut()
                .zip(g)
                .for_each(|(m, &g)| *m = b * *m + a * (g * g));
        } else {
            m.iter_mut().zip(g).for_each(|(m, &g)| *m = b * *m + a * g);
        }
        Ok(())
    }
}

/// `θ = θ·(1 − lr·wd) − lr · (m / c1) / (sqrt(v / c2) + eps)`, in place.
struct Step {
    lr: f64,
    decay: f64,
    c1: f64,
    c2: f64,
    eps: f64,
}

impl InplaceOp3 for Step {
    fn name(&self) -> &'static str {
        "lmd-adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (theta, m, v) = (slice_mut(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let keep = (1.0 - self.lr * self.decay) as f32;
        let (lr, c1, c2, eps) = (
            self.lr as f32,
            self.c1 as f32,
            self.c2 as f32,
            self.eps as f32,
        );
        for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
            *t = *t * keep - lr * ((m / c1) / ((v / c2).sqrt() + eps));
        }
        Ok(())
    }
}

/// One AdamW update of `theta` (and its moments) from `g`: `(lr, weight decay, 1 − β1^t,
/// 1 − β2^t)`.
pub(super) fn update(
    theta: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    cfg: &AdamWConfig,
    (lr, decay, c1, c2): (f64, f64, f64, f64),
) -> Result<()> {
    m.inplace_op2(
        g,
        &Moment {
            beta: cfg.beta1 as f32,
            square: false,
        },
    )?;
    v.inplace_op2(
        g,
        &Moment {
            beta: cfg.beta2 as f32,
            square: true,
        },
    )?;
    theta.inplace_op3(
        m,
        v,
        &Step {
            lr,
            decay,
            c1,
            c2,
            eps: cfg.eps,
        },
    )
}
