//! `lmd-bench optimizer`: the AdamW step of a model's parameters (global norm, clipping,
//! update) as the trainer runs it off the fused CPU backend, flat ([`Update::Flat`]) beside
//! per parameter ([`Update::PerParam`]), in alternating rounds on the same gradients.
//!
//! On a GPU each candle op is a kernel launch, so the figure there is mostly the launch count
//! (the flat update's ~20 ops and 3 copies a parameter against ~17 ops a parameter); on a CPU
//! it is mostly passes over memory, where the flat update makes more. The summary line says
//! which one the trainer takes on the device ([`Update::Auto`]).

use crate::optim::{AdamW, Update};
use crate::{Error, Result};
use lmd_model::candle::backprop::GradStore;
use lmd_model::candle::Tensor;
use serde_json::json;
use std::time::Instant;

use super::steps::merged;
use super::StepTarget;

/// Options of `lmd-bench optimizer`.
#[derive(Debug, Clone)]
pub struct OptimizerBenchOptions {
    /// The model whose parameters are updated (its encoder and decoder).
    pub preset: lmd_model::Preset,
    /// Timed steps per round and update.
    pub steps: usize,
    /// Alternating rounds (flat, then per parameter, each round).
    pub rounds: usize,
    pub target: StepTarget,
}

impl Default for OptimizerBenchOptions {
    fn default() -> Self {
        OptimizerBenchOptions {
            preset: lmd_model::Preset::Tiny,
            steps: 10,
            rounds: 3,
            target: StepTarget::default(),
        }
    }
}

/// Run `lmd-bench optimizer`: a line per update (its best round's seconds a step), then a
/// summary line with per-parameter / flat.
pub fn optimizer(
    opts: &OptimizerBenchOptions,
    mut emit: impl FnMut(serde_json::Value),
) -> Result<()> {
    if opts.steps == 0 || opts.rounds == 0 {
        return Err(Error::Invalid(
            "--steps and --rounds must be at least 1".into(),
        ));
    }
    let (dev, backend) = opts.target.open()?;
    if backend.fused_ops() {
        return Err(Error::Invalid(format!(
            "on {} in {} the trainer updates in place per parameter (the fused CPU backend): \
             the flat update runs with --precision bf16, on a GPU, or with LMD_KERNELS=candle",
            opts.target.device, opts.target.precision
        )));
    }
    // each update its own copy of the model's parameters (the same seed: the same values)
    let cfg = opts.preset.config();
    let make = |update| -> Result<AdamW> {
        let vm = candle_nn::VarMap::new();
        lmd_model::LatentMae::init_on(&cfg, backend, &vm, 0, &dev)
            .map_err(lmd_model::Error::from)?;
        Ok(AdamW::over_varmap(&vm, |_| true, Default::default())?
            .on_backend(backend)
            .with_update(update))
    };
    let mut arms = [
        (Update::Flat, make(Update::Flat)?),
        (Update::PerParam, make(Update::PerParam)?),
    ];
    // one set of gradients in the optimiser's order (small: clipping stays off, so every step
    // is the same work)
    let grads = arms[0]
        .1
        .vars()
        .iter()
        .map(|v| v.as_tensor().randn_like(0.0, 1.0)? * 1e-4)
        .collect::<lmd_model::candle::Result<Vec<Tensor>>>()?;
    let values: usize = grads.iter().map(|g| g.elem_count()).sum();
    let step = |opt: &mut AdamW| -> Result<f64> {
        let mut g = GradStore::default();
        for (var, grad) in opt.vars().into_iter().zip(&grads) {
            g.insert(var.as_tensor(), grad.clone());
        }
        let norm = opt.clip_and_step(&mut g, 1.0, 1e-4)?;
        dev.synchronize()?;
        Ok(norm)
    };
    // a warm-up step each, then alternating timed rounds
    for (_, opt) in arms.iter_mut() {
        step(opt)?;
    }
    let mut best = [f64::INFINITY; 2];
    let mut norms = [0.0; 2];
    for _ in 0..opts.rounds {
        for (i, (_, opt)) in arms.iter_mut().enumerate() {
            let t = Instant::now();
            for _ in 0..opts.steps {
                norms[i] = step(opt)?;
            }
            best[i] = best[i].min(t.elapsed().as_secs_f64() / opts.steps as f64);
        }
    }
    let base = json!({
        "bench": "optimizer", "preset": opts.preset, "tensors": grads.len(), "values": values,
        "steps": opts.steps, "rounds": opts.rounds,
        "threads": lmd_model::candle::utils::get_num_threads(),
    });
    let line = |extra| merged(merged(base.clone(), opts.target.fields()), extra);
    for (i, (update, _)) in arms.iter().enumerate() {
        emit(line(
            json!({"update": update.as_str(), "s_per_step": best[i], "grad_norm": norms[i]}),
        ));
    }
    emit(line(json!({
        "summary": "per-param-vs-flat", "per_param_over_flat": best[1] / best[0],
        "trainer_uses": Update::Auto.resolve(&dev).as_str(),
    })));
    // the same update: the two arms' parameters agree
    let sum = |opt: &AdamW| -> Result<f64> {
        let mut s = 0.0;
        for v in opt.vars() {
            s += v
                .as_tensor()
                .to_dtype(lmd_model::candle::DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        Ok(s)
    };
    let (a, b) = (sum(&arms[0].1)?, sum(&arms[1].1)?);
    if (a - b).abs() > 1e-3 * a.abs().max(1.0) {
        return Err(Error::Invalid(format!(
            "the flat and per-parameter updates disagree: parameter sums {a} and {b}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both updates run on the same gradients and agree (the run fails otherwise), and the
    /// lines name the update, the sizes and which one the trainer uses here.
    #[test]
    fn optimizer_bench_times_both_updates_and_they_agree() {
        let opts = OptimizerBenchOptions {
            steps: 1,
            rounds: 2,
            target: StepTarget {
                precision: lmd_model::Precision::Bf16,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut lines = vec![];
        optimizer(&opts, |l| lines.push(l)).unwrap();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0]["update"], "flat");
        assert_eq!(lines[1]["update"], "per-param");
        let values = lmd_model::Preset::Tiny.config();
        assert!(
            lines[0]["values"].as_u64().unwrap() as usize > values.embed_dim * values.embed_dim
        );
        let (a, b) = (
            lines[0]["grad_norm"].as_f64().unwrap(),
            lines[1]["grad_norm"].as_f64().unwrap(),
        );
        assert!(a > 0.0 && (a - b).abs() < 1e-4 * a, "{a} vs {b}");
        assert!(lines[2]["per_param_over_flat"].as_f64().unwrap() > 0.0);
        assert_eq!(lines[2]["trainer_uses"], "per-param");
    }
}
