//! `LatentMae`: MAE (He et al. 2022, facebookresearch/mae `models_mae.py`) on VAE latents.
//!
//! Parameter names mirror the official state dict (`patch_embed.proj`, `cls_token`, `blocks.N.*`,
//! `norm`, `decoder_embed`, `mask_token`, `decoder_blocks.N.*`, `decoder_norm`, `decoder_pred`),
//! so checkpoints move both ways. Positional embeddings are the fixed 2D sin-cos tables (with a
//! zero cls slot), computed, not learned; they are written into saved checkpoints as MAE does.
//!
//! Shapes: input latents `[B, C, H, W]`; `L = (H/p)(W/p)` tokens; patch vectors of `p·p·C`
//! values ordered (p, q, c) as MAE's `patchify`.

use crate::checkpoint::{save_varmap, set_vars};
use crate::nn::{linear, LayerNorm, Linear};
use crate::rng::SplitMix;
use crate::vit::{gather_rows, Block, Encoder};
use crate::{Backend, Error};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

/// Model configuration (MAE's constructor arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaeConfig {
    pub in_chans: usize,
    /// Latent height and width.
    pub img_size: [usize; 2],
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub decoder_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    pub mlp_ratio: f64,
    pub norm_pix_loss: bool,
    /// LayerNorm epsilon: 1e-6 in MAE's model factories (`mae_vit_base_patch16_dec512d8b`, ...,
    /// `partial(nn.LayerNorm, eps=1e-6)`), 1e-5 when `MaskedAutoencoderViT` is built directly
    /// (its default `nn.LayerNorm`).
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
}

fn default_norm_eps() -> f64 {
    1e-6
}

impl MaeConfig {
    fn with(
        embed: usize,
        depth: usize,
        heads: usize,
        dec: usize,
        dec_depth: usize,
        dec_heads: usize,
        patch: usize,
    ) -> Self {
        MaeConfig {
            in_chans: 4,
            img_size: [28, 28],
            patch_size: patch,
            embed_dim: embed,
            depth,
            num_heads: heads,
            decoder_embed_dim: dec,
            decoder_depth: dec_depth,
            decoder_num_heads: dec_heads,
            mlp_ratio: 4.0,
            norm_pix_loss: true,
            norm_eps: 1e-6,
        }
    }

    /// ViT-Ti encoder (192 x 12, 3 heads), decoder 128 x 4, patch 2 on 4x28x28 (196 tokens).
    pub fn tiny() -> Self {
        Self::with(192, 12, 3, 128, 4, 4, 2)
    }

    /// ViT-S encoder (384 x 12, 6 heads), decoder 256 x 4, patch 2.
    pub fn small() -> Self {
        Self::with(384, 12, 6, 256, 4, 8, 2)
    }

    /// ViT-B encoder (768 x 12, 12 heads), MAE's decoder 512 x 8, patch 2.
    pub fn base() -> Self {
        Self::with(768, 12, 12, 512, 8, 16, 2)
    }

    /// ViT-L encoder (1024 x 24, 16 heads), decoder 512 x 8, patch 2.
    pub fn large() -> Self {
        Self::with(1024, 24, 16, 512, 8, 16, 2)
    }

    /// LMD's model: ViT-B on 4x28x28 latents, patch 4 (49 tokens), decoder 512 x 8.
    pub fn base_patch4() -> Self {
        Self::with(768, 12, 12, 512, 8, 16, 4)
    }

    /// A preset by name: tiny, small, base, large, base_patch4.
    pub fn preset(name: &str) -> Option<Self> {
        name.parse::<crate::Preset>()
            .ok()
            .map(crate::Preset::config)
    }

