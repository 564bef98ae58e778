//! lmd-train: masked latent pretraining over latent shards.

use clap::Parser;
use lmd_bin::flags::train::{config, Args};

fn main() -> anyhow::Result<()> {
    lmd_bin::init_allocator();
    let a = Args::parse();
    let cfg = config(&a)?;
    let bar = lmd_bin::progress_bar(cfg.steps, "step", a.no_progress);
    let mut on_log = |m: &lmd_train::train::Metrics| {
        bar.set_position(m.step);
        bar.set_message(format!(
            "loss {:.4} mask {:.3} lr {:.2e} {:.1} samples/s",
            m.loss, m.mask_ratio, m.lr, m.samples_per_s
        ));
    };
    let s = lmd_train::train::run(&cfg, a.resume, &mut on_log)?;
    bar.finish_and_clear();
    eprintln!(
        "lmd-train: steps {}..{} in {:.1} s, final loss {:.4}; run directory {}",
        s.first_step,
        s.last_step,
        s.wall_s,
        s.final_loss,
        s.out.display()
    );
    Ok(())
}
