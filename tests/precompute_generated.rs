//! `lmd-precompute` end to end without `../shared`: on JPEG WebDataset tars and a TAESD with
//! random weights that the test makes. The plain `cargo test --workspace` runs these: a full
//! run, SIGKILL + resume to identical shards, and the inputs that yield no records.

use lmd_train::data::shard::LatentDataset;
use lmd_train::model::candle::{DType, Device};
use lmd_train::model::candle_nn::{VarBuilder, VarMap};
use lmd_train::model::vae::{Taesd, VaeId};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// TAESD's two weight files with random weights (PyTorch's default conv init), in `dir`.
fn random_taesd(dir: &Path) -> PathBuf {
    let (enc, dec) = (VarMap::new(), VarMap::new());
    let dev = Device::Cpu;
    let id = VaeId {
        name: "taesd".into(),
        weights: vec![],
    };
    Taesd::new(
        VarBuilder::from_varmap(&enc, DType::F32, &dev),
        VarBuilder::from_varmap(&dec, DType::F32, &dev),
        id,
    )
    .unwrap();
    let w = dir.join("taesd");
    std::fs::create_dir_all(&w).unwrap();
    enc.save(w.join("taesd_encoder.safetensors")).unwrap();
    dec.save(w.join("taesd_decoder.safetensors")).unwrap();
    w
}

/// A 48x40 JPEG: smooth colour gradients that differ per sample.
fn jpeg(i: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(48, 40, |x, y| {
        let v = |k: u32| ((x * (3 + k) + y * (5 + 2 * k) + i * 37 * (k + 1)) % 256) as u8;
        image::Rgb([v(0), v(1), v(2)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .unwrap();
    out
}

/// WebDataset tars of `n` JPEG samples each (`KEY.jpg`, `KEY.cls`), written to `dir`.
fn jpeg_tars(dir: &Path, tars: u32, n: u32) -> String {
    for t in 0..tars {
        let mut members = Vec::new();
        for i in 0..n {
            let k = t * n + i;
            members.push((format!("s{k:05}.jpg"), jpeg(k)));
            members.push((format!("s{k:05}.cls"), format!("{}", k % 5).into_bytes()));
        }
        let tar = lmd_train::data::synthetic::tar_archive(&members);
        std::fs::write(dir.join(format!("part-{t}.tar")), tar).unwrap();
    }
    format!("{}/part-{{0..{}}}.tar", dir.display(), tars - 1)
}

fn args(weights: &Path, input: &str, out: &Path) -> Vec<String> {
    [
        "--input",
        input,
        "--output",
        &out.display().to_string(),
        "--vae-weights",
        &weights.display().to_string(),
        "--size",
        "32",
        "--batch-size",
        "4",
        "--records-per-shard",
        "8",
        "--decode-threads",
        "1",
        "--no-progress",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn precompute(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lmd-precompute"))
        .args(args)
        .output()
        .unwrap()
}

fn shard_names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".lmds"))
        .collect();
    v.sort();
    v
}

#[test]
fn generated_jpeg_tars_precompute_and_a_sigkilled_run_resumes_to_identical_shards() {
    let t = tempfile::tempdir().unwrap();
    let weights = random_taesd(t.path());
    let input = jpeg_tars(t.path(), 3, 80);
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let out = precompute(&args(&weights, &input, &a));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ds = LatentDataset::open(&a).unwrap();
    assert_eq!(ds.len(), 240);
    assert_eq!(ds.meta().latent_shape, [4, 4, 4]);
    let r = ds.get(5).unwrap();
    assert_eq!((r.key.as_str(), r.label), ("s00005", Some(0)));
    assert!(r.data.iter().all(|v| v.is_finite()) && r.data.iter().any(|&v| v != 0.0));
    assert_eq!(shard_names(&a).len(), 30);

    // SIGKILL once the second shard is committed, then rerun the same command
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmd-precompute"))
        .args(args(&weights, &input, &b))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !b.join("shard-000001.lmds").exists() {
        assert!(Instant::now() < deadline, "no second shard after 120 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("state.json")).unwrap()).unwrap();
    assert_eq!(
        state["done"], false,
        "the run finished before it was killed: the test proves nothing"
    );
    let out = precompute(&args(&weights, &input, &b));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(shard_names(&a), shard_names(&b));
    for n in shard_names(&a) {
        assert_eq!(
            std::fs::read(a.join(&n)).unwrap(),
            std::fs::read(b.join(&n)).unwrap(),
            "{n} differs after resume"
        );
    }
    assert_eq!(LatentDataset::open(&b).unwrap().len(), 240);
}

#[test]
fn inputs_that_yield_no_records_fail_and_a_run_that_writes_none_exits_non_zero() {
    let t = tempfile::tempdir().unwrap();
    let weights = random_taesd(t.path());
    std::fs::write(t.path().join("empty.tar"), b"").unwrap();
    std::fs::write(
        t.path().join("notes.tar"),
        b"this is not a tar archive, just text\n",
    )
    .unwrap();
    let input = format!("{}/{{empty,notes}}.tar", t.path().display());
    let out = precompute(&args(&weights, &input, &t.path().join("o")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "exit 0 with no records written:\n{err}"
    );
    assert!(
        err.contains("empty.tar") && err.contains("notes.tar"),
        "{err}"
    );
}

#[test]
fn precompute_reports_each_stage_rate_and_overlapped_stages_give_the_sequential_shards() {
    // the same job with one and with three decode workers: the encode and write stages run on
    // their own threads behind the pipeline, so the output must not depend on the timing
    let t = tempfile::tempdir().unwrap();
    let weights = random_taesd(t.path());
    let input = jpeg_tars(t.path(), 2, 40);
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let run = |out: &Path, threads: &str| {
        let mut v = args(&weights, &input, out);
        let at = v.iter().position(|s| s == "--decode-threads").unwrap();
        v[at + 1] = threads.into();
        let o = precompute(&v);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
        (s, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (_, _) = run(&a, "1");
    let (s, stderr) = run(&b, "3");
    assert_eq!(shard_names(&a), shard_names(&b));
    for n in shard_names(&a) {
        assert_eq!(
            std::fs::read(a.join(&n)).unwrap(),
            std::fs::read(b.join(&n)).unwrap(),
            "{n}"
        );
    }
    let f = |k: &str| s[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {s}"));
    assert_eq!(s["written"], 80);
    for k in ["images_per_s", "decode_images_per_s", "vae_images_per_s"] {
        assert!(f(k) > 0.0, "{k}: {s}");
    }
    // each stage alone is at least as fast as the whole run
    assert!(f("decode_images_per_s") >= f("images_per_s"), "{s}");
    assert!(f("vae_images_per_s") >= f("images_per_s"), "{s}");
    for k in [
        "vae_busy_fraction",
        "data_wait_fraction",
        "write_busy_fraction",
    ] {
        assert!((0.0..=1.0).contains(&f(k)), "{k}: {s}");
    }
    assert!(f("vae_busy_fraction") > 0.0, "{s}");
    // the encoder is either busy or waiting for data, never both
    assert!(
        f("vae_busy_fraction") + f("data_wait_fraction") <= 1.0,
        "{s}"
    );
    assert!(
        stderr.contains("decode alone") && stderr.contains("ImageNet-1k train (1281167 images)"),
        "{stderr}"
    );
}
