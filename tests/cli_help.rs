//! Every flag of every program has a help line: `-h` (the one-line form of `--help`) of each program (and of each
//! `lmd-bench` subcommand) lists no option without a description.

use std::process::Command;

const PROGRAMS: [(&str, &str); 9] = [
    ("lmd-precompute", env!("CARGO_BIN_EXE_lmd-precompute")),
    ("lmd-train", env!("CARGO_BIN_EXE_lmd-train")),
    ("lmd-finetune", env!("CARGO_BIN_EXE_lmd-finetune")),
    ("lmd-eval", env!("CARGO_BIN_EXE_lmd-eval")),
    ("lmd-inspect", env!("CARGO_BIN_EXE_lmd-inspect")),
    ("lmd-quickstart", env!("CARGO_BIN_EXE_lmd-quickstart")),
    ("lmd-experiment", env!("CARGO_BIN_EXE_lmd-experiment")),
    ("lmd-export", env!("CARGO_BIN_EXE_lmd-export")),
    ("lmd-bench", env!("CARGO_BIN_EXE_lmd-bench")),
];

fn help(exe: &str, args: &[&str]) -> String {
    let out = Command::new(exe).args(args).arg("-h").output().unwrap();
    assert!(out.status.success(), "{exe} {args:?} -h failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Options in the `Options:` section of a clap help text that have no description: neither
/// on the option's line (after two spaces) nor on the next line, indented deeper (clap's layout
/// when a description is too long for one line).
fn undocumented(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut in_options = false;
    let mut bad = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.ends_with(':') && !line.starts_with(' ') {
            in_options = line.ends_with("Options:");
            continue;
        }
        let t = line.trim_start();
        if !in_options || !t.starts_with('-') {
            continue;
        }
        // a default or the list of values is not a description
        let t = t.split(" [default: ").next().unwrap_or(t);
        let t = t.split(" [possible values: ").next().unwrap_or(t);
        let same_line = t.split("  ").skip(1).any(|p| !p.trim().is_empty());
        let next_line = lines.get(i + 1).is_some_and(|n| {
            let nt = n.trim_start();
            !nt.is_empty() && !nt.starts_with('-') && indent(n) > indent(line)
        });
        if !same_line && !next_line {
            bad.push(t.trim_end().to_string());
        }
    }
    bad
}

/// The subcommands a clap help text lists under `Commands:` (without `help`).
fn subcommands(text: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut on = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            on = line == "Commands:";
            continue;
        }
        if let Some(name) = line.split_whitespace().next().filter(|_| on) {
            if name != "help" {
                v.push(name.to_string());
            }
        }
    }
    v
}

#[test]
fn the_check_finds_an_undocumented_flag() {
    let text = "Usage: x\n\nOptions:\n      --good <G>  Does things\n      --bad <B>\n  -h, --help  Print help\n";
    assert_eq!(undocumented(text), ["--bad <B>"]);
    let dflt = "Options:\n      --n <N>  [default: 3]\n";
    assert_eq!(undocumented(dflt), ["--n <N>"]);
    let long = "Options:\n      --good <G>\n          Does things\n      --bad\n      --last\n";
    assert_eq!(undocumented(long), ["--bad", "--last"]);
}

#[test]
fn every_flag_of_every_program_has_a_help_line() {
    let mut bad = Vec::new();
    for (name, exe) in PROGRAMS {
        let top = help(exe, &[]);
        for o in undocumented(&top) {
            bad.push(format!("{name}: {o}"));
        }
        for sub in subcommands(&top) {
            for o in undocumented(&help(exe, &[&sub])) {
                bad.push(format!("{name} {sub}: {o}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "flags without a help line:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_lmd_binary_runs_every_program_by_word_or_by_link() {
    let lmd = env!("CARGO_BIN_EXE_lmd");
    let t = tempfile::tempdir().unwrap();
    for (name, exe) in PROGRAMS {
        let own = help(exe, &[]);
        // `lmd train -h` and `lmd lmd-train -h`: the program's own help, under its own name
        assert_eq!(help(lmd, &[&name[4..]]), own, "lmd {}", &name[4..]);
        assert_eq!(help(lmd, &[name]), own, "lmd {name}");
        // a link named after the program
        let link = t.path().join(name);
        std::os::unix::fs::symlink(lmd, &link).unwrap();
        assert_eq!(help(link.to_str().unwrap(), &[]), own, "link {name}");
    }
    // an exit status passes through: lmd-inspect of a missing file
    let st = Command::new(lmd)
        .args(["inspect", "/nonexistent.lmds"])
        .status()
        .unwrap();
    let own = Command::new(PROGRAMS[4].1)
        .arg("/nonexistent.lmds")
        .status()
        .unwrap();
    assert_eq!(st.code(), own.code());
    assert_ne!(st.code(), Some(0));
    // no program: usage, naming the programs, status 2
    let out = Command::new(lmd).arg("nope").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("\"nope\"") && err.contains("precompute"),
        "{err}"
    );
}

/// A missing input is one line on stderr, `PROGRAM: error: PATH: op: the OS's words`, with the
/// OS's message once: before, anyhow's `Caused by:` repeated the source our message already
/// held, and the existence check said "entity not found".
#[test]
fn a_missing_path_is_one_error_line_naming_it_with_the_cause_once() {
    let dir = std::env::temp_dir().join(format!("lmd-cli-missing-{}", std::process::id()));
    let missing = dir.join("no-such.tar");
    let m = missing.to_str().unwrap();
    let out_dir = dir.join("out");
    let o = out_dir.to_str().unwrap();
    let cases: [(&str, Vec<&str>, &str); 5] = [
        (
            "lmd-precompute",
            vec!["--input", m, "--output", o, "--no-progress"],
            "open",
        ),
        (
            "lmd-train",
            vec!["--data", m, "--out", o, "--steps", "2"],
            "read directory",
        ),
        (
            "lmd-eval",
            vec!["--checkpoint", m, "--data", o],
            "open checkpoint",
        ),
        ("lmd-inspect", vec![m], "open"),
        ("lmd-export", vec![m, "--to", "timm", "--out", o], ""),
    ];
    for (name, args, op) in cases {
        let exe = PROGRAMS.iter().find(|p| p.0 == name).unwrap().1;
        let out = Command::new(exe)
            .args(&args)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name} {args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{name}: one line, got:\n{err}");
        let line = lines[0];
        assert!(line.starts_with(&format!("{name}: ")), "{name}: {line}");
        assert!(line.contains(m), "{name} names the path: {line}");
        if !op.is_empty() {
            assert!(line.contains(&format!("{m}: {op}: ")), "{name}: {line}");
        }
        let os = "No such file or directory";
        assert_eq!(
            line.matches(os).count(),
            1,
            "{name}: the cause once: {line}"
        );
        assert!(!line.contains("entity not found"), "{name}: {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
