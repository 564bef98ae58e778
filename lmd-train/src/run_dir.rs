//! The run directory of `lmd-train` and `lmd-finetune`: one layout, one set of rules.
//!
//! ```text
//! OUT/config.json            the settings of the latest start (atomic)
//! OUT/metrics.jsonl          one line per logged step; eval.jsonl for fine-tuning
//! OUT/checkpoints/NAME/      model.safetensors, optimizer.safetensors, state.json, SHA256SUMS
//! OUT/checkpoints/latest     the name of the newest checkpoint (pretraining)
//! ```
//!
//! Rules:
//! - Every file is written atomically (temporary, fsync, rename, directory fsync:
//!   [`lmd_data::shard::writer::write_atomic`]); a checkpoint directory is filled under a
//!   temporary name and renamed when complete, its `SHA256SUMS` written last.
//! - Temporaries a killed run left behind (`*.tmp-*`) are removed when the run directory opens.
//! - A checkpoint is verified against its `SHA256SUMS` before it is loaded. Resume takes the
//!   newest checkpoint that verifies and says which ones it skipped; it never loads a damaged
//!   one.
//! - A resume with other settings is refused, naming each setting that differs (settings that do
//!   not change the numbers, such as the output or logging, may change).
//! - JSONL logs are cut back to the resume step when a run resumes, so no line is duplicated.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use lmd_data::shard::writer::write_atomic;
use serde::Serialize;

use crate::{Error, Result};

/// The checksum file of a checkpoint directory (`sha256sum -c` reads it).
pub const CHECKSUMS: &str = "SHA256SUMS";

/// The weights file of a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";

/// The optimiser's state in a checkpoint directory (AdamW's moments and step).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The weights file `path` names, for `--pretrained`, `--init`, `lmd-eval` and `lmd-export`:
/// - a file (or a URL) is itself;
/// - a checkpoint directory (`checkpoints/step-N/`, `best/`) gives its [`MODEL_FILE`];
/// - a pretraining run directory gives the checkpoint `checkpoints/latest` names, and a
///   fine-tuning run directory its `best/`.
///
/// A checkpoint directory with a [`CHECKSUMS`] file is verified first, so a damaged or
/// half-copied checkpoint is refused by name rather than loaded.
pub fn weights_file(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join("checkpoints").join("latest");
    let dir = if path.join(MODEL_FILE).is_file() {
        path.to_path_buf()
    } else if let Ok(name) = std::fs::read_to_string(&latest) {
        path.join("checkpoints").join(name.trim())
    } else {
        path.join("best")
    };
    let file = dir.join(MODEL_FILE);
    if !file.is_file() {
        return Err(Error::Invalid(format!(
            "{}: a directory with no {MODEL_FILE} (nor checkpoints/latest or best/ naming one): \
             give a checkpoint file, a checkpoint directory or a run directory",
            path.display()
        )));
    }
    if dir.join(CHECKSUMS).is_file() {
        verify_dir(&dir)?;
    }
    Ok(file)
}

