//! The quickstart pipeline end to end: precompute (the shared imagenette shards with TAESD, or
//! synthetic labelled latents without `LMD_SHARED`), pretrain a tiny latent MAE a few hundred
//! steps, fine-tune, linear-probe, evaluate the saved classifier.
//!
//! Asserts: the masked-patch loss falls by at least 30%; reconstruction previews and curve
//! plots exist (TAESD-decoded with real data); fine-tuning beats chance clearly (> 40% top-1 on
//! 10 classes); linear probing leaves every encoder weight unchanged; `eval_checkpoint` on the
//! best checkpoint reports the top-1 the fine-tune reported.

use lmd_train::data::synthetic::{write_dataset, SyntheticSpec};
use lmd_train::finetune::eval_checkpoint;
use lmd_train::model::candle::{safetensors, Device};
use lmd_train::quickstart::{run, QuickstartConfig};
use lmd_train::report::read_metrics;
use std::path::Path;

fn tensors(p: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    safetensors::load(p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn quickstart_pretrains_finetunes_probes_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qs");
    let shared = lmd_train::testvectors::shared_dir();
    let mut cfg = QuickstartConfig {
        out: out.clone(),
        pretrain_steps: 300,
        finetune_epochs: 15,
        linprobe_epochs: 10,
        ..Default::default()
    };
    if shared.is_none() {
        eprintln!("LMD_SHARED not set: synthetic labelled latents instead of imagenette");
        let (t, v) = (tmp.path().join("syn-train"), tmp.path().join("syn-val"));
        let spec = SyntheticSpec {
            records: 1536,
            records_per_shard: 512,
            ..Default::default()
        };
        write_dataset(&t, &spec).unwrap();
        write_dataset(
            &v,
            &SyntheticSpec {
                records: 500,
                first_index: 1_000_000, // same classes, other records
                ..spec
            },
        )
        .unwrap();
        cfg.train_latents = Some(t);
        cfg.val_latents = Some(v);
    }
    let mut log = Vec::new();
    let r = run(&cfg, &mut |l| log.push(l.to_string())).unwrap();
    eprintln!("{}", log.join("\n"));
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    if shared.is_some() {
        assert_eq!((r.train_records, r.val_records), (3000, 1000));
    }

    // pretraining: the loss falls by 30%+, previews and curves exist
    let m = read_metrics(&out.join("pretrain/metrics.jsonl")).unwrap();
    assert_eq!(m.last().unwrap().step, 300);
    let last3 = m[m.len() - 3..].iter().map(|l| l.loss).sum::<f64>() / 3.0;
    assert!(
        last3 < 0.7 * m[0].loss,
        "loss fell from {} to {last3} only",
        m[0].loss
    );
    let previews: Vec<_> = std::fs::read_dir(out.join("pretrain/previews"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(previews.len(), 3, "{previews:?}"); // steps 100, 200, 300
    let img = image::open(&previews[0]).unwrap();
    // 4 rows x 4 panels of 64 px (TAESD-decoded or 8x false colour), 4 px gaps
    assert_eq!(
        (img.width(), img.height()),
        (4 * 64 + 5 * 4, 4 * 64 + 5 * 4)
    );
    for run in ["pretrain", "finetune", "linprobe"] {
        let svg = std::fs::read_to_string(out.join(run).join("curves.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{run}");
    }

    // fine-tuning beats chance clearly; lmd-eval agrees with it
    let ft = r.stages.finetune.clone().unwrap();
    assert!(ft.top1 > 0.4, "fine-tune top-1 {}", ft.top1);
    let val = out.join(if shared.is_some() {
        "latents/val"
    } else {
        "../syn-val"
    });
    let ev = eval_checkpoint(
        &out.join("finetune/best/model.safetensors"),
        std::slice::from_ref(&val),
        256,
        lmd_train::DeviceSpec::Cpu,
    )
    .unwrap();
    assert_eq!(
        (ev.top1, ev.top5, ev.records),
        (ft.top1, ft.top5, ft.records)
    );

    // linear probing: encoder weights identical to the pretrained checkpoint
    let pre = lmd_train::train::latest_checkpoint(&out.join("pretrain")).unwrap();
    let a = tensors(&pre.join("model.safetensors"));
    let b = tensors(&out.join("linprobe/best/model.safetensors"));
    let mut compared = 0;
    for (k, v) in &b {
        if k.starts_with("blocks.")
            || k.starts_with("patch_embed.")
            || k == "cls_token"
            || k.starts_with("norm.")
        {
            assert_eq!(Some(v), a.get(k), "{k} changed in linear probing");
            compared += 1;
        }
    }
    assert!(compared > 10, "{compared}");
    let lp = r.stages.linprobe.unwrap();
    assert!(lp.top1 > 0.2, "linear probe top-1 {}", lp.top1);
}
