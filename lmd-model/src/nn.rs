//! Differentiable building blocks for training with candle 0.11.
//!
//! candle-nn's fused `layer_norm`, `softmax_last_dim` (and the `LayerNorm` module on contiguous
//! input with a bias) record no backward: gradients silently vanish. These forms are built from
//! primitive ops that all have a backward; `tests` checks them against finite differences.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

/// LayerNorm over the last dimension, `eps` inside the square root (PyTorch semantics, biased variance).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Load `weight` and `bias` of size `dim` (init 1 and 0).
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Differentiable LayerNorm over the last dimension (fused kernel on CPU, see [`crate::fused`]).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    crate::fused::layer_norm(x, w, b, eps)
}

/// LayerNorm from primitive ops (every op has a backward): the reference form.
pub fn layer_norm_composite(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(w)?.broadcast_add(b)
}

/// Differentiable softmax over the last dimension (fused kernel on CPU, see [`crate::fused`]).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    crate::fused::softmax_last_dim(x)
}

/// Softmax from primitive ops (the max shift is detached: it cancels): the reference form.
pub fn softmax_composite(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Linear layer `y = x W^T + b`, PyTorch's weight layout `[out, in]`: one fused node
/// ([`crate::fused::linear`]; leading dims folded into one gemm, so the weight gradient needs no
/// reduction over a broadcast batch dim).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl candle_core::Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::fused::linear(x, &self.weight, &self.bias)
    }
}

