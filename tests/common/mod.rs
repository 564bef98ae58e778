//! Helpers shared by the workspace integration tests (included with `mod common;`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Whether `python3` imports `modules` (comma-separated). Missing is a failure under
/// `LMD_REQUIRE_PYTHON=1` (CI), else the caller skips and this says so.
pub fn python_ok(modules: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("LMD_REQUIRE_PYTHON").as_deref() != Ok("1"),
            "LMD_REQUIRE_PYTHON=1 but python3 with {modules} is missing"
        );
        eprintln!("skipping: python3 with {modules} not found");
    }
    ok
}
