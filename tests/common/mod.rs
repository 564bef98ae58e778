//! Helpers shared by the workspace integration tests (included with `mod common;`).
#![allow(dead_code)]

use lmd_train::data::shard::{RecordLayout, Scaling, ShardMeta, WeightFile};
use lmd_train::data::DType;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `settings` (TOML) with the `[model]` table of the tiny MAE the program tests train: 4x8x8
/// latents in patches of 2, width 64, depth 2, a 32-wide decoder of depth 1.
pub fn with_tiny_mae(settings: &str) -> String {
    format!(
        "{settings}
[model]
in_chans = 4
img_size = [8, 8]
patch_size = 2
embed_dim = 64
depth = 2
num_heads = 2
decoder_embed_dim = 32
decoder_depth = 1
decoder_num_heads = 2
mlp_ratio = 4.0
norm_pix_loss = true
"
    )
}

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
