//! `lmd-bench loader`: the latent loader against a sequential decode of the same shards.

use super::tempfile_dir;
use crate::{Error, Result};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `lmd-bench loader`.
#[derive(Debug, Clone)]
pub struct LoaderBenchOptions {
    /// Latent dataset directories; empty: a synthetic 4x28x28 f16 dataset of `records`.
    pub data: Vec<PathBuf>,
    pub records: usize,
    pub batch: usize,
    pub window: usize,
    /// Minimum seconds timed for the loader alone.
    pub seconds: f64,
    /// Then train this many steps of `preset` on the same data and report the trainer's
    /// consumption and data-wait fraction (0: skip).
    pub train_steps: u64,
    pub preset: lmd_model::Preset,
}

impl Default for LoaderBenchOptions {
    fn default() -> Self {
        LoaderBenchOptions {
            data: vec![],
            records: 4096,
            batch: 64,
            window: 8192,
            seconds: 5.0,
            train_steps: 0,
            preset: lmd_model::Preset::Tiny,
        }
    }
}

/// Run `lmd-bench loader`: the latent loader alone (batches/s, GB/s of f32 latents handed out),
/// against a sequential decode of the same shards (the baseline), and optionally beside the
/// trainer's consumption on the same data.
pub fn loader(opts: &LoaderBenchOptions, mut emit: impl FnMut(serde_json::Value)) -> Result<()> {
    use lmd_data::loader::{LatentLoader, LoaderConfig};
    let scratch = tempfile_dir()?;
    let (data, source) = if opts.data.is_empty() {
        let d = scratch.join("synthetic");
        lmd_data::synthetic::write_dataset(
            &d,
            &lmd_data::synthetic::SyntheticSpec {
                records: opts.records,
                latent_shape: [4, 28, 28],
                records_per_shard: 2048,
                ..Default::default()
            },
        )?;
        (vec![d], "synthetic 4x28x28 f16")
    } else {
        (opts.data.clone(), "given")
    };
    // opening includes fetching a remote dataset into the cache ($LMD_CACHE_DIR)
    let t_open = Instant::now();
    let ds = std::sync::Arc::new(crate::train::open_data(&data)?);
    let open_s = t_open.elapsed().as_secs_f64();
    let rec_f32_bytes = ds.meta().tensor_elems() * 4;
    let mut file_bytes = 0u64;
    ds.for_each_shard(|s| {
        file_bytes += s.file_bytes();
        Ok(())
    })?;

    // baseline: every record decoded in file order
    let t0 = Instant::now();
    let mut n_seq = 0usize;
    while t0.elapsed().as_secs_f64() < opts.seconds / 2.0 || n_seq == 0 {
        ds.for_each_shard(|s| {
            for r in s.iter() {
                std::hint::black_box(r?);
                n_seq += 1;
            }
            Ok(())
        })?;
    }
    let seq_rps = n_seq as f64 / t0.elapsed().as_secs_f64();

    let mut loader = LatentLoader::new(
        ds.clone(),
        LoaderConfig {
            batch_size: opts.batch,
            window: opts.window,
            ..Default::default()
        },
    )?;
    let t0 = Instant::now();
    let mut batches = 0usize;
    while t0.elapsed().as_secs_f64() < opts.seconds || batches == 0 {
        for b in loader.epoch() {
            std::hint::black_box(b?);
            batches += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let samples_per_s = (batches * opts.batch) as f64 / secs;
    emit(json!({
        "bench": "loader", "source": source, "records": ds.len(), "latent_shape": ds.meta().latent_shape,
        "dtype": ds.meta().dtype, "batch": opts.batch, "window": opts.window,
        "batches_per_s": batches as f64 / secs, "samples_per_s": samples_per_s,
        "gb_per_s": samples_per_s * rec_f32_bytes as f64 / 1e9,
        "file_mb_per_s": samples_per_s * (file_bytes as f64 / ds.len() as f64) / 1e6,
        "sequential_records_per_s": seq_rps, "ratio_vs_sequential": samples_per_s / seq_rps,
        "open_s": open_s,
    }));

    if opts.train_steps > 0 {
        let cfg = crate::train::TrainConfig {
            preset: opts.preset,
            data: data.clone(),
            out: scratch.join("run"),
            steps: opts.train_steps,
            batch_size: opts.batch,
            window: opts.window,
            warmup_steps: 1,
            checkpoint_every: u64::MAX,
            run: crate::RunSettings {
                log_every: opts.train_steps,
                ..Default::default()
            },
            preview_samples: 0,
            ..Default::default()
        };
        let mut last = None;
        crate::train::run(&cfg, false, &mut |m| last = Some(m.clone()))?;
        let m = last.ok_or_else(|| Error::Invalid("no training metrics".into()))?;
        emit(json!({
            "bench": "loader-vs-trainer", "preset": opts.preset, "batch": opts.batch, "steps": opts.train_steps,
            "trainer_samples_per_s": m.samples_per_s, "loader_samples_per_s": samples_per_s,
            "loader_headroom": samples_per_s / m.samples_per_s, "data_wait_fraction": m.data_wait_fraction,
        }));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
