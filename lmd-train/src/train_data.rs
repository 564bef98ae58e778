//! A run's training data: latent shards (LMD) or image shards decoded every epoch (pixel MAE,
//! the baseline). [`Input`] is the one decision; [`TrainData`] and [`Epoch`] give both the
//! same batches (`LatentBatch`: `[B, C, H, W]` f32), resume state and wait accounting, so the
//! trainer's step loop does not know which it reads.
//!
//! Image inputs are anything `lmd-precompute` reads (WebDataset shard patterns, ILSVRC tars,
//! image folders), detected as precompute detects them; their encoded files are held in memory
//! ([`lmd_data::pixel_loader::ImageSet`]). Pixels are `S x S` with `S` the model's input side,
//! augmented with MAE's RandomResizedCrop(0.2-1) + flip for pretraining.

use crate::{Error, Result};
use lmd_data::loader::{EpochIter, LatentBatch, LatentLoader, LoaderConfig, LoaderState};
use lmd_data::pixel_loader::{ImageSet, PixelEpochIter, PixelLoader, PixelTransform};
use lmd_data::source::{InputSpec, Labels, Skip};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// What a run reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Input {
    /// Latent shards (lmd-precompute outputs): LMD.
    #[default]
    Latents,
    /// Image shards, decoded and augmented every epoch: pixel-space MAE.
    Pixels,
}

impl std::str::FromStr for Input {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "latents" => Ok(Input::Latents),
            "pixels" => Ok(Input::Pixels),
            o => Err(Error::Invalid(format!(
                "unknown input {o:?} (expected latents or pixels)"
            ))),
        }
    }
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Input::Latents => "latents",
            Input::Pixels => "pixels",
        })
    }
}

/// The loader settings of a run's rank: `batch_size` per rank, shuffled per `seed`, the
/// latent loader's shuffle `window`.
pub fn loader_config(
    batch_size: usize,
    seed: u64,
    window: usize,
    (rank, world_size): (usize, usize),
) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        seed,
        window,
        rank,
        world_size,
        ..Default::default()
    }
}

