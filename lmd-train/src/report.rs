//! What a run leaves to look at: reconstruction previews (PNG) and training curves (SVG).
//!
//! - [`reconstruction_grid`]: one row per sample, four panels: the input, the input with the
//!   masked patches greyed out, the model's prediction of every patch, and the prediction
//!   with the visible patches pasted back (MAE's visualisation). With a VAE the panels are
//!   decoded to pixels; without one the latent's first three channels are shown as false colour
//!   (normalised per sample, upscaled 8x with nearest neighbour) so a preview always exists.
//!   With `norm_pix_loss` the prediction is un-normalised with each target patch's own mean and
//!   variance, as MAE's visualisation does. Pixel-MAE inputs are shown as RGB, un-normalised.
//! - [`plot_curves`]: loss, mask ratio and learning rate against the step, from `metrics.jsonl`
//!   lines, as an SVG with three stacked panels (`plotters`, SVG backend: no font files needed).

use crate::metrics::Metrics;
use crate::{Error, Result};
use lmd_model::candle::{DType, Tensor, D};
use lmd_model::vae::Vae;
use lmd_model::LatentMae;
use std::path::Path;

const GAP: u32 = 4;

/// The four panels as `[N, C, H, W]` latents plus the `[N, 1, H, W]` mask (1 = masked).
pub struct Reconstruction {
    pub input: Tensor,
    pub prediction: Tensor,
    pub pasted: Tensor,
    pub mask: Tensor,
    pub loss: f64,
}

/// Run the model on `x` `[N, C, H, W]` at `ratio` with masking noise from `seed`.
pub fn reconstruct(model: &LatentMae, x: &Tensor, ratio: f64, seed: u64) -> Result<Reconstruction> {
    let cfg = model.config().clone();
    let out = model.forward(x, ratio, seed)?;
    let mut pred = out.pred.detach();
    if cfg.norm_pix_loss {
        let target = model.patchify(x)?;
        let n = target.dim(D::Minus1)? as f64;
        let mean = target.mean_keepdim(D::Minus1)?;
        let var = (target
            .broadcast_sub(&mean)
            .and_then(|c| c.sqr())
            .and_then(|c| c.sum_keepdim(D::Minus1))?
            / (n - 1.0))?;
        let std = (var + 1e-6).and_then(|v| v.sqrt())?;
        pred = pred
            .broadcast_mul(&std)
            .and_then(|p| p.broadcast_add(&mean))?;
    }
    let prediction = model.unpatchify(&pred)?;
    let (b, l) = out.masking.mask.dims2()?;
    let pdim = cfg.patch_dim();
    let mask_patches = out
        .masking
        .mask
        .reshape((b, l, 1))
        .and_then(|t| t.broadcast_as((b, l, pdim)))
        .and_then(|t| t.contiguous())?;
    let mask_full = model.unpatchify(&mask_patches)?; // [N, C, H, W]
    let pasted = (x.broadcast_mul(&(1.0 - &mask_full)?))
        .and_then(|v| v + prediction.broadcast_mul(&mask_full)?)?;
    let mask = mask_full.narrow(1, 0, 1)?;
    Ok(Reconstruction {
        input: x.clone(),
        prediction,
        pasted,
        mask,
        loss: out.loss.to_scalar::<f32>()? as f64,
    })
}

/// How a preview shows the model's input.
pub enum Render<'a> {
    /// Latents decoded to pixels by their VAE.
    Vae(&'a dyn Vae),
    /// Latent channels 0-2 as false colour.
    FalseColour,
    /// Normalised RGB pixels (pixel MAE): `x · std + mean` per channel.
    Pixels { mean: [f32; 3], std: [f32; 3] },
}