/// A [`Linear`] with MAE's init (xavier_uniform weight, zero bias).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = (6.0 / (in_dim + out_dim) as f64).sqrt(); // xavier_uniform, as MAE
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let b = vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?;
    Ok(Linear { weight: w, bias: b })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::maxdiff;
    use candle_core::{DType, Device, Var};

    /// Central finite differences of `sum(f(x) * probe)` against autograd.
    fn check_grad(f: impl Fn(&Tensor) -> Result<Tensor>, shape: &[usize], seed: u64) {
        let dev = Device::Cpu;
        let n: usize = shape.iter().product();
        let mut s = seed;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        let xs: Vec<f64> = (0..n).map(|_| rnd() * 2.0).collect();
        let probe: Vec<f64> = (0..n * 8).map(|_| rnd()).collect();
        let x = Var::from_vec(xs.clone(), shape, &dev).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let p = Tensor::from_vec(probe[..y.elem_count()].to_vec(), y.shape(), &dev).unwrap();
        let loss = (y * &p).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<f64> = grads
            .get(x.as_tensor())
            .expect("gradient reaches the input")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let eval = |v: &[f64]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), shape, &dev).unwrap();
            (f(&t).unwrap() * &p)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-5;
        for i in 0..n {
            let mut a = xs.clone();
            a[i] += h;
            let mut b = xs.clone();
            b[i] -= h;
            let fd = (eval(&a) - eval(&b)) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "element {i}: fd {fd} vs autograd {}",
                g[i]
            );
        }
    }

    /// Gradients of `sum(y * probe)`.
    fn grads_of(y: Tensor, probe: &Tensor) -> candle_core::backprop::GradStore {
        (y * probe).unwrap().sum_all().unwrap().backward().unwrap()
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[1.5f64, -0.5, 2.0, 0.7, 1.1], &dev).unwrap();
        let b = Tensor::new(&[0.1f64, 0.2, -0.3, 0.0, 0.5], &dev).unwrap();
        check_grad(|x| layer_norm(x, &w, &b, 1e-6), &[3, 5], 1);
        check_grad(|x| layer_norm_composite(x, &w, &b, 1e-6), &[3, 5], 1);
        // gradients reach the affine parameters too
        check_grad(
            |w| {
                layer_norm(
                    &Tensor::new(&[[0.3f64, -1.0, 2.0], [1.0, 0.5, -0.5]], &dev).unwrap(),
                    w,
                    &b.narrow(0, 0, 3).unwrap(),
                    1e-6,
                )
            },
            &[3],
            5,
        );
        check_grad(
            |b| {
                layer_norm(
                    &Tensor::new(&[[0.3f64, -1.0, 2.0], [1.0, 0.5, -0.5]], &dev).unwrap(),
                    &w.narrow(0, 0, 3).unwrap(),
                    b,
                    1e-6,
                )
            },
            &[3],
            6,
        );
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        check_grad(softmax_last_dim, &[2, 3, 6], 2);
        check_grad(softmax_composite, &[2, 3, 6], 2);
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0], [-1.0, 0.0, 100.0]], &dev).unwrap();
        let s: Vec<Vec<f64>> = softmax_last_dim(&x).unwrap().to_vec2().unwrap();
        let want = candle_nn::ops::softmax_last_dim(&x)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (a, b) in s.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn gelu_erf_gradient_matches_finite_differences() {
        check_grad(|x| x.gelu_erf(), &[4, 5], 3);
        check_grad(crate::fused::gelu_erf, &[4, 5], 3); // f64: the composite path
    }

    #[test]
    fn batched_matmul_matches_candle_forward_and_backward_in_f32() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev).unwrap()).unwrap();
        // b used transposed: a strided view, as attention's k^T
        let bt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 6, 4), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 5, 6), &dev).unwrap();
        let b = bt.as_tensor().t().unwrap();
        let ours = crate::fused::batched_matmul(a.as_tensor(), &b).unwrap();
        let theirs = a.as_tensor().matmul(&b).unwrap();
        assert_eq!(ours.dims(), &[2, 3, 5, 6]);
        assert!(maxdiff(&ours, &theirs) < 1e-5);
        let g1 = grads_of(ours, &probe);
        let g2 = grads_of(theirs, &probe);
        for v in [&a, &bt] {
            let (x, y) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(maxdiff(x, y) < 1e-5, "{}", maxdiff(x, y));
        }
    }

    #[test]
    fn fused_gelu_matches_candle_forward_and_backward_in_f32() {
        let dev = Device::Cpu;
        // wide range, and more elements than one parallel chunk
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (5, 7001), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (5, 7001), &dev).unwrap();
        let ours = crate::fused::gelu_erf(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().gelu_erf().unwrap();
        assert!(
            maxdiff(&ours, &theirs) < 2e-6,
            "{}",
            maxdiff(&ours, &theirs)
        );
        let g1 = grads_of(ours, &probe);
        let g2 = grads_of(theirs, &probe);
        let (g1, g2) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(maxdiff(g1, g2) < 2e-5, "{}", maxdiff(g1, g2));
    }

    #[test]
    fn attention_gradient_matches_finite_differences() {
        // q k^T / sqrt(d), softmax, @ v, with q = k = v = x
        check_grad(
            |x| {
                let a = (x.matmul(&x.t()?)? * 0.5)?;
                softmax_last_dim(&a)?.matmul(x)
            },
            &[2, 4, 3],
            4,
        );
    }

    #[test]
    fn linear_and_bias_gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[0.5f64, -1.0, 0.25], [2.0, 0.1, -0.3]], &dev).unwrap();
        let b = Tensor::new(&[0.1f64, -0.2], &dev).unwrap();
        let lin = Linear {
            weight: w.clone(),
            bias: b.clone(),
        };
        check_grad(|x| candle_core::Module::forward(&lin, x), &[2, 4, 3], 7);
        check_grad(
            |w| {
                candle_core::Module::forward(
                    &Linear {
                        weight: w.clone(),
                        bias: b.clone(),
                    },
                    &Tensor::new(&[[[1.0f64, 2.0, -1.0], [0.5, 0.0, 3.0]]], &dev).unwrap(),
                )
            },
            &[2, 3],
            8,
        );
        check_grad(
            |b| {
                crate::fused::bias_add(
                    &Tensor::new(&[[1.0f64, 2.0], [0.5, -3.0], [0.0, 1.0]], &dev).unwrap(),
                    b,
                )
            },
            &[2],
            9,
        );
        check_grad(
            |b| {
                candle_core::Module::forward(
                    &Linear {
                        weight: w.clone(),
                        bias: b.clone(),
                    },
                    &Tensor::new(&[[[1.0f64, 2.0, -1.0], [0.5, 0.0, 3.0]]], &dev).unwrap(),
                )
            },
            &[2],
            10,
        );
    }

    #[test]
    fn fused_linear_equals_matmul_plus_bias_in_f32() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 9, 24), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (40, 24), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 40, &dev).unwrap();
        let ours = crate::fused::linear(&x, &w, &b).unwrap();
        assert_eq!(ours.dims(), &[4, 9, 40]);
        let want = x
            .reshape((36, 24))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .reshape((4, 9, 40))
            .unwrap();
        assert!(maxdiff(&ours, &want) < 1e-4);
    }

    #[test]
    fn fused_and_composite_forms_agree_in_f32() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (3, 5, 7), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        let d = |a: Tensor, b: Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(
            d(
                layer_norm(&x, &w, &b, 1e-6).unwrap(),
                layer_norm_composite(&x, &w, &b, 1e-6).unwrap()
            ) < 1e-5
        );
        assert!(
            d(
                softmax_last_dim(&x).unwrap(),
                softmax_composite(&x).unwrap()
            ) < 1e-6
        );
        // a non-contiguous input goes through too
        let xt = x.transpose(1, 2).unwrap();
        assert!(
            d(
                softmax_last_dim(&xt).unwrap(),
                softmax_composite(&xt).unwrap()
            ) < 1e-6
        );
    }

    #[test]
    fn layer_norm_matches_candle_forward() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 7), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        let ours = layer_norm(&x, &w, &b, 1e-6).unwrap();
        let theirs = candle_nn::ops::layer_norm(&x, &w, &b, 1e-6).unwrap();
        let d = maxdiff(&ours, &theirs);
        assert!(d < 1e-5, "{d}");
        let _ = DType::F32;
    }
}
