//! The ViT encoder every model shares (timm's `VisionTransformer` as MAE uses it; the shape of
//! candle-transformers' `models/vit.rs`): [`PatchEmbed`], [`Attention`], [`Block`] and
//! [`Encoder`] (patch embedding, fixed 2D sin-cos positions, cls token, blocks).
//!
//! `LatentMae` is an encoder + decoder + masking + loss; `VitClassifier` an encoder + pooling +
//! head. Neither repeats the encoder's prelude, and [`Encoder::owns`] is the one definition of
//! which parameters are the encoder's (loading a pretrained encoder, freezing, layer decay,
//! export). The final norm belongs to the head (`norm`, or `fc_norm` under global pooling), as
//! in MAE's `models_vit.py`.
//!
//! Every layer computes on its model's [`Backend`]; a block is one fused node where the backend
//! is `Fused`, candle ops otherwise.

use candle_core::{IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{linear, LayerNorm, Linear};
use crate::rng::SplitMix;
use crate::{Backend, MaeConfig};

/// MAE's `get_2d_sincos_pos_embed(dim, grid, cls_token=True)`: `[1 + gh·gw, dim]`, row 0 zero.
/// For token (i, j) (row i, column j) the first half encodes j, the second half i.
pub fn sincos_pos_embed(dim: usize, gh: usize, gw: usize) -> Vec<f32> {
    let half = dim / 2;
    let quarter = half / 2;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut out = vec![0f32; (1 + gh * gw) * dim];
    for i in 0..gh {
        for j in 0..gw {
            let row = &mut out[(1 + i * gw + j) * dim..(2 + i * gw + j) * dim];
            for (h, pos) in [(0usize, j as f64), (half, i as f64)] {
                for (k, om) in omega.iter().enumerate() {
                    row[h + k] = (pos * om).sin() as f32;
                    row[h + quarter + k] = (pos * om).cos() as f32;
                }
            }
        }
    }
    out
}

/// The fixed positional table `[1, 1 + gh·gw, dim]` in `vb`'s dtype and device.
pub(crate) fn pos_table(dim: usize, (gh, gw): (usize, usize), vb: &VarBuilder) -> Result<Tensor> {
    Tensor::from_vec(
        sincos_pos_embed(dim, gh, gw),
        (1, 1 + gh * gw, dim),
        vb.device(),
    )?
    .to_dtype(vb.dtype())
}

/// Patch embedding, MAE's `patch_embed.proj` (a p×p stride-p conv) as one matmul:
/// `[B, C, H, W]` -> `[B, L, D]`.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    /// The conv weight flattened as (c, i, j): `[D, C·p·p]`.
    weight: Tensor,
    bias: Tensor,
    patch: usize,
    grid: (usize, usize),
    dim: usize,
    backend: Backend,
}

impl PatchEmbed {
    /// MAE's init: xavier_uniform over the flattened conv weight, zero bias.
    pub fn new(cfg: &MaeConfig, backend: Backend, vb: VarBuilder) -> Result<Self> {
        let (c, p, d) = (cfg.in_chans, cfg.patch_size, cfg.embed_dim);
        let bound = (6.0 / (c * p * p + d) as f64).sqrt();
        let w = vb.get_with_hints(
            (d, c, p, p),
            "proj.weight",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let bias = vb.get_with_hints(d, "proj.bias", candle_nn::Init::Const(0.0))?;
        Ok(PatchEmbed {
            weight: w.reshape((d, c * p * p))?,
            bias,
            patch: p,
            grid: cfg.grid(),
            dim: d,
            backend,
        })
    }
}

impl Module for PatchEmbed {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, _, _) = x.dims4()?;
        let p = self.patch;
        let (gh, gw) = self.grid;
        let cols = x
            .reshape((n, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))? // n h w c p q
            .reshape((n * gh * gw, c * p * p))?;
        self.backend
            .linear(&cols, &self.weight, &self.bias)?
            .reshape((n, gh * gw, self.dim))
    }
}

/// timm's `Attention` (qkv bias, no qk norm).
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    scale: f64,
    backend: Backend,
}

impl Attention {
    pub fn new(dim: usize, heads: usize, backend: Backend, vb: VarBuilder) -> Result<Self> {
        Ok(Attention {
            qkv: linear(dim, 3 * dim, backend, vb.pp("qkv"))?,
            proj: linear(dim, dim, backend, vb.pp("proj"))?,
            heads,
            scale: 1.0 / ((dim / heads) as f64).sqrt(),
            backend,
        })
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self
            .backend
            .attention(&self.qkv.forward(x)?, self.heads, self.scale)?; // [B, N, C]
        self.proj.forward(&out)
    }
}

