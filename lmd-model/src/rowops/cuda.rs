//! The launches of `kernels.cu` (PTX from `build.rs`), loaded once per device as the module
//! `lmd_rowops`. A row kernel takes its f32 inputs, then its output, then `rows`, `cols` (u32)
//! and, for LayerNorm, `eps` (f32), on [`super::grid`]`(rows)` blocks; an elementwise one its
//! inputs, its output and the element count (u32), on [`super::grid`]`(count / 32)` blocks.
//! Blocks are (32, [`super::WARPS_PER_BLOCK`]).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
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
    GeluF32,
    GeluBwdF32,
    GeluBf16,
    GeluBwdBf16,
}

impl Kernel {
    fn name(self) -> &'static str {
        match self {
            Kernel::LayerNorm => "lmd_layer_norm_f32",
            Kernel::LayerNormBwd => "lmd_layer_norm_bwd_f32",
            Kernel::Softmax => "lmd_softmax_f32",
            Kernel::SoftmaxBwd => "lmd_softmax_bwd_f32",
            Kernel::GeluF32 => "lmd_gelu_erf_f32",
            Kernel::GeluBwdF32 => "lmd_gelu_erf_bwd_f32",
            Kernel::GeluBf16 => "lmd_gelu_erf_bf16",
            Kernel::GeluBwdBf16 => "lmd_gelu_erf_bwd_bf16",
        }
    }

    /// Whether the kernel is elementwise (one thread an element) rather than one warp a row.
    fn elementwise(self) -> bool {
        matches!(
            self,
            Kernel::GeluF32 | Kernel::GeluBwdF32 | Kernel::GeluBf16 | Kernel::GeluBwdBf16
        )
    }

    /// Output elements per input element (the LayerNorm's backward writes two planes).
    fn planes(self) -> usize {
        match self {
            Kernel::LayerNormBwd => 2,
            _ => 1,
        }
    }
}

/// Run `kernel` over `rows` x `cols` values of `T` (f32, or bf16 for the bf16 GELU) on the
/// first input's device; `ins` are the inputs in the kernel's order, each named for errors.
pub(super) fn launch<T: CudaDType + DeviceRepr>(
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
        views.push(s.as_cuda_slice::<T>()?.slice(a..b));
    }
    // SAFETY: every element is written by the kernel below (each row by its warp, each element
    // by its thread).
    let out = unsafe { dev.alloc::<T>(kernel.planes() * rows * cols)? };
    if rows > 0 && cols > 0 {
        let (r, c, n) = (
            u32::try_from(rows),
            u32::try_from(cols),
            u32::try_from(rows * cols),
        );
        let (Ok(r), Ok(c), Ok(n)) = (r, c, n) else {
            candle_core::bail!("{}: {rows} x {cols} is past u32", kernel.name())
        };
        let e = eps.unwrap_or(0.0) as f32;
        let func = dev.get_or_load_custom_func(kernel.name(), "lmd_rowops", ptx::KERNELS)?;
        let mut args = func.builder();
        for v in &views {
            args.arg(v);
        }
        args.arg(&out);
        let blocks = if kernel.elementwise() {
            args.arg(&n);
            super::grid((rows * cols).div_ceil(32))
        } else {
            args.arg(&r);
            args.arg(&c);
            super::grid(rows)
        };
        if eps.is_some() {
            args.arg(&e);
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (32, super::WARPS_PER_BLOCK, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature in kernels.cu.
        unsafe { args.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