    /// From the official MAE constructor arguments as JSON (`img_size` int or [h, w],
    /// `patch_size`, `in_chans`, `embed_dim`, `depth`, `num_heads`, `decoder_*`, `mlp_ratio`,
    /// `norm_pix_loss`, optional `norm_eps`), as stored in the metadata of our reference files.
    pub fn from_mae_json(v: &serde_json::Value) -> crate::Result<Self> {
        let get = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| Error::Config(format!("MAE config lacks {k}")))
        };
        let bad_size = || Error::Config("MAE config: img_size is not [h, w] integers".into());
        let img_size = match v.get("img_size") {
            Some(serde_json::Value::Array(a)) if a.len() == 2 => [
                a[0].as_u64().ok_or_else(bad_size)? as usize,
                a[1].as_u64().ok_or_else(bad_size)? as usize,
            ],
            _ => [get("img_size")?; 2],
        };
        let cfg = MaeConfig {
            in_chans: get("in_chans")?,
            img_size,
            patch_size: get("patch_size")?,
            embed_dim: get("embed_dim")?,
            depth: get("depth")?,
            num_heads: get("num_heads")?,
            decoder_embed_dim: get("decoder_embed_dim")?,
            decoder_depth: get("decoder_depth")?,
            decoder_num_heads: get("decoder_num_heads")?,
            mlp_ratio: v.get("mlp_ratio").and_then(|x| x.as_f64()).unwrap_or(4.0),
            norm_pix_loss: v
                .get("norm_pix_loss")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            // The constructor's default norm_layer is nn.LayerNorm (eps 1e-5) unless stated.
            norm_eps: v.get("norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Patches along (height, width).
    pub fn grid(&self) -> (usize, usize) {
        (
            self.img_size[0] / self.patch_size,
            self.img_size[1] / self.patch_size,
        )
    }

    /// Number of patch tokens L.
    pub fn num_patches(&self) -> usize {
        let (h, w) = self.grid();
        h * w
    }

    /// Values per patch vector (p·p·C).
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.in_chans
    }

    /// The same encoder and decoder on another input: `in_chans` channels of `size`x`size`
    /// cut into `patch`-sided patches (pixel MAE: 3, 224, 16; LMD's latents: 4, 28, 4).
    pub fn on_input(&self, in_chans: usize, size: usize, patch: usize) -> Self {
        MaeConfig {
            in_chans,
            img_size: [size, size],
            patch_size: patch,
            ..self.clone()
        }
    }

    /// Tokens MAE keeps at `mask_ratio` (`int(L · (1 − ratio))`, as `random_masking`).
    pub fn kept_tokens(&self, mask_ratio: f64) -> usize {
        (self.num_patches() as f64 * (1.0 - mask_ratio)) as usize
    }

    /// Multiply-accumulates of one sample's forward pass at `mask_ratio`, counting the matmuls
    /// (patch embedding over all L patches, the encoder on 1 + kept tokens, the decoder on
    /// 1 + L, attention's two products) and nothing else (norms, softmax, GELU are O(N·D)).
    pub fn forward_macs(&self, mask_ratio: f64) -> f64 {
        let l = self.num_patches() as f64;
        let n = 1.0 + self.kept_tokens(mask_ratio) as f64;
        let (d, dd) = (self.embed_dim as f64, self.decoder_embed_dim as f64);
        let m = self.mlp_ratio;
        // qkv 3ND² + proj ND² + MLP 2mND², and QKᵀ, AV: 2N²D
        let block = |n: f64, d: f64| (4.0 + 2.0 * m) * n * d * d + 2.0 * n * n * d;
        let embed = l * self.patch_dim() as f64 * d;
        let encoder = self.depth as f64 * block(n, d);
        let decoder = n * d * dd
            + self.decoder_depth as f64 * block(1.0 + l, dd)
            + (1.0 + l) * dd * self.patch_dim() as f64;
        embed + encoder + decoder
    }

    /// Multiply-accumulates of one sample's training step (forward + backward ≈ 3 forwards).
    pub fn train_macs(&self, mask_ratio: f64) -> f64 {
        3.0 * self.forward_macs(mask_ratio)
    }

    pub fn validate(&self) -> crate::Result<()> {
        let p = self.patch_size;
        if p == 0 || !self.img_size[0].is_multiple_of(p) || !self.img_size[1].is_multiple_of(p) {
            return Err(Error::Config(format!(
                "img_size {:?} not divisible by patch_size {p}",
                self.img_size
            )));
        }
        if !self.embed_dim.is_multiple_of(self.num_heads)
            || !self
                .decoder_embed_dim
                .is_multiple_of(self.decoder_num_heads)
        {
            return Err(Error::Config(
                "embedding widths must be divisible by their head counts".into(),
            ));
        }
        if !self.embed_dim.is_multiple_of(4) || !self.decoder_embed_dim.is_multiple_of(4) {
            return Err(Error::Config(
                "2D sin-cos positional embeddings need widths divisible by 4".into(),
            ));
        }
        Ok(())
    }
}

