//! Stage 1, plan: everything decided before any image is read. The inputs are resolved first
//! (a typo in a path should not wait for, or download, the VAE), then the VAE is loaded and the
//! shard metadata (shape, fields, preprocessing, VAE identity) is fixed.

use std::path::PathBuf;

use lmd_data::pipeline::PipelineConfig;
use lmd_data::shard::{
    Field, Preprocessing, RecordLayout, Scaling, ShardMeta, VaeIdentity, WeightFile,
};
use lmd_data::source::{InputSpec, Labels};
use lmd_data::transform::TransformConfig;
use lmd_model::candle::Device;
use lmd_model::vae::Vae;

use super::{PrecomputeConfig, Store};
use crate::{Error, Result};

/// A job's fixed decisions.
pub(super) struct Plan {
    pub(super) inputs: Vec<InputSpec>,
    pub(super) transform: TransformConfig,
    pub(super) device: Device,
    pub(super) vae: Box<dyn Vae>,
    pub(super) meta: ShardMeta,
}

impl Plan {
    pub(super) fn make(cfg: &PrecomputeConfig) -> Result<Plan> {
        if cfg.inputs.is_empty() {
            return Err(Error::Invalid("no --input given".into()));
        }
        if cfg.num_workers == 0 || cfg.worker_index >= cfg.num_workers {
            return Err(Error::Invalid(format!(
                "--worker-index {} is not below --num-workers {}",
                cfg.worker_index, cfg.num_workers
            )));
        }
        let transform = cfg.transform()?;
        let inputs = cfg
            .inputs
            .iter()
            .map(|i| match &cfg.kind {
                Some(k) => {
                    InputSpec::with_kind(i, *k, cfg.synsets.as_deref(), cfg.val_labels.as_deref())
                }
                None => InputSpec::detect(i, cfg.synsets.as_deref(), cfg.val_labels.as_deref()),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let device = cfg.device.open()?;
        let weights = cfg.vae_weights.clone().unwrap_or_else(|| {
            PathBuf::from(format!("hf:{}", lmd_model::vae::hub::default_repo(cfg.vae)))
        });
        let vae = lmd_model::vae::load_vae(cfg.vae, &weights, &device, cfg.vae_precision)?;
        let meta = shard_meta(cfg, &transform, vae.as_ref())?;
        Ok(Plan {
            inputs,
            transform,
            device,
            vae,
            meta,
        })
    }

    /// Samples this run will deliver, from the inputs' headers (for the progress bar's ETA).
    pub(super) fn expected(&self, cfg: &PrecomputeConfig, start_seq: u64) -> Option<u64> {
        self.inputs
            .iter()
            .map(|i| i.count_samples())
            .sum::<Option<u64>>()
            .map(|n| if cfg.limit > 0 { n.min(cfg.limit) } else { n })
            .map(|n| n.saturating_sub(start_seq) / cfg.num_workers as u64)
    }

    /// The decode stage's settings, starting at input position `start_seq`.
    pub(super) fn pipeline(&self, cfg: &PrecomputeConfig, start_seq: u64) -> PipelineConfig {
        PipelineConfig {
            transform: self.transform.clone(),
            batch_size: cfg.batch_size.max(1),
            workers: cfg.decode_threads.max(1),
            labels: if cfg.require_labels {
                Labels::Required
            } else {
                Labels::Optional
            },
            start_seq,
            split: (cfg.num_workers as u64, cfg.worker_index as u64),
            limit: cfg.limit,
            ..Default::default()
        }
    }
}

/// The metadata every shard of the job carries.
fn shard_meta(cfg: &PrecomputeConfig, tcfg: &TransformConfig, vae: &dyn Vae) -> Result<ShardMeta> {
    let is_kl = vae.id().name != "taesd";
    let fields = match (cfg.store, is_kl) {
        (Store::Latent, _) => vec![Field::Latent],
        (Store::Mean, true) => vec![Field::Mean],
        (Store::MeanLogvar, true) => vec![Field::Mean, Field::Logvar],
        (s, false) => {
            return Err(Error::Invalid(format!(
                "--store {s:?} needs a KL VAE (sd-vae); {} has no posterior",
                vae.id().name
            )))
        }
    };
    let layout = RecordLayout {
        fields,
        views: tcfg.views,
        flip: tcfg.flip,
    };
    let down = vae.downsample();
    let s = cfg.size as usize;
    Ok(ShardMeta {
        latent_shape: [vae.latent_channels(), s / down, s / down],
        dtype: cfg.dtype,
        layout,
        labels: cfg.require_labels,
        vae: VaeIdentity {
            name: vae.id().name.clone(),
            weights: vae
                .id()
                .weights
                .iter()
                .map(|w| WeightFile {
                    file: w.file.clone(),
                    sha256: w.sha256.clone(),
                })
                .collect(),
        },
        preprocessing: Preprocessing {
            size: cfg.size,
            resize: "shorter-side".into(),
            crop: tcfg.crop.name().into(),
            filter: tcfg.filter.name().into(),
            views: tcfg.views,
            flip: tcfg.flip,
            input_range: vae.input_range().as_str().into(),
        },
        scaling: Scaling {
            factor: vae.scaling_factor(),
            applied: true,
        },
        writer: format!("lmd-precompute {}", env!("CARGO_PKG_VERSION")),
        records_per_block: 0,
        byte_shuffle: true,
        zstd_level: 3,
    })
}
