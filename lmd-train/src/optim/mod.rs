//! AdamW with per-parameter weight decay and checkpointable state, plus global grad-norm
//! clipping (candle-nn's `AdamW` keeps its moments private and has no clipping).
//!
//! Update (PyTorch `torch.optim.AdamW`): `p -= lr·wd·p`; `m = β1·m + (1−β1)·g`;
//! `v = β2·v + (1−β2)·g²`; `p -= lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + eps)`.
//!
//! Three ways to run the same update, picked per step from the model's backend and an
//! [`Update`] setting, in one place ([`AdamW::clip_and_step`]):
//! - [`fused`]: in-place passes per parameter (the fused CPU backend, f32);
//! - [`flat`]: every parameter at once as flat vectors, about twenty candle ops whatever the
//!   model's size (PyTorch's `foreach` AdamW): on a GPU ([`Update::Auto`]);
//! - per parameter with candle ops (about fourteen a parameter): on the CPU off the fused
//!   backend (mixed precision, `LMD_KERNELS=candle`), and for a step the flat update cannot
//!   take (a parameter without a gradient).
//!
//! Each parameter's moments are its own tensors; while the flat update runs they are views of
//! the flat moments, so saving, loading and the other two paths see the same values.

mod flat;
mod fused;

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

/// How the update runs off the fused CPU backend (which always updates in place, per
/// parameter). No flag sets it: the trainer takes `Auto`, `lmd-bench optimizer` times the two
/// others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Update {
    /// Flat on a GPU, per parameter on the CPU: PyTorch's default for its AdamW (`foreach`
    /// on CUDA, a loop over the parameters on the CPU). A GPU pays a launch per op; a CPU
    /// runs a parameter's fourteen ops while it is in cache, and the flat ones each stream the
    /// whole model from memory (`lmd-bench optimizer` on 2 cores: the flat step takes 1.2-1.6x
    /// the per-parameter one, BENCHMARKS.md).
    #[default]
    Auto,
    /// All parameters at once, as flat vectors ([`flat`]).
    Flat,
    /// One parameter at a time, with candle ops.
    PerParam,
}

