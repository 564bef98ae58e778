//! The ingestion pipeline: sources -> decode/transform workers -> ordered batches.
//!
//! ```text
//! reader thread ──raw (cap RAW_PER_WORKER × workers)──> N decode workers
//!        │                                                   │
//!        └────────────── done (cap DONE_PER_WORKER × workers) ┴──> batcher ──batches (cap)──> consumer
//! ```
//! Rules:
//! - **Bounded everywhere**: every channel (async-channel, used from plain threads with its
//!   blocking API; consumers may also `.recv().await`) has a named capacity, so a slow consumer
//!   stalls the batcher, then the workers, then the reader: memory stays bounded (backpressure).
//! - **Order**: the reader numbers every event; the batcher re-orders by number, so batches,
//!   skips and shard failures come out in input order whatever the worker timing (runs are
//!   reproducible; precompute can resume by position).
//! - **Bad input never stops a run**: an undecodable sample becomes a [`Skip`] inside the next
//!   batch; an unreadable shard becomes one [`PipelineItem::ShardFailed`] after its earlier samples,
//!   and the other shards go on. A panic in a worker is caught and reported as a skip of that
//!   sample ("worker panicked: ..."), never a hang.
//! - **Shutdown**: dropping the [`Pipeline`] (or its receiver) closes the channels; each stage
//!   sees its send fail and returns; `Drop` joins every thread. [`Pipeline::cancel`] stops the
//!   reader early.
//! - **Measured**: every worker adds the seconds it spends decoding and transforming to one
//!   shared counter ([`Pipeline::decode_stats`]), so a consumer can tell the rate decoding
//!   alone gives (all workers, never waiting) from the rate it actually got.

use crate::decode::{decode_region, Rgb8, DEFAULT_MAX_PIXELS};
use crate::source::{InputSpec, Labels, RawSample, ShardFailure, Skip, SourceEvent};
use crate::transform::{prepare, TransformConfig};
use async_channel::{bounded, Receiver, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Raw samples queued per decode worker.
pub const RAW_PER_WORKER: usize = 8;
/// Finished samples queued per decode worker (also bounds the re-order window).
pub const DONE_PER_WORKER: usize = 8;
/// Default number of ready batches queued for the consumer.
pub const DEFAULT_BATCH_QUEUE: usize = 4;

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub transform: TransformConfig,
    pub batch_size: usize,
    /// Decode/transform threads (default: one per core).
    pub workers: usize,
    pub max_pixels: u64,
    pub labels: Labels,
    /// Ready batches queued for the consumer.
    pub batch_queue: usize,
    /// Input events before this position are read but dropped (resuming a job).
    pub start_seq: u64,
    /// `(n, i)`: keep only events whose position `p` has `p % n == i` (one of `n` workers).
    pub split: (u64, u64),
    /// Stop after this many input events (0: no limit).
    pub limit: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            transform: TransformConfig::default(),
            batch_size: 32,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            max_pixels: DEFAULT_MAX_PIXELS,
            labels: Labels::Required,
            batch_queue: DEFAULT_BATCH_QUEUE,
            start_seq: 0,
            split: (1, 0),
            limit: 0,
        }
    }
}

/// One decoded, transformed image.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Position of this sample among all input events (see [`PipelineConfig::start_seq`]).
    pub seq: u64,
    pub key: String,
    pub label: Option<i64>,
    pub source: String,
    pub offset: u64,
    /// All variants, CHW u8 each (see [`TransformConfig::values_per_image`]; a quarter of
    /// the f32 bytes: the VAE's device brings them to [0, 1], see `transform::unit_f32`).
    pub pixels: Vec<u8>,
}

/// Consecutive prepared images, plus the skips among them (each with its input position, so a
/// consumer can interleave them exactly).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub items: Vec<Prepared>,
    pub skipped: Vec<(u64, Skip)>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// What the consumer receives.
#[derive(Debug, Clone)]
pub enum PipelineItem {
    Batch(Batch),
    /// A shard could not be read (from an offset on); its earlier samples were delivered.
    ShardFailed(ShardFailure),
    /// An input could not be opened at all (a missing file, a bad label file).
    InputFailed(String),
}

enum Outcome {
    Ready(Prepared),
    Skipped(u64, Skip),
    ShardFailed(ShardFailure),
    InputFailed(String),
}

/// A running pipeline; iterate it (blocking) or use [`Pipeline::receiver`] from async code.
pub struct Pipeline {
    rx: Receiver<PipelineItem>,
    cancel: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    decode: DecodeCounter,
}

/// The decode workers' shared tally (cheap to clone; readable while the pipeline runs or after
/// it is dropped).
#[derive(Debug, Clone, Default)]
pub struct DecodeCounter(Arc<DecodeTally>);

