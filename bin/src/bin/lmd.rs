//! lmd: every lmd program in one binary, for machines a build is carried to (one CUDA build
//! instead of nine: the device check's machine takes 64 MiB of carried files).
//!
//! `lmd PROGRAM [ARGS...]` runs that program (`lmd train --help`, `lmd lmd-train --help`), and
//! so does a link named after it (`ln -s lmd lmd-train`). The first form re-executes this binary
//! with the program's name as `argv[0]`, so every program sees the same arguments and name it
//! would as its own binary.

#[path = "lmd-bench.rs"]
mod bench;
#[path = "lmd-eval.rs"]
mod eval;
#[path = "lmd-experiment.rs"]
mod experiment;
#[path = "lmd-export.rs"]
mod export;
#[path = "lmd-finetune.rs"]
mod finetune;
#[path = "lmd-inspect.rs"]
mod inspect;
#[path = "lmd-precompute.rs"]
mod precompute;
#[path = "lmd-quickstart.rs"]
mod quickstart;
#[path = "lmd-train.rs"]
mod train;

use std::process::{ExitCode, Termination};

/// The programs, by their binaries' names.
const PROGRAMS: [&str; 9] = [
    "lmd-bench",
    "lmd-eval",
    "lmd-experiment",
    "lmd-export",
    "lmd-finetune",
    "lmd-inspect",
    "lmd-precompute",
    "lmd-quickstart",
    "lmd-train",
];

/// Run program `name` (one of [`PROGRAMS`]) in this process.
fn run(name: &str) -> ExitCode {
    match name {
        "lmd-bench" => bench::main().report(),
        "lmd-eval" => eval::main().report(),
        "lmd-experiment" => experiment::main().report(),
        "lmd-export" => export::main().report(),
        "lmd-finetune" => {
            // (these two end the process with the job's own status)
            finetune::main();
            ExitCode::SUCCESS
        }
        "lmd-inspect" => inspect::main().report(),
        "lmd-precompute" => precompute::main().report(),
        "lmd-quickstart" => quickstart::main().report(),
        "lmd-train" => {
            train::main();
            ExitCode::SUCCESS
        }
        _ => unreachable!("{name} is not in PROGRAMS"),
    }
}

/// `name` as a program's binary name (`train` and `lmd-train` alike), if it is one.
fn program(name: &str) -> Option<&'static str> {
    let name = name.strip_prefix("lmd-").unwrap_or(name);
    PROGRAMS.iter().copied().find(|p| p[4..] == *name)
}

fn usage() -> String {
    let names: Vec<&str> = PROGRAMS.iter().map(|p| &p[4..]).collect();
    format!(
        "usage: lmd PROGRAM [ARGS...]   (or a link named lmd-PROGRAM)\nprograms: {}\n\
         `lmd PROGRAM --help` describes each.",
        names.join(", ")
    )
}

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let base = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(p) = PROGRAMS.iter().find(|p| **p == base) {
        return run(p);
    }
    let Some(first) = args.next() else {
        eprintln!("{}", usage());
        return ExitCode::from(2);
    };
    let first = first.to_string_lossy();
    if matches!(first.as_ref(), "-h" | "--help" | "help") {
        println!("{}", usage());
        return ExitCode::SUCCESS;
    }
    let Some(p) = program(&first) else {
        eprintln!("lmd: no program {first:?}\n{}", usage());
        return ExitCode::from(2);
    };
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("lmd: cannot find this binary to run {p}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // exec only returns on failure
    let e = std::process::Command::new(&exe).arg0(p).args(args).exec();
    eprintln!("lmd: run {} as {p}: {e}", exe.display());
    ExitCode::FAILURE
}
