//! The CUDA row kernels (`src/rowops/kernels.cu`) run on the CPU: the file is compiled as C++
//! with emulated warps (`tests/rowops_emu/`: each lane a thread, each shuffle a barrier), launched
//! with the grid and block the CUDA launch uses ([`rowops::grid`], [`rowops::WARPS_PER_BLOCK`]),
//! and its outputs compared with the row ops' CPU results ([`rowops`]). This checks the kernels'
//! arithmetic and indexing (rows past a block's end, widths below and past a warp, a row far
//! from zero) on every CI run; the GPU itself checks the PTX and the launch (the device check).
//!
//! Needs a C++20 compiler (`c++`, or `$CXX`): a missing one fails the test, naming it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lmd_model::candle::{DType, Device, Tensor};
use lmd_model::rowops;

/// The emulator binary, compiled once per test run.
fn emulator() -> &'static Path {
    static EMU: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, bin) = EMU.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("emu");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rowops_emu/main.cpp");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-pthread", "-Wall", "-Werror", "-o"])
            .arg(&bin)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C++ compiler {cxx:?}: {e}"));
        assert!(
            out.status.success(),
            "{cxx} {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, bin)
    });
    bin
}

/// Deterministic values: `offset + scale * u`, u uniform in [-1, 1).
fn values(n: usize, seed: u64, offset: f32, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            offset + scale * (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

/// Run `kernel` in the emulator over `rows` x `cols` with the named f32 inputs; its output.
fn emulate(kernel: &str, rows: usize, cols: usize, eps: f64, ins: &[(&str, &[f32])]) -> Vec<f32> {
    let ins: Vec<(&str, Vec<u8>)> = ins
        .iter()
        .map(|(n, v)| (*n, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    emulate_bytes(kernel, rows, cols, eps, &ins)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// [`emulate`] with raw little-endian inputs (bf16 for the `_bf16` kernels); the raw output.
fn emulate_bytes(
    kernel: &str,
    rows: usize,
    cols: usize,
    eps: f64,
    ins: &[(&str, Vec<u8>)],
) -> Vec<u8> {
    // a row kernel's grid is one warp a row; an elementwise kernel's one thread an element
    let grid = if kernel.contains("gelu") {
        rowops::grid((rows * cols).div_ceil(32))
    } else {
        rowops::grid(rows)
    };
    let what = format!("{kernel} on {rows} x {cols}");
    let args = [rows.to_string(), cols.to_string(), eps.to_string()];
    run(kernel, &args, grid, ins, &what)
}

/// The attention `kernel` (forward, or both of the backward's) on qkv `[b, n, 3c]` (and dout
/// `[b, n, c]`) split into `heads`, one warp a (sample, head, token) row; its f32 output.
fn emulate_attention(
    kernel: &str,
    [b, n, c, heads]: [usize; 4],
    ins: &[(&str, &[f32])],
) -> Vec<f32> {
    let ins: Vec<(&str, Vec<u8>)> = ins
        .iter()
        .map(|(n, v)| (*n, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let args = [b, n, c, heads].map(|v| v.to_string());
    let what = format!("{kernel} on [{b}, {n}, 3 x {c}] in {heads} heads");
    run(kernel, &args, rowops::grid(b * heads * n), &ins, &what)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The emulator on `kernel` with its size arguments `args`, then the grid and block, in a
/// temp dir holding the inputs; the raw output. Fails after 60 s, naming `what`.
fn run(kernel: &str, args: &[String], grid: u32, ins: &[(&str, Vec<u8>)], what: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in ins {
        std::fs::write(dir.path().join(format!("{name}.bin")), bytes).unwrap();
    }
    let mut child = Command::new(emulator())
        .arg(kernel)
        .args(args)
        .arg(grid.to_string())
        .arg(rowops::WARPS_PER_BLOCK.to_string())
        .arg(dir.path())
        .spawn()
        .unwrap();
    // a shuffle on a partial warp never passes its barrier: fail, never hang
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("{what} hung in the emulator (a partial-warp shuffle?)");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "{what}: {status}");
    std::fs::read(dir.path().join("out.bin")).unwrap()
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Every element within `tol * (1 + |want|)`; no NaN where the CPU has none.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}: element {i}: kernel {a}, CPU {b}"
        );
    }
}

/// (rows, cols): one row and one column; rows that leave a block's last warps idle; widths
/// below a warp, not a multiple of 32, and ViT-B's 768.
const SHAPES: [(usize, usize); 5] = [(1, 1), (5, 37), (3, 7), (9, 768), (6, 64)];

#[test]
fn layer_norm_kernels_equal_the_cpu_row_ops() {
    for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
        // a row far from zero with a small spread: the two-pass variance keeps its digits
        let (offset, spread, tol) = if i == 4 {
            (10.0, 1e-3, 2e-2)
        } else {
            (0.5, 3.0, 1e-4)
        };
        let n = rows * cols;
        let x = values(n, i as u64, offset, spread);
        let w = values(cols, 100 + i as u64, 1.0, 0.5);
        let b = values(cols, 200 + i as u64, 0.0, 0.5);
        let g = values(n, 300 + i as u64, 0.0, 1.0);
        let eps = 1e-6;
        let shape = [rows, cols];
        let (xt, wt, bt, gt) = (
            tensor(&x, &shape),
            tensor(&w, &[cols]),
            tensor(&b, &[cols]),
            tensor(&g, &shape),
        );
        let what = format!("{rows} x {cols}");

        let y = emulate(
            "lmd_layer_norm_f32",
            rows,
            cols,
            eps,
            &[("x", &x), ("w", &w), ("b", &b)],
        );
        let want = rowops::layer_norm(&xt, &wt, &bt, eps).unwrap();
        assert_close(&format!("layer norm {what}"), &y, &flat(&want), tol);

        let both = emulate(
            "lmd_layer_norm_bwd_f32",
            rows,
            cols,
            eps,
            &[("x", &x), ("w", &w), ("g", &g)],
        );
        let (dx, dw, _) = rowops::layer_norm_backward(&xt, &wt, &gt, eps).unwrap();
        assert_close(
            &format!("layer norm dx {what}"),
            &both[..n],
            &flat(&dx),
            tol * 10.0,
        );
        // the second plane, summed over rows, is the weight's gradient
        let kdw: Vec<f32> = (0..cols)
            .map(|c| (0..rows).map(|r| both[n + r * cols + c]).sum())
            .collect();
        assert_close(
            &format!("layer norm dw {what}"),
            &kdw,
            &flat(&dw),
            tol * 10.0,
        );
    }
}

#[test]
fn softmax_kernels_equal_the_cpu_row_ops() {
    let shapes = [(1, 1), (7, 13), (50, 49), (3, 100), (4, 31)];
    for (i, &(rows, cols)) in shapes.iter().enumerate() {
        // values past exp's f32 range unless the row's max is subtracted
        let (offset, scale) = if i == 3 { (95.0, 4.0) } else { (0.0, 5.0) };
        let n = rows * cols;
        let x = values(n, 10 + i as u64, offset, scale);
        let g = values(n, 20 + i as u64, 0.0, 1.0);
        let shape = [rows, cols];
        let what = format!("{rows} x {cols}");

        let y = emulate("lmd_softmax_f32", rows, cols, 0.0, &[("x", &x)]);
        let want = flat(&rowops::softmax_last_dim(&tensor(&x, &shape)).unwrap());
        assert_close(&format!("softmax {what}"), &y, &want, 1e-5);

        let dx = emulate(
            "lmd_softmax_bwd_f32",
            rows,
            cols,
            0.0,
            &[("y", &want), ("g", &g)],
        );
        let want_dx =
            rowops::softmax_backward(&tensor(&want, &shape), &tensor(&g, &shape)).unwrap();
        assert_close(&format!("softmax dx {what}"), &dx, &flat(&want_dx), 1e-5);
    }
}

#[test]
fn gelu_kernels_equal_the_cpu_ops_in_f32_and_bf16() {
    // fewer elements than a block's threads, a block and a bit, and many blocks; values out to
    // where the GELU is the identity or zero
    for (i, n) in [5usize, 131, 3001].into_iter().enumerate() {
        let x = values(n, 40 + i as u64, 0.0, 7.0);
        let g = values(n, 50 + i as u64, 0.0, 1.0);
        let y = emulate("lmd_gelu_erf_f32", 1, n, 0.0, &[("x", &x)]);
        let want = flat(&rowops::gelu_erf(&tensor(&x, &[n])).unwrap());
        assert_close(&format!("gelu {n}"), &y, &want, 2e-6);
        let dx = emulate("lmd_gelu_erf_bwd_f32", 1, n, 0.0, &[("x", &x), ("g", &g)]);
        let want_dx = rowops::gelu_erf_backward(&tensor(&x, &[n]), &tensor(&g, &[n])).unwrap();
        assert_close(&format!("gelu dx {n}"), &dx, &flat(&want_dx), 2e-6);

        // bf16 in and out, f32 inside: equal to the CPU op's up to one bf16 rounding
        let bf = |v: &[f32]| {
            Tensor::new(v, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let raw = |t: &Tensor| -> Vec<u8> {
            t.to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
        let from_raw = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        };
        let (xb, gb) = (bf(&x), bf(&g));
        let y = from_raw(emulate_bytes(
            "lmd_gelu_erf_bf16",
            1,
            n,
            0.0,
            &[("x", raw(&xb))],
        ));
        let want = flat(&rowops::gelu_erf(&xb).unwrap().to_dtype(DType::F32).unwrap());
        assert_close(&format!("gelu bf16 {n}"), &y, &want, 8e-3);
        let ins = [("x", raw(&xb)), ("g", raw(&gb))];
        let dx = from_raw(emulate_bytes("lmd_gelu_erf_bwd_bf16", 1, n, 0.0, &ins));
        let want = rowops::gelu_erf_backward(&xb, &gb)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_close(&format!("gelu dx bf16 {n}"), &dx, &flat(&want), 8e-3);
    }
}

#[test]
fn attention_kernels_equal_the_cpu_op() {
    // [b, n, c, heads]: LMD's 49 + 1 tokens in ViT-B's 64-wide heads; heads narrower than a
    // warp and tokens fewer; one token; tokens past one and two warps' worth
    let cases = [
        [2, 50, 192, 3],
        [3, 7, 20, 4],
        [1, 1, 16, 2],
        [2, 37, 64, 1],
        [1, 70, 24, 3],
    ];
    for (i, dims @ [b, n, c, heads]) in cases.into_iter().enumerate() {
        let qkv = values(b * n * 3 * c, 60 + i as u64, 0.0, 2.0);
        let dout = values(b * n * c, 70 + i as u64, 0.0, 1.0);
        let (qt, gt) = (tensor(&qkv, &[b, n, 3 * c]), tensor(&dout, &[b, n, c]));
        let what = format!("[{b}, {n}, 3 x {c}] in {heads} heads");

        let out = emulate_attention("lmd_attention_f32", dims, &[("qkv", &qkv)]);
        let want = rowops::attention(&qt, heads).unwrap();
        assert_close(&format!("attention {what}"), &out, &flat(&want), 2e-5);

        let ins = [("qkv", &qkv[..]), ("dout", &dout[..])];
        let dqkv = emulate_attention("lmd_attention_bwd_f32", dims, &ins);
        let want = rowops::attention_backward(&qt, &gt, heads).unwrap();
        assert_close(&format!("attention dqkv {what}"), &dqkv, &flat(&want), 2e-5);
    }
}
