//! NCCL for the gradients of CUDA tensors (the `nccl` feature: candle's `nccl`, cudarc 0.19).
//!
//! - One NCCL communicator per process, over the same ranks as the host collective, made the
//!   way NCCL's docs show: rank 0 asks NCCL for a unique id, the host collective (MPI, or
//!   [`super::Single`] at world size 1) broadcasts its 128 bytes, and every rank calls
//!   `ncclCommInitRank` with it on its own device's stream. Making it is a collective: every
//!   rank calls [`Nccl::init`] at the same point (the first step's gradient averaging).
//! - [`Nccl::all_reduce_sum`] and [`Nccl::all_reduce_mean`] (`ncclAvg`, NCCL 2.10+: the
//!   gradient average with no separate scaling kernel) reduce a contiguous f32 CUDA tensor over
//!   the ranks **in place**, on candle's stream of that device, so the reduction is ordered
//!   after the kernels that wrote the tensor and before those that read it, with no host sync.
//!   The tensor never leaves the device.
//! - cudarc's `Comm` is neither `Send` nor `Sync` (NCCL communicators are not thread-safe), so
//!   the compiler keeps [`Nccl`] on the thread that made it: the training thread.
//! - Errors name NCCL's result code and the device.

use super::Collective;
use crate::{Error, Result};
use lmd_model::candle::backend::BackendStorage;
use lmd_model::candle::cuda_backend::cudarc::nccl::result::NcclError;
use lmd_model::candle::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use lmd_model::candle::{CpuStorage, CudaDevice, CudaStorage, DType, InplaceOp1, Layout, Tensor};

/// This process's NCCL communicator, on one CUDA device.
pub struct Nccl {
    comm: Comm,
    ordinal: usize,
}

/// An in-place all-reduce as candle's op (`Tensor::inplace_op1`).
struct AllReduce<'a> {
    comm: &'a Comm,
    op: ReduceOp,
}

impl Nccl {
    /// Make the communicator of `host`'s ranks on `device` (a collective over `host`).
    pub fn init(host: &dyn Collective, device: &CudaDevice) -> Result<Nccl> {
        let ordinal = device.cuda_stream().context().ordinal();
        let err = |what: &str, e: &dyn std::fmt::Debug| {
            Error::Invalid(format!(
                "NCCL on cuda:{ordinal} (rank {} of {}): {what}: {e:?}",
                host.rank(),
                host.world_size()
            ))
        };
        let mut bytes = match host.rank() {
            0 => {
                let id = Id::new().map_err(|e| err("ncclGetUniqueId", &e))?;
                id.internal().iter().map(|&c| c as u8).collect()
            }
            _ => vec![],
        };
        host.broadcast_bytes(0, &mut bytes)?;
        let raw: [std::ffi::c_char; 128] = bytes
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|v: Vec<_>| err("the unique id broadcast", &format!("{} bytes", v.len())))?;
        let comm = Comm::from_rank(
            device.cuda_stream(),
            host.rank(),
            host.world_size(),
            Id::uninit(raw),
        )
        .map_err(|e| err("ncclCommInitRank", &e))?;
        Ok(Nccl { comm, ordinal })
    }

    /// The CUDA ordinal the communicator runs on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Sum `t` (contiguous f32, on this communicator's device) over the ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        self.all_reduce(t, ReduceOp::Sum)
    }

    /// Average `t` (contiguous f32, on this communicator's device) over the ranks, in place.
    pub fn all_reduce_mean(&self, t: &Tensor) -> Result<()> {
        self.all_reduce(t, ReduceOp::Avg)
    }

    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        if !t.is_contiguous() {
            return Err(Error::Invalid(format!(
                "NCCL all-reduce on cuda:{}: the tensor of shape {:?} is not contiguous",
                self.ordinal,
                t.dims()
            )));
        }
        t.inplace_op1(&AllReduce {
            comm: &self.comm,
            op,
        })?;
        Ok(())
    }
}

impl InplaceOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> lmd_model::candle::Result<()> {
        lmd_model::candle::bail!("NCCL all-reduce takes CUDA tensors; CPU tensors go through MPI")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> lmd_model::candle::Result<()> {
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            lmd_model::candle::Error::Msg("NCCL all-reduce: not contiguous".into())
        })?;
        if s.dtype() != DType::F32 {
            lmd_model::candle::bail!(
                "NCCL all-reduce: {:?} buckets are not reduced (f32)",
                s.dtype()
            );
        }
        let buf = s.as_cuda_slice_mut::<f32>()?;
        let mut view = buf.slice_mut(start..end);
        self.comm
            .all_reduce_in_place(&mut view, &self.op)
            .map_err(|e: NcclError| lmd_model::candle::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok(())
    }
}
