//! The launches of `kernels.cu` (PTX from `build.rs`), loaded once per device as the module
//! `lmd_rowops`. Every kernel takes its f32 inputs, then its output, then `rows`, `cols` (u32)
//! and, for LayerNorm, `eps` (f32); grid [`super::grid`], block (32, [`super::WARPS_PER_BLOCK`]).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Result};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/rowops_ptx.rs"));
}

/// The kernels of `kernels.cu`.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kernel {
    LayerNorm,
    LayerNormBwd,
    Softmax,
    SoftmaxBwd,
}

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::LayerNorm => "lmd_layer_norm_f32",
            Kernel::LayerNormBwd => "lmd_layer_norm_bwd_f32",
            Kernel::Softmax => "lmd_softmax_f32",
            Kernel::SoftmaxBwd => "lmd_softmax_bwd_f32",
        }
    }

    /// Output elements per input element (the LayerNorm's backward writes two planes).
    fn planes(self) -> usize {
        match self {
            Kernel::LayerNormBwd => 2,
            _ => 1,
        }
    }
}

/// Run `kernel` over `rows` x `cols` on the first input's device; `ins` are the inputs in the
/// kernel's order, each named for errors.
pub(super) fn launch(
    kernel: Kernel,
    ins: &[(&CudaStorage, &Layout, &str)],
    rows: usize,
    cols: usize,
    eps: Option<f64>,
) -> Result<CudaStorage> {
    let dev = ins[0].0.device().clone();
    let mut views = Vec::with_capacity(ins.len());
    for (s, l, what) in ins {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("{}: {what} must be contiguous", kernel.name())
        };
        views.push(s.as_cuda_slice::<f32>()?.slice(a..b));
    }
    // SAFETY: every element is written by the kernel below (each row by its warp).
    let out = unsafe { dev.alloc::<f32>(kernel.planes() * rows * cols)? };
    if rows > 0 && cols > 0 {
        let (r, c) = (u32::try_from(rows), u32::try_from(cols));
        let (Ok(r), Ok(c)) = (r, c) else {
            candle_core::bail!("{}: {rows} x {cols} is past u32", kernel.name())
        };
        let e = eps.unwrap_or(0.0) as f32;
        let func = dev.get_or_load_custom_func(kernel.name(), "lmd_rowops", ptx::KERNELS)?;
        let mut args = func.builder();
        for v in &views {
            args.arg(v);
        }
        args.arg(&out);
        args.arg(&r);
        args.arg(&c);
        if eps.is_some() {
            args.arg(&e);
        }
        let cfg = LaunchConfig {
            grid_dim: (super::grid(rows), 1, 1),
            block_dim: (32, super::WARPS_PER_BLOCK, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature in kernels.cu.
        unsafe { args.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
