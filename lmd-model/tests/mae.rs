//! LatentMae against the official PyTorch MAE (`parity_*`, over every `mae_*` vector pair in
//! `$LMD_SHARED/testvectors`), plus shape, determinism and gradient-coverage tests that need no data.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lmd_model::mae::sincos_pos_embed;
use lmd_model::{LatentMae, MaeConfig, Pool};
use std::collections::HashMap;
use std::path::PathBuf;

fn shared() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("LMD_SHARED")?);
    p.is_dir().then_some(p)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    lmd_model::max_abs_diff(a, b).unwrap()
}

fn metadata(path: &std::path::Path) -> HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    m.metadata().clone().unwrap_or_default()
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn parity_mae_all_vector_files() {
    let dir = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let dev = Device::Cpu;
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(dir.join("testvectors"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for wpath in entries {
        let name = wpath.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = name
            .strip_prefix("mae_")
            .and_then(|s| s.strip_suffix(".weights.safetensors"))
        else {
            continue;
        };
        let vpath = wpath.with_file_name(format!("mae_{stem}.vectors.safetensors"));
        let cfg_json: serde_json::Value =
            serde_json::from_str(&metadata(&wpath)["config"]).unwrap();
        let cfg = MaeConfig::from_mae_json(&cfg_json).unwrap();
        let weights = candle_core::safetensors::load(&wpath, &dev).unwrap();
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &dev);
        let model = LatentMae::new(&cfg, vb).unwrap();
        // our fixed sin-cos tables equal the checkpoint's buffers
        for (bname, t) in model.buffers() {
            let d = max_abs(&t, &weights[bname]);
            assert!(d < 1e-6, "{name}: {bname} differs by {d}");
        }
        let v = candle_core::safetensors::load(&vpath, &dev).unwrap();
        let ratio = v["mask_ratio"].to_scalar::<f32>().unwrap() as f64;
        let out = model
            .forward_with_noise(&v["x"], &v["noise"], ratio)
            .unwrap();
        assert_eq!(
            out.masking.mask.to_vec2::<f32>().unwrap(),
            v["mask"].to_vec2::<f32>().unwrap(),
            "{name}: mask"
        );
        let dl = max_abs(&out.latent, &v["latent"]);
        let dp = max_abs(&out.pred, &v["pred"]);
        let loss = out.loss.to_scalar::<f32>().unwrap();
        let want = v["loss"].to_scalar::<f32>().unwrap();
        eprintln!("{name}: latent {dl:.2e}, pred {dp:.2e}, loss {loss} vs {want}");
        assert!(dl < 1e-4, "{name}: latent max abs diff {dl}");
        assert!(dp < 1e-4, "{name}: pred max abs diff {dp}");
        assert!(
            ((loss - want) / want).abs() < 1e-5,
            "{name}: loss {loss} vs {want}"
        );
        n += 1;
    }
    assert!(n > 0, "no mae_*.weights.safetensors in {}", dir.display());
}

fn tiny_cfg() -> MaeConfig {
    MaeConfig {
        in_chans: 4,
        img_size: [8, 8],
        patch_size: 2,
        embed_dim: 16,
        depth: 2,
        num_heads: 2,
        decoder_embed_dim: 8,
        decoder_depth: 1,
        decoder_num_heads: 2,
        mlp_ratio: 2.0,
        norm_pix_loss: true,
        norm_eps: 1e-6,
    }
}

#[test]
fn seeded_model_shapes_and_determinism() {
    let dev = Device::Cpu;
    let cfg = tiny_cfg();
    let run = |seed| {
        let vm = VarMap::new();
        let m = LatentMae::init(&cfg, &vm, seed, &dev).unwrap();
        let x = (Tensor::arange(0f32, 768.0, &dev).unwrap() * 0.37)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((3, 4, 8, 8))
            .unwrap();
        let out = m.forward(&x, 0.75, 7).unwrap();
        assert_eq!(out.pred.dims(), &[3, 16, 16]);
        assert_eq!(out.latent.dims(), &[3, 1 + 4, 16]);
        assert_eq!(
            out.masking
                .mask
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            36.0
        );
        let f = m.forward_features(&x, Pool::Cls, None).unwrap();
        assert_eq!(f.dims(), &[3, 16]);
        let g = m.forward_features(&x, Pool::Mean, None).unwrap();
        assert_eq!(g.dims(), &[3, 16]);
        // patchify / unpatchify round trip
        let back = m.unpatchify(&m.patchify(&x).unwrap()).unwrap();
        assert_eq!(max_abs(&back, &x), 0.0);
        out.loss.to_scalar::<f32>().unwrap()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn sincos_matches_mae_definition() {
    // MAE: row 0 zeros; token (i, j): first half from j, second half from i; sin then cos.
    let t = sincos_pos_embed(8, 2, 3);
    assert!(t[..8].iter().all(|&v| v == 0.0));
    let tok = |i: usize, j: usize| &t[(1 + i * 3 + j) * 8..(2 + i * 3 + j) * 8];
    let r = tok(1, 2);
    assert!((r[0] - 2f32.sin()).abs() < 1e-6 && (r[2] - 2f32.cos()).abs() < 1e-6);
    assert!((r[4] - 1f32.sin()).abs() < 1e-6 && (r[6] - 1f32.cos()).abs() < 1e-6);
    assert!((r[1] - (2.0f32 * 0.01).sin()).abs() < 1e-6); // omega_1 = 1/10000^(1/2)
}

#[test]
fn every_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    let cfg = tiny_cfg();
    let vm = VarMap::new();
    let m = LatentMae::init(&cfg, &vm, 3, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
    let out = m.forward(&x, 0.5, 11).unwrap();
    let grads = out.loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    assert!(data.len() > 20);
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0 && n.is_finite(), "{name}: gradient norm {n}");
    }
}

#[test]
fn save_then_load_gives_the_same_model() {
    let dev = Device::Cpu;
    let cfg = tiny_cfg();
    let vm = VarMap::new();
    let m = LatentMae::init(&cfg, &vm, 5, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mae.safetensors");
    m.save(&vm, &path).unwrap();
    let names: Vec<String> = {
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.names().into_iter().map(|s| s.to_string()).collect()
    };
    for n in [
        "patch_embed.proj.weight",
        "cls_token",
        "pos_embed",
        "blocks.1.attn.qkv.bias",
        "decoder_pred.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    let (m2, _vm2) = LatentMae::load(&cfg, &path, &dev).unwrap();
    let x = (Tensor::arange(0f32, 512.0, &dev).unwrap() * 0.11)
        .unwrap()
        .cos()
        .unwrap()
        .reshape((2, 4, 8, 8))
        .unwrap();
    let a = m.forward(&x, 0.6, 3).unwrap();
    let b = m2.forward(&x, 0.6, 3).unwrap();
    assert_eq!(max_abs(&a.pred, &b.pred), 0.0);
    // a config that does not fit the file is refused, naming tensor and shapes
    let mut wrong = cfg.clone();
    wrong.embed_dim = 32;
    let e = LatentMae::load(&wrong, &path, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("mae.safetensors") && e.contains("expects"),
        "{e}"
    );
}

#[test]
fn config_presets_in_configs_dir_match_code() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    for name in ["tiny", "small", "base", "large", "base_patch4"] {
        let path = dir.join(format!("mae-{}.toml", name.replace('_', "-")));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v: toml::Value = toml::from_str(&text).unwrap();
        let cfg: MaeConfig = v["model"].clone().try_into().unwrap();
        assert_eq!(cfg, MaeConfig::preset(name).unwrap(), "{}", path.display());
    }
}

fn shared_or_panic() -> PathBuf {
    shared().expect("this test needs LMD_SHARED (run with --include-ignored only where it is set)")
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every parameter of two loaded models is bit-identical.
fn assert_same_params(a: &VarMap, b: &VarMap, what: &str) {
    let (a, b) = (a.data().lock().unwrap(), b.data().lock().unwrap());
    assert_eq!(a.len(), b.len(), "{what}");
    for (name, va) in a.iter() {
        let x = va
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = b[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(x, y, "{what}: {name}");
    }
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn official_pth_checkpoints_load_to_the_same_parameters_and_outputs_as_safetensors() {
    let tv = shared_or_panic().join("testvectors");
    let dev = Device::Cpu;
    let wpath = tv.join("mae_p4_d96.weights.safetensors");
    let cfg_json: serde_json::Value = serde_json::from_str(&metadata(&wpath)["config"]).unwrap();
    let cfg = MaeConfig::from_mae_json(&cfg_json).unwrap();
    let (ref_model, ref_vm) = LatentMae::load(&cfg, &wpath, &dev).unwrap();
    let v =
        candle_core::safetensors::load(tv.join("mae_p4_d96.vectors.safetensors"), &dev).unwrap();
    let ratio = v["mask_ratio"].to_scalar::<f32>().unwrap() as f64;
    let want = ref_model
        .forward_with_noise(&v["x"], &v["noise"], ratio)
        .unwrap();

    // the released layout ({'model': state_dict}, saved by torch), plus the training checkpoint
    // main_pretrain.py writes and a DDP-prefixed one, both made by Python's pickle here
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![tv.join("mae_p4_d96.pth")];
    for (name, extra) in [
        ("training.pth", vec!["--training"]),
        ("ddp.pth", vec!["--prefix", "module."]),
    ] {
        let out = dir.path().join(name);
        let st = std::process::Command::new("python3")
            .arg(repo_root().join("tests/fixtures/torch_zip.py"))
            .arg(&wpath)
            .arg(&out)
            .args(extra)
            .status()
            .expect("python3");
        assert!(st.success(), "torch_zip.py failed for {name}");
        files.push(out);
    }
    for f in &files {
        let (model, vm) =
            LatentMae::load(&cfg, f, &dev).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_same_params(&ref_vm, &vm, &f.display().to_string());
        let out = model
            .forward_with_noise(&v["x"], &v["noise"], ratio)
            .unwrap();
        assert_eq!(max_abs(&out.pred, &want.pred), 0.0, "{}", f.display());
        assert!(max_abs(&out.pred, &v["pred"]) < 1e-4);
        assert!(max_abs(&out.latent, &v["latent"]) < 1e-4);
    }
    // the fine-tuning path reads the .pth too
    let ccfg = lmd_model::ClassifierConfig {
        encoder: cfg.clone(),
        num_classes: 10,
        global_pool: true,
        drop_path: 0.0,
        linear_probe: false,
    };
    let vm = VarMap::new();
    let clf = lmd_model::VitClassifier::init(&ccfg, &vm, 0, 2e-5, &dev).unwrap();
    let names = clf.load_pretrained(&vm, &files[1]).unwrap();
    assert!(names.contains(&"blocks.1.attn.qkv.weight".to_string()));
    let a = vm.data().lock().unwrap()["blocks.1.attn.qkv.weight"]
        .as_tensor()
        .clone();
    let b = ref_vm.data().lock().unwrap()["blocks.1.attn.qkv.weight"]
        .as_tensor()
        .clone();
    assert_eq!(max_abs(&a, &b), 0.0);
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn a_pth_with_a_misshapen_or_missing_tensor_is_named() {
    let tv = shared_or_panic().join("testvectors");
    let dev = Device::Cpu;
    let wpath = tv.join("mae_p4_d96.weights.safetensors");
    let cfg_json: serde_json::Value = serde_json::from_str(&metadata(&wpath)["config"]).unwrap();
    let mut cfg = MaeConfig::from_mae_json(&cfg_json).unwrap();
    cfg.decoder_embed_dim = 32; // the file's decoder is 64 wide
    let e = LatentMae::load(&cfg, &tv.join("mae_p4_d96.pth"), &dev)
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("mae_p4_d96.pth") && e.contains("tensor decoder_") && e.contains("shape"),
        "{e}"
    );
    cfg = MaeConfig::from_mae_json(&cfg_json).unwrap();
    cfg.depth = 3; // the file has 2 blocks
    let e = LatentMae::load(&cfg, &tv.join("mae_p4_d96.pth"), &dev)
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("missing tensors") && e.contains("blocks.2."),
        "{e}"
    );
}

#[test]
fn nan_loss_at_a_mask_ratio_that_masks_nothing_is_refused_naming_l() {
    let dev = Device::Cpu;
    let cfg = tiny_cfg(); // 16 patches
    let vm = VarMap::new();
    let m = LatentMae::init(&cfg, &vm, 1, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &dev).unwrap();
    // int(L*(1-r)) keeps all 16 only at r = 0 (or 1 - r rounding to 1): then nothing is
    // masked and the loss was 0/0 = NaN
    for r in [0.0, 1e-17] {
        let e = m
            .forward(&x, r, 3)
            .map(|_| ())
            .expect_err("refused")
            .to_string();
        assert!(e.contains("L = 16") && e.contains("0/0"), "{e}");
    }
    // any ratio that masks one patch trains
    let out = m.forward(&x, 0.01, 3).unwrap();
    assert_eq!(
        out.masking
            .mask
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        2.0
    );
    assert!(out.loss.to_scalar::<f32>().unwrap().is_finite());
    // the schedule check names L before any training
    let s = lmd_model::MaskSchedule::Linear {
        start: 0.0,
        end: 0.75,
        ramp_fraction: 1.0,
    };
    let e = s.validate_for(cfg.num_patches()).unwrap_err().to_string();
    assert!(e.contains("L = 16"), "{e}");
    let ok = lmd_model::MaskSchedule::Linear {
        start: 0.01,
        end: 0.75,
        ramp_fraction: 1.0,
    };
    assert!(ok.validate_for(196).is_ok());
}

/// The parity tests run on the backend `LMD_KERNELS` selects (CI runs them three times: fused,
/// `LMD_KERNELS=candle`, the graph a GPU runs, and `LMD_KERNELS=rows`, that graph with the row
/// ops): this one fails if the setting were not honoured, so a later run cannot silently test
/// the fused kernels again.
#[test]
fn parity_models_compute_on_the_backend_lmd_kernels_selects() {
    let want = match std::env::var(lmd_model::KERNELS_ENV).as_deref() {
        Ok("candle") => lmd_model::Backend::Candle,
        Ok("rows") => lmd_model::Backend::Rows,
        Ok("ops") => lmd_model::Backend::Ops,
        _ => lmd_model::Backend::Fused,
    };
    let cfg = lmd_model::MaeConfig::tiny();
    let vm = VarMap::new();
    let model = LatentMae::init(&cfg, &vm, 0, &Device::Cpu).unwrap();
    assert_eq!(model.backend(), want);
    let clf_cfg = lmd_model::ClassifierConfig {
        encoder: cfg,
        num_classes: 3,
        global_pool: true,
        drop_path: 0.0,
        linear_probe: false,
    };
    let clf =
        lmd_model::VitClassifier::init(&clf_cfg, &VarMap::new(), 0, 0.01, &Device::Cpu).unwrap();
    assert_eq!(clf.backend(), want);
    // f64 has no fused kernels: auto picks candle's ops whatever the setting allows
    if want == lmd_model::Backend::Fused {
        assert_eq!(
            lmd_model::Backend::resolve(lmd_model::Kernels::Auto, &Device::Cpu, DType::F64)
                .unwrap(),
            lmd_model::Backend::Candle
        );
    }
}
