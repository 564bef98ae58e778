//! `VitClassifier`: the latent MAE's encoder with a classification head, for fine-tuning and
//! linear probing (facebookresearch/mae `models_vit.VisionTransformer`, `main_finetune.py`,
//! `main_linprobe.py`).
//!
//! Parameter names follow MAE's fine-tuning checkpoints: `patch_embed.proj`, `cls_token`,
//! `pos_embed` (fixed), `blocks.N.*`, then either `norm` (cls pooling) or `fc_norm` (global
//! average pooling, MAE's `global_pool`), and `head`. For linear probing the head is MAE's
//! `Sequential(BatchNorm1d(affine=False), Linear)`: `head.0.running_mean`/`running_var`
//! (fixed feature statistics) and `head.1.weight`/`bias`.
//!
//! Shapes: `[B, C, H, W]` latents -> `[B, D]` features -> `[B, K]` logits.

use crate::checkpoint::{save_varmap, set_vars};
use crate::nn::{linear, LayerNorm, Linear};
use crate::rng::SplitMix;
use crate::vit::{DropPath, Encoder};
use crate::{Backend, MaeConfig};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

/// Classifier configuration (saved beside each checkpoint as `classifier.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    /// The encoder (its decoder fields are ignored).
    pub encoder: MaeConfig,
    pub num_classes: usize,
    /// Average the patch tokens and apply `fc_norm` (true), or take the normalised cls token.
    pub global_pool: bool,
    /// Stochastic depth rate of the last block (timm: linearly from 0 at the first block).
    pub drop_path: f64,
    /// Linear-probe head (`head.0` feature statistics + `head.1` linear).
    pub linear_probe: bool,
}

/// The encoder + head.
#[derive(Debug, Clone)]
pub struct VitClassifier {
    cfg: ClassifierConfig,
    encoder: Encoder,
    /// `norm` (cls pooling) or `fc_norm` (global pooling).
    norm: LayerNorm,
    /// Linear probe: (running_mean, running_var) of the features.
    feature_stats: Option<(Tensor, Tensor)>,
    head: Linear,
    backend: Backend,
}

/// Names of the encoder parameters a pretrained MAE checkpoint provides for `cfg`: the
/// encoder's ([`Encoder::owns`]; `pos_embed` is fixed, so not a variable) and, with cls
/// pooling, its final `norm`.
fn is_encoder_param(name: &str, cfg: &ClassifierConfig) -> bool {
    Encoder::owns(name) || (!cfg.global_pool && name.starts_with("norm."))
}

impl VitClassifier {
    /// The classifier on the backend resolved from `vb` ([`Backend::of`]).
    pub fn new(cfg: &ClassifierConfig, vb: VarBuilder) -> Result<Self> {
        let backend = Backend::of(&vb)?;
        Self::new_on(cfg, backend, vb)
    }

    /// [`new`](Self::new) on a given backend.
    pub fn new_on(cfg: &ClassifierConfig, backend: Backend, vb: VarBuilder) -> Result<Self> {
        let e = &cfg.encoder;
        e.validate().map_err(candle_core::Error::wrap)?;
        if cfg.num_classes < 2 {
            candle_core::bail!("num_classes must be at least 2, not {}", cfg.num_classes);
        }
        let d = e.embed_dim;
        let encoder = Encoder::new(e, backend, &vb)?;
        let norm = LayerNorm::new(
            d,
            e.norm_eps,
            backend,
            vb.pp(if cfg.global_pool { "fc_norm" } else { "norm" }),
        )?;
        let (head, feature_stats) = if cfg.linear_probe {
            let stats = (
                vb.get_with_hints(d, "head.0.running_mean", candle_nn::Init::Const(0.0))?,
                vb.get_with_hints(d, "head.0.running_var", candle_nn::Init::Const(1.0))?,
            );
            (
                linear(d, cfg.num_classes, backend, vb.pp("head.1"))?,
                Some(stats),
            )
        } else {
            (linear(d, cfg.num_classes, backend, vb.pp("head"))?, None)
        };
        Ok(VitClassifier {
            cfg: cfg.clone(),
            encoder,
            norm,
            feature_stats,
            head,
            backend,
        })
    }

    /// A fresh classifier in `varmap`: MAE's init for the encoder (from `seed`), the head's
    /// weight from a truncated normal with `head_std` (MAE: 2e-5 for fine-tuning, 0.01 for
    /// linear probing), zero bias.
    pub fn init(
        cfg: &ClassifierConfig,
        varmap: &VarMap,
        seed: u64,
        head_std: f64,
        dev: &Device,
    ) -> Result<Self> {
        let backend = Backend::resolve(crate::Kernels::Auto, dev, DType::F32)
            .map_err(candle_core::Error::wrap)?;
        Self::init_on(cfg, backend, varmap, seed, head_std, dev)
    }

