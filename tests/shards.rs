//! Workspace integration tests of the shard tools: `lmd-inspect`, `lmd-bench shards`, and the
//! Python reader `tools/lmd_shard.py` against shards written by the Rust writer.
//!
//! Python tests need `python3` with numpy and zstandard: they are `#[ignore]`d and fail without
//! them; CI installs both and runs them with `--include-ignored`.

use lmd_train::data::shard::{
    Field, Manifest, RecordLayout, Scaling, ShardMeta, ShardWriter, WriterOptions,
};
use lmd_train::data::DType;
use std::path::Path;
use std::process::Command;

mod common;

fn meta(dtype: DType, layout: RecordLayout, shape: [usize; 3]) -> ShardMeta {
    common::shard_meta(
        dtype,
        layout,
        shape,
        Scaling {
            factor: 1.0,
            applied: true,
        },
    )
}

fn values(record: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|j| ((j as f32 * 0.37 + record as f32).sin() * 2.5) + (j % 7) as f32 * 0.01)
        .collect()
}

/// Write a dataset dir with `shards` shards of `per` records; returns all (key, label, values).
fn write_dataset(
    dir: &Path,
    m: &ShardMeta,
    shards: usize,
    per: usize,
) -> Vec<(String, i64, Vec<f32>)> {
    let mut manifest = Manifest::new(m.clone());
    let mut all = Vec::new();
    for s in 0..shards {
        let path = dir.join(format!("shard-{s:06}.lmds"));
        let mut w = ShardWriter::create(
            &path,
            m.clone(),
            WriterOptions {
                records_per_block: Some(4),
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..per {
            let key = format!("n01440764_{s}_{i}");
            let label = ((s * per + i) % 10) as i64;
            let v = values(s * per + i, m.record_elems());
            w.push_f32(&key, Some(label), &v).unwrap();
            all.push((key, label, v));
        }
        let wm = w.meta().clone();
        let info = w.finish().unwrap();
        manifest.add(&info, &wm).unwrap();
    }
    manifest.save(dir).unwrap();
    all
}

fn inspect(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lmd-inspect"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_summarises_and_verifies_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let m = meta(DType::F16, RecordLayout::single(), [4, 28, 28]);
    write_dataset(dir.path(), &m, 2, 10);
    let d = dir.path().to_str().unwrap();

    let (code, out, err) = inspect(&[d, "--json"]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["records"], 20);
    assert_eq!(j["shards"], 2);
    assert_eq!(j["kind"], "dataset");
    assert_eq!(j["latent_shape"], serde_json::json!([4, 28, 28]));
    assert_eq!(j["dtype"], "f16");
    assert_eq!(j["vae"]["name"], "taesd");
    assert_eq!(j["vae"]["weights"][0]["sha256"], "5f".repeat(32));
    assert_eq!(j["classes"], 10);
    let bytes: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "lmds"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(j["bytes"], bytes);

    let (code, out, _) = inspect(&[d, "--verify"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("records      20 in 2 shard(s)") && out.contains("verify       OK"),
        "{out}"
    );

    // One flipped byte inside block 1 of shard 1: --verify fails and names shard and block.
    let victim = dir.path().join("shard-000001.lmds");
    let mut b = std::fs::read(&victim).unwrap();
    let meta_len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let b0 = 24 + meta_len;
    let b1 = b0 + 32 + u32::from_le_bytes(b[b0 + 16..b0 + 20].try_into().unwrap()) as usize;
    b[b1 + 32 + 3] ^= 0x40;
    std::fs::write(&victim, b).unwrap();
    let (code, _out, err) = inspect(&[d, "--verify"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("shard-000001.lmds") && err.contains("block 1"),
        "{err}"
    );
    // Without --verify the summary still works (blocks are not read).
    let (code, _, _) = inspect(&[d]);
    assert_eq!(code, 0);
    // A single shard file, and a path that is not a shard.
    let (code, out, _) = inspect(&[
        dir.path().join("shard-000000.lmds").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("\"kind\":\"shard\""));
    let (code, _, err) = inspect(&[dir.path().join("index.json").to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("index.json") && err.contains("not an lmd latent shard"),
        "{err}"
    );
}

#[test]
fn bench_shards_prints_every_figure() {
    let out = Command::new(env!("CARGO_BIN_EXE_lmd-bench"))
        .args(["shards", "--records", "64", "--random-gets", "20"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for f in [
        "bytes_per_record",
        "write",
        "sequential_read",
        "sequential_iter_f32",
        "random_get",
    ] {
        assert!(
            figures.iter().any(|j| j["figure"] == f),
            "missing figure {f}"
        );
    }
    let seq = figures
        .iter()
        .find(|j| j["figure"] == "sequential_read")
        .unwrap();
    assert!(
        seq["gb_per_s"].as_f64().unwrap() > 0.0 && seq["memcpy_gb_per_s"].as_f64().unwrap() > 0.0
    );
}

use common::repo_root;

/// Run tools/lmd_shard.py on `shard`, dumping latents as f32, labels and keys to `out_dir`.
fn python_dump(
    shard: &Path,
    out_dir: &Path,
) -> (Vec<f32>, Vec<i64>, Vec<String>, serde_json::Value) {
    let script = format!(
        "import sys, json, numpy as np; sys.path.insert(0, {tools:?}); import lmd_shard\n\
         d = lmd_shard.read({shard:?})\n\
         d['latents'].astype(np.float32).tofile({o:?} + '/lat.bin')\n\
         d['labels'].astype('<i8').tofile({o:?} + '/lab.bin')\n\
         json.dump({{'keys': d['keys'], 'meta': d['meta'], 'shape': list(d['latents'].shape)}}, open({o:?} + '/k.json', 'w'))\n",
        tools = repo_root().join("tools").to_str().unwrap(),
        shard = shard.to_str().unwrap(),
        o = out_dir.to_str().unwrap()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lat = std::fs::read(out_dir.join("lat.bin")).unwrap();
    let lat: Vec<f32> = lat
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let lab = std::fs::read(out_dir.join("lab.bin")).unwrap();
    let lab: Vec<i64> = lab
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let k: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("k.json")).unwrap()).unwrap();
    let keys = k["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    (lat, lab, keys, k)
}

#[test]
#[ignore = "needs python3 with numpy, zstandard"]
fn python_reader_matches_rust_exactly() {
    common::require_python("numpy, zstandard");
    let layout = RecordLayout {
        fields: vec![Field::Mean, Field::Logvar],
        views: 2,
        flip: true,
    };
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for shuffle in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut m = meta(dtype, layout.clone(), [4, 6, 5]);
            m.byte_shuffle = shuffle;
            let path = dir.path().join("py.lmds");
            let mut w = ShardWriter::create(
                &path,
                m.clone(),
                WriterOptions {
                    records_per_block: Some(3),
                    byte_shuffle: shuffle,
                    ..Default::default()
                },
            )
            .unwrap();
            for i in 0..11 {
                w.push_f32(
                    &format!("ключ-{i}"),
                    Some(i as i64 - 5),
                    &values(i, m.record_elems()),
                )
                .unwrap();
            }
            w.finish().unwrap();
            let r = lmd_train::data::shard::ShardReader::open(&path).unwrap();
            let (lat, lab, keys, k) = python_dump(&path, dir.path());
            assert_eq!(k["shape"], serde_json::json!([11, 8, 4, 6, 5]));
            assert_eq!(k["meta"]["dtype"], dtype.name());
            let rust: Vec<f32> = r.iter().flat_map(|x| x.unwrap().data).collect();
            assert_eq!(
                rust.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                lat.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{dtype} shuffle={shuffle}"
            );
            assert_eq!(lab, (0..11).map(|i| i - 5).collect::<Vec<i64>>());
            assert_eq!(
                keys,
                (0..11).map(|i| format!("ключ-{i}")).collect::<Vec<_>>()
            );
        }
    }
}

/// Real TAESD latents (PyTorch reference file) through the writer, back through both readers.
#[test]
#[ignore = "needs LMD_SHARED"]
fn real_latents_roundtrip_through_rust_and_python() {
    let shared = lmd_train::testvectors::shared_dir()
        .expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let p = shared.join("testvectors/taesd_imagenette_val16.safetensors");
    let t = lmd_train::testvectors::read_f32(&p, "latents").unwrap();
    assert_eq!(t.shape, vec![16, 4, 28, 28]);
    let dir = tempfile::tempdir().unwrap();
    let m = meta(DType::F16, RecordLayout::single(), [4, 28, 28]);
    let path = dir.path().join("real.lmds");
    let mut w = ShardWriter::create(&path, m, WriterOptions::default()).unwrap();
    for (i, lat) in t.data.chunks_exact(4 * 28 * 28).enumerate() {
        w.push_f32(&format!("val_{i:02}"), Some(i as i64 % 10), lat)
            .unwrap();
    }
    let info = w.finish().unwrap();
    // f16 + byte planes + zstd: at most 0.45x the raw f32 bytes even for a single 16-record shard
    let f32_bytes = (16 * 4 * 28 * 28 * 4) as f64;
    assert!(
        (info.bytes as f64) < 0.45 * f32_bytes,
        "{} bytes",
        info.bytes
    );
    let r = lmd_train::data::shard::ShardReader::open(&path).unwrap();
    let back: Vec<f32> = r.iter().flat_map(|x| x.unwrap().data).collect();
    for (a, b) in t.data.iter().zip(&back) {
        assert_eq!(half_round(*a), *b);
    }
    common::require_python("numpy, zstandard");
    {
        let (lat, _, keys, _) = python_dump(&path, dir.path());
        assert_eq!(lat, back);
        assert_eq!(keys[15], "val_15");
    }
}

fn half_round(v: f32) -> f32 {
    let mut b = Vec::new();
    DType::F16.encode_f32(&[v], &mut b);
    let mut o = [0f32];
    DType::F16.decode_to_f32(&b, &mut o);
    o[0]
}
