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
//! - It runs only where the model's [`crate::Backend`] is `Fused` (f32 on the CPU); elsewhere
//!   the block is candle ops (`crate::vit::Block::forward_composite`). The tests compare the
//!   two, forward and every gradient.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::attention::{attention_backward, attention_forward, Heads};
use super::gemm::{linear, linear_backward};
use super::rows::{
    filled_later, gelu_backward, gelu_forward, ln_backward, ln_forward, scale_rows, scaled_residual,
};
use super::{f32_slice, on_pool, with_data};

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

    fn heads(&self) -> Heads {
        Heads {
            b: self.b,
            n: self.n,
            c: self.c,
            heads: self.heads,
        }
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
    attention_forward(&d.heads(), &qkv, &mut p, &mut att);
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
    attention_backward(&d.heads(), &s.qkv, &s.p, &da, &mut dqkv);
    drop((s.p, s.qkv));
    // qkv
    linear_backward(&dqkv, &s.a1, qkv_w, &mut da, (dqkv_w, dqkv_b)); // da is now d(a1)
                                                                     // norm1, and the residual: dx = dy1 + norm1's input gradient
    let mut dx = dy1;
    ln_backward(&da, n1w, &s.xhat1, &s.rstd1, &mut dx, (dn1w, dn1b));
    (dx, dpack)
}

struct BlockOp {
    dims: Dims,
    /// Per-sample factors of the attention and MLP branches (stochastic depth), or none.
    keep: Option<[Vec<f32>; 2]>,
    save: bool,
    saved: Mutex<Option<Saved>>,
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
        let x = f32_slice(s1, l1, "lmd-block", "x")?;
        let pack = f32_slice(s2, l2, "lmd-block", "the packed parameters")?;
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
        let names = ["x", "the packed parameters", "the gradient"];
        let (dx, dpack) = with_data(&[x, pack, &grad], "lmd-block", &names, |s| {
            let (xs, ps, gs) = (s[0], s[1], s[2]);
            let saved = saved.unwrap_or_else(|| {
                forward(&self.dims, xs, ps, self.keep.as_ref(), true)
                    .1
                    .expect("saved")
            });
            on_pool(|| backward(&self.dims, ps, self.keep.as_ref(), saved, gs))
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dpack, pack.shape(), pack.device())?),
        ))
    }
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
#[path = "block_tests.rs"]
mod tests;
