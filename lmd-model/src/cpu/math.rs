//! Scalar f32 math for the row kernels: `exp` and `erf` as branch-free polynomials, so that
//! the loops in [`super::simd`] that call them vectorise.

/// `e^x` for f32 without a libm call (Cephes `expf`: range reduction by ln 2, degree-6
/// polynomial, exponent by bit arithmetic; relative error ~2e-7; inputs are clamped to
/// [-87.3, 88.3], so it never returns 0 or infinity). Branch-free, so loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.336_55, 88.376_26);
    // n = round(x / ln 2), by the 1.5 * 2^23 trick (vectorisable, unlike `round`): t's low
    // mantissa bits hold n + 2^22 as an integer.
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n from t's bits: integer ops only (a float -> int cast saturates, and would not
    // vectorise)
    let pow2n = (t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127)) << 23;
    e * f32::from_bits(pow2n)
}

/// erf for f32 (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): one `exp` and a polynomial,
/// instead of the f64 series candle's `gelu_erf` evaluates per element.
#[inline(always)]
pub(crate) fn erf_f32(x: f32) -> f32 {
    erf_and_gauss_f32(x).0
}

/// `(erf(x), e^(-x²))`: the exponential is part of the erf formula, and GELU's derivative needs
/// it again (`φ(v) ∝ e^(-v²/2)` with `x = v/√2`), so it is computed once for both.
#[inline(always)]
pub(crate) fn erf_and_gauss_f32(x: f32) -> (f32, f32) {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let g = exp_f32(-a * a);
    ((1.0 - poly * g).copysign(x), g)
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_f32_is_within_3e7_relative_of_f64_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64 - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e4) > 0.0 && exp_f32(-1e4) < 1e-37);
        assert!(exp_f32(1e4).is_finite());
    }
}