/// A pre-norm transformer block (timm `Block`): `x + attn(norm1(x))`, `x + mlp(norm2(x))`.
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    backend: Backend,
}

impl Block {
    pub fn new(
        dim: usize,
        heads: usize,
        mlp_ratio: f64,
        eps: f64,
        backend: Backend,
        vb: VarBuilder,
    ) -> Result<Self> {
        let hidden = (dim as f64 * mlp_ratio) as usize;
        Ok(Block {
            norm1: LayerNorm::new(dim, eps, backend, vb.pp("norm1"))?,
            attn: Attention::new(dim, heads, backend, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, eps, backend, vb.pp("norm2"))?,
            fc1: linear(dim, hidden, backend, vb.pp("mlp.fc1"))?,
            fc2: linear(hidden, dim, backend, vb.pp("mlp.fc2"))?,
            backend,
        })
    }

    /// The parameters in [`crate::cpu::block::PARAM_ORDER`].
    pub(crate) fn params(&self) -> [&Tensor; 12] {
        [
            &self.norm1.weight,
            &self.norm1.bias,
            &self.attn.qkv.weight,
            &self.attn.qkv.bias,
            &self.attn.proj.weight,
            &self.attn.proj.bias,
            &self.norm2.weight,
            &self.norm2.bias,
            &self.fc1.weight,
            &self.fc1.bias,
            &self.fc2.weight,
            &self.fc2.bias,
        ]
    }

    /// The block's output with per-sample branch factors `keep` (stochastic depth) or none:
    /// one fused node on the fused backend, candle ops otherwise.
    fn run(&self, x: &Tensor, keep: Option<[Vec<f32>; 2]>) -> Result<Tensor> {
        if self.backend.fused_blocks() {
            let eps = self.norm1.eps;
            return crate::cpu::block::block(x, self.params(), self.attn.heads, eps, keep);
        }
        match keep {
            None => self.forward_composite(x),
            Some(keep) => self.forward_composite_keep(x, &keep),
        }
    }

    /// The block from candle ops (each with a backward): any device and dtype.
    pub(crate) fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.backend;
        let x = (x + k.full(&self.attn.forward(&self.norm1.forward(x)?)?)?)?;
        let h = self
            .fc2
            .forward(&k.gelu_erf(&self.fc1.forward(&self.norm2.forward(&x)?)?)?)?;
        x + k.full(&h)?
    }

    /// Forward with stochastic depth (timm's `DropPath`): each residual branch is kept per
    /// sample with probability `1 - rate` (scaled by `1 / (1 - rate)`), masks drawn from `rng`.
    pub(crate) fn forward_drop_path(
        &self,
        x: &Tensor,
        rate: f64,
        rngs: &mut [SplitMix],
    ) -> Result<Tensor> {
        if rate <= 0.0 {
            return self.forward(x);
        }
        // one factor per sample and branch, each sample from its own stream, attention's
        // drawn first
        let mut keep = [
            Vec::with_capacity(rngs.len()),
            Vec::with_capacity(rngs.len()),
        ];
        for rng in rngs.iter_mut() {
            for k in keep.iter_mut() {
                k.push(if rng.uniform() < 1.0 - rate {
                    (1.0 / (1.0 - rate)) as f32
                } else {
                    0.0
                });
            }
        }
        self.run(x, Some(keep))
    }

    /// The composite block with per-sample branch factors (stochastic depth).
    pub(crate) fn forward_composite_keep(
        &self,
        x: &Tensor,
        keep: &[Vec<f32>; 2],
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        let factor = |k: &Vec<f32>| -> Result<Tensor> {
            Tensor::from_vec(k.clone(), (b, 1, 1), x.device())?.to_dtype(x.dtype())
        };
        let k = self.backend;
        let a = k.full(&self.attn.forward(&self.norm1.forward(x)?)?)?;
        let x = (x + a.broadcast_mul(&factor(&keep[0])?)?)?;
        let h = self
            .fc2
            .forward(&k.gelu_erf(&self.fc1.forward(&self.norm2.forward(&x)?)?)?)?;
        let h = k.full(&h)?.broadcast_mul(&factor(&keep[1])?)?;
        x + h
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None)
    }
}

/// Stochastic depth over an encoder's blocks: rate `max_rate · i / (depth - 1)` at block `i`
/// (timm's linear rule), masks drawn from `seed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropPath {
    pub max_rate: f64,
    pub seed: u64,
    /// The global position of the batch's first sample: sample `i` draws its masks from the
    /// stream of `(seed, first + i)`.
    pub first: u64,
}

