//! TAESD (madebyollin/taesd): a tiny conv autoencoder with SD's latent space.
//!
//! Weight names are plain `nn.Sequential` indices (see `$LMD_SHARED/README.md`). Encoder: conv
//! 3->64, Blocks, three stride-2 convs (no bias), conv 64->4. Decoder: `tanh(z/3)*3`, conv 4->64,
//! ReLU, Blocks with 2x nearest upsampling + conv (no bias), conv 64->3. A Block is
//! `relu(conv(relu(conv(relu(conv(x))))) + x)`. RGB in [0, 1]; latents already scaled (factor 1).

use super::{
    build_err, load_tensors, sha256_file, Conv, Encoded, InputRange, Vae, VaeId, WeightHash,
};
use crate::{Backend, Precision, Result};
use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;
use std::path::Path;

const C: usize = 64;

fn conv(
    backend: Backend,
    cin: usize,
    cout: usize,
    stride: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Conv> {
    Conv::new(cin, cout, (3, stride, 1), bias, backend, vb)
}

#[derive(Debug, Clone)]
struct Block {
    c0: Conv,
    c2: Conv,
    c4: Conv,
}

impl Block {
    fn new(backend: Backend, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Block {
            c0: conv(backend, C, C, 1, true, vb.pp("conv.0"))?,
            c2: conv(backend, C, C, 1, true, vb.pp("conv.2"))?,
            c4: conv(backend, C, C, 1, true, vb.pp("conv.4"))?,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.c0.forward(x)?.relu()?;
        let h = self.c2.forward(&h)?.relu()?;
        (self.c4.forward(&h)? + x)?.relu()
    }
}

enum Layer {
    Conv(Conv),
    ConvRelu(Conv),
    Block(Block),
    Upsample,
}

impl Layer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Layer::Conv(c) => c.forward(x),
            Layer::ConvRelu(c) => c.forward(x)?.relu(),
            Layer::Block(b) => b.forward(x),
            Layer::Upsample => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(2 * h, 2 * w)
            }
        }
    }
}

/// TAESD encoder + decoder.
pub struct Taesd {
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
    id: VaeId,
    /// The weights' dtype, which `encode`/`decode` compute in (f32 in, f32 out).
    dtype: candle_core::DType,
}

/// Encoder layer indices that are Blocks; 2, 6, 10 are stride-2 convs; 0 and 14 plain convs.
const ENC_BLOCKS: [usize; 10] = [1, 3, 4, 5, 7, 8, 9, 11, 12, 13];
/// Decoder layer indices that are Blocks; 6, 11, 16 upsample; 7, 12, 17 convs without bias.
const DEC_BLOCKS: [usize; 10] = [3, 4, 5, 8, 9, 10, 13, 14, 15, 18];

fn build_encoder(backend: Backend, enc: VarBuilder) -> candle_core::Result<Vec<Layer>> {
    let mut encoder = Vec::new();
    for i in 0..15 {
        let vb = enc.pp(i.to_string());
        encoder.push(match i {
            0 => Layer::Conv(conv(backend, 3, C, 1, true, vb)?),
            2 | 6 | 10 => Layer::Conv(conv(backend, C, C, 2, false, vb)?),
            14 => Layer::Conv(conv(backend, C, 4, 1, true, vb)?),
            i if ENC_BLOCKS.contains(&i) => Layer::Block(Block::new(backend, vb)?),
            _ => unreachable!("all 15 encoder indices are covered"),
        });
    }
    Ok(encoder)
}

fn build_decoder(backend: Backend, dec: VarBuilder) -> candle_core::Result<Vec<Layer>> {
    let mut decoder = Vec::new();
    for i in 1..20 {
        let vb = dec.pp(i.to_string());
        decoder.push(match i {
            1 => Layer::ConvRelu(conv(backend, 4, C, 1, true, vb)?),
            2 => continue, // the ReLU, folded into layer 1
            6 | 11 | 16 => Layer::Upsample,
            7 | 12 | 17 => Layer::Conv(conv(backend, C, C, 1, false, vb)?),
            19 => Layer::Conv(conv(backend, C, 3, 1, true, vb)?),
            i if DEC_BLOCKS.contains(&i) => Layer::Block(Block::new(backend, vb)?),
            _ => unreachable!("all decoder indices are covered"),
        });
    }
    Ok(decoder)
}

impl Taesd {
    /// Build from VarBuilders of the two files (any dtype on disk; compute in `enc`'s dtype).
    pub fn new(enc: VarBuilder, dec: VarBuilder, id: VaeId) -> candle_core::Result<Self> {
        let backend = Backend::of(&enc)?;
        let dtype = enc.dtype();
        Ok(Taesd {
            encoder: build_encoder(backend, enc)?,
            decoder: build_decoder(backend, dec)?,
            id,
            dtype,
        })
    }

    /// Load `taesd_encoder.safetensors` and `taesd_decoder.safetensors` from `dir`, in f32.
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        Self::load_in(dir, dev, Precision::F32)
    }

    /// [`load`](Self::load), computing in `precision` (inference: the weights in that dtype).
    pub fn load_in(dir: &Path, dev: &Device, precision: Precision) -> Result<Self> {
        let ep = dir.join("taesd_encoder.safetensors");
        let dp = dir.join("taesd_decoder.safetensors");
        let et = load_tensors(&ep, dev)?;
        let dt = load_tensors(&dp, dev)?;
        let id = VaeId {
            name: "taesd".into(),
            weights: vec![
                WeightHash {
                    file: "taesd_decoder.safetensors".into(),
                    sha256: sha256_file(&dp)?,
                },
                WeightHash {
                    file: "taesd_encoder.safetensors".into(),
                    sha256: sha256_file(&ep)?,
                },
            ],
        };
        let dtype = precision.dtype();
        let evb = VarBuilder::from_tensors(et, dtype, dev);
        let dvb = VarBuilder::from_tensors(dt, dtype, dev);
        let backend = Backend::of(&evb).map_err(|e| build_err(&ep, e))?;
        Ok(Taesd {
            encoder: build_encoder(backend, evb).map_err(|e| build_err(&ep, e))?,
            decoder: build_decoder(backend, dvb).map_err(|e| build_err(&dp, e))?,
            id,
            dtype,
        })
    }

    /// Raw encoder: `[B, 3, H, W]` in [0, 1] -> `[B, 4, H/8, W/8]`.
    pub fn encode_raw(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for l in &self.encoder {
            h = l.forward(&h)?;
        }
        Ok(h)
    }

    /// Raw decoder (no final clamp): latents -> `[B, 3, 8h, 8w]`, about [0, 1].
    pub fn decode_raw(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = ((z / 3.0)?.tanh()? * 3.0)?;
        for l in &self.decoder {
            h = l.forward(&h)?;
        }
        Ok(h)
    }
}

impl Vae for Taesd {
    fn encode(&self, x: &Tensor) -> Result<Encoded> {
        let f32 = candle_core::DType::F32;
        Ok(Encoded {
            latent: self.encode_raw(&x.to_dtype(self.dtype)?)?.to_dtype(f32)?,
            mean_logvar: None,
        })
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.decode_raw(&z.to_dtype(self.dtype)?)?;
        Ok(x.to_dtype(candle_core::DType::F32)?.clamp(0f32, 1f32)?)
    }

    fn input_range(&self) -> InputRange {
        InputRange::ZeroOne
    }

    fn scaling_factor(&self) -> f64 {
        1.0
    }

    fn latent_channels(&self) -> usize {
        4
    }

    fn id(&self) -> &VaeId {
        &self.id
    }
}
