//! The launches of `kernels.cu` (PTX from `build.rs`), loaded once per device as the module
//! `lmd_rowops`. A row kernel takes its f32 inputs, then its output, then `rows`, `cols` (u32)
//! and, for LayerNorm, `eps` (f32), on [`super::grid`]`(rows)` blocks; an elementwise one its
//! inputs, its output and the element count (u32), on [`super::grid`]`(count / 32)` blocks.
//! Blocks are (32, [`super::WARPS_PER_BLOCK`]).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

use crate::cpu::attention::Heads;

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
        views.push(view::<T>(kernel.name(), (*s, *l), what)?);
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

/// The contiguous view of an operand of `T`, named for errors.
fn view<'a, T: CudaDType>(
    op: &str,
    (s, l): (&'a CudaStorage, &Layout),
    what: &str,
) -> Result<cudarc::driver::CudaView<'a, T>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: {what} must be contiguous")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// Multi-head attention on the packed `qkv` (`kernels.cu`'s `lmd_attention_*`): the merged
/// heads `[b, n, c]` without `dout`; with it (the merged heads' gradient), `dqkv [b, n, 3c]`,
/// from the backward's two kernels. One warp per (sample, head, token) row.
pub(super) fn attention(
    d: &Heads,
    scale: f32,
    qkv: (&CudaStorage, &Layout),
    dout: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    let name = if dout.is_some() {
        "lmd_attention_bwd_f32"
    } else {
        "lmd_attention_f32"
    };
    let dev = qkv.0.device().clone();
    let qkv_v = view::<f32>(name, qkv, "qkv")?;
    let rows = d.b * d.heads * d.n;
    let dims = [d.b, d.n, d.c, d.heads].map(u32::try_from);
    let (Ok(b), Ok(n), Ok(c), Ok(heads), Ok(_), Ok(_)) = (
        dims[0],
        dims[1],
        dims[2],
        dims[3],
        u32::try_from(rows),
        u32::try_from(rows * d.n * 2),
    ) else {
        candle_core::bail!("{name}: {} x {} x {} is past u32", d.b, d.n, d.c)
    };
    let cfg = LaunchConfig {
        grid_dim: (super::grid(rows), 1, 1),
        block_dim: (32, super::WARPS_PER_BLOCK, 1),
        shared_mem_bytes: 0,
    };
    let load = |f: &str| dev.get_or_load_custom_func(f, "lmd_rowops", ptx::KERNELS);
    match dout {
        None => {
            // SAFETY: every element of out is written (each row's head block by its warp);
            // p is scratch, each row written before it is read.
            let out = unsafe { dev.alloc::<f32>(d.b * d.n * d.c)? };
            let p = unsafe { dev.alloc::<f32>(rows * d.n)? };
            if rows > 0 {
                let func = load("lmd_attention_f32")?;
                let mut args = func.builder();
                args.arg(&qkv_v).arg(&out).arg(&p);
                args.arg(&b).arg(&n).arg(&c).arg(&heads).arg(&scale);
                // SAFETY: the argument list matches lmd_attention_f32's signature.
                unsafe { args.launch(cfg) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        Some(g) => {
            let g_v = view::<f32>(name, g, "the gradient")?;
            // SAFETY: the first kernel writes dqkv's q columns and both planes of ps, the
            // second (after it, on the same stream) dqkv's k and v columns.
            let dqkv = unsafe { dev.alloc::<f32>(d.b * d.n * 3 * d.c)? };
            let ps = unsafe { dev.alloc::<f32>(2 * rows * d.n)? };
            if rows > 0 {
                let func = load("lmd_attention_bwd_q_f32")?;
                let mut args = func.builder();
                args.arg(&qkv_v).arg(&g_v).arg(&dqkv).arg(&ps);
                args.arg(&b).arg(&n).arg(&c).arg(&heads).arg(&scale);
                // SAFETY: the argument list matches lmd_attention_bwd_q_f32's signature.
                unsafe { args.launch(cfg) }.w()?;
                let func = load("lmd_attention_bwd_kv_f32")?;
                let mut args = func.builder();
                args.arg(&qkv_v).arg(&g_v).arg(&ps).arg(&dqkv);
                args.arg(&b).arg(&n).arg(&c).arg(&heads);
                // SAFETY: the argument list matches lmd_attention_bwd_kv_f32's signature.
                unsafe { args.launch(cfg) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(dqkv, dev))
        }
    }
}
