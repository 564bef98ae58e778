//! Gradient averaging over ranks in flat buckets (PyTorch DDP's `bucket_cap_mb`): the
//! gradients of consecutive parameters, in the optimiser's order (the same on every rank), are
//! packed into f32 buffers of about [`BUCKET_ELEMS`] values, each summed over the ranks in one
//! all-reduce and scaled by `1 / world`, then unpacked into the gradient store. A few calls per
//! step, not one per parameter. candle's backward is one call that returns all gradients, so the
//! all-reduce cannot overlap it; the buckets run after it.

use super::Collective;
use crate::Result;
use lmd_model::candle::backprop::GradStore;
use lmd_model::candle::{DType, Tensor, Var};

/// Values per bucket: 4M f32 (16 MiB), about PyTorch DDP's default 25 MB cap.
pub const BUCKET_ELEMS: usize = 4 << 20;

/// Average the gradients of `vars` over all ranks, in place in `grads`; vars without a
/// gradient are skipped (on every rank alike: the graph is the same). Returns the number of
/// all-reduce calls.
pub fn average_gradients(
    comm: &dyn Collective,
    vars: &[&Var],
    grads: &mut GradStore,
    bucket_elems: usize,
) -> Result<usize> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(0);
    }
    let scale = 1.0 / world as f32;
    let with_grad: Vec<(&Var, Tensor)> = vars
        .iter()
        .filter_map(|v| grads.get(v.as_tensor()).map(|g| (*v, g.clone())))
        .collect();
    let mut calls = 0;
    let mut start = 0;
    while start < with_grad.len() {
        // one bucket: parameters until the cap (at least one)
        let mut end = start;
        let mut n = 0;
        while end < with_grad.len()
            && (end == start || n + with_grad[end].1.elem_count() <= bucket_elems)
        {
            n += with_grad[end].1.elem_count();
            end += 1;
        }
        let mut buf = Vec::with_capacity(n);
        for (_, g) in &with_grad[start..end] {
            buf.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        comm.all_reduce_sum_f32(&mut buf)?;
        calls += 1;
        let mut off = 0;
        for (v, g) in &with_grad[start..end] {
            let k = g.elem_count();
            let part: Vec<f32> = buf[off..off + k].iter().map(|x| x * scale).collect();
            let t = Tensor::from_vec(part, g.shape(), g.device())?.to_dtype(g.dtype())?;
            grads.insert(v.as_tensor(), t);
            off += k;
        }
        start = end;
    }
    Ok(calls)
}
