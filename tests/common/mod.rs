//! Helpers shared by the workspace integration tests (included with `mod common;`).
#![allow(dead_code)]

use lmd_train::data::shard::{RecordLayout, Scaling, ShardMeta, WeightFile};
use lmd_train::data::DType;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Panic unless `python3` imports `modules` (comma-separated). The tests that call it are
/// `#[ignore = "needs python3 ..."]`: the plain `cargo test` leaves them out and CI runs them
/// with `--include-ignored` after installing the modules.
pub fn require_python(modules: &str) {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "this test needs python3 with {modules} (pip install numpy zstandard xxhash)"
    );
}

/// Shard metadata for test datasets (TAESD-like identity, 224 px center crop).
pub fn shard_meta(
    dtype: DType,
    layout: RecordLayout,
    shape: [usize; 3],
    scaling: Scaling,
) -> ShardMeta {
    let mut m =
        lmd_train::data::synthetic::taesd_like_meta(dtype, layout, shape, "lmd integration tests");
    m.vae.weights = vec![WeightFile {
        file: "taesd_encoder.safetensors".into(),
        sha256: "5f".repeat(32),
    }];
    m.scaling = scaling;
    m
}
