//! The latent loader: epoch permutations, rank splits, resume, variants and posterior sampling.

use lmd_data::loader::{LatentLoader, LoaderConfig, LoaderState};
use lmd_data::shard::{
    Field, LatentDataset, Manifest, Preprocessing, RecordLayout, Scaling, ShardMeta, ShardWriter,
    VaeIdentity, WriterOptions,
};
use lmd_data::DType;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

fn meta(layout: RecordLayout, applied: bool) -> ShardMeta {
    ShardMeta {
        latent_shape: [1, 2, 2],
        dtype: DType::F32,
        preprocessing: Preprocessing {
            size: 16,
            resize: "shorter-side".into(),
            crop: "center".into(),
            filter: "bilinear-antialias".into(),
            views: layout.views,
            flip: layout.flip,
            input_range: "[0,1]".into(),
        },
        layout,
        labels: true,
        vae: VaeIdentity {
            name: "test".into(),
            weights: vec![],
        },
        scaling: Scaling {
            factor: 0.5,
            applied,
        },
        writer: "tests".into(),
        records_per_block: 0,
        byte_shuffle: true,
        zstd_level: 3,
    }
}

/// `n` records over 3 shards; tensor t of record i holds the value `i + t/100` everywhere.
fn dataset(
    dir: &Path,
    n: usize,
    m: ShardMeta,
    rec: impl Fn(usize) -> Vec<f32>,
) -> Arc<LatentDataset> {
    let mut manifest = Manifest::new(m.clone());
    let per = n.div_ceil(3);
    for s in 0..3 {
        let path = dir.join(format!("shard-{s:06}.lmds"));
        let mut w = ShardWriter::create(
            &path,
            m.clone(),
            WriterOptions {
                records_per_block: Some(5),
                ..Default::default()
            },
        )
        .unwrap();
        for i in s * per..((s + 1) * per).min(n) {
            w.push_f32(&format!("k{i}"), Some(i as i64 % 7), &rec(i))
                .unwrap();
        }
        let wm = w.meta().clone();
        manifest.add(&w.finish().unwrap(), &wm).unwrap();
    }
    manifest.save(dir).unwrap();
    Arc::new(LatentDataset::open(dir).unwrap())
}

fn plain(i: usize) -> Vec<f32> {
    vec![i as f32; 4]
}

fn ids(b: &lmd_data::loader::LatentBatch) -> Vec<usize> {
    b.data.chunks(4).map(|c| c[0] as usize).collect()
}

#[test]
fn epochs_are_permutations_seeded_and_different() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 100, meta(RecordLayout::single(), true), plain);
    let cfg = LoaderConfig {
        batch_size: 10,
        window: 16,
        seed: 3,
        ..Default::default()
    };
    let mut l = LatentLoader::new(ds.clone(), cfg.clone()).unwrap();
    assert_eq!(l.batches_per_epoch(), 10);
    let e0: Vec<usize> = l.epoch().flat_map(|b| ids(&b.unwrap())).collect();
    let e1: Vec<usize> = l.epoch().flat_map(|b| ids(&b.unwrap())).collect();
    assert_eq!(e0.iter().copied().collect::<HashSet<_>>().len(), 100);
    assert_eq!(e1.iter().copied().collect::<HashSet<_>>().len(), 100);
    assert_ne!(e0, e1);
    assert_ne!(e0, (0..100).collect::<Vec<_>>());
    let mut again = LatentLoader::new(ds.clone(), cfg.clone()).unwrap();
    let a0: Vec<usize> = again.epoch().flat_map(|b| ids(&b.unwrap())).collect();
    assert_eq!(a0, e0);
    // keys and labels travel with the data
    let b = l.make_batch(0, 0, &[42, 7]).unwrap();
    assert_eq!(b.keys, vec!["k42", "k7"]);
    assert_eq!(b.labels, vec![Some(0), Some(0)]);
    assert_eq!(b.shape, [2, 1, 2, 2]);
}