/// A run's output directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Create (or reopen) `root` and its `checkpoints/`, removing stale temporaries.
    pub fn open(root: &Path) -> Result<Self> {
        let dir = RunDir {
            root: root.to_path_buf(),
        };
        std::fs::create_dir_all(dir.checkpoints())
            .map_err(|e| Error::io(dir.checkpoints(), "create", e))?;
        remove_stale_temporaries(&dir.checkpoints());
        remove_stale_temporaries(root);
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// `config.json`: the settings of this start, with the job's world size and global batch
    /// (`world_size`, `global_batch`; [`read_config`] leaves them out again).
    pub fn write_config<T: Serialize>(&self, cfg: &T, world: WorldRecord) -> Result<()> {
        let mut v =
            serde_json::to_value(cfg).map_err(|e| Error::Invalid(format!("config.json: {e}")))?;
        if let Some(o) = v.as_object_mut() {
            o.insert("world_size".into(), world.world_size.into());
            o.insert("global_batch".into(), world.global_batch.into());
        }
        write_json(&self.path("config.json"), &v)
    }

    /// The JSONL log `name`, cut back to the lines with `step <= upto`, open for appending.
    pub fn log(&self, name: &str, upto: u64) -> Result<JsonlLog> {
        let path = self.path(name);
        let kept: String = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= upto)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, "open", e))?;
        Ok(JsonlLog { path, file })
    }

    /// Refuse a fresh start (no `--resume`) into a run directory that already holds a
    /// checkpoint (`checkpoints/*/`, or fine-tuning's `best/`): the new run would overwrite
    /// that run's checkpoints, prune the older ones and cut its logs. (Temporaries of a killed
    /// run were removed by [`RunDir::open`], so they do not count.)
    pub fn check_fresh(&self) -> Result<()> {
        let mut held: Vec<String> = std::fs::read_dir(self.checkpoints())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| format!("checkpoints/{}", e.file_name().to_string_lossy()))
            .collect();
        if self.path("best").is_dir() {
            held.push("best".into());
        }
        if held.is_empty() {
            return Ok(());
        }
        held.sort();
        Err(Error::Invalid(format!(
            "{} already holds a run ({}): pass --resume to continue it, or give another --out \
             (or remove this directory) to start afresh",
            self.root.display(),
            held.join(", ")
        )))
    }

    /// Write the checkpoint directory `dir` (e.g. `checkpoints/step-00000100`, or `best`)
    /// completely or not at all: `fill` writes the files into a temporary directory, then
    /// their checksums are written and the directory is renamed over `dir`.
    pub fn save_dir(&self, dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.with_file_name(format!("{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        fill(&tmp)?;
        write_checksums(&tmp)?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, "rename", e))?;
        if let Some(parent) = dir.parent() {
            if let Ok(f) = File::open(parent) {
                let _ = f.sync_all();
            }
        }
        Ok(())
    }

    /// A numbered pretraining checkpoint `checkpoints/step-NNNNNNNN`, then `latest` names it,
    /// then all but the newest `keep` numbered checkpoints are removed (`keep == 0`: all kept).
    pub fn save_step(
        &self,
        step: u64,
        keep: usize,
        fill: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let name = step_name(step);
        let fin = self.checkpoints().join(&name);
        self.save_dir(&fin, fill)?;
        write_atomic(&self.checkpoints().join("latest"), name.as_bytes())?;
        if keep > 0 {
            let old = self.step_checkpoints()?;
            let n = old.len().saturating_sub(keep);
            for p in &old[..n] {
                std::fs::remove_dir_all(p).map_err(|e| Error::io(p, "remove old checkpoint", e))?;
            }
        }
        Ok(fin)
    }

    /// The numbered checkpoint directories, oldest first.
    fn step_checkpoints(&self) -> Result<Vec<PathBuf>> {
        let dir = self.checkpoints();
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, "read directory", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_dir()
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-") && !n.contains(".tmp"))
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// The newest numbered checkpoint that verifies, trying the one `latest` names first.
    /// Each one skipped is reported through `warn` with the reason.
    pub fn resume_point(&self, warn: &mut dyn FnMut(&str)) -> Result<Option<PathBuf>> {
        let mut candidates = self.step_checkpoints()?;
        candidates.reverse();
        if let Ok(name) = std::fs::read_to_string(self.checkpoints().join("latest")) {
            let p = self.checkpoints().join(name.trim());
            candidates.retain(|c| c != &p);
            candidates.insert(0, p);
        }
        for (i, c) in candidates.iter().enumerate() {
            if !c.is_dir() {
                continue;
            }
            match verify_dir(c) {
                Ok(()) => return Ok(Some(c.clone())),
                Err(e) => warn(&format!(
                    "{} does not verify ({e}); {}",
                    c.display(),
                    if i + 1 < candidates.len() {
                        "trying an older checkpoint"
                    } else {
                        "no older checkpoint"
                    }
                )),
            }
        }
        Ok(None)
    }
}

/// What `config.json` records of the job besides the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct WorldRecord {
    pub world_size: usize,
    /// Per-rank batch x world size.
    pub global_batch: usize,
}

/// A run's `config.json` as its settings type (the job record left out).
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read", e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    if let Some(o) = v.as_object_mut() {
        o.remove("world_size");
        o.remove("global_batch");
    }
    serde_json::from_value(v).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

