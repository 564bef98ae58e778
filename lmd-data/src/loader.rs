//! The latent loader: batches of latents from one or more shard sets, for training.
//!
//! - **Order**: each epoch, a permutation from `(seed, epoch)`: the blocks of all shards are
//!   shuffled, their records concatenated, and the sequence shuffled again within consecutive
//!   windows of `window` records. Trade-off: a window spans `window / records_per_block`
//!   blocks, so a batch touches few blocks (cheap reads, each block decompressed once per batch)
//!   while records still mix across the whole dataset at block granularity. `window` ≥ the
//!   dataset size gives a full uniform shuffle.
//! - **Ranks**: the global sequence is cut into batches; rank `r` of `w` takes batches
//!   `r, r+w, ...`, and every rank gets the same number (`floor(N / (w·B))`; the rest of the
//!   epoch is dropped), so data-parallel steps stay in lock-step.
//! - **Variants**: records with several views/flips give one per sample per epoch, picked from
//!   `(seed, epoch, record)`; `mean`+`logvar` records are sampled `mean + exp(logvar/2)·ε`,
//!   `ε` from `(seed, epoch, record)` too, so a resumed epoch sees the same numbers.
//! - **Scaling**: applied once here when the shards say it was not applied at write time.
//! - **Prefetch**: a background thread prepares up to `prefetch` batches ahead (bounded
//!   channel); dropping the iterator stops and joins it. It keeps each decompressed block
//!   from its first to its last use in the epoch (known from the epoch's plan), so a block is
//!   decompressed once per epoch and memory stays near the blocks one window spans.
//! - **Resume**: [`LoaderState`] (epoch, batches consumed) is exported after each batch and
//!   restored with [`LatentLoader::set_state`]; the next batch is the one an uninterrupted run
//!   would have produced.

use crate::shard::{Field, LatentDataset};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Loader settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Records shuffled together after the block shuffle.
    pub window: usize,
    pub rank: usize,
    pub world_size: usize,
    /// Batches prepared ahead by the background thread.
    pub prefetch: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 64,
            seed: 0,
            shuffle: true,
            window: 8192,
            rank: 0,
            world_size: 1,
            prefetch: 4,
        }
    }
}

impl LoaderConfig {
    /// Refuse settings a loader of `n` `items` cannot serve (an error naming `context`): a zero
    /// batch or world, a rank outside the world, or too few items for one batch on every rank.
    pub(crate) fn check(&self, context: &str, n: usize, items: &str) -> Result<()> {
        let bad = |detail: String| {
            Err(Error::InvalidInput {
                context: context.into(),
                detail,
            })
        };
        if self.batch_size == 0 || self.world_size == 0 || self.rank >= self.world_size {
            return bad(format!(
                "batch_size {} / rank {} of world_size {} is invalid",
                self.batch_size, self.rank, self.world_size
            ));
        }
        if n < self.batch_size * self.world_size {
            return bad(format!(
                "{n} {items} cannot fill one batch of {} on each of {} ranks",
                self.batch_size, self.world_size
            ));
        }
        Ok(())
    }
}

/// Where the loader is: exported into checkpoints, restored on resume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    /// Batches of this epoch already handed out (on this rank).
    pub batch: u64,
    /// The shard-group size this epoch's order was drawn with
    /// ([`LatentDataset::group_bytes`]; 0: one group). Kept so that a resumed epoch keeps its
    /// order even if the cache limit changed; the next epoch takes the dataset's.
    #[serde(default)]
    pub group_bytes: u64,
}

/// One batch: `data` is `[B, C, H, W]` f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentBatch {
    pub epoch: u64,
    /// Index of this batch within the epoch (on this rank).
    pub index: u64,
    pub keys: Vec<String>,
    pub labels: Vec<Option<i64>>,
    pub data: Vec<f32>,
    pub shape: [usize; 4],
}

pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(a: u64, b: u64, c: u64) -> Self {
        let mut bytes = [0u8; 24];
        bytes[..8].copy_from_slice(&a.to_le_bytes());
        bytes[8..16].copy_from_slice(&b.to_le_bytes());
        bytes[16..].copy_from_slice(&c.to_le_bytes());
        Rng(xxhash_rust::xxh3::xxh3_64(&bytes))
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
    fn normal(&mut self) -> f32 {
        let u1 = ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// Batches of latents over a [`LatentDataset`].
pub struct LatentLoader {
    ds: Arc<LatentDataset>,
    cfg: LoaderConfig,
    state: LoaderState,
}

impl LatentLoader {
    pub fn new(ds: Arc<LatentDataset>, cfg: LoaderConfig) -> Result<Self> {
        cfg.check("LatentLoader", ds.len(), "records")?;
        let state = LoaderState {
            group_bytes: ds.group_bytes(),
            ..LoaderState::default()
        };
        Ok(LatentLoader { ds, cfg, state })
    }

    pub fn dataset(&self) -> &LatentDataset {
        &self.ds
    }

    /// The dataset, shared (for another loader over it).
    pub fn shared_dataset(&self) -> Arc<LatentDataset> {
        self.ds.clone()
    }

    pub fn state(&self) -> LoaderState {
        self.state
    }

    pub fn set_state(&mut self, s: LoaderState) {
        self.state = s;
    }

    /// Batches per epoch on each rank.
    pub fn batches_per_epoch(&self) -> usize {
        self.ds.len() / (self.cfg.batch_size * self.cfg.world_size)
    }

    /// The global record order of `epoch` (all ranks).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        self.epoch_plan(epoch).0
    }

    /// The group size `epoch` is drawn with: the state's for the current epoch, else the
    /// dataset's.
    fn group_bytes_of(&self, epoch: u64) -> u64 {
        if epoch == self.state.epoch {
            self.state.group_bytes
        } else {
            self.ds.group_bytes()
        }
    }

    /// The global record order of `epoch` and the shard groups it reads in turn. With
    /// `group_bytes` 0 there is one group of all shards; otherwise the shards are shuffled
    /// and cut into consecutive groups of at most `group_bytes` streamed bytes, and the blocks
    /// and windows are shuffled within each group, so records of group `g` all come before
    /// those of `g + 1`.
    fn epoch_plan(&self, epoch: u64) -> (Vec<usize>, Vec<Vec<usize>>) {
        let n = self.ds.num_shards();
        let group_bytes = self.group_bytes_of(epoch);
        let starts: Vec<usize> = (0..n)
            .scan(0, |acc, s| {
                let st = *acc;
                *acc += self.ds.shard_len(s);
                Some(st)
            })
            .collect();
        if !self.cfg.shuffle {
            let groups = cut_groups(&self.ds, (0..n).collect(), group_bytes);
            return ((0..self.ds.len()).collect(), groups);
        }
        let mut rng = Rng::new(self.cfg.seed, epoch, 0x5eed);
        let groups = if group_bytes == 0 {
            vec![(0..n).collect()]
        } else {
            let mut shards: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut shards);
            cut_groups(&self.ds, shards, group_bytes)
        };
        let mut order = Vec::with_capacity(self.ds.len());
        for g in &groups {
            // (global first record, count)
            let mut units: Vec<(usize, usize)> = Vec::new();
            for &s in g {
                for (first, c) in self.ds.block_ranges(s) {
                    units.push((starts[s] + first, c));
                }
            }
            rng.shuffle(&mut units);
            let mut part: Vec<usize> = units.iter().flat_map(|&(f, c)| f..f + c).collect();
            for w in part.chunks_mut(self.cfg.window.max(1)) {
                rng.shuffle(w);
            }
            order.extend(part);
        }
        (order, groups)
    }

    /// This rank's record indices for batch `b` of `epoch`.
    fn batch_indices(&self, order: &[usize], b: u64) -> Vec<usize> {
        let g = b as usize * self.cfg.world_size + self.cfg.rank;
        order[g * self.cfg.batch_size..(g + 1) * self.cfg.batch_size].to_vec()
    }

    /// Build one batch from record indices (each needed block decompressed once).
    pub fn make_batch(&self, epoch: u64, index: u64, idx: &[usize]) -> Result<LatentBatch> {
        make_batch(&self.ds, self.cfg.seed, epoch, index, idx)
    }

    /// The rest of the current epoch, prefetched in the background; advances the state as
    /// batches are taken. At the end of the epoch the state moves to the next epoch.
    pub fn epoch(&mut self) -> EpochIter<'_> {
        if self.state.batch as usize >= self.batches_per_epoch() {
            self.state = LoaderState {
                epoch: self.state.epoch + 1,
                batch: 0,
                group_bytes: self.ds.group_bytes(),
            };
        }
        let epoch = self.state.epoch;
        let (order, groups) = self.epoch_plan(epoch);
        let plan: Vec<(u64, Vec<usize>)> = (self.state.batch..self.batches_per_epoch() as u64)
            .map(|b| (b, self.batch_indices(&order, b)))
            .collect();
        let (tx, rx) = async_channel::bounded(self.cfg.prefetch.max(1));
        let ds = self.ds.clone();
        let seed = self.cfg.seed;
        let worker = std::thread::Builder::new()
            .name("lmd-loader".into())
            .spawn(move || {
                let mut cache = BlockCache::new(&ds, &plan);
                let mut shards = ShardWindow::new(ds.clone(), groups, &plan);
                for (i, (b, idx)) in plan.iter().enumerate() {
                    // a shard that cannot be fetched ends the epoch; a bad block costs its batch
                    if let Err(e) = shards.before(i) {
                        let _ = tx.send_blocking(Err(e));
                        return;
                    }
                    let batch = make_batch_cached(&ds, seed, epoch, *b, idx, &mut cache);
                    if tx.send_blocking(batch).is_err() {
                        return;
                    }
                    shards.after(i);
                }
            })
            .expect("spawn loader");
        EpochIter {
            loader: self,
            rx,
            worker: Some(worker),
        }
    }
}