pub use crate::vit::sincos_pos_embed;

/// Which tokens a forward pass kept, as MAE's `random_masking` returns them.
#[derive(Debug, Clone)]
pub struct Masking {
    /// `[B, L]` f32: 0 kept, 1 masked.
    pub mask: Tensor,
    /// Per sample, the kept token ids (ascending noise order).
    pub ids_keep: Vec<Vec<u32>>,
    /// Per sample, `argsort(ids_shuffle)`.
    pub ids_restore: Vec<Vec<u32>>,
}

/// Output of a full forward pass.
#[derive(Debug, Clone)]
pub struct MaeOutput {
    /// Scalar loss (MSE over masked patches).
    pub loss: Tensor,
    /// `[B, L, p·p·C]` predicted patch vectors.
    pub pred: Tensor,
    /// `[B, 1 + keep, D]` encoder output (cls first).
    pub latent: Tensor,
    pub masking: Masking,
}

/// Global pooling for the encoder-only forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The normalised cls token.
    Cls,
    /// Mean of the patch tokens, then a LayerNorm (MAE fine-tuning's `global_pool`, `fc_norm`).
    Mean,
}

/// The latent masked autoencoder.
#[derive(Debug, Clone)]
pub struct LatentMae {
    cfg: MaeConfig,
    encoder: Encoder,
    norm: LayerNorm,
    decoder_embed: Linear,
    mask_token: Tensor,
    decoder_pos_embed: Tensor, // [1, 1+L, Dd]
    decoder_blocks: Vec<Block>,
    decoder_norm: LayerNorm,
    decoder_pred: Linear,
    backend: Backend,
}

impl LatentMae {
    /// Build the model, taking (or, with a `VarMap`-backed builder, creating) its parameters,
    /// on the backend resolved from `vb`'s device and dtype ([`Backend::of`]).
    pub fn new(cfg: &MaeConfig, vb: VarBuilder) -> Result<Self> {
        let backend = Backend::of(&vb)?;
        Self::new_on(cfg, backend, vb)
    }

