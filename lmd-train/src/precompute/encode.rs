//! Stage 3, encode: batches of prepared images through the VAE, one record (every variant,
//! every stored field, in layout order) per image, on its own thread between the decode
//! pipeline and the writer.
//!
//! Overlap: on a GPU candle queues kernels and returns, and only the copy of the latents back
//! to the host waits. So this stage stages batch `n + 1` (gathers its pixels into one host
//! buffer and queues the copy to the device) *before* it waits for batch `n`'s latents: the
//! host work of the next batch runs while the device encodes the current one. The writer runs
//! on another thread, behind a queue of [`ENCODED_QUEUE`] batches, so shard writing and uploads
//! overlap both. On the CPU every op runs at once and the order changes nothing.
//!
//! Busy time: the device's busy span of a batch is taken from its launch to its latents being
//! on the host. Launches follow the previous batch's copy back, so the spans never overlap, and
//! when no decoded batch is ready the batch in flight is read back before the stage waits, so
//! no span holds a wait for data. Their sum over the wall time is the device's busy fraction
//! (on a GPU an upper bound: the span also holds the staging of the next batch, which the
//! device may outlast).
//!
//! Order: batches and failure lines leave in the order they came (a failure line waits for
//! the batch in flight), so the writer's resume points are what they would be without overlap.

use std::sync::mpsc::SyncSender;
use std::time::Instant;

use lmd_data::pipeline::{Batch, Prepared};
use lmd_data::shard::{Field, RecordLayout};
use lmd_model::candle::{DType, Device, Tensor};
use lmd_model::vae::Encoded as Latents;

use super::plan::Plan;
use super::ReportLine;
use crate::{Error, Result};

/// Encoded batches queued for the writer.
pub(super) const ENCODED_QUEUE: usize = 2;

/// What the encode stage hands the writer, in input order.
pub(super) enum Encoded {
    /// A batch and its records (one per item).
    Batch(Batch, Vec<Vec<f32>>),
    /// An input shard that failed part-way, or an input that could not be opened.
    Failed(ReportLine),
}

/// The encode stage's timings.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct EncodeTimes {
    /// Seconds the VAE's device was busy (launch to latents on the host, summed).
    pub(super) busy_s: f64,
    /// Seconds this stage waited for decoded batches.
    pub(super) wait_s: f64,
    /// Images (variants counted) through the VAE.
    pub(super) images: usize,
}

/// A batch launched on the device, its latents not yet read back.
struct InFlight {
    batch: Batch,
    latents: Latents,
    launched: Instant,
}

/// The VAE side of a job.
pub(super) struct Encoder<'a> {
    plan: &'a Plan,
    times: EncodeTimes,
    in_flight: Option<InFlight>,
}

impl<'a> Encoder<'a> {
    pub(super) fn new(plan: &'a Plan) -> Self {
        Encoder {
            plan,
            times: EncodeTimes::default(),
            in_flight: None,
        }
    }

    /// Run the stage: the decode pipeline's output to `out`, until the input ends or the
    /// writer hangs up (then it stops early and returns what it timed). When no decoded batch
    /// is ready, the batch in flight is read back and handed over before this stage waits, so
    /// the device's busy spans never include a wait for data.
    pub(super) fn run(
        mut self,
        pipeline: lmd_data::pipeline::Pipeline,
        out: &SyncSender<Encoded>,
    ) -> Result<EncodeTimes> {
        use lmd_data::pipeline::PipelineItem;
        let rx = pipeline.receiver();
        loop {
            let item = match rx.try_recv() {
                Ok(item) => item,
                Err(e) if e.is_closed() => break,
                Err(_) => {
                    if !self.drain(out)? {
                        return Ok(self.times);
                    }
                    let t_wait = Instant::now();
                    let item = rx.recv_blocking();
                    self.times.wait_s += t_wait.elapsed().as_secs_f64();
                    match item {
                        Ok(item) => item,
                        Err(_) => break,
                    }
                }
            };
            let sent = match item {
                PipelineItem::Batch(b) => self.launch(b, out)?,
                PipelineItem::ShardFailed(f) => {
                    self.send_failure(super::commit::failure_line(f), out)?
                }
                PipelineItem::InputFailed(m) => {
                    self.send_failure(ReportLine::InputFailed { message: m }, out)?
                }
            };
            if !sent {
                return Ok(self.times);
            }
        }
        self.drain(out)?;
        Ok(self.times)
    }

