//! Mixed precision (`Backend::CandleBf16`) against the f32 graph on the CPU: the same weights
//! give the same loss and gradients within bf16's tolerance, the products really run in bf16,
//! and every gradient lands on the f32 master weights in f32.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use lmd_model::{
    Backend, ClassifierConfig, Kernels, LatentMae, MaeConfig, Precision, VitClassifier,
};

fn cfg() -> MaeConfig {
    MaeConfig {
        in_chans: 4,
        img_size: [8, 8],
        patch_size: 2,
        embed_dim: 64,
        depth: 2,
        num_heads: 4,
        decoder_embed_dim: 32,
        decoder_depth: 1,
        decoder_num_heads: 2,
        mlp_ratio: 4.0,
        norm_pix_loss: true,
        norm_eps: 1e-6,
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Cosine similarity and norm ratio of two gradients of one parameter.
fn compare(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let dot = scalar(&(&a * &b).unwrap().sum_all().unwrap());
    let na = scalar(&a.sqr().unwrap().sum_all().unwrap()).sqrt();
    let nb = scalar(&b.sqr().unwrap().sum_all().unwrap()).sqrt();
    (dot / (na * nb).max(1e-30), nb / na.max(1e-30))
}

/// Every variable of `vm` has a gradient in `grads`, in f32, close to `reference`'s.
fn gradients_match(
    what: &str,
    vm: &VarMap,
    grads: &candle_core::backprop::GradStore,
    ref_vm: &VarMap,
    reference: &candle_core::backprop::GradStore,
) {
    let data = vm.data().lock().unwrap();
    let ref_data = ref_vm.data().lock().unwrap();
    assert!(data.len() > 10, "{what}: {} variables", data.len());
    for (name, var) in data.iter() {
        assert_eq!(var.dtype(), DType::F32, "{what}: master weight {name}");
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: {name} has no gradient under bf16"));
        assert_eq!(g.dtype(), DType::F32, "{what}: gradient of {name}");
        let r = reference.get(ref_data[name].as_tensor()).unwrap();
        let (cos, ratio) = compare(r, g);
        assert!(
            cos > 0.99 && (ratio - 1.0).abs() < 0.05,
            "{what}: {name}: cosine {cos}, norm ratio {ratio} against f32"
        );
    }
}

#[test]
fn bf16_mae_matches_f32_within_bf16_tolerance_and_trains_f32_master_weights() {
    let dev = Device::Cpu;
    let cfg = cfg();
    let x = Tensor::randn(0f32, 1.0, (4, 4, 8, 8), &dev).unwrap();
    let run = |backend| {
        let vm = VarMap::new();
        let m = LatentMae::init_on(&cfg, backend, &vm, 5, &dev).unwrap();
        assert_eq!(m.backend(), backend);
        let out = m.forward(&x, 0.5, 9).unwrap();
        assert_eq!(out.loss.dtype(), DType::F32);
        assert_eq!(out.pred.dtype(), DType::F32);
        let grads = out.loss.backward().unwrap();
        (vm, out, grads)
    };
    let (vm32, out32, g32) = run(Backend::Candle);
    let bf16 = Backend::for_training(Kernels::Candle, &dev, Precision::Bf16).unwrap();
    assert_eq!(bf16, Backend::CandleBf16);
    let (vm16, out16, g16) = run(bf16);
    let (l32, l16) = (scalar(&out32.loss), scalar(&out16.loss));
    assert!(
        (l32 - l16).abs() < 0.02 * l32,
        "loss f32 {l32} vs bf16 {l16}"
    );
    let d = lmd_model::max_abs_diff(&out32.pred, &out16.pred).unwrap();
    // bf16 has 8 significant bits: the products differ from f32's, by little
    assert!(d > 0.0 && d < 0.1, "pred differs by {d}");
    gradients_match("mae", &vm16, &g16, &vm32, &g32);
}

#[test]
fn bf16_classifier_gives_f32_logits_close_to_f32_and_gradients_on_every_parameter() {
    let dev = Device::Cpu;
    let ccfg = ClassifierConfig {
        encoder: cfg(),
        num_classes: 5,
        global_pool: true,
        drop_path: 0.1,
        linear_probe: false,
    };
    let x = Tensor::randn(0f32, 1.0, (6, 4, 8, 8), &dev).unwrap();
    let bf16 = Backend::for_training(Kernels::Auto, &dev, Precision::Bf16).unwrap();
    let run = |backend| {
        let vm = VarMap::new();
        let clf = VitClassifier::init_on(&ccfg, backend, &vm, 2, 0.5, &dev).unwrap();
        let logits = clf.forward_t(&x, Some(3)).unwrap();
        assert_eq!(logits.dtype(), DType::F32);
        let loss = logits.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        (vm, logits, grads)
    };
    let (vm32, l32, g32) = run(Backend::Candle);
    let (vm16, l16, g16) = run(bf16);
    let d = lmd_model::max_abs_diff(&l32, &l16).unwrap();
    let scale = scalar(&l32.abs().unwrap().max_all().unwrap()) as f32;
    assert!(
        d > 0.0 && d < 0.05 * scale,
        "logits differ by {d} (scale {scale})"
    );
    gradients_match("classifier", &vm16, &g16, &vm32, &g32);
}

#[test]
fn bf16_is_refused_on_the_fused_kernels_and_f16_for_training() {
    let dev = Device::Cpu;
    let e = Backend::for_training(Kernels::Fused, &dev, Precision::Bf16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("BF16") && e.contains("CPU only"), "{e}");
    let e = Backend::for_training(Kernels::Auto, &dev, Precision::F16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("loss scaling"), "{e}");
    assert_eq!(
        Backend::for_training(Kernels::Candle, &dev, Precision::F32).unwrap(),
        Backend::Candle
    );
}