#[test]
fn ranks_get_disjoint_equal_shares() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 103, meta(RecordLayout::single(), true), plain);
    let mut seen = HashSet::new();
    let mut counts = Vec::new();
    for rank in 0..3 {
        let mut l = LatentLoader::new(
            ds.clone(),
            LoaderConfig {
                batch_size: 8,
                rank,
                world_size: 3,
                ..Default::default()
            },
        )
        .unwrap();
        let got: Vec<usize> = l.epoch().flat_map(|b| ids(&b.unwrap())).collect();
        counts.push(got.len());
        for i in got {
            assert!(seen.insert(i), "record {i} on two ranks");
        }
    }
    assert_eq!(counts, vec![32, 32, 32]); // floor(103 / 24) = 4 batches each
}

#[test]
fn resume_mid_epoch_gives_the_same_batches() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 60, meta(RecordLayout::single(), true), plain);
    let cfg = LoaderConfig {
        batch_size: 6,
        ..Default::default()
    };
    let mut full = LatentLoader::new(ds.clone(), cfg.clone()).unwrap();
    let mut all: Vec<_> = full.epoch().map(|b| b.unwrap()).collect();
    all.extend(full.epoch().map(|b| b.unwrap()));
    let mut first = LatentLoader::new(ds.clone(), cfg.clone()).unwrap();
    let taken: Vec<_> = first.epoch().take(4).map(|b| b.unwrap()).collect();
    let st = first.state();
    assert_eq!(
        st,
        LoaderState {
            epoch: 0,
            batch: 4,
            group_bytes: 0
        }
    );
    let json = serde_json::to_string(&st).unwrap();
    let mut resumed = LatentLoader::new(ds, cfg).unwrap();
    resumed.set_state(serde_json::from_str(&json).unwrap());
    let mut rest: Vec<_> = resumed.epoch().map(|b| b.unwrap()).collect();
    rest.extend(resumed.epoch().map(|b| b.unwrap()));
    let mut joined = taken;
    joined.extend(rest);
    assert_eq!(joined, all);
}

#[test]
fn variants_posterior_sampling_and_scaling() {
    let dir = tempfile::tempdir().unwrap();
    // 2 views x flip x (mean, logvar): tensor t = view*4 + flip*2 + field
    let layout = RecordLayout {
        fields: vec![Field::Mean, Field::Logvar],
        views: 2,
        flip: true,
    };
    let ds = dataset(dir.path(), 30, meta(layout, false), |i| {
        let mut v = Vec::new();
        for var in 0..4 {
            v.extend([i as f32 * 10.0 + var as f32; 4]); // mean
            v.extend([(0.2f32).ln() * 2.0; 4]); // logvar: std 0.2
        }
        v
    });
    let cfg = LoaderConfig {
        batch_size: 30,
        ..Default::default()
    };
    let mut l = LatentLoader::new(ds.clone(), cfg.clone()).unwrap();
    let b = l.epoch().next().unwrap().unwrap();
    let mut variants = HashSet::new();
    let mut resid = Vec::new();
    for (k, chunk) in b.keys.iter().zip(b.data.chunks(4)) {
        let i: f32 = k[1..].parse().unwrap();
        for v in chunk {
            // scaled by 0.5 (scaling.applied = false) after sampling
            let x = v / 0.5 - i * 10.0;
            let var = x.round();
            variants.insert(var as i32);
            resid.push(x - var);
        }
    }
    assert!(
        variants.iter().all(|v| (0..4).contains(v)) && variants.len() > 1,
        "{variants:?}"
    );
    let n = resid.len() as f32;
    let mean = resid.iter().sum::<f32>() / n;
    let std = (resid.iter().map(|r| (r - mean).powi(2)).sum::<f32>() / n).sqrt();
    assert!(
        mean.abs() < 0.06 && (std - 0.2).abs() < 0.05,
        "mean {mean} std {std}"
    );
    // the same epoch draws the same numbers again
    let mut l2 = LatentLoader::new(ds, cfg).unwrap();
    assert_eq!(l2.epoch().next().unwrap().unwrap(), b);
}

#[test]
fn too_small_datasets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(dir.path(), 5, meta(RecordLayout::single(), true), plain);
    let e = LatentLoader::new(
        ds,
        LoaderConfig {
            batch_size: 8,
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("cannot fill"), "{e}");
}
