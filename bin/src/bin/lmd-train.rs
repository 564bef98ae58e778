//! lmd-train: masked latent pretraining over latent shards (one process, or one rank of
//! `mpirun`/`srun`).

use clap::Parser;
use lmd_bin::flags::train::{config, Args};
use lmd_bin::Ended;

pub fn main() {
    let a = Args::parse();
    lmd_bin::job_main("lmd-train", |job| {
        let cfg = config(&a, job.dist.world_size())?;
        let root = job.dist.is_root();
        let bar = lmd_bin::progress_bar(cfg.steps, "step", a.no_progress || !root);
        let mut on_log = |m: &lmd_train::train::Metrics| {
            bar.set_position(m.step);
            bar.set_message(format!(
                "loss {:.4} mask {:.3} lr {:.2e} {:.1} samples/s",
                m.loss, m.mask_ratio, m.lr, m.samples_per_s
            ));
        };
        let s = lmd_train::train::run_job(job, &cfg, a.resume, &mut on_log)?;
        bar.finish_and_clear();
        if root {
            eprintln!(
                "lmd-train: steps {}..{} in {:.1} s, final loss {:.4}; run directory {}",
                s.first_step,
                s.last_step,
                s.wall_s,
                s.final_loss,
                s.out.display()
            );
        }
        Ok(match s.stopped_by {
            Some(_) => Ended::Stopped,
            None => Ended::Finished,
        })
    })
}
