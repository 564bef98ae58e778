//! `lmd-experiment`: the mask-schedule comparison. The same latents, model, pretraining budget
//! and fine-tuning recipe for each schedule (constant 0.75 = MAE, LMD's linear, piecewise and
//! cosine), plus fine-tuning from scratch as the no-pretraining reference; one markdown table.
//!
//! The table goes to `OUT/EXPERIMENTS.md` and, with `doc`, replaces the block between
//! `<!-- lmd-experiment:begin -->` and `<!-- lmd-experiment:end -->` in that file (the rest of
//! the file, e.g. a discussion, is kept). Every run is resumable, so a killed experiment
//! continues where it stopped.

use crate::finetune::EvalResult;
use crate::quickstart::{prepare_latents, pretrain_and_evaluate, QuickstartConfig};
use crate::{Error, Result};
use lmd_model::MaskSchedule;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

const BEGIN: &str = "<!-- lmd-experiment:begin -->";
const END: &str = "<!-- lmd-experiment:end -->";

/// The experiment's settings.
#[derive(Debug, Clone)]
pub struct ExperimentConfig {
    /// Data, model and budgets (the quickstart's defaults unless changed).
    pub base: QuickstartConfig,
    /// Schedules by name (constant, linear, piecewise, cosine).
    pub schedules: Vec<String>,
    /// Also fine-tune from scratch (no pretraining).
    pub from_scratch: bool,
    /// A markdown file whose marked block receives the table.
    pub doc: Option<PathBuf>,
    /// The command line that reproduces the run (written under the table).
    pub command: String,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub schedule: String,
    pub pretrain_s: Option<f64>,
    /// Mean loss over the last 5 logged pretraining steps (all schedules end at ratio 0.75).
    pub final_loss: Option<f64>,
    pub finetune: Option<EvalResult>,
    pub linprobe: Option<EvalResult>,
}

fn pct(e: &Option<EvalResult>) -> String {
    e.as_ref()
        .map(|e| format!("{:.1}", 100.0 * e.top1))
        .unwrap_or_else(|| "-".into())
}

/// The markdown block (between the markers).
pub fn table(cfg: &ExperimentConfig, rows: &[Row], train: usize, val: usize) -> String {
    let b = &cfg.base;
    let m = &b.model;
    let mut s = format!(
        "{BEGIN}\n\
         Data: {train} training / {val} validation images, {} px -> TAESD latents {}x{}x{}. \
         Model: ViT {} wide, depth {}, {} heads, patch {} ({} tokens), decoder {} x {}; \
         pretraining {} steps of batch 64; fine-tuning {} epochs, linear probe {} epochs. \
         Threads: {}.\n\n\
         | mask schedule | pretrain wall (s) | final pretrain loss | fine-tune top-1 (%) | linear-probe top-1 (%) |\n\
         |---|---:|---:|---:|---:|\n",
        b.size,
        m.in_chans,
        m.img_size[0],
        m.img_size[1],
        m.embed_dim,
        m.depth,
        m.num_heads,
        m.patch_size,
        m.num_patches(),
        m.decoder_embed_dim,
        m.decoder_depth,
        b.pretrain_steps,
        b.finetune_epochs,
        b.linprobe_epochs,
        lmd_model::candle::utils::get_num_threads(),
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.schedule,
            r.pretrain_s.map_or("-".into(), |v| format!("{v:.0}")),
            r.final_loss.map_or("-".into(), |v| format!("{v:.4}")),
            pct(&r.finetune),
            pct(&r.linprobe),
        ));
    }
    s.push_str(&format!("\nReproduce: `{}`\n{END}\n", cfg.command));
    s
}

/// Put `block` between the markers of `text` (appending it when there are none).
pub fn splice(text: &str, block: &str) -> String {
    splice_between(text, block, BEGIN, END)
}

/// Put `block` (which carries the markers) in place of `text`'s block from `begin` to `end`,
/// or append it when `text` has none.
pub fn splice_between(text: &str, block: &str, begin: &str, end: &str) -> String {
    match (text.find(begin), text.find(end)) {
        (Some(a), Some(b)) if b > a => {
            let tail = &text[b + end.len()..];
            format!(
                "{}{}{}",
                &text[..a],
                block,
                tail.strip_prefix('\n').unwrap_or(tail)
            )
        }
        _ => format!("{text}{}{block}", if text.is_empty() { "" } else { "\n" }),
    }
}

/// Run the experiment; returns the rows in schedule order (then from-scratch).
pub fn run(cfg: &ExperimentConfig, log: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    let t0 = Instant::now();
    let out = cfg.base.out.clone();
    // Every name resolved before any work.
    let schedules = cfg
        .schedules
        .iter()
        .map(|n| n.parse::<MaskSchedule>())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, "create", e))?;
    let lat = prepare_latents(&cfg.base, log)?;
    let mut rows = Vec::new();
    for (name, schedule) in cfg.schedules.iter().zip(schedules) {
        log(&format!("== schedule {name} =="));
        let q = QuickstartConfig {
            schedule,
            ..cfg.base.clone()
        };
        let dir = out.join(format!("schedule-{name}"));
        let r = pretrain_and_evaluate(&q, &lat, &dir, log)?;
        let lines = crate::report::read_metrics(&dir.join("pretrain/metrics.jsonl"))?;
        let tail = &lines[lines.len().saturating_sub(5)..];
        rows.push(Row {
            schedule: name.clone(),
            pretrain_s: Some(r.pretrain_s),
            final_loss: (!tail.is_empty())
                .then(|| tail.iter().map(|l| l.loss).sum::<f64>() / tail.len() as f64),
            finetune: r.finetune,
            linprobe: r.linprobe,
        });
    }
    if cfg.from_scratch {
        log("== no pretraining: fine-tune from scratch ==");
        let fc = cfg.base.finetune_config(
            lat.train.clone(),
            lat.val.clone(),
            None,
            out.join("from-scratch"),
            false,
        );
        let s = crate::finetune::run(&fc, true, &mut |_| {}, &mut |e| {
            log(&format!(
                "      epoch {} val top-1 {:.1}%",
                e.epoch,
                100.0 * e.top1
            ))
        })?;
        rows.push(Row {
            schedule: "none (from scratch)".into(),
            pretrain_s: None,
            final_loss: None,
            finetune: s.best,
            linprobe: None,
        });
    }
    let block = table(cfg, &rows, lat.train_records, lat.val_records);
    let w = |p: &std::path::Path, text: &str| -> Result<()> {
        lmd_data::shard::writer::write_atomic(p, text.as_bytes())?;
        Ok(())
    };
    w(&out.join("EXPERIMENTS.md"), &block)?;
    w(
        &out.join("experiment.json"),
        &serde_json::to_string_pretty(&rows).expect("serializes"),
    )?;
    if let Some(doc) = &cfg.doc {
        let text = std::fs::read_to_string(doc).unwrap_or_default();
        w(doc, &splice(&text, &block))?;
    }
    log(&format!(
        "experiment done in {:.0} s",
        t0.elapsed().as_secs_f64()
    ));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_the_marked_block() {
        let doc = format!("# Title\n\nintro\n\n{BEGIN}\nold\n{END}\n\n## Discussion\nkept\n");
        let new = format!("{BEGIN}\nnew\n{END}\n");
        let out = splice(&doc, &new);
        assert_eq!(
            out,
            format!("# Title\n\nintro\n\n{BEGIN}\nnew\n{END}\n\n## Discussion\nkept\n")
        );
        assert_eq!(splice("", &new), new);
        assert_eq!(splice("# T\n", &new), format!("# T\n\n{new}"));
    }
}
