//! scripts/device-check.sh, the prepared GPU check, run on this machine's CPU at its small
//! sizes (LMD_CHECK_SMALL=1) with the `lmd` binary of this build: every step the check runs on
//! a GPU runs here too, so the script cannot rot between the sessions that have a GPU.

use std::path::Path;
use std::process::Command;

fn lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn the_device_check_script_runs_every_step_on_the_cpu() {
    let shared = std::env::var("LMD_SHARED").expect("needs LMD_SHARED");
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let run = check(&shared, 900, t.path(), &out);
    let log = std::fs::read_to_string(out.join("device-check.log")).unwrap_or_default();
    assert!(
        run.status.success(),
        "{}\n{log}",
        String::from_utf8_lossy(&run.stderr)
    );
    let r = lines(&out.join("device-check.jsonl"));
    let has_torch = Command::new("python3")
        .args(["-c", "import torch"])
        .status()
        .is_ok_and(|s| s.success());
    // every step ran; without PyTorch only the steps that run it fail, and they say why
    let steps: Vec<&serde_json::Value> = r.iter().filter(|v| v.get("step").is_some()).collect();
    assert_eq!(steps.len(), 18, "{steps:?}");
    for s in &steps {
        let name = s["step"].as_str().unwrap();
        let needs_torch = name.contains("torch") || name == "train-step";
        if has_torch || !needs_torch {
            assert_eq!(s["rc"], 0, "step {name} failed:\n{log}");
        }
    }
    if !has_torch {
        assert!(log.contains("No module named 'torch'"), "{log}");
    }
    let bench =
        |b: &str| -> Vec<&serde_json::Value> { r.iter().filter(|v| v["bench"] == b).collect() };
    // parity: all nine quantities within their bounds, on the default kernels and on the rows
    let parity = bench("parity");
    assert_eq!(parity.len(), 18, "{parity:?}");
    assert!(parity.iter().all(|p| p["pass"] == true), "{parity:?}");
    let rows = parity.iter().filter(|p| p["kernels"] == "rows").count();
    assert_eq!(rows, 9, "{parity:?}");
    // ours beside the baselines' lines
    assert_eq!(bench("vae").len(), 2);
    let step_lines: Vec<_> = bench("train-step")
        .into_iter()
        .filter(|v| v.get("baseline").is_none())
        .collect();
    // the default backend's two ratios, then the row kernels' (named, and in the summary)
    assert_eq!(step_lines.len(), 4, "{r:?}");
    let backends: Vec<_> = step_lines.iter().map(|v| v["backend"].as_str()).collect();
    assert_eq!(
        backends,
        [Some("fused"), Some("fused"), Some("rows"), Some("rows")],
        "{r:?}"
    );
    assert!(
        step_lines[2..]
            .iter()
            .all(|v| v["baseline_backend"] == "candle"),
        "{r:?}"
    );
    // the AdamW step, flat beside per parameter, on the same gradients
    let o = bench("optimizer");
    assert_eq!(o.len(), 3, "{o:?}");
    assert_eq!(
        (o[0]["update"].as_str(), o[1]["update"].as_str()),
        (Some("flat"), Some("per-param"))
    );
    // precompute at scale: its summary beside the decode-only rate of the same images
    let made = bench("make-input");
    let p = bench("precompute");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0]["written"], made[0]["images"]);
    assert!(p[0]["decode_images_per_s"].as_f64().unwrap() > 0.0);
    // decode-only in the pipeline's output (u8) and with the host's f32 conversion beside it
    let d = bench("decode");
    assert_eq!(
        d.iter()
            .map(|v| v["output"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["chw-f32", "chw-u8"]
    );
    assert!(d.iter().all(|v| v["images_per_s"].as_f64().unwrap() > 0.0));
    // the short pretrain and fine-tune reached a loss and a top-1
    let s = bench("summary");
    assert_eq!(s.len(), 1);
    let s = s[0];
    assert!(s["pretrain_steps"].as_u64().unwrap() >= 6, "{s}");
    assert!(s["pretrain_loss_last"].as_f64().unwrap().is_finite(), "{s}");
    assert_eq!(s["finetune_top1"].as_array().unwrap().len(), 1, "{s}");
    assert!(
        s["precompute_vs_decode_only"].as_f64().unwrap() > 0.0,
        "{s}"
    );
    assert!(
        s["optimizer_per_param_over_flat"].as_f64().unwrap() > 0.0,
        "{s}"
    );
    assert_eq!(s["skipped_steps"], serde_json::json!([]), "{s}");
    // the host's share of the train step (on the CPU all of it)
    let host = s["train_step_host_fraction_0.15"].as_f64().unwrap();
    assert!(host > 0.0 && host <= 1.0, "{s}");
    // the row kernels' step over candle's ops in the same invocation, per ratio
    for ratio in ["0.15", "0.75"] {
        let k = format!("train_step_rows_vs_candle_{ratio}");
        assert!(s[&k].as_f64().unwrap() > 0.0, "{k}: {s}");
    }
}

/// `scripts/device-check.sh run` at its small sizes on the CPU, with `budget_s` as
/// LMD_CHECK_BUDGET_S, results in `out`.
fn check(data: &str, budget_s: u64, tmp: &Path, out: &Path) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Command::new("timeout")
        .arg("900")
        .arg("bash")
        .arg(root.join("scripts/device-check.sh"))
        .arg("run")
        .env("LMD_CHECK_DEVICE", "cpu")
        .env("LMD_CHECK_SMALL", "1")
        .env("LMD_CHECK_BUDGET_S", budget_s.to_string())
        .env("LMD_BIN", env!("CARGO_BIN_EXE_lmd"))
        .env("LMD_CHECK_DATA", data)
        .env("OUT", out)
        .env("TMPDIR", tmp)
        .output()
        .unwrap()
}

/// With no time left every step is skipped and named, and the summary is still written: a
/// check that runs long on the GPU machine ends inside the device call's limit with what it
/// measured, rather than being killed before its summary.
#[test]
#[ignore = "needs python3"]
fn a_device_check_out_of_time_skips_its_steps_and_still_writes_the_summary() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let run = check("/nonexistent", 0, t.path(), &out);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let r = lines(&out.join("device-check.jsonl"));
    let skipped: Vec<&str> = r
        .iter()
        .filter(|v| v["skipped"].is_string())
        .map(|v| v["step"].as_str().unwrap())
        .collect();
    assert_eq!(skipped.len(), 18, "{r:?}");
    assert!(r.iter().all(|v| v.get("rc").is_none()), "a step ran: {r:?}");
    let s = r.last().unwrap();
    assert_eq!(s["bench"], "summary", "{r:?}");
    assert_eq!(s["skipped_steps"], serde_json::json!(skipped));
    assert_eq!(s["failed_steps"], serde_json::json!([]));
}
