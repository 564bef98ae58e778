//! The pixel loader: batches of augmented, normalised RGB images decoded from image shards
//! every epoch, for pixel-space MAE (the baseline LMD is measured against) and for
//! fine-tuning and evaluating on pixels.
//!
//! ```text
//! ImageSet (encoded files in memory) ──> N decode workers (batch b on worker b mod N)
//!        ──> one channel each (capacity PIXEL_PREFETCH_PER_WORKER) ──> consumer, round-robin
//! ```
//! Rules:
//! - **Data**: [`ImageSet::load`] reads every input once (anything `lmd-precompute` reads:
//!   WebDataset shards, ILSVRC tars, image folders) and keeps the *encoded* files in memory,
//!   about their size on disk (Imagenette's 3,000 training JPEGs: 36 MB). A shard that fails
//!   from an offset keeps its earlier samples and is reported in [`ImageSet::failures`]; an
//!   input that cannot be opened at all is an error naming it.
//! - **Order**: as [`crate::loader::LatentLoader`] with a full shuffle: each epoch a
//!   permutation from `(seed, epoch)`, cut into global batches of `batch_size x world_size`;
//!   rank `r` takes slice `r` of each, and every rank gets `floor(N / (w·B))` batches.
//! - **Augmentation**: per sample from `(seed, epoch, key)`: RandomResizedCrop(scale, ratio)
//!   and a fair-coin horizontal flip (MAE's pretraining recipe, [`PixelTransform::mae_pretrain`])
//!   or Resize + CenterCrop ([`PixelTransform::eval`]); then `(x − mean) / std` per channel
//!   (ImageNet's). Only the crop's region of a JPEG is decoded. Reruns and resumes see the
//!   same pixels.
//! - **Bounded, ordered, clean shutdown**: each worker prepares whole batches into its own
//!   channel of capacity [`PIXEL_PREFETCH_PER_WORKER`]; the consumer takes batch `b` from worker
//!   `b mod N`, so batches come in order and at most `N · (capacity + 1)` are in memory.
//!   Dropping the iterator closes the channels; each worker's send fails and it returns; `Drop`
//!   joins them.
//! - **Bad input never stops a run**: an image that does not decode is left out of its batch
//!   (which is one sample short) and recorded as a [`Skip`] naming source, key and offset
//!   ([`PixelLoader::take_skipped`]); a batch whose every sample failed is not handed out.
//! - **Resume**: [`LoaderState`] as the latent loader's; the next batch after
//!   [`PixelLoader::set_state`] is the one an uninterrupted run would have produced.

use crate::decode::{decode_region, Rgb8, DEFAULT_MAX_PIXELS};
use crate::loader::{LatentBatch, LoaderConfig, LoaderState, Rng};
use crate::source::{InputSpec, Labels, RawSample, ShardFailure, Skip, SourceEvent};
use crate::transform::{
    center_box, hwc_to_chw, random_resized_box, read_region, resize_box, CropMode, Filter, KeyRng,
    Resizer,
};
use crate::Result;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// Ready batches queued per decode worker.
pub const PIXEL_PREFETCH_PER_WORKER: usize = 2;

/// ImageNet's per-channel mean (RGB, in [0, 1]), as MAE normalises.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Every sample of some inputs, encoded, in input order.
#[derive(Debug, Default)]
pub struct ImageSet {
    samples: Vec<RawSample>,
    skipped: Vec<Skip>,
    failures: Vec<ShardFailure>,
}

impl ImageSet {
    /// Read `inputs` in order into memory. Samples the sources skip (a missing label, an odd
    /// member) are in [`ImageSet::skipped`], shards that failed part-way in
    /// [`ImageSet::failures`]; an input that cannot be read at all is an error.
    pub fn load(inputs: &[InputSpec], labels: Labels) -> Result<ImageSet> {
        let mut set = ImageSet::default();
        for input in inputs {
            input.read(labels, &mut |ev| {
                match ev {
                    SourceEvent::Sample(s) => set.samples.push(s),
                    SourceEvent::Skip(k) => set.skipped.push(k),
                    SourceEvent::ShardFailed(f) => set.failures.push(f),
                }
                true
            })?;
        }
        Ok(set)
    }

