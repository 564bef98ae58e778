//! Differentiable layers for training with candle 0.11: `LayerNorm` and `Linear` with
//! PyTorch's parameter names and layouts, each computing on its model's [`Backend`].
//!
//! candle-nn's fused `layer_norm`, `softmax_last_dim` (and the `LayerNorm` module on contiguous
//! input with a bias) record no backward: gradients silently vanish. Neither backend uses them;
//! `tests` checks both against finite differences and against each other.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::Backend;

/// LayerNorm over the last dimension, `eps` inside the square root (PyTorch semantics, biased
/// variance).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    pub backend: Backend,
}

impl LayerNorm {
    /// Load `weight` and `bias` of size `dim` (init 1 and 0).
    pub fn new(dim: usize, eps: f64, backend: Backend, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
            eps,
            backend,
        })
    }
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.backend
            .layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Linear layer `y = x W^T + b`, PyTorch's weight layout `[out, in]` (on the fused backend one
/// node: leading dims folded into one gemm, so the weight gradient needs no reduction over a
/// broadcast batch dim).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
    pub backend: Backend,
}

impl candle_core::Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.backend.linear(x, &self.weight, &self.bias)
    }
}

/// A [`Linear`] with MAE's init (xavier_uniform weight, zero bias).
pub fn linear(in_dim: usize, out_dim: usize, backend: Backend, vb: VarBuilder) -> Result<Linear> {
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
    Ok(Linear {
        weight: w,
        bias: b,
        backend,
    })
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

    /// candle's ops (the backend every dtype and device has): the finite-difference checks run
    /// in f64, which only this backend computes.
    const C: Backend = Backend::Candle;
    /// The fused CPU ops (f32).
    const F: Backend = Backend::Fused;

    /// lmd's row ops ([`crate::rowops`]) between candle's ops.
    const R: Backend = Backend::Rows;

    /// `f` on backend `k` and on the candle backend, from the same f32 inputs: the forward and
    /// the gradient of every input agree within `tol`.
    fn matches_candle(
        k: Backend,
        f: impl Fn(Backend, &[&Tensor]) -> Result<Tensor>,
        shapes: &[&[usize]],
        tol: f32,
    ) {
        let dev = Device::Cpu;
        let vars: Vec<Var> = shapes
            .iter()
            .map(|s| Var::from_tensor(&Tensor::randn(0f32, 1.5, *s, &dev).unwrap()).unwrap())
            .collect();
        let ins: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let (yf, yc) = (f(k, &ins).unwrap(), f(C, &ins).unwrap());
        assert_eq!(yf.dims(), yc.dims());
        let d = maxdiff(&yf, &yc);
        assert!(d < tol, "forward differs by {d}");
        let probe = Tensor::randn(0f32, 1.0, yf.shape(), &dev).unwrap();
        let (gf, gc) = (grads_of(yf, &probe), grads_of(yc, &probe));
        for (i, v) in vars.iter().enumerate() {
            let a = gf
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{k}: no gradient for input {i}"));
            let b = gc
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("candle: no gradient for input {i}"));
            let d = maxdiff(a, b);
            assert!(d < tol * 10.0, "gradient of input {i} differs by {d}");
        }
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[1.5f64, -0.5, 2.0, 0.7, 1.1], &dev).unwrap();
        let b = Tensor::new(&[0.1f64, 0.2, -0.3, 0.0, 0.5], &dev).unwrap();
        check_grad(|x| C.layer_norm(x, &w, &b, 1e-6), &[3, 5], 1);
        // gradients reach the affine parameters too
        check_grad(
            |w| {
                C.layer_norm(
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
                C.layer_norm(
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
        check_grad(|x| C.softmax_last_dim(x), &[2, 3, 6], 2);
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0], [-1.0, 0.0, 100.0]], &dev).unwrap();
        let s: Vec<Vec<f64>> = C.softmax_last_dim(&x).unwrap().to_vec2().unwrap();
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
        check_grad(|x| C.gelu_erf(x), &[4, 5], 3);
    }

    #[test]
    fn batched_matmul_matches_candle_forward_and_backward_in_f32() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev).unwrap()).unwrap();
        // b used transposed: a strided view, as attention's k^T
        let bt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 6, 4), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 5, 6), &dev).unwrap();
        let b = bt.as_tensor().t().unwrap();
        let ours = F.batched_matmul(a.as_tensor(), &b).unwrap();
        let theirs = C.batched_matmul(a.as_tensor(), &b).unwrap();
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
        let ours = F.gelu_erf(x.as_tensor()).unwrap();
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
                C.softmax_last_dim(&a)?.matmul(x)
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
            backend: C,
        };
        check_grad(|x| candle_core::Module::forward(&lin, x), &[2, 4, 3], 7);
        check_grad(
            |w| {
                candle_core::Module::forward(
                    &Linear {
                        weight: w.clone(),
                        bias: b.clone(),
                        backend: C,
                    },
                    &Tensor::new(&[[[1.0f64, 2.0, -1.0], [0.5, 0.0, 3.0]]], &dev).unwrap(),
                )
            },
            &[2, 3],
            8,
        );
        check_grad(
            |b| {
                candle_core::Module::forward(
                    &Linear {
                        weight: w.clone(),
                        bias: b.clone(),
                        backend: C,
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
        let ours = F.linear(&x, &w, &b).unwrap();
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
    fn fused_ops_match_candle_ops_forward_and_every_gradient_in_f32() {
        // rows: more than one parallel row group; widths: not a multiple of the SIMD lanes
        matches_candle(
            F,
            |k, t| k.layer_norm(t[0], t[1], t[2], 1e-6),
            &[&[3, 37, 70], &[70], &[70]],
            2e-5,
        );
        matches_candle(F, |k, t| k.softmax_last_dim(t[0]), &[&[2, 3, 41, 19]], 2e-6);
        matches_candle(
            F,
            |k, t| k.linear(t[0], t[1], t[2]),
            &[&[5, 33, 24], &[40, 24], &[40]],
            1e-4,
        );
        matches_candle(F, |k, t| k.gelu_erf(t[0]), &[&[7, 3001]], 2e-6);
        // a non-contiguous input goes through too
        matches_candle(F, |k, t| k.softmax_last_dim(&t[0].t()?), &[&[9, 13]], 2e-6);
        matches_candle(
            F,
            |k, t| k.layer_norm(&t[0].t()?, t[1], t[2], 1e-5),
            &[&[6, 40], &[6], &[6]],
            2e-5,
        );
    }

    #[test]
    fn row_ops_match_candle_ops_forward_and_every_gradient_in_f32() {
        // rows: more than one CPU row group and not a multiple of a block's 4 warps; widths
        // below and past a warp's 32 lanes
        for shapes in [
            [&[3, 37, 70][..], &[70], &[70]],
            [&[5, 768], &[768], &[768]],
        ] {
            matches_candle(
                R,
                |k, t| k.layer_norm(t[0], t[1], t[2], 1e-6),
                &shapes,
                2e-5,
            );
        }
        matches_candle(R, |k, t| k.softmax_last_dim(t[0]), &[&[2, 3, 41, 19]], 2e-6);
        matches_candle(R, |k, t| k.softmax_last_dim(t[0]), &[&[4, 49, 49]], 2e-6);
        matches_candle(R, |k, t| k.gelu_erf(t[0]), &[&[7, 3001]], 2e-6);
        // attention, one op each way against the split, products and softmax: LMD's 49 + 1
        // tokens of ViT-B's 64-wide heads; heads narrower than the CPU's SIMD lanes, one token
        for (b, n, heads, hd) in [(2, 50, 3, 64), (3, 7, 4, 5), (2, 1, 2, 8)] {
            let scale = 1.0 / (hd as f64).sqrt();
            matches_candle(
                R,
                |k, t| k.attention(t[0], heads, scale),
                &[&[b, n, 3 * heads * hd]],
                2e-5,
            );
        }
        // non-contiguous inputs go through too
        matches_candle(R, |k, t| k.softmax_last_dim(&t[0].t()?), &[&[9, 13]], 2e-6);
        matches_candle(
            R,
            |k, t| k.attention(&t[0].transpose(0, 1)?, 2, 1.0 / 24f64.sqrt()),
            &[&[5, 3, 48]],
            2e-5,
        );
    }

    #[test]
    fn row_attention_is_the_one_op_at_a_vits_scale_and_the_split_at_any_other() {
        let qkv = Tensor::randn(0f32, 1.5, (2, 9, 3 * 2 * 16), &Device::Cpu).unwrap();
        let one_op = crate::rowops::attention(&qkv, 2).unwrap();
        let at = |k: Backend, scale: f64| k.attention(&qkv, 2, scale).unwrap();
        // bit for bit the op at 1 / sqrt(16), and not what the split gives (it rounds
        // differently), so the comparison above is with the op
        assert_eq!(maxdiff(&at(R, 0.25), &one_op), 0.0);
        assert!(maxdiff(&at(C, 0.25), &one_op) > 0.0);
        // another scale takes the split, on the row ops' softmax
        assert!(maxdiff(&at(R, 0.3), &at(C, 0.3)) < 2e-5);
        assert!(maxdiff(&at(R, 0.3), &one_op) > 1e-3);
        matches_candle(
            R,
            |k, t| k.layer_norm(&t[0].t()?, t[1], t[2], 1e-5),
            &[&[6, 40], &[6], &[6]],
            2e-5,
        );
    }

    #[test]
    fn row_ops_in_mixed_precision_take_half_inputs_and_give_f32() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (4, 9, 33), &dev).unwrap();
        let (w, b) = (
            Tensor::randn(1f32, 0.3, 33, &dev).unwrap(),
            Tensor::randn(0f32, 0.3, 33, &dev).unwrap(),
        );
        let xb = x.to_dtype(DType::BF16).unwrap();
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        // mixed: f32 weights; a bf16 model (as a bf16 VAE): bf16 weights, widened by the row op
        let cases = [
            (
                Backend::RowsBf16,
                Backend::CandleBf16,
                w.clone(),
                b.clone(),
                2e-2,
            ),
            (R, C, bf(&w), bf(&b), 6e-2),
        ];
        for (rows, candle, w, b, tol) in cases {
            let a = rows.layer_norm(&xb, &w, &b, 1e-6).unwrap();
            let c = candle.layer_norm(&xb, &w, &b, 1e-6).unwrap();
            let s = rows.softmax_last_dim(&xb).unwrap();
            let sc = candle.softmax_last_dim(&xb).unwrap();
            // the GELU keeps its input's dtype everywhere (bf16: mixed precision's products)
            let (ge, gc) = (rows.gelu_erf(&xb).unwrap(), candle.gelu_erf(&xb).unwrap());
            assert_eq!((ge.dtype(), gc.dtype()), (DType::BF16, DType::BF16));
            let gd = maxdiff(
                &ge.to_dtype(DType::F32).unwrap(),
                &gc.to_dtype(DType::F32).unwrap(),
            );
            assert!(gd < 5e-2, "{rows}: gelu {gd}");
            // mixed precision keeps the f32 result; otherwise the input's dtype comes back
            let want = if rows.half_dtype().is_some() {
                DType::F32
            } else {
                DType::BF16
            };
            for t in [&a, &c, &s, &sc] {
                assert_eq!(t.dtype(), want, "{rows}");
            }
            let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            assert!(
                maxdiff(&f(&a), &f(&c)) < tol,
                "{rows}: {}",
                maxdiff(&f(&a), &f(&c))
            );
            assert!(
                maxdiff(&f(&s), &f(&sc)) < 1e-2,
                "{rows}: {}",
                maxdiff(&f(&s), &f(&sc))
            );
        }
    }

    #[test]
    fn layer_norm_matches_candle_forward() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 7), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 7, &dev).unwrap();
        for k in [F, C, R] {
            let ours = k.layer_norm(&x, &w, &b, 1e-6).unwrap();
            let theirs = candle_nn::ops::layer_norm(&x, &w, &b, 1e-6).unwrap();
            let d = maxdiff(&ours, &theirs);
            assert!(d < 1e-5, "{k}: {d}");
        }
    }
}
