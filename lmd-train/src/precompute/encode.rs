//! Stage 3, encode: a batch of prepared images through the VAE, one record (every variant,
//! every stored field, in layout order) per image. The VAE's busy time is counted here.

use std::time::Instant;

use lmd_data::pipeline::Prepared;
use lmd_data::shard::{Field, RecordLayout};
use lmd_data::transform::TransformConfig;
use lmd_model::candle::{Device, Tensor};
use lmd_model::vae::Vae;

use super::plan::Plan;
use crate::{Error, Result};

/// The VAE side of a job.
pub(super) struct Encoder<'a> {
    plan: &'a Plan,
    /// Seconds inside the VAE.
    pub(super) busy_s: f64,
}

impl<'a> Encoder<'a> {
    pub(super) fn new(plan: &'a Plan) -> Self {
        Encoder { plan, busy_s: 0.0 }
    }

    /// The records of `items` (none for an empty batch).
    pub(super) fn encode(&mut self, items: &[Prepared]) -> Result<Vec<Vec<f32>>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let t0 = Instant::now();
        let p = self.plan;
        let out = encode_batch(
            p.vae.as_ref(),
            items,
            &p.transform,
            &p.device,
            &p.meta.layout,
            p.meta.record_elems(),
            p.transform.variants(),
        );
        self.busy_s += t0.elapsed().as_secs_f64();
        out
    }
}

/// Encode a batch: every variant of every image through the VAE; returns one record (all
/// tensors in layout order) per image.
fn encode_batch(
    vae: &dyn Vae,
    items: &[Prepared],
    tcfg: &TransformConfig,
    dev: &Device,
    layout: &RecordLayout,
    rec_elems: usize,
    variants: usize,
) -> Result<Vec<Vec<f32>>> {
    let s = tcfg.size as usize;
    let mut flat = Vec::with_capacity(items.len() * tcfg.values_per_image());
    for p in items {
        flat.extend_from_slice(&p.pixels);
    }
    let x = Tensor::from_vec(flat, (items.len() * variants, 3, s, s), dev)?;
    let x = vae.input_range().from_unit(&x)?;
    let enc = vae.encode(&x)?;
    let to_rows = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let per_tensor = rec_elems / layout.tensors();
    let mut field_data = Vec::new();
    for f in &layout.fields {
        let t = match (f, &enc.mean_logvar) {
            (Field::Latent, _) => &enc.latent,
            (Field::Mean, Some((mean, _))) => mean,
            (Field::Logvar, Some((_, lv))) => lv,
            _ => return Err(Error::Invalid(format!("the VAE gives no {f:?}"))),
        };
        field_data.push(to_rows(t)?);
    }
    let mut out = Vec::with_capacity(items.len());
    for i in 0..items.len() {
        let mut rec = Vec::with_capacity(rec_elems);
        for v in 0..variants {
            let row = i * variants + v;
            for fd in &field_data {
                rec.extend_from_slice(&fd[row * per_tensor..(row + 1) * per_tensor]);
            }
        }
        out.push(rec);
    }
    Ok(out)
}