    /// A set of samples already in memory.
    pub fn from_samples(samples: Vec<RawSample>) -> ImageSet {
        ImageSet {
            samples,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&RawSample> {
        self.samples.get(i)
    }

    /// Bytes of encoded images held.
    pub fn bytes(&self) -> u64 {
        self.samples.iter().map(|s| s.image.len() as u64).sum()
    }

    pub fn skipped(&self) -> &[Skip] {
        &self.skipped
    }

    pub fn failures(&self) -> &[ShardFailure] {
        &self.failures
    }

    /// Each sample's label (`None` where it has none), in order.
    pub fn labels(&self) -> Vec<Option<i64>> {
        self.samples.iter().map(|s| s.label).collect()
    }
}

/// What each image becomes: an `S x S` crop, maybe flipped, normalised per channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PixelTransform {
    pub size: u32,
    pub crop: CropMode,
    /// Mirror each sample with probability 1/2 (random crops only).
    pub flip: bool,
    pub filter: Filter,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl PixelTransform {
    /// MAE's pretraining augmentation: `RandomResizedCrop(size, scale=(0.2, 1.0),
    /// interpolation=3)` (bicubic), `RandomHorizontalFlip()`, ImageNet normalisation.
    pub fn mae_pretrain(size: u32) -> Self {
        PixelTransform {
            size,
            crop: CropMode::rrc_default(),
            flip: true,
            filter: Filter::Bicubic,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Fine-tuning and linear probing: `RandomResizedCrop(size)` at torchvision's default
    /// scale (0.08, 1) + flip, bicubic, ImageNet normalisation (MAE's fine-tuning recipe
    /// without RandAugment, mixup and cutmix, none of which the latent arm has either).
    pub fn finetune(size: u32) -> Self {
        PixelTransform {
            crop: CropMode::RandomResized {
                scale: (0.08, 1.0),
                ratio: (3.0 / 4.0, 4.0 / 3.0),
            },
            ..Self::mae_pretrain(size)
        }
    }

    /// Evaluation: `Resize(size)` (shorter side) + `CenterCrop(size)`, bicubic, ImageNet
    /// normalisation. (MAE evaluates at a 0.875 crop ratio; this is the crop precompute's
    /// centre view takes, so both arms see the same images.)
    pub fn eval(size: u32) -> Self {
        PixelTransform {
            crop: CropMode::Center,
            flip: false,
            ..Self::mae_pretrain(size)
        }
    }

    /// f32 values per image (CHW).
    pub fn values_per_image(&self) -> usize {
        3 * (self.size as usize).pow(2)
    }

    /// Append sample `s`'s pixels for augmentation stream `view` to `out` (CHW, normalised).
    fn prepare(
        &self,
        s: &RawSample,
        view: usize,
        resizer: &mut Resizer,
        img: &mut Rgb8,
        out: &mut Vec<f32>,
    ) -> std::result::Result<(), String> {
        let size = self.size;
        // the crop box and flip of a w x h image (the same whenever asked)
        let pick = |w: u32, h: u32| match self.crop {
            CropMode::Center => (center_box(w, h, size), false),
            CropMode::RandomResized { scale, ratio } => {
                let mut rng = KeyRng::new(&s.key, view);
                let b = random_resized_box(w, h, scale, ratio, &mut rng);
                (b, self.flip && rng.coin())
            }
        };
        // JPEGs decode only the region the crop reads; other formats decode whole
        decode_region(
            &s.image,
            DEFAULT_MAX_PIXELS,
            |w, h| Some(read_region(pick(w, h).0, size, w, h)),
            img,
        )?;
        let (bx, flip) = pick(img.full[0], img.full[1]);
        let hwc = resize_box(img, bx, size, self.filter, resizer)?;
        let start = out.len();
        hwc_to_chw(&hwc, size as usize, flip, out);
        let plane = (size as usize).pow(2);
        for (c, ch) in out[start..].chunks_mut(plane).enumerate() {
            let (m, inv) = (self.mean[c], 1.0 / self.std[c]);
            ch.iter_mut().for_each(|v| *v = (*v - m) * inv);
        }
        Ok(())
    }

    /// Back to RGB in [0, 1] (for previews): `x · std + mean`, per channel of a CHW image.
    pub fn denormalise(&self, chw: &mut [f32]) {
        let plane = (self.size as usize).pow(2);
        for (i, v) in chw.iter_mut().enumerate() {
            let c = (i / plane) % 3;
            *v = (*v * self.std[c] + self.mean[c]).clamp(0.0, 1.0);
        }
    }
}

/// Batches of pixels over an [`ImageSet`].
pub struct PixelLoader {
    set: Arc<ImageSet>,
    cfg: LoaderConfig,
    tf: PixelTransform,
    workers: usize,
    state: LoaderState,
    skipped: Arc<Mutex<Vec<Skip>>>,
}

impl PixelLoader {
    /// `workers` decode threads (at least one) prepare batches ahead.
    pub fn new(
        set: Arc<ImageSet>,
        cfg: LoaderConfig,
        tf: PixelTransform,
        workers: usize,
    ) -> Result<Self> {
        cfg.check("PixelLoader", set.len(), "images")?;
        Ok(PixelLoader {
            set,
            cfg,
            tf,
            workers: workers.max(1),
            state: LoaderState::default(),
            skipped: Arc::default(),
        })
    }

    pub fn images(&self) -> &ImageSet {
        &self.set
    }

    /// The images, shared (for another loader over them).
    pub fn shared_images(&self) -> Arc<ImageSet> {
        self.set.clone()
    }

    pub fn transform(&self) -> &PixelTransform {
        &self.tf
    }

    pub fn state(&self) -> LoaderState {
        self.state
    }

    pub fn set_state(&mut self, s: LoaderState) {
        self.state = s;
    }

    /// Batches per epoch on each rank.
    pub fn batches_per_epoch(&self) -> usize {
        self.set.len() / (self.cfg.batch_size * self.cfg.world_size)
    }

    /// The global sample order of `epoch` (all ranks).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.set.len()).collect();
        if self.cfg.shuffle {
            Rng::new(self.cfg.seed, epoch, 0x1_5eed).shuffle(&mut order);
        }
        order
    }

    /// The samples that failed to decode so far (each once per failure), emptied.
    pub fn take_skipped(&self) -> Vec<Skip> {
        std::mem::take(&mut *self.skipped.lock().expect("skip list"))
    }

    /// Build one batch of `epoch` from sample indices (augmentation from the epoch).
    pub fn make_batch(&self, epoch: u64, index: u64, idx: &[usize]) -> Option<LatentBatch> {
        let mut w = BatchMaker::new(self);
        w.make(epoch, index, idx)
    }

    /// The rest of the current epoch, prepared in the background; advances the state as
    /// batches are taken. At the end of the epoch the state moves to the next epoch.
    pub fn epoch(&mut self) -> PixelEpochIter<'_> {
        if self.state.batch as usize >= self.batches_per_epoch() {
            self.state = LoaderState {
                epoch: self.state.epoch + 1,
                batch: 0,
                group_bytes: 0,
            };
        }
        let epoch = self.state.epoch;
        let order = self.epoch_order(epoch);
        let (bs, world, rank) = (self.cfg.batch_size, self.cfg.world_size, self.cfg.rank);
        let plan: Vec<(u64, Vec<usize>)> = (self.state.batch..self.batches_per_epoch() as u64)
            .map(|b| {
                let g = b as usize * world + rank;
                (b, order[g * bs..(g + 1) * bs].to_vec())
            })
            .collect();
        let plan = Arc::new(plan);
        let n = self.workers.min(plan.len()).max(1);
        let mut rxs = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for w in 0..n {
            let (tx, rx) = async_channel::bounded(PIXEL_PREFETCH_PER_WORKER);
            rxs.push(rx);
            let (plan, mut maker) = (plan.clone(), BatchMaker::new(self));
            threads.push(
                std::thread::Builder::new()
                    .name(format!("lmd-pixels-{w}"))
                    .spawn(move || {
                        for (b, idx) in plan.iter().skip(w).step_by(n) {
                            // a batch of failures only is sent as None, to keep the turn order
                            if tx.send_blocking(maker.make(epoch, *b, idx)).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("spawn pixel worker"),
            );
        }
        PixelEpochIter {
            loader: self,
            rxs,
            threads,
            turn: 0,
        }
    }
}

/// One worker's tools: a resizer and a pixel buffer reused between images.
struct BatchMaker {
    set: Arc<ImageSet>,
    tf: PixelTransform,
    seed: u64,
    skipped: Arc<Mutex<Vec<Skip>>>,
    resizer: Resizer,
    img: Rgb8,
}

impl BatchMaker {
    fn new(l: &PixelLoader) -> Self {
        BatchMaker {
            set: l.set.clone(),
            tf: l.tf.clone(),
            seed: l.cfg.seed,
            skipped: l.skipped.clone(),
            resizer: Resizer::new(),
            img: Rgb8::default(),
        }
    }

    /// The batch of samples `idx`, without those that fail (recorded); `None` if all fail.
    fn make(&mut self, epoch: u64, index: u64, idx: &[usize]) -> Option<LatentBatch> {
        let s = self.tf.size as usize;
        let view = Rng::new(self.seed, epoch, 0xa46).next() as usize;
        let mut data = Vec::with_capacity(idx.len() * self.tf.values_per_image());
        let (mut keys, mut labels) = (Vec::new(), Vec::new());
        for &i in idx {
            let Some(sample) = self.set.get(i) else {
                continue;
            };
            let start = data.len();
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.tf
                    .prepare(sample, view, &mut self.resizer, &mut self.img, &mut data)
            }))
            .unwrap_or_else(|_| {
                self.resizer = Resizer::new();
                Err("decoder panicked".into())
            });
            match done {
                Ok(()) => {
                    keys.push(sample.key.clone());
                    labels.push(sample.label);
                }
                Err(reason) => {
                    data.truncate(start);
                    self.skipped.lock().expect("skip list").push(Skip {
                        source: sample.source.clone(),
                        key: sample.key.clone(),
                        offset: sample.offset,
                        reason,
                    });
                }
            }
        }
        if keys.is_empty() {
            return None;
        }
        Some(LatentBatch {
            epoch,
            index,
            shape: [keys.len(), 3, s, s],
            keys,
            labels,
            data,
        })
    }
}

/// The remaining batches of one epoch (see [`PixelLoader::epoch`]).
pub struct PixelEpochIter<'a> {
    loader: &'a mut PixelLoader,
    rxs: Vec<async_channel::Receiver<Option<LatentBatch>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    turn: usize,
}

impl PixelEpochIter<'_> {
    /// The loader state after the batches taken so far.
    pub fn state(&self) -> LoaderState {
        self.loader.state
    }

