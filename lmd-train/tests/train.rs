//! The trainer on latent shards the test makes: metrics, checkpoints, exact resume.

use lmd_train::data::synthetic::{write_dataset, SyntheticSpec};
use lmd_train::model::{MaeConfig, MaskSchedule};
use lmd_train::train::{run, Metrics, TrainConfig};
use std::path::Path;

fn make_data(dir: &Path, n: usize) {
    write_dataset(
        dir,
        &SyntheticSpec {
            records: n,
            records_per_shard: n,
            ..Default::default()
        },
    )
    .unwrap();
}

fn cfg(data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        model: Some(MaeConfig {
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
        }),
        schedule: MaskSchedule::lmd_cosine(),
        data: vec![data.to_path_buf()],
        out: out.to_path_buf(),
        steps: 10,
        batch_size: 16,
        blr: 0.05,
        warmup_steps: 2,
        window: 32,
        checkpoint_every: 4,
        run: lmd_train::RunSettings {
            log_every: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn metrics(out: &Path) -> Vec<Metrics> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn training_logs_checkpoints_and_resumes_exactly() {
    let data = tempfile::tempdir().unwrap();
    make_data(data.path(), 80); // 5 batches per epoch: the run crosses epochs
    let a = tempfile::tempdir().unwrap();
    let s = run(&cfg(data.path(), a.path()), false, &mut |_| {}).unwrap();
    assert_eq!(s.last_step, 10);
    let ma = metrics(a.path());
    assert_eq!(ma.len(), 10);
    assert_eq!(
        ma.iter().map(|m| m.step).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert!(ma
        .iter()
        .all(|m| m.loss.is_finite() && m.samples_per_s > 0.0 && m.grad_norm > 0.0));
    assert_eq!(ma[9].epoch, 1);
    // the mask ratio follows the cosine schedule, the lr warms up
    assert!((ma[0].mask_ratio - 0.15).abs() < 1e-9 && ma[9].mask_ratio > ma[3].mask_ratio);
    assert!(ma[0].lr == 0.0 && ma[1].lr > 0.0);
    assert_eq!(
        std::fs::read_to_string(a.path().join("checkpoints/latest")).unwrap(),
        "step-00000010"
    );
    assert!(a
        .path()
        .join("checkpoints/step-00000004/model.safetensors")
        .exists());
    // learning happens: the loss at the end is below the start
    let first: f64 = ma[..3].iter().map(|m| m.loss).sum::<f64>();
    let last: f64 = ma[7..].iter().map(|m| m.loss).sum::<f64>();
    assert!(last < first, "{first} -> {last}");

    // Stopped after step 6 (checkpoint at 6), resumed: the same numbers.
    let b = tempfile::tempdir().unwrap();
    let mut c = cfg(data.path(), b.path());
    c.stop_after = Some(6);
    run(&c, false, &mut |_| {}).unwrap();
    assert_eq!(metrics(b.path()).len(), 6);
    c.stop_after = None;
    let s = run(&c, true, &mut |_| {}).unwrap();
    assert_eq!(s.first_step, 6);
    let mb = metrics(b.path());
    assert_eq!(mb.len(), 10);
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(
            (x.step, x.loss, x.mask_ratio, x.lr, x.grad_norm),
            (y.step, y.loss, y.mask_ratio, y.lr, y.grad_norm)
        );
    }
    // resuming with another configuration is refused
    let mut d = cfg(data.path(), b.path());
    d.blr = 0.01;
    let e = run(&d, true, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("another configuration"), "{e}");
    // and names the setting that differs, with both values
    assert!(e.contains("blr: 0.05 -> 0.01"), "{e}");

    // regression: a damaged newest checkpoint is never loaded; resume falls back to the one
    // before (step 8) and redoes the steps after it, with the same numbers
    let ck = b.path().join("checkpoints/step-00000010/model.safetensors");
    let mut bytes = std::fs::read(&ck).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x55;
    std::fs::write(&ck, bytes).unwrap();
    let s = run(&c, true, &mut |_| {}).unwrap();
    assert_eq!((s.first_step, s.last_step), (8, 10));
    let mc = metrics(b.path());
    assert_eq!(mc.len(), 10);
    for (x, y) in ma.iter().zip(&mc) {
        assert_eq!((x.step, x.loss, x.grad_norm), (y.step, y.loss, y.grad_norm));
    }
}

#[test]
fn pretrain_presets_parse() {
    for name in ["pretrain-tiny.toml", "pretrain-lmd-base.toml"] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(name);
        let c: TrainConfig = toml::from_str(&std::fs::read_to_string(&p).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        c.model_config().unwrap();
        c.schedule.validate().unwrap();
    }
}

#[test]
fn finetune_presets_parse() {
    for name in [
        "finetune-tiny.toml",
        "linprobe-tiny.toml",
        "finetune-lmd-base.toml",
    ] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(name);
        let c: lmd_train::finetune::FinetuneConfig =
            toml::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        c.encoder_config().unwrap();
        assert_eq!(c.linear_probe, name.starts_with("linprobe"));
    }
}

#[test]
fn nonsense_settings_are_refused_before_any_work_naming_the_setting() {
    let data = tempfile::tempdir().unwrap();
    make_data(data.path(), 32);
    let out = data.path().join("run");
    let mut c = cfg(data.path(), &out);
    c.schedule = MaskSchedule::Constant { ratio: 0.0 };
    let e = run(&c, false, &mut |_| {})
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    assert!(e.contains("schedule") && e.contains("L = 16"), "{e}");
    let mut c = cfg(data.path(), &out);
    c.schedule = MaskSchedule::Constant { ratio: 1.5 };
    let e = run(&c, false, &mut |_| {})
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    assert!(e.contains("schedule") && e.contains("1.5"), "{e}");
    let mut c = cfg(data.path(), &out);
    c.steps = 0;
    let e = run(&c, false, &mut |_| {})
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    assert!(e.contains("steps (0)"), "{e}");
    assert!(!out.exists(), "nothing written for a refused run");
}

/// `--precision bf16`: the loss falls as the f32 run's does, the weights, optimiser state and
/// checkpoints stay f32 (loading as an f32 model), and a stopped bf16 run resumes exactly.
#[test]
fn bf16_training_follows_f32_keeps_f32_checkpoints_and_resumes_exactly() {
    use lmd_train::model::{candle::DType, candle::Device, LatentMae, Precision};
    let data = tempfile::tempdir().unwrap();
    make_data(data.path(), 80);
    let f32_out = tempfile::tempdir().unwrap();
    run(&cfg(data.path(), f32_out.path()), false, &mut |_| {}).unwrap();
    let bf16_out = tempfile::tempdir().unwrap();
    let mut c = cfg(data.path(), bf16_out.path());
    c.run.precision = Precision::Bf16;
    run(&c, false, &mut |_| {}).unwrap();
    let (m32, m16) = (metrics(f32_out.path()), metrics(bf16_out.path()));
    assert_eq!(m16.len(), 10);
    for (a, b) in m32.iter().zip(&m16) {
        assert!(
            (a.loss - b.loss).abs() < 0.03 * a.loss,
            "step {}: f32 loss {} vs bf16 {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    let first: f64 = m16[..3].iter().map(|m| m.loss).sum();
    let last: f64 = m16[7..].iter().map(|m| m.loss).sum();
    assert!(last < first, "bf16: {first} -> {last}");
    // bf16 is really on: not the f32 numbers
    assert!(m32.iter().zip(&m16).any(|(a, b)| a.loss != b.loss));
    let cfg_json = std::fs::read_to_string(bf16_out.path().join("config.json")).unwrap();
    assert!(cfg_json.contains("\"precision\": \"bf16\""), "{cfg_json}");
    let ck = bf16_out.path().join("checkpoints/step-00000010");
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let t = lmd_train::model::read_tensors(&ck.join(f), &Device::Cpu).unwrap();
        assert!(!t.is_empty());
        // (the optimiser's step count is an f64 scalar)
        for (name, t) in t.iter().filter(|(n, _)| n.as_str() != "step") {
            assert_eq!(t.dtype(), DType::F32, "{f}: {name}");
        }
    }
    let mcfg = c.model.clone().unwrap();
    LatentMae::load(&mcfg, &ck.join("model.safetensors"), &Device::Cpu).unwrap();

    let again = tempfile::tempdir().unwrap();
    let mut d = cfg(data.path(), again.path());
    d.run.precision = Precision::Bf16;
    d.stop_after = Some(6);
    run(&d, false, &mut |_| {}).unwrap();
    d.stop_after = None;
    assert_eq!(run(&d, true, &mut |_| {}).unwrap().first_step, 6);
    for (x, y) in m16.iter().zip(&metrics(again.path())) {
        assert_eq!((x.step, x.loss, x.grad_norm), (y.step, y.loss, y.grad_norm));
    }
}