/// `[N, C, h, w]` model inputs -> RGB in [0, 1], each `[3, H, W]`: pixels un-normalised, a VAE
/// decode (`8h x 8w`), or false colour normalised with the per-sample, per-channel range of
/// `reference` (upscaled 8x).
fn to_rgb(z: &Tensor, reference: &Tensor, render: &Render) -> Result<Vec<Vec<f32>>> {
    let (n, c, h, w) = z.dims4()?;
    if let Render::Pixels { mean, std } = render {
        let flat: Vec<f32> = z.flatten_all().and_then(|t| t.to_vec1())?;
        let plane = h * w;
        return Ok(flat
            .chunks(c * plane)
            .map(|img| {
                img.iter()
                    .enumerate()
                    .map(|(j, v)| {
                        let ch = (j / plane).min(2);
                        (v * std[ch] + mean[ch]).clamp(0.0, 1.0)
                    })
                    .collect()
            })
            .collect());
    }
    if let Render::Vae(v) = render {
        let img = v.decode(z)?;
        let (_, _, ih, iw) = img.dims4()?;
        let flat: Vec<f32> = img
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())?;
        let per = 3 * ih * iw;
        return Ok(flat.chunks(per).map(|s| s.to_vec()).collect());
    }
    let zs: Vec<f32> = z.flatten_all().and_then(|t| t.to_vec1())?;
    let rs: Vec<f32> = reference.flatten_all().and_then(|t| t.to_vec1())?;
    let (oh, ow) = (h * 8, w * 8);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut img = vec![0f32; 3 * oh * ow];
        for ch in 0..3 {
            let src = ch.min(c - 1);
            let base = (i * c + src) * h * w;
            let r = &rs[base..base + h * w];
            let (lo, hi) = r
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let span = (hi - lo).max(1e-6);
            for y in 0..oh {
                for x in 0..ow {
                    let v = (zs[base + (y / 8) * w + x / 8] - lo) / span;
                    img[(ch * oh + y) * ow + x] = v.clamp(0.0, 1.0);
                }
            }
        }
        out.push(img);
    }
    Ok(out)
}

/// The preview image of [`reconstruct`]'s output: rows = samples; columns = input | masked |
/// prediction | prediction with the visible patches.
pub fn reconstruction_grid(r: &Reconstruction, render: &Render) -> Result<image::RgbImage> {
    let (n, _, h, w) = r.input.dims4()?;
    let input = to_rgb(&r.input, &r.input, render)?;
    let pred = to_rgb(&r.prediction, &r.input, render)?;
    let pasted = to_rgb(&r.pasted, &r.input, render)?;
    let mask: Vec<f32> = r.mask.flatten_all().and_then(|t| t.to_vec1())?;
    let px = input[0].len() / 3;
    let scale = ((px / (h * w)) as f64).sqrt().round() as usize; // pixels per latent cell
    let (ih, iw) = (h * scale, w * scale);
    let (cols, rows) = (4u32, n as u32);
    let (cw, chh) = (iw as u32, ih as u32);
    let mut img = image::RgbImage::from_pixel(
        cols * cw + (cols + 1) * GAP,
        rows * chh + (rows + 1) * GAP,
        image::Rgb([255, 255, 255]),
    );
    for i in 0..n {
        let masked: Vec<f32> = (0..3 * ih * iw)
            .map(|j| {
                let (y, x) = ((j / iw) % ih, j % iw);
                if mask[i * h * w + (y / scale) * w + x / scale] > 0.5 {
                    0.5
                } else {
                    input[i][j]
                }
            })
            .collect();
        for (col, panel) in [&input[i], &masked, &pred[i], &pasted[i]]
            .into_iter()
            .enumerate()
        {
            let (ox, oy) = (GAP + col as u32 * (cw + GAP), GAP + i as u32 * (chh + GAP));
            for y in 0..ih {
                for x in 0..iw {
                    let px = |ch: usize| {
                        (panel[(ch * ih + y) * iw + x].clamp(0.0, 1.0) * 255.0).round() as u8
                    };
                    img.put_pixel(
                        ox + x as u32,
                        oy + y as u32,
                        image::Rgb([px(0), px(1), px(2)]),
                    );
                }
            }
        }
    }
    Ok(img)
}

/// Write an image as PNG through a temporary file and a rename.
pub fn save_png(img: &image::RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Invalid(format!("{}: PNG encoding: {e}", path.display())))?;
    lmd_data::shard::writer::write_atomic(path, &bytes)?;
    Ok(())
}

/// One panel of a curve plot: a y label and `(x, y)` points.
pub type Panel = (String, Vec<(f64, f64)>);

