//! VAE parity with PyTorch (`parity_*`, over every matching file in `$LMD_SHARED/testvectors`)
//! and, without shared data, shape and determinism checks of seeded random models.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lmd_model::vae::{AutoencoderKl, KlConfig, Taesd, Vae, VaeId};
use std::path::PathBuf;

fn shared() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("LMD_SHARED")?);
    p.is_dir().then_some(p)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    lmd_model::max_abs_diff(a, b).unwrap()
}

fn vector_files(prefix: &str, suffix: &str) -> Vec<PathBuf> {
    let dir = shared().unwrap().join("testvectors");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(prefix) && n.ends_with(suffix)
        })
        .collect();
    v.sort();
    v
}

fn metadata(path: &std::path::Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    m.metadata().clone().unwrap_or_default()
}

/// A vector file's images, u8 `[N, H, W, 3]`, as `[N, 3, H, W]` f32 in [0, 1].
fn unit_images(t: &std::collections::HashMap<String, Tensor>) -> Tensor {
    (t["images"]
        .to_dtype(DType::F32)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
        / 255.0)
        .unwrap()
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn parity_taesd_all_vector_files() {
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let dev = Device::Cpu;
    let vae = Taesd::load(&sh.join("weights/taesd"), &dev).unwrap();
    assert_eq!(vae.id().weights.len(), 2);
    let files = vector_files("taesd_", ".safetensors");
    assert!(!files.is_empty());
    for f in files {
        let t = candle_core::safetensors::load(&f, &dev).unwrap();
        let x = unit_images(&t);
        let lat = vae.encode_raw(&x).unwrap();
        let d_enc = max_abs(&lat, &t["latents"]);
        let rec = vae.decode_raw(&t["latents"]).unwrap();
        let d_dec = max_abs(&rec, &t["recon"]);
        eprintln!("{}: encoder {d_enc:.2e}, decoder {d_dec:.2e}", f.display());
        assert!(d_enc < 1e-3, "{}: latents differ by {d_enc}", f.display());
        assert!(d_dec < 2e-3, "{}: recon differs by {d_dec}", f.display());
        // the Vae interface: clamped decode in [0, 1]
        let img = vae.decode(&t["latents"].narrow(0, 0, 2).unwrap()).unwrap();
        let (mn, mx) = (
            img.flatten_all()
                .unwrap()
                .min(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            img.flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
        assert!(mn >= 0.0 && mx <= 1.0);
    }
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn parity_sdvae_all_vector_files() {
    shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let dev = Device::Cpu;
    let files = vector_files("sdvae_", ".weights.safetensors");
    assert!(!files.is_empty());
    for w in files {
        let cfg: KlConfig = serde_json::from_str(&metadata(&w)["config"]).unwrap();
        let id = VaeId {
            name: "sd-vae".into(),
            weights: vec![],
        };
        let vae = AutoencoderKl::load_file(&cfg, &w, &dev, id, lmd_model::Precision::F32).unwrap();
        let vp = PathBuf::from(w.to_string_lossy().replace(".weights.", ".vectors."));
        let t = candle_core::safetensors::load(&vp, &dev).unwrap();
        let (mean, logvar) = vae.encode_moments(&t["x"]).unwrap();
        let dm = max_abs(&mean, &t["mean"]);
        let dl = max_abs(&logvar, &t["logvar"]);
        let dr = max_abs(&vae.decode_raw(&t["mean"]).unwrap(), &t["recon"]);
        eprintln!(
            "{}: mean {dm:.2e}, logvar {dl:.2e}, recon {dr:.2e}",
            w.display()
        );
        assert!(
            dm < 1e-3 && dl < 1e-3 && dr < 1e-3,
            "{}: {dm} {dl} {dr}",
            w.display()
        );
        // interface: scaled mean, scaled logvar
        let enc = vae.encode(&t["x"]).unwrap();
        let s = cfg.scaling_factor;
        assert!(max_abs(&enc.latent, &(&t["mean"] * s).unwrap()) < 1e-3);
        let (_, lv) = enc.mean_logvar.unwrap();
        assert!(max_abs(&lv, &(&t["logvar"] + 2.0 * s.ln()).unwrap()) < 1e-3);
    }
}

/// Fill every variable deterministically (by sorted name), so the test needs no RNG seed.
fn fill(vm: &VarMap, scale: f64) {
    let data = vm.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for (k, name) in names.iter().enumerate() {
        let v = &data[name];
        let n = v.elem_count();
        let vals: Vec<f32> = (0..n)
            .map(|i| ((i as f64 * 0.731 + k as f64 * 1.3).sin() * scale) as f32)
            .collect();
        let norm = name.contains("norm") && name.ends_with("weight");
        let t = if norm {
            Tensor::ones(v.shape(), DType::F32, v.device()).unwrap()
        } else {
            Tensor::from_vec(vals, v.shape(), v.device()).unwrap()
        };
        v.set(&t).unwrap();
    }
}

#[test]
fn seeded_random_vaes_have_the_right_shapes_and_are_deterministic() {
    let dev = Device::Cpu;
    let id = VaeId {
        name: "test".into(),
        weights: vec![],
    };
    let x = (Tensor::arange(0f32, (2 * 3 * 32 * 32) as f32, &dev).unwrap() * 0.01)
        .unwrap()
        .sin()
        .unwrap()
        .reshape((2, 3, 32, 32))
        .unwrap();
    // TAESD
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let t = Taesd::new(vb.pp("enc"), vb.pp("dec"), id.clone()).unwrap();
    fill(&vm, 0.05);
    let z = t.encode(&x).unwrap().latent;
    assert_eq!(z.dims(), &[2, 4, 4, 4]);
    assert_eq!(t.decode(&z).unwrap().dims(), &[2, 3, 32, 32]);
    assert_eq!(max_abs(&z, &t.encode(&x).unwrap().latent), 0.0);
    // AutoencoderKL, tiny config
    let cfg = KlConfig {
        block_out_channels: vec![8, 16, 16, 16],
        norm_num_groups: 4,
        ..KlConfig::sd()
    };
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let kl = AutoencoderKl::new(&cfg, vb, id).unwrap();
    fill(&vm, 0.05);
    let enc = kl.encode(&x).unwrap();
    assert_eq!(enc.latent.dims(), &[2, 4, 4, 4]);
    let (m, lv) = enc.mean_logvar.clone().unwrap();
    assert_eq!(m.dims(), lv.dims());
    assert_eq!(kl.decode(&enc.latent).unwrap().dims(), &[2, 3, 32, 32]);
    assert_eq!(max_abs(&enc.latent, &kl.encode(&x).unwrap().latent), 0.0);
}

#[test]
fn missing_or_mismatched_weights_are_named() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let e = Taesd::load(dir.path(), &dev).err().unwrap().to_string();
    assert!(
        e.contains("taesd_encoder.safetensors") && e.contains("not found"),
        "{e}"
    );
    // an encoder file with a wrongly shaped first conv
    let mut m = std::collections::HashMap::new();
    m.insert(
        "0.weight".to_string(),
        Tensor::zeros((64, 4, 3, 3), DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&m, dir.path().join("taesd_encoder.safetensors")).unwrap();
    candle_core::safetensors::save(&m, dir.path().join("taesd_decoder.safetensors")).unwrap();
    let e = Taesd::load(dir.path(), &dev).err().unwrap().to_string();
    assert!(
        e.contains("taesd_encoder.safetensors") && e.contains("0.weight"),
        "{e}"
    );
}

/// The root-mean-square difference relative to the reference's root-mean-square.
fn rel_rms(a: &Tensor, reference: &Tensor) -> f32 {
    let rms = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    rms(&(a - reference).unwrap()) / rms(reference).max(1e-12)
}

/// The VAEs in bf16 and f16 (what the GPU encodes in) against the PyTorch f32 vectors, through
/// the `Vae` interface (f32 in, f32 latents out). Stated tolerances, as a fraction of the
/// reference latents' RMS (RMS of the difference): TAESD 2% in bf16 and 0.5% in f16; SD-VAE's
/// posterior mean 3% in bf16 (8 significant bits through ~30 layers).
// (not named parity_*: half precision always runs candle's ops, so CI's LMD_KERNELS=candle pass
// would only repeat it)
#[test]
#[ignore = "needs LMD_SHARED"]
fn vaes_in_bf16_and_f16_match_the_pytorch_vectors_within_stated_tolerances() {
    use lmd_model::vae::Vae;
    use lmd_model::Precision;
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let dev = Device::Cpu;
    let taesd_file = vector_files("taesd_", ".safetensors").remove(0);
    let t = candle_core::safetensors::load(&taesd_file, &dev).unwrap();
    let x = unit_images(&t);
    for (p, tol) in [(Precision::Bf16, 0.02), (Precision::F16, 0.005)] {
        let vae = Taesd::load_in(&sh.join("weights/taesd"), &dev, p).unwrap();
        let lat = vae.encode(&x).unwrap().latent;
        assert_eq!(lat.dtype(), DType::F32);
        let d = rel_rms(&lat, &t["latents"]);
        eprintln!("taesd {p}: latents within {d:.2e} of f32 PyTorch (relative)");
        assert!(d > 0.0 && d < tol, "taesd {p}: {d}");
        let img = vae.decode(&t["latents"]).unwrap();
        assert_eq!(img.dtype(), DType::F32);
    }
    let w = vector_files("sdvae_", ".weights.safetensors").remove(0);
    let cfg: KlConfig = serde_json::from_str(&metadata(&w)["config"]).unwrap();
    let id = VaeId {
        name: "sd-vae".into(),
        weights: vec![],
    };
    let vae = AutoencoderKl::load_file(&cfg, &w, &dev, id, Precision::Bf16).unwrap();
    let vp = PathBuf::from(w.to_string_lossy().replace(".weights.", ".vectors."));
    let v = candle_core::safetensors::load(&vp, &dev).unwrap();
    let enc = vae.encode(&v["x"]).unwrap();
    let want = (&v["mean"] * cfg.scaling_factor).unwrap();
    let d = rel_rms(&enc.latent, &want);
    eprintln!("sd-vae bf16: posterior mean within {d:.2e} of f32 PyTorch (relative)");
    assert!(d > 0.0 && d < 0.03, "sd-vae bf16: {d}");
}
