//! Synthetic labelled latent datasets, for tests and benchmarks that must run without real data.
//!
//! Each class `k` has a fixed smooth pattern (a sum of three 2-D sinusoids whose frequencies and
//! phases come from `(seed, k)`); a record is its class pattern at a random amplitude, plus a
//! smooth per-record pattern and white noise. So the data has what a masked autoencoder can learn
//! (spatial smoothness, class structure) and what a classifier can find (the class pattern), and
//! it is exactly reproducible from the seed. The metadata names the VAE `synthetic`, so nothing
//! mistakes it for real latents.

use crate::shard::{
    Manifest, Preprocessing, RecordLayout, Scaling, ShardMeta, ShardWriter, VaeIdentity,
    WriterOptions,
};
use crate::{DType, Result};
use std::path::Path;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    pub records: usize,
    /// (C, H, W) of each latent.
    pub latent_shape: [usize; 3],
    pub classes: usize,
    pub seed: u64,
    pub records_per_shard: usize,
    pub dtype: DType,
    /// Standard deviation of the white noise (the class signal has amplitude about 1).
    pub noise: f32,
    /// Index of the first record: a validation set is the same spec (same classes) with an
    /// offset past the training records.
    pub first_index: usize,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            records: 512,
            latent_shape: [4, 8, 8],
            classes: 10,
            seed: 0,
            records_per_shard: 256,
            dtype: DType::F16,
            noise: 0.3,
            first_index: 0,
        }
    }
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// A smooth pattern `[C, H, W]`: three sinusoids with random frequencies and phases.
fn pattern(rng: &mut SplitMix, [c, h, w]: [usize; 3]) -> Vec<f32> {
    let waves: Vec<[f32; 5]> = (0..3 * c)
        .map(|_| {
            [
                rng.uniform() * 2.5,
                rng.uniform() * 2.5,
                rng.uniform() * std::f32::consts::TAU,
                rng.uniform() * 0.8 + 0.4,
                0.0,
            ]
        })
        .collect();
    let mut v = vec![0f32; c * h * w];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let (fy, fx) = (y as f32 / h as f32, x as f32 / w as f32);
                v[(ch * h + y) * w + x] = waves[ch * 3..ch * 3 + 3]
                    .iter()
                    .map(|[a, b, p, amp, _]| {
                        amp * (std::f32::consts::TAU * (a * fy + b * fx) + p).sin()
                    })
                    .sum::<f32>()
                    / 1.5;
            }
        }
    }
    v
}

/// Write `spec.records` records into `dir` (shards `shard-NNNNNN.lmds` + `index.json`); record
/// `i` (counting from `first_index`) has label `i % classes` and key `syn-NNNNNNNN`.
pub fn write_dataset(dir: &Path, spec: &SyntheticSpec) -> Result<Manifest> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, "create", e))?;
    let [c, h, w] = spec.latent_shape;
    let meta = ShardMeta {
        latent_shape: spec.latent_shape,
        dtype: spec.dtype,
        layout: RecordLayout::single(),
        labels: true,
        vae: VaeIdentity {
            name: "synthetic".into(),
            weights: vec![],
        },
        preprocessing: Preprocessing {
            size: (h.max(w) * 8) as u32,
            resize: "none".into(),
            crop: "none".into(),
            filter: "none".into(),
            views: 1,
            flip: false,
            input_range: "[0,1]".into(),
        },
        scaling: Scaling {
            factor: 1.0,
            applied: true,
        },
        writer: format!("lmd-data synthetic {}", env!("CARGO_PKG_VERSION")),
        records_per_block: 0,
        byte_shuffle: true,
        zstd_level: 3,
    };
    let mut rng = SplitMix(spec.seed ^ 0x5717_4e71);
    let classes: Vec<Vec<f32>> = (0..spec.classes.max(1))
        .map(|_| pattern(&mut rng, spec.latent_shape))
        .collect();
    let mut man = Manifest::new(meta.clone());
    let per = spec.records_per_shard.max(1);
    for (s, start) in (0..spec.records).step_by(per).enumerate() {
        let path = dir.join(format!("shard-{s:06}.lmds"));
        let mut wr = ShardWriter::create(&path, meta.clone(), WriterOptions::default())?;
        for i in start..(start + per).min(spec.records) {
            let i = i + spec.first_index;
            let k = i % classes.len();
            let mut r = SplitMix(spec.seed.wrapping_mul(31).wrapping_add(i as u64 + 1));
            let amp = 0.7 + 0.6 * r.uniform();
            let own = pattern(&mut r, spec.latent_shape);
            let v: Vec<f32> = (0..c * h * w)
                .map(|j| amp * classes[k][j] + 0.5 * own[j] + spec.noise * r.normal())
                .collect();
            wr.push_f32(&format!("syn-{i:08}"), Some(k as i64), &v)?;
        }
        let wm = wr.meta().clone();
        man.add(&wr.finish()?, &wm)?;
    }
    man.save(dir)?;
    Ok(man)
}

/// Metadata of TAESD-like latents (224 px center crop, scaling applied, no weight files: an
/// identity for test and benchmark data, never for real latents), `writer` as given.
pub fn taesd_like_meta(
    dtype: DType,
    layout: RecordLayout,
    shape: [usize; 3],
    writer: &str,
) -> ShardMeta {
    ShardMeta {
        latent_shape: shape,
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
        labels: true,
        vae: VaeIdentity {
            name: "taesd".into(),
            weights: vec![],
        },
        scaling: Scaling {
            factor: 1.0,
            applied: true,
        },
        writer: writer.into(),
        records_per_block: 0,
        byte_shuffle: true,
        zstd_level: 3,
    }
}

/// A tar archive (GNU headers, mode 0644) of `(member name, bytes)`, in memory: input shards
/// for tests that make their own.
pub fn tar_archive(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice())
            .expect("writing a tar into memory");
    }
    b.into_inner().expect("writing a tar into memory")
}

/// `bytes` gzip-compressed (a `.tar.gz` from [`tar_archive`]).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("compressing into memory");
    e.finish().expect("compressing into memory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::LatentDataset;

    #[test]
    fn synthetic_dataset_is_reproducible_labelled_and_class_structured() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let spec = SyntheticSpec {
            records: 300,
            records_per_shard: 128,
            ..Default::default()
        };
        write_dataset(a.path(), &spec).unwrap();
        write_dataset(b.path(), &spec).unwrap();
        let (da, db) = (
            LatentDataset::open(a.path()).unwrap(),
            LatentDataset::open(b.path()).unwrap(),
        );
        assert_eq!((da.len(), da.num_shards()), (300, 3));
        let mut by_class = vec![vec![0f64; 256]; 10];
        for i in 0..300 {
            let (ra, rb) = (da.get(i).unwrap(), db.get(i).unwrap());
            assert_eq!(ra, rb);
            assert_eq!(ra.label, Some((i % 10) as i64));
            for (s, v) in by_class[i % 10].iter_mut().zip(&ra.data) {
                *s += *v as f64 / 30.0;
            }
        }
        // class means differ clearly (the class pattern survives the noise)
        let d: f64 = by_class[0]
            .iter()
            .zip(&by_class[1])
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            / 256.0;
        assert!(d > 0.1, "class means too close: {d}");
    }
}