/// The per-rank batch of a resumed run at `world` ranks, from the checkpoint's global batch
/// (`saved_batch` per rank x `saved_world`) and the batch asked for now: the global batch never
/// changes on resume. `asked` is accepted when it gives that global batch, or when it is the
/// checkpoint's own per-rank batch (the same command rerun at another world size: each rank
/// then takes global / world). Anything else, or a global batch `world` does not divide, is
/// refused naming both numbers.
pub fn resume_batch(
    saved_batch: usize,
    saved_world: usize,
    asked: usize,
    world: usize,
) -> Result<usize> {
    let global = saved_batch * saved_world;
    if asked * world == global {
        return Ok(asked);
    }
    if asked != saved_batch {
        return Err(Error::Invalid(format!(
            "the checkpoint's global batch is {global} ({saved_batch} per rank x {saved_world}); \
             batch_size {asked} x {world} ranks gives {}: resume with batch_size {}{}",
            asked * world,
            global / world.max(1),
            if !global.is_multiple_of(world) {
                " (not a whole number: use a world size that divides it)"
            } else {
                ""
            }
        )));
    }
    if !global.is_multiple_of(world) {
        return Err(Error::Invalid(format!(
            "the checkpoint's global batch {global} ({saved_batch} per rank x {saved_world}) \
             cannot be split over {world} ranks: resume at a world size that divides {global}"
        )));
    }
    Ok(global / world)
}

/// `step-NNNNNNNN`.
pub fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// An append-only JSONL log.
pub struct JsonlLog {
    path: PathBuf,
    file: File,
}

impl JsonlLog {
    pub fn append<T: Serialize>(&mut self, line: &T) -> Result<()> {
        writeln!(
            self.file,
            "{}",
            serde_json::to_string(line).expect("serializes")
        )
        .map_err(|e| Error::io(&self.path, "write", e))
    }
}

/// `v` as pretty JSON at `path`, atomically.
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(v).expect("serializes"))?;
    Ok(())
}

/// Read a JSON file, naming it in errors.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, "read", e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

/// The settings of `saved` and `now` (as JSON objects) that differ, except `run_only` ones:
/// `name: saved -> now`, sorted. Empty when the two runs compute the same numbers.
pub fn config_differences<T: Serialize>(saved: &T, now: &T, run_only: &[&str]) -> Vec<String> {
    let obj = |v: &T| match serde_json::to_value(v).expect("serializes") {
        serde_json::Value::Object(o) => o,
        other => std::iter::once(("value".to_string(), other)).collect(),
    };
    let (a, b) = (obj(saved), obj(now));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !run_only.contains(&k.as_str()))
        .filter_map(|k| {
            let (x, y) = (a.get(k), b.get(k));
            (x != y).then(|| {
                let show = |v: Option<&serde_json::Value>| {
                    v.map_or("(unset)".to_string(), |v| v.to_string())
                };
                format!("{k}: {} -> {}", show(x), show(y))
            })
        })
        .collect()
}

/// Refuse a resume whose settings differ from the checkpoint's, naming each setting.
pub fn check_resume_config<T: Serialize>(
    checkpoint: &Path,
    saved: &T,
    now: &T,
    run_only: &[&str],
) -> Result<()> {
    let diff = config_differences(saved, now, run_only);
    if diff.is_empty() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{}: the checkpoint was made with another configuration; resume with the same one, or \
         start a new run in another --out. Differences (checkpoint -> now): {}",
        checkpoint.display(),
        diff.join("; ")
    )))
}

fn sha256_of(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, "read", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// `SHA256SUMS` over the files of `dir` (in `sha256sum`'s format), written last.
fn write_checksums(dir: &Path) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, "read directory", e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != CHECKSUMS)
        .collect();
    names.sort();
    let mut text = String::new();
    for n in names {
        text.push_str(&format!("{}  {n}\n", sha256_of(&dir.join(&n))?));
    }
    write_atomic(&dir.join(CHECKSUMS), text.as_bytes())?;
    Ok(())
}