    /// [`new`](Self::new) on a given backend.
    pub fn new_on(cfg: &MaeConfig, backend: Backend, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::wrap)?;
        let (d, dd) = (cfg.embed_dim, cfg.decoder_embed_dim);
        let mask_token = vb.get_with_hints(
            (1, 1, dd),
            "mask_token",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let decoder_blocks = (0..cfg.decoder_depth)
            .map(|i| {
                Block::new(
                    dd,
                    cfg.decoder_num_heads,
                    cfg.mlp_ratio,
                    cfg.norm_eps,
                    backend,
                    vb.pp(format!("decoder_blocks.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LatentMae {
            cfg: cfg.clone(),
            encoder: Encoder::new(cfg, backend, &vb)?,
            norm: LayerNorm::new(d, cfg.norm_eps, backend, vb.pp("norm"))?,
            decoder_embed: linear(d, dd, backend, vb.pp("decoder_embed"))?,
            mask_token,
            decoder_pos_embed: crate::vit::pos_table(dd, cfg.grid(), &vb)?,
            decoder_blocks,
            decoder_norm: LayerNorm::new(dd, cfg.norm_eps, backend, vb.pp("decoder_norm"))?,
            decoder_pred: linear(dd, cfg.patch_dim(), backend, vb.pp("decoder_pred"))?,
            backend,
        })
    }

    /// The backend this model computes on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The encoder (shared with [`crate::VitClassifier`]).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// A freshly initialised model (MAE's init) in `varmap`, reproducible from `seed`.
    pub fn init(cfg: &MaeConfig, varmap: &VarMap, seed: u64, dev: &Device) -> Result<Self> {
        let backend = Backend::resolve(crate::Kernels::Auto, dev, DType::F32)
            .map_err(candle_core::Error::wrap)?;
        Self::init_on(cfg, backend, varmap, seed, dev)
    }

    /// [`init`](Self::init) on a given backend (f32 weights: [`Backend::for_training`] picks
    /// mixed precision).
    pub fn init_on(
        cfg: &MaeConfig,
        backend: Backend,
        varmap: &VarMap,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, dev);
        let model = Self::new_on(cfg, backend, vb)?;
        reinit_seeded(cfg, varmap, seed)?;
        Ok(model)
    }

    /// Load a checkpoint with MAE's parameter names (ours, or an official MAE/LMD state dict
    /// converted to safetensors) into a fresh, trainable `VarMap`. Every parameter must be in
    /// the file with the right shape; extra tensors (optimizer state, a classifier head) are
    /// ignored. The stored positional tables are checked against the computed ones.
    pub fn load(
        cfg: &MaeConfig,
        path: &std::path::Path,
        dev: &Device,
    ) -> crate::Result<(Self, VarMap)> {
        let werr = |detail: String| crate::Error::Weights {
            path: path.to_path_buf(),
            detail,
        };
        let tensors = crate::checkpoint::read_tensors(path, dev)?;
        let varmap = VarMap::new();
        let model = Self::init(cfg, &varmap, 0, dev)?;
        set_vars(&varmap, &tensors, path, |_| true)?;
        for (name, buf) in model.buffers() {
            if let Some(t) = tensors.get(name) {
                let d = (t.to_dtype(DType::F32)? - buf)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                if d > 1e-4 {
                    return Err(werr(format!(
                        "{name} differs from the fixed 2D sin-cos table by {d}"
                    )));
                }
            }
        }
        Ok((model, varmap))
    }

    /// Initialise from a checkpoint (safetensors or `.pth`, see [`crate::checkpoint`]) before
    /// training: every encoder parameter must be in the file with its shape (else the error
    /// names it); the decoder is loaded when the file has one, else it keeps its fresh init
    /// (MAE's released checkpoints hold the encoder only). Returns the names loaded.
    pub fn init_from(&self, varmap: &VarMap, path: &std::path::Path) -> crate::Result<Vec<String>> {
        let tensors = crate::checkpoint::read_tensors(path, self.encoder.pos_embed().device())?;
        // the encoder and its final norm (MAE's released checkpoints hold both)
        let is_encoder = |n: &str| Encoder::owns(n) || n.starts_with("norm.");
        let mut names = set_vars(varmap, &tensors, path, is_encoder)?;
        if tensors.contains_key("decoder_embed.weight") {
            names.extend(set_vars(varmap, &tensors, path, |n| !is_encoder(n))?);
        }
        Ok(names)
    }

    /// Save parameters (from `varmap`) and the positional tables with MAE's names, atomically.
    pub fn save(&self, varmap: &VarMap, path: &std::path::Path) -> crate::Result<()> {
        save_varmap(varmap, self.buffers(), path)
    }

    pub fn config(&self) -> &MaeConfig {
        &self.cfg
    }

    /// The fixed positional tables, named as in MAE's state dict (for saving checkpoints).
    pub fn buffers(&self) -> Vec<(&'static str, Tensor)> {
        vec![
            ("pos_embed", self.encoder.pos_embed().clone()),
            ("decoder_pos_embed", self.decoder_pos_embed.clone()),
        ]
    }

    /// `[B, C, H, W]` -> `[B, L, p·p·C]`, ordered (p, q, c) as MAE's `patchify`.
    pub fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = x.dims4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = self.cfg.grid();
        x.reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 3, 5, 1))? // n h w p q c
            .reshape((b, gh * gw, p * p * c))
    }

    /// Inverse of [`patchify`](Self::patchify).
    pub fn unpatchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, _) = x.dims3()?;
        let (p, c) = (self.cfg.patch_size, self.cfg.in_chans);
        let (gh, gw) = self.cfg.grid();
        x.reshape((b, gh, gw, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))? // n c h p w q
            .reshape((b, c, gh * p, gw * p))
    }

    /// MAE's `random_masking` from given noise `[B, L]`: keep the `int(L(1-r))` smallest.
    pub fn masking_from_noise(&self, noise: &Tensor, mask_ratio: f64) -> Result<Masking> {
        let noise: Vec<Vec<f32>> = noise.to_dtype(DType::F32)?.to_vec2()?;
        let l = self.cfg.num_patches();
        let keep = ((l as f64) * (1.0 - mask_ratio)) as usize;
        if !(0.0..1.0).contains(&mask_ratio) || keep >= l {
            candle_core::bail!(
                "mask ratio {mask_ratio} keeps {keep} of L = {l} patches (MAE keeps int(L*(1-r))): \
                 it must mask at least one, else the loss (a mean over masked patches) is 0/0; \
                 use a ratio in (0, 1)"
            );
        }
        let mut ids_keep = Vec::with_capacity(noise.len());
        let mut ids_restore = Vec::with_capacity(noise.len());
        let mut mask = Vec::with_capacity(noise.len() * l);
        for row in &noise {
            if row.len() != l {
                candle_core::bail!("noise has {} columns, the model has {l} patches", row.len());
            }
            let mut shuffle: Vec<u32> = (0..l as u32).collect();
            // stable sort: ties keep index order, as torch.argsort on distinct floats
            shuffle.sort_by(|&a, &b| row[a as usize].total_cmp(&row[b as usize]));
            let mut restore = vec![0u32; l];
            for (pos, &id) in shuffle.iter().enumerate() {
                restore[id as usize] = pos as u32;
            }
            mask.extend(
                restore
                    .iter()
                    .map(|&r| if (r as usize) < keep { 0f32 } else { 1f32 }),
            );
            ids_keep.push(shuffle[..keep].to_vec());
            ids_restore.push(restore);
        }
        let mask = Tensor::from_vec(mask, (noise.len(), l), self.encoder.pos_embed().device())?;
        Ok(Masking {
            mask,
            ids_keep,
            ids_restore,
        })
    }

    /// Seeded uniform noise `[B, L]`: row `i` from the stream of sample `first + i` (see
    /// [`forward_at`](Self::forward_at)).
    pub fn noise(&self, batch: usize, seed: u64, first: u64) -> Result<Tensor> {
        let l = self.cfg.num_patches();
        let mut v: Vec<f32> = Vec::with_capacity(batch * l);
        for i in 0..batch as u64 {
            let mut rng = SplitMix::for_sample(seed, first + i);
            v.extend((0..l).map(|_| rng.uniform() as f32));
        }
        Tensor::from_vec(v, (batch, l), self.encoder.pos_embed().device())
    }

    /// Encoder on the kept tokens: `[B, 1 + keep, D]` (after the final norm).
    pub fn forward_encoder(&self, x: &Tensor, masking: &Masking) -> Result<Tensor> {
        let x = self.encoder.forward(x, Some(&masking.ids_keep), None)?;
        self.norm.forward(&x)
    }

    /// Decoder: `[B, 1 + keep, D]` -> `[B, L, p·p·C]`.
    pub fn forward_decoder(&self, latent: &Tensor, masking: &Masking) -> Result<Tensor> {
        let k = self.backend;
        let x = k.full(&self.decoder_embed.forward(latent)?)?;
        let (b, n1, dd) = x.dims3()?;
        let l = self.cfg.num_patches();
        let masked = l + 1 - n1;
        // ones ⊗ mask_token rather than a broadcast: the broadcast's backward is candle's sum
        // over the two leading dims (a slow strided reduction), the product's is one gemm
        let mask_tokens = Tensor::ones((b * masked, 1), x.dtype(), x.device())?
            .matmul(&self.mask_token.reshape((1, dd))?)?
            .reshape((b, masked, dd))?;
        let x_ = Tensor::cat(&[&x.i((.., 1..))?, &mask_tokens], 1)?; // [B, L, Dd] in shuffled order
        let x_ = gather_rows(&x_, &masking.ids_restore)?; // unshuffle
        let mut x =
            Tensor::cat(&[&x.i((.., ..1))?, &x_], 1)?.broadcast_add(&self.decoder_pos_embed)?;
        for blk in &self.decoder_blocks {
            x = blk.forward(&x)?;
        }
        let x = k.full(&self.decoder_pred.forward(&self.decoder_norm.forward(&x)?)?)?;
        x.i((.., 1..))
    }

    /// MSE over masked patches (per-patch normalised target when `norm_pix_loss`).
    pub fn forward_loss(&self, x: &Tensor, pred: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mut target = self.patchify(x)?;
        if self.cfg.norm_pix_loss {
            let n = target.dim(D::Minus1)? as f64;
            let mean = target.mean_keepdim(D::Minus1)?;
            let centred = target.broadcast_sub(&mean)?;
            let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / (n - 1.0))?; // unbiased, as torch.var
            target = centred.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
        }
        let per_patch = (pred - target)?.sqr()?.mean(D::Minus1)?; // [B, L]
        (per_patch * mask)?.sum_all()? / mask.sum_all()?.to_scalar::<f32>()? as f64
    }

    /// Full forward with explicit noise (MAE's `forward(imgs, mask_ratio)` with injected noise).
    pub fn forward_with_noise(
        &self,
        x: &Tensor,
        noise: &Tensor,
        mask_ratio: f64,
    ) -> Result<MaeOutput> {
        let masking = self.masking_from_noise(noise, mask_ratio)?;
        let latent = self.forward_encoder(x, &masking)?;
        let pred = self.forward_decoder(&latent, &masking)?;
        let loss = self.forward_loss(x, &pred, &masking.mask)?;
        Ok(MaeOutput {
            loss,
            pred,
            latent,
            masking,
        })
    }

    /// Full forward with noise drawn from `seed` (the batch's samples numbered from 0).
    pub fn forward(&self, x: &Tensor, mask_ratio: f64, seed: u64) -> Result<MaeOutput> {
        self.forward_at(x, mask_ratio, seed, 0)
    }

    /// Full forward with each sample's noise drawn from `(seed, first + i)`: `first` is the
    /// batch's global position (data-parallel ranks pass their offset in the global batch, so
    /// the masks do not depend on the number of ranks).
    pub fn forward_at(
        &self,
        x: &Tensor,
        mask_ratio: f64,
        seed: u64,
        first: u64,
    ) -> Result<MaeOutput> {
        let noise = self.noise(x.dim(0)?, seed, first)?;
        self.forward_with_noise(x, &noise, mask_ratio)
    }

    /// Encoder-only features for downstream use: `[B, D]`. `Pool::Cls` takes the normalised cls
    /// token; `Pool::Mean` averages the patch tokens before the final norm and applies
    /// `fc_norm` (weight, bias) — MAE fine-tuning's `global_pool`.
    pub fn forward_features(
        &self,
        x: &Tensor,
        pool: Pool,
        fc_norm: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let x = self.encoder.forward(x, None, None)?;
        match pool {
            Pool::Cls => self.norm.forward(&x)?.i((.., 0)),
            Pool::Mean => {
                let pooled = x.i((.., 1..))?.mean(1)?;
                match fc_norm {
                    Some((w, bias)) => self.backend.layer_norm(&pooled, w, bias, self.cfg.norm_eps),
                    None => self.norm.forward(&pooled),
                }
            }
        }
    }
}

