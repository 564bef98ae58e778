//! Data-parallel training under OpenMPI's `mpirun` (the `mpi` feature; CI installs
//! `libopenmpi-dev openmpi-bin`): 2 ranks x batch 16 follow 1 rank x batch 32; a run killed
//! at one world size resumes at another to the uninterrupted loss sequence; a rank SIGKILLed
//! ends the job naming it; SIGUSR1 to mpirun checkpoints and stops; fine-tuning at 2 ranks
//! reaches 1 rank's top-1. Synthetic latents, 2 cores.
//!
//! OpenMPI as root needs `OMPI_ALLOW_RUN_AS_ROOT=1` + `OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1` (set
//! here for every run; harmless otherwise), `--oversubscribe` past the core count, and pins
//! each rank to one core unless `--bind-to none`: each rank is given one thread here, so the
//! 2-rank runs use the 2 cores as 1 rank with 2 threads does.
//!
//! The ignored tests need more than OpenMPI: a Slurm cluster (`srun`, `scancel`;
//! `scripts/slurm-local.sh` starts one here), or an MPICH build (`LMD_TEST_MPI=mpich`, built
//! with `MPICC=mpicc.mpich`: the srun tests then use `--mpi=pmi2`, and MPICH's own `mpiexec`
//! is tested). CI runs them all: the Slurm ones with OpenMPI, then all again with MPICH.
#![cfg(feature = "mpi")]

mod common;

use lmd_train::data::synthetic::{write_dataset, SyntheticSpec};
use lmd_train::train::Metrics;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const SETTINGS: &str = r#"
steps = 50
blr = 1.5e-3
warmup_steps = 5
checkpoint_every = 10
log_every = 1
window = 128
keep_checkpoints = 0
preview_samples = 0
"#;

fn config() -> String {
    common::with_tiny_mae(SETTINGS)
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
    cfg: PathBuf,
}

