//! Mask-ratio schedulers: how the fraction of masked patches rises over training.
//!
//! `ratio(step, total_steps)` works on the fraction `t = step / total_steps` in `[0, 1]`.
//! MAE uses a constant 0.75; LMD (Ma et al., AAAI 2024) raises it from 0.15 to 0.75 linearly,
//! piecewise-linearly or along a cosine curve, then holds it.

use serde::{Deserialize, Serialize};

/// A mask-ratio schedule (serde: `kind = "constant" | "linear" | "piecewise" | "cosine"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MaskSchedule {
    /// MAE: the same ratio throughout.
    Constant { ratio: f64 },
    /// From `start` to `end` linearly over the first `ramp_fraction` of training, then `end`.
    Linear {
        start: f64,
        end: f64,
        ramp_fraction: f64,
    },
    /// Linear interpolation between `(fraction, ratio)` knots (sorted by fraction); before the
    /// first knot its ratio, after the last its ratio.
    Piecewise { points: Vec<(f64, f64)> },
    /// LMD's cosine: over the first `ramp_fraction`, with s = 0.008,
    /// `x(u) = cos(((u + s) / (1 + s)) · π/2)²`, `x /= x(0)`, `r = start + (end − start)(1 − x)`;
    /// then `end`.
    Cosine {
        start: f64,
        end: f64,
        ramp_fraction: f64,
    },
}

impl Default for MaskSchedule {
    fn default() -> Self {
        MaskSchedule::lmd_cosine()
    }
}

const COSINE_S: f64 = 0.008;

impl MaskSchedule {
    /// MAE's fixed 0.75.
    pub fn mae() -> Self {
        MaskSchedule::Constant { ratio: 0.75 }
    }

    /// LMD's linear schedule: 0.15 -> 0.75 over the first 2/3 of training.
    pub fn lmd_linear() -> Self {
        MaskSchedule::Linear {
            start: 0.15,
            end: 0.75,
            ramp_fraction: 2.0 / 3.0,
        }
    }

    /// LMD's piecewise schedule: 0.15 -> 0.40 over the first 1/6, hold to 1/3, 0.40 -> 0.75 to
    /// 2/3, hold. (The reference code's third segment starts from the wrong offset; this is the
    /// intent its comments and the paper describe.)
    pub fn lmd_piecewise() -> Self {
        MaskSchedule::Piecewise {
            points: vec![
                (0.0, 0.15),
                (1.0 / 6.0, 0.40),
                (1.0 / 3.0, 0.40),
                (2.0 / 3.0, 0.75),
            ],
        }
    }

    /// LMD's cosine schedule: 0.15 -> 0.75 over the first 2/3 of training.
    pub fn lmd_cosine() -> Self {
        MaskSchedule::Cosine {
            start: 0.15,
            end: 0.75,
            ramp_fraction: 2.0 / 3.0,
        }
    }

    /// A schedule by name: `constant`/`mae`, `linear`, `piecewise`, `cosine`.
    pub fn by_name(name: &str) -> Option<Self> {
        Some(match name {
            "constant" | "mae" => Self::mae(),
            "linear" => Self::lmd_linear(),
            "piecewise" => Self::lmd_piecewise(),
            "cosine" => Self::lmd_cosine(),
            _ => return None,
        })
    }