/// Check every file `SHA256SUMS` lists (the error names the first that is missing or differs).
pub fn verify_dir(dir: &Path) -> Result<()> {
    let sums = dir.join(CHECKSUMS);
    let text = std::fs::read_to_string(&sums)
        .map_err(|e| Error::io(&sums, "read (an incomplete checkpoint)", e))?;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Some((want, name)) = line.split_once("  ") else {
            return Err(Error::Invalid(format!(
                "{}: malformed line {line:?}",
                sums.display()
            )));
        };
        let got = sha256_of(&dir.join(name))?;
        if got != want {
            return Err(Error::Invalid(format!(
                "{}: checksum {got} differs from {want} in {CHECKSUMS}",
                dir.join(name).display()
            )));
        }
    }
    Ok(())
}

/// Remove directories and files a killed run left half-written (`*.tmp-PID`).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(".tmp-"))
        {
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_keeps_the_global_batch_across_world_sizes() {
        // 2 x 16 resumed at 1 rank: the same command (16) or the consistent 32
        assert_eq!(resume_batch(16, 2, 16, 1).unwrap(), 32);
        assert_eq!(resume_batch(16, 2, 32, 1).unwrap(), 32);
        // 1 x 32 at 2 ranks; 4 x 8 at 4 ranks: unchanged
        assert_eq!(resume_batch(32, 1, 32, 2).unwrap(), 16);
        assert_eq!(resume_batch(8, 4, 8, 4).unwrap(), 8);
        // a batch that contradicts, named with both numbers
        let e = resume_batch(16, 2, 20, 1).unwrap_err().to_string();
        assert!(e.contains("32") && e.contains("20"), "{e}");
        // a world size that does not divide the global batch
        let e = resume_batch(16, 2, 16, 3).unwrap_err().to_string();
        assert!(e.contains("32") && e.contains("3 ranks"), "{e}");
    }

    fn fill(text: &'static str) -> impl FnOnce(&Path) -> Result<()> {
        move |d: &Path| {
            std::fs::write(d.join("model.safetensors"), text).unwrap();
            write_json(&d.join("state.json"), &serde_json::json!({"step": 1}))
        }
    }

    #[test]
    fn a_fresh_start_into_a_run_directory_with_checkpoints_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let run = RunDir::open(t.path()).unwrap();
        // empty, or only logs and config: a fresh start is fine
        run.check_fresh().unwrap();
        write_json(&run.path("config.json"), &serde_json::json!({})).unwrap();
        run.check_fresh().unwrap();
        run.save_step(10, 0, fill("ten")).unwrap();
        let e = run.check_fresh().unwrap_err().to_string();
        assert!(
            e.contains("checkpoints/step-00000010") && e.contains("--resume"),
            "{e}"
        );
        // fine-tuning's best/ alone counts too
        let t = tempfile::tempdir().unwrap();
        let run = RunDir::open(t.path()).unwrap();
        run.save_dir(&run.path("best"), fill("b")).unwrap();
        let e = run.check_fresh().unwrap_err().to_string();
        assert!(e.contains("(best)"), "{e}");
    }

    #[test]
    fn weights_file_takes_a_file_a_checkpoint_dir_or_a_run_dir_and_refuses_a_damaged_one() {
        let t = tempfile::tempdir().unwrap();
        let run = RunDir::open(t.path()).unwrap();
        run.save_step(10, 0, fill("ten")).unwrap();
        run.save_step(20, 0, fill("twenty")).unwrap();
        let step20 = run.checkpoints().join("step-00000020");
        let file = step20.join(MODEL_FILE);
        // a file is itself (even a missing one: its reader names it), a URL too
        assert_eq!(weights_file(&file).unwrap(), file);
        let gone = t.path().join("gone.safetensors");
        assert_eq!(weights_file(&gone).unwrap(), gone);
        let url = Path::new("s3://bucket/run/model.safetensors");
        assert_eq!(weights_file(url).unwrap(), url);
        // a checkpoint directory, and the run directory through checkpoints/latest
        assert_eq!(weights_file(&step20).unwrap(), file);
        assert_eq!(weights_file(t.path()).unwrap(), file);
        // a fine-tuning run directory: its best/
        let ft = t.path().join("ft");
        std::fs::create_dir_all(ft.join("best")).unwrap();
        std::fs::write(ft.join("best").join(MODEL_FILE), "w").unwrap();
        assert_eq!(weights_file(&ft).unwrap(), ft.join("best").join(MODEL_FILE));
        // a directory holding none is refused by name
        let empty = t.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let e = weights_file(&empty).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains(MODEL_FILE), "{e}");
        // damaged weights in a checksummed checkpoint: refused, naming the file, not loaded
        std::fs::write(&file, "tw3nty").unwrap();
        for p in [&step20, &t.path().to_path_buf()] {
            let e = weights_file(p).unwrap_err().to_string();
            assert!(e.contains("checksum") && e.contains("step-00000020"), "{e}");
        }
    }

    #[test]
    fn a_damaged_latest_checkpoint_is_never_loaded_resume_falls_back_and_says_so() {
        let t = tempfile::tempdir().unwrap();
        let run = RunDir::open(t.path()).unwrap();
        run.save_step(10, 0, fill("ten")).unwrap();
        run.save_step(20, 0, fill("twenty")).unwrap();
        let mut warnings = Vec::new();
        let got = run
            .resume_point(&mut |w| warnings.push(w.to_string()))
            .unwrap();
        assert_eq!(got.unwrap().file_name().unwrap(), "step-00000020");
        assert!(warnings.is_empty(), "{warnings:?}");
        // flip the newest checkpoint's weights: step 10 is taken, and the warning names 20
        std::fs::write(
            run.checkpoints().join("step-00000020/model.safetensors"),
            "tw3nty",
        )
        .unwrap();
        let got = run
            .resume_point(&mut |w| warnings.push(w.to_string()))
            .unwrap();
        assert_eq!(got.unwrap().file_name().unwrap(), "step-00000010");
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("step-00000020") && warnings[0].contains("model.safetensors"),
            "{warnings:?}"
        );
        // a checkpoint without its checksums (cut before SHA256SUMS) does not verify either
        std::fs::remove_file(run.checkpoints().join("step-00000010").join(CHECKSUMS)).unwrap();
        warnings.clear();
        assert!(run
            .resume_point(&mut |w| warnings.push(w.to_string()))
            .unwrap()
            .is_none());
        assert_eq!(warnings.len(), 2, "{warnings:?}");
    }

    #[test]
    fn pruning_keeps_the_newest_and_stale_temporaries_are_removed_on_open() {
        let t = tempfile::tempdir().unwrap();
        let run = RunDir::open(t.path()).unwrap();
        for s in [1, 2, 3, 4] {
            run.save_step(s, 2, fill("x")).unwrap();
        }
        let names: Vec<String> = run
            .step_checkpoints()
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["step-00000003", "step-00000004"]);
        let stale = run.checkpoints().join("step-00000005.tmp-999");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(t.path().join("metrics.jsonl.tmp-999-0"), "x").unwrap();
        RunDir::open(t.path()).unwrap();
        assert!(!stale.exists());
        assert!(!t.path().join("metrics.jsonl.tmp-999-0").exists());
    }

    #[test]
    fn logs_are_cut_back_to_the_resume_step() {
        let t = tempfile::tempdir().unwrap();
        let run = RunDir::open(t.path()).unwrap();
        let mut log = run.log("metrics.jsonl", 0).unwrap();
        for s in 1..=5u64 {
            log.append(&serde_json::json!({"step": s})).unwrap();
        }
        drop(log);
        let mut log = run.log("metrics.jsonl", 3).unwrap();
        log.append(&serde_json::json!({"step": 4, "again": true}))
            .unwrap();
        let text = std::fs::read_to_string(run.path("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
    }

    #[test]
    fn a_resume_with_other_settings_names_each_one() {
        let a = serde_json::json!({"lr": 1.0, "steps": 10, "out": "a", "seed": 1});
        let b = serde_json::json!({"lr": 2.0, "steps": 10, "out": "b", "seed": 3});
        let e = check_resume_config(Path::new("ck"), &a, &b, &["out"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lr: 1.0 -> 2.0") && e.contains("seed: 1 -> 3"),
            "{e}"
        );
        assert!(!e.contains("out:") && !e.contains("steps:"), "{e}");
        assert!(check_resume_config(Path::new("ck"), &a, &a, &[]).is_ok());
    }
}