/// MAE's `initialize_weights`, from `seed`: xavier_uniform for Linear weights and the patch
/// projection (as a Linear), normal(0.02) for cls/mask tokens, LayerNorm 1/0, biases 0.
/// Variables are visited in name order, so the result does not depend on hash order.
pub fn reinit_seeded(cfg: &MaeConfig, varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = SplitMix(seed);
    let _ = cfg;
    for name in names {
        let var = &data[name];
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let dims = shape.dims();
        let vals: Vec<f32> = if name.ends_with("cls_token") || name.ends_with("mask_token") {
            (0..n).map(|_| (rng.normal() * 0.02) as f32).collect()
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.ends_with(".weight") && dims.len() == 1 {
            vec![1.0; n] // LayerNorm
        } else if name.ends_with(".weight") {
            let fan_out = dims[0];
            let fan_in = n / fan_out;
            let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
            (0..n)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                .collect()
        } else {
            continue;
        };
        let t = Tensor::from_vec(vals, shape, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_macs_give_the_papers_counts_for_pixel_and_latent_vit_b() {
        let b = MaeConfig::base();
        let pixel = b.on_input(3, 224, 16);
        let latent = b.on_input(4, 28, 4);
        assert_eq!((pixel.num_patches(), latent.num_patches()), (196, 49));
        assert_eq!(
            (pixel.kept_tokens(0.75), latent.kept_tokens(0.75)),
            (49, 12)
        );
        let g = |c: &MaeConfig, r: f64| c.train_macs(r) / 1e9;
        // the counts issue #19 quotes: ~28.7, ~7.2 and ~9.6 GMAC per sample
        assert!(
            (28.0..30.0).contains(&g(&pixel, 0.75)),
            "{}",
            g(&pixel, 0.75)
        );
        assert!(
            (6.8..7.6).contains(&g(&latent, 0.75)),
            "{}",
            g(&latent, 0.75)
        );
        assert!(
            (9.0..10.2).contains(&g(&latent, 0.55)),
            "{}",
            g(&latent, 0.55)
        );
        // a hand count: one block each, width 4 (decoder 4), L = 4, p·p·C = 4, ratio 0.5
        let t = MaeConfig {
            in_chans: 1,
            img_size: [4, 4],
            patch_size: 2,
            embed_dim: 4,
            depth: 1,
            num_heads: 1,
            decoder_embed_dim: 4,
            decoder_depth: 1,
            decoder_num_heads: 1,
            mlp_ratio: 4.0,
            norm_pix_loss: true,
            norm_eps: 1e-6,
        };
        // embed 4·4·4 = 64; encoder N = 3: 12·3·16 + 2·9·4 = 648; decoder embed 3·16 = 48,
        // block N = 5: 12·5·16 + 2·25·4 = 1160, pred 5·4·4 = 80
        assert_eq!(t.forward_macs(0.5), (64 + 648 + 48 + 1160 + 80) as f64);
    }

    #[test]
    fn masking_noise_depends_on_the_samples_global_position_not_on_the_batch_split() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let cfg = crate::Preset::Tiny.config();
        let m = LatentMae::init(&cfg, &vm, 0, &dev).unwrap();
        let whole: Vec<Vec<f32>> = m.noise(4, 9, 100).unwrap().to_vec2().unwrap();
        let a: Vec<Vec<f32>> = m.noise(2, 9, 100).unwrap().to_vec2().unwrap();
        let b: Vec<Vec<f32>> = m.noise(2, 9, 102).unwrap().to_vec2().unwrap();
        assert_eq!(whole, [a, b].concat());
        assert_ne!(whole[0], whole[1]);
        let other: Vec<Vec<f32>> = m.noise(1, 10, 100).unwrap().to_vec2().unwrap();
        assert_ne!(whole[0], other[0]);
    }
}