#[derive(Debug, Default)]
struct DecodeTally {
    workers: AtomicU64,
    images: AtomicU64,
    busy_ns: AtomicU64,
}

/// What the decode workers did so far.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DecodeStats {
    pub workers: usize,
    /// Samples decoded and transformed (or found undecodable).
    pub images: u64,
    /// Seconds the workers spent on them, summed over workers.
    pub busy_s: f64,
}

impl DecodeStats {
    /// Images/s all workers give when they never wait (the decode-only rate of these cores).
    pub fn images_per_s(&self) -> f64 {
        if self.busy_s > 0.0 {
            self.images as f64 * self.workers as f64 / self.busy_s
        } else {
            0.0
        }
    }
}

impl DecodeCounter {
    fn add(&self, secs: std::time::Duration) {
        self.0.images.fetch_add(1, Ordering::Relaxed);
        self.0
            .busy_ns
            .fetch_add(secs.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The tally now.
    pub fn stats(&self) -> DecodeStats {
        DecodeStats {
            workers: self.0.workers.load(Ordering::Relaxed) as usize,
            images: self.0.images.load(Ordering::Relaxed),
            busy_s: self.0.busy_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }
}

impl Pipeline {
    /// Start reading `inputs` in order.
    pub fn start(inputs: Vec<InputSpec>, cfg: PipelineConfig) -> Pipeline {
        let workers = cfg.workers.max(1);
        // Jobs carry (order, input position): `order` numbers what the reader passes on,
        // contiguously, for the batcher's re-ordering; the position is the event's index in the
        // whole input, reported to the consumer (resume points, worker split).
        let (raw_tx, raw_rx) = bounded::<(u64, u64, RawSample)>(RAW_PER_WORKER * workers);
        let (done_tx, done_rx) = bounded::<(u64, Outcome)>(DONE_PER_WORKER * workers);
        let (out_tx, out_rx) = bounded::<PipelineItem>(cfg.batch_queue.max(1));
        let cancel = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let decode = DecodeCounter::default();
        decode.0.workers.store(workers as u64, Ordering::Relaxed);

        // Reader: numbers events; samples go to the workers, everything else straight to the batcher.
        let reader = Reader {
            labels: cfg.labels,
            start_seq: cfg.start_seq,
            limit: cfg.limit,
            split: (cfg.split.0.max(1), cfg.split.1),
        };
        {
            let (done_tx, cancel) = (done_tx.clone(), cancel.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("lmd-reader".into())
                    .spawn(move || reader.run(&inputs, &raw_tx, &done_tx, &cancel))
                    .expect("spawn reader"),
            );
        }
        for w in 0..workers {
            let (raw_rx, done_tx) = (raw_rx.clone(), done_tx.clone());
            let tcfg = cfg.transform.clone();
            let max_pixels = cfg.max_pixels;
            let tally = decode.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("lmd-decode-{w}"))
                    .spawn(move || decode_worker(&raw_rx, &done_tx, &tcfg, max_pixels, &tally))
                    .expect("spawn worker"),
            );
        }
        drop(done_tx);
        drop(raw_rx);
        let batch_size = cfg.batch_size.max(1);
        threads.push(
            std::thread::Builder::new()
                .name("lmd-batcher".into())
                .spawn(move || batcher(&done_rx, &out_tx, batch_size))
                .expect("spawn batcher"),
        );
        Pipeline {
            rx: out_rx,
            cancel,
            threads,
            decode,
        }
    }

    /// The decode workers' tally (a handle that stays valid after the pipeline is consumed).
    pub fn decode_stats(&self) -> DecodeCounter {
        self.decode.clone()
    }

    /// The consumer end (for async use: `receiver().recv().await`).
    pub fn receiver(&self) -> &Receiver<PipelineItem> {
        &self.rx
    }

    /// Stop reading new samples (what is in flight still arrives).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// The reader stage's settings.
struct Reader {
    labels: Labels,
    start_seq: u64,
    limit: u64,
    /// (number of splits, this split)
    split: (u64, u64),
}

impl Reader {
    /// Read every input in order, numbering events; this run's samples go to the decode
    /// workers, its skips and failures straight to the batcher. Stops early when cancelled or
    /// when a consumer is gone.
    fn run(
        &self,
        inputs: &[InputSpec],
        raw_tx: &Sender<(u64, u64, RawSample)>,
        done_tx: &Sender<(u64, Outcome)>,
        cancel: &AtomicBool,
    ) {
        let (nsplit, isplit) = self.split;
        let mut seq = 0u64;
        let mut order = 0u64;
        for input in inputs {
            let mut on_event = |ev: SourceEvent| -> bool {
                if cancel.load(Ordering::Relaxed) {
                    return false;
                }
                let s = seq;
                seq += 1;
                if self.limit > 0 && s >= self.limit {
                    return false;
                }
                if s < self.start_seq || s % nsplit != isplit {
                    return true;
                }
                let o = order;
                order += 1;
                match ev {
                    SourceEvent::Sample(x) => raw_tx.send_blocking((o, s, x)).is_ok(),
                    SourceEvent::Skip(k) => {
                        done_tx.send_blocking((o, Outcome::Skipped(s, k))).is_ok()
                    }
                    SourceEvent::ShardFailed(f) => {
                        done_tx.send_blocking((o, Outcome::ShardFailed(f))).is_ok()
                    }
                }
            };
            if let Err(e) = input.read(self.labels, &mut on_event) {
                let o = order;
                order += 1;
                if done_tx
                    .send_blocking((o, Outcome::InputFailed(e.to_string())))
                    .is_err()
                {
                    return;
                }
            }
            if cancel.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// A decode worker: samples to prepared pixels (or a skip naming the reason; a panic in a
/// decoder is caught and becomes a skip), until the reader is done.
fn decode_worker(
    raw_rx: &Receiver<(u64, u64, RawSample)>,
    done_tx: &Sender<(u64, Outcome)>,
    tcfg: &TransformConfig,
    max_pixels: u64,
    tally: &DecodeCounter,
) {
    let mut resizer = fast_image_resize::Resizer::new();
    // Reused between images: no fresh pixel memory per decode.
    let mut img = Rgb8::default();
    while let Ok((order, seq, s)) = raw_rx.recv_blocking() {
        let t0 = std::time::Instant::now();
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decode_region(
                &s.image,
                max_pixels,
                |w, h| tcfg.source_region(w, h),
                &mut img,
            )
            .and_then(|()| {
                prepare(&img, &s.key, tcfg, &mut resizer).map_err(|e| match e {
                    crate::Error::Transform { reason, .. } => reason,
                    e => e.to_string(),
                })
            })
        }));
        tally.add(t0.elapsed());
        let reason = match out {
            Ok(Ok(pixels)) => {
                let p = Prepared {
                    seq,
                    key: s.key,
                    label: s.label,
                    source: s.source,
                    offset: s.offset,
                    pixels,
                };
                if done_tx.send_blocking((order, Outcome::Ready(p))).is_err() {
                    return;
                }
                continue;
            }
            Ok(Err(reason)) => reason,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                resizer = fast_image_resize::Resizer::new();
                format!("worker panicked: {msg}")
            }
        };
        let skip = Skip {
            source: s.source,
            key: s.key,
            offset: s.offset,
            reason,
        };
        if done_tx
            .send_blocking((order, Outcome::Skipped(seq, skip)))
            .is_err()
        {
            return;
        }
    }
}

/// The batcher: outcomes back into input order, images into batches of `batch_size` (skips
/// ride with the batch they fall in); a shard or input failure flushes the batch before it.
fn batcher(done_rx: &Receiver<(u64, Outcome)>, out_tx: &Sender<PipelineItem>, batch_size: usize) {
    let mut pending = std::collections::BTreeMap::new();
    let mut next = 0u64;
    let mut batch = Batch::default();
    let flush_then = |batch: &mut Batch, item: PipelineItem| -> bool {
        if (!batch.items.is_empty() || !batch.skipped.is_empty())
            && out_tx
                .send_blocking(PipelineItem::Batch(std::mem::take(batch)))
                .is_err()
        {
            return false;
        }
        out_tx.send_blocking(item).is_ok()
    };
    while let Ok((seq, o)) = done_rx.recv_blocking() {
        pending.insert(seq, o);
        while let Some(o) = pending.remove(&next) {
            next += 1;
            let ok = match o {
                Outcome::Ready(p) => {
                    batch.items.push(p);
                    batch.items.len() < batch_size
                        || out_tx
                            .send_blocking(PipelineItem::Batch(std::mem::take(&mut batch)))
                            .is_ok()
                }
                Outcome::Skipped(pos, s) => {
                    batch.skipped.push((pos, s));
                    true
                }
                Outcome::ShardFailed(f) => flush_then(&mut batch, PipelineItem::ShardFailed(f)),
                Outcome::InputFailed(e) => flush_then(&mut batch, PipelineItem::InputFailed(e)),
            };
            if !ok {
                return;
            }
        }
    }
    if !batch.items.is_empty() || !batch.skipped.is_empty() {
        let _ = out_tx.send_blocking(PipelineItem::Batch(batch));
    }
}

impl Iterator for Pipeline {
    type Item = PipelineItem;
    fn next(&mut self) -> Option<PipelineItem> {
        self.rx.recv_blocking().ok()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.cancel();
        self.rx.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
