//! Ingestion over real data (`$LMD_SHARED/data`) and over small shards the tests make.

use lmd_data::decode::decode_rgb8;
use lmd_data::pipeline::{Pipeline, PipelineConfig, PipelineItem, Prepared};
use lmd_data::source::{InputKind, InputSpec, Labels, Skip, SourceEvent};
use lmd_data::transform::TransformConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::{jpeg, png_bytes, shared};

struct Collected {
    items: Vec<Prepared>,
    skipped: Vec<Skip>,
    failures: Vec<String>,
    order: Vec<String>,
    decode: lmd_data::pipeline::DecodeStats,
}

fn run(inputs: Vec<InputSpec>, cfg: PipelineConfig) -> Collected {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut c = Collected {
        items: vec![],
        skipped: vec![],
        failures: vec![],
        order: vec![],
        decode: Default::default(),
    };
    let pipeline = Pipeline::start(inputs, cfg);
    let tally = pipeline.decode_stats();
    for item in pipeline {
        assert!(Instant::now() < deadline, "pipeline took over 300 s");
        match item {
            PipelineItem::Batch(b) => {
                for (_, s) in &b.skipped {
                    c.order.push(format!("skip:{}", s.key));
                }
                c.skipped.extend(b.skipped.into_iter().map(|(_, s)| s));
                for p in &b.items {
                    c.order.push(p.key.clone());
                }
                c.items.extend(b.items);
            }
            PipelineItem::ShardFailed(f) => {
                c.order.push(format!("fail:{}", f.source));
                c.failures.push(f.to_string())
            }
            PipelineItem::InputFailed(e) => c.failures.push(e),
        }
    }
    c.decode = tally.stats();
    c
}

fn small_cfg(size: u32) -> PipelineConfig {
    PipelineConfig {
        transform: TransformConfig {
            size,
            ..Default::default()
        },
        batch_size: 4,
        workers: 2,
        ..Default::default()
    }
}

// ---------------------------------------------------------------- shards made by the tests

fn add(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, name, data).unwrap();
}

fn make_shard(dir: &Path, name: &str, n: usize, bad_at: Option<usize>) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..n {
        let key = format!("{name}_{i:03}");
        if Some(i) == bad_at {
            add(&mut b, &format!("{key}.jpg"), b"definitely not a jpeg");
        } else {
            add(
                &mut b,
                &format!("{key}.png"),
                &png_bytes(20 + i as u32, 12, i as u8),
            );
        }
        add(
            &mut b,
            &format!("{key}.cls"),
            format!("{}", i % 3).as_bytes(),
        );
    }
    let p = dir.join(format!("{name}.tar"));
    std::fs::write(&p, b.into_inner().unwrap()).unwrap();
    p
}

#[test]
fn made_shards_come_out_in_order_with_skips_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_shard(dir.path(), "a", 11, Some(4));
    let t = make_shard(dir.path(), "t", 6, None);
    // cut t in the middle of its 4th sample's image
    let bytes = std::fs::read(&t).unwrap();
    let at = bytes.windows(9).position(|w| w == b"t_003.png").unwrap();
    std::fs::write(&t, &bytes[..at + 512 + 40]).unwrap();
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, vec![b'x'; 3000]).unwrap();
    let c = make_shard(dir.path(), "c", 5, None);
    let spec = InputSpec::WebDataset {
        shards: vec![a, t, junk, c],
    };
    let out = run(vec![spec], small_cfg(8));
    let keys: Vec<&str> = out.items.iter().map(|p| p.key.as_str()).collect();
    let mut want: Vec<String> = (0..11)
        .filter(|&i| i != 4)
        .map(|i| format!("a_{i:03}"))
        .collect();
    want.extend((0..3).map(|i| format!("t_{i:03}")));
    want.extend((0..5).map(|i| format!("c_{i:03}")));
    assert_eq!(keys, want);
    assert_eq!(out.skipped.len(), 1, "{:?}", out.skipped);
    assert_eq!(out.skipped[0].key, "a_004");
    assert!(
        out.skipped[0].reason.contains("not an image"),
        "{:?}",
        out.skipped[0]
    );
    assert_eq!(out.failures.len(), 2, "{:?}", out.failures);
    assert!(
        out.failures[0].contains("t.tar") && out.failures[0].contains("at byte"),
        "{}",
        out.failures[0]
    );
    assert!(
        out.failures[1].contains("junk.tar") && out.failures[1].contains("not a tar"),
        "{}",
        out.failures[1]
    );
    // the failure of t comes right after t's last good sample, junk's after it, then c
    let pos = |s: &str| out.order.iter().position(|x| x == s).unwrap();
    assert!(pos("t_002") < pos(&format!("fail:{}", dir.path().join("t.tar").display())));
    assert!(pos(&format!("fail:{}", dir.path().join("junk.tar").display())) < pos("c_000"));
    assert_eq!(out.items[0].label, Some(0));
    assert_eq!(out.items[0].pixels.len(), 3 * 8 * 8);
    // the workers' tally: every sample that reached a worker (the undecodable one too; not
    // the cut sample, which never left the reader), timed
    assert_eq!(out.decode.images, 11 + 3 + 5, "{:?}", out.decode);
    assert_eq!(out.decode.workers, 2);
    assert!(out.decode.busy_s > 0.0 && out.decode.images_per_s() > 0.0);
    // the same run again gives identical pixels (deterministic)
    let again = run(
        vec![InputSpec::WebDataset {
            shards: vec![dir.path().join("a.tar")],
        }],
        small_cfg(8),
    );
    assert_eq!(again.items[3].pixels, out.items[3].pixels);
}

