//! The flags of the programs that read a config (ripgrep's `flags/`): each module holds a
//! program's `Args` (clap) and its `config`, the one merge of defaults, `--config` and flags
//! ([`crate::settings::merge`]); the programs in `src/bin/` parse, call `config`, and run.

pub mod finetune;
pub mod precompute;
pub mod train;

use serde::Serialize;

/// The flags of [`lmd_train::RunSettings`] (seed, device, logging), shared by lmd-train and
/// lmd-finetune and flattened into their settings, as `RunSettings` is into their configs.
#[derive(clap::Args, Serialize, Debug, Clone)]
pub struct RunFlags {
    /// Seed of the initial weights, the masking and drop-path noise and the loader's order.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// cpu or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<lmd_train::DeviceSpec>,
    /// Log a metrics line every this many steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_every: Option<u64>,
    /// TF32 tensor-core matmuls for f32 on a GPU: true (default) or false.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tf32: Option<bool>,
    /// f32, or bf16: mixed precision (bf16 matmuls, f32 master weights, norms and loss).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<lmd_train::model::Precision>,
    /// Local cache for remote datasets (--data s3://...): default $LMD_CACHE_DIR, else
    /// ~/.cache/lmd/shards. Shards are fetched once, checksummed, and reused across runs.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<std::path::PathBuf>,
    /// The most the cache may hold (e.g. 200G; 0: no limit; default $LMD_CACHE_LIMIT):
    /// least recently used shards of other datasets are deleted first.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_limit: Option<String>,
}

/// Parse the command line `line` (its pieces joined; `{c}` stands for the config file), with a
/// config file holding `toml` in a fresh temporary directory (kept while the guard lives).
#[cfg(test)]
fn parse_with_config<A: clap::Parser>(toml: &str, line: &[&str]) -> (tempfile::TempDir, String, A) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(&f, toml).unwrap();
    let c = f.to_str().unwrap().to_string();
    let line = line.concat().replace("{c}", &c);
    let a = A::try_parse_from(line.split(' ')).unwrap();
    (dir, c, a)
}