/// Cut `shards` (in order) into consecutive groups of at most `group_bytes` streamed bytes
/// (at least one shard each); `group_bytes` 0: one group.
fn cut_groups(ds: &LatentDataset, shards: Vec<usize>, group_bytes: u64) -> Vec<Vec<usize>> {
    if group_bytes == 0 {
        return vec![shards];
    }
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0u64;
    for s in shards {
        let b = ds.streamed_bytes(s);
        match groups.last_mut() {
            Some(g) if bytes + b <= group_bytes => {
                g.push(s);
                bytes += b;
            }
            _ => {
                groups.push(vec![s]);
                bytes = b;
            }
        }
    }
    groups
}

/// The shard groups of a streamed epoch, held as the batches need them: group `g + 1` is
/// fetched in the background (thread `lmd-fetch`) while group `g` is read, and group `g` is let
/// go once no later batch needs it; so at most two groups (about the cache limit) are held, and
/// more only while one batch spans more than two. A dataset that is not streamed has one group
/// and nothing to fetch.
struct ShardWindow {
    ds: Arc<LatentDataset>,
    groups: Vec<Vec<usize>>,
    /// (lowest, highest) group each batch of the plan reads.
    span: Vec<(usize, usize)>,
    want: Option<async_channel::Sender<usize>>,
    done: async_channel::Receiver<(usize, Result<()>)>,
    fetcher: Option<std::thread::JoinHandle<()>>,
    /// Groups asked for: `0..asked`; fetched: `0..ready`; let go: `0..released`.
    asked: usize,
    ready: usize,
    released: usize,
}

impl ShardWindow {
    fn new(ds: Arc<LatentDataset>, groups: Vec<Vec<usize>>, plan: &[(u64, Vec<usize>)]) -> Self {
        let streamed = ds.group_bytes() > 0 || groups.len() > 1;
        let mut group_of = vec![0usize; ds.num_shards()];
        for (g, ss) in groups.iter().enumerate() {
            for &s in ss {
                group_of[s] = g;
            }
        }
        let span = plan
            .iter()
            .map(|(_, idx)| {
                idx.iter()
                    .filter_map(|&i| ds.locate(i).ok())
                    .map(|(s, _)| group_of[s])
                    .fold((usize::MAX, 0), |(lo, hi), g| (lo.min(g), hi.max(g)))
            })
            .collect();
        let (want_tx, want_rx) = async_channel::unbounded::<usize>();
        let (done_tx, done) = async_channel::unbounded();
        let fetcher = streamed.then(|| {
            let ds = ds.clone();
            let groups = groups.clone();
            std::thread::Builder::new()
                .name("lmd-fetch".into())
                .spawn(move || {
                    while let Ok(g) = want_rx.recv_blocking() {
                        let r = groups[g].iter().try_for_each(|&s| ds.reader(s).map(drop));
                        if done_tx.send_blocking((g, r)).is_err() {
                            return;
                        }
                    }
                })
                .expect("spawn fetcher")
        });
        let mut w = ShardWindow {
            ds,
            groups,
            span,
            want: Some(want_tx),
            done,
            fetcher,
            asked: 0,
            ready: 0,
            released: 0,
        };
        if w.fetcher.is_some() {
            // start with the groups before the first batch's, let go at once, and two ahead
            let first = w.span.first().map_or(0, |s| s.0);
            w.released = first.min(w.groups.len());
            w.asked = w.released;
            w.ready = w.released;
            w.ask(w.released + 2);
        } else {
            w.ready = w.groups.len();
        }
        w
    }

