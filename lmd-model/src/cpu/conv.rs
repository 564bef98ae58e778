//! A fast CPU 3x3, stride-1, padding-1 convolution for the VAEs (inference only).
//!
//! candle 0.11's CPU conv2d is the bottleneck of VAE encoding (3x3 64->64 convolutions are
//! nearly all of TAESD's ~23 GFLOP per 224 px image). This is Winograd's F(2x2, 3x3): each
//! 2x2 output tile comes from a 4x4 input tile through
//! `Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A`, where the elementwise product over channels becomes 16
//! gemms `M_k[Cout, tiles] = U_k[Cout, Cin] @ V_k[Cin, tiles]`: 2.25x fewer multiplications
//! than direct convolution, all in gemm. The image is processed in strips of tile rows so the
//! transformed tiles stay in cache; buffers are per thread and reused. Images run in parallel
//! (rayon), each gemm single-threaded; a single image uses gemm's own threads.
//!
//! It runs where the VAE's [`crate::Backend`] is fused; other kernel sizes and backends use
//! candle's `conv2d` (`crate::vae::Conv`). F(2x2, 3x3) is numerically benign in f32 (its transforms only add and halve); the tests compare with candle's conv2d.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use std::cell::RefCell;

struct Conv3x3;

/// Tiles per strip: transformed input and products of a strip (16 x C x TILES floats each)
/// stay within a few MiB.
const STRIP_TILES: usize = 1024;

thread_local! {
    static BUFS: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// U_k[co][ci] = (G g Gᵀ)_k for every filter: `[16, Cout, Cin]`.
fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * cout * cin];
    for co in 0..cout {
        for ci in 0..cin {
            let g = &w[(co * cin + ci) * 9..(co * cin + ci) * 9 + 9];
            // Gg: 4x3
            let mut gg = [[0f32; 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                gg[0][c] = g0;
                gg[1][c] = 0.5 * (g0 + g1 + g2);
                gg[2][c] = 0.5 * (g0 - g1 + g2);
                gg[3][c] = g2;
            }
            for (i, r) in gg.iter().enumerate() {
                let row = [
                    r[0],
                    0.5 * (r[0] + r[1] + r[2]),
                    0.5 * (r[0] - r[1] + r[2]),
                    r[2],
                ];
                for (j, v) in row.iter().enumerate() {
                    u[((i * 4 + j) * cout + co) * cin + ci] = *v;
                }
            }
        }
    }
    u
}

