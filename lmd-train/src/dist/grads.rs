//! Gradient averaging over ranks in flat buckets (PyTorch DDP's `bucket_cap_mb`): the
//! gradients of consecutive parameters, in the optimiser's order (the same on every rank), are
//! packed into f32 buffers of about [`BUCKET_ELEMS`] values, each summed over the ranks in one
//! all-reduce and scaled by `1 / world`, then unpacked into the gradient store. A few calls per
//! step, not one per parameter. candle's backward is one call that returns all gradients, so the
//! all-reduce cannot overlap it; the buckets run after it.
//!
//! Where a bucket is summed is the [`Reducer`] that [`Dist::reducer`] picks for the gradients'
//! device, once, in one place:
//! - **host** (MPI): each gradient is copied once into the bucket's send buffer (straight from a
//!   CPU tensor's storage when it is contiguous f32), summed into a second buffer by MPI, and
//!   scaled once into the new gradient tensor. The two buffers are reused by every bucket of a
//!   step. CUDA gradients take this path too in a build without `nccl` (a copy to the host).
//! - **NCCL** (CUDA tensors, the `nccl` feature): the bucket is concatenated on the device,
//!   averaged there in place on candle's stream (`ncclAvg`: sum and scale in one pass) and
//!   split back: no host copy, no sync.

use super::{Collective, Dist};
use crate::Result;
use lmd_model::candle::backprop::GradStore;
use lmd_model::candle::{DType, Device, Tensor, Var};

/// Values per bucket: 4M f32 (16 MiB), about PyTorch DDP's default 25 MB cap.
pub const BUCKET_ELEMS: usize = 4 << 20;

/// Where gradient buckets are summed over the ranks.
#[derive(Clone, Copy)]
pub enum Reducer<'a> {
    /// Through host memory, by the host collective (MPI).
    Host(&'a dyn Collective),
    /// On the device, by NCCL.
    #[cfg(feature = "nccl")]
    Nccl(&'a super::Nccl),
}

impl Reducer<'_> {
    /// For messages and the run's config.
    pub fn name(&self) -> String {
        match self {
            Reducer::Host(c) => c.name().to_string(),
            #[cfg(feature = "nccl")]
            Reducer::Nccl(n) => format!("NCCL on cuda:{}", n.ordinal()),
        }
    }
}

impl Dist {
    /// Where the gradients of tensors on `device` are summed: NCCL for a CUDA device in a build
    /// with the `nccl` feature (its communicator is made at the first call, a collective: every
    /// rank calls this at the same step), else the host collective.
    pub fn reducer(&self, device: &Device) -> Result<Reducer<'_>> {
        #[cfg(feature = "nccl")]
        if let Device::Cuda(cuda) = device {
            if self.nccl.get().is_none() {
                let n = super::Nccl::init(self.comm(), cuda)?;
                if self.is_root() {
                    eprintln!(
                        "lmd: gradients averaged by NCCL on each rank's GPU ({} ranks)",
                        self.world_size()
                    );
                }
                let _ = self.nccl.set(n);
            }
            return Ok(Reducer::Nccl(self.nccl.get().expect("set above")));
        }
        let _ = device;
        Ok(Reducer::Host(self.comm()))
    }
}

/// Append `g`'s values as f32 to `out`: a contiguous f32 CPU tensor straight from its storage,
/// anything else through a conversion and a copy to the host.
fn append_f32(g: &Tensor, out: &mut Vec<f32>) -> Result<()> {
    {
        let (storage, layout) = g.storage_and_layout();
        if let (lmd_model::candle::Storage::Cpu(cpu), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            if let Ok(values) = cpu.as_slice::<f32>() {
                out.extend_from_slice(&values[a..b]);
                return Ok(());
            }
        }
    }
    out.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    Ok(())
}

