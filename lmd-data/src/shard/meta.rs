//! The JSON metadata stored in every shard header, and the dataset fingerprint derived from it.

use crate::DType;
use serde::{Deserialize, Serialize};

/// One stored tensor kind of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Field {
    /// A latent ready to train on (a sample, or the mean, as the writer chose).
    Latent,
    /// The posterior mean of a KL VAE.
    Mean,
    /// The posterior log-variance of a KL VAE.
    Logvar,
}

/// What each record holds: `views × (1 + flip) × fields` tensors of `latent_shape`, in that
/// nesting order (view outermost, field innermost).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordLayout {
    /// Stored fields per variant, e.g. `["latent"]` or `["mean", "logvar"]`.
    pub fields: Vec<Field>,
    /// Number of views (crops) per image; 1 for a single center crop.
    pub views: usize,
    /// Whether each view also has its horizontally flipped variant (stored right after it).
    pub flip: bool,
}

impl RecordLayout {
    /// One latent per record.
    pub fn single() -> Self {
        RecordLayout {
            fields: vec![Field::Latent],
            views: 1,
            flip: false,
        }
    }

    /// Number of variants (view × flip) per record.
    pub fn variants(&self) -> usize {
        self.views * if self.flip { 2 } else { 1 }
    }

    /// Number of tensors per record.
    pub fn tensors(&self) -> usize {
        self.variants() * self.fields.len()
    }

    /// Index of a tensor within the record, or `None` if out of range / not stored.
    pub fn tensor_index(&self, view: usize, flipped: bool, field: Field) -> Option<usize> {
        if view >= self.views || (flipped && !self.flip) {
            return None;
        }
        let f = self.fields.iter().position(|x| *x == field)?;
        let variant = view * if self.flip { 2 } else { 1 } + usize::from(flipped);
        Some(variant * self.fields.len() + f)
    }
}

/// Which VAE produced the latents: its name and the sha256 of each weight file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VaeIdentity {
    /// e.g. `taesd` or `sd-vae`.
    pub name: String,
    /// Weight files with their sha256, sorted by file name.
    pub weights: Vec<WeightFile>,
}

/// One weight file of a VAE.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WeightFile {
    pub file: String,
    pub sha256: String,
}

/// How images were turned into VAE input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Output side in pixels (square), e.g. 224.
    pub size: u32,
    /// Resize rule, e.g. `shorter-side` (torchvision `Resize(size)`).
    pub resize: String,
    /// Crop rule, e.g. `center` or `random-resized-crop`.
    pub crop: String,
    /// Resampling filter, e.g. `bilinear-antialias`.
    pub filter: String,
    /// Number of views per image (equals the layout's `views`).
    pub views: usize,
    /// Whether flipped variants were made (equals the layout's `flip`).
    pub flip: bool,
    /// Pixel range fed to the VAE, e.g. `[0,1]` or `[-1,1]`.
    pub input_range: String,
}

/// The latent scaling factor (SD's 0.18215, TAESD's 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scaling {
    pub factor: f64,
    /// `true`: stored latents are already multiplied by `factor`; `false`: the reader applies it.
    pub applied: bool,
}

/// The metadata of one shard (stored as JSON in its header).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardMeta {
    /// Shape (C, H, W) of each stored tensor.
    pub latent_shape: [usize; 3],
    pub dtype: DType,
    pub layout: RecordLayout,
    /// Whether records carry an i64 label.
    pub labels: bool,
    pub vae: VaeIdentity,
    pub preprocessing: Preprocessing,
    pub scaling: Scaling,
    /// The program that wrote the shard, e.g. `lmd-precompute 0.1.0`.
    pub writer: String,
    /// Records per block (the last block may hold fewer).
    pub records_per_block: usize,
    /// Whether block payloads are byte-plane shuffled before zstd.
    pub byte_shuffle: bool,
    /// zstd level used (informational).
    pub zstd_level: i32,
}

impl ShardMeta {
    /// Elements per tensor (C·H·W).
    pub fn tensor_elems(&self) -> usize {
        self.latent_shape.iter().product()
    }

