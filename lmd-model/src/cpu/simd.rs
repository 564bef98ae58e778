//! Row and elementwise f32 kernels for the fused ops, compiled three times (AVX-512, AVX2+FMA,
//! baseline x86-64 / other targets) and chosen at run time.
//!
//! The workspace builds for baseline x86-64 (SSE2), where these loops would run 4 lanes wide;
//! with `multiversion!` the same source runs 8 or 16 lanes wide where the CPU has it, as
//! `gemm` does for its own kernels. Reductions keep 16 independent partial sums
//! ([`LANES`]) so that they vectorise at all (f32 addition is not associative, so the compiler
//! never reorders a plain serial sum).
//!
//! Rules: every kernel is a pure function of its slices; the bodies are `#[inline(always)]` so
//! that they are compiled with the features of the wrapper they are inlined into.

use super::math::{erf_and_gauss_f32, erf_f32, exp_f32};

/// Independent partial sums per reduction.
const LANES: usize = 16;

/// Defines `fn $name(args)` that runs `$body` compiled for AVX-512, AVX2+FMA, or the baseline.
macro_rules! multiversion {
    ($(#[$m:meta])* pub(crate) fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            if !baseline_forced() {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features v3 is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

#[cfg(test)]
thread_local! {
    /// Tests set this to run the baseline build of the kernels on this thread.
    static FORCE_BASELINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
fn baseline_forced() -> bool {
    FORCE_BASELINE.with(|f| f.get())
}

#[cfg(not(test))]
#[inline(always)]
fn baseline_forced() -> bool {
    false
}

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

multiversion! {
    /// Exact GELU: `g = h · Φ(h)`.
    pub(crate) fn gelu_forward(h: &[f32], g: &mut [f32]) {
        for (g, &v) in g.iter_mut().zip(h) {
            *g = 0.5 * v * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    /// `dg *= Φ(h) + h·φ(h)` (GELU's derivative), in place.
    pub(crate) fn gelu_backward(h: &[f32], dg: &mut [f32]) {
        let inv_sqrt_2pi = 0.398_942_3_f32;
        for (dg, &v) in dg.iter_mut().zip(h) {
            // one exp for both: e^(-(v/√2)²) = e^(-v²/2)
            let (erf, gauss) = erf_and_gauss_f32(v * std::f32::consts::FRAC_1_SQRT_2);
            let cdf = 0.5 * (1.0 + erf);
            let pdf = inv_sqrt_2pi * gauss;
            *dg *= cdf + v * pdf;
        }
    }
}

multiversion! {
    /// Softmax of each row of `m [rows, n]`, in place.
    pub(crate) fn softmax_rows(m: &mut [f32], n: usize) {
        for row in m.chunks_exact_mut(n) {
            let mx = max(row);
            for v in row.iter_mut() {
                *v = exp_f32(*v - mx);
            }
            let inv = 1.0 / sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// Softmax backward per row, in place: `g = scale · p · (g - Σ g·p)`.
    pub(crate) fn softmax_backward_rows(g: &mut [f32], p: &[f32], n: usize, scale: f32) {
        for (row, pr) in g.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
            let d = dot(row, pr);
            for (g, &pv) in row.iter_mut().zip(pr) {
                *g = pv * (*g - d) * scale;
            }
        }
    }
}

multiversion! {
    /// LayerNorm forward over rows of width `w.len()`: `xhat = (x - mean) · rstd`,
    /// `out = xhat · w + b` (biased variance, `eps` inside the square root).
    pub(crate) fn layer_norm_rows(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        eps: f32,
        xhat: &mut [f32],
        rstd: &mut [f32],
        out: &mut [f32],
    ) {
        let d = w.len();
        for (((x, xh), o), rs) in x
            .chunks_exact(d)
            .zip(xhat.chunks_exact_mut(d))
            .zip(out.chunks_exact_mut(d))
            .zip(rstd.iter_mut())
        {
            let mean = sum(x) / d as f32;
            for (xh, &v) in xh.iter_mut().zip(x) {
                *xh = v - mean;
            }
            let var = dot(xh, xh) / d as f32;
            let r = 1.0 / (var + eps).sqrt();
            *rs = r;
            for (((xh, o), &w), &b) in xh.iter_mut().zip(o.iter_mut()).zip(w).zip(b) {
                *xh *= r;
                *o = *xh * w + b;
            }
        }
    }
}

multiversion! {
    /// LayerNorm backward over rows: adds the input gradient into `dx`
    /// (`rstd · (g·w - mean(g·w) - xhat · mean(g·w·xhat))`) and accumulates the weight and
    /// bias gradients into `dw` and `db`. `gw` is scratch of the row width.
    pub(crate) fn layer_norm_backward_rows(
        g: &[f32],
        w: &[f32],
        xhat: &[f32],
        rstd: &[f32],
        dx: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        gw: &mut [f32],
    ) {
        let d = w.len();
        for (((g, xh), dx), &r) in g
            .chunks_exact(d)
            .zip(xhat.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
            .zip(rstd)
        {
            for i in 0..d {
                gw[i] = g[i] * w[i];
                dw[i] += g[i] * xh[i];
                db[i] += g[i];
            }
            let m1 = sum(gw) / d as f32;
            let m2 = dot(gw, xh) / d as f32;
            for i in 0..d {
                dx[i] += r * (gw[i] - m1 - xh[i] * m2);
            }
        }
    }
}

multiversion! {
    /// `acc[j] += Σ_rows g[row, j]` for rows of width `acc.len()`.
    pub(crate) fn add_col_sums(g: &[f32], acc: &mut [f32]) {
        for row in g.chunks_exact(acc.len()) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

multiversion! {
    /// `out[row] = base[row] + bias` for rows of width `bias.len()`.
    pub(crate) fn add_rows(base: &[f32], bias: &[f32], out: &mut [f32]) {
        for (o, s) in out.chunks_exact_mut(bias.len()).zip(base.chunks_exact(bias.len())) {
            for ((o, s), b) in o.iter_mut().zip(s).zip(bias) {
                *o = s + b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix(seed);
        (0..n).map(|_| rng.normal() as f32 * 2.0).collect()
    }

    /// The AVX-512 / AVX2 builds and the baseline build give bit-identical results (no fused
    /// multiply-adds, the same 16 partial sums), so training reproduces across CPUs.
    #[test]
    fn every_build_of_the_kernels_gives_the_same_bits() {
        let d = 77;
        let (x, w, b) = (data(9 * d, 11), data(d, 12), data(d, 13));
        let run = || {
            let mut out = Vec::new();
            let mut g = vec![0f32; x.len()];
            gelu_forward(&x, &mut g);
            out.extend_from_slice(&g);
            let mut dg = b.repeat(9);
            gelu_backward(&x, &mut dg);
            out.extend_from_slice(&dg);
            let mut m = x.clone();
            softmax_rows(&mut m, d);
            out.extend_from_slice(&m);
            let mut gs = x.clone();
            softmax_backward_rows(&mut gs, &m, d, 0.3);
            out.extend_from_slice(&gs);
            let (mut xh, mut rs, mut o) = (vec![0f32; x.len()], vec![0f32; 9], vec![0f32; x.len()]);
            layer_norm_rows(&x, &w, &b, 1e-6, &mut xh, &mut rs, &mut o);
            out.extend(xh.iter().chain(&rs).chain(&o));
            let (mut dx, mut dw, mut db, mut sc) = (
                vec![0f32; x.len()],
                vec![0f32; d],
                vec![0f32; d],
                vec![0f32; d],
            );
            layer_norm_backward_rows(&g, &w, &xh, &rs, &mut dx, &mut dw, &mut db, &mut sc);
            out.extend(dx.iter().chain(&dw).chain(&db));
            let mut acc = vec![0f32; d];
            add_col_sums(&x, &mut acc);
            out.extend_from_slice(&acc);
            out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        };
        let native = run();
        FORCE_BASELINE.with(|f| f.set(true));
        let baseline = run();
        FORCE_BASELINE.with(|f| f.set(false));
        assert_eq!(native.len(), baseline.len());
        let differ = native.iter().zip(&baseline).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{differ} of {} values differ", native.len());
    }

    #[test]
    fn lane_reductions_equal_serial_ones() {
        for n in [0, 1, 15, 16, 17, 197, 512] {
            let (a, b) = (data(n, 1), data(n, 2));
            let s: f64 = a.iter().map(|&v| v as f64).sum();
            let d: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!(
                (sum(&a) as f64 - s).abs() < 1e-4 * (1.0 + s.abs()),
                "sum {n}"
            );
            assert!(
                (dot(&a, &b) as f64 - d).abs() < 1e-4 * (1.0 + d.abs()),
                "dot {n}"
            );
            let m = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a), m, "max {n}");
        }
    }

    #[test]
    fn softmax_rows_match_f64() {
        let n = 37;
        let mut m = data(n * 3, 3);
        let want: Vec<f64> = m
            .chunks(n)
            .flat_map(|r| {
                let mx = r.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
                let e: Vec<f64> = r.iter().map(|&v| (v as f64 - mx).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |v| v / s)
            })
            .collect();
        softmax_rows(&mut m, n);
        for (a, b) in m.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn gelu_and_its_derivative_match_f64() {
        let h = data(4099, 7);
        let (mut g, mut dg) = (vec![0f32; h.len()], vec![1f32; h.len()]);
        gelu_forward(&h, &mut g);
        gelu_backward(&h, &mut dg);
        for ((&v, &g), &dg) in h.iter().zip(&g).zip(&dg) {
            let v = v as f64;
            if v.abs() >= 4.0 {
                // tails: Φ is within 4e-5 of 0 or 1
                let (want, dwant) = if v > 0.0 { (v, 1.0) } else { (0.0, 0.0) };
                assert!((g as f64 - want).abs() < 1e-3 && (dg as f64 - dwant).abs() < 1e-3);
                continue;
            }
            // erf by its Taylor series (|x| < 2.9: no harmful cancellation in f64)
            let erf = |x: f64| {
                let (mut sum, mut term, mut k) = (0f64, x, 0f64);
                while term.abs() > 1e-17 * sum.abs().max(1e-300) && k < 400.0 {
                    sum += term / (2.0 * k + 1.0);
                    k += 1.0;
                    term *= -x * x / k;
                }
                (sum * 2.0 / std::f64::consts::PI.sqrt()).clamp(-1.0, 1.0)
            };
            let cdf = 0.5 * (1.0 + erf(v / 2f64.sqrt()));
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!(
                (g as f64 - v * cdf).abs() < 2e-6 * (1.0 + v.abs()),
                "gelu({v})"
            );
            assert!((dg as f64 - (cdf + v * pdf)).abs() < 2e-6, "gelu'({v})");
        }
    }

    #[test]
    fn layer_norm_rows_match_f64() {
        let d = 40;
        let (x, w, b) = (data(3 * d, 4), data(d, 5), data(d, 6));
        let (mut xh, mut rs, mut o) = (vec![0f32; 3 * d], vec![0f32; 3], vec![0f32; 3 * d]);
        layer_norm_rows(&x, &w, &b, 1e-6, &mut xh, &mut rs, &mut o);
        for (r, row) in x.chunks(d).enumerate() {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + 1e-6).sqrt();
            assert!((rs[r] as f64 - rstd).abs() < 1e-5 * rstd);
            for i in 0..d {
                let want = (row[i] as f64 - mean) * rstd * w[i] as f64 + b[i] as f64;
                assert!((o[r * d + i] as f64 - want).abs() < 1e-4, "{r},{i}");
            }
        }
    }
}
