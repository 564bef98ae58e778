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
    /// How this worker's share was chosen.
    pub(super) split: Split,
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
        // a missing bucket or refused credentials: one line, before any input is opened or
        // the VAE loads (a listing of each URL's parent prefix)
        lmd_data::storage::check_access(&cfg.output)?;
        for i in &cfg.inputs {
            lmd_data::storage::check_access(std::path::Path::new(i))?;
        }
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
        let (inputs, split) = split_by_file(inputs, cfg.num_workers, cfg.worker_index)?;
        let device = cfg.device.open()?;
        let weights = cfg.vae_weights.clone().unwrap_or_else(|| {
            PathBuf::from(format!("hf:{}", lmd_model::vae::hub::default_repo(cfg.vae)))
        });
        let vae = lmd_model::vae::load_vae(cfg.vae, &weights, &device, cfg.vae_precision)?;
        let meta = shard_meta(cfg, &transform, vae.as_ref())?;
        Ok(Plan {
            inputs,
            split,
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
            .map(|n| match self.split {
                Split::BySample => n.saturating_sub(start_seq) / cfg.num_workers as u64,
                _ => n.saturating_sub(start_seq),
            })
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
            split: match self.split {
                Split::ByFile { .. } | Split::Single => (1, 0),
                Split::BySample => (cfg.num_workers as u64, cfg.worker_index as u64),
            },
            limit: cfg.limit,
            ..Default::default()
        }
    }
}

/// How the inputs are shared among workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "split")]
pub enum Split {
    /// One worker: everything.
    Single,
    /// Each worker reads only its input files (balanced by bytes).
    ByFile { files: usize, of: usize },
    /// Fewer input files than workers: each reads everything and keeps every N-th sample.
    BySample,
}

/// Assign whole input files to workers when there are at least as many files as workers (all
/// inputs WebDataset shards): largest first, each to the worker with the fewest bytes so far
/// (ties: the lower index), so the split is deterministic and balanced by bytes. This worker's
/// files keep their input order. Otherwise the sample split.
pub(super) fn split_by_file(
    inputs: Vec<InputSpec>,
    workers: usize,
    index: usize,
) -> Result<(Vec<InputSpec>, Split)> {
    if workers <= 1 {
        return Ok((inputs, Split::Single));
    }
    let files: Option<Vec<PathBuf>> = inputs
        .iter()
        .map(|i| match i {
            InputSpec::WebDataset { shards } => Some(shards.clone()),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .map(|v| v.concat());
    let Some(files) = files.filter(|f| f.len() >= workers) else {
        return Ok((inputs, Split::BySample));
    };
    let mut sized = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let n = lmd_data::storage::size_of(f)?
            .ok_or_else(|| Error::Invalid(format!("{}: input file not found", f.display())))?;
        sized.push((n, i));
    }
    let owner = assign_by_bytes(&sized, workers);
    let mine: Vec<PathBuf> = files
        .iter()
        .enumerate()
        .filter(|(i, _)| owner[*i] == index)
        .map(|(_, f)| f.clone())
        .collect();
    let split = Split::ByFile {
        files: mine.len(),
        of: files.len(),
    };
    Ok((vec![InputSpec::WebDataset { shards: mine }], split))
}

/// The worker of each `(bytes, index)` file: largest first to the least-loaded worker.
fn assign_by_bytes(files: &[(u64, usize)], workers: usize) -> Vec<usize> {
    let mut order: Vec<&(u64, usize)> = files.iter().collect();
    order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut load = vec![0u64; workers];
    let mut owner = vec![0usize; files.len()];
    for (bytes, i) in order {
        let w = (0..workers)
            .min_by_key(|w| (load[*w], *w))
            .expect("workers > 0");
        load[w] += bytes;
        owner[*i] = w;
    }
    owner
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

#[cfg(test)]
mod tests {
    use super::assign_by_bytes;

    #[test]
    fn files_go_largest_first_to_the_least_loaded_worker() {
        // sizes 10, 1, 7, 4 over 2 workers: 10 -> 0, 7 -> 1, 4 -> 1, 1 -> 0
        assert_eq!(
            assign_by_bytes(&[(10, 0), (1, 1), (7, 2), (4, 3)], 2),
            vec![0, 0, 1, 1]
        );
        // equal sizes: round robin in input order
        assert_eq!(
            assign_by_bytes(&[(5, 0), (5, 1), (5, 2), (5, 3)], 2),
            vec![0, 1, 0, 1]
        );
        let owner = assign_by_bytes(&[(3, 0), (3, 1), (3, 2)], 3);
        assert_eq!(owner, vec![0, 1, 2]);
    }
}
