//! AdamW with per-parameter weight decay and checkpointable state, plus global grad-norm
//! clipping (candle-nn's `AdamW` keeps its moments private and has no clipping).
//!
//! Update (PyTorch `torch.optim.AdamW`): `p -= lr·wd·p`; `m = β1·m + (1−β1)·g`;
//! `v = β2·v + (1−β2)·g²`; `p -= lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + eps)`.

use crate::{Error, Result};
use lmd_model::candle::{backprop::GradStore, DType, Tensor, Var};
use lmd_model::vit::Encoder;
use lmd_model::{Backend, Kernels};
use std::collections::HashMap;
use std::path::Path;

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    /// Multiplies the learning rate (layer-wise decay in fine-tuning; 1 otherwise).
    lr_scale: f64,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named variables.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Param>,
    step: u64,
    /// Whether the update runs as the in-place CPU passes (`fused`) or as candle ops: the
    /// model's backend decides, as for its layers.
    backend: Backend,
}

/// MAE's rule: no weight decay for biases, norms (1-D tensors) and the cls/mask tokens.
pub fn decays(name: &str, var: &Var) -> bool {
    !(var.rank() <= 1 || name.ends_with(".bias") || name.ends_with("token"))
}

impl AdamW {
    /// Parameters sorted by name (a stable order for state files).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut vars = vars;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                // two allocations: the CPU update writes both moments in place
                Ok(Param {
                    decay: decays(&name, &var),
                    lr_scale: 1.0,
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    name,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let backend = match params.first() {
            Some(p) => Backend::resolve(Kernels::Auto, p.var.device(), p.var.dtype())?,
            None => Backend::Candle,
        };
        Ok(AdamW {
            cfg,
            params,
            step: 0,
            backend,
        })
    }

    /// Update on `backend` (the model's: [`lmd_model::LatentMae::backend`]) instead of the
    /// one resolved from the parameters' device and dtype.
    /// The optimised variables, in the optimiser's (fixed) order.
    pub fn vars(&self) -> Vec<&Var> {
        self.params.iter().map(|p| &p.var).collect()
    }

    /// An order-fixed hash of the parameters' bytes (the ranks' agreement check).
    pub fn param_hash(&self) -> Result<u64> {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for p in &self.params {
            let t = p.var.as_tensor().flatten_all()?.to_dtype(DType::F32)?;
            for x in t.to_vec1::<f32>()? {
                h.update(&x.to_le_bytes());
            }
        }
        Ok(h.digest())
    }

    pub fn on_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Over the variables of `varmap` whose names `keep` accepts.
    pub fn over_varmap(
        varmap: &lmd_model::candle_nn::VarMap,
        keep: impl Fn(&str) -> bool,
        cfg: AdamWConfig,
    ) -> Result<Self> {
        let named = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self::new(named, cfg)
    }

    /// Set each parameter's learning-rate multiplier from its name.
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        for p in &mut self.params {
            p.lr_scale = scale(&p.name);
        }
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Names of the parameters with weight decay.
    pub fn decayed(&self) -> Vec<&str> {
        self.params
            .iter()
            .filter(|p| p.decay)
            .map(|p| p.name.as_str())
            .collect()
    }

    /// Global L2 norm of the gradients; scales them down to `max_norm` when above it
    /// (`max_norm <= 0`: no clipping). Returns the norm before clipping.
    ///
    /// The squares are summed on the parameters' device (in f64) and read back once: one host
    /// synchronisation per step, not one per parameter.
    pub fn clip_grad_norm(&self, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
        let parts = self
            .params
            .iter()
            .filter_map(|p| grads.get(p.var.as_tensor()))
            .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
            .collect::<lmd_model::candle::Result<Vec<_>>>()?;
        let sq = match parts.is_empty() {
            true => 0.0,
            false => Tensor::stack(&parts, 0)?.sum_all()?.to_scalar::<f64>()?,
        };
        let norm = sq.sqrt();
        if max_norm > 0.0 && norm > max_norm {
            let s = max_norm / (norm + 1e-6);
            for p in &self.params {
                if let Some(g) = grads.remove(p.var.as_tensor()) {
                    grads.insert(p.var.as_tensor(), (g * s)?);
                }
            }
        }
        Ok(norm)
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let lr = lr * p.lr_scale;
            let decay = if p.decay { self.cfg.weight_decay } else { 0.0 };
            if self.backend.fused_ops() && fused::applies(p.var.as_tensor(), &p.m, &p.v, g) {
                fused::update(
                    p.var.as_tensor(),
                    &p.m,
                    &p.v,
                    g,
                    &self.cfg,
                    (lr, decay, c1, c2),
                )?;
                continue;
            }
            let mut theta = p.var.as_tensor().clone();
            if p.decay && self.cfg.weight_decay > 0.0 {
                theta = (theta * (1.0 - lr * self.cfg.weight_decay))?;
            }
            p.m = ((&p.m * b1)? + (g * (1.0 - b1))?)?;
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mhat = (&p.m / c1)?;
            let denom = ((&p.v / c2)?.sqrt()? + self.cfg.eps)?;
            let upd = (mhat / denom)?;
            let next = (theta - (upd * lr)?)?;
            p.var.set(&next)?;
        }
        Ok(())
    }

