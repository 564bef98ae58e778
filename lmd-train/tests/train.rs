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
    // the same command again without --resume: refused, the run's checkpoints and log intact
    let e = run(&cfg(data.path(), a.path()), false, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already holds a run") && e.contains("--resume"),
        "{e}"
    );
    assert_eq!(metrics(a.path()).len(), 10);
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
        c.encoder_and_weights().unwrap();
        assert!(c.preset.is_some(), "{name}: no preset");
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

/// A WebDataset shard of `n` PNGs (`NNN.png` + `NNN.cls`) of 40 x 30: a smooth gradient with
/// a coloured square that moves with the image's class (of 3), so there is something to learn.
fn make_image_shard(dir: &Path, n: usize) -> std::path::PathBuf {
    let mut members = Vec::new();
    for i in 0..n {
        let class = i % 3;
        let img = image::RgbImage::from_fn(40, 30, |x, y| {
            let inside = (x as usize / 10 == class + i % 2) && (8..22).contains(&y);
            match (inside, class) {
                (true, 0) => image::Rgb([230, 40, 40]),
                (true, 1) => image::Rgb([40, 230, 40]),
                (true, _) => image::Rgb([40, 40, 230]),
                _ => image::Rgb([(x * 6) as u8, (y * 8) as u8, ((i * 37) % 200) as u8]),
            }
        });
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        members.push((format!("{i:03}.png"), png));
        members.push((format!("{i:03}.cls"), class.to_string().into_bytes()));
    }
    let p = dir.join("images-000000.tar");
    std::fs::write(&p, lmd_train::data::synthetic::tar_archive(&members)).unwrap();
    p
}

fn pixel_cfg(shard: &Path, out: &Path) -> TrainConfig {
    let mut c = cfg(shard, out);
    c.input = lmd_train::train_data::Input::Pixels;
    let m = c.model.as_mut().unwrap();
    (m.in_chans, m.img_size, m.patch_size) = (3, [16, 16], 4);
    c.batch_size = 8;
    c.preview_samples = 2;
    c
}

#[test]
fn pixel_mae_trains_from_image_shards_and_a_pixel_checkpoint_resumes_exactly() {
    let data = tempfile::tempdir().unwrap();
    let shard = make_image_shard(data.path(), 36); // 4 batches of 8 per epoch
    let a = tempfile::tempdir().unwrap();
    let s = run(&pixel_cfg(&shard, a.path()), false, &mut |_| {}).unwrap();
    assert_eq!(s.last_step, 10);
    let ma = metrics(a.path());
    assert_eq!(ma.len(), 10);
    assert_eq!(ma[9].epoch, 2);
    assert!(ma
        .iter()
        .all(|m| m.loss.is_finite() && m.data_wait_fraction >= 0.0));
    let first: f64 = ma[..3].iter().map(|m| m.loss).sum::<f64>();
    let last: f64 = ma[7..].iter().map(|m| m.loss).sum::<f64>();
    assert!(last < first, "{first} -> {last}");
    // an RGB preview: 2 rows of 4 panels of 16 px with 4 px gaps
    let p = image::open(a.path().join("previews/step-00000010.png")).unwrap();
    assert_eq!((p.width(), p.height()), (4 * 16 + 5 * 4, 2 * 16 + 3 * 4));
    // the checkpoint is a 3-channel patch-4 MAE
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.path().join("checkpoints/step-00000010/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["config"]["input"], "pixels");

    // stopped after step 6 (inside epoch 1), resumed: the same numbers
    let b = tempfile::tempdir().unwrap();
    let mut c = pixel_cfg(&shard, b.path());
    c.stop_after = Some(6);
    run(&c, false, &mut |_| {}).unwrap();
    c.stop_after = None;
    let s = run(&c, true, &mut |_| {}).unwrap();
    assert_eq!((s.first_step, s.last_step), (6, 10));
    let mb = metrics(b.path());
    assert_eq!(mb.len(), 10);
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(
            (x.step, x.epoch, x.loss, x.grad_norm),
            (y.step, y.epoch, y.loss, y.grad_norm)
        );
    }
    // a latent-shaped model on pixels is refused, naming both shapes
    let mut d = pixel_cfg(&shard, b.path());
    d.model.as_mut().unwrap().in_chans = 4;
    let e = run(&d, false, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("RGB") && e.contains("4x16x16"), "{e}");
}

