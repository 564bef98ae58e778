//! The flags of the programs that read a config (ripgrep's `flags/`): each module holds a
//! program's `Args` (clap) and its `config`, the one merge of defaults, `--config` and flags
//! ([`crate::settings::merge`]); the programs in `src/bin/` parse, call `config`, and run.

pub mod finetune;
pub mod precompute;
pub mod train;

/// A TOML file holding `text` in a fresh temporary directory (kept while the guard lives).
#[cfg(test)]
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(&f, text).unwrap();
    let path = f.to_str().unwrap().to_string();
    (dir, path)
}
