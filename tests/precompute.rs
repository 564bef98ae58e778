//! `lmd-precompute` end to end on the shared imagenette and corrupt shards with TAESD:
//! round trip against a direct encode, SIGKILL + resume, the skip report, worker splits,
//! refusing to mix configurations. `#[ignore = "needs LMD_SHARED"]`: CI runs them with
//! `--include-ignored` and `LMD_SHARED` set.

use lmd_train::data::shard::{LatentDataset, ShardReader};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn shared() -> Option<PathBuf> {
    lmd_train::testvectors::shared_dir()
}

fn base_args(sh: &Path, out: &Path, input: &str) -> Vec<String> {
    vec![
        "--input".into(),
        input.into(),
        "--output".into(),
        out.display().to_string(),
        "--vae-weights".into(),
        sh.join("weights/taesd").display().to_string(),
        "--size".into(),
        "64".into(),
        "--batch-size".into(),
        "8".into(),
        "--records-per-shard".into(),
        "16".into(),
        "--no-progress".into(),
    ]
}

fn precompute(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lmd-precompute"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "lmd-precompute failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn all_records(dir: &Path) -> BTreeMap<String, (Option<i64>, Vec<f32>)> {
    let ds = LatentDataset::open(dir).unwrap();
    let mut m = BTreeMap::new();
    for i in 0..ds.len() {
        let r = ds.get(i).unwrap();
        assert!(
            m.insert(r.key.clone(), (r.label, r.data)).is_none(),
            "duplicate key {}",
            r.key
        );
    }
    m
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn precompute_roundtrip_matches_a_direct_taesd_encode() {
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let dir = tempfile::tempdir().unwrap();
    let shard = sh.join("data/imagenette/imagenette-val-000000.tar");
    let mut args = base_args(&sh, dir.path(), shard.to_str().unwrap());
    args.extend(["--limit".into(), "40".into()]);
    ok(&precompute(&args));
    let ds = LatentDataset::open(dir.path()).unwrap();
    assert_eq!(ds.len(), 40);
    assert_eq!(ds.num_shards(), 3); // 16 + 16 + 8
    let meta = ds.meta();
    assert_eq!(meta.latent_shape, [4, 8, 8]);
    assert_eq!(meta.preprocessing.size, 64);
    let enc_sha =
        lmd_train::model::vae::sha256_file(&sh.join("weights/taesd/taesd_encoder.safetensors"))
            .unwrap();
    assert!(meta.vae.weights.iter().any(|w| w.sha256 == enc_sha));

    // The same samples, decoded and encoded directly.
    use lmd_train::data::source::{Labels, SourceEvent};
    let mut samples = Vec::new();
    lmd_train::data::source::read_webdataset_shard(&shard, Labels::Required, &mut |ev| {
        if let SourceEvent::Sample(s) = ev {
            samples.push(s);
        }
        samples.len() < 40
    });
    let dev = lmd_train::model::candle::Device::Cpu;
    let vae = lmd_train::model::vae::Taesd::load(&sh.join("weights/taesd"), &dev).unwrap();
    let tcfg = lmd_train::data::transform::TransformConfig {
        size: 64,
        ..Default::default()
    };
    let mut resizer = lmd_train::data::transform::Resizer::new();
    let mut max_err = 0f32;
    for (i, s) in samples.iter().enumerate() {
        let r = ds.get(i).unwrap();
        assert_eq!(r.key, s.key);
        assert_eq!(r.label, s.label);
        let img = lmd_train::data::decode::decode_rgb8(&s.image, u64::MAX).unwrap();
        let px = lmd_train::data::transform::prepare(&img, &s.key, &tcfg, &mut resizer).unwrap();
        let px = lmd_train::data::transform::unit_f32(&px);
        let x = lmd_train::model::candle::Tensor::from_vec(px, (1, 3, 64, 64), &dev).unwrap();
        let z: Vec<f32> = vae
            .encode_raw(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in z.iter().zip(&r.data) {
            // f16 storage: relative 2^-11, plus a little for batch-vs-single float order
            let tol = 1e-3 + a.abs() * 1.5e-3;
            assert!((a - b).abs() <= tol, "{}: {a} vs {b}", s.key);
            max_err = max_err.max((a - b).abs());
        }
    }
    eprintln!("max |direct - stored| = {max_err}");
    // Python reads the shards too.
    let py = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/lmd_shard.py"))
        .arg(dir.path().join("shard-000000.lmds"))
        .output()
        .expect("python3 (with numpy and zstandard) runs");
    assert!(
        py.status.success(),
        "python reader failed: {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    assert_eq!(j["records"], 16);
    // A rerun of a finished job does nothing and changes nothing.
    let before = std::fs::read(dir.path().join("shard-000001.lmds")).unwrap();
    ok(&precompute(&args));
    assert_eq!(
        std::fs::read(dir.path().join("shard-000001.lmds")).unwrap(),
        before
    );
    // Another configuration into the same output is refused, naming the difference.
    let mut other = args.clone();
    other.extend(["--dtype".into(), "f32".into()]);
    let out = precompute(&other);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to mix") && err.contains("dtype"),
        "{err}"
    );
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn sigkilled_precompute_resumes_to_identical_shards() {
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let input = format!(
        "{}/data/imagenette/imagenette-val-00000{{0..1}}.tar",
        sh.display()
    );
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut args_a = base_args(&sh, a.path(), &input);
    args_a.extend(["--limit".into(), "112".into()]);
    ok(&precompute(&args_a));
    let mut args_b = base_args(&sh, b.path(), &input);
    args_b.extend([
        "--limit".into(),
        "112".into(),
        "--decode-threads".into(),
        "1".into(),
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmd-precompute"))
        .args(&args_b)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !b.path().join("shard-000001.lmds").exists() {
        assert!(Instant::now() < deadline, "no second shard after 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.path().join("state.json")).unwrap()).unwrap();
    assert_eq!(
        state["done"], false,
        "the run finished before it was killed: the test proves nothing"
    );
    ok(&precompute(&args_b));
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".lmds"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(a.path()), names(b.path()));
    assert_eq!(names(a.path()).len(), 7);
    for n in names(a.path()) {
        assert_eq!(
            std::fs::read(a.path().join(&n)).unwrap(),
            std::fs::read(b.path().join(&n)).unwrap(),
            "{n} differs after resume"
        );
    }
    // no temporaries left, no duplicate or missing keys
    assert!(std::fs::read_dir(b.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp-")));
    assert_eq!(all_records(b.path()).len(), 112);
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn corrupt_set_goes_through_with_a_complete_report() {
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let dir = tempfile::tempdir().unwrap();
    let input = format!("{}/data/corrupt/*.tar", sh.display());
    ok(&precompute(&base_args(&sh, dir.path(), &input)));
    let report = std::fs::read_to_string(dir.path().join("skipped.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = report
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sh.join("data/corrupt/EXPECTED.json")).unwrap())
            .unwrap();
    let recs = all_records(dir.path());
    for (key, verdict) in expected["corrupt-000000.tar"].as_object().unwrap() {
        let v = verdict.as_str().unwrap();
        let skipped = lines.iter().any(|l| {
            l["kind"] == "skip"
                && l["key"] == key.as_str()
                && l["source"]
                    .as_str()
                    .unwrap()
                    .ends_with("corrupt-000000.tar")
        });
        if v.starts_with("ok or skip") {
            assert!(recs.contains_key(key) || skipped, "{key}");
        } else if v.starts_with("ok") {
            assert!(
                recs.contains_key(key),
                "{key} ({v}) missing from the shards"
            );
        } else {
            assert!(
                skipped && !recs.contains_key(key),
                "{key} ({v}) not reported as skipped"
            );
        }
    }
    for l in &lines {
        if l["kind"] == "skip" {
            assert!(l["offset"].is_u64() && l["reason"].is_string() && l["source"].is_string());
        }
    }
    let failed: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["kind"] == "shard-failed")
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed.iter().any(|l| l["source"]
        .as_str()
        .unwrap()
        .ends_with("truncated-000001.tar")
        && l["offset"].is_u64()));
    assert!(failed.iter().any(|l| l["source"]
        .as_str()
        .unwrap()
        .ends_with("not-a-tar-000002.tar")));
    // samples of the truncated shard before the cut are in
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["written"].as_u64().unwrap() as usize, recs.len());
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn two_workers_are_disjoint_and_their_union_is_one_run() {
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let input = format!("{}/data/imagenette/imagenette-val-000001.tar", sh.display());
    let one = tempfile::tempdir().unwrap();
    let mut args = base_args(&sh, one.path(), &input);
    args.extend(["--limit".into(), "30".into()]);
    ok(&precompute(&args));
    let whole = all_records(one.path());
    let two = tempfile::tempdir().unwrap();
    let mut parts = Vec::new();
    for i in 0..2 {
        let mut a = base_args(&sh, two.path(), &input);
        a.extend(
            [
                "--limit",
                "30",
                "--num-workers",
                "2",
                "--worker-index",
                &i.to_string(),
            ]
            .map(String::from),
        );
        ok(&precompute(&a));
        parts.push(all_records(
            &two.path().join(format!("worker-{i:03}-of-002")),
        ));
    }
    assert!(
        parts[0].keys().all(|k| !parts[1].contains_key(k)),
        "workers overlap"
    );
    let mut union = parts[0].clone();
    union.extend(parts[1].clone());
    assert_eq!(union.len(), whole.len());
    for (k, (label, data)) in &whole {
        let (l2, d2) = &union[k];
        assert_eq!(label, l2);
        let diff = data
            .iter()
            .zip(d2)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 2e-3, "{k}: {diff}");
    }
    // training can open both workers' outputs as one dataset
    let ds = LatentDataset::open_many(&[
        two.path().join("worker-000-of-002"),
        two.path().join("worker-001-of-002"),
    ])
    .unwrap();
    assert_eq!(ds.len(), whole.len());
    let _ = ShardReader::open(two.path().join("worker-000-of-002/shard-000000.lmds")).unwrap();
}

#[test]
fn precompute_presets_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("precompute-") && name.ends_with(".toml") {
            let cfg: lmd_train::precompute::PrecomputeConfig =
                toml::from_str(&std::fs::read_to_string(&p).unwrap())
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!cfg.inputs.is_empty(), "{name}");
            n += 1;
        }
    }
    assert!(n >= 3);
}

/// The first `n` (key, jpeg, class) samples of an imagenette shard.
fn imagenette_samples(sh: &Path, n: usize) -> Vec<(String, Vec<u8>, u32)> {
    use std::io::Read;
    let f = std::fs::File::open(sh.join("data/imagenette/imagenette-val-000000.tar")).unwrap();
    let mut ar = tar::Archive::new(f);
    let mut out: Vec<(String, Vec<u8>, u32)> = vec![];
    let mut jpg: Option<(String, Vec<u8>)> = None;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let mut b = Vec::new();
        e.read_to_end(&mut b).unwrap();
        if let Some(k) = name.strip_suffix(".jpg") {
            jpg = Some((k.to_string(), b));
        } else if let Some(k) = name.strip_suffix(".cls") {
            let (jk, img) = jpg.take().unwrap();
            assert_eq!(jk, k);
            out.push((
                k.to_string(),
                img,
                String::from_utf8(b).unwrap().trim().parse().unwrap(),
            ));
            if out.len() == n {
                break;
            }
        }
    }
    out
}

fn tar_of(members: Vec<(String, Vec<u8>)>) -> Vec<u8> {
    lmd_train::data::synthetic::tar_archive(&members)
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn an_imagefolder_tgz_precomputes_to_the_same_latents_as_the_same_photos_in_a_tar() {
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let samples = imagenette_samples(&sh, 24);
    let tmp = tempfile::tempdir().unwrap();
    // the layout of fast.ai's imagenette2-160.tgz, gzip-compressed
    let folder: Vec<(String, Vec<u8>)> = samples
        .iter()
        .map(|(k, img, c)| (format!("imagenette2-160/train/c{c}/{k}.JPEG"), img.clone()))
        .collect();
    let tgz = tmp.path().join("imagenette2-160.tgz");
    std::fs::write(&tgz, lmd_train::data::synthetic::gzip(&tar_of(folder))).unwrap();
    // the same photos as a plain WebDataset tar with the same keys and labels
    let mut wds = Vec::new();
    for (k, img, c) in &samples {
        wds.push((format!("c{c}/{k}.jpg"), img.clone()));
        wds.push((format!("c{c}/{k}.cls"), c.to_string().into_bytes()));
    }
    let tar = tmp.path().join("same-000000.tar");
    std::fs::write(&tar, tar_of(wds)).unwrap();
    let (a, b) = (tmp.path().join("from-tgz"), tmp.path().join("from-tar"));
    ok(&precompute(&base_args(
        &sh,
        &a,
        &format!("{}#imagenette2-160/train", tgz.display()),
    )));
    ok(&precompute(&base_args(&sh, &b, tar.to_str().unwrap())));
    let (ra, rb) = (all_records(&a), all_records(&b));
    assert_eq!(ra.len(), 24);
    // labels: sorted class folders; with single-digit classes that is the class number
    let classes: std::collections::BTreeSet<u32> = samples.iter().map(|s| s.2).collect();
    let index: BTreeMap<u32, i64> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, i as i64))
        .collect();
    for (k, img, c) in &samples {
        let key = format!("c{c}/{k}");
        let (la, va) = &ra[&key];
        let (_, vb) = &rb[&key];
        assert_eq!(*la, Some(index[c]), "{key}");
        assert_eq!(
            va,
            vb,
            "{key}: latents differ between the tgz and the tar ({} bytes)",
            img.len()
        );
    }
}
