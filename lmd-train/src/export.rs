//! `lmd-export`: our checkpoints (or official `.pth` ones) out to the PyTorch world.
//!
//! Input: any checkpoint [`lmd_model::read_tensors`] reads (an `lmd-train` or `lmd-finetune`
//! safetensors, an official MAE/LMD `.pth`). Its kind is read from the names: a full MAE
//! (`decoder_*` present), an MAE encoder (MAE's released `mae_pretrain_vit_*.pth`), or a
//! classifier (`head.*`). Targets:
//! - [`ExportTarget::Timm`]: an encoder state dict that timm's `VisionTransformer(img_size,
//!   patch_size, in_chans, embed_dim, depth, num_heads, global_pool, num_classes)` loads with
//!   `strict=True` (and so MAE's `models_vit`, which has the same names): `cls_token`,
//!   `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`, then `norm.*` (token pooling) or
//!   `fc_norm.*` (average pooling; from a pretrain checkpoint, its final `norm` becomes
//!   `fc_norm`), and `head.*` when the input is a classifier (`num_classes` 0 otherwise). A
//!   linear-probe head (BatchNorm1d without affine + Linear) is folded into one exact Linear.
//! - [`ExportTarget::Mae`]: a full MAE input is written whole (`models_mae` loads it strictly);
//!   an encoder or classifier as for timm (MAE's `models_vit` names).
//!
//! Beside `OUT` go `OUT.json` (the model arguments to build the PyTorch model with) and, with
//! `reference`, `OUT.reference.safetensors`: a seeded input and lmd's own forward outputs for it,
//! which `tools/check_export.py` compares with PyTorch's.
//!
//! The architecture comes from, in order: an explicit [`MaeConfig`], what the checkpoint
//! records ([`crate::recorded`]: `classifier.json` beside it, its run's `config.json`), else
//! the tensors' shapes plus `num_heads` (and `decoder_num_heads`) given.

use crate::run_dir::write_json;
use crate::{Error, Result};
use lmd_model::candle::{DType, Device, IndexOp, Tensor};
use lmd_model::candle_nn::VarBuilder;
use lmd_model::{CheckpointFormat, ClassifierConfig, LatentMae, MaeConfig, VitClassifier};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportTarget {
    Timm,
    Mae,
}

impl std::str::FromStr for ExportTarget {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "timm" => Ok(ExportTarget::Timm),
            "mae" => Ok(ExportTarget::Mae),
            o => Err(format!("unknown export target {o:?} (timm, mae)")),
        }
    }
}

/// Pooling of an exported encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GlobalPool {
    /// The normalised cls token (timm `global_pool='token'`, MAE `global_pool=False`).
    Token,
    /// The mean of the patch tokens, then `fc_norm` (timm `'avg'`, MAE `global_pool=True`).
    Avg,
}

impl std::str::FromStr for GlobalPool {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "token" => Ok(GlobalPool::Token),
            "avg" => Ok(GlobalPool::Avg),
            o => Err(format!("unknown pooling {o:?} (token, avg)")),
        }
    }
}

/// What the input checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    FullMae,
    Encoder,
    Classifier,
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub checkpoint: PathBuf,
    pub to: ExportTarget,
    pub out: PathBuf,
    /// Default: `.pth`/`.pt` names give torch files, anything else safetensors.
    pub format: Option<CheckpointFormat>,
    /// The architecture, when it is not beside the checkpoint.
    pub model: Option<MaeConfig>,
    /// When the architecture is read from the tensors: the encoder's (and decoder's) heads.
    pub num_heads: Option<usize>,
    pub decoder_num_heads: Option<usize>,
    /// Pooling of an encoder exported from a pretrain checkpoint (default token); a
    /// classifier keeps its own.
    pub global_pool: Option<GlobalPool>,
    /// Also write `OUT.reference.safetensors` (seeded input + lmd's outputs).
    pub reference: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportSummary {
    pub source: PathBuf,
    pub source_kind: SourceKind,
    pub target: ExportTarget,
    pub out: PathBuf,
    pub format: CheckpointFormat,
    pub tensors: usize,
    /// The PyTorch constructor arguments (also in `OUT.json`).
    pub model_args: serde_json::Value,
    pub reference: Option<PathBuf>,
}

