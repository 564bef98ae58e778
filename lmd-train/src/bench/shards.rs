//! `lmd-bench shards`: the shard format's size and speed on real (or synthetic) latents.

use crate::testvectors;
use crate::{Error, Result};
use lmd_data::shard::{RecordLayout, ShardMeta, ShardReader, ShardWriter, WriterOptions};
use lmd_data::DType;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `lmd-bench shards`.
#[derive(Debug, Clone)]
pub struct ShardBenchOptions {
    /// Records in the benchmark shard.
    pub records: usize,
    /// Random `get` calls to time.
    pub random_gets: usize,
    /// Where `testvectors/taesd_*.safetensors` is looked for (`$LMD_SHARED` by default).
    pub shared: Option<PathBuf>,
    /// Scratch directory for the shard files (a temp dir by default).
    pub workdir: Option<PathBuf>,
}

impl Default for ShardBenchOptions {
    fn default() -> Self {
        ShardBenchOptions {
            records: 16384,
            random_gets: 4000,
            shared: testvectors::shared_dir(),
            workdir: None,
        }
    }
}

/// Distinct real latents (f32, 4x28x28 each) and where they came from; synthetic smooth
/// random fields when the reference file is absent.
pub(crate) fn source_latents(
    shared: Option<&PathBuf>,
) -> Result<(Vec<Vec<f32>>, [usize; 3], String)> {
    if let Some(dir) = shared {
        let p = dir.join("testvectors/taesd_imagenette_val16.safetensors");
        if p.exists() {
            let t = testvectors::read_f32(&p, "latents")?;
            if t.shape.len() != 4 {
                return Err(Error::Tensors {
                    path: p,
                    detail: format!("latents shape {:?}, expected [N,C,H,W]", t.shape),
                });
            }
            let shape = [t.shape[1], t.shape[2], t.shape[3]];
            let n: usize = shape.iter().product();
            let lat = t.data.chunks_exact(n).map(|c| c.to_vec()).collect();
            return Ok((
                lat,
                shape,
                format!("real: {} (TAESD latents of imagenette val)", p.display()),
            ));
        }
    }
    // Deterministic pseudo-latents: sums of random sinusoids plus noise (an LCG, no deps).
    let shape = [4, 28, 28];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) as f32 - 0.5
    };
    let mut lat = Vec::new();
    for _ in 0..16 {
        let mut v = vec![0f32; 4 * 28 * 28];
        for c in 0..4 {
            let (a, b, ph) = (rnd() * 0.6, rnd() * 0.6, rnd() * 6.0);
            for y in 0..28 {
                for x in 0..28 {
                    v[c * 784 + y * 28 + x] =
                        2.0 * ((a * x as f32 + b * y as f32 + ph).sin()) + 0.5 * rnd();
                }
            }
        }
        lat.push(v);
    }
    Ok((lat, shape, "synthetic (LMD_SHARED not set)".into()))
}

/// The read figures of `lmd-bench shards` on the f16 shard at `path` (`n` records of `elems`
/// values, blocks of `per_block`): sequential blocks against memcpy, sequential records as
/// f32, random gets.
fn read_figures(
    path: &std::path::Path,
    n: usize,
    elems: usize,
    per_block: usize,
    random_gets: usize,
    emit: &mut impl FnMut(serde_json::Value),
) -> Result<()> {
    let r = ShardReader::open(path)?;
    let raw_bytes = (n * elems * 2) as f64;
    // Warm the page cache so both sides read memory, not disk.
    let _ = r.verify();

    // Baseline: a plain memcpy of the same decompressed bytes (one buffer of the whole size,
    // so it is bound by memory like the real read, not by cache).
    let src = vec![1u8; n * r.meta().record_bytes()];
    let mut dst = vec![0u8; src.len()];
    dst.copy_from_slice(&src); // fault the pages in first
    let t0 = Instant::now();
    dst.copy_from_slice(&src);
    std::hint::black_box(&mut dst);
    let memcpy_s = t0.elapsed().as_secs_f64();
    drop((src, dst));

    // Sequential read + checksum + decompress + unshuffle, block by block (raw f16 bytes).
    let (mut out, mut scratch) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    let mut sum = 0u64;
    for k in 0..r.num_blocks() {
        r.read_block_into(k, &mut out, &mut scratch)?;
        sum = sum.wrapping_add(out[out.len() / 2] as u64);
    }
    std::hint::black_box(sum);
    let seq_s = t0.elapsed().as_secs_f64();
    emit(
        json!({"bench": "shards", "figure": "sequential_read", "dtype": "f16", "records": n,
        "records_per_s": n as f64 / seq_s, "gb_per_s": raw_bytes / seq_s / 1e9,
        "memcpy_gb_per_s": raw_bytes / memcpy_s / 1e9, "ratio_vs_memcpy": memcpy_s / seq_s, "threads": 1}),
    );

    // Sequential records as f32 (what a loader hands on).
    let t0 = Instant::now();
    let mut count = 0usize;
    for rec in r.iter() {
        let rec = rec?;
        count += 1;
        std::hint::black_box(&rec.data);
    }
    let it_s = t0.elapsed().as_secs_f64();
    emit(
        json!({"bench": "shards", "figure": "sequential_iter_f32", "dtype": "f16", "records": count,
        "records_per_s": count as f64 / it_s, "gb_per_s_f16": raw_bytes / it_s / 1e9, "threads": 1}),
    );

    // Random access: each get decompresses its block (a cache miss nearly always).
    let mut state = 12345u64;
    let t0 = Instant::now();
    for _ in 0..random_gets {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (state >> 33) as usize % n;
        std::hint::black_box(r.get(i)?);
    }
    let rnd_s = t0.elapsed().as_secs_f64();
    emit(
        json!({"bench": "shards", "figure": "random_get", "dtype": "f16", "gets": random_gets,
        "records_per_s": random_gets as f64 / rnd_s, "records_per_block": per_block, "threads": 1}),
    );
    Ok(())
}