#[test]
fn a_corrupt_image_costs_only_itself_in_pixel_training() {
    let data = tempfile::tempdir().unwrap();
    let shard = make_image_shard(data.path(), 32); // every image in each epoch's 4 batches
                                                   // damage one PNG inside the tar (its body, past the 8-byte signature and the IHDR)
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.windows(4).position(|w| w == b"IDAT").unwrap();
    bytes[at + 4..at + 40].fill(0);
    std::fs::write(&shard, bytes).unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut c = pixel_cfg(&shard, out.path());
    c.steps = 8;
    c.preview_samples = 0; // (the preview's fixed samples would meet it too)
    let s = run(&c, false, &mut |_| {}).unwrap();
    assert_eq!(s.last_step, 8);
    // left out once per epoch, the run went on
    assert_eq!(s.skipped, 2);
    assert!(metrics(out.path()).iter().all(|m| m.loss.is_finite()));
}

#[test]
fn pixel_checkpoints_fine_tune_linear_probe_and_evaluate_on_image_shards() {
    use lmd_train::finetune::{eval_checkpoint, run as finetune, FinetuneConfig};
    let data = tempfile::tempdir().unwrap();
    let shard = make_image_shard(data.path(), 36);
    let val_dir = data.path().join("val");
    std::fs::create_dir(&val_dir).unwrap();
    let val = make_image_shard(&val_dir, 12);
    let pre = tempfile::tempdir().unwrap();
    let mut p = pixel_cfg(&shard, pre.path());
    p.knn_data = vec![val.clone()];
    let s = run(&p, false, &mut |_| {}).unwrap();
    // k-NN at each checkpoint (steps 4, 8, 10) with the training seconds before it
    let knn: Vec<serde_json::Value> = std::fs::read_to_string(pre.path().join("knn.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        knn.iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [4, 8, 10]
    );
    let ts: Vec<f64> = knn.iter().map(|v| v["train_s"].as_f64().unwrap()).collect();
    assert!(
        ts[0] > 0.0 && ts[0] < ts[1] && ts[1] < ts[2] && ts[2] <= s.train_s,
        "{ts:?}"
    );
    assert!(knn
        .iter()
        .all(|v| v["train_samples"] == 36 && v["val_samples"] == 12));
    let top1 = s.knn.unwrap().top1;
    assert!((0.0..=1.0).contains(&top1));
    let weights = pre
        .path()
        .join("checkpoints/step-00000010/model.safetensors");
    // fine-tuning names the encoder; linear probing leaves it out and takes the one the
    // checkpoint's run records (its config.json)
    let ft = |linear_probe: bool, out: &Path| FinetuneConfig {
        input: lmd_train::train_data::Input::Pixels,
        model: (!linear_probe).then(|| p.model.clone().unwrap()),
        pretrained: Some(weights.clone()),
        data: vec![shard.clone()],
        val_data: vec![val.clone()],
        out: out.to_path_buf(),
        epochs: 3,
        batch_size: 8,
        linear_probe,
        blr: if linear_probe { 0.1 } else { 1e-2 },
        num_classes: Some(3),
        eval_batch_size: 5, // batches that do not divide the 12 images
        ..Default::default()
    };
    // an encoder the checkpoint does not record is refused before any data is read, naming
    // both shapes and what to give instead
    let out = tempfile::tempdir().unwrap();
    let mut wrong = ft(true, out.path());
    wrong.preset = Some(lmd_train::model::Preset::Tiny);
    wrong.data = vec![data.path().join("nowhere.tar")];
    let e = finetune(&wrong, false, &mut |_| {}, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("its encoder (32 wide, depth 2, 2 heads, mlp 2, patch 4 on 3x16x16, on pixels")
            && e.contains("is not this run's (192 wide")
            && e.contains("leave out --preset"),
        "{e}"
    );
    wrong.preset = None;
    wrong.input = lmd_train::train_data::Input::Latents;
    let e = finetune(&wrong, false, &mut |_| {}, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("give --input pixels"), "{e}");
    for lp in [false, true] {
        let out = tempfile::tempdir().unwrap();
        let s = finetune(&ft(lp, out.path()), false, &mut |_| {}, &mut |_| {}).unwrap();
        // again without --resume: refused (it would overwrite best/)
        let e = finetune(&ft(lp, out.path()), false, &mut |_| {}, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("already holds a run") && e.contains("best"),
            "{e}"
        );
        let last = s.last.unwrap();
        assert_eq!(last.records, 12);
        assert!(last.loss.is_finite() && (0.0..=1.0).contains(&last.top1));
        // lmd-eval on the kept classifier: an RGB encoder reads the image shard, and gives
        // the best epoch's figures again
        let best = s.best.unwrap();
        let ev = eval_checkpoint(
            &out.path().join("best"),
            std::slice::from_ref(&val),
            4,
            "cpu".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(ev.records, 12);
        assert!((ev.top1 - best.top1).abs() < 1e-9, "{ev:?} vs {best:?}");
        assert!((ev.loss - best.loss).abs() < 1e-4, "{ev:?} vs {best:?}");
    }
}