/// Gather rows per sample: `x [B, N, D]`, `ids[b]` -> `[B, ids.len(), D]`.
pub(crate) fn gather_rows(x: &Tensor, ids: &[Vec<u32>]) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    let k = ids.first().map(|v| v.len()).unwrap_or(0);
    let flat: Vec<u32> = ids
        .iter()
        .enumerate()
        .flat_map(|(bi, row)| row.iter().map(move |&i| bi as u32 * n as u32 + i))
        .collect();
    let idx = Tensor::from_vec(flat, b * k, x.device())?;
    x.reshape((b * n, d))?
        .index_select(&idx, 0)?
        .reshape((b, k, d))
}

/// The encoder: patch embedding + positions, cls token, blocks (no final norm: the head's).
#[derive(Debug, Clone)]
pub struct Encoder {
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    /// `[1, 1 + L, D]`, fixed.
    pos_embed: Tensor,
    blocks: Vec<Block>,
    dim: usize,
}

impl Encoder {
    /// Parameters `patch_embed.proj`, `cls_token`, `blocks.N.*` from `vb` (the model's root:
    /// MAE's names have no encoder prefix).
    pub fn new(cfg: &MaeConfig, backend: Backend, vb: &VarBuilder) -> Result<Self> {
        let d = cfg.embed_dim;
        let cls_token = vb.get_with_hints(
            (1, 1, d),
            "cls_token",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let blocks = (0..cfg.depth)
            .map(|i| {
                Block::new(
                    d,
                    cfg.num_heads,
                    cfg.mlp_ratio,
                    cfg.norm_eps,
                    backend,
                    vb.pp(format!("blocks.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Encoder {
            patch_embed: PatchEmbed::new(cfg, backend, vb.pp("patch_embed"))?,
            cls_token,
            pos_embed: pos_table(d, cfg.grid(), vb)?,
            blocks,
            dim: d,
        })
    }

    /// Whether a parameter (or fixed buffer) by MAE's name is the encoder's: the one definition
    /// used to load a pretrained encoder, to freeze it and for layer-wise decay.
    pub fn owns(name: &str) -> bool {
        name.starts_with("patch_embed.")
            || name == "cls_token"
            || name == "pos_embed"
            || name.starts_with("blocks.")
    }

    /// The fixed positional table `[1, 1 + L, D]`.
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// The tokens entering the first block: `[B, 1 + n, D]`, cls first, positions added;
    /// `keep`: per sample, the patch ids to keep (MAE's masking), else all `L`.
    pub fn tokens(&self, x: &Tensor, keep: Option<&[Vec<u32>]>) -> Result<Tensor> {
        let b = x.dim(0)?;
        let patches = self
            .patch_embed
            .backend
            .full(&self.patch_embed.forward(x)?)?
            .broadcast_add(&self.pos_embed.i((.., 1..))?)?;
        let patches = match keep {
            Some(ids) => gather_rows(&patches, ids)?,
            None => patches,
        };
        let cls =
            (&self.cls_token + self.pos_embed.i((.., ..1))?)?.broadcast_as((b, 1, self.dim))?;
        Tensor::cat(&[&cls, &patches], 1)
    }

    /// The blocks over `x [B, N, D]`, with stochastic depth when `drop` is given.
    pub fn blocks(&self, mut x: Tensor, drop: Option<DropPath>) -> Result<Tensor> {
        let n = self.blocks.len();
        let b = x.dim(0)? as u64;
        let mut rng = drop.map(|d| {
            let streams: Vec<SplitMix> = (0..b)
                .map(|i| SplitMix::for_sample(d.seed, d.first + i))
                .collect();
            (d.max_rate, streams)
        });
        for (i, blk) in self.blocks.iter().enumerate() {
            x = match rng.as_mut() {
                Some((max_rate, r)) if *max_rate > 0.0 => {
                    let rate = *max_rate * i as f64 / (n.max(2) - 1) as f64;
                    blk.forward_drop_path(&x, rate, r)?
                }
                _ => blk.forward(&x)?,
            };
        }
        Ok(x)
    }

    /// [`tokens`](Self::tokens) then [`blocks`](Self::blocks): `[B, 1 + n, D]` before the
    /// head's norm.
    pub fn forward(
        &self,
        x: &Tensor,
        keep: Option<&[Vec<u32>]>,
        drop: Option<DropPath>,
    ) -> Result<Tensor> {
        self.blocks(self.tokens(x, keep)?, drop)
    }
}