fn setup(records: usize) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let data = root.join("data");
    write_dataset(
        &data,
        &SyntheticSpec {
            records,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = root.join("cfg.toml");
    std::fs::write(&cfg, config()).unwrap();
    Setup {
        _tmp: tmp,
        root,
        data,
        cfg,
    }
}

/// `program ARGS` under `mpirun -np N` (N > 0), or alone (N = 0: no launcher), one thread per
/// rank when N = 2 (two threads alone), in its own process group.
fn launch(np: usize, program: &str, args: &[&std::ffi::OsStr]) -> Command {
    launch_via(Via::Mpirun, np, program, args)
}

/// The launcher of a test job.
#[derive(Clone, Copy, Debug)]
enum Via {
    Mpirun,
    /// `srun --mpi=<plugin>` into a Slurm cluster (`scripts/slurm-local.sh` starts one on this
    /// machine for CI; `SLURM_CONF` names its config).
    Srun(&'static str),
    /// MPICH's Hydra `mpiexec` (`mpiexec.mpich` on Debian; `LMD_TEST_MPIEXEC` names another).
    Hydra,
}

/// The binaries are built with MPICH (`LMD_TEST_MPI=mpich`), else with OpenMPI.
fn mpich() -> bool {
    std::env::var("LMD_TEST_MPI").is_ok_and(|v| v == "mpich")
}

/// For the tests of MPICH's own launcher: fails on an OpenMPI build.
fn require_mpich() {
    assert!(
        mpich(),
        "set LMD_TEST_MPI=mpich, on a build with MPICC=mpicc.mpich"
    );
}

/// srun's MPI plugin for this build, and how lmd names that launcher: Debian's OpenMPI has
/// only a PMIx client, MPICH a PMI-2 one.
fn srun_mpi() -> (&'static str, &'static str) {
    if mpich() {
        ("pmi2", "2 ranks (a PMI launcher")
    } else {
        ("pmix", "2 ranks (a PMIx launcher")
    }
}

fn launch_via(via: Via, np: usize, program: &str, args: &[&std::ffi::OsStr]) -> Command {
    let threads = if np >= 2 { "1" } else { "2" };
    let mut c = match via {
        _ if np == 0 => Command::new(program),
        Via::Mpirun => {
            let mut c = Command::new("mpirun");
            c.args([
                "-np",
                &np.to_string(),
                "--oversubscribe",
                "--bind-to",
                "none",
            ])
            .args(["-x", "RAYON_NUM_THREADS", "-x", "CANDLE_NUM_THREADS"])
            .arg(program);
            c
        }
        Via::Srun(plugin) => {
            // the environment goes with the tasks (srun's default --export=ALL); one core each
            let mut c = Command::new("srun");
            c.arg(format!("--mpi={plugin}"))
                .args([
                    "-n",
                    &np.to_string(),
                    "--cpus-per-task=1",
                    "--kill-on-bad-exit=1",
                ])
                .args(["--time=10", "--quiet"])
                .arg(program);
            c
        }
        Via::Hydra => {
            // Hydra passes the whole environment on by default
            let exe = std::env::var("LMD_TEST_MPIEXEC").unwrap_or("mpiexec.mpich".into());
            let mut c = Command::new(exe);
            c.args(["-n", &np.to_string(), "-bind-to", "none"])
                .arg(program);
            c
        }
    };
    c.args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("RAYON_NUM_THREADS", threads)
        .env("CANDLE_NUM_THREADS", threads)
        .process_group(0);
    c
}

fn train(s: &Setup, np: usize, out: &Path, batch: usize, resume: bool) -> Command {
    train_via(Via::Mpirun, s, np, out, batch, resume)
}

fn train_via(via: Via, s: &Setup, np: usize, out: &Path, batch: usize, resume: bool) -> Command {
    let batch = batch.to_string();
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--config".as_ref(),
        s.cfg.as_os_str(),
        "--data".as_ref(),
        s.data.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--batch-size".as_ref(),
        batch.as_ref(),
        "--no-progress".as_ref(),
    ];
    if resume {
        args.push("--resume".as_ref());
    }
    launch_via(via, np, env!("CARGO_BIN_EXE_lmd-train"), &args)
}

fn metrics(out: &Path) -> Vec<Metrics> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn ok(o: Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Same steps, losses within relative `tol`.
fn assert_same_losses(a: &[Metrics], b: &[Metrics], tol: f64) {
    assert_eq!(a.len(), b.len(), "number of logged steps");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.step, y.step);
        let rel = (x.loss - y.loss).abs() / x.loss.abs().max(1e-12);
        assert!(
            rel <= tol,
            "step {}: loss {} vs {} (relative {rel:.2e})",
            x.step,
            x.loss,
            y.loss
        );
        assert_eq!(x.lr, y.lr, "step {}: lr", x.step);
    }
}

/// The final checkpoint's tensors.
fn weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let name = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    let p = out
        .join("checkpoints")
        .join(name.trim())
        .join("model.safetensors");
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let f = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, f)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn kill_group(child: &mut Child) {
    // SIGKILL the whole process group: mpirun and every rank
    unsafe_kill(-(child.id() as i32), 9);
    child.wait().unwrap();
}

