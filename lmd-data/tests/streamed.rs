//! Streamed datasets: a remote dataset larger than the cache limit is read in shard groups of
//! at most half the limit, fetched ahead of the loader. A local directory stands in for the
//! remote prefix here (the cache reads it through `storage`, as it reads a URL);
//! tests/object_store.rs runs the same code against an S3 server.

use lmd_data::loader::{LatentLoader, LoaderConfig};
use lmd_data::shard::LatentDataset;
use lmd_data::storage::Cache;
use lmd_data::synthetic::{write_dataset, SyntheticSpec};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// 8 shards of 16 records; returns the largest shard's size.
fn source(dir: &Path) -> u64 {
    let m = write_dataset(
        dir,
        &SyntheticSpec {
            records: 128,
            records_per_shard: 16,
            seed: 5,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(m.shards.len(), 8);
    m.shards.iter().map(|s| s.bytes).max().unwrap()
}

fn cache_bytes(dir: &Path) -> u64 {
    walk(dir)
}

fn walk(d: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let md = e.metadata().unwrap();
        n += if md.is_dir() {
            walk(&e.path())
        } else {
            md.len()
        };
    }
    n
}

fn cfg() -> LoaderConfig {
    LoaderConfig {
        batch_size: 8,
        seed: 11,
        window: 64,
        ..Default::default()
    }
}

#[test]
fn a_streamed_epoch_reads_every_record_once_within_the_cache_limit() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let shard = source(&src);
    // room for three shards: groups of one, one read while the next arrives
    let cache = Cache {
        dir: t.path().join("cache"),
        limit: 3 * shard,
    };
    let ds = Arc::new(LatentDataset::open_streamed(std::slice::from_ref(&src), &cache).unwrap());
    assert_eq!((ds.len(), ds.group_bytes()), (128, 3 * shard / 2));
    let local = LatentDataset::open(&src).unwrap();
    let truth: HashMap<String, Vec<f32>> = (0..local.len())
        .map(|i| {
            let r = local.get(i).unwrap();
            (r.key, r.data)
        })
        .collect();
    let mut l = LatentLoader::new(ds.clone(), cfg()).unwrap();
    for epoch in 0..2 {
        let mut seen = Vec::new();
        let mut it = l.epoch();
        for b in it.by_ref() {
            let b = b.unwrap();
            assert!(ds.resident().len() <= 2, "{:?} held", ds.resident());
            assert!(cache_bytes(&cache.dir) <= cache.limit);
            for (k, key) in b.keys.iter().enumerate() {
                assert_eq!(&b.data[k * 256..(k + 1) * 256], &truth[key][..], "{key}");
            }
            seen.extend(b.keys);
        }
        drop(it);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 128, "epoch {epoch}");
        assert!(ds.resident().is_empty());
    }
    // three shards fit, eight are read per epoch: the second epoch fetches most again
    let st = ds.cache_stats();
    assert!(st.fetched >= 8 + 5, "{st:?}");
    assert!(st.evicted >= st.fetched - 3, "{st:?}");
}

#[test]
fn a_streamed_epoch_reads_its_shards_group_by_group_and_resumes_in_order() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let shard = source(&src);
    let cache = Cache {
        dir: t.path().join("cache"),
        limit: 4 * shard,
    };
    let ds = Arc::new(LatentDataset::open_streamed(std::slice::from_ref(&src), &cache).unwrap());
    let shard_of: HashMap<String, usize> = (0..ds.len())
        .map(|i| (ds.get(i).unwrap().key, ds.locate(i).unwrap().0))
        .collect();
    let mut l = LatentLoader::new(ds.clone(), cfg()).unwrap();
    let all: Vec<Vec<String>> = l.epoch().map(|b| b.unwrap().keys).collect();
    // groups of two shards (32 records): each run of 32 records comes from two shards, and
    // no shard from two runs
    let seq: Vec<usize> = all.iter().flatten().map(|k| shard_of[k]).collect();
    assert_eq!(seq.len(), 128);
    let mut used = std::collections::HashSet::new();
    for run in seq.chunks(32) {
        let mut set: Vec<usize> = run.to_vec();
        set.sort();
        set.dedup();
        assert_eq!(set.len(), 2, "{seq:?}");
        assert!(set.iter().all(|s| used.insert(*s)), "{seq:?}");
    }
    // resume after 5 batches of epoch 1: the same batches as an uninterrupted run
    let e1: Vec<Vec<String>> = l.epoch().map(|b| b.unwrap().keys).collect();
    let mut again = LatentLoader::new(ds.clone(), cfg()).unwrap();
    let _ = again.epoch().count();
    let mut it = again.epoch();
    let head: Vec<Vec<String>> = it.by_ref().take(5).map(|b| b.unwrap().keys).collect();
    let st = it.state();
    drop(it);
    let mut resumed = LatentLoader::new(ds.clone(), cfg()).unwrap();
    resumed.set_state(st);
    let tail: Vec<Vec<String>> = resumed.epoch().map(|b| b.unwrap().keys).collect();
    assert_eq!([head, tail].concat(), e1);
    assert_ne!(e1, all);
}

#[test]
fn a_shard_larger_than_half_the_limit_is_refused_naming_it() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let shard = source(&src);
    let cache = Cache {
        dir: t.path().join("cache"),
        limit: shard,
    };
    let e = LatentDataset::open_streamed(std::slice::from_ref(&src), &cache)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("shard-0000") && e.contains("raise --cache-limit"),
        "{e}"
    );
}
