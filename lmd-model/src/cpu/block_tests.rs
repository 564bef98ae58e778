//! The fused block against the composite block: forward, every gradient, drop path,
//! reproducibility and the errors that name a wrong parameter.

use super::*;
use crate::test_util::maxdiff;
use crate::vit::Block;
use crate::Backend;
use candle_core::{Device, Module, Var};
use candle_nn::{VarBuilder, VarMap};

/// A block with every parameter random (LayerNorm affines too), and its variables by name.
fn random_block(dim: usize, heads: usize, seed: u64) -> (Block, Vec<(String, Var)>) {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let block = Block::new(dim, heads, 4.0, 1e-6, Backend::Fused, vb).unwrap();
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rng = crate::rng::SplitMix(seed);
    for (_, v) in &vars {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|_| (rng.uniform() * 2.0 - 1.0) as f32 * 0.5)
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &dev).unwrap())
            .unwrap();
    }
    assert_eq!(vars.len(), 12);
    (block, vars)
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = crate::rng::SplitMix(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The fused block equals the composite one: output, input gradient and all twelve
/// parameter gradients, over shapes with 1 and several heads and odd token counts.
#[test]
fn fused_block_matches_composite_forward_and_every_gradient() {
    for (b, n, dim, heads, seed) in [(3, 7, 12, 3, 1), (2, 50, 16, 1, 2), (4, 13, 24, 4, 3)] {
        let (block, vars) = random_block(dim, heads, seed);
        let x = Var::from_tensor(&random(&[b, n, dim], seed + 10)).unwrap();
        assert_eq!(
            Backend::resolve(crate::Kernels::Fused, x.device(), x.dtype()).unwrap(),
            Backend::Fused
        );
        let fused = super::block(x.as_tensor(), block.params(), heads, 1e-6, None).unwrap();
        let composite = block.forward_composite(x.as_tensor()).unwrap();
        assert_same(&fused, &composite, &x, vars, seed);
    }
}

/// With stochastic depth: each sample's attention and MLP branches scaled by its factors
/// (0 drops the branch), against the composite block with the same factors.
#[test]
fn fused_block_with_drop_path_matches_composite() {
    let (b, n, dim, heads) = (4, 9, 12, 3);
    let (block, vars) = random_block(dim, heads, 31);
    let x = Var::from_tensor(&random(&[b, n, dim], 32)).unwrap();
    let keep = [vec![1.25, 0.0, 1.25, 1.25], vec![0.0, 1.25, 1.25, 0.0]];
    let fused = super::block(
        x.as_tensor(),
        block.params(),
        heads,
        1e-6,
        Some(keep.clone()),
    )
    .unwrap();
    let composite = block.forward_composite_keep(x.as_tensor(), &keep).unwrap();
    assert_same(&fused, &composite, &x, vars, 33);
    // the drop-path forward of the block takes the fused path and draws the same factors
    // (one stream per sample, each drawing attention's factor then the MLP's)
    let mut r1: Vec<_> = (0..b as u64)
        .map(|i| crate::rng::SplitMix::for_sample(5, i))
        .collect();
    let mut r2: Vec<_> = (0..b as u64)
        .map(|i| crate::rng::SplitMix::for_sample(5, i))
        .collect();
    let y = block
        .forward_drop_path(x.as_tensor(), 0.5, &mut r1)
        .unwrap();
    let mut keep: [Vec<f32>; 2] = [vec![], vec![]];
    for r in r2.iter_mut() {
        for k in keep.iter_mut() {
            k.push(if r.uniform() < 0.5 { 2.0 } else { 0.0 });
        }
    }
    let want = block.forward_composite_keep(x.as_tensor(), &keep).unwrap();
    assert!(maxdiff(&y, &want) < 2e-5);
    let err = super::block(
        x.as_tensor(),
        block.params(),
        heads,
        1e-6,
        Some([vec![1.0], vec![1.0]]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("one entry per sample"), "{err}");
}

/// `fused` and `composite` (outputs of `x`) agree, and so do the gradients of `sum(y · probe)`
/// for `x` and every variable.
fn assert_same(fused: &Tensor, composite: &Tensor, x: &Var, vars: Vec<(String, Var)>, seed: u64) {
    let d = maxdiff(fused, composite);
    assert!(d < 2e-5, "forward differs by {d}");
    let probe = random(fused.dims(), seed + 20);
    let g1 = (fused * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g2 = (composite * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut checked = 0;
    for (name, v) in std::iter::once(("x".to_string(), x.clone())).chain(vars) {
        let (a, c) = (
            g1.get(v.as_tensor()).expect("fused gradient"),
            g2.get(v.as_tensor()).expect("composite gradient"),
        );
        let scale = c
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = maxdiff(a, c);
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(
            d <= 2e-5 * (1.0 + scale),
            "{name}: gradient differs by {d} (max {scale})"
        );
        checked += 1;
    }
    assert_eq!(checked, 13);
}

/// Regression (resumed training runs diverged from uninterrupted ones in the 10th digit):
/// the parameter-gradient sums used rayon's `reduce`, whose combining order follows work
/// stealing. The same inputs must give bit-identical gradients every time.
#[test]
fn gradients_are_bit_identical_from_run_to_run() {
    let (block, vars) = random_block(16, 2, 21);
    let x = Var::from_tensor(&random(&[8, 300, 16], 22)).unwrap();
    let grads = || {
        let loss = block
            .forward(x.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        vars.iter()
            .map(|(_, v)| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };
    let first = grads();
    for _ in 0..12 {
        assert!(grads() == first, "gradients differ between identical runs");
    }
}

/// A second backward through the same graph finds the saved activations gone and
/// recomputes them: the same gradients.
#[test]
fn second_backward_recomputes_the_saved_activations() {
    let (block, vars) = random_block(12, 2, 7);
    let x = Var::from_tensor(&random(&[2, 9, 12], 8)).unwrap();
    let loss = block
        .forward(x.as_tensor())
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let g1 = loss.backward().unwrap();
    let g2 = loss.backward().unwrap();
    for v in std::iter::once(&x).chain(vars.iter().map(|(_, v)| v)) {
        let d = maxdiff(
            g1.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        assert_eq!(d, 0.0);
    }
}

/// Without gradients to track (inference) the op saves nothing and gives the same output.
#[test]
fn inference_forward_saves_nothing_and_matches() {
    let (block, _) = random_block(12, 3, 9);
    let x = random(&[2, 5, 12], 10);
    let params: Vec<Tensor> = block.params().iter().map(|p| p.detach()).collect();
    let p: [&Tensor; 12] = std::array::from_fn(|i| &params[i]);
    let y = super::block(&x, p, 3, 1e-6, None).unwrap();
    assert!(!y.track_op());
    let d = maxdiff(&y, &block.forward_composite(&x).unwrap());
    assert!(d < 2e-5, "{d}");
}

#[test]
fn mismatched_parameters_are_named_as_themselves_a_wrong_fc1_bias_too() {
    let (block, _) = random_block(12, 3, 11);
    let mut p = block.params();
    let wrong = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
    p[9] = &wrong; // fc1.bias
    let err = super::block(&random(&[1, 4, 12], 1), p, 3, 1e-6, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mlp.fc1.bias") && !err.contains("fc1.weight"),
        "{err}"
    );
    let mut p = block.params();
    let wrong_w = Tensor::zeros((48, 5), DType::F32, &Device::Cpu).unwrap();
    p[8] = &wrong_w; // fc1.weight
    let err = super::block(&random(&[1, 4, 12], 1), p, 3, 1e-6, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mlp.fc1.weight"), "{err}");
    let p = block.params();
    let err = super::block(&random(&[1, 4, 12], 1), p, 5, 1e-6, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a multiple of 5 heads"), "{err}");
}
