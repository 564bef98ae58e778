//! `lmd-export`: classifiers (fine-tuned and linear-probe) and MAEs out to timm/MAE names, as
//! safetensors and `.pth`; the reference outputs equal lmd's own model on the same input; with
//! `LMD_TORCH_PYTHON` (a python with torch + timm) `tools/check_export.py` loads every file
//! strictly in PyTorch and compares the forward outputs.

use lmd_train::model::candle::{DType, Device, Tensor};
use lmd_train::model::candle_nn::VarMap;
use lmd_train::model::{ClassifierConfig, LatentMae, MaeConfig, VitClassifier};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn enc_cfg() -> MaeConfig {
    MaeConfig {
        in_chans: 4,
        img_size: [8, 8],
        patch_size: 2,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        decoder_embed_dim: 16,
        decoder_depth: 1,
        decoder_num_heads: 2,
        mlp_ratio: 2.0,
        norm_pix_loss: true,
        norm_eps: 1e-6,
    }
}

/// The state-dict keys of timm 1.0.31's `VisionTransformer(depth=2, global_pool=..,
/// num_classes=..)`, as printed by `sorted(m.state_dict())`.
fn timm_keys(global_pool_avg: bool, head: bool) -> BTreeSet<String> {
    let mut k: BTreeSet<String> = [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for i in 0..2 {
        for n in [
            "attn.proj.bias",
            "attn.proj.weight",
            "attn.qkv.bias",
            "attn.qkv.weight",
            "mlp.fc1.bias",
            "mlp.fc1.weight",
            "mlp.fc2.bias",
            "mlp.fc2.weight",
            "norm1.bias",
            "norm1.weight",
            "norm2.bias",
            "norm2.weight",
        ] {
            k.insert(format!("blocks.{i}.{n}"));
        }
    }
    let norm = if global_pool_avg { "fc_norm" } else { "norm" };
    k.insert(format!("{norm}.weight"));
    k.insert(format!("{norm}.bias"));
    if head {
        k.insert("head.weight".into());
        k.insert("head.bias".into());
    }
    k
}

fn export(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_lmd-export"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lmd-export {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn keys(path: &Path) -> BTreeSet<String> {
    lmd_train::model::read_tensors(path, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect()
}

fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
    lmd_train::model::max_abs_diff(a, b).unwrap()
}

/// A trained-looking classifier saved as lmd-finetune does (`model.safetensors` +
/// `classifier.json`), with non-trivial feature statistics for the linear probe.
fn save_classifier(dir: &Path, global_pool: bool, linear_probe: bool) -> (PathBuf, VitClassifier) {
    let dev = Device::Cpu;
    let cfg = ClassifierConfig {
        encoder: enc_cfg(),
        num_classes: 5,
        global_pool,
        drop_path: 0.1,
        linear_probe,
    };
    let vm = VarMap::new();
    let clf = VitClassifier::init(&cfg, &vm, 3, 0.5, &dev).unwrap();
    if linear_probe {
        let d = vm.data().lock().unwrap();
        d["head.0.running_mean"]
            .set(&Tensor::randn(0f32, 1.0, 32, &dev).unwrap())
            .unwrap();
        d["head.0.running_var"]
            .set(&(Tensor::rand(0f32, 1.0, 32, &dev).unwrap() + 0.2).unwrap())
            .unwrap();
        d["head.1.bias"]
            .set(&Tensor::randn(0f32, 1.0, 5, &dev).unwrap())
            .unwrap();
    }
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("model.safetensors");
    clf.save(&vm, &p).unwrap();
    std::fs::write(
        dir.join("classifier.json"),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    let (clf, _) = VitClassifier::load(&cfg, &p, &dev).unwrap();
    (p, clf)
}

#[test]
fn classifiers_export_to_timm_names_and_the_linear_probe_head_folds_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let mut outs = Vec::new();
    for (gp, lp) in [(true, false), (false, true)] {
        let (ck, clf) = save_classifier(&dir.path().join(format!("ft-{gp}-{lp}")), gp, lp);
        for (to, ext) in [("timm", "safetensors"), ("mae", "pth")] {
            let out = dir.path().join(format!("clf-{gp}-{lp}-{to}.{ext}"));
            let s = export(&[
                ck.to_str().unwrap(),
                "--to",
                to,
                "--out",
                out.to_str().unwrap(),
                "--reference",
            ]);
            assert_eq!(s["source_kind"], "classifier");
            assert_eq!(s["model_args"]["num_classes"], 5);
            assert_eq!(
                s["model_args"]["global_pool"],
                if gp { "avg" } else { "token" }
            );
            assert_eq!(keys(&out), timm_keys(gp, true), "{}", out.display());
            // the reference logits are lmd's classifier's own (folded head == BatchNorm + Linear)
            let r = candle_core_load(&out.with_extension("reference.safetensors"));
            let want = clf.forward_t(&r["x"], None).unwrap();
            let d = maxdiff(&r["logits"], &want);
            assert!(d < 1e-5, "{}: logits differ by {d}", out.display());
            outs.push(out);
        }
    }
    // a pretrain checkpoint: encoder only, token or avg pooling; the whole MAE for --to mae
    let vm = VarMap::new();
    let mae = LatentMae::init(&enc_cfg(), &vm, 9, &dev).unwrap();
    let run = dir.path().join("run");
    let ckdir = run.join("checkpoints/step-00000010");
    std::fs::create_dir_all(&ckdir).unwrap();
    let ck = ckdir.join("model.safetensors");
    mae.save(&vm, &ck).unwrap();
    let tc = lmd_train::train::TrainConfig {
        model: Some(enc_cfg()),
        ..Default::default()
    };
    std::fs::write(run.join("config.json"), serde_json::to_vec(&tc).unwrap()).unwrap();
    for (pool, avg) in [("token", false), ("avg", true)] {
        let out = dir.path().join(format!("enc-{pool}.pth"));
        let s = export(&[
            ck.to_str().unwrap(),
            "--to",
            "timm",
            "--global-pool",
            pool,
            "--out",
            out.to_str().unwrap(),
            "--reference",
        ]);
        assert_eq!(s["source_kind"], "full-mae");
        assert_eq!(s["model_args"]["num_classes"], 0);
        assert_eq!(
            s["model_args"]["num_heads"], 2,
            "heads from the run's config.json"
        );
        assert_eq!(keys(&out), timm_keys(avg, false));
        outs.push(out);
    }
    let out = dir.path().join("full.pth");
    let s = export(&[
        ck.to_str().unwrap(),
        "--to",
        "mae",
        "--out",
        out.to_str().unwrap(),
        "--reference",
    ]);
    assert_eq!(s["model_args"]["decoder_num_heads"], 2);
    let full = lmd_train::model::read_tensors(&out, &dev).unwrap();
    let orig = lmd_train::model::read_tensors(&ck, &dev).unwrap();
    assert_eq!(full.len(), orig.len());
    for (k, t) in &orig {
        assert_eq!(maxdiff(t, &full[k]), 0.0, "{k}");
    }
    let r = candle_core_load(&out.with_extension("reference.safetensors"));
    let again = mae.forward_with_noise(&r["x"], &r["noise"], 0.75).unwrap();
    assert_eq!(maxdiff(&again.pred, &r["pred"]), 0.0);
    outs.push(out);

    match std::env::var("LMD_TORCH_PYTHON") {
        Ok(py) => {
            let o = Command::new(py)
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/check_export.py"))
                .args(&outs)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            eprintln!("{text}{}", String::from_utf8_lossy(&o.stderr));
            assert!(o.status.success(), "check_export.py failed");
            assert_eq!(text.lines().filter(|l| l.contains("\"ok\": true")).count(), 2 * 6 + 1);
        }
        Err(_) => eprintln!("LMD_TORCH_PYTHON not set: the PyTorch load is checked by tools/check_export.py where torch is installed"),
    }
}

fn candle_core_load(p: &Path) -> std::collections::HashMap<String, Tensor> {
    let m = lmd_train::model::read_tensors(p, &Device::Cpu).unwrap();
    m.into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F32).unwrap()))
        .collect()
}

#[test]
fn an_architecture_that_cannot_be_read_from_the_weights_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let vm = VarMap::new();
    let mae = LatentMae::init(&enc_cfg(), &vm, 9, &Device::Cpu).unwrap();
    let ck = dir.path().join("loose.safetensors");
    mae.save(&vm, &ck).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lmd-export"))
        .args([ck.to_str().unwrap(), "--to", "timm", "--out"])
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("loose.safetensors") && err.contains("--num-heads"),
        "{err}"
    );
    assert!(!dir.path().join("x.safetensors").exists());
}