    /// Save moments and step (`NAME.m`, `NAME.v`, `step`) as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for p in &self.params {
            map.insert(format!("{}.m", p.name), p.m.clone());
            map.insert(format!("{}.v", p.name), p.v.clone());
        }
        let dev = self
            .params
            .first()
            .map(|p| p.m.device().clone())
            .unwrap_or(lmd_model::candle::Device::Cpu);
        map.insert("step".into(), Tensor::new(&[self.step as f64], &dev)?);
        lmd_model::candle::safetensors::save(&map, path).map_err(|e| Error::Tensors {
            path: path.to_path_buf(),
            detail: format!("cannot write optimizer state: {e}"),
        })
    }

    /// Restore what [`AdamW::save`] wrote; every parameter must be present with its shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self
            .params
            .first()
            .map(|p| p.m.device().clone())
            .unwrap_or(lmd_model::candle::Device::Cpu);
        let t = lmd_model::candle::safetensors::load(path, &dev).map_err(|e| Error::Tensors {
            path: path.to_path_buf(),
            detail: format!("cannot read optimizer state: {e}"),
        })?;
        for p in &mut self.params {
            for (suffix, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                let k = format!("{}.{suffix}", p.name);
                let x = t.get(&k).ok_or_else(|| Error::Tensors {
                    path: path.to_path_buf(),
                    detail: format!("missing {k}"),
                })?;
                if x.shape() != slot.shape() {
                    return Err(Error::Tensors {
                        path: path.to_path_buf(),
                        detail: format!("{k}: shape {:?}, expected {:?}", x.dims(), slot.dims()),
                    });
                }
                *slot = x.clone();
            }
        }
        let step = t.get("step").ok_or_else(|| Error::Tensors {
            path: path.to_path_buf(),
            detail: "missing step".into(),
        })?;
        self.step = step.to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// MAE's layer-wise lr decay (`lr_decay.param_groups_lrd`): the patch embedding and tokens are
/// layer 0, `blocks.i` layer `i + 1`, everything else (norms, head) layer `depth + 1`; the lr
/// multiplier is `decay^(depth + 1 - layer)`.
pub fn layer_decay_scale(name: &str, depth: usize, decay: f64) -> f64 {
    let layer = if let Some(rest) = name.strip_prefix("blocks.") {
        rest.split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .map_or(depth + 1, |i| i + 1)
    } else if Encoder::owns(name) {
        0 // the patch embedding, cls token and positions
    } else {
        depth + 1
    };
    decay.powi((depth + 1 - layer) as i32)
}

/// MAE's `lr_sched.adjust_learning_rate`: linear warmup, then half-cosine to `min_lr`
/// (by fractional epoch; here by step).
pub fn lr_at(step: u64, total: u64, warmup: u64, lr: f64, min_lr: f64) -> f64 {
    if step < warmup {
        lr * step as f64 / warmup.max(1) as f64
    } else {
        let p = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos())
    }
}

/// The update in three in-place passes for contiguous f32 CPU tensors (moments, then the
/// parameter), instead of about twelve candle ops that each allocate a result.
mod fused {
    use super::AdamWConfig;
    use lmd_model::candle::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