    /// Short name of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            MaskSchedule::Constant { .. } => "constant",
            MaskSchedule::Linear { .. } => "linear",
            MaskSchedule::Piecewise { .. } => "piecewise",
            MaskSchedule::Cosine { .. } => "cosine",
        }
    }

    /// [`Self::validate`], and that every ratio the schedule reaches masks at least one of
    /// `num_patches` tokens (MAE keeps `int(L·(1-r))`, so only r = 0, or one so small that
    /// `1 - r` rounds to 1, masks nothing; the loss, a mean over masked patches, is then 0/0).
    pub fn validate_for(&self, num_patches: usize) -> crate::Result<()> {
        self.validate()?;
        let lowest = match self {
            MaskSchedule::Constant { ratio } => *ratio,
            MaskSchedule::Linear { start, end, .. } | MaskSchedule::Cosine { start, end, .. } => {
                start.min(*end)
            }
            MaskSchedule::Piecewise { points } => {
                points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min)
            }
        };
        let l = num_patches;
        let keep = ((l as f64) * (1.0 - lowest)) as usize;
        if keep >= l {
            return Err(crate::Error::Config(format!(
                "mask schedule {}: mask ratio {lowest} masks none of the model's L = {l} patches (MAE keeps int(L*(1-r)) = {keep}): \
                 the loss would be 0/0; use ratios in (0, 1)",
                self.name()
            )));
        }
        Ok(())
    }

    /// Check the parameters: ratios in [0, 1), ramp fractions in (0, 1], knots sorted.
    pub fn validate(&self) -> crate::Result<()> {
        self.check()
            .map_err(|e| crate::Error::Config(format!("mask schedule {}: {e}", self.name())))
    }

    fn check(&self) -> Result<(), String> {
        let ok_ratio = |r: f64| (0.0..1.0).contains(&r);
        let ok_ramp = |f: f64| f > 0.0 && f <= 1.0;
        match self {
            MaskSchedule::Constant { ratio } if !ok_ratio(*ratio) => Err(format!("ratio {ratio} not in [0, 1)")),
            MaskSchedule::Linear { start, end, ramp_fraction } | MaskSchedule::Cosine { start, end, ramp_fraction }
                if !(ok_ratio(*start) && ok_ratio(*end) && ok_ramp(*ramp_fraction)) =>
            {
                Err(format!("start {start}, end {end} must be in [0, 1), ramp_fraction {ramp_fraction} in (0, 1]"))
            }
            MaskSchedule::Piecewise { points } => {
                if points.is_empty() {
                    return Err("piecewise schedule needs at least one point".into());
                }
                if points.windows(2).any(|w| w[1].0 < w[0].0) {
                    return Err("piecewise points must be sorted by fraction".into());
                }
                if points.iter().any(|p| !ok_ratio(p.1)) {
                    return Err("piecewise ratios must be in [0, 1)".into());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The ratio averaged over training (t in [0, 1], midpoint rule on 10 000 points): what
    /// sets the schedule's mean cost per step (LMD's linear: 0.55; its cosine a little more).
    pub fn mean_ratio(&self) -> f64 {
        const N: usize = 10_000;
        (0..N)
            .map(|i| self.ratio_at((i as f64 + 0.5) / N as f64))
            .sum::<f64>()
            / N as f64
    }

    /// The mask ratio at `step` of `total_steps`.
    pub fn ratio(&self, step: usize, total_steps: usize) -> f64 {
        let t = if total_steps == 0 {
            1.0
        } else {
            (step as f64 / total_steps as f64).clamp(0.0, 1.0)
        };
        self.ratio_at(t)
    }

    /// The mask ratio at training fraction `t` in [0, 1].
    pub fn ratio_at(&self, t: f64) -> f64 {
        match self {
            MaskSchedule::Constant { ratio } => *ratio,
            MaskSchedule::Linear {
                start,
                end,
                ramp_fraction,
            } => {
                let u = (t / ramp_fraction).min(1.0);
                start + (end - start) * u
            }
            MaskSchedule::Piecewise { points } => {
                if t <= points[0].0 {
                    return points[0].1;
                }
                for w in points.windows(2) {
                    let ((t0, r0), (t1, r1)) = (w[0], w[1]);
                    if t <= t1 {
                        return if t1 > t0 {
                            r0 + (r1 - r0) * (t - t0) / (t1 - t0)
                        } else {
                            r1
                        };
                    }
                }
                points[points.len() - 1].1
            }
            MaskSchedule::Cosine {
                start,
                end,
                ramp_fraction,
            } => {
                let u = (t / ramp_fraction).min(1.0);
                let f = |u: f64| {
                    ((u + COSINE_S) / (1.0 + COSINE_S) * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                let x = (f(u) / f(0.0)).clamp(0.0, 1.0);
                start + (end - start) * (1.0 - x)
            }
        }
    }
}

/// A schedule by name ([`MaskSchedule::by_name`]), for flags.
impl std::str::FromStr for MaskSchedule {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<MaskSchedule> {
        MaskSchedule::by_name(s.trim()).ok_or_else(|| {
            crate::Error::Config(format!(
                "unknown schedule {s:?} (constant, linear, piecewise, cosine)"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_ratios_of_the_named_schedules() {
        assert!((MaskSchedule::mae().mean_ratio() - 0.75).abs() < 1e-12);
        // cosine: about the linear ramp's (the s = 0.008 offset lifts it a little)
        let c = MaskSchedule::lmd_cosine().mean_ratio();
        assert!((0.55..0.57).contains(&c), "{c}");
        assert!((MaskSchedule::lmd_linear().mean_ratio() - 0.55).abs() < 1e-6);
    }

    fn all() -> Vec<MaskSchedule> {
        vec![
            MaskSchedule::mae(),
            MaskSchedule::lmd_linear(),
            MaskSchedule::lmd_piecewise(),
            MaskSchedule::lmd_cosine(),
        ]
    }

    #[test]
    fn cosine_matches_lmd_reference_points() {
        let s = MaskSchedule::lmd_cosine();
        // 0/25/50/75/100 % of the ramp (the first 2/3 of 1200 steps = 800 steps)
        let want = [0.150, 0.242, 0.454, 0.663, 0.750];
        for (k, w) in want.iter().enumerate() {
            let r = s.ratio(k * 200, 1200);
            assert!((r - w).abs() < 5e-4, "{}% of ramp: {r} vs {w}", k * 25);
        }
        assert_eq!(s.ratio(1200, 1200), 0.75);
        assert_eq!(s.ratio(1000, 1200), 0.75);
    }

    #[test]
    fn piecewise_follows_the_intended_segments() {
        let s = MaskSchedule::lmd_piecewise();
        let n = 600;
        assert!((s.ratio(0, n) - 0.15).abs() < 1e-12);
        assert!((s.ratio(50, n) - 0.275).abs() < 1e-12); // halfway through the first 1/6
        assert!((s.ratio(100, n) - 0.40).abs() < 1e-12);
        assert!((s.ratio(150, n) - 0.40).abs() < 1e-12); // held
        assert!((s.ratio(200, n) - 0.40).abs() < 1e-12);
        // third segment starts at 0.40 (the reference code's offset bug would jump here)
        assert!((s.ratio(201, n) - 0.40).abs() < 0.01);
        assert!((s.ratio(300, n) - 0.575).abs() < 1e-12);
        assert!((s.ratio(400, n) - 0.75).abs() < 1e-12);
        assert!((s.ratio(599, n) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn linear_and_constant() {
        let s = MaskSchedule::lmd_linear();
        assert!((s.ratio(0, 300) - 0.15).abs() < 1e-12);
        assert!((s.ratio(100, 300) - 0.45).abs() < 1e-12);
        assert!((s.ratio(200, 300) - 0.75).abs() < 1e-12);
        assert!((s.ratio(250, 300) - 0.75).abs() < 1e-12);
        assert_eq!(MaskSchedule::mae().ratio(17, 300), 0.75);
    }

    #[test]
    fn all_schedules_are_monotone_and_bounded() {
        for s in all() {
            s.validate().unwrap();
            let mut prev = 0.0;
            for step in 0..=1000 {
                let r = s.ratio(step, 1000);
                assert!(
                    (0.15 - 1e-12..=0.75 + 1e-12).contains(&r),
                    "{} at {step}: {r}",
                    s.name()
                );
                assert!(r + 1e-12 >= prev, "{} not monotone at {step}", s.name());
                prev = r;
            }
            assert!(
                (s.ratio(1000, 1000) - 0.75).abs() < 1e-12,
                "{} must end at 0.75",
                s.name()
            );
        }
    }

    #[test]
    fn serde_and_names() {
        for s in all() {
            let text = serde_json::to_string(&s).unwrap();
            let back: MaskSchedule = serde_json::from_str(&text).unwrap();
            assert_eq!(back, s);
            assert_eq!(MaskSchedule::by_name(s.name()).unwrap(), s);
        }
        assert!(MaskSchedule::Constant { ratio: 1.2 }.validate().is_err());
        assert!(MaskSchedule::Piecewise {
            points: vec![(0.5, 0.2), (0.1, 0.3)]
        }
        .validate()
        .is_err());
    }
}
