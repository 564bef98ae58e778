//! The number format a model computes in, as settings and flags name it (`f32`, `bf16`, `f16`).
//!
//! Rules:
//! - Training and fine-tuning keep f32 master weights and f32 optimiser state whatever the
//!   precision; `bf16` is mixed precision in the manner of PyTorch's autocast, carried by the
//!   model's [`Backend`](crate::Backend) (`CandleBf16`, `RowsBf16`): matmuls and their activations in bf16,
//!   LayerNorm, softmax, the residual stream and the loss in f32. `f16` is refused for
//!   training (it needs loss scaling, which lmd does not do).
//! - The VAEs run inference only, so they load their weights in the precision itself
//!   ([`Precision::dtype`]) and hand back f32 latents: stored latents never change format.

use crate::Error;
use candle_core::DType;
use serde::{Deserialize, Serialize};

/// A compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Bf16, Precision::F16];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// The candle dtype of this precision.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    /// Refuse a precision training cannot use (f16: no loss scaling here).
    pub fn check_trainable(self) -> crate::Result<Precision> {
        match self {
            Precision::F16 => Err(Error::Config(
                "precision f16 is for VAE inference only: training in f16 needs loss scaling; \
                 use bf16 (same speed on GPUs that have it) or f32"
                    .into(),
            )),
            p => Ok(p),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> crate::Result<Precision> {
        let t = s.trim().to_ascii_lowercase();
        Precision::ALL
            .into_iter()
            .find(|p| p.as_str() == t)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown precision {s:?} (expected f32, bf16 or f16)"
                ))
            })
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precisions_parse_print_and_f16_is_not_for_training() {
        for p in Precision::ALL {
            assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
        }
        assert_eq!(" BF16 ".parse::<Precision>().unwrap(), Precision::Bf16);
        let e = "fp8".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("\"fp8\"") && e.contains("bf16"), "{e}");
        assert!(Precision::Bf16.check_trainable().is_ok());
        let e = Precision::F16.check_trainable().unwrap_err().to_string();
        assert!(e.contains("loss scaling"), "{e}");
        assert_eq!(Precision::Bf16.dtype(), DType::BF16);
    }
}