    /// Stage `b` on the device, then hand over the batch before it, then launch `b`'s encode.
    /// False when the writer has hung up.
    fn launch(&mut self, b: Batch, out: &SyncSender<Encoded>) -> Result<bool> {
        if b.items.is_empty() {
            // skips only: keep them in order behind the batch in flight
            return Ok(self.drain(out)? && out.send(Encoded::Batch(b, Vec::new())).is_ok());
        }
        let x = self.stage(&b.items)?;
        if !self.drain(out)? {
            return Ok(false);
        }
        let launched = Instant::now();
        let latents = self.plan.vae.encode(&x)?;
        self.in_flight = Some(InFlight {
            batch: b,
            latents,
            launched,
        });
        Ok(true)
    }

    fn send_failure(&mut self, line: ReportLine, out: &SyncSender<Encoded>) -> Result<bool> {
        Ok(self.drain(out)? && out.send(Encoded::Failed(line)).is_ok())
    }

    /// Read back the batch in flight (waiting for the device) and hand it to the writer.
    fn drain(&mut self, out: &SyncSender<Encoded>) -> Result<bool> {
        let Some(f) = self.in_flight.take() else {
            return Ok(true);
        };
        let p = self.plan;
        let records = records(
            &f.latents,
            f.batch.items.len(),
            &p.meta.layout,
            p.meta.record_elems(),
            p.transform.variants(),
        )?;
        self.times.busy_s += f.launched.elapsed().as_secs_f64();
        self.times.images += f.batch.items.len() * p.transform.variants();
        Ok(out.send(Encoded::Batch(f.batch, records)).is_ok())
    }

    /// Every variant of every image in one host buffer of u8, copied to the device (a quarter
    /// of the f32 bytes) and brought to the VAE's input range there.
    fn stage(&self, items: &[Prepared]) -> Result<Tensor> {
        let p = self.plan;
        let s = p.transform.size as usize;
        let mut flat = Vec::with_capacity(items.len() * p.transform.values_per_image());
        for it in items {
            flat.extend_from_slice(&it.pixels);
        }
        let n = items.len() * p.transform.variants();
        let x = unit_on_device(flat, (n, 3, s, s), &p.device)?;
        Ok(p.vae.input_range().from_unit(&x)?)
    }
}

/// u8 pixels to f32 in [0, 1] on `dev`: moved as u8, converted and divided by 255 there, so
/// each value is `lmd_data::transform::unit`'s (an exact f32 division, not a multiplication
/// by 1/255, which rounds differently).
fn unit_on_device(
    px: Vec<u8>,
    shape: (usize, usize, usize, usize),
    dev: &Device,
) -> Result<Tensor> {
    let x = Tensor::from_vec(px, shape, dev)?.to_dtype(DType::F32)?;
    Ok(x.broadcast_div(&Tensor::new(255f32, dev)?)?)
}

/// The records of `n` images from their latents: per image, every variant's stored fields in
/// layout order.
fn records(
    enc: &Latents,
    n: usize,
    layout: &RecordLayout,
    rec_elems: usize,
    variants: usize,
) -> Result<Vec<Vec<f32>>> {
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
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_staged_as_u8_become_the_hosts_unit_values_exactly() {
        let px: Vec<u8> = (0..2 * 3 * 4 * 4).map(|i| (i * 37 % 256) as u8).collect();
        let mut all: Vec<u8> = (0..=255).collect();
        all.extend_from_slice(&px);
        let x = unit_on_device(all.clone(), (1, 1, 1, all.len()), &Device::Cpu).unwrap();
        let got: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let want = lmd_data::transform::unit_f32(&all);
        // bit for bit: latents do not change with how the pixels travel
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{got:?}"
        );
        assert_eq!(x.dims(), [1, 1, 1, all.len()]);
    }
}
