//! Storage element types for latents and their conversion to and from `f32`.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// How a latent element is stored on disk (always little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F16,
    BF16,
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    /// The name used in metadata and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
        }
    }

    /// Encode `src` into little-endian bytes of this dtype, appending to `dst`
    /// (round-to-nearest-even for f16/bf16).
    pub fn encode_f32(self, src: &[f32], dst: &mut Vec<u8>) {
        let start = dst.len();
        dst.resize(start + src.len() * self.size(), 0);
        let out = &mut dst[start..];
        match self {
            DType::F32 => {
                for (o, v) in out.chunks_exact_mut(4).zip(src) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            DType::F16 => {
                for (o, v) in out.chunks_exact_mut(2).zip(src) {
                    o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            DType::BF16 => {
                for (o, v) in out.chunks_exact_mut(2).zip(src) {
                    o.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
        }
    }

    /// Decode little-endian bytes of this dtype into `dst` (`dst.len()` elements).
    ///
    /// Panics if `src.len() != dst.len() * self.size()` (a caller bug, not bad input).
    pub fn decode_to_f32(self, src: &[u8], dst: &mut [f32]) {
        assert_eq!(
            src.len(),
            dst.len() * self.size(),
            "decode_to_f32: length mismatch"
        );
        match self {
            DType::F32 => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
            DType::F16 | DType::BF16 => {
                // Reassemble u16 bits in stack-sized chunks, then use half's slice conversion
                // (runtime-detected SIMD where available).
                const CHUNK: usize = 1024;
                let mut bits = [0u16; CHUNK];
                for (s, d) in src.chunks(CHUNK * 2).zip(dst.chunks_mut(CHUNK)) {
                    let n = d.len();
                    for (b, pair) in bits[..n].iter_mut().zip(s.chunks_exact(2)) {
                        *b = u16::from_le_bytes([pair[0], pair[1]]);
                    }
                    if self == DType::F16 {
                        bits[..n].reinterpret_cast::<f16>().convert_to_f32_slice(d);
                    } else {
                        bits[..n].reinterpret_cast::<bf16>().convert_to_f32_slice(d);
                    }
                }
            }
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f32" | "float32" | "float" => Ok(DType::F32),
            other => Err(crate::Error::InvalidInput {
                context: "dtype".into(),
                detail: format!("unknown dtype {other:?} (expected f16, bf16 or f32)"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_exact_for_representable_values() {
        let vals = [0.0f32, -0.0, 1.0, -2.5, 0.125, 65504.0, -3.0e-5];
        for dt in [DType::F16, DType::BF16, DType::F32] {
            let mut bytes = Vec::new();
            dt.encode_f32(&vals, &mut bytes);
            assert_eq!(bytes.len(), vals.len() * dt.size());
            let mut back = vec![0f32; vals.len()];
            dt.decode_to_f32(&bytes, &mut back);
            for (a, b) in vals.iter().zip(&back) {
                let want = match dt {
                    DType::F16 => f16::from_f32(*a).to_f32(),
                    DType::BF16 => bf16::from_f32(*a).to_f32(),
                    DType::F32 => *a,
                };
                assert_eq!(want.to_bits(), b.to_bits(), "{dt} {a}");
            }
        }
    }

    #[test]
    fn parse_names() {
        assert_eq!("F16".parse::<DType>().unwrap(), DType::F16);
        assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::BF16);
        assert!("f8".parse::<DType>().is_err());
    }
}
