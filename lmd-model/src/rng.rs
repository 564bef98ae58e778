//! The seeded random stream of every model: SplitMix64, with no global state, so that inits,
//! masking noise and stochastic depth are reproducible from a seed alone (a resumed run draws
//! what an uninterrupted one would).

/// Deterministic SplitMix64 stream.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    /// The stream of one sample: from `(seed, sample)`, where `sample` is the sample's global
    /// position in the run (step x global batch + offset). Data-parallel ranks draw each
    /// sample's numbers from its own stream, so a result does not depend on how the samples
    /// were split across ranks.
    pub(crate) fn for_sample(seed: u64, sample: u64) -> Self {
        let mut s = SplitMix(seed ^ SplitMix(sample ^ 0x5341_4d50_4c45).next());
        SplitMix(s.next())
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 bits.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller, one value per two draws).
    pub(crate) fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_splitmix64() {
        // SplitMix64 from seed 0: the reference sequence (Vigna's splitmix64.c)
        let mut r = SplitMix(0);
        assert_eq!(r.next(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next(), 0x6E78_9E6A_A1B9_65F4);
        let u = SplitMix(7).uniform();
        assert!((0.0..1.0).contains(&u));
    }
}