/// Average the gradients of `vars` over all ranks of `dist`, in place in `grads`; vars
/// without a gradient are skipped (on every rank alike: the graph is the same). Returns the
/// number of all-reduce calls (0 at world size 1).
pub fn average_gradients(
    dist: &Dist,
    vars: &[&Var],
    grads: &mut GradStore,
    bucket_elems: usize,
) -> Result<usize> {
    let world = dist.world_size();
    let Some(device) = vars
        .iter()
        .find_map(|v| grads.get(v.as_tensor()).map(|g| g.device().clone()))
    else {
        return Ok(0);
    };
    if world == 1 {
        return Ok(0);
    }
    reduce_buckets(dist.reducer(&device)?, world, vars, grads, bucket_elems)
}

/// The buckets of [`average_gradients`] through `reducer`, scaled by `1 / world` (also at world
/// size 1, for benchmarks and checks of a reducer).
pub fn reduce_buckets(
    reducer: Reducer<'_>,
    world: usize,
    vars: &[&Var],
    grads: &mut GradStore,
    bucket_elems: usize,
) -> Result<usize> {
    let scale = 1.0 / world as f32;
    let with_grad: Vec<(&Var, Tensor)> = vars
        .iter()
        .filter_map(|v| grads.get(v.as_tensor()).map(|g| (*v, g.clone())))
        .collect();
    let mut calls = 0;
    let mut start = 0;
    let (mut send, mut recv) = (Vec::<f32>::new(), Vec::<f32>::new());
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
        let bucket = &with_grad[start..end];
        match reducer {
            Reducer::Host(comm) => {
                send.clear();
                for (_, g) in bucket {
                    append_f32(g, &mut send)?;
                }
                recv.resize(n, 0.0);
                comm.all_reduce_into_f32(&send, &mut recv[..n])?;
                let mut off = 0;
                for (v, g) in bucket {
                    let k = g.elem_count();
                    let part: Vec<f32> = recv[off..off + k].iter().map(|x| x * scale).collect();
                    let t = Tensor::from_vec(part, g.shape(), g.device())?.to_dtype(g.dtype())?;
                    grads.insert(v.as_tensor(), t);
                    off += k;
                }
            }
            #[cfg(feature = "nccl")]
            Reducer::Nccl(nccl) => {
                let flat = bucket
                    .iter()
                    .map(|(_, g)| g.flatten_all()?.to_dtype(DType::F32))
                    .collect::<lmd_model::candle::Result<Vec<_>>>()?;
                // a buffer of its own: the sum is in place, and a bucket of one tensor would
                // otherwise be that gradient's own storage
                let buf = match flat.len() {
                    1 => flat[0].copy()?,
                    _ => Tensor::cat(&flat, 0)?,
                };
                // ncclAvg: the sum and the 1/world scale in one pass, no second buffer
                nccl.all_reduce_mean(&buf)?;
                let mut off = 0;
                for (v, g) in bucket {
                    let k = g.elem_count();
                    let t = buf
                        .narrow(0, off, k)?
                        .reshape(g.shape())?
                        .to_dtype(g.dtype())?;
                    grads.insert(v.as_tensor(), t);
                    off += k;
                }
            }
        }
        calls += 1;
        start = end;
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_pack_alike_from_storage_views_and_other_dtypes() {
        let dev = Device::Cpu;
        let t = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let want = |t: &Tensor| -> Vec<f32> {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // contiguous f32 (from storage), a narrowed view (an offset), a transpose (strided),
        // bf16 (converted): appended one after another, each equal to its own values
        let narrowed = t.narrow(0, 1, 2).unwrap();
        let transposed = t.t().unwrap();
        let bf16 = t.to_dtype(DType::BF16).unwrap();
        let mut out = vec![-1.0];
        let mut expect = vec![-1.0];
        for g in [&t, &narrowed, &transposed, &bf16] {
            append_f32(g, &mut out).unwrap();
            expect.extend(want(g));
        }
        assert_eq!(out, expect);
        assert_eq!(&out[13..21], &[4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
    }
}