#[test]
fn start_position_and_worker_split_partition_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_shard(dir.path(), "p", 23, Some(7));
    let spec = || {
        vec![InputSpec::WebDataset {
            shards: vec![a.clone()],
        }]
    };
    let all = run(spec(), small_cfg(8));
    let keys = |c: &Collected| c.items.iter().map(|p| p.key.clone()).collect::<Vec<_>>();
    // positions are the event indices: 23 samples, sample 7 skipped
    assert_eq!(
        all.items.iter().map(|p| p.seq).collect::<Vec<_>>(),
        (0..23).filter(|&i| i != 7).collect::<Vec<u64>>()
    );
    // resume from position 10
    let tail = run(
        spec(),
        PipelineConfig {
            start_seq: 10,
            ..small_cfg(8)
        },
    );
    assert_eq!(keys(&tail), keys(&all)[9..].to_vec());
    // three workers: disjoint, union = all, in order
    let mut union = Vec::new();
    for i in 0..3 {
        let part = run(
            spec(),
            PipelineConfig {
                split: (3, i),
                ..small_cfg(8)
            },
        );
        assert!(part.items.iter().all(|p| p.seq % 3 == i));
        union.extend(keys(&part));
    }
    union.sort();
    let mut want = keys(&all);
    want.sort();
    assert_eq!(union, want);
    // limit
    let first = run(
        spec(),
        PipelineConfig {
            limit: 5,
            ..small_cfg(8)
        },
    );
    assert_eq!(first.items.len(), 5);
}

#[test]
fn dropping_a_pipeline_mid_stream_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_shard(dir.path(), "big", 200, None);
    let t0 = Instant::now();
    let mut p = Pipeline::start(
        vec![InputSpec::WebDataset { shards: vec![a] }],
        small_cfg(8),
    );
    let first = p.next();
    assert!(matches!(first, Some(PipelineItem::Batch(_))));
    drop(p);
    assert!(t0.elapsed() < Duration::from_secs(30));
}

// ---------------------------------------------------------------- real data

