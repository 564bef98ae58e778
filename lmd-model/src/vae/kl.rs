//! Stable Diffusion's AutoencoderKL with diffusers parameter names and `config.json` semantics.
//!
//! Encoder: `conv_in`, `down_blocks.i.resnets.j` (+ `downsamplers.0.conv`, stride 2 after a
//! (0,1,0,1) pad) , `mid_block` (resnet, single-head attention, resnet), `conv_norm_out`, SiLU,
//! `conv_out` -> 2·latent channels, `quant_conv`: posterior mean and logvar (clamped to
//! [-30, 20] as diffusers does). Decoder mirrors it with `up_blocks` (nearest 2x then conv).
//! GroupNorm eps 1e-6. Images in [-1, 1].

use super::{
    build_err, load_tensors, sha256_file, weights_err, Conv, Encoded, InputRange, Vae, VaeId,
    WeightHash,
};
use crate::Result;
use crate::{Backend, Precision};
use candle_core::{Device, Module, Tensor, D};
use candle_nn::{GroupNorm, Linear, VarBuilder};
use std::path::Path;

/// The diffusers `config.json` fields the model uses.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct KlConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize {
    3
}
fn sd_scale() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl KlConfig {
    /// Stable Diffusion 1.x/2.x's VAE (stabilityai/sd-vae-ft-mse).
    pub fn sd() -> Self {
        KlConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

const EPS: f64 = 1e-6;

fn conv(
    backend: Backend,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv> {
    Conv::new(cin, cout, (k, stride, padding), true, backend, vb)
}

struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl Resnet {
    fn new(
        backend: Backend,
        cin: usize,
        cout: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Resnet {
            norm1: candle_nn::group_norm(groups, cin, EPS, vb.pp("norm1"))?,
            conv1: conv(backend, cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            norm2: candle_nn::group_norm(groups, cout, EPS, vb.pp("norm2"))?,
            conv2: conv(backend, cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            shortcut: if cin != cout {
                Some(conv(backend, cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }
}

impl Module for Resnet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// Single-head self-attention over the spatial positions (diffusers `Attention` in the VAE).
struct SpatialAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    channels: usize,
    backend: Backend,
}

impl SpatialAttention {
    fn new(backend: Backend, c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(SpatialAttention {
            norm: candle_nn::group_norm(groups, c, EPS, vb.pp("group_norm"))?,
            q: candle_nn::linear(c, c, vb.pp("to_q"))?,
            k: candle_nn::linear(c, c, vb.pp("to_k"))?,
            v: candle_nn::linear(c, c, vb.pp("to_v"))?,
            out: candle_nn::linear(c, c, vb.pp("to_out.0"))?,
            channels: c,
            backend,
        })
    }
}

impl Module for SpatialAttention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?; // [B, HW, C]
        let q = self.q.forward(&t)?;
        let k = self.k.forward(&t)?;
        let v = self.v.forward(&t)?;
        let att = (q.matmul(&k.t()?)? / (self.channels as f64).sqrt())?;
        let att = self.backend.softmax_last_dim(&att)?;
        let o = self.out.forward(&att.matmul(&v)?)?; // [B, HW, C]
        o.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

struct Mid {
    r0: Resnet,
    attn: Option<SpatialAttention>,
    r1: Resnet,
}

impl Mid {
    fn new(
        backend: Backend,
        c: usize,
        cfg: &KlConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Mid {
            r0: Resnet::new(backend, c, c, g, vb.pp("resnets.0"))?,
            attn: if cfg.mid_block_add_attention {
                Some(SpatialAttention::new(backend, c, g, vb.pp("attentions.0"))?)
            } else {
                None
            },
            r1: Resnet::new(backend, c, c, g, vb.pp("resnets.1"))?,
        })
    }
}

impl Module for Mid {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.r0.forward(x)?;
        if let Some(a) = &self.attn {
            h = a.forward(&h)?;
        }
        self.r1.forward(&h)
    }
}

/// One of diffusers' down or up blocks: resnets, then (all but the last block) a 3x3
/// resampling conv.
struct Stage {
    res: Vec<Resnet>,
    sampler: Option<Conv>,
}

impl Stage {
    /// The blocks `{kind}_blocks.{i}` for the channels `chans`, each with `n_res` resnets
    /// (`resnets.{j}`, the first taking the previous block's channels) and, but the last,
    /// `{kind}samplers.0.conv` (3x3, `stride`, `pad`).
    #[allow(clippy::too_many_arguments)]
    fn all(
        backend: Backend,
        chans: &[usize],
        n_res: usize,
        groups: usize,
        kind: &str,
        stride: usize,
        pad: usize,
        vb: &VarBuilder,
    ) -> candle_core::Result<Vec<Stage>> {
        let mut cin = chans[0];
        let mut stages = Vec::new();
        for (i, &cout) in chans.iter().enumerate() {
            let vbi = vb.pp(format!("{kind}_blocks.{i}"));
            let res = (0..n_res)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    Resnet::new(backend, c, cout, groups, vbi.pp(format!("resnets.{j}")))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let sampler = match i + 1 < chans.len() {
                true => {
                    let vbs = vbi.pp(format!("{kind}samplers.0.conv"));
                    Some(conv(backend, cout, cout, 3, stride, pad, vbs)?)
                }
                false => None,
            };
            stages.push(Stage { res, sampler });
            cin = cout;
        }
        Ok(stages)
    }
}

struct Encoder {
    conv_in: Conv,
    down: Vec<Stage>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Encoder {
    fn new(backend: Backend, cfg: &KlConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        // diffusers Downsample2D(padding=0): stride 2 after a pad in forward
        let down = Stage::all(backend, boc, cfg.layers_per_block, g, "down", 2, 0, &vb)?;
        let c = *boc.last().expect("block_out_channels not empty");
        Ok(Encoder {
            conv_in: conv(backend, cfg.in_channels, boc[0], 3, 1, 1, vb.pp("conv_in"))?,
            down,
            mid: Mid::new(backend, c, cfg, vb.pp("mid_block"))?,
            norm_out: candle_nn::group_norm(g, c, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv(
                backend,
                c,
                2 * cfg.latent_channels,
                3,
                1,
                1,
                vb.pp("conv_out"),
            )?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for Stage { res, sampler: ds } in &self.down {
            for r in res {
                h = r.forward(&h)?;
            }
            if let Some(d) = ds {
                // diffusers Downsample2D(padding=0): pad right and bottom by one, then stride 2
                h = d.forward(&h.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(
                    D::Minus2,
                    0,
                    1,
                )?)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }
}

struct Decoder {
    conv_in: Conv,
    mid: Mid,
    up: Vec<Stage>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Decoder {
    fn new(backend: Backend, cfg: &KlConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let up = Stage::all(backend, &rev, cfg.layers_per_block + 1, g, "up", 1, 1, &vb)?;
        let last = *rev.last().expect("not empty");
        Ok(Decoder {
            conv_in: conv(
                backend,
                cfg.latent_channels,
                rev[0],
                3,
                1,
                1,
                vb.pp("conv_in"),
            )?,
            mid: Mid::new(backend, rev[0], cfg, vb.pp("mid_block"))?,
            up,
            norm_out: candle_nn::group_norm(g, last, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv(backend, last, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for Stage { res, sampler: us } in &self.up {
            for r in res {
                h = r.forward(&h)?;
            }
            if let Some(u) = us {
                let (_, _, hh, ww) = h.dims4()?;
                h = u.forward(&h.upsample_nearest2d(2 * hh, 2 * ww)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&h)?.silu()?)
    }
}

/// diffusers `AutoencoderKL`.
pub struct AutoencoderKl {
    cfg: KlConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv>,
    post_quant_conv: Option<Conv>,
    id: VaeId,
    /// The weights' dtype, which `encode`/`decode` compute in (f32 in, f32 out).
    dtype: candle_core::DType,
}

impl AutoencoderKl {
    pub fn new(cfg: &KlConfig, vb: VarBuilder, id: VaeId) -> candle_core::Result<Self> {
        let l = cfg.latent_channels;
        if cfg.block_out_channels.is_empty() {
            candle_core::bail!("block_out_channels is empty");
        }
        let backend = Backend::of(&vb)?;
        Ok(AutoencoderKl {
            dtype: vb.dtype(),
            encoder: Encoder::new(backend, cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(backend, cfg, vb.pp("decoder"))?,
            quant_conv: if cfg.use_quant_conv {
                Some(conv(backend, 2 * l, 2 * l, 1, 1, 0, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(conv(backend, l, l, 1, 1, 0, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            cfg: cfg.clone(),
            id,
        })
    }

    /// Load a diffusers `vae/` folder: `config.json` + `diffusion_pytorch_model.safetensors`,
    /// computing in `precision` (inference: the weights in that dtype).
    pub fn load_dir(dir: &Path, dev: &Device, precision: Precision) -> Result<Self> {
        let cpath = dir.join("config.json");
        let text = std::fs::read_to_string(&cpath)
            .map_err(|e| weights_err(&cpath, format!("cannot read: {e}")))?;
        let cfg: KlConfig = serde_json::from_str(&text)
            .map_err(|e| weights_err(&cpath, format!("not a diffusers VAE config: {e}")))?;
        let wpath = dir.join("diffusion_pytorch_model.safetensors");
        let id = VaeId {
            name: "sd-vae".into(),
            weights: vec![WeightHash {
                file: "diffusion_pytorch_model.safetensors".into(),
                sha256: sha256_file(&wpath)?,
            }],
        };
        Self::load_file(&cfg, &wpath, dev, id, precision)
    }

    /// Load weights from one safetensors file with diffusers names, computing in `precision`.
    pub fn load_file(
        cfg: &KlConfig,
        path: &Path,
        dev: &Device,
        id: VaeId,
        precision: Precision,
    ) -> Result<Self> {
        let t = load_tensors(path, dev)?;
        let vb = VarBuilder::from_tensors(t, precision.dtype(), dev);
        Self::new(cfg, vb, id).map_err(|e| build_err(path, e))
    }

    pub fn config(&self) -> &KlConfig {
        &self.cfg
    }

    /// Posterior moments (unscaled): images in [-1, 1] -> (mean, logvar clamped to [-30, 20]).
    pub fn encode_moments(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut h = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let l = self.cfg.latent_channels;
        let mean = h.narrow(1, 0, l)?;
        let logvar = h.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// Decoder on unscaled latents; output about [-1, 1] (not clamped).
    pub fn decode_raw(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }
}

impl Vae for AutoencoderKl {
    /// Latent = scaled posterior mean; `mean_logvar` in the scaled space
    /// (`logvar + 2·ln(scaling_factor)`), so `z = mean + exp(logvar/2)·ε` needs no further scaling.
    fn encode(&self, x: &Tensor) -> Result<Encoded> {
        let f32 = candle_core::DType::F32;
        let (mean, logvar) = self.encode_moments(&x.to_dtype(self.dtype)?)?;
        let (mean, logvar) = (mean.to_dtype(f32)?, logvar.to_dtype(f32)?);
        let s = self.cfg.scaling_factor;
        let mean = (mean * s)?;
        let logvar = (logvar + 2.0 * s.ln())?;
        Ok(Encoded {
            latent: mean.clone(),
            mean_logvar: Some((mean, logvar)),
        })
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = (z / self.cfg.scaling_factor)?.to_dtype(self.dtype)?;
        let x = self.decode_raw(&z)?.to_dtype(candle_core::DType::F32)?;
        Ok(x.affine(0.5, 0.5)?.clamp(0f32, 1f32)?)
    }

    fn input_range(&self) -> InputRange {
        InputRange::MinusOneOne
    }

    fn scaling_factor(&self) -> f64 {
        self.cfg.scaling_factor
    }

    fn latent_channels(&self) -> usize {
        self.cfg.latent_channels
    }

    fn id(&self) -> &VaeId {
        &self.id
    }
}