    /// Ask the fetcher for every group below `upto`.
    fn ask(&mut self, upto: usize) {
        let upto = upto.min(self.groups.len());
        while self.asked < upto {
            if let Some(tx) = &self.want {
                let _ = tx.send_blocking(self.asked);
            }
            self.asked += 1;
        }
    }

    /// Wait until the groups batch `i` reads are held.
    fn before(&mut self, i: usize) -> Result<()> {
        let hi = self.span[i].1;
        if hi < self.ready {
            return Ok(());
        }
        self.ask(hi + 1);
        while self.ready <= hi {
            match self.done.recv_blocking() {
                Ok((_, Ok(()))) => self.ready += 1,
                Ok((_, Err(e))) => return Err(e),
                Err(_) => {
                    return Err(Error::InvalidInput {
                        context: "LatentLoader".into(),
                        detail: "the shard fetcher stopped".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Let go of the groups no batch after `i` reads, and ask for the next ones.
    fn after(&mut self, i: usize) {
        if self.fetcher.is_none() {
            return;
        }
        let keep_from = self.span.get(i + 1).map_or(self.groups.len(), |s| s.0);
        while self.released < keep_from.min(self.ready) {
            for &s in &self.groups[self.released] {
                self.ds.release(s);
            }
            self.released += 1;
        }
        self.ask(self.released + 2);
    }
}

impl Drop for ShardWindow {
    fn drop(&mut self) {
        self.want = None;
        self.done.close();
        if let Some(f) = self.fetcher.take() {
            let _ = f.join();
        }
        if self.ds.group_bytes() > 0 {
            for s in self.ds.resident() {
                self.ds.release(s);
            }
        }
    }
}

/// Decompressed blocks kept from their first to their last use within an epoch, so each block
/// is decompressed once per epoch while memory stays bounded by the blocks a shuffle window
/// spans (the order is block-shuffled, then shuffled within windows).
struct BlockCache {
    /// (shard, block) -> index of the last batch that needs it.
    last_use: std::collections::HashMap<(usize, usize), u64>,
    live: std::collections::HashMap<(usize, usize), Arc<Vec<u8>>>,
}

impl BlockCache {
    fn new(ds: &LatentDataset, plan: &[(u64, Vec<usize>)]) -> Self {
        let mut last_use = std::collections::HashMap::new();
        for (b, idx) in plan {
            for &i in idx {
                if let Ok((s, r)) = ds.locate(i) {
                    if let Ok(k) = ds.block_of_record(s, r) {
                        last_use.insert((s, k), *b);
                    }
                }
            }
        }
        BlockCache {
            last_use,
            live: std::collections::HashMap::new(),
        }
    }

    fn get(&mut self, ds: &LatentDataset, key: (usize, usize)) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = self.live.get(&key) {
            return Ok(b.clone());
        }
        let b = ds.reader(key.0)?.block_bytes(key.1)?;
        if self.last_use.contains_key(&key) {
            self.live.insert(key, b.clone());
        }
        Ok(b)
    }

    /// Forget the blocks no batch after `batch` needs.
    fn release(&mut self, batch: u64) {
        let last = &self.last_use;
        self.live
            .retain(|k, _| last.get(k).is_some_and(|&l| l > batch));
    }
}

fn make_batch_cached(
    ds: &LatentDataset,
    seed: u64,
    epoch: u64,
    index: u64,
    idx: &[usize],
    cache: &mut BlockCache,
) -> Result<LatentBatch> {
    let b = build_batch(ds, seed, epoch, index, idx, &mut |key| cache.get(ds, key));
    cache.release(index);
    b
}

fn make_batch(
    ds: &LatentDataset,
    seed: u64,
    epoch: u64,
    index: u64,
    idx: &[usize],
) -> Result<LatentBatch> {
    build_batch(ds, seed, epoch, index, idx, &mut |(s, k)| {
        ds.reader(s)?.block_bytes(k)
    })
}

type BlockFetch<'a> = dyn FnMut((usize, usize)) -> Result<Arc<Vec<u8>>> + 'a;

fn build_batch(
    ds: &LatentDataset,
    seed: u64,
    epoch: u64,
    index: u64,
    idx: &[usize],
    fetch: &mut BlockFetch<'_>,
) -> Result<LatentBatch> {
    let meta = ds.meta();
    let [c, h, w] = meta.latent_shape;
    let te = c * h * w;
    let layout = &meta.layout;
    let scale = if meta.scaling.applied {
        1.0
    } else {
        meta.scaling.factor as f32
    };
    let posterior = layout.fields.contains(&Field::Mean) && layout.fields.contains(&Field::Logvar);
    let mut data = vec![0f32; idx.len() * te];
    let mut keys = vec![String::new(); idx.len()];
    let mut labels = vec![None; idx.len()];
    // Group by (shard, block) so each block is decompressed once.
    let mut loc: Vec<(usize, usize, usize, usize)> = Vec::with_capacity(idx.len());
    for (pos, &i) in idx.iter().enumerate() {
        let (s, r) = ds.locate(i)?;
        loc.push((s, ds.block_of_record(s, r)?, r, pos));
    }
    loc.sort_unstable();
    let rec_bytes = meta.record_bytes();
    let esz = meta.dtype.size();
    let mut tmp = vec![0f32; te];
    // ((shard, block), decompressed block, first record of the block)
    type Cached = ((usize, usize), Arc<Vec<u8>>, usize);
    let mut cur: Option<Cached> = None;
    let mut reader: Option<(usize, Arc<crate::shard::ShardReader>)> = None;
    for &(s, blk, r, pos) in &loc {
        if reader.as_ref().map(|x| x.0) != Some(s) {
            reader = Some((s, ds.reader(s)?));
        }
        let shard = &reader.as_ref().expect("set above").1;
        if cur.as_ref().map(|c| c.0) != Some((s, blk)) {
            let first = shard.block_ranges()[blk].0;
            cur = Some(((s, blk), fetch((s, blk))?, first));
        }
        let (_, bytes, first) = cur.as_ref().expect("set above");
        let rec = &bytes[(r - first) * rec_bytes..(r - first + 1) * rec_bytes];
        let gi = idx[pos] as u64;
        let mut rng = Rng::new(seed, epoch, gi.wrapping_add(1 << 40));
        let variant = rng.below(layout.variants());
        let tensor = |field: Field, out: &mut [f32]| -> Result<()> {
            let t = layout
                .tensor_index(
                    variant / if layout.flip { 2 } else { 1 },
                    layout.flip && variant % 2 == 1,
                    field,
                )
                .ok_or_else(|| Error::InvalidInput {
                    context: "LatentLoader".into(),
                    detail: format!("records have no {field:?}"),
                })?;
            meta.dtype
                .decode_to_f32(&rec[t * te * esz..(t + 1) * te * esz], out);
            Ok(())
        };
        let out = &mut data[pos * te..(pos + 1) * te];
        if posterior {
            tensor(Field::Mean, out)?;
            tensor(Field::Logvar, &mut tmp)?;
            for (o, lv) in out.iter_mut().zip(&tmp) {
                *o += (0.5 * lv).exp() * rng.normal();
            }
        } else {
            let field = layout.fields[0];
            tensor(field, out)?;
        }
        if scale != 1.0 {
            out.iter_mut().for_each(|v| *v *= scale);
        }
        keys[pos] = shard.key(r)?.to_string();
        labels[pos] = shard.label(r)?;
    }
    Ok(LatentBatch {
        epoch,
        index,
        keys,
        labels,
        data,
        shape: [idx.len(), c, h, w],
    })
}

/// The remaining batches of one epoch (see [`LatentLoader::epoch`]).
pub struct EpochIter<'a> {
    loader: &'a mut LatentLoader,
    rx: async_channel::Receiver<Result<LatentBatch>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl EpochIter<'_> {
    /// The loader state after the batches taken so far.
    pub fn state(&self) -> LoaderState {
        self.loader.state
    }
}

impl Iterator for EpochIter<'_> {
    type Item = Result<LatentBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        let b = self.rx.recv_blocking().ok()?;
        if let Ok(batch) = &b {
            self.loader.state = LoaderState {
                epoch: batch.epoch,
                batch: batch.index + 1,
                group_bytes: self.loader.state.group_bytes,
            };
        }
        Some(b)
    }
}

impl Drop for EpochIter<'_> {
    fn drop(&mut self) {
        self.rx.close();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
