//! VAEs: TAESD (tiny, CPU default) and Stable Diffusion's AutoencoderKL, behind one interface.
//!
//! [`Vae`] is what precompute and previews use: `encode` a batch of images (in the VAE's
//! [`InputRange`]) to latents already multiplied by the scaling factor (and the posterior
//! mean/logvar where the VAE has them), `decode` scaled latents back to images in [0, 1], and a
//! stable [`VaeId`] (name + sha256 of each weight file) for shard metadata and cache fingerprints.

pub mod hub;
pub mod kl;
pub mod taesd;

use crate::{Error, Result};
use candle_core::Tensor;
use std::path::Path;

pub use kl::{AutoencoderKl, KlConfig};
pub use taesd::Taesd;

/// Which VAE: `taesd` or `sd-vae` (also read: `sdvae`, `autoencoder-kl`), as settings, flags
/// and shard metadata name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum VaeKind {
    /// TAESD: tiny, the CPU default.
    #[default]
    #[serde(rename = "taesd")]
    Taesd,
    /// Stable Diffusion's AutoencoderKL (diffusers weights).
    #[serde(rename = "sd-vae", alias = "sdvae", alias = "autoencoder-kl")]
    SdVae,
}

impl VaeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VaeKind::Taesd => "taesd",
            VaeKind::SdVae => "sd-vae",
        }
    }
}

impl std::str::FromStr for VaeKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<VaeKind> {
        match s.trim() {
            "taesd" => Ok(VaeKind::Taesd),
            "sd-vae" | "sdvae" | "autoencoder-kl" => Ok(VaeKind::SdVae),
            other => Err(Error::Config(format!(
                "unknown VAE {other:?} (expected taesd or sd-vae)"
            ))),
        }
    }
}

impl std::fmt::Display for VaeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pixel range a VAE's encoder expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRange {
    /// RGB in [0, 1] (TAESD).
    ZeroOne,
    /// RGB in [-1, 1] (SD's AutoencoderKL).
    MinusOneOne,
}

impl InputRange {
    pub fn as_str(self) -> &'static str {
        match self {
            InputRange::ZeroOne => "[0,1]",
            InputRange::MinusOneOne => "[-1,1]",
        }
    }

    /// Map images in [0, 1] to this range.
    pub fn from_unit(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            InputRange::ZeroOne => x.clone(),
            InputRange::MinusOneOne => x.affine(2.0, -1.0)?,
        })
    }
}

/// A weight file and its sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightHash {
    pub file: String,
    pub sha256: String,
}

/// What identifies a VAE's latents: its name and the hashes of its weight files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaeId {
    pub name: String,
    pub weights: Vec<WeightHash>,
}

/// Result of encoding a batch.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `[B, C, h, w]` latents, scaled (the mean for KL VAEs; sample with [`Encoded::sample`]).
    pub latent: Tensor,
    /// Scaled posterior mean and (unscaled) log-variance, for KL VAEs.
    pub mean_logvar: Option<(Tensor, Tensor)>,
}

/// One interface over the VAEs.
pub trait Vae: Send + Sync {
    /// Encode images `[B, 3, H, W]` given in [`Vae::input_range`].
    fn encode(&self, x: &Tensor) -> Result<Encoded>;
    /// Decode scaled latents to images `[B, 3, H, W]` in [0, 1] (clamped).
    fn decode(&self, z: &Tensor) -> Result<Tensor>;
    fn input_range(&self) -> InputRange;
    /// The factor `encode` has applied to latents (and `decode` divides by).
    fn scaling_factor(&self) -> f64;
    fn latent_channels(&self) -> usize;
    /// Spatial downsampling factor (8 for both).
    fn downsample(&self) -> usize {
        8
    }
    fn id(&self) -> &VaeId;
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f =
        std::fs::File::open(path).map_err(|e| weights_err(path, format!("cannot open: {e}")))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| weights_err(path, format!("read: {e}")))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn weights_err(path: &Path, detail: String) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        detail,
    }
}

/// Load a safetensors file as f32 tensors, naming the file in any error.
pub(crate) fn load_tensors(
    path: &Path,
    dev: &candle_core::Device,
) -> Result<std::collections::HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(weights_err(path, "file not found".into()));
    }
    let t = candle_core::safetensors::load(path, dev)
        .map_err(|e| weights_err(path, format!("cannot read: {e}")))?;
    t.into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(candle_core::DType::F32)?)))
        .collect()
}

/// Wrap a candle error from building a model out of `path` (a missing tensor or a shape
/// mismatch): the message names the file, the tensor and the expected shape.
pub(crate) fn build_err(path: &Path, e: candle_core::Error) -> Error {
    weights_err(path, format!("does not fit the model: {e}"))
}

/// A convolution layer: 3x3 stride-1 padding-1 ones run on the backend's
/// [`conv3x3`](crate::Backend::conv3x3); others on candle's `conv2d`. Weights
/// `[Cout, Cin, k, k]` and optional bias, PyTorch names.
#[derive(Debug, Clone)]
pub(crate) struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    backend: crate::Backend,
}

impl Conv {
    pub(crate) fn new(
        cin: usize,
        cout: usize,
        (k, stride, padding): (usize, usize, usize),
        bias: bool,
        backend: crate::Backend,
        vb: candle_nn::VarBuilder,
    ) -> candle_core::Result<Self> {
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Conv {
            weight: vb.get_with_hints((cout, cin, k, k), "weight", init)?,
            bias: if bias {
                Some(vb.get_with_hints(cout, "bias", init)?)
            } else {
                None
            },
            stride,
            padding,
            backend,
        })
    }
}

impl candle_core::Module for Conv {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let k = self.weight.dim(2)?;
        if k == 3 && self.stride == 1 && self.padding == 1 {
            return self.backend.conv3x3(x, &self.weight, self.bias.as_ref());
        }
        let y = crate::backend::conv2d(x, &self.weight, self.padding, self.stride)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Open a VAE by name from a weights directory: `taesd` (`taesd_encoder.safetensors`,
/// `taesd_decoder.safetensors`) or `sd-vae` (a diffusers `vae/` folder: `config.json`,
/// `diffusion_pytorch_model.safetensors`). A path that does not exist but reads `OWNER/REPO`
/// (or `hf:OWNER/REPO[/SUBFOLDER]`) is fetched from the Hugging Face hub (see [`hub`]).
/// It computes in `precision` (f32 images in, f32 latents out whatever it is).
pub fn load_vae(
    kind: VaeKind,
    dir: &Path,
    dev: &candle_core::Device,
    precision: crate::Precision,
) -> Result<Box<dyn Vae>> {
    let resolved;
    let dir = if dir.is_dir() {
        dir
    } else {
        resolved = hub::resolve_weights(kind, &dir.to_string_lossy())?;
        resolved.as_path()
    };
    match kind {
        VaeKind::Taesd => Ok(Box::new(Taesd::load_in(dir, dev, precision)?)),
        VaeKind::SdVae => Ok(Box::new(AutoencoderKl::load_dir(dir, dev, precision)?)),
    }
}
