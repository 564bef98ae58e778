//! Classification: the loss fine-tuning minimises, and evaluation (top-1, top-5, loss) of a
//! classifier on latent shards, as `lmd-finetune` does after each epoch and `lmd-eval` does
//! for a saved checkpoint.

use crate::train_data::{Input, Samples};
use crate::{Error, Result};
use lmd_data::shard::LatentDataset;
use lmd_model::candle::{Device, Tensor, D};
use lmd_model::{ClassifierConfig, VitClassifier};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
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

/// Evaluate a classifier on every sample of `data`, in order, in batches of `batch` (an image
/// that does not decode is left out, and said).
pub fn evaluate(clf: &VitClassifier, data: &Samples, batch: usize) -> Result<EvalResult> {
    let k = clf.config().num_classes;
    let t0 = Instant::now();
    let dev = clf.device().clone();
    let (mut t1, mut t5, mut loss, mut n) = (0usize, 0usize, 0f64, 0usize);
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let Some(b) = data.batch(chunk)? else {
            continue;
        };
        let labels: Vec<i64> = b
            .labels
            .iter()
            .zip(&b.keys)
            .map(|(l, key)| match l {
                Some(l) if *l >= 0 && (*l as usize) < k => Ok(*l),
                Some(l) => Err(Error::Invalid(format!(
                    "evaluation label {l} of {key} is outside the classifier's {k} classes"
                ))),
                None => Err(Error::Invalid(format!(
                    "evaluation sample {key} has no label"
                ))),
            })
            .collect::<Result<_>>()?;
        let x = Tensor::from_vec(b.data, b.shape.to_vec(), &dev)?;
        let logits = clf.forward_t(&x, None)?;
        let (a, c, l) = score(&logits, &labels)?;
        (t1, t5, loss, n) = (t1 + a, t5 + c, loss + l, n + labels.len());
    }
    for sk in data.take_skipped() {
        eprintln!("lmd-eval: left out: {}", crate::train_data::describe(&sk));
    }
    let nf = n.max(1) as f64;
    Ok(EvalResult {
        epoch: 0,
        step: 0,
        top1: t1 as f64 / nf,
        top5: t5 as f64 / nf,
        loss: loss / nf,
        records: n,
        latents_per_s: n as f64 / t0.elapsed().as_secs_f64().max(1e-9),
    })
}

/// Read a saved classifier: `path` names a `model.safetensors` with `classifier.json` beside
/// it (a file, its checkpoint directory or the fine-tuning run: [`crate::run_dir::weights_file`]).
pub fn load_classifier(path: &Path, dev: &Device) -> Result<VitClassifier> {
    let file = crate::run_dir::weights_file(path)?;
    // the checkpoint itself first: a wrong path is named as such, not as a missing sidecar
    std::fs::metadata(&file).map_err(|e| Error::io(&file, "open checkpoint", e))?;
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

/// `lmd-eval`: evaluate a saved classifier on `device` (`cpu`, `cuda:N`): on latent shards,
/// or on image inputs when its encoder takes RGB (a pixel-MAE classifier: centre crops).
pub fn eval_checkpoint(
    checkpoint: &Path,
    data: &[PathBuf],
    batch: usize,
    device: crate::DeviceSpec,
) -> Result<EvalResult> {
    let clf = load_classifier(checkpoint, &device.open()?)?;
    let e = &clf.config().encoder;
    let input = match e.in_chans {
        3 => Input::Pixels,
        _ => Input::Latents,
    };
    let cache = crate::RunSettings::default().cache()?;
    let shape = [e.in_chans, e.img_size[0], e.img_size[1]];
    let samples = Samples::open(input, data, shape, &cache, "evaluation", false)?;
    evaluate(&clf, &samples, batch)
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