fn expected() -> serde_json::Value {
    let p = shared().unwrap().join("data/corrupt/EXPECTED.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn corrupt_set_behaves_as_expected_json_says() {
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let dir = sh.join("data/corrupt");
    let shards = vec![
        dir.join("corrupt-000000.tar"),
        dir.join("truncated-000001.tar"),
        dir.join("not-a-tar-000002.tar"),
    ];
    let out = run(vec![InputSpec::WebDataset { shards }], small_cfg(32));
    let exp = expected();
    let verdicts = exp["corrupt-000000.tar"].as_object().unwrap();
    let got: HashMap<&str, &Prepared> = out
        .items
        .iter()
        .filter(|p| p.source.ends_with("corrupt-000000.tar"))
        .map(|p| (p.key.as_str(), p))
        .collect();
    let skipped: HashMap<&str, &Skip> = out
        .skipped
        .iter()
        .filter(|s| s.source.ends_with("corrupt-000000.tar"))
        .map(|s| (s.key.as_str(), s))
        .collect();
    for (key, verdict) in verdicts {
        let v = verdict.as_str().unwrap();
        let (delivered, skip) = (got.get(key.as_str()), skipped.get(key.as_str()));
        eprintln!(
            "{key}: {v} -> delivered {} skip {:?}",
            delivered.is_some(),
            skip.map(|s| &s.reason)
        );
        if v.starts_with("ok or skip") {
            assert!(
                delivered.is_some() || skip.is_some(),
                "{key}: neither delivered nor skipped"
            );
        } else if v.starts_with("ok") {
            let p =
                delivered.unwrap_or_else(|| panic!("{key} ({v}) was not delivered: {:?}", skip));
            assert_eq!(p.pixels.len(), 3 * 32 * 32);
            assert!(p.label.is_some());
        } else if v.starts_with("skip") {
            let s = skip.unwrap_or_else(|| panic!("{key} ({v}) was not skipped"));
            assert!(delivered.is_none());
            assert!(s.source.ends_with("corrupt-000000.tar"));
            let want = match key.as_str() {
                "bad_truncated_jpeg" => "truncated",
                "bad_random_bytes" | "bad_text_as_jpg" => "not an image",
                "bad_empty_file" => "empty image member",
                "bad_png_bomb" => "pixel limit",
                "bad_missing_label" => "no .cls",
                "bad_label_not_int" => "not an integer",
                "bad_no_image" => "no image member",
                "bad_symlink" => "not a regular file",
                other => panic!("unexpected skip verdict for {other}"),
            };
            assert!(
                s.reason.contains(want),
                "{key}: reason {:?} lacks {want:?}",
                s.reason
            );
        } else {
            panic!("unknown verdict {v}");
        }
    }
    // every skip has a byte offset inside the shard, distinct per sample
    let offs: std::collections::HashSet<u64> = out
        .skipped
        .iter()
        .filter(|s| s.source.ends_with("corrupt-000000.tar"))
        .map(|s| s.offset)
        .collect();
    assert_eq!(
        offs.len(),
        out.skipped
            .iter()
            .filter(|s| s.source.ends_with("corrupt-000000.tar"))
            .count()
    );
    // truncated: a clear error naming the shard and the byte offset; earlier samples delivered
    let tf: Vec<&String> = out
        .failures
        .iter()
        .filter(|f| f.contains("truncated-000001.tar"))
        .collect();
    assert_eq!(tf.len(), 1, "{:?}", out.failures);
    assert!(tf[0].contains("at byte"), "{}", tf[0]);
    assert!(out
        .items
        .iter()
        .any(|p| p.source.ends_with("truncated-000001.tar")));
    // not a tar: a clear error naming the shard
    let nf: Vec<&String> = out
        .failures
        .iter()
        .filter(|f| f.contains("not-a-tar-000002.tar"))
        .collect();
    assert_eq!(nf.len(), 1);
    assert!(nf[0].contains("not a tar"), "{}", nf[0]);
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn imagenette_counts_labels_and_keys() {
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let pat = format!(
        "{}/data/imagenette/imagenette-train-{{000000..000005}}.tar",
        sh.display()
    );
    let spec = InputSpec::detect(&pat, None, None).unwrap();
    assert!(matches!(&spec, InputSpec::WebDataset { shards } if shards.len() == 6));
    // source level (no decode): counts and labels
    let mut n = 0;
    let mut per_class = [0usize; 10];
    spec.read(Labels::Required, &mut |ev| {
        match ev {
            SourceEvent::Sample(s) => {
                n += 1;
                per_class[s.label.unwrap() as usize] += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
        true
    })
    .unwrap();
    assert_eq!(n, 3000);
    assert_eq!(per_class, [300; 10]);
    // decoded: the val shards
    let pat = format!("{}/data/imagenette/imagenette-val-*.tar", sh.display());
    let out = run(
        vec![InputSpec::detect(&pat, None, None).unwrap()],
        small_cfg(64),
    );
    assert_eq!(out.items.len(), 1000);
    assert!(out.skipped.is_empty() && out.failures.is_empty());
    let keys: std::collections::HashSet<&str> = out.items.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys.len(), 1000);
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn ilsvrc_train_val_and_image_folder() {
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let d = sh.join("data/imagenet-samples");
    let synsets = d.join("LOC_synset_mapping.txt");
    let ids = lmd_data::source::read_synsets(&synsets).unwrap();
    assert_eq!(ids.len(), 1000);
    // train: tar of per-class tars, detected automatically
    let spec = InputSpec::detect(
        d.join("ILSVRC-sample_img_train.tar").to_str().unwrap(),
        Some(&synsets),
        None,
    )
    .unwrap();
    assert!(matches!(spec, InputSpec::IlsvrcTrain { .. }));
    let out = run(vec![spec], small_cfg(32));
    assert_eq!(
        out.items.len(),
        300,
        "skipped {:?} failures {:?}",
        out.skipped,
        out.failures
    );
    for p in &out.items {
        let wnid = p.key.split('_').next().unwrap();
        assert_eq!(ids[p.label.unwrap() as usize], wnid, "{}", p.key);
    }
    // without the mapping: index among the sorted ids in the tar
    let spec = InputSpec::IlsvrcTrain {
        tar: d.join("ILSVRC-sample_img_train.tar"),
        synsets: None,
    };
    let mut labels = Vec::new();
    spec.read(Labels::Required, &mut |ev| {
        if let SourceEvent::Sample(s) = ev {
            labels.push(s.label.unwrap());
        }
        true
    })
    .unwrap();
    assert_eq!(labels.len(), 300);
    assert_eq!(*labels.iter().max().unwrap(), 299);
    // val: flat tar + LOC_val_solution.csv
    let sol = d.join("LOC_val_solution.csv");
    let spec = InputSpec::detect(
        d.join("ILSVRC-sample_img_val.tar").to_str().unwrap(),
        Some(&synsets),
        Some(&sol),
    )
    .unwrap();
    let out = run(vec![spec], small_cfg(32));
    assert_eq!(out.items.len(), 134);
    let csv = std::fs::read_to_string(&sol).unwrap();
    let truth: HashMap<String, String> = csv
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(','))
        .map(|(a, b)| {
            (
                a.to_string(),
                b.split_whitespace().next().unwrap().to_string(),
            )
        })
        .collect();
    let mut classes = std::collections::BTreeSet::new();
    for p in &out.items {
        assert_eq!(ids[p.label.unwrap() as usize], truth[&p.key]);
        classes.insert(p.label.unwrap());
    }
    assert_eq!(classes.len(), 10);
    // ImageFolder built from the val tar: root/<wnid>/<key>.JPEG
    let root = tempfile::tempdir().unwrap();
    let mut ar =
        tar::Archive::new(std::fs::File::open(d.join("ILSVRC-sample_img_val.tar")).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let stem = name.trim_end_matches(".JPEG");
        let cls = root.path().join(&truth[stem]);
        std::fs::create_dir_all(&cls).unwrap();
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut buf).unwrap();
        std::fs::write(cls.join(&name), buf).unwrap();
    }
    let spec = InputSpec::detect(root.path().to_str().unwrap(), None, None).unwrap();
    assert!(matches!(spec, InputSpec::ImageFolder { .. }));
    let out = run(vec![spec], small_cfg(32));
    assert_eq!(out.items.len(), 134);
    let sorted: Vec<&String> = classes.iter().map(|&l| &ids[l as usize]).collect();
    for p in &out.items {
        let wnid = p.key.split('/').next().unwrap();
        assert_eq!(sorted[p.label.unwrap() as usize], wnid);
    }
}

#[test]
fn explicit_kinds_override_detection() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_shard(dir.path(), "k", 3, None);
    let p = a.to_str().unwrap();
    assert!(matches!(
        InputSpec::with_kind(p, InputKind::Wds, None, None).unwrap(),
        InputSpec::WebDataset { .. }
    ));
    assert!(matches!(
        InputSpec::with_kind(p, InputKind::IlsvrcTrain, None, None).unwrap(),
        InputSpec::IlsvrcTrain { .. }
    ));
    let e = InputSpec::with_kind(p, InputKind::IlsvrcVal, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--val-labels"), "{e}");
    let e = InputSpec::with_kind(p, InputKind::Folder, None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("directory"), "{e}");
    assert!("zip".parse::<InputKind>().is_err());
}

use lmd_data::synthetic::{gzip, tar_archive as tar_bytes};

fn events(spec: &InputSpec) -> Vec<SourceEvent> {
    let mut v = Vec::new();
    spec.read(Labels::Required, &mut |e| {
        v.push(e);
        true
    })
    .unwrap();
    v
}

#[test]
fn imagefolder_inside_a_tgz_reads_like_the_fastai_imagenette_archive() {
    // the layout of imagenette2-160.tgz: ROOT/{train,val}/<wnid>/<file>.JPEG plus a csv
    let mut members = vec![(
        "imagenette2-160/noisy_imagenette.csv".to_string(),
        b"path,label\n".to_vec(),
    )];
    for (split, n) in [("train", 3), ("val", 1)] {
        for (c, wnid) in ["n03000684", "n01440764"].iter().enumerate() {
            for i in 0..n {
                members.push((
                    format!("imagenette2-160/{split}/{wnid}/{wnid}_{i}.JPEG"),
                    jpeg(20 + i as u32, 16, [40 * c as u8, 100, 7]),
                ));
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let tgz = dir.path().join("imagenette2-160.tgz");
    std::fs::write(&tgz, gzip(&tar_bytes(&members))).unwrap();
    let input = format!("{}#imagenette2-160/train", tgz.display());
    let spec = InputSpec::detect(&input, None, None).unwrap();
    assert!(matches!(spec, InputSpec::ArchiveFolder { .. }), "{spec:?}");
    let spec2 = InputSpec::with_kind(&input, InputKind::Folder, None, None).unwrap();
    assert_eq!(spec, spec2);
    let ev = events(&spec);
    let samples: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Sample(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(samples.len(), 6, "only train, only images");
    // labels: sorted class names (n01440764 = 0), as torchvision's ImageFolder
    for s in &samples {
        let want = if s.key.starts_with("n01440764/") {
            0
        } else {
            1
        };
        assert_eq!(s.label, Some(want), "{}", s.key);
        let img = decode_rgb8(&s.image, 1 << 20).unwrap();
        assert_eq!(img.height, 16);
    }
    assert_eq!(samples[0].key, "n03000684/n03000684_0");
    // a root with nothing under it is an error naming it
    let bad = format!("{}#imagenette2-160/test", tgz.display());
    let e = InputSpec::detect(&bad, None, None)
        .unwrap()
        .read(Labels::Required, &mut |_| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("imagenette2-160/test"), "{e}");
    // a cut archive is a failed input naming the file, not an error that stops the job
    let cut = dir.path().join("cut.tgz");
    let g = std::fs::read(&tgz).unwrap();
    std::fs::write(&cut, &g[..g.len() / 2]).unwrap();
    let ev = events(
        &InputSpec::detect(
            &format!("{}#imagenette2-160/train", cut.display()),
            None,
            None,
        )
        .unwrap(),
    );
    assert!(
        matches!(ev.last(), Some(SourceEvent::ShardFailed(f)) if f.source.contains("cut.tgz")),
        "{ev:?}"
    );
}

#[test]
fn webdataset_shards_may_be_gzip_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = Vec::new();
    for i in 0..4 {
        members.push((format!("s{i:03}.jpg"), jpeg(12, 10, [i * 50, 0, 0])));
        members.push((format!("s{i:03}.cls"), format!("{}", i % 2).into_bytes()));
    }
    let tar = tar_bytes(&members);
    let plain = dir.path().join("shard-000000.tar");
    let gz = dir.path().join("shard-000001.tar.gz");
    std::fs::write(&plain, &tar).unwrap();
    std::fs::write(&gz, gzip(&tar)).unwrap();
    let keys = |p: &Path| -> Vec<(String, Option<i64>, Vec<u8>)> {
        events(&InputSpec::detect(p.to_str().unwrap(), None, None).unwrap())
            .into_iter()
            .filter_map(|e| match e {
                SourceEvent::Sample(s) => Some((s.key, s.label, s.image)),
                _ => None,
            })
            .collect()
    };
    let (a, b) = (keys(&plain), keys(&gz));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "the same samples, compressed or not");
    let spec = InputSpec::detect(gz.to_str().unwrap(), None, None).unwrap();
    assert_eq!(spec.count_samples(), Some(4));
    // a gzip stream cut in the middle fails as a shard, after the samples before the cut
    let cut = dir.path().join("cut.tar.gz");
    let g = gzip(&tar);
    std::fs::write(&cut, &g[..g.len() / 2]).unwrap();
    let ev = events(&InputSpec::detect(cut.to_str().unwrap(), None, None).unwrap());
    assert!(
        ev.iter()
            .any(|e| matches!(e, SourceEvent::ShardFailed(f) if f.source.contains("cut.tar.gz"))),
        "{ev:?}"
    );
}