#[allow(clippy::too_many_arguments)]
fn conv_image(
    x: &[f32],
    u: &[f32],
    b: &[f32],
    out: &mut [f32],
    (cin, cout, h, w): (usize, usize, usize, usize),
    par: gemm::Parallelism,
) {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let (hp, wp) = (2 * th + 2, 2 * tw + 2);
    let rows_per_strip = (STRIP_TILES / tw).max(1);
    BUFS.with(|bufs| {
        let (pad, v, m) = &mut *bufs.borrow_mut();
        // zero-padded copy of the image: [cin, hp, wp], data at (1, 1)
        pad.clear();
        pad.resize(cin * hp * wp, 0.0);
        for c in 0..cin {
            for y in 0..h {
                let src = &x[(c * h + y) * w..(c * h + y + 1) * w];
                let d = (c * hp + y + 1) * wp + 1;
                pad[d..d + w].copy_from_slice(src);
            }
        }
        let max_t = rows_per_strip * tw;
        v.resize(16 * cin * max_t, 0.0);
        m.resize(16 * cout * max_t, 0.0);
        let mut ty0 = 0;
        while ty0 < th {
            let rows = rows_per_strip.min(th - ty0);
            let nt = rows * tw;
            // input transform V_k[ci][t] = (Bᵀ d B)_k, vectorised along the tile row: first
            // Bᵀ over the 4 input rows (whole padded rows at once), then B over columns.
            let mut tr = vec![0f32; 4 * wp];
            for c in 0..cin {
                let pc = &pad[c * hp * wp..(c + 1) * hp * wp];
                for r in 0..rows {
                    let y0 = 2 * (ty0 + r);
                    let row = |i: usize| &pc[(y0 + i) * wp..(y0 + i + 1) * wp];
                    let (d0, d1, d2, d3) = (row(0), row(1), row(2), row(3));
                    let (t0, rest) = tr.split_at_mut(wp);
                    let (t1, rest) = rest.split_at_mut(wp);
                    let (t2, t3) = rest.split_at_mut(wp);
                    simd::in_rows([d0, d1, d2, d3], [t0, t1, t2, t3]);
                    for i in 0..4 {
                        let ti = &tr[i * wp..(i + 1) * wp];
                        let base = |j: usize| ((i * 4 + j) * cin + c) * max_t + r * tw;
                        let [o0, o1, o2, o3] =
                            four_slices(v, [base(0), base(1), base(2), base(3)], tw);
                        simd::in_cols(ti, o0, o1, o2, o3);
                    }
                }
            }
            // 16 gemms: M_k[cout][nt] = U_k[cout][cin] @ V_k[cin][nt]
            for k in 0..16 {
                // SAFETY: U_k is cout x cin (row stride cin) inside `u`; V_k is cin x nt with row
                // stride max_t inside `v`; M_k is cout x nt with row stride max_t inside `m`.
                unsafe {
                    gemm::gemm(
                        cout,
                        nt,
                        cin,
                        m.as_mut_ptr().add(k * cout * max_t),
                        1,
                        max_t as isize,
                        false,
                        u.as_ptr().add(k * cout * cin),
                        1,
                        cin as isize,
                        v.as_ptr().add(k * cin * max_t),
                        1,
                        max_t as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                }
            }
            // output transform Y = Aᵀ m A (2x2 per tile), plus bias, vectorised along tile rows
            let mut sbuf = vec![0f32; 8 * tw];
            for co in 0..cout {
                let oc = &mut out[co * h * w..(co + 1) * h * w];
                for r in 0..rows {
                    let y = 2 * (ty0 + r);
                    let mrow = |k: usize| {
                        &m[(k * cout + co) * max_t + r * tw..(k * cout + co) * max_t + (r + 1) * tw]
                    };
                    for j in 0..4 {
                        let (s0, s1) = sbuf[j * 2 * tw..(j + 1) * 2 * tw].split_at_mut(tw);
                        simd::out_rows([mrow(j), mrow(4 + j), mrow(8 + j), mrow(12 + j)], s0, s1);
                    }
                    let bias = b[co];
                    for i in 0..2 {
                        if y + i >= h {
                            continue;
                        }
                        let sj = |j: usize| &sbuf[(j * 2 + i) * tw..(j * 2 + i + 1) * tw];
                        let (q0, q1, q2, q3) = (sj(0), sj(1), sj(2), sj(3));
                        let orow = &mut oc[(y + i) * w..(y + i + 1) * w];
                        let full = w / 2;
                        simd::out_cols([q0, q1, q2, q3], &mut orow[..2 * full], bias);
                        if w % 2 == 1 {
                            orow[w - 1] = q0[full] + q1[full] + q2[full] + bias;
                        }
                    }
                }
            }
            ty0 += rows;
        }
    });
}

/// Four disjoint mutable windows of `len` at increasing offsets of `v`.
fn four_slices(v: &mut [f32], at: [usize; 4], len: usize) -> [&mut [f32]; 4] {
    let (a, rest) = v[at[0]..].split_at_mut(at[1] - at[0]);
    let (b, rest) = rest.split_at_mut(at[2] - at[1]);
    let (c, d) = rest.split_at_mut(at[3] - at[2]);
    [&mut a[..len], &mut b[..len], &mut c[..len], &mut d[..len]]
}

/// The Winograd transforms' inner loops, compiled twice: baseline, and with AVX2+FMA for CPUs
/// that have it (picked at run time).
mod simd {
    macro_rules! dispatch {
        ($name:ident, $avx:ident, ($($a:ident: $t:ty),*), $body:block) => {
            #[inline(always)]
            fn $avx($($a: $t),*) $body
            pub fn $name($($a: $t),*) {
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                        #[target_feature(enable = "avx2,fma")]
                        unsafe fn go($($a: $t),*) { $avx($($a),*) }
                        // SAFETY: the CPU supports the features `go` was compiled for.
                        return unsafe { go($($a),*) };
                    }
                }
                $avx($($a),*)
            }
        };
    }

    dispatch!(in_rows, in_rows_impl, (d: [&[f32]; 4], t: [&mut [f32]; 4]), {
        let [t0, t1, t2, t3] = t;
        let n = t0.len();
        let (d0, d1, d2, d3) = (&d[0][..n], &d[1][..n], &d[2][..n], &d[3][..n]);
        let (t1, t2, t3) = (&mut t1[..n], &mut t2[..n], &mut t3[..n]);
        for x in 0..n {
            t0[x] = d0[x] - d2[x];
            t1[x] = d1[x] + d2[x];
            t2[x] = d2[x] - d1[x];
            t3[x] = d1[x] - d3[x];
        }
    });

    dispatch!(in_cols, in_cols_impl, (ti: &[f32], o0: &mut [f32], o1: &mut [f32], o2: &mut [f32], o3: &mut [f32]), {
        let n = o0.len();
        let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
        let ti = &ti[..2 * n + 2];
        for tx in 0..n {
            let (a0, a1, a2, a3) = (ti[2 * tx], ti[2 * tx + 1], ti[2 * tx + 2], ti[2 * tx + 3]);
            o0[tx] = a0 - a2;
            o1[tx] = a1 + a2;
            o2[tx] = a2 - a1;
            o3[tx] = a1 - a3;
        }
    });

    dispatch!(out_rows, out_rows_impl, (m: [&[f32]; 4], s0: &mut [f32], s1: &mut [f32]), {
        let n = s0.len();
        let s1 = &mut s1[..n];
        let (m0, m1, m2, m3) = (&m[0][..n], &m[1][..n], &m[2][..n], &m[3][..n]);
        for tx in 0..n {
            s0[tx] = m0[tx] + m1[tx] + m2[tx];
            s1[tx] = m1[tx] - m2[tx] - m3[tx];
        }
    });

    dispatch!(out_cols, out_cols_impl, (q: [&[f32]; 4], orow: &mut [f32], bias: f32), {
        let n = orow.len() / 2;
        let (q0, q1, q2, q3) = (&q[0][..n], &q[1][..n], &q[2][..n], &q[3][..n]);
        for (tx, o) in orow.chunks_exact_mut(2).enumerate() {
            o[0] = q0[tx] + q1[tx] + q2[tx] + bias;
            o[1] = q1[tx] - q2[tx] - q3[tx] + bias;
        }
    });
}