impl Update {
    pub fn as_str(self) -> &'static str {
        match self {
            Update::Auto => "auto",
            Update::Flat => "flat",
            Update::PerParam => "per-param",
        }
    }

    /// `Auto` made concrete for parameters on `device`.
    pub fn resolve(self, device: &lmd_model::candle::Device) -> Update {
        match self {
            Update::Auto if device.is_cuda() => Update::Flat,
            Update::Auto => Update::PerParam,
            u => u,
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
    update: Update,
    /// The flat moments while the parameters' moments are views of them (else `None`: they
    /// are gathered at the next flat step).
    flat: Option<flat::Moments>,
    /// The flat update's per-element coefficients (rebuilt when the lr scales change).
    coeffs: Option<flat::Coeffs>,
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
            update: Update::default(),
            flat: None,
            coeffs: None,
        })
    }

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

    /// Update on `backend` (the model's: [`lmd_model::LatentMae::backend`]) instead of the
    /// one resolved from the parameters' device and dtype.
    pub fn on_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Run the candle-ops update as `update` (the default is [`Update::Auto`]).
    pub fn with_update(mut self, update: Update) -> Self {
        self.update = update;
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
        self.coeffs = None;
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

    /// How this step would run: the flat update when the setting and backend ask for it and
    /// it can take these gradients.
    fn flat_step(&self, grads: &GradStore) -> bool {
        let device = match self.params.first() {
            Some(p) => p.var.device(),
            None => return false,
        };
        self.update.resolve(device) == Update::Flat
            && !self.backend.fused_ops()
            && flat::applies(
                self.params
                    .iter()
                    .map(|p| (&p.var, grads.get(p.var.as_tensor()))),
            )
    }

    /// Global L2 norm of the gradients; scales them down to `max_norm` when above it
    /// (`max_norm <= 0`: no clipping). Returns the norm before clipping.
    ///
    /// The squares are summed on the parameters' device (each parameter's sum, widened to
    /// f64, then their total) and read back once: one host synchronisation per step, not one
    /// per parameter.
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
        if let Some(s) = clip_scale(norm, max_norm) {
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
        match self.flat_step(grads) {
            true => self.step_flat(grads, lr, None).map(|_| ()),
            false => self.step_per_param(grads, lr),
        }
    }

    /// Clip the gradients' global norm to `max_norm` (`<= 0`: no clipping), then update with
    /// learning rate `lr`; returns the norm before clipping. The trainer's step: the flat update
    /// takes the norm from its flat gradient and folds the clipping into its coefficients.
    pub fn clip_and_step(&mut self, grads: &mut GradStore, max_norm: f64, lr: f64) -> Result<f64> {
        if self.flat_step(grads) {
            return self.step_flat(grads, lr, Some(max_norm));
        }
        let norm = self.clip_grad_norm(grads, max_norm)?;
        self.step_per_param(grads, lr)?;
        Ok(norm)
    }

    /// `1 − β^t` for both moments at the step about to be taken (counted).
    fn next_step(&mut self) -> (f64, f64) {
        self.step += 1;
        let t = self.step as i32;
        (1.0 - self.cfg.beta1.powi(t), 1.0 - self.cfg.beta2.powi(t))
    }

    /// The flat update ([`flat`]); with `clip`, the norm is computed (and returned) and the
    /// gradients scaled to it.
    fn step_flat(&mut self, grads: &GradStore, lr: f64, clip: Option<f64>) -> Result<f64> {
        let g = flat::gather(
            self.params
                .iter()
                .filter_map(|p| grads.get(p.var.as_tensor())),
        )?;
        let norm = match clip {
            Some(_) => flat::squared_norm(&g)?.sqrt(),
            None => f64::NAN,
        };
        let scale = clip.and_then(|max| clip_scale(norm, max)).unwrap_or(1.0);
        let bias = self.next_step();
        let moments = match self.flat.take() {
            Some(m) => m,
            None => flat::Moments::gather(self.params.iter().map(|p| (&p.m, &p.v)))?,
        };
        if self.coeffs.is_none() {
            let per = self.params.iter().map(|p| {
                let wd = if p.decay { self.cfg.weight_decay } else { 0.0 };
                (p.var.elem_count(), p.lr_scale, wd)
            });
            self.coeffs = Some(flat::Coeffs::new(per, &g)?);
        }
        let coeffs = self.coeffs.as_ref().expect("built above");
        let (theta, moments) = flat::update(
            &self.cfg,
            &moments,
            coeffs,
            (&g, scale),
            lr,
            bias,
            &self.vars(),
        )?;
        // write back: each parameter its slice, each moment a view of the flat ones
        let mut off = 0;
        for p in &mut self.params {
            let n = p.var.elem_count();
            let shape = p.var.shape().clone();
            p.var
                .set(&theta.narrow(0, off, n)?.reshape(shape.clone())?)?;
            p.m = moments.m.narrow(0, off, n)?.reshape(shape.clone())?;
            p.v = moments.v.narrow(0, off, n)?.reshape(shape)?;
            off += n;
        }
        self.flat = Some(moments);
        Ok(norm)
    }

    /// The update one parameter at a time: in place on the fused CPU backend, else as candle
    /// ops (which replace the moments: the flat ones are gathered again if needed).
    fn step_per_param(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let (c1, c2) = self.next_step();
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
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
            self.flat = None;
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
        // the loaded moments are the parameters' own: the flat ones are gathered again
        self.flat = None;
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

/// The factor that scales gradients of global norm `norm` down to `max_norm` (`None`: no
/// clipping, `max_norm <= 0` or the norm within it).
fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    (max_norm > 0.0 && norm > max_norm).then(|| max_norm / (norm + 1e-6))
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

    /// Vars with decay and without, an lr scale and a shape of each rank, on the candle backend
    /// with `update`.
    fn candle_opt(update: Update) -> (Vec<Var>, AdamW) {
        let dev = Device::Cpu;
        let vals = |n: usize, k: f32| (0..n).map(|i| ((i as f32 + k) * 0.37).sin()).collect();
        let vars = vec![
            Var::from_vec(vals(12, 0.0), (3, 4), &dev).unwrap(),
            Var::from_vec(vals(3, 1.0), 3, &dev).unwrap(),
            Var::from_vec(vals(4, 2.0), (1, 1, 4), &dev).unwrap(),
            Var::from_vec(vals(8, 3.0), (2, 4), &dev).unwrap(),
        ];
        let names = ["l.weight", "l.bias", "mask_token", "head.weight"];
        let named = names
            .iter()
            .map(|n| n.to_string())
            .zip(vars.clone())
            .collect();
        let mut opt = AdamW::new(named, AdamWConfig::default())
            .unwrap()
            .on_backend(Backend::Candle)
            .with_update(update);
        opt.set_lr_scales(|n| if n.starts_with("head") { 0.5 } else { 1.0 });
        (vars, opt)
    }

    fn loss_of(vars: &[Var], step: usize) -> Tensor {
        let k = (step + 1) as f64;
        let terms = [
            (vars[0].as_tensor().sqr().unwrap().sum_all().unwrap() * k).unwrap(),
            vars[1].as_tensor().sin().unwrap().sum_all().unwrap(),
            (vars[2].as_tensor().sum_all().unwrap() * 3.0).unwrap(),
            vars[3].as_tensor().exp().unwrap().sum_all().unwrap(),
        ];
        Tensor::stack(&terms, 0).unwrap().sum_all().unwrap()
    }

    fn values(vars: &[Var]) -> Vec<f32> {
        let flat: Vec<Tensor> = vars.iter().map(|v| v.flatten_all().unwrap()).collect();
        Tensor::cat(&flat, 0).unwrap().to_vec1().unwrap()
    }

    /// The flat update is the per-parameter one: the same parameters, norms and saved moments
    /// over steps with clipping on and off, weight decay on some parameters and an lr scale
    /// on one; and a step where a parameter has no gradient runs per parameter, after which
    /// the flat update goes on from the moments that step left.
    #[test]
    fn flat_update_equals_the_per_parameter_update() {
        let (fv, mut flat) = candle_opt(Update::Flat);
        let (pv, mut per) = candle_opt(Update::PerParam);
        for step in 0..6 {
            let max_norm = if step % 2 == 0 { 0.5 } else { 0.0 };
            let mut norms = vec![];
            for (vars, opt) in [(&fv, &mut flat), (&pv, &mut per)] {
                let mut g = loss_of(vars, step).backward().unwrap();
                if step == 3 {
                    // no gradient for the mask token this step
                    g.remove(vars[2].as_tensor());
                }
                assert_eq!(opt.flat_step(&g), opt.update == Update::Flat && step != 3);
                // on the CPU, Auto is per parameter
                assert_eq!(Update::Auto.resolve(vars[0].device()), Update::PerParam);
                norms.push(opt.clip_and_step(&mut g, max_norm, 0.05).unwrap());
            }
            assert!(
                (norms[0] - norms[1]).abs() < 1e-5 * norms[1],
                "step {step}: {norms:?}"
            );
            for (a, b) in values(&fv).iter().zip(values(&pv)) {
                assert!((a - b).abs() < 1e-6, "step {step}: {a} vs {b}");
            }
        }
        assert!(flat.flat.is_some() && per.flat.is_none());
        // the saved state is the same, in the same names
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("flat.st"), dir.path().join("per.st"));
        flat.save(&a).unwrap();
        per.save(&b).unwrap();
        let (a, b) = (
            lmd_model::candle::safetensors::load(&a, &Device::Cpu).unwrap(),
            lmd_model::candle::safetensors::load(&b, &Device::Cpu).unwrap(),
        );
        assert_eq!(a.len(), 9);
        for (k, x) in &a {
            let y = &b[k];
            assert_eq!(x.dims(), y.dims(), "{k}");
            let (x, y): (Vec<f64>, Vec<f64>) = (
                x.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
                y.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            );
            for (x, y) in x.iter().zip(&y) {
                assert!((x - y).abs() < 1e-6, "{k}: {x} vs {y}");
            }
        }
        // a loaded state replaces the flat moments: the next flat step starts from it
        let (fv2, mut flat2) = candle_opt(Update::Flat);
        for (a, b) in fv2.iter().zip(&fv) {
            a.set(b.as_tensor()).unwrap();
        }
        flat2.load(&dir.path().join("per.st")).unwrap();
        for (vars, opt) in [(&fv2, &mut flat2), (&pv, &mut per)] {
            let mut g = loss_of(vars, 6).backward().unwrap();
            opt.clip_and_step(&mut g, 0.0, 0.05).unwrap();
        }
        for (a, b) in values(&fv2).iter().zip(values(&pv)) {
            assert!((a - b).abs() < 1e-6, "after load: {a} vs {b}");
        }
    }

    /// On the fused CPU backend the moments are updated in place through the flat moments'
    /// views: a flat step, then a fused one, then a flat one again keep one set of moments.
    #[test]
    fn fused_steps_write_through_the_flat_moments() {
        let (fv, mut opt) = candle_opt(Update::Flat);
        let (pv, mut per) = candle_opt(Update::PerParam);
        for step in 0..3 {
            // steps 0 and 2 flat (candle backend), step 1 in place (fused backend)
            opt.backend = if step == 1 {
                Backend::Fused
            } else {
                Backend::Candle
            };
            for (vars, o) in [(&fv, &mut opt), (&pv, &mut per)] {
                let mut g = loss_of(vars, step).backward().unwrap();
                o.clip_and_step(&mut g, 0.0, 0.05).unwrap();
            }
            assert!(opt.flat.is_some(), "step {step}");
            for (a, b) in values(&fv).iter().zip(values(&pv)) {
                assert!((a - b).abs() < 1e-5, "step {step}: {a} vs {b}");
            }
        }
        let m: Vec<f32> = opt.flat.as_ref().unwrap().m.to_vec1().unwrap();
        let views: Vec<Tensor> = opt
            .params
            .iter()
            .map(|p| p.m.flatten_all().unwrap())
            .collect();
        assert_eq!(m, Tensor::cat(&views, 0).unwrap().to_vec1::<f32>().unwrap());
    }

    /// `Auto` is the one choice made from the device; the two others stand as set.
    #[test]
    fn update_resolves_auto_alone() {
        let cpu = Device::Cpu;
        assert_eq!(Update::Auto.resolve(&cpu), Update::PerParam);
        for u in [Update::Flat, Update::PerParam] {
            assert_eq!(u.resolve(&cpu), u);
        }
        assert_eq!(Update::default(), Update::Auto);
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
