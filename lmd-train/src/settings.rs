//! Settings every run shares, pretraining and fine-tuning alike: the seed, the device and how
//! often a step is logged. Each program's config holds one [`RunSettings`], flattened: in TOML,
//! in `config.json` and on the command line the keys stay top-level (`seed = 1`,
//! `--device cuda:0`), while the code reads `cfg.run.seed`. The device is opened here, once per
//! run ([`RunSettings::open_device`]), with the matmul precision stated in the run's config, and
//! the precision becomes the model's backend here ([`RunSettings::backend`]).

use crate::DeviceSpec;
use lmd_model::{Backend, Kernels, Precision};
use serde::{Deserialize, Serialize};

/// The seed, device and logging interval of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunSettings {
    /// Seeds the initial weights, the masking noise and the loader's order.
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N` (CUDA: a build with `--features cuda`).
    pub device: DeviceSpec,
    /// Log a metrics line every this many steps.
    pub log_every: u64,
    /// TF32 tensor-core products for f32 matmuls on a GPU (candle's reduced-precision switch,
    /// PyTorch's `allow_tf32`); nothing changes on the CPU.
    pub tf32: bool,
    /// `f32`, or `bf16`: mixed precision (bf16 matmuls and activations in the forward and
    /// backward, f32 master weights, AdamW moments, LayerNorm, softmax and loss; checkpoints
    /// in f32). `f16` is refused (no loss scaling).
    pub precision: Precision,
    /// Where remote (`s3://`, `gs://`, `az://`) datasets are cached; none: `$LMD_CACHE_DIR`,
    /// else `~/.cache/lmd/shards`.
    pub cache_dir: Option<std::path::PathBuf>,
    /// The most the cache may hold (`200G`, `500M`; `0`: no limit); none: `$LMD_CACHE_LIMIT`.
    pub cache_limit: Option<String>,
}

/// Settings of [`RunSettings`] that never change the numbers (allowed to differ on resume).
pub const RUN_ONLY_SETTINGS: [&str; 2] = ["cache_dir", "cache_limit"];

impl RunSettings {
    /// The cache remote datasets are read through: these settings over the environment's.
    pub fn cache(&self) -> crate::Result<lmd_data::storage::Cache> {
        let mut c = lmd_data::storage::Cache::default();
        if let Some(d) = &self.cache_dir {
            c.dir = d.clone();
        }
        if let Some(l) = &self.cache_limit {
            c.limit = lmd_data::storage::parse_size(l)
                .map_err(|e| crate::Error::Invalid(format!("--cache-limit: {e}")))?;
        }
        Ok(c)
    }

    /// The run's device, opened once, with the matmul precision these settings ask for.
    pub fn open_device(&self) -> crate::Result<lmd_model::candle::Device> {
        let dev = self.device.open()?;
        if dev.is_cuda() {
            lmd_model::candle::cuda::set_gemm_reduced_precision_f32(self.tf32);
        }
        Ok(dev)
    }

    /// The device of one rank of `dist`: under a launcher `cuda` means `cuda:LOCAL_RANK`
    /// ([`crate::dist::Dist::device_for`]).
    pub fn open_device_for(
        &self,
        dist: &crate::dist::Dist,
    ) -> crate::Result<lmd_model::candle::Device> {
        RunSettings {
            device: dist.device_for(self.device),
            ..self.clone()
        }
        .open_device()
    }

    /// The compute path of this run's model on `dev`: the one place the precision is turned
    /// into a backend.
    pub fn backend(&self, dev: &lmd_model::candle::Device) -> crate::Result<Backend> {
        Ok(Backend::for_training(Kernels::Auto, dev, self.precision)?)
    }
}

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            seed: 0,
            device: DeviceSpec::Cpu,
            log_every: 10,
            tf32: true,
            precision: Precision::F32,
            cache_dir: None,
            cache_limit: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::finetune::FinetuneConfig;
    use crate::train::TrainConfig;

    #[test]
    fn run_settings_read_as_top_level_keys_and_unknown_keys_are_still_refused() {
        let c: TrainConfig = toml::from_str("seed = 7\nlog_every = 3\nsteps = 5\n").unwrap();
        assert_eq!((c.run.seed, c.run.log_every, c.steps), (7, 3, 5));
        assert_eq!(c.run.device, crate::DeviceSpec::Cpu);
        let e = toml::from_str::<TrainConfig>("seed = 7\nstepz = 5\n").unwrap_err();
        assert!(e.to_string().contains("stepz"), "{e}");
        let e = toml::from_str::<FinetuneConfig>("epochs = 2\nseeed = 1\n").unwrap_err();
        assert!(e.to_string().contains("seeed"), "{e}");
        // config.json keeps the flat keys
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["seed"], 7);
        assert!(v.get("run").is_none());
    }
}