impl CustomOp3 for Conv3x3 {
    fn name(&self) -> &'static str {
        "lmd-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) = (s1, s2, s3) else {
            candle_core::bail!("lmd-conv3x3: f32 only")
        };
        let (Some((xa, xb)), Some((wa, wb)), Some((ba, bb))) = (
            l1.contiguous_offsets(),
            l2.contiguous_offsets(),
            l3.contiguous_offsets(),
        ) else {
            candle_core::bail!("lmd-conv3x3: inputs must be contiguous")
        };
        let (x, w, b) = (&x[xa..xb], &w[wa..wb], &b[ba..bb]);
        let (n, cin, h, wd) = l1.shape().dims4()?;
        let cout = l2.shape().dims()[0];
        let u = transform_weights(w, cout, cin);
        let mut out = vec![0f32; n * cout * h * wd];
        let (in_len, out_len) = (cin * h * wd, cout * h * wd);
        let dims = (cin, cout, h, wd);
        let threads = rayon::current_num_threads().max(1);
        if n >= threads {
            use rayon::prelude::*;
            out.par_chunks_mut(out_len).enumerate().for_each(|(i, o)| {
                conv_image(
                    &x[i * in_len..(i + 1) * in_len],
                    &u,
                    b,
                    o,
                    dims,
                    gemm::Parallelism::None,
                )
            });
        } else {
            for (i, o) in out.chunks_mut(out_len).enumerate() {
                conv_image(
                    &x[i * in_len..(i + 1) * in_len],
                    &u,
                    b,
                    o,
                    dims,
                    gemm::Parallelism::Rayon(threads),
                );
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, cout, h, wd))))
    }
}

/// 3x3 convolution, stride 1, padding 1: `x [N, Cin, H, W]`, `w [Cout, Cin, 3, 3]`, `b [Cout]`
/// (f32 on the CPU; no backward: the VAEs only encode and decode).
pub(crate) fn conv3x3(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if w.dims().len() != 4 || w.dims()[2..] != [3, 3] {
        candle_core::bail!("lmd-conv3x3: weight {:?}, want [Cout, Cin, 3, 3]", w.dims())
    }
    let bias = match b {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(w.dim(0)?, x.dtype(), x.device())?,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &bias, &Conv3x3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_conv2d() {
        let dev = Device::Cpu;
        for (n, cin, cout, h, w) in [
            (3, 5, 7, 9, 6),
            (1, 3, 4, 5, 5),
            (2, 8, 8, 1, 3),
            (2, 16, 8, 70, 33),
            (1, 2, 2, 2, 2),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (cout, cin, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
            let ours = conv3x3(&x, &k, Some(&b)).unwrap();
            let want = x
                .conv2d(&k, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let d = crate::max_abs_diff(&ours, &want).unwrap();
            assert!(d < 1e-4, "{n} {cin} {cout} {h} {w}");
            let nob = conv3x3(&x, &k, None).unwrap();
            assert_eq!(nob.dims(), &[n, cout, h, w]);
        }
    }
}
