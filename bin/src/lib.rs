//! Process setup shared by the lmd programs (the programs themselves live in `src/bin/`).

// Tensor programs allocate and free large buffers at a high rate: mimalloc (told by
// `init_allocator` to keep freed memory) reuses them instead of returning them to the OS and
// faulting fresh zeroed pages in on every op. Every lmd program links this crate.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod flags;
pub mod settings;

/// mimalloc's `mi_option_purge_delay` (position in `mi_option_e`, mimalloc v3 `mimalloc.h`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory in the process: tensor programs free and reallocate the same large
/// buffers every step, and returning them to the OS costs a zero-filled page fault per 4 KiB
/// on the next use (a third of a CPU training step before this). Call first thing in `main`.
pub fn init_allocator() {
    // SAFETY: sets a global mimalloc option; thread-safe and valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// `e` and its causes on one line, each said once. lmd's errors put their source in their own
/// message (`path: op: source`) and also return it from `source()`, so `{:#}` and `{:?}` would
/// print it twice (`x.tar: open: No such file ... : No such file ...`): a cause whose text the
/// line already holds is left out.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// The `main` of a program that is not a job (every one but `lmd-train` and `lmd-finetune`):
/// the allocator set up, then `body`; a failure is printed as `program: error: ...` (see
/// [`error_line`]) and exits with status 1.
pub fn program_main(
    program: &str,
    body: impl FnOnce() -> anyhow::Result<()>,
) -> std::process::ExitCode {
    init_allocator();
    match body() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: error: {}", error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// How a job's `main` ended.
pub enum Ended {
    /// Done.
    Finished,
    /// Stopped by a signal after writing a checkpoint: exit with
    /// [`lmd_train::dist::EXIT_STOPPED`] so a requeue or a rerun resumes.
    Stopped,
}

/// The `main` of a program that may run as one rank of many (`lmd-train`, `lmd-finetune`):
/// the job from the environment ([`lmd_train::dist::Job::from_env`]), then `body`. A failure
/// is printed (prefixed with the rank under several) and ends every rank, so no peer waits
/// forever in a collective; a stop by signal exits with `EXIT_STOPPED`.
pub fn job_main(
    program: &str,
    body: impl FnOnce(&lmd_train::dist::Job) -> anyhow::Result<Ended>,
) -> ! {
    init_allocator();
    let job = match lmd_train::dist::Job::from_env() {
        Ok(j) => j,
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::exit(2);
        }
    };
    let code = match body(&job) {
        Ok(Ended::Finished) => 0,
        Ok(Ended::Stopped) => lmd_train::dist::EXIT_STOPPED,
        Err(e) => {
            let who = match job.dist.world_size() {
                1 => String::new(),
                n => format!(" (rank {} of {n})", job.dist.rank()),
            };
            eprintln!("{program}{who}: error: {}", error_line(&e));
            if job.dist.world_size() > 1 {
                job.fail(1);
            }
            1
        }
    };
    // MPI is finalised when the job drops, before the exit
    drop(job);
    std::process::exit(code)
}

/// A progress bar over `len` `unit`s (`step`, `epoch`, ...) with elapsed time, ETA and a
/// message; hidden when `hidden` (`--no-progress`).
pub fn progress_bar(len: u64, unit: &str, hidden: bool) -> indicatif::ProgressBar {
    let bar = if hidden {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(len)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} [{{bar:30}}] {unit} {{pos}}/{{len}} ETA {{eta}} {{msg}}"
        ))
        .expect("template"),
    );
    bar
}

/// The data, model size and budgets that `lmd-quickstart` and `lmd-experiment` share.
#[derive(clap::Args, Debug)]
pub struct PipelineArgs {
    /// Labelled training inputs (WebDataset shard patterns, ILSVRC tars, ImageFolder dirs).
    /// Default: $LMD_SHARED/data/imagenette.
    #[arg(long, num_args = 1..)]
    pub train: Vec<String>,
    /// Labelled validation inputs.
    #[arg(long, num_args = 1..)]
    pub val: Vec<String>,
    /// Already precomputed training latents (skip the precompute stage).
    #[arg(long)]
    pub train_latents: Option<std::path::PathBuf>,
    /// Already precomputed validation latents.
    #[arg(long)]
    pub val_latents: Option<std::path::PathBuf>,
    /// TAESD weights: a directory or hf:OWNER/REPO (default: $LMD_SHARED/weights/taesd, else
    /// hf:madebyollin/taesd).
    #[arg(long)]
    pub vae_weights: Option<String>,
    /// Image size (latents are size/8 square; the model follows).
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Use at most this many training images (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit_train: u64,
    /// Use at most this many validation images (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit_val: u64,
    /// Pretraining steps (batch 64; not used by `lmd-experiment claim`, which gives each arm
    /// a wall-clock budget).
    #[arg(long, default_value_t = 600)]
    pub pretrain_steps: u64,
    /// Fine-tuning epochs.
    #[arg(long, default_value_t = 15)]
    pub finetune_epochs: u64,
    /// Linear-probing epochs.
    #[arg(long, default_value_t = 15)]
    pub linprobe_epochs: u64,
}

impl PipelineArgs {
    /// The quickstart configuration these arguments describe, writing into `out`.
    pub fn config(self, out: std::path::PathBuf) -> lmd_train::quickstart::QuickstartConfig {
        use lmd_train::quickstart::QuickstartConfig;
        QuickstartConfig {
            out,
            train: self.train,
            val: self.val,
            train_latents: self.train_latents,
            val_latents: self.val_latents,
            vae_weights: self.vae_weights,
            size: self.size,
            limit_train: self.limit_train,
            limit_val: self.limit_val,
            model: QuickstartConfig::model_for(self.size),
            pretrain_steps: self.pretrain_steps,
            finetune_epochs: self.finetune_epochs,
            linprobe_epochs: self.linprobe_epochs,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn purge_delay_option_is_the_one_we_set() {
        super::init_allocator();
        // SAFETY: reads a global option.
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(v, -1);
    }
}
