//! How a pretraining or fine-tuning job starts in its run directory, the same on every rank and
//! for both programs ([`start`]).
//!
//! Rules:
//! - Rank 0 alone opens the run directory and writes it; the other ranks read only the
//!   checkpoint it picked (so the directory must be on a filesystem every rank sees).
//! - With `--resume`, rank 0 picks the checkpoint (the program says how: pretraining takes the
//!   newest step checkpoint that verifies, fine-tuning `checkpoints/last`) and broadcasts its
//!   path, so every rank reads the same state. The start then runs with the settings given now,
//!   with the per-rank batch that keeps the checkpoint's global batch
//!   ([`resumed_settings`]: any other difference that changes the numbers is
//!   refused). No checkpoint to resume: a fresh start.
//! - Without `--resume`, a directory that holds a run is refused (rank 0 decides).
//! - The loader, opened and checked with the settings asked for before any of this, takes the
//!   settings the start runs with (a resume at another world size has another per-rank batch).
//! - Rank 0 writes `config.json`: those settings, the world size and the global batch.

use std::path::{Path, PathBuf};

use lmd_data::loader::LoaderConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::dist::Job;
use crate::run_dir::{check_resume_config, read_json, resume_batch, RunDir, WorldRecord};
use crate::train_data::TrainData;
use crate::Result;

/// The settings of a program that trains in a run directory.
pub trait JobSettings: Clone + Serialize {
    /// The program that says what happens (`lmd-train`).
    const PROGRAM: &'static str;
    /// The settings a resume may change: they do not change the numbers
    /// ([`crate::run_dir::config_differences`]).
    const RUN_ONLY_KEYS: &'static [&'static str];
    /// The run directory.
    fn out(&self) -> &Path;
    /// The batch of one rank.
    fn batch_size(&mut self) -> &mut usize;
    /// The loader settings of rank `rank_world.0` of `rank_world.1`.
    fn loader_config(&self, rank_world: (usize, usize)) -> LoaderConfig;
}

/// A checkpoint's `state.json`: it holds the settings of the run that wrote it.
pub trait CheckpointState<C>: DeserializeOwned {
    /// Those settings, and the world size that wrote it (their global batch is the per-rank
    /// batch times it).
    fn settings(&self) -> (&C, usize);
}

/// What a start found and decided.
pub struct Start<S, C> {
    /// The run directory, on rank 0 (`None` on the others).
    pub run: Option<RunDir>,
    /// The checkpoint this start resumes from and its state.
    pub resumed: Option<(PathBuf, S)>,
    /// The settings this start runs with.
    pub cfg: C,
    /// The loader, with those settings.
    pub loader: TrainData,
    /// The per-rank batch times the world size.
    pub global_batch: usize,
}

/// Start `job` with the settings `cfg` (see the module's rules); `loader` was opened with
/// them, and `pick` chooses the checkpoint to resume in rank 0's run directory.
pub fn start<C: JobSettings, S: CheckpointState<C>>(
    job: &Job,
    cfg: &C,
    resume: bool,
    loader: TrainData,
    pick: impl FnOnce(&RunDir) -> Result<Option<PathBuf>>,
) -> Result<Start<S, C>> {
    let (rank, world) = (job.dist.rank(), job.dist.world_size());
    let run = match job.dist.is_root() {
        true => Some(RunDir::open(cfg.out())?),
        false => None,
    };
    let picked = match (&run, resume) {
        (Some(run), true) => pick(run)?,
        (Some(run), false) => {
            run.check_fresh()?;
            None
        }
        (None, _) => None,
    };
    // only a resume waits for rank 0's choice (a fresh start's is None on every rank)
    let picked = match resume {
        true => job.dist.broadcast_json(&picked)?,
        false => None,
    };
    let (resumed, cfg) = match picked {
        Some(ck) => {
            let st: S = read_json(&ck.join("state.json"))?;
            let (saved, saved_world) = st.settings();
            let now = resumed_settings(job, &ck, saved, saved_world, cfg)?;
            (Some((ck, st)), now)
        }
        None => (None, cfg.clone()),
    };
    let lcfg = cfg.loader_config((rank, world));
    let global_batch = lcfg.batch_size * world;
    let loader = loader.with_config(lcfg)?;
    if let Some(run) = &run {
        let world = WorldRecord {
            world_size: world,
            global_batch,
        };
        run.write_config(&cfg, world)?;
    }
    Ok(Start {
        run,
        resumed,
        cfg,
        loader,
        global_batch,
    })
}

/// The settings a resume at `job`'s world size runs with: `now` with the per-rank batch that
/// keeps the checkpoint's global batch ([`resume_batch`], printed by rank 0 when it changes),
/// after refusing any other difference from the checkpoint's settings `saved` (written at
/// `saved_world` ranks; compared with the global batch in place of the per-rank one).
fn resumed_settings<C: JobSettings>(
    job: &Job,
    checkpoint: &Path,
    saved: &C,
    saved_world: usize,
    now: &C,
) -> Result<C> {
    let world = job.dist.world_size();
    let (mut saved, mut asked) = (saved.clone(), now.clone());
    let saved_batch = *saved.batch_size();
    let mut resumed = now.clone();
    *resumed.batch_size() = resume_batch(saved_batch, saved_world, *asked.batch_size(), world)?;
    if *resumed.batch_size() != *asked.batch_size() && job.dist.is_root() {
        eprintln!(
            "{}: resuming the global batch {} of {} at {world} ranks: {} per rank",
            C::PROGRAM,
            saved_batch * saved_world,
            checkpoint.display(),
            *resumed.batch_size()
        );
    }
    *saved.batch_size() *= saved_world;
    asked = resumed.clone();
    *asked.batch_size() *= world;
    check_resume_config(checkpoint, &saved, &asked, C::RUN_ONLY_KEYS)?;
    Ok(resumed)
}

/// The world size of a checkpoint that does not record one (written before data parallelism).
pub(crate) fn one_rank() -> usize {
    1
}