/// A shard of `n` records cycling through the distinct latents `lat`, in blocks of
/// `lat.len()` records (so no block holds one latent twice).
fn write_cycled(
    path: &std::path::Path,
    dtype: DType,
    shape: [usize; 3],
    byte_shuffle: bool,
    lat: &[Vec<f32>],
    n: usize,
) -> Result<lmd_data::shard::writer::ShardInfo> {
    let mut w = ShardWriter::create(
        path,
        bench_meta(dtype, shape),
        WriterOptions {
            records_per_block: Some(lat.len()),
            byte_shuffle,
            ..Default::default()
        },
    )?;
    for i in 0..n {
        w.push_f32(
            &format!("k{i:08}"),
            Some((i % 10) as i64),
            &lat[i % lat.len()],
        )?;
    }
    Ok(w.finish()?)
}

pub(crate) fn bench_meta(dtype: DType, shape: [usize; 3]) -> ShardMeta {
    lmd_data::synthetic::taesd_like_meta(
        dtype,
        RecordLayout::single(),
        shape,
        &format!("lmd-bench {}", env!("CARGO_PKG_VERSION")),
    )
}

/// Run `lmd-bench shards`; returns the JSON lines (also meant to be printed as they are).
pub fn shards(opts: &ShardBenchOptions, mut emit: impl FnMut(serde_json::Value)) -> Result<()> {
    let (lat, shape, source) = source_latents(opts.shared.as_ref())?;
    let distinct = lat.len();
    let tmp;
    let dir = match &opts.workdir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("lmd-bench-{}", std::process::id()));
            tmp
        }
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create", e))?;
    let elems: usize = shape.iter().product();

    // Compression: every block holds the distinct latents once (records_per_block = distinct),
    // so no block can compress one latent against a copy of itself.
    for (dtype, shuffle) in [
        (DType::F32, false),
        (DType::F32, true),
        (DType::BF16, false),
        (DType::BF16, true),
        (DType::F16, false),
        (DType::F16, true),
    ] {
        let path = dir.join(format!("size-{dtype}-{shuffle}.lmds"));
        let n = distinct * 8;
        let info = write_cycled(&path, dtype, shape, shuffle, &lat, n)?;
        let bpr = info.bytes as f64 / n as f64;
        emit(json!({
            "bench": "shards", "figure": "bytes_per_record", "dtype": dtype.name(), "byte_shuffle": shuffle,
            "bytes_per_record": bpr, "raw_f32_bytes_per_record": elems * 4,
            "ratio_vs_f32": bpr / (elems * 4) as f64, "records_per_block": distinct, "source": source,
        }));
        let _ = std::fs::remove_file(&path);
    }

    // Throughput shard: f16 + shuffle, blocks of `distinct` records.
    let path = dir.join("throughput-f16.lmds");
    let n = opts.records.max(distinct);
    let t0 = Instant::now();
    let info = write_cycled(&path, DType::F16, shape, true, &lat, n)?;
    let write_s = t0.elapsed().as_secs_f64();
    emit(
        json!({"bench": "shards", "figure": "write", "dtype": "f16", "records": n,
        "records_per_s": n as f64 / write_s, "file_bytes": info.bytes}),
    );

    read_figures(&path, n, elems, distinct, opts.random_gets, &mut emit)?;
    let _ = std::fs::remove_file(&path);
    if opts.workdir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