/// Stacked line panels sharing an x axis (`x_desc`), as an SVG document.
pub fn panels_svg(title: &str, x_desc: &str, panels: &[Panel]) -> Result<String> {
    use plotters::prelude::*;
    let colours = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    let mut svg = String::new();
    {
        let height = 240 * panels.len().max(1) as u32;
        let root = SVGBackend::with_string(&mut svg, (900, height)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| Error::Invalid(format!("plot: {e}"));
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = root
            .titled(title, ("sans-serif", 20))
            .map_err(|e| err(&e))?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        let x_max = panels
            .iter()
            .flat_map(|p| p.1.iter().map(|q| q.0))
            .fold(1f64, f64::max);
        for (i, (area, (name, pts))) in areas.iter().zip(panels).enumerate() {
            let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.1.is_finite()).collect();
            let (lo, hi) = pts
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let (lo, hi) = if pts.is_empty() {
                (0.0, 1.0)
            } else if hi - lo < 1e-12 {
                (lo - 0.5 * lo.abs().max(1e-3), hi + 0.5 * hi.abs().max(1e-3))
            } else {
                (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
            };
            let mut chart = ChartBuilder::on(area)
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..x_max, lo..hi)
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(name.as_str())
                .draw()
                .map_err(|e| err(&e))?;
            let colour = colours[i % colours.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
                .map_err(|e| err(&e))?;
            if pts.len() <= 50 {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                    .map_err(|e| err(&e))?;
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// Several named lines in one chart (`x_desc` against `y_desc`), with a legend, as SVG.
pub fn series_svg(title: &str, x_desc: &str, y_desc: &str, series: &[Panel]) -> Result<String> {
    use plotters::prelude::*;
    let colours = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    let err = |e: &dyn std::fmt::Display| Error::Invalid(format!("plot: {e}"));
    let pts = series
        .iter()
        .flat_map(|s| s.1.iter())
        .filter(|p| p.1.is_finite());
    let x_max = pts.clone().map(|p| p.0).fold(1f64, f64::max);
    let y_max = pts.map(|p| p.1).fold(0f64, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max * 1.02, 0f64..(y_max * 1.1).max(1e-3))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let colour = colours[i % colours.len()];
            let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.1.is_finite()).collect();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// Loss, mask ratio and lr against the step as an SVG document (three stacked panels).
pub fn curves_svg(title: &str, lines: &[Metrics]) -> Result<String> {
    let series = |f: fn(&Metrics) -> f64| -> Vec<(f64, f64)> {
        lines.iter().map(|l| (l.step as f64, f(l))).collect()
    };
    panels_svg(
        title,
        "step",
        &[
            ("loss".into(), series(|l| l.loss)),
            ("mask ratio".into(), series(|l| l.mask_ratio)),
            ("learning rate".into(), series(|l| l.lr)),
        ],
    )
}

/// Read `metrics.jsonl` lines (ignoring any that do not parse, e.g. a torn last line).
pub fn read_metrics(path: &Path) -> Result<Vec<Metrics>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read", e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// [`curves_svg`] of `metrics.jsonl`, written atomically to `out`.
pub fn plot_curves(metrics_jsonl: &Path, title: &str, out: &Path) -> Result<()> {
    let lines = read_metrics(metrics_jsonl)?;
    let svg = curves_svg(title, &lines)?;
    lmd_data::shard::writer::write_atomic(out, svg.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(step: u64, loss: f64) -> Metrics {
        Metrics {
            step,
            epoch: 0,
            loss,
            mask_ratio: 0.15 + step as f64 * 0.01,
            lr: 1e-4,
            grad_norm: 1.0,
            samples_per_s: 10.0,
            data_wait_fraction: 0.0,
            comm_fraction: 0.0,
        }
    }

    #[test]
    fn curves_svg_has_three_panels_and_all_points() {
        let lines: Vec<Metrics> = (1..=20).map(|s| line(s, 1.0 / s as f64)).collect();
        let svg = curves_svg("run", &lines).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50]);
        for label in ["loss", "mask ratio", "learning rate", "step", "run"] {
            assert!(svg.contains(label), "missing {label}");
        }
        // one polyline per panel with all 20 points (grid lines are 2-point polylines), and
        // markers for short series
        assert_eq!(svg.matches("<circle").count(), 60);
        let series = svg
            .split("<polyline")
            .skip(1)
            .filter(|p| {
                let pts = p
                    .split("points=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap();
                pts.split_whitespace().count() == 20
            })
            .count();
        assert_eq!(series, 3);
        // a constant series (the lr here) and an empty run still plot
        assert!(curves_svg("empty", &[]).unwrap().contains("<svg"));
    }
}
