//! `lmd-bench python-reader`: the Python package `lmd_latents` (python/) reading a dataset
//! sequentially, beside the Rust reader on the same shards in the same invocation.
//!
//! Both sides do the same work per block: verify its XXH3 checksum, decompress and undo the
//! byte planes, giving the stored elements (the figure `lmd-bench shards` calls
//! `sequential_read`); then the same plus the conversion to f32. Figures: GB/s of each (best of
//! `repeat` passes, page cache warm) and the ratios Python / Rust.

use crate::{Error, Result};
use lmd_data::shard::{Manifest, ShardReader, ShardWriter, WriterOptions};
use lmd_data::DType;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct PythonReaderBenchOptions {
    /// A latent dataset directory; None: a synthetic f16 4x28x28 one (real TAESD latents from
    /// `shared` when present) of `records` records.
    pub data: Option<PathBuf>,
    pub records: usize,
    pub shared: Option<PathBuf>,
    /// The `python3` to run.
    pub python: String,
    /// The package's folder (put on PYTHONPATH; the installed package is used if it is absent).
    pub package_dir: PathBuf,
    pub repeat: usize,
}

pub fn python_reader(
    o: &PythonReaderBenchOptions,
    mut emit: impl FnMut(serde_json::Value),
) -> Result<()> {
    let tmp;
    let dir = match &o.data {
        Some(d) => d.clone(),
        None => {
            tmp = tempdir_path();
            write_synthetic(&tmp, o)?;
            tmp.clone()
        }
    };
    let dirs = crate::train::open_data(std::slice::from_ref(&dir))?;
    let shards: Vec<std::sync::Arc<ShardReader>> = (0..dirs.num_shards())
        .map(|s| dirs.reader(s))
        .collect::<lmd_data::Result<_>>()?;
    // Rust: sequential, block by block: stored elements, then also converted to f32
    let (mut raw, mut scratch, mut f32s) = (Vec::new(), Vec::new(), Vec::new());
    let mut pass = |convert: bool| -> Result<(usize, f64)> {
        let mut best = f64::INFINITY;
        let mut bytes = 0usize;
        for _ in 0..o.repeat.max(1) + 1 {
            let t0 = Instant::now();
            bytes = 0;
            for r in &shards {
                let dt = r.meta().dtype;
                for k in 0..r.num_blocks() {
                    r.read_block_into(k, &mut raw, &mut scratch)?;
                    if convert {
                        f32s.resize(raw.len() / dt.size(), 0f32);
                        dt.decode_to_f32(&raw, &mut f32s);
                        bytes += f32s.len() * 4;
                        std::hint::black_box(&f32s);
                    } else {
                        bytes += raw.len();
                        std::hint::black_box(&raw);
                    }
                }
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok((bytes, best))
    };
    let (stored, stored_s) = pass(false)?;
    let (bytes, best) = pass(true)?;
    let rust_stored_gbs = stored as f64 / stored_s / 1e9;
    let rust_gbs = bytes as f64 / best / 1e9;
    // Python, same shards
    let mut cmd = std::process::Command::new(&o.python);
    cmd.args(["-m", "lmd_latents"])
        .arg(&dir)
        .args(["--bench", "--repeat"])
        .arg(o.repeat.max(1).to_string());
    if o.package_dir.join("lmd_latents").is_dir() {
        cmd.env("PYTHONPATH", &o.package_dir);
    }
    let out = cmd
        .output()
        .map_err(|e| Error::Invalid(format!("cannot run {}: {e}", o.python)))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "{} -m lmd_latents --bench failed: {}",
            o.python,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let py: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Invalid(format!("lmd_latents --bench printed no JSON: {e}")))?;
    let py_gbs = py["gb_per_s"].as_f64().unwrap_or(0.0);
    let py_stored_gbs = py["stored_gb_per_s"].as_f64().unwrap_or(0.0);
    if py["f32_bytes"].as_u64() != Some(bytes as u64) {
        return Err(Error::Invalid(format!(
            "Python read {} f32 bytes, Rust {bytes}",
            py["f32_bytes"]
        )));
    }
    emit(json!({
        "bench": "python_reader", "records": dirs.len(), "dtype": dirs.meta().dtype.name(),
        "stored_bytes": stored, "rust_stored_gb_per_s": rust_stored_gbs,
        "python_stored_gb_per_s": py_stored_gbs, "python_vs_rust_stored": py_stored_gbs / rust_stored_gbs,
        "f32_bytes": bytes, "rust_f32_gb_per_s": rust_gbs, "python_f32_gb_per_s": py_gbs,
        "python_vs_rust_f32": py_gbs / rust_gbs, "threads": 1, "data": dir,
    }));
    if o.data.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn tempdir_path() -> PathBuf {
    std::env::temp_dir().join(format!("lmd-bench-py-{}", std::process::id()))
}

fn write_synthetic(dir: &PathBuf, o: &PythonReaderBenchOptions) -> Result<()> {
    let (lat, shape, source) = crate::bench::source_latents(o.shared.as_ref())?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create", e))?;
    let mut meta = crate::bench::bench_meta(DType::F16, shape);
    meta.writer = format!("lmd-bench python-reader ({source})");
    let mut manifest = Manifest::new(meta.clone());
    let per_shard = 2048;
    let mut i = 0;
    let mut s = 0;
    while i < o.records {
        let mut w = ShardWriter::create(
            dir.join(format!("shard-{s:06}.lmds")),
            meta.clone(),
            WriterOptions::default(),
        )?;
        for _ in 0..per_shard.min(o.records - i) {
            w.push_f32(
                &format!("k{i:08}"),
                Some((i % 10) as i64),
                &lat[i % lat.len()],
            )?;
            i += 1;
        }
        let wm = w.meta().clone();
        manifest.add(&w.finish()?, &wm)?;
        s += 1;
    }
    manifest.save(dir)?;
    Ok(())
}
