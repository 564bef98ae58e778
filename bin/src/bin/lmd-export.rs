//! lmd-export: checkpoints out to PyTorch (timm's VisionTransformer, MAE's models_vit/models_mae).

use clap::{Parser, ValueEnum};
use lmd_train::export::{ExportOptions, ExportTarget, GlobalPool};
use lmd_train::model::{CheckpointFormat, MaeConfig};
use std::path::PathBuf;

/// Write a checkpoint that PyTorch loads with strict=True: an encoder for timm's
/// VisionTransformer and MAE's models_vit (--to timm), or the whole MAE for models_mae
/// (--to mae, from a pretrain checkpoint).
///
/// The input is an lmd-train or lmd-finetune safetensors, or an official MAE/LMD .pth.
/// Beside OUT it writes OUT.json (the constructor arguments for the PyTorch model) and, with
/// --reference, OUT.reference.safetensors (a seeded input and lmd's outputs for it), which
/// `python3 tools/check_export.py OUT` compares with PyTorch's.
#[derive(Parser, Debug)]
#[command(name = "lmd-export", version)]
struct Args {
    /// The checkpoint to export (safetensors or .pth; a checkpoint directory or a run directory
    /// names its model.safetensors: the latest pretrain checkpoint, or fine-tuning's best/).
    checkpoint: PathBuf,
    /// What loads the result: timm (an encoder, also MAE's models_vit) or mae (the whole MAE
    /// for models_mae when the input has its decoder; else as timm).
    #[arg(long, value_enum)]
    to: Target,
    /// The file to write.
    #[arg(long)]
    out: PathBuf,
    /// File format (default: .pth/.pt names give a torch file, others safetensors).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Model preset (tiny, small, base, large, base_patch4) when no config is beside the
    /// checkpoint.
    #[arg(long)]
    preset: Option<lmd_train::model::Preset>,
    /// Model config file: TOML as configs/mae-*.toml, or JSON (MaeConfig's fields or MAE's
    /// constructor arguments).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Attention heads, when the architecture is read from the weights.
    #[arg(long)]
    num_heads: Option<usize>,
    /// Decoder attention heads, when the architecture is read from the weights.
    #[arg(long)]
    decoder_num_heads: Option<usize>,
    /// Pooling of an encoder exported from a pretrain checkpoint (a classifier keeps its own).
    #[arg(long, value_enum)]
    global_pool: Option<Pool>,
    /// Also write OUT.reference.safetensors: a seeded input and lmd's outputs for it.
    #[arg(long)]
    reference: bool,
    /// Print the summary as one JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Target {
    Timm,
    Mae,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Safetensors,
    Pth,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Pool {
    Token,
    Avg,
}

pub fn main() -> std::process::ExitCode {
    lmd_bin::program_main("lmd-export", run)
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    let model = match (&a.model, &a.preset) {
        (Some(p), _) => {
            let s =
                std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            // TOML (configs/mae-*.toml, a [model] table) or JSON (MaeConfig's fields, or MAE's
            // constructor arguments as in the test vectors' metadata)
            let v: serde_json::Value = if p.extension().is_some_and(|e| e == "json") {
                serde_json::from_str(&s)?
            } else {
                serde_json::to_value(toml::from_str::<toml::Value>(&s)?)?
            };
            let v = v.get("model").cloned().unwrap_or(v);
            let cfg: MaeConfig = match serde_json::from_value(v.clone()) {
                Ok(c) => c,
                Err(_) => MaeConfig::from_mae_json(&v)
                    .map_err(|e| anyhow::anyhow!("{}: not a model config: {e}", p.display()))?,
            };
            Some(cfg)
        }
        (None, Some(preset)) => Some(preset.config()),
        (None, None) => None,
    };
    let o = ExportOptions {
        checkpoint: a.checkpoint,
        to: match a.to {
            Target::Timm => ExportTarget::Timm,
            Target::Mae => ExportTarget::Mae,
        },
        out: a.out,
        format: a.format.map(|f| match f {
            Format::Safetensors => CheckpointFormat::Safetensors,
            Format::Pth => CheckpointFormat::Pth,
        }),
        model,
        num_heads: a.num_heads,
        decoder_num_heads: a.decoder_num_heads,
        global_pool: a.global_pool.map(|p| match p {
            Pool::Token => GlobalPool::Token,
            Pool::Avg => GlobalPool::Avg,
        }),
        reference: a.reference,
    };
    let s = lmd_train::export::run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        eprintln!(
            "lmd-export: {} ({:?}) -> {} ({:?}, {} tensors, model args in {})",
            s.source.display(),
            s.source_kind,
            s.out.display(),
            s.format,
            s.tensors,
            lmd_train::export::sidecar(&s.out, "json").display()
        );
    }
    Ok(())
}