    /// [`init`](Self::init) on a given backend (f32 weights: [`Backend::for_training`] picks
    /// mixed precision).
    pub fn init_on(
        cfg: &ClassifierConfig,
        backend: Backend,
        varmap: &VarMap,
        seed: u64,
        head_std: f64,
        dev: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, dev);
        let model = Self::new_on(cfg, backend, vb)?;
        crate::mae::reinit_seeded(&cfg.encoder, varmap, seed)?;
        let mut rng = SplitMix(seed ^ 0x4845_4144);
        let w = &model.head.weight;
        let vals: Vec<f32> = (0..w.elem_count())
            .map(|_| loop {
                let z = rng.normal();
                if z.abs() <= 2.0 {
                    break (z * head_std) as f32;
                }
            })
            .collect();
        let data = varmap.data().lock().expect("varmap lock");
        let head = if cfg.linear_probe { "head.1" } else { "head" };
        data[&format!("{head}.weight")].set(&Tensor::from_vec(vals, w.shape(), dev)?)?;
        if let Some((_, var)) = &model.feature_stats {
            data["head.0.running_var"].set(&var.ones_like()?)?;
        }
        drop(data);
        Ok(model)
    }

    pub fn config(&self) -> &ClassifierConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.encoder.pos_embed().device()
    }

    /// The backend this model computes on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Copy the encoder weights from a pretrained MAE checkpoint (safetensors, MAE names, e.g.
    /// an `lmd-train` checkpoint or a converted official one) into `varmap`. Every encoder
    /// parameter must be present with its shape; the decoder, `mask_token` and (with global
    /// pooling) `norm` are ignored, as MAE's fine-tuning does. Returns the names copied.
    pub fn load_pretrained(
        &self,
        varmap: &VarMap,
        path: &std::path::Path,
    ) -> crate::Result<Vec<String>> {
        let werr = |detail: String| crate::Error::Weights {
            path: path.to_path_buf(),
            detail,
        };
        let tensors = crate::checkpoint::read_tensors(path, self.device())?;
        let pos_embed = self.encoder.pos_embed();
        if let Some(t) = tensors.get("pos_embed") {
            if t.shape() != pos_embed.shape() {
                return Err(werr(format!(
                    "pos_embed has shape {:?}, the model's {:?}: the checkpoint is for another width, input or patch size",
                    t.shape().dims(),
                    pos_embed.shape().dims()
                )));
            }
        }
        let cfg = &self.cfg;
        set_vars(varmap, &tensors, path, |n| is_encoder_param(n, cfg)).map_err(|e| match e {
            crate::Error::Weights { path, detail } if detail.starts_with("missing") => {
                crate::Error::Weights {
                    path,
                    detail: format!("not an MAE encoder checkpoint for this model: {detail}"),
                }
            }
            e => e,
        })
    }

    /// Pooled, normalised features `[B, D]`. `drop_seed`: stochastic depth on (training),
    /// masks drawn from the seed; `None`: deterministic (evaluation).
    pub fn features(&self, x: &Tensor, drop_seed: Option<u64>) -> Result<Tensor> {
        self.features_at(x, drop_seed.map(|s| (s, 0)))
    }

    /// [`features`](Self::features) with stochastic depth drawn per sample from
    /// `(seed, first + i)` (`first`: the batch's global position, so masks do not depend on the
    /// number of data-parallel ranks).
    pub fn features_at(&self, x: &Tensor, drop: Option<(u64, u64)>) -> Result<Tensor> {
        let drop = drop.map(|(seed, first)| DropPath {
            max_rate: self.cfg.drop_path,
            seed,
            first,
        });
        let x = self.encoder.forward(x, None, drop)?;
        if self.cfg.global_pool {
            self.norm.forward(&x.i((.., 1..))?.mean(1)?)
        } else {
            self.norm.forward(&x)?.i((.., 0))
        }
    }

    /// The head on features: `[B, D]` -> `[B, K]` (linear probe: normalised by the stored
    /// feature statistics first, BatchNorm1d(affine=False, eps=1e-6) in eval mode).
    /// Logits in f32 under any precision.
    pub fn head(&self, feats: &Tensor) -> Result<Tensor> {
        let logits = match &self.feature_stats {
            Some((mean, var)) => {
                let f = feats
                    .broadcast_sub(mean)?
                    .broadcast_div(&(var + 1e-6)?.sqrt()?)?;
                self.head.forward(&f)?
            }
            None => self.head.forward(feats)?,
        };
        self.backend.full(&logits)
    }

    /// Logits `[B, K]`.
    pub fn forward_t(&self, x: &Tensor, drop_seed: Option<u64>) -> Result<Tensor> {
        self.head(&self.features(x, drop_seed)?)
    }

    /// Logits `[B, K]` with stochastic depth from `(seed, first + i)` per sample.
    pub fn forward_at(&self, x: &Tensor, seed: u64, first: u64) -> Result<Tensor> {
        self.head(&self.features_at(x, Some((seed, first)))?)
    }

    /// Save parameters and `pos_embed` with MAE's fine-tuning names, atomically.
    pub fn save(&self, varmap: &VarMap, path: &std::path::Path) -> crate::Result<()> {
        save_varmap(
            varmap,
            vec![("pos_embed", self.encoder.pos_embed().clone())],
            path,
        )
    }

    /// Load a classifier saved by [`VitClassifier::save`] into a fresh `VarMap`.
    pub fn load(
        cfg: &ClassifierConfig,
        path: &std::path::Path,
        dev: &Device,
    ) -> crate::Result<(Self, VarMap)> {
        let tensors = crate::checkpoint::read_tensors(path, dev)?;
        let varmap = VarMap::new();
        let model = Self::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
        set_vars(&varmap, &tensors, path, |_| true)?;
        Ok((model, varmap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(global_pool: bool, linear_probe: bool) -> ClassifierConfig {
        ClassifierConfig {
            encoder: MaeConfig {
                in_chans: 4,
                img_size: [8, 8],
                patch_size: 2,
                embed_dim: 32,
                depth: 3,
                num_heads: 2,
                decoder_embed_dim: 16,
                decoder_depth: 1,
                decoder_num_heads: 2,
                mlp_ratio: 2.0,
                norm_pix_loss: false,
                norm_eps: 1e-6,
            },
            num_classes: 5,
            global_pool,
            drop_path: 0.2,
            linear_probe,
        }
    }

    #[test]
    fn encoder_weights_come_from_a_pretrained_mae_and_every_param_gets_a_gradient() {
        let dev = Device::Cpu;
        let c = cfg(true, false);
        let mae_vm = VarMap::new();
        let mae = crate::LatentMae::init(&c.encoder, &mae_vm, 7, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("mae.safetensors");
        mae.save(&mae_vm, &ck).unwrap();

        let vm = VarMap::new();
        let clf = VitClassifier::init(&c, &vm, 1, 2e-5, &dev).unwrap();
        let loaded = clf.load_pretrained(&vm, &ck).unwrap();
        assert!(loaded.contains(&"blocks.2.mlp.fc2.weight".to_string()));
        assert!(!loaded
            .iter()
            .any(|n| n.starts_with("norm.") || n.starts_with("decoder")));
        let a = vm.data().lock().unwrap()["blocks.0.attn.qkv.weight"]
            .as_tensor()
            .clone();
        let b = mae_vm.data().lock().unwrap()["blocks.0.attn.qkv.weight"]
            .as_tensor()
            .clone();
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        // the same encoder features as the MAE's encoder-only forward with global pooling
        let x = Tensor::randn(0f32, 1.0, (3, 4, 8, 8), &dev).unwrap();
        let fc = vm.data().lock().unwrap()["fc_norm.weight"]
            .as_tensor()
            .clone();
        let fb = vm.data().lock().unwrap()["fc_norm.bias"]
            .as_tensor()
            .clone();
        let want = mae
            .forward_features(&x, crate::Pool::Mean, Some((&fc, &fb)))
            .unwrap();
        let got = clf.features(&x, None).unwrap();
        let d = crate::test_util::maxdiff(&want, &got);
        assert!(d < 1e-5, "{d}");
        // drop path changes the training forward, deterministically per seed
        let t1 = clf.features(&x, Some(3)).unwrap().to_vec2::<f32>().unwrap();
        let t2 = clf.features(&x, Some(3)).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(t1, t2);
        // every parameter gets a gradient through a cross-entropy-like loss (a seed whose
        // stochastic depth keeps each branch for at least one of the 3 samples)
        let logits = clf.forward_t(&x, Some(7)).unwrap();
        let loss = candle_nn::ops::log_softmax(&logits, 1)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in vm.data().lock().unwrap().iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let n = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "zero gradient for {name}");
        }
        // save + load round trip
        let p = dir.path().join("clf.safetensors");
        clf.save(&vm, &p).unwrap();
        let (clf2, _) = VitClassifier::load(&c, &p, &dev).unwrap();
        let y1 = clf.forward_t(&x, None).unwrap().to_vec2::<f32>().unwrap();
        let y2 = clf2.forward_t(&x, None).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y1, y2);
    }

    #[test]
    fn pretrained_checkpoint_of_another_shape_is_refused_with_the_tensor_named() {
        let dev = Device::Cpu;
        let mut other = cfg(false, true);
        other.encoder.embed_dim = 16;
        let mae_vm = VarMap::new();
        let mae = crate::LatentMae::init(&other.encoder, &mae_vm, 7, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("mae.safetensors");
        mae.save(&mae_vm, &ck).unwrap();
        let c = cfg(false, true);
        let vm = VarMap::new();
        let clf = VitClassifier::init(&c, &vm, 1, 0.01, &dev).unwrap();
        let e = clf.load_pretrained(&vm, &ck).unwrap_err().to_string();
        assert!(e.contains("mae.safetensors") && e.contains("shape"), "{e}");
        // the linear-probe names
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        for n in [
            "head.0.running_mean",
            "head.0.running_var",
            "head.1.weight",
            "norm.weight",
        ] {
            assert!(names.contains(&n.to_string()), "{n} missing: {names:?}");
        }
    }
}
