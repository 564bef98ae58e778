//! lmd-finetune: classification fine-tuning or linear probing on labelled latent shards.

use clap::Parser;
use lmd_bin::flags::finetune::{config, Args};
use lmd_bin::Ended;

pub fn main() {
    let a = Args::parse();
    lmd_bin::job_main("lmd-finetune", |job| body(&a, job))
}

fn body(a: &Args, job: &lmd_train::dist::Job) -> anyhow::Result<Ended> {
    let cfg = config(a)?;
    let root = job.dist.is_root();
    let bar = lmd_bin::progress_bar(cfg.epochs, "epoch", a.no_progress || !root);
    let mut on_log = |s: &lmd_train::finetune::StepMetrics| {
        bar.set_message(format!(
            "step {} loss {:.4} lr {:.2e} {:.1} samples/s",
            s.step, s.loss, s.lr, s.samples_per_s
        ));
    };
    let mut on_eval = |e: &lmd_train::finetune::EvalResult| {
        bar.set_position(e.epoch);
        let line = format!(
            "epoch {}: val top-1 {:.2}% top-5 {:.2}% loss {:.4} ({} records)",
            e.epoch,
            100.0 * e.top1,
            100.0 * e.top5,
            e.loss,
            e.records
        );
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let s = lmd_train::finetune::run_job(job, &cfg, a.resume, &mut on_log, &mut on_eval)?;
    bar.finish_and_clear();
    if let Some(b) = &s.best {
        eprintln!(
            "lmd-finetune: best val top-1 {:.2}% (epoch {}) in {:.1} s; weights in {}",
            100.0 * b.top1,
            b.epoch,
            s.wall_s,
            s.out.join("best").display()
        );
    }
    Ok(match s.stopped_by {
        Some(_) => Ended::Stopped,
        None => Ended::Finished,
    })
}