    /// [`PixelLoader::take_skipped`].
    pub fn take_skipped(&self) -> Vec<Skip> {
        self.loader.take_skipped()
    }
}

impl Iterator for PixelEpochIter<'_> {
    type Item = Result<LatentBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let rx = &self.rxs[self.turn % self.rxs.len()];
            self.turn += 1;
            let b = rx.recv_blocking().ok()?;
            let b = match b {
                Some(b) => b,
                None => {
                    // every sample failed: the batch is consumed all the same
                    self.loader.state.batch += 1;
                    continue;
                }
            };
            self.loader.state = LoaderState {
                epoch: b.epoch,
                batch: b.index + 1,
                group_bytes: 0,
            };
            return Some(Ok(b));
        }
    }
}

impl Drop for PixelEpochIter<'_> {
    fn drop(&mut self) {
        for rx in &self.rxs {
            rx.close();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` PNG samples, each a flat colour with a bright left half (flips are visible).
    fn pngs(n: usize, w: u32, h: u32) -> Vec<RawSample> {
        (0..n)
            .map(|i| {
                let img = image::RgbImage::from_fn(w, h, |x, _| {
                    let v = (i * 20 % 200) as u8;
                    if x < w / 2 {
                        image::Rgb([255, v, 0])
                    } else {
                        image::Rgb([0, v, 255])
                    }
                });
                let mut bytes = Vec::new();
                img.write_to(
                    &mut std::io::Cursor::new(&mut bytes),
                    image::ImageFormat::Png,
                )
                .unwrap();
                RawSample {
                    key: format!("img{i:03}"),
                    label: Some(i as i64 % 3),
                    image: bytes,
                    ext: "png".into(),
                    source: "mem.tar".into(),
                    offset: 512 * i as u64,
                }
            })
            .collect()
    }

    fn loader(samples: Vec<RawSample>, rank: usize, world: usize, workers: usize) -> PixelLoader {
        let cfg = LoaderConfig {
            batch_size: 4,
            seed: 7,
            rank,
            world_size: world,
            ..Default::default()
        };
        let set = Arc::new(ImageSet::from_samples(samples));
        PixelLoader::new(set, cfg, PixelTransform::mae_pretrain(16), workers).unwrap()
    }

    #[test]
    fn epochs_cover_each_image_once_in_order_whatever_the_worker_count() {
        let mut one = loader(pngs(18, 40, 30), 0, 1, 1);
        let mut three = loader(pngs(18, 40, 30), 0, 1, 3);
        let a: Vec<LatentBatch> = one.epoch().map(|b| b.unwrap()).collect();
        let b: Vec<LatentBatch> = three.epoch().map(|b| b.unwrap()).collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 4);
        assert_eq!(a[0].shape, [4, 3, 16, 16]);
        let mut keys: Vec<&String> = a.iter().flat_map(|b| &b.keys).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 16);
        // normalised: blue 1.0 -> (1 - 0.406) / 0.225 is the largest value, 0.0 -> -0.406 / 0.225
        let px = a.iter().flat_map(|b| &b.data);
        let max = px.clone().cloned().fold(f32::MIN, f32::max);
        let min = px.cloned().fold(f32::MAX, f32::min);
        assert!((max - (1.0 - 0.406) / 0.225).abs() < 1e-3, "{max}");
        assert!((min - -0.485 / 0.229).abs() < 1e-3, "{min}");
        // the next epoch: another order and other crops
        let c: Vec<LatentBatch> = one.epoch().map(|b| b.unwrap()).collect();
        assert_eq!(c[0].epoch, 1);
        assert_ne!(c[0].keys, a[0].keys);
    }

    #[test]
    fn crops_and_flips_vary_by_epoch_and_the_same_epoch_repeats_exactly() {
        let l = loader(pngs(8, 64, 48), 0, 1, 1);
        let e0 = l.make_batch(0, 0, &[0, 1, 2, 3]);
        let e0 = e0.unwrap_or_else(|| panic!("{:?}", l.take_skipped()));
        let again = l.make_batch(0, 0, &[0, 1, 2, 3]).unwrap();
        let e1 = l.make_batch(1, 0, &[0, 1, 2, 3]).unwrap();
        assert_eq!(e0, again);
        assert_ne!(e0.data, e1.data);
        // over many epochs image 0 is seen mirrored sometimes: its red half on the right
        let s = 16;
        let flipped = (0..16)
            .filter(|&e| {
                let b = l.make_batch(e, 0, &[0]).unwrap();
                b.data[s - 1] > b.data[0] // red channel: right edge brighter than left
            })
            .count();
        assert!((2..=14).contains(&flipped), "{flipped} of 16 flipped");
        let mut chw = e0.data[..3 * s * s].to_vec();
        l.transform().denormalise(&mut chw);
        assert!(chw.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn a_resumed_epoch_and_the_ranks_slices_continue_the_uninterrupted_order() {
        let mut whole = loader(pngs(20, 40, 30), 0, 1, 2);
        let all: Vec<LatentBatch> = whole.epoch().map(|b| b.unwrap()).collect();
        let mut resumed = loader(pngs(20, 40, 30), 0, 1, 2);
        {
            let mut it = resumed.epoch();
            it.next().unwrap().unwrap();
            it.next().unwrap().unwrap();
            assert_eq!(it.state().batch, 2);
        }
        let st = resumed.state();
        let mut again = loader(pngs(20, 40, 30), 0, 1, 2);
        again.set_state(st);
        let rest: Vec<LatentBatch> = again.epoch().map(|b| b.unwrap()).collect();
        assert_eq!(rest, all[2..]);
        // two ranks of batch 4: rank r's batch b is slice r of global batch b of 8
        let order = whole.epoch_order(0);
        for r in 0..2 {
            let mut l = loader(pngs(20, 40, 30), r, 2, 1);
            let bs: Vec<LatentBatch> = l.epoch().map(|b| b.unwrap()).collect();
            assert_eq!(bs.len(), 2);
            for (b, batch) in bs.iter().enumerate() {
                let g = (b * 2 + r) * 4;
                let want: Vec<String> = order[g..g + 4]
                    .iter()
                    .map(|&i| format!("img{i:03}"))
                    .collect();
                assert_eq!(batch.keys, want);
            }
        }
    }

    #[test]
    fn a_corrupt_image_leaves_its_batch_one_short_and_is_reported() {
        let mut s = pngs(8, 40, 30);
        s[3].image.truncate(40);
        let l = loader(s, 0, 1, 1);
        let b = l.make_batch(0, 0, &[2, 3, 4, 5]).unwrap();
        assert_eq!(b.shape[0], 3);
        assert_eq!(b.keys, ["img002", "img004", "img005"]);
        let sk = l.take_skipped();
        assert_eq!(sk.len(), 1);
        assert_eq!(
            (sk[0].key.as_str(), sk[0].source.as_str(), sk[0].offset),
            ("img003", "mem.tar", 1536)
        );
        assert!(!sk[0].reason.is_empty());
        assert!(l.take_skipped().is_empty());
        assert!(l.make_batch(0, 0, &[3]).is_none());
    }
}