fn unsafe_kill(pid: i32, sig: i32) {
    let st = Command::new("kill")
        .args([format!("-{sig}"), "--".into(), pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// Wait until the job `child` has logged `n` steps in `out` (at most 120 s; it must not end).
fn wait_for_steps(child: &mut Child, out: &Path, n: usize) {
    let t0 = Instant::now();
    while metrics(out).len() < n {
        assert!(child.try_wait().unwrap().is_none(), "the job ended early");
        assert!(t0.elapsed() < Duration::from_secs(120), "no steps in 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Wait until `out`'s latest checkpoint is at least `step`, then SIGKILL the job.
fn kill_after_checkpoint(child: &mut Child, out: &Path, step: u64) {
    let t0 = Instant::now();
    loop {
        let latest = std::fs::read_to_string(out.join("checkpoints/latest"))
            .ok()
            .and_then(|s| s.trim().strip_prefix("step-")?.parse::<u64>().ok());
        if latest.is_some_and(|l| l >= step) {
            kill_group(child);
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint in 300 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn two_ranks_of_16_give_the_loss_sequence_and_parameters_of_one_rank_of_32() {
    let s = setup(512);
    let (a, b) = two_of_16_follow_one_of_32(&s, Via::Mpirun, "2 ranks (OpenMPI mpirun)");
    let (ma, mb) = (metrics(&a), metrics(&b));
    assert_eq!(ma.len(), 50);
    assert!(ma.last().unwrap().loss < ma[0].loss, "the loss falls");
    // the global throughput and the communication share are logged
    assert!(mb
        .iter()
        .all(|m| m.samples_per_s > 0.0 && m.comm_fraction > 0.0));
    assert!(ma.iter().all(|m| m.comm_fraction == 0.0));
    // the parameters at the end (each rank's equal rank 0's: checked inside at every
    // checkpoint) equal the one-rank run's within floating-point reduction: AdamW normalises
    // each update to about lr (peak 1.5e-3 x 32 / 256 = 1.9e-4), so a gradient summed in
    // another order moves a parameter whose gradient is rounding noise (the attention's key
    // bias: softmax ignores it) by a step's size in a random direction; allowed: two steps of
    // the 50 (the loss sequence above is the tight check)
    let (wa, wb) = (weights(&a), weights(&b));
    assert_eq!(wa.len(), wb.len());
    for ((na, xa), (nb, xb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        let d = xa
            .iter()
            .zip(xb)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(d < 2.0 * 1.875e-4, "{na}: max difference {d}");
    }
}

#[test]
#[ignore = "needs a Slurm cluster: scripts/slurm-local.sh starts one on this machine (CI does)"]
fn srun_two_tasks_of_16_give_the_loss_sequence_of_one_rank_of_32_and_plain_srun_is_refused() {
    let s = setup(512);
    let (plugin, says) = srun_mpi();
    // rank, world size and local rank come from Slurm's PMI and MPI, with no extra flags
    two_of_16_follow_one_of_32(&s, Via::Srun(plugin), says);

    // srun with no MPI plugin would start two independent runs writing one directory: refused
    let d = s.root.join("plain");
    let o = train_via(Via::Srun("none"), &s, 2, &d, 16, false)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "plain srun -n 2 trained: {err}");
    assert!(err.contains("without an MPI plugin"), "{err}");
    assert!(metrics(&d).is_empty(), "no step ran");
}

#[test]
#[ignore = "needs an MPICH build: LMD_TEST_MPI=mpich, built with MPICC=mpicc.mpich (CI does)"]
fn mpich_mpiexec_two_ranks_of_16_give_the_loss_sequence_of_one_rank_of_32() {
    require_mpich();
    two_of_16_follow_one_of_32(&setup(512), Via::Hydra, "2 ranks (a PMI launcher");
}

/// 2 ranks x 16 under `via` (whose rank detection lmd reports as `says`) follow 1 rank x 32,
/// and the run's config.json records the world size, the global batch and the rank's batch.
/// Returns the two runs' directories (1 rank, 2 ranks).
fn two_of_16_follow_one_of_32(s: &Setup, via: Via, says: &str) -> (PathBuf, PathBuf) {
    let (a, b) = (s.root.join("one"), s.root.join("two"));
    ok(train(s, 0, &a, 32, false).output().unwrap(), "1 x 32");
    let o = train_via(via, s, 2, &b, 16, false).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    ok(o, &format!("{via:?} 2 x 16"));
    assert!(err.contains(says), "{err}");
    assert_same_losses(&metrics(&a), &metrics(&b), 1e-5);
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (c["world_size"].as_u64(), c["global_batch"].as_u64()),
        (Some(2), Some(32))
    );
    assert_eq!(c["batch_size"].as_u64(), Some(16));
    (a, b)
}

#[test]
fn a_rank_sigkilled_ends_the_job_within_60_s_naming_the_lost_rank() {
    rank_1_sigkilled_ends_the_job_within_60_s(Via::Mpirun);
}

#[test]
#[ignore = "needs an MPICH build: LMD_TEST_MPI=mpich, built with MPICC=mpicc.mpich (CI does)"]
fn mpich_mpiexec_a_rank_sigkilled_ends_the_job_within_60_s_naming_the_lost_rank() {
    require_mpich();
    rank_1_sigkilled_ends_the_job_within_60_s(Via::Hydra);
}

#[test]
#[ignore = "needs a Slurm cluster: scripts/slurm-local.sh starts one on this machine (CI does)"]
fn srun_a_task_sigkilled_ends_the_step_within_60_s_naming_the_lost_rank() {
    // Slurm's PMI plugin cancels the step; the other task goes after Slurm's KillWait (30 s)
    rank_1_sigkilled_ends_the_job_within_60_s(Via::Srun(srun_mpi().0));
}

/// 2 ranks under `via`, rank 1 SIGKILLed after 3 steps: the job ends within 60 s, the
/// launcher names the lost rank, and no process of the job is left.
fn rank_1_sigkilled_ends_the_job_within_60_s(via: Via) {
    let s = setup(512);
    let out = s.root.join("run");
    let mut cmd = train_via(via, &s, 2, &out, 16, false);
    cmd.args(["--steps", "100000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    wait_for_steps(&mut child, &out, 3);
    let rank1 = match via {
        Via::Mpirun => rank_pid(child.id(), "OMPI_COMM_WORLD_RANK", 1),
        Via::Hydra => rank_pid(child.id(), "PMI_RANK", 1),
        // the tasks are slurmstepd's children, not srun's: found by their run directory
        Via::Srun(_) => task_pid(&out, "SLURM_PROCID=1"),
    }
    .expect("rank 1's process");
    unsafe_kill(rank1, 9);
    let t1 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t1.elapsed() > Duration::from_secs(60) {
            kill_group(&mut child);
            if let Via::Srun(_) = via {
                let _ = Command::new("scancel").arg("--user=root").status();
            }
            panic!("the job still runs 60 s after rank 1 was killed ({via:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let o = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!(
        "{via:?}: ended {:.1} s after rank 1 was killed",
        t1.elapsed().as_secs_f64()
    );
    // OpenMPI says "rank 1", srun "task 1: Killed" (stderr), Hydra "BAD TERMINATION ... PID n"
    // (stdout)
    let names = match via {
        Via::Mpirun => "rank 1".to_string(),
        Via::Hydra => format!("PID {rank1} "),
        Via::Srun(_) => "task 1".to_string(),
    };
    assert!(said.contains(&names), "{said}");
    // nothing is left running
    std::thread::sleep(Duration::from_millis(500));
    let left = Command::new("pgrep")
        .args(["-f", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

#[test]
fn sigusr1_to_mpirun_checkpoints_every_rank_at_one_step_and_the_rerun_continues_exactly() {
    sigusr1_checkpoints_every_rank_at_one_step_and_the_rerun_continues(Via::Mpirun);
}

#[test]
#[ignore = "needs an MPICH build: LMD_TEST_MPI=mpich, built with MPICC=mpicc.mpich (CI does)"]
fn mpich_sigusr1_to_mpiexec_checkpoints_every_rank_at_one_step_and_the_rerun_continues_exactly() {
    require_mpich();
    sigusr1_checkpoints_every_rank_at_one_step_and_the_rerun_continues(Via::Hydra);
}

#[test]
#[ignore = "needs a Slurm cluster: scripts/slurm-local.sh starts one on this machine (CI does)"]
fn scancel_signal_usr1_checkpoints_both_tasks_at_one_step_and_the_rerun_continues_exactly() {
    // what `#SBATCH --signal=USR1@120` does before a preemption or the time limit
    sigusr1_checkpoints_every_rank_at_one_step_and_the_rerun_continues(Via::Srun(srun_mpi().0));
}

/// SIGUSR1 after 13 steps (to the launcher, which forwards it; under Slurm `scancel
/// --signal=USR1` to the job's tasks): every rank checkpoints at one step and the job exits 75;
/// the rerun at 2 ranks continues to 1 rank's loss sequence.
fn sigusr1_checkpoints_every_rank_at_one_step_and_the_rerun_continues(via: Via) {
    let s = setup(512);
    let reference = s.root.join("ref");
    ok(
        train(&s, 0, &reference, 32, false).output().unwrap(),
        "reference",
    );
    let out = s.root.join("run");
    let name = format!("lmd-usr1-{}", std::process::id());
    let mut child = train_via(via, &s, 2, &out, 16, false)
        .env("SLURM_JOB_NAME", &name) // srun's --job-name (scancel finds the job by it)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&mut child, &out, 13);
    match via {
        Via::Srun(_) => {
            let st = Command::new("scancel")
                .args(["--signal=USR1", &format!("--name={name}")])
                .status()
                .unwrap();
            assert!(st.success(), "scancel");
        }
        _ => unsafe_kill(child.id() as i32, 10),
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    match via {
        // Hydra forwards SIGUSR1 and the ranks exit 75, but mpiexec itself then mostly exits 0
        // (7 of 10 runs here, MPICH 4.0.2): only the ranks' words say the run stopped early
        Via::Hydra => assert!(matches!(o.status.code(), Some(0 | 75)), "{err}"),
        _ => assert_eq!(o.status.code(), Some(75), "{err}"),
    }
    assert!(
        err.contains("SIGUSR1 received: stopped after step"),
        "{err}"
    );
    let stopped = metrics(&out).last().unwrap().step;
    assert!(stopped < 50, "stopped at {stopped}");
    let latest = std::fs::read_to_string(out.join("checkpoints/latest")).unwrap();
    assert_eq!(
        latest.trim(),
        format!("step-{stopped:08}"),
        "a checkpoint at the stop"
    );
    ok(
        train_via(via, &s, 2, &out, 16, true).output().unwrap(),
        "rerun",
    );
    assert_same_losses(&metrics(&reference), &metrics(&out), 1e-5);
}

#[test]
fn a_launcher_mpi_cannot_reach_is_refused_rather_than_each_rank_training_alone() {
    // what `srun --mpi=pmi2` gives an MPI without a PMI-2 client, or an MPICH launcher an
    // OpenMPI build: the launcher's variables say rank 0 of 2, MPI comes up as a singleton
    let s = setup(64);
    let out = s.root.join("run");
    let o = train(&s, 0, &out, 16, false)
        .env("PMI_RANK", "0")
        .env("PMI_SIZE", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "trained alone: {err}");
    assert!(
        err.contains("rank 0 of 2, but MPI came up as world size 1"),
        "{err}"
    );
    assert!(metrics(&out).is_empty(), "no step ran");
}

#[test]
fn a_run_killed_at_two_ranks_resumes_at_one_and_one_at_one_resumes_at_two() {
    let s = setup(512);
    let reference = s.root.join("ref");
    ok(
        train(&s, 0, &reference, 32, false).output().unwrap(),
        "reference",
    );
    let want = metrics(&reference);

    // 2 x 16, killed after the step-20 checkpoint, resumed at 1 rank with the same command:
    // the global batch 32 comes from the checkpoint
    let b = s.root.join("two-then-one");
    let mut child = train(&s, 2, &b, 16, false).spawn().unwrap();
    kill_after_checkpoint(&mut child, &b, 20);
    let o = train(&s, 0, &b, 16, true).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    ok(o, "resume at 1 rank");
    assert!(
        err.contains("32 of") || err.contains("32 per rank"),
        "{err}"
    );
    assert_same_losses(&want, &metrics(&b), 1e-5);

    // 1 x 32, killed, resumed at 2 ranks (16 each)
    let c = s.root.join("one-then-two");
    let mut child = train(&s, 0, &c, 32, false).spawn().unwrap();
    kill_after_checkpoint(&mut child, &c, 20);
    ok(
        train(&s, 2, &c, 32, true).output().unwrap(),
        "resume at 2 ranks",
    );
    assert_same_losses(&want, &metrics(&c), 1e-5);

    // a batch that contradicts the checkpoint's global batch is refused naming both
    let o = train(&s, 2, &c, 10, true).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("global batch is 32") && err.contains("20"),
        "{err}"
    );
}

/// The pid of the process whose command line names `out` and whose environment has `var`.
fn task_pid(out: &Path, var: &str) -> Option<i32> {
    let o = Command::new("pgrep")
        .args(["-f", out.to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
            env.split(|&b| b == 0).any(|v| v == var.as_bytes())
        })
}

/// The pid of the rank `rank` among the descendants of `parent`, by the launcher's rank
/// variable in its environment (`OMPI_COMM_WORLD_RANK`, or `PMI_RANK` under Hydra).
fn rank_pid(parent: u32, rank_var: &str, rank: usize) -> Option<i32> {
    let mut stack = vec![parent as i32];
    while let Some(p) = stack.pop() {
        let kids = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).ok()?;
        for k in kids
            .split_whitespace()
            .filter_map(|k| k.parse::<i32>().ok())
        {
            let env = std::fs::read(format!("/proc/{k}/environ")).unwrap_or_default();
            let want = format!("{rank_var}={rank}");
            if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                return Some(k);
            }
            stack.push(k);
        }
    }
    None
}

const FT_SETTINGS: &str = r#"
epochs = 3
blr = 2e-3
warmup_epochs = 0.5
drop_path = 0.1
log_every = 4
window = 128
eval_batch_size = 64
"#;

/// Fine-tuning's settings with the pretraining config's `[model]` table.
fn ft_config() -> String {
    common::with_tiny_mae(FT_SETTINGS)
}

#[test]
fn finetuning_at_two_ranks_reaches_the_top1_of_one_rank_with_the_same_global_batch() {
    let s = setup(384);
    let val = s.root.join("val");
    write_dataset(
        &val,
        &SyntheticSpec {
            records: 128,
            first_index: 100_000,
            ..Default::default()
        },
    )
    .unwrap();
    let cfg = s.root.join("ft.toml");
    std::fs::write(&cfg, ft_config()).unwrap();
    let ft = |np: usize, out: &Path, batch: &str| {
        let args: Vec<&std::ffi::OsStr> = vec![
            "--config".as_ref(),
            cfg.as_os_str(),
            "--data".as_ref(),
            s.data.as_os_str(),
            "--val-data".as_ref(),
            val.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--batch-size".as_ref(),
            batch.as_ref(),
            "--no-progress".as_ref(),
        ];
        launch(np, env!("CARGO_BIN_EXE_lmd-finetune"), &args)
            .output()
            .unwrap()
    };
    let (a, b) = (s.root.join("ft1"), s.root.join("ft2"));
    ok(ft(0, &a, "32"), "1 x 32");
    ok(ft(2, &b, "16"), "2 x 16");
    let evals = |d: &Path| -> Vec<f64> {
        std::fs::read_to_string(d.join("eval.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["top1"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (ea, eb) = (evals(&a), evals(&b));
    assert_eq!(ea.len(), 3);
    assert!(ea[2] > 0.3, "it learns: {ea:?}");
    for (x, y) in ea.iter().zip(&eb) {
        assert!((x - y).abs() <= 2.0 / 128.0, "top-1 {ea:?} vs {eb:?}");
    }
}
