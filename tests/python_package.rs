//! The Python package `python/lmd_latents` against data written by the Rust writer and samples
//! drawn by the Rust loader: this test writes the fixtures (a two-worker f16 dataset; a bf16
//! posterior dataset with views, flips and unapplied scaling; a corrupt and a truncated shard),
//! dumps what `LatentLoader` gives for epochs 0 and 1, and runs `python3 -m unittest` in
//! `python/tests` on them (numpy only; the torch wrappers too where torch imports).
//!
//! Needs `python3` with numpy, zstandard and xxhash: `#[ignore]`d, CI runs them with
//! `--include-ignored` after installing those.

use lmd_train::data::loader::{LatentLoader, LoaderConfig};
use lmd_train::data::shard::{
    Field, LatentDataset, Manifest, RecordLayout, Scaling, ShardMeta, ShardWriter, WriterOptions,
};
use lmd_train::data::DType;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

mod common;

fn meta(dtype: DType, layout: RecordLayout, scaling: Scaling) -> ShardMeta {
    common::shard_meta(dtype, layout, [4, 3, 5], scaling)
}

/// The stored values of record `r` (the Python tests recompute them: keep in step).
fn values(r: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|j| ((j as f32 * 0.37 + r as f32).sin() * 2.5) + (j % 7) as f32 * 0.01 - 0.5)
        .collect()
}

fn write_dataset(dir: &Path, m: &ShardMeta, shards: usize, per: usize, first: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut manifest = Manifest::new(m.clone());
    for s in 0..shards {
        let mut w = ShardWriter::create(
            dir.join(format!("shard-{s:06}.lmds")),
            m.clone(),
            WriterOptions {
                records_per_block: Some(4),
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..per {
            let r = first + s * per + i;
            w.push_f32(
                &format!("rec-{r:04}"),
                Some((r % 10) as i64),
                &values(r, m.record_elems()),
            )
            .unwrap();
        }
        let wm = w.meta().clone();
        manifest.add(&w.finish().unwrap(), &wm).unwrap();
    }
    manifest.save(dir).unwrap();
}

/// What the Rust loader gives for every record in `epoch`: key -> f32 values.
fn loader_samples(dirs: &[PathBuf], seed: u64, epoch: u64) -> serde_json::Value {
    let ds = Arc::new(LatentDataset::open_many(dirs).unwrap());
    let n = ds.len();
    let loader = LatentLoader::new(
        ds,
        LoaderConfig {
            batch_size: n,
            seed,
            ..Default::default()
        },
    )
    .unwrap();
    let idx: Vec<usize> = (0..n).collect();
    let b = loader.make_batch(epoch, 0, &idx).unwrap();
    let per = b.data.len() / n;
    let mut m = serde_json::Map::new();
    for (i, k) in b.keys.iter().enumerate() {
        m.insert(k.clone(), serde_json::json!(b.data[i * per..(i + 1) * per]));
    }
    serde_json::Value::Object(m)
}

#[test]
#[ignore = "needs python3 with numpy, zstandard, xxhash"]
fn python_package_reads_rust_shards_and_draws_the_loaders_samples() {
    common::require_python("numpy, zstandard, xxhash");
    let root = common::repo_root();
    let dir = tempfile::tempdir().unwrap();
    let fx = dir.path();
    let applied = Scaling {
        factor: 1.0,
        applied: true,
    };
    // 1. two precompute workers, f16 latents
    let plain = meta(
        DType::F16,
        RecordLayout {
            fields: vec![Field::Latent],
            views: 1,
            flip: false,
        },
        applied.clone(),
    );
    write_dataset(&fx.join("plain/worker-0-of-2"), &plain, 2, 5, 0);
    write_dataset(&fx.join("plain/worker-1-of-2"), &plain, 1, 7, 10);
    // 2. bf16 posterior records, 2 views x flip, scaling applied by the reader
    let post = meta(
        DType::BF16,
        RecordLayout {
            fields: vec![Field::Mean, Field::Logvar],
            views: 2,
            flip: true,
        },
        Scaling {
            factor: 0.18215,
            applied: false,
        },
    );
    write_dataset(&fx.join("posterior"), &post, 2, 6, 100);
    let mut expected = serde_json::Map::new();
    for (name, dirs) in [
        (
            "plain",
            vec![
                fx.join("plain/worker-0-of-2"),
                fx.join("plain/worker-1-of-2"),
            ],
        ),
        ("posterior", vec![fx.join("posterior")]),
    ] {
        for epoch in [0u64, 1] {
            expected.insert(
                format!("{name}-seed7-epoch{epoch}"),
                loader_samples(&dirs, 7, epoch),
            );
        }
    }
    std::fs::write(
        fx.join("expected.json"),
        serde_json::to_vec(&serde_json::Value::Object(expected)).unwrap(),
    )
    .unwrap();
    // 3. a corrupt block and a truncated shard
    write_dataset(&fx.join("corrupt"), &plain, 1, 9, 0);
    let shard = fx.join("corrupt/shard-000000.lmds");
    let mut bytes = std::fs::read(&shard).unwrap();
    // a byte in the middle of the file: inside a block (the index is at the end)
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&shard, &bytes).unwrap();
    write_dataset(&fx.join("truncated"), &plain, 1, 9, 0);
    let t = fx.join("truncated/shard-000000.lmds");
    let b = std::fs::read(&t).unwrap();
    std::fs::write(&t, &b[..b.len() - 20]).unwrap();

    let out = Command::new("python3")
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(root.join("python/tests"))
        .env("PYTHONPATH", root.join("python"))
        .env("LMD_PY_FIXTURES", fx)
        .env("LMD_README", root.join("README.md"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    eprintln!("{log}");
    assert!(out.status.success(), "python tests failed");
    assert!(log.contains("OK"), "{log}");
}

#[test]
#[ignore = "needs python3 with numpy, zstandard, xxhash"]
fn bench_python_reader_prints_both_readers_and_the_ratios() {
    common::require_python("numpy, zstandard, xxhash");
    let root = common::repo_root();
    let out = Command::new(env!("CARGO_BIN_EXE_lmd-bench"))
        .args([
            "python-reader",
            "--records",
            "600",
            "--repeat",
            "1",
            "--package-dir",
        ])
        .arg(root.join("python"))
        .env_remove("LMD_SHARED")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["records"], 600);
    assert_eq!(v["stored_bytes"], 600 * 4 * 28 * 28 * 2);
    for k in [
        "rust_stored_gb_per_s",
        "python_stored_gb_per_s",
        "python_vs_rust_stored",
        "python_vs_rust_f32",
    ] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
    }
}