    /// Elements per record (all tensors).
    pub fn record_elems(&self) -> usize {
        self.tensor_elems() * self.layout.tensors()
    }

    /// Bytes per record as stored (before compression).
    pub fn record_bytes(&self) -> usize {
        self.record_elems() * self.dtype.size()
    }

    /// The dataset fingerprint: a hash of everything that decides the latent values and their
    /// meaning (VAE, preprocessing, dtype, layout, labels, scaling), but not of how they were
    /// packed (block size, compression, writer version). Two shards with equal fingerprints can
    /// be mixed in one dataset; different fingerprints mean a stale cache.
    pub fn fingerprint(&self) -> String {
        let key = serde_json::json!({
            "latent_shape": self.latent_shape,
            "dtype": self.dtype,
            "layout": self.layout,
            "labels": self.labels,
            "vae": self.vae,
            "preprocessing": self.preprocessing,
            "scaling": self.scaling,
        });
        let text = serde_json::to_string(&key).expect("metadata serializes");
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
    }

    /// The fields that differ between two metadata (for "refusing to mix" messages).
    pub fn differences(&self, other: &ShardMeta) -> Vec<String> {
        let a = serde_json::to_value(self).expect("serializes");
        let b = serde_json::to_value(other).expect("serializes");
        let mut out = Vec::new();
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, va) in a {
                if matches!(
                    k.as_str(),
                    "writer" | "records_per_block" | "byte_shuffle" | "zstd_level"
                ) {
                    continue;
                }
                let vb = b.get(k).cloned().unwrap_or(serde_json::Value::Null);
                if *va != vb {
                    out.push(format!("{k}: {va} vs {vb}"));
                }
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample_meta(dtype: DType, layout: RecordLayout, labels: bool) -> ShardMeta {
        ShardMeta {
            latent_shape: [4, 28, 28],
            dtype,
            preprocessing: Preprocessing {
                size: 224,
                resize: "shorter-side".into(),
                crop: "center".into(),
                filter: "bilinear-antialias".into(),
                views: layout.views,
                flip: layout.flip,
                input_range: "[0,1]".into(),
            },
            layout,
            labels,
            vae: VaeIdentity {
                name: "taesd".into(),
                weights: vec![WeightFile {
                    file: "taesd_encoder.safetensors".into(),
                    sha256: "00".repeat(32),
                }],
            },
            scaling: Scaling {
                factor: 1.0,
                applied: true,
            },
            writer: "test".into(),
            records_per_block: 4,
            byte_shuffle: true,
            zstd_level: 3,
        }
    }

    #[test]
    fn layout_indexing() {
        let l = RecordLayout {
            fields: vec![Field::Mean, Field::Logvar],
            views: 2,
            flip: true,
        };
        assert_eq!(l.tensors(), 8);
        assert_eq!(l.tensor_index(0, false, Field::Mean), Some(0));
        assert_eq!(l.tensor_index(0, true, Field::Logvar), Some(3));
        assert_eq!(l.tensor_index(1, true, Field::Mean), Some(6));
        assert_eq!(l.tensor_index(2, false, Field::Mean), None);
        assert_eq!(l.tensor_index(0, false, Field::Latent), None);
        assert_eq!(
            RecordLayout::single().tensor_index(0, true, Field::Latent),
            None
        );
    }

    #[test]
    fn fingerprint_ignores_packing_but_not_values() {
        let a = sample_meta(DType::F16, RecordLayout::single(), true);
        let mut b = a.clone();
        b.records_per_block = 99;
        b.writer = "other".into();
        b.zstd_level = 19;
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(a.differences(&b).is_empty());
        let mut c = a.clone();
        c.dtype = DType::BF16;
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.differences(&c).len(), 1);
        let mut d = a.clone();
        d.vae.weights[0].sha256 = "11".repeat(32);
        assert_ne!(a.fingerprint(), d.fingerprint());
        assert!(a.differences(&d)[0].starts_with("vae"));
    }
}