/// Read image inputs (paths or shard patterns, detected as lmd-precompute detects them) into
/// memory; `labels` says whether a sample without one is skipped. Says on stderr what was
/// skipped or failed when `say`.
pub fn open_images(paths: &[PathBuf], labels: Labels, say: bool) -> Result<ImageSet> {
    let inputs = paths
        .iter()
        .map(|p| InputSpec::detect(&p.to_string_lossy(), None, None))
        .collect::<lmd_data::Result<Vec<_>>>()?;
    let set = ImageSet::load(&inputs, labels)?;
    if say {
        for f in set.failures() {
            eprintln!("lmd-data: shard failed (its earlier samples are used): {f}");
        }
        if !set.skipped().is_empty() {
            eprintln!(
                "lmd-data: {} samples skipped while reading, first: {}",
                set.skipped().len(),
                describe(&set.skipped()[0])
            );
        }
    }
    if set.is_empty() {
        return Err(Error::Invalid(format!(
            "no images in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(set)
}

/// A skipped sample as one line: source, key, offset and reason.
pub fn describe(s: &Skip) -> String {
    format!(
        "{} key {} at byte {}: {}",
        s.source, s.key, s.offset, s.reason
    )
}

/// A fixed set of samples read in order without augmentation (pixels: Resize + CenterCrop):
/// what evaluation, k-NN features and linear-probe statistics read.
pub enum Samples {
    Latents(LatentLoader),
    Pixels(PixelLoader),
}

impl Samples {
    /// The samples of a latent dataset, in order.
    pub fn latents(ds: Arc<lmd_data::shard::LatentDataset>) -> Result<Samples> {
        let cfg = LoaderConfig {
            batch_size: 1,
            shuffle: false,
            ..Default::default()
        };
        Ok(Samples::Latents(LatentLoader::new(ds, cfg)?))
    }

    /// `set`'s images as `size x size` centre crops, in order.
    pub fn pixels(set: Arc<ImageSet>, size: u32) -> Result<Samples> {
        let cfg = LoaderConfig {
            batch_size: 1,
            shuffle: false,
            ..Default::default()
        };
        let workers = 1;
        Ok(Samples::Pixels(PixelLoader::new(
            set,
            cfg,
            PixelTransform::eval(size),
            workers,
        )?))
    }

    /// Open `paths` as `input` for a model taking `[c, h, w]` (checked), through `cache`
    /// for remote latents; `what` names the data in errors ("validation").
    pub fn open(
        input: Input,
        paths: &[PathBuf],
        [c, h, w]: [usize; 3],
        cache: &lmd_data::storage::Cache,
        what: &str,
        say: bool,
    ) -> Result<Samples> {
        let s = match input {
            Input::Latents => {
                Self::latents(Arc::new(crate::train::open_data_cached(paths, cache, say)?))?
            }
            Input::Pixels => Self::pixels(
                Arc::new(open_images(paths, Labels::Optional, say)?),
                h as u32,
            )?,
        };
        if s.shape() != [c, h, w] || (input == Input::Pixels && h != w) {
            let [a, b, d] = s.shape();
            return Err(Error::Invalid(format!(
                "the {what} data has {input} {a}x{b}x{d}; the model expects {c}x{h}x{w}"
            )));
        }
        Ok(s)
    }

    pub fn len(&self) -> usize {
        match self {
            Samples::Latents(l) => l.dataset().len(),
            Samples::Pixels(l) => l.images().len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One sample's `[C, H, W]`.
    pub fn shape(&self) -> [usize; 3] {
        match self {
            Samples::Latents(l) => l.dataset().meta().latent_shape,
            Samples::Pixels(l) => {
                let s = l.transform().size as usize;
                [3, s, s]
            }
        }
    }

    /// Every sample's label, in order; `what` names the data in errors.
    pub fn labels(&self, what: &str) -> Result<Vec<i64>> {
        match self {
            Samples::Latents(l) => crate::eval::labels_of(l.dataset(), what),
            Samples::Pixels(l) => (0..l.images().len())
                .map(|i| {
                    let s = l.images().get(i).expect("in range");
                    s.label.ok_or_else(|| {
                        Error::Invalid(format!(
                            "the {what} image {} in {} (at byte {}) has no label",
                            s.key, s.source, s.offset
                        ))
                    })
                })
                .collect(),
        }
    }

    /// Samples `idx` as one batch (pixels: those that decode; `None` if none does).
    pub fn batch(&self, idx: &[usize]) -> Result<Option<LatentBatch>> {
        match self {
            Samples::Latents(l) => Ok(Some(l.make_batch(0, 0, idx)?)),
            Samples::Pixels(l) => Ok(l.make_batch(0, 0, idx)),
        }
    }

    /// Images left out since the last call (pixels that did not decode).
    pub fn take_skipped(&self) -> Vec<Skip> {
        match self {
            Samples::Latents(_) => Vec::new(),
            Samples::Pixels(l) => l.take_skipped(),
        }
    }
}

/// The loader of a run.
pub enum TrainData {
    Latents(LatentLoader),
    Pixels(PixelLoader),
}

impl TrainData {
    /// Pixel batches of `set` with `tf`, decoded by one thread per core.
    pub fn pixels(set: Arc<ImageSet>, cfg: LoaderConfig, tf: PixelTransform) -> Result<Self> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(TrainData::Pixels(PixelLoader::new(set, cfg, tf, workers)?))
    }

    /// A fresh loader over the same data with other settings (a resume at another world
    /// size takes another per-rank batch).
    pub fn with_config(&self, cfg: LoaderConfig) -> Result<Self> {
        Ok(match self {
            TrainData::Latents(l) => {
                TrainData::Latents(LatentLoader::new(l.shared_dataset(), cfg)?)
            }
            TrainData::Pixels(l) => {
                let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
                TrainData::Pixels(PixelLoader::new(
                    l.shared_images(),
                    cfg,
                    l.transform().clone(),
                    workers,
                )?)
            }
        })
    }

    /// Samples in the data.
    pub fn len(&self) -> usize {
        match self {
            TrainData::Latents(l) => l.dataset().len(),
            TrainData::Pixels(l) => l.images().len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shard-group size of the current epoch ([`LoaderState::group_bytes`]; pixels: 0).
    pub fn group_bytes(&self) -> u64 {
        match self {
            TrainData::Latents(l) => l.state().group_bytes,
            TrainData::Pixels(_) => 0,
        }
    }

    pub fn batches_per_epoch(&self) -> usize {
        match self {
            TrainData::Latents(l) => l.batches_per_epoch(),
            TrainData::Pixels(l) => l.batches_per_epoch(),
        }
    }

    pub fn set_state(&mut self, s: LoaderState) {
        match self {
            TrainData::Latents(l) => l.set_state(s),
            TrainData::Pixels(l) => l.set_state(s),
        }
    }

    /// The rest of the current epoch.
    pub fn epoch(&mut self) -> Epoch<'_> {
        match self {
            TrainData::Latents(l) => Epoch::Latents(l.epoch()),
            TrainData::Pixels(l) => Epoch::Pixels(l.epoch()),
        }
    }

    /// The same samples in order without augmentation (k-NN features, statistics).
    pub fn in_order(&self) -> Result<Samples> {
        match self {
            TrainData::Latents(l) => Samples::latents(l.shared_dataset()),
            TrainData::Pixels(l) => Samples::pixels(l.shared_images(), l.transform().size),
        }
    }

    /// The first `n` samples as epoch 0 gives them (the fixed preview inputs).
    pub fn first(&self, n: usize) -> Result<LatentBatch> {
        let idx: Vec<usize> = (0..n.min(self.len())).collect();
        match self {
            TrainData::Latents(l) => Ok(l.make_batch(0, 0, &idx)?),
            TrainData::Pixels(l) => l
                .make_batch(0, 0, &idx)
                .ok_or_else(|| Error::Invalid(format!("none of the first {n} images decodes"))),
        }
    }

    /// Images that failed to decode since the last call (pixels only).
    pub fn take_skipped(&self) -> Vec<Skip> {
        match self {
            TrainData::Latents(_) => Vec::new(),
            TrainData::Pixels(l) => l.take_skipped(),
        }
    }
}

/// One epoch's batches of either kind.
pub enum Epoch<'a> {
    Latents(EpochIter<'a>),
    Pixels(PixelEpochIter<'a>),
}

impl Epoch<'_> {
    /// The loader state after the batches taken so far.
    pub fn state(&self) -> LoaderState {
        match self {
            Epoch::Latents(it) => it.state(),
            Epoch::Pixels(it) => it.state(),
        }
    }

    /// Images that failed to decode since the last call (pixels only).
    pub fn take_skipped(&self) -> Vec<Skip> {
        match self {
            Epoch::Latents(_) => Vec::new(),
            Epoch::Pixels(it) => it.take_skipped(),
        }
    }
}

impl Iterator for Epoch<'_> {
    type Item = lmd_data::Result<LatentBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Epoch::Latents(it) => it.next(),
            Epoch::Pixels(it) => it.next(),
        }
    }
}