    /// Whether the in-place passes can take these tensors as laid out (contiguous, the same
    /// shape; the device and dtype are the backend's to decide).
    pub(super) fn applies(theta: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> bool {
        [theta, m, v, g].iter().all(|t| t.is_contiguous()) && theta.shape() == g.shape()
    }

    fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
            _ => lmd_model::candle::bail!("adamw: contiguous f32 expected"),
        }
    }

    fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
            _ => lmd_model::candle::bail!("adamw: contiguous f32 expected"),
        }
    }

    /// `m = β·m + (1−β)·g` (or `g²` for the second moment), in place.
    struct Moment {
        beta: f32,
        square: bool,
    }

    impl InplaceOp2 for Moment {
        fn name(&self) -> &'static str {
            "lmd-adamw-moment"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<()> {
            let (m, g) = (slice_mut(s1, l1)?, slice(s2, l2)?);
            let (b, a) = (self.beta, 1.0 - self.beta);
            if self.square {
                m.iter_mut()
                    .zip(g)
                    .for_each(|(m, &g)| *m = b * *m + a * (g * g));
            } else {
                m.iter_mut().zip(g).for_each(|(m, &g)| *m = b * *m + a * g);
            }
            Ok(())
        }
    }

    /// `θ = θ·(1 − lr·wd) − lr · (m / c1) / (sqrt(v / c2) + eps)`, in place.
    struct Step {
        lr: f64,
        decay: f64,
        c1: f64,
        c2: f64,
        eps: f64,
    }

    impl InplaceOp3 for Step {
        fn name(&self) -> &'static str {
            "lmd-adamw-step"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<()> {
            let (theta, m, v) = (slice_mut(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
            let keep = (1.0 - self.lr * self.decay) as f32;
            let (lr, c1, c2, eps) = (
                self.lr as f32,
                self.c1 as f32,
                self.c2 as f32,
                self.eps as f32,
            );
            for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
                *t = *t * keep - lr * ((m / c1) / ((v / c2).sqrt() + eps));
            }
            Ok(())
        }
    }

    /// One AdamW update of `theta` (and its moments) from `g`: `(lr, weight decay, 1 − β1^t,
    /// 1 − β2^t)`.
    pub(super) fn update(
        theta: &Tensor,
        m: &Tensor,
        v: &Tensor,
        g: &Tensor,
        cfg: &AdamWConfig,
        (lr, decay, c1, c2): (f64, f64, f64, f64),
    ) -> Result<()> {
        m.inplace_op2(
            g,
            &Moment {
                beta: cfg.beta1 as f32,
                square: false,
            },
        )?;
        v.inplace_op2(
            g,
            &Moment {
                beta: cfg.beta2 as f32,
                square: true,
            },
        )?;
        theta.inplace_op3(
            m,
            v,
            &Step {
                lr,
                decay,
                c1,
                c2,
                eps: cfg.eps,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmd_model::candle::Device;

    #[test]
    fn adamw_matches_the_reference_update_and_round_trips_state() {
        let dev = Device::Cpu;
        let w = Var::new(&[[1.0f32, -2.0], [0.5, 3.0]], &dev).unwrap();
        let b = Var::new(&[0.1f32, 0.2], &dev).unwrap();
        let mut opt = AdamW::new(
            vec![("l.weight".into(), w.clone()), ("l.bias".into(), b.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        assert_eq!(opt.decayed(), vec!["l.weight"]);
        let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap()
            + b.as_tensor().sum_all().unwrap())
        .unwrap();
        let mut g = loss.backward().unwrap();
        let norm = opt.clip_grad_norm(&mut g, 0.0).unwrap();
        // grads: 2w = [2,-4,1,6], b: [1,1] -> norm sqrt(4+16+1+36+2)
        assert!((norm - 59f64.sqrt()).abs() < 1e-5);
        opt.step(&g, 0.1).unwrap();
        // first step: m̂ = g, v̂ = g², update = g/(|g|+eps) = sign(g)
        let wv: Vec<Vec<f32>> = w.as_tensor().to_vec2().unwrap();
        let expect =
            |p: f32, decay: bool| p * if decay { 1.0 - 0.1 * 0.05 } else { 1.0 } - 0.1 * p.signum();
        assert!((wv[0][0] - expect(1.0, true)).abs() < 1e-6);
        assert!((wv[0][1] - expect(-2.0, true)).abs() < 1e-6);
        let bv: Vec<f32> = b.as_tensor().to_vec1().unwrap();
        assert!((bv[0] - (0.1 - 0.1)).abs() < 1e-6);
        // clipping scales to max_norm
        let mut g2 = loss.backward().unwrap();
        opt.clip_grad_norm(&mut g2, 1.0).unwrap();
        assert!((opt.clip_grad_norm(&mut g2, 0.0).unwrap() - 1.0).abs() < 1e-4);
        // state round trip
        let dir = tempfile::tempdir().unwrap();
        opt.save(&dir.path().join("opt.safetensors")).unwrap();
        let mut o2 = AdamW::new(
            vec![("l.weight".into(), w.clone()), ("l.bias".into(), b.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        o2.load(&dir.path().join("opt.safetensors")).unwrap();
        assert_eq!(o2.steps_taken(), 1);
    }

    /// The in-place f32 update equals the op-by-op one (run in f64) over several steps, with
    /// and without weight decay and with a learning-rate scale.
    #[test]
    fn in_place_update_matches_the_op_by_op_update() {
        let dev = Device::Cpu;
        let w0: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
        let make = |dtype: DType| {
            let w = Var::from_tensor(
                &Tensor::from_vec(w0.clone(), (3, 4), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let b = Var::from_tensor(
                &Tensor::new(&[0.3f32, -0.1, 0.2], &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let mut opt = AdamW::new(
                vec![("l.weight".into(), w.clone()), ("l.bias".into(), b.clone())],
                AdamWConfig::default(),
            )
            .unwrap();
            opt.set_lr_scales(|n| if n.ends_with("bias") { 0.5 } else { 1.0 });
            (w, b, opt)
        };
        let (w32, b32, mut o32) = make(DType::F32);
        let (w64, b64, mut o64) = make(DType::F64);
        assert!(fused::applies(
            w32.as_tensor(),
            &o32.params[1].m,
            &o32.params[1].v,
            w32.as_tensor()
        ));
        for step in 0..4 {
            for (w, b, opt) in [(&w32, &b32, &mut o32), (&w64, &b64, &mut o64)] {
                let loss = ((w.as_tensor().sqr().unwrap().sum_all().unwrap() * (step + 1) as f64)
                    .unwrap()
                    + b.as_tensor().sin().unwrap().sum_all().unwrap())
                .unwrap();
                opt.step(&loss.backward().unwrap(), 0.05).unwrap();
            }
        }
        for (a, b) in [(&w32, &w64), (&b32, &b64)] {
            let a: Vec<f32> = a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f64> = b.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!((*x as f64 - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
        // the moments moved too, and are separate tensors
        let m: Vec<f32> = o32.params[1].m.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = o32.params[1].v.flatten_all().unwrap().to_vec1().unwrap();
        assert!(m.iter().zip(&v).any(|(a, b)| a != b) && v.iter().any(|&x| x > 0.0));
    }

    #[test]
    fn layer_decay_follows_mae() {
        assert_eq!(layer_decay_scale("head.weight", 12, 0.75), 1.0);
        assert_eq!(layer_decay_scale("fc_norm.bias", 12, 0.75), 1.0);
        assert!((layer_decay_scale("blocks.11.attn.qkv.weight", 12, 0.75) - 0.75).abs() < 1e-12);
        assert!(
            (layer_decay_scale("blocks.0.norm1.weight", 12, 0.5) - 0.5f64.powi(12)).abs() < 1e-15
        );
        assert!((layer_decay_scale("cls_token", 12, 0.5) - 0.5f64.powi(13)).abs() < 1e-15);
        assert!(
            (layer_decay_scale("patch_embed.proj.weight", 2, 0.75) - 0.75f64.powi(3)).abs() < 1e-12
        );
    }

    #[test]
    fn lr_schedule_warms_up_then_decays() {
        assert_eq!(lr_at(0, 100, 10, 1.0, 0.0), 0.0);
        assert!((lr_at(5, 100, 10, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
    }
}
