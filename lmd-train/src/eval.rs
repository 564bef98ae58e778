//! Classification: the loss fine-tuning minimises, and evaluation (top-1, top-5, loss) of a
//! classifier on latent shards, as `lmd-finetune` does after each epoch and `lmd-eval` does
//! for a saved checkpoint.

use crate::train::open_data;
use crate::{Error, Result};
use lmd_data::loader::{LatentLoader, LoaderConfig};
use lmd_data::shard::LatentDataset;
use lmd_model::candle::{Device, Tensor, D};
use lmd_model::{ClassifierConfig, VitClassifier};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// One line of `eval.jsonl` (and what `lmd-eval --json` prints, plus `latents_per_s`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub epoch: u64,
    pub step: u64,
    pub top1: f64,
    /// Top-5 accuracy (equal to 1 when there are 5 classes or fewer).
    pub top5: f64,
    /// Cross-entropy without label smoothing.
    pub loss: f64,
    pub records: usize,
    pub latents_per_s: f64,
}

/// Cross-entropy of `logits [B, K]` against `labels [B]` (u32) with label smoothing `eps`:
/// `(1 − eps)·NLL + eps·mean_k(−log p_k)` (timm's `LabelSmoothingCrossEntropy`).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, eps: f64) -> Result<Tensor> {
    let logp = lmd_model::candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = logp
        .gather(&labels.unsqueeze(1)?, 1)
        .and_then(|t| t.mean_all())
        .and_then(|t| t.neg())?;
    if eps <= 0.0 {
        return Ok(nll);
    }
    let smooth = logp.mean_all().and_then(|t| t.neg())?;
    Ok(((nll * (1.0 - eps))? + (smooth * eps)?)?)
}

/// Top-1 / top-5 hits and summed cross-entropy of `logits [B, K]` against `labels`.
pub(crate) fn score(logits: &Tensor, labels: &[i64]) -> Result<(usize, usize, f64)> {
    let logp = lmd_model::candle_nn::ops::log_softmax(logits, D::Minus1)
        .and_then(|t| t.to_vec2::<f32>())?;
    let (mut t1, mut t5, mut loss) = (0, 0, 0f64);
    for (row, &y) in logp.iter().zip(labels) {
        let y = y as usize;
        let better = row.iter().filter(|&&v| v > row[y]).count();
        t1 += (better == 0) as usize;
        t5 += (better < 5) as usize;
        loss -= row[y] as f64;
    }
    Ok((t1, t5, loss))
}

/// Evaluate a classifier on every record of `ds`, in order, in batches of `batch`.
pub fn evaluate(clf: &VitClassifier, ds: &Arc<LatentDataset>, batch: usize) -> Result<EvalResult> {
    let labels = labels_of(ds, "evaluation")?;
    let k = clf.config().num_classes;
    if let Some(bad) = labels.iter().find(|&&l| l < 0 || l as usize >= k) {
        return Err(Error::Invalid(format!(
            "evaluation label {bad} is outside the classifier's {k} classes"
        )));
    }
    let loader = LatentLoader::new(
        ds.clone(),
        LoaderConfig {
            batch_size: 1,
            shuffle: false,
            ..Default::default()
        },
    )?;
    let t0 = Instant::now();
    let dev = clf.device().clone();
    let (mut t1, mut t5, mut loss) = (0usize, 0usize, 0f64);
    let idx: Vec<usize> = (0..ds.len()).collect();
    for (bi, chunk) in idx.chunks(batch.max(1)).enumerate() {
        let b = loader.make_batch(0, bi as u64, chunk)?;
        let x = Tensor::from_vec(b.data, b.shape.to_vec(), &dev)?;
        let logits = clf.forward_t(&x, None)?;
        let (a, c, l) = score(&logits, &labels[chunk[0]..chunk[0] + chunk.len()])?;
        (t1, t5, loss) = (t1 + a, t5 + c, loss + l);
    }
    let n = ds.len().max(1) as f64;
    Ok(EvalResult {
        epoch: 0,
        step: 0,
        top1: t1 as f64 / n,
        top5: t5 as f64 / n,
        loss: loss / n,
        records: ds.len(),
        latents_per_s: ds.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9),
    })
}

/// Read a saved classifier: `path` is a `model.safetensors` (or the directory holding it) with
/// `classifier.json` beside it.
pub fn load_classifier(path: &Path, dev: &Device) -> Result<VitClassifier> {
    let file = if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    };
    let cj = file
        .parent()
        .unwrap_or(Path::new("."))
        .join("classifier.json");
    let cfg: ClassifierConfig = serde_json::from_slice(
        &std::fs::read(&cj).map_err(|e| Error::io(&cj, "read (saved beside the weights)", e))?,
    )
    .map_err(|e| Error::Invalid(format!("{}: {e}", cj.display())))?;
    Ok(VitClassifier::load(&cfg, &file, dev)?.0)
}

/// `lmd-eval`: evaluate a saved classifier on latent shards, on `device` (`cpu`, `cuda:N`).
pub fn eval_checkpoint(
    checkpoint: &Path,
    data: &[PathBuf],
    batch: usize,
    device: crate::DeviceSpec,
) -> Result<EvalResult> {
    let clf = load_classifier(checkpoint, &device.open()?)?;
    let ds = Arc::new(open_data(data)?);
    let [c, h, w] = ds.meta().latent_shape;
    let e = &clf.config().encoder;
    if [c, h, w] != [e.in_chans, e.img_size[0], e.img_size[1]] {
        return Err(Error::Invalid(format!(
            "the data has latents {c}x{h}x{w}; the classifier expects {}x{}x{}",
            e.in_chans, e.img_size[0], e.img_size[1]
        )));
    }
    evaluate(&clf, &ds, batch)
}

/// Labels of every record, in dataset order (errors name the shard when one is missing).
pub(crate) fn labels_of(ds: &LatentDataset, what: &str) -> Result<Vec<i64>> {
    if !ds.meta().labels {
        return Err(Error::Invalid(format!(
            "the {what} shards carry no labels (precompute with labels to fine-tune)"
        )));
    }
    let mut v = Vec::with_capacity(ds.len());
    // a streamed dataset is fetched shard by shard for this (its labels live in the shards)
    ds.for_each_shard(|s| {
        let l = s.labels().ok_or_else(|| lmd_data::Error::InvalidInput {
            context: s.path().display().to_string(),
            detail: "no labels".into(),
        })?;
        v.extend_from_slice(l);
        Ok(())
    })?;
    Ok(v)
}
