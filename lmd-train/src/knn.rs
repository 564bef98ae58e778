//! k-NN top-1 of a pretraining run's encoder: the cheap representation metric MAE- and
//! DINO-style papers plot during pretraining, computed the same way on latent and pixel runs.
//!
//! - **Features**: the MAE encoder on whole (unmasked) inputs, patch tokens averaged, then the
//!   encoder's final norm ([`lmd_model::Pool::Mean`]), L2-normalised. Training samples are
//!   read without augmentation (pixels: Resize + CenterCrop), as the validation ones.
//! - **Vote**: DINO's weighted k-NN (`eval_knn.py`): the `k` training features of highest
//!   cosine similarity to a validation feature vote for their labels with weight
//!   `exp(similarity / T)`; the class with the largest sum is the prediction. k = 20 and
//!   T = 0.07 by default, DINO's values.

use crate::train_data::Samples;
use crate::{Error, Result};
use lmd_model::candle::Tensor;
use lmd_model::{LatentMae, Pool};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// k-NN settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KnnConfig {
    pub k: usize,
    pub temperature: f64,
    /// Samples per encoder forward.
    pub batch: usize,
}

impl Default for KnnConfig {
    fn default() -> Self {
        KnnConfig {
            k: 20,
            temperature: 0.07,
            batch: 256,
        }
    }
}

/// One k-NN evaluation (a line of `knn.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnnResult {
    pub step: u64,
    /// Training seconds before this evaluation (checkpoints, previews and k-NN not counted),
    /// summed over resumptions.
    pub train_s: f64,
    pub top1: f64,
    pub k: usize,
    pub train_samples: usize,
    pub val_samples: usize,
    /// Seconds the evaluation took.
    pub eval_s: f64,
}

/// L2-normalised encoder features of every sample of `data` (row-major `[n, D]`) and their
/// labels; samples that do not decode are left out.
pub fn features(model: &LatentMae, data: &Samples, batch: usize) -> Result<(Vec<f32>, Vec<i64>)> {
    let dev = model.encoder().pos_embed().device().clone();
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let Some(b) = data.batch(chunk)? else {
            continue;
        };
        for (l, key) in b.labels.iter().zip(&b.keys) {
            labels.push(l.ok_or_else(|| Error::Invalid(format!("k-NN: {key} has no label")))?);
        }
        let x = Tensor::from_vec(b.data, b.shape.to_vec(), &dev)?;
        let f: Vec<Vec<f32>> = model
            .forward_features(&x, Pool::Mean, None)
            .and_then(|t| t.to_dtype(lmd_model::candle::DType::F32))
            .and_then(|t| t.to_vec2())?;
        for row in f {
            let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            feats.extend(row.iter().map(|v| v / n));
        }
    }
    Ok((feats, labels))
}

/// Weighted k-NN top-1 of `val` features against `train` ones (both L2-normalised rows of
/// width `d`).
pub fn knn_top1(
    (train, train_labels): (&[f32], &[i64]),
    (val, val_labels): (&[f32], &[i64]),
    d: usize,
    cfg: &KnnConfig,
) -> f64 {
    let n = train_labels.len();
    let classes = train_labels.iter().copied().max().unwrap_or(0).max(0) as usize + 1;
    let k = cfg.k.clamp(1, n.max(1));
    let mut hits = 0usize;
    let mut sims: Vec<(f32, usize)> = Vec::with_capacity(n);
    for (q, &y) in val.chunks(d).zip(val_labels) {
        sims.clear();
        sims.extend(
            train
                .chunks(d)
                .enumerate()
                .map(|(i, t)| (t.iter().zip(q).map(|(a, b)| a * b).sum::<f32>(), i)),
        );
        // the k most similar (ties: the lower index), in any order
        let cmp = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if k < sims.len() {
            sims.select_nth_unstable_by(k - 1, cmp);
        }
        let mut votes = vec![0f64; classes];
        for &(s, i) in &sims[..k] {
            if let Ok(c) = usize::try_from(train_labels[i]) {
                votes[c] += (s as f64 / cfg.temperature).exp();
            }
        }
        let pred = (0..classes)
            .max_by(|&a, &b| votes[a].total_cmp(&votes[b]).then(b.cmp(&a)))
            .unwrap_or(0);
        hits += (pred as i64 == y) as usize;
    }
    hits as f64 / val_labels.len().max(1) as f64
}

/// k-NN top-1 of `model`'s encoder: features of `train` and `val`, then the vote.
pub fn evaluate(
    model: &LatentMae,
    train: &Samples,
    val: &Samples,
    cfg: &KnnConfig,
    (step, train_s): (u64, f64),
) -> Result<KnnResult> {
    let t0 = Instant::now();
    let d = model.config().embed_dim;
    let (tf, tl) = features(model, train, cfg.batch)?;
    let (vf, vl) = features(model, val, cfg.batch)?;
    if tl.is_empty() || vl.is_empty() {
        return Err(Error::Invalid(
            "k-NN: no training or validation samples".into(),
        ));
    }
    Ok(KnnResult {
        step,
        train_s,
        top1: knn_top1((&tf, &tl), (&vf, &vl), d, cfg),
        k: cfg.k,
        train_samples: tl.len(),
        val_samples: vl.len(),
        eval_s: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn weighted_votes_of_the_nearest_neighbours_decide() {
        // class 0 along x, class 1 along y; two far class-1 points near x as decoys
        let pts: Vec<(Vec<f32>, i64)> = vec![
            (unit(&[1.0, 0.1]), 0),
            (unit(&[1.0, -0.1]), 0),
            (unit(&[0.1, 1.0]), 1),
            (unit(&[-0.1, 1.0]), 1),
            (unit(&[1.0, 0.5]), 1),
        ];
        let train: Vec<f32> = pts.iter().flat_map(|p| p.0.clone()).collect();
        let labels: Vec<i64> = pts.iter().map(|p| p.1).collect();
        let val = [unit(&[1.0, 0.0]), unit(&[0.0, 1.0])].concat();
        let cfg = |k| KnnConfig {
            k,
            ..Default::default()
        };
        // k = 2: both neighbours right
        assert_eq!(
            knn_top1((&train, &labels), (&val, &[0, 1]), 2, &cfg(2)),
            1.0
        );
        // k = 1 for [1, 0]: the nearest is a class-0 point; asking for class 1 is wrong
        assert_eq!(
            knn_top1((&train, &labels), (&val, &[1, 1]), 2, &cfg(1)),
            0.5
        );
        // k = 5 (all): for [1, 0] three class-1 votes, but the two class-0 ones are much closer
        // and exp(s / 0.07) weighs them above: class 0 wins
        assert_eq!(
            knn_top1((&train, &labels), (&val[..2], &[0]), 2, &cfg(5)),
            1.0
        );
        // an unweighted-like vote (high temperature) lets the majority win
        let flat = KnnConfig {
            k: 5,
            temperature: 100.0,
            ..Default::default()
        };
        assert_eq!(
            knn_top1((&train, &labels), (&val[..2], &[1]), 2, &flat),
            1.0
        );
    }
}