/// Export a checkpoint (see the module doc).
pub fn run(o: &ExportOptions) -> Result<ExportSummary> {
    let o = &ExportOptions {
        checkpoint: crate::run_dir::weights_file(&o.checkpoint)?,
        ..o.clone()
    };
    let dev = Device::Cpu;
    let src = lmd_model::read_tensors(&o.checkpoint, &dev)?;
    let kind = source_kind(&src);
    let cfg = architecture(o, &src, kind)?;
    let (tensors, pool, num_classes) = map_names(o, &src, kind, &cfg)?;
    let format = o
        .format
        .unwrap_or_else(|| CheckpointFormat::from_extension(&o.out));
    let named: Vec<(String, Tensor)> = {
        let mut v: Vec<_> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    lmd_model::write_tensors(&named, &o.out, format)?;
    let full = kind == SourceKind::FullMae && o.to == ExportTarget::Mae;
    let model_args = model_args(&cfg, full, pool, num_classes);
    let side = serde_json::json!({
        "format": "lmd-export",
        "target": o.to,
        "source": o.checkpoint,
        "source_kind": kind,
        "module": if full { "models_mae.MaskedAutoencoderViT" } else { "timm.models.vision_transformer.VisionTransformer" },
        "model_args": model_args,
        "tensors": named.len(),
    });
    write_json(&sidecar(&o.out, "json"), &side)?;
    let reference = if o.reference {
        let p = sidecar(&o.out, "reference.safetensors");
        write_reference(&p, &tensors, &cfg, full, pool, num_classes, &dev)?;
        Some(p)
    } else {
        None
    };
    Ok(ExportSummary {
        source: o.checkpoint.clone(),
        source_kind: kind,
        target: o.to,
        out: o.out.clone(),
        format,
        tensors: named.len(),
        model_args,
        reference,
    })
}

/// `OUT` with its extension replaced by `ext` (`model.pth` -> `model.json`).
pub fn sidecar(out: &Path, ext: &str) -> PathBuf {
    out.with_extension(ext)
}

fn source_kind(t: &HashMap<String, Tensor>) -> SourceKind {
    if t.contains_key("decoder_embed.weight") {
        SourceKind::FullMae
    } else if t.contains_key("head.weight") || t.contains_key("head.1.weight") {
        SourceKind::Classifier
    } else {
        SourceKind::Encoder
    }
}

fn invalid(o: &ExportOptions, detail: String) -> Error {
    Error::Tensors {
        path: o.checkpoint.clone(),
        detail,
    }
}

/// The architecture: given, found beside the checkpoint, or read from the shapes.
fn architecture(
    o: &ExportOptions,
    t: &HashMap<String, Tensor>,
    kind: SourceKind,
) -> Result<MaeConfig> {
    if let Some(m) = &o.model {
        return Ok(m.clone());
    }
    if let Some(r) = crate::recorded::recorded_model(&o.checkpoint) {
        return Ok(r.model);
    }
    infer_architecture(o, t, kind)
}

fn infer_architecture(
    o: &ExportOptions,
    t: &HashMap<String, Tensor>,
    kind: SourceKind,
) -> Result<MaeConfig> {
    let dims = |n: &str| -> Result<Vec<usize>> {
        t.get(n)
            .map(|x| x.dims().to_vec())
            .ok_or_else(|| invalid(o, format!("not a ViT checkpoint: no tensor {n}")))
    };
    let pw = dims("patch_embed.proj.weight")?;
    if pw.len() != 4 || pw[2] != pw[3] {
        return Err(invalid(
            o,
            format!("patch_embed.proj.weight has shape {pw:?}, expected [D, C, p, p]"),
        ));
    }
    let (d, c, p) = (pw[0], pw[1], pw[2]);
    let count = |prefix: &str| {
        (0..)
            .take_while(|i| t.contains_key(&format!("{prefix}.{i}.norm1.weight")))
            .count()
    };
    let l = dims("pos_embed")?[1] - 1;
    let side = (l as f64).sqrt().round() as usize;
    if side * side != l {
        return Err(invalid(
            o,
            format!("pos_embed has {l} patch positions, not a square grid: pass the model config"),
        ));
    }
    let heads = o.num_heads.ok_or_else(|| {
        invalid(
            o,
            "the number of attention heads cannot be read from the weights and no config.json or \
             classifier.json is beside the checkpoint: pass --num-heads (or --model CONFIG)"
                .into(),
        )
    })?;
    let fc1 = dims("blocks.0.mlp.fc1.weight")?;
    let (dd, ddepth, dheads) = if kind == SourceKind::FullMae && o.to == ExportTarget::Mae {
        let dh = o.decoder_num_heads.ok_or_else(|| {
            invalid(
                o,
                "a full MAE needs --decoder-num-heads too (or --model CONFIG)".into(),
            )
        })?;
        (
            dims("decoder_embed.weight")?[0],
            count("decoder_blocks"),
            dh,
        )
    } else {
        (d, 1, heads) // no decoder: a placeholder the encoder never uses
    };
    let cfg = MaeConfig {
        in_chans: c,
        img_size: [side * p, side * p],
        patch_size: p,
        embed_dim: d,
        depth: count("blocks"),
        num_heads: heads,
        decoder_embed_dim: dd,
        decoder_depth: ddepth,
        decoder_num_heads: dheads,
        mlp_ratio: fc1[0] as f64 / d as f64,
        norm_pix_loss: false,
        norm_eps: 1e-6,
    };
    cfg.validate().map_err(|e| invalid(o, e.to_string()))?;
    Ok(cfg)
}

fn is_encoder_name(n: &str) -> bool {
    lmd_model::vit::Encoder::owns(n)
}

type Mapped = (HashMap<String, Tensor>, GlobalPool, usize);

/// The exported state dict, its pooling and its number of classes (0: no head).
fn map_names(
    o: &ExportOptions,
    src: &HashMap<String, Tensor>,
    kind: SourceKind,
    cfg: &MaeConfig,
) -> Result<Mapped> {
    let need = |n: &str| -> Result<Tensor> {
        src.get(n)
            .cloned()
            .ok_or_else(|| invalid(o, format!("missing tensor {n}")))
    };
    let mut out: HashMap<String, Tensor> = HashMap::new();
    if kind == SourceKind::FullMae && o.to == ExportTarget::Mae {
        for (k, t) in src {
            out.insert(k.clone(), t.to_dtype(DType::F32)?);
        }
        if !out.contains_key("pos_embed") {
            return Err(invalid(o, "missing tensor pos_embed".into()));
        }
        return Ok((out, GlobalPool::Token, 0));
    }
    for (k, t) in src {
        if is_encoder_name(k) {
            out.insert(k.clone(), t.to_dtype(DType::F32)?);
        }
    }
    for n in [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    ] {
        need(n)?;
    }
    for i in 0..cfg.depth {
        need(&format!("blocks.{i}.mlp.fc2.weight"))?;
    }
    let (pool, classes) = if kind == SourceKind::Classifier {
        let pool = if src.contains_key("fc_norm.weight") {
            GlobalPool::Avg
        } else {
            GlobalPool::Token
        };
        let norm = if pool == GlobalPool::Avg {
            "fc_norm"
        } else {
            "norm"
        };
        for s in ["weight", "bias"] {
            out.insert(format!("{norm}.{s}"), need(&format!("{norm}.{s}"))?);
        }
        let (w, b) = if src.contains_key("head.1.weight") {
            // BatchNorm1d(affine=False, eps=1e-6) then Linear: W' = W / sqrt(var + eps),
            // b' = b - W' mean
            let (w, b) = (need("head.1.weight")?, need("head.1.bias")?);
            let (mean, var) = (need("head.0.running_mean")?, need("head.0.running_var")?);
            let inv = (var.to_dtype(DType::F64)? + 1e-6)?.sqrt()?.recip()?;
            let w2 = w.to_dtype(DType::F64)?.broadcast_mul(&inv.unsqueeze(0)?)?;
            let b2 = (b.to_dtype(DType::F64)?
                - w2.matmul(&mean.to_dtype(DType::F64)?.unsqueeze(1)?)?
                    .squeeze(1)?)?;
            (w2, b2)
        } else {
            (need("head.weight")?, need("head.bias")?)
        };
        let k = w.dim(0)?;
        out.insert("head.weight".into(), w.to_dtype(DType::F32)?);
        out.insert("head.bias".into(), b.to_dtype(DType::F32)?);
        (pool, k)
    } else {
        let pool = o.global_pool.unwrap_or(GlobalPool::Token);
        let to = if pool == GlobalPool::Avg {
            "fc_norm"
        } else {
            "norm"
        };
        for s in ["weight", "bias"] {
            out.insert(
                format!("{to}.{s}"),
                need(&format!("norm.{s}"))?.to_dtype(DType::F32)?,
            );
        }
        (pool, 0)
    };
    Ok((out, pool, classes))
}

fn model_args(
    cfg: &MaeConfig,
    full: bool,
    pool: GlobalPool,
    num_classes: usize,
) -> serde_json::Value {
    if full {
        serde_json::json!({
            "img_size": cfg.img_size[0], "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
            "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
            "decoder_embed_dim": cfg.decoder_embed_dim, "decoder_depth": cfg.decoder_depth,
            "decoder_num_heads": cfg.decoder_num_heads, "mlp_ratio": cfg.mlp_ratio,
            "norm_pix_loss": cfg.norm_pix_loss, "norm_eps": cfg.norm_eps,
        })
    } else {
        serde_json::json!({
            "img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
            "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
            "mlp_ratio": cfg.mlp_ratio, "qkv_bias": true, "norm_eps": cfg.norm_eps,
            "global_pool": pool, "num_classes": num_classes,
        })
    }
}

/// A seeded input and lmd's outputs on the exported weights (see the module doc).
fn write_reference(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    cfg: &MaeConfig,
    full: bool,
    pool: GlobalPool,
    num_classes: usize,
    dev: &Device,
) -> Result<()> {
    let x = seeded_normal(
        &[2, cfg.in_chans, cfg.img_size[0], cfg.img_size[1]],
        0x4558_504f,
        dev,
    )?;
    let mut out: Vec<(String, Tensor)> = vec![("x".into(), x.clone())];
    if full {
        let model = LatentMae::new(
            cfg,
            VarBuilder::from_tensors(tensors.clone(), DType::F32, dev),
        )?;
        let noise = seeded_uniform(&[2, cfg.num_patches()], 0x4e4f_4953, dev)?;
        let r = model.forward_with_noise(&x, &noise, 0.75)?;
        out.push(("noise".into(), noise));
        out.push(("mask_ratio".into(), Tensor::new(0.75f32, dev)?));
        out.push(("latent".into(), r.latent));
        out.push(("pred".into(), r.pred));
        out.push(("mask".into(), r.masking.mask));
        out.push(("loss".into(), r.loss));
    } else {
        let mut t = tensors.clone();
        let k = num_classes.max(2);
        if num_classes == 0 {
            // features only: a placeholder head the reference never reads
            t.insert(
                "head.weight".into(),
                Tensor::zeros((k, cfg.embed_dim), DType::F32, dev)?,
            );
            t.insert("head.bias".into(), Tensor::zeros(k, DType::F32, dev)?);
        }
        let ccfg = ClassifierConfig {
            encoder: cfg.clone(),
            num_classes: k,
            global_pool: pool == GlobalPool::Avg,
            drop_path: 0.0,
            linear_probe: false,
        };
        let clf = VitClassifier::new(&ccfg, VarBuilder::from_tensors(t, DType::F32, dev))?;
        let feats = clf.features(&x, None)?;
        if num_classes > 0 {
            out.push(("logits".into(), clf.head(&feats)?));
        }
        out.push(("features".into(), feats));
    }
    lmd_model::write_tensors(&out, path, CheckpointFormat::Safetensors)?;
    Ok(())
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn seeded_uniform(shape: &[usize], seed: u64, dev: &Device) -> Result<Tensor> {
    let mut s = seed;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

fn seeded_normal(shape: &[usize], seed: u64, dev: &Device) -> Result<Tensor> {
    let u = seeded_uniform(&[2, shape.iter().product()], seed, dev)?;
    let r = ((u.i(0)? * 0.999_999)? + 1e-7)?
        .log()?
        .affine(-2.0, 0.0)?
        .sqrt()?;
    let z = (r * (u.i(1)? * std::f64::consts::TAU)?.cos()?)?;
    Ok(z.reshape(shape)?)
}
