//! `lmd-bench vae` and `decode`: VAE throughput, and image decode + resize against Pillow.

use crate::{Error, Result};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `lmd-bench vae`.
#[derive(Debug, Clone)]
pub struct VaeBenchOptions {
    pub vae: lmd_model::vae::VaeKind,
    /// A weights directory, or `random` (sd-vae only): Stable Diffusion's sizes with random
    /// weights, for throughput where the real weights are not at hand.
    pub weights: PathBuf,
    pub batch: usize,
    pub size: usize,
    /// Minimum seconds to time each direction (after one warm-up batch).
    pub seconds: f64,
    /// Where it runs (`cuda:N` in a CUDA build).
    pub device: crate::DeviceSpec,
    /// The VAE's compute precision (f32 in and out whatever it is).
    pub precision: lmd_model::Precision,
}

/// Run `lmd-bench vae`: encode and decode throughput on random images, one JSON line.
pub fn vae(opts: &VaeBenchOptions, mut emit: impl FnMut(serde_json::Value)) -> Result<()> {
    use lmd_model::candle::Tensor;
    let dev = opts.device.open()?;
    let random = opts.weights.as_os_str() == "random";
    let vae = if random {
        random_vae(opts.vae, &dev, opts.precision)?
    } else {
        lmd_model::vae::load_vae(opts.vae, &opts.weights, &dev, opts.precision)?
    };
    let x = Tensor::rand(0f32, 1.0, (opts.batch, 3, opts.size, opts.size), &dev)?;
    let x = vae.input_range().from_unit(&x)?;
    let timed = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        f()?; // warm-up
        let t0 = Instant::now();
        let mut n = 0usize;
        while n == 0 || t0.elapsed().as_secs_f64() < opts.seconds {
            f()?;
            n += 1;
        }
        Ok((n * opts.batch) as f64 / t0.elapsed().as_secs_f64())
    };
    let z = vae.encode(&x)?.latent;
    // each call ends with the device drained, so GPU work is inside the timing
    let sync = || dev.synchronize().map_err(lmd_model::Error::from);
    let enc = timed(&|| Ok(vae.encode(&x).map(|_| ())?).and_then(|_| Ok(sync()?)))?;
    let dec = timed(&|| Ok(vae.decode(&z).map(|_| ())?).and_then(|_| Ok(sync()?)))?;
    emit(json!({
        "bench": "vae", "vae": opts.vae, "batch": opts.batch, "size": opts.size,
        "device": opts.device.to_string(), "precision": opts.precision,
        "weights": if random { "random" } else { "loaded" },
        "encode_images_per_s": enc, "decode_images_per_s": dec,
        "threads": lmd_model::candle::utils::get_num_threads(),
    }));
    Ok(())
}

/// Stable Diffusion's VAE at its real sizes with random weights (throughput only).
fn random_vae(
    kind: lmd_model::vae::VaeKind,
    dev: &lmd_model::candle::Device,
    precision: lmd_model::Precision,
) -> Result<Box<dyn lmd_model::vae::Vae>> {
    use lmd_model::vae::{AutoencoderKl, KlConfig, VaeId, VaeKind};
    if kind != VaeKind::SdVae {
        return Err(Error::Invalid(format!(
            "--vae-weights random is for sd-vae (its weights are large); {kind} needs its weights"
        )));
    }
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, precision.dtype(), dev);
    let id = VaeId {
        name: "sd-vae (random weights)".into(),
        weights: vec![],
    };
    Ok(Box::new(
        AutoencoderKl::new(&KlConfig::sd(), vb, id).map_err(lmd_model::Error::from)?,
    ))
}

/// Options of `lmd-bench decode`.
#[derive(Debug, Clone)]
pub struct DecodeBenchOptions {
    /// A shard pattern, an ILSVRC tar or an ImageFolder directory.
    pub input: String,
    /// Thread counts to measure (one JSON line each).
    pub threads: Vec<usize>,
    pub size: u32,
    /// Passes over the images per measurement.
    pub repeat: usize,
    /// `pillow_decode.py` to run on the same input in the same invocation (single tar inputs).
    pub pillow_anchor: Option<PathBuf>,
}

/// Run `lmd-bench decode`: decode + Resize(S) + CenterCrop(S) to CHW u8 (precompute's
/// decode workers) and to CHW f32 in [0, 1] (the same plus the host conversion), images/s.
pub fn decode(opts: &DecodeBenchOptions, mut emit: impl FnMut(serde_json::Value)) -> Result<()> {
    use lmd_data::source::{InputSpec, Labels, SourceEvent};
    use lmd_data::transform::TransformConfig;
    let spec = InputSpec::detect(&opts.input, None, None)?;
    let mut images = Vec::new();
    spec.read(Labels::Optional, &mut |ev| {
        if let SourceEvent::Sample(s) = ev {
            images.push((s.key, s.image));
        }
        true
    })?;
    if images.is_empty() {
        return Err(Error::Invalid(format!("{}: no images", opts.input)));
    }
    let cfg = TransformConfig {
        size: opts.size,
        ..Default::default()
    };
    let mut per_core_1 = None;
    let mut pixels: Vec<u64> = images
        .iter()
        .filter_map(|(_, b)| lmd_data::decode::decode_rgb8(b, u64::MAX).ok())
        .map(|i| i.width as u64 * i.height as u64)
        .collect();
    pixels.sort_unstable();
    let median_mpx = pixels[pixels.len() / 2] as f64 / 1e6;
    for &t in &opts.threads {
        let t = t.max(1);
        // the pipeline's CHW u8, and beside it the same conversion to CHW f32 in [0, 1] on the
        // host (what precompute did before it moved u8 to the VAE's device; Pillow's anchor
        // gives f32 too, so its ratio is taken on this one)
        let mut ips_of = [0f64; 2];
        for (i, f32_out) in [true, false].into_iter().enumerate() {
            let (ips, failed) = decode_rate(&images, &cfg, t, opts.repeat.max(1), f32_out);
            ips_of[i] = ips;
            if t == 1 && f32_out {
                per_core_1 = Some(ips);
            }
            emit(json!({
                "bench": "decode", "input": opts.input, "images": images.len(), "median_megapixels": median_mpx,
                "threads": t, "size": opts.size, "output": if f32_out { "chw-f32" } else { "chw-u8" },
                "images_per_s": ips, "images_per_s_per_thread": ips / t as f64,
                "jpeg_decoder": lmd_data::decode::JPEG_DECODER,
                "scaling_vs_1_thread": per_core_1.map(|b| ips / b / t as f64),
                "u8_vs_f32": (!f32_out).then(|| ips / ips_of[0]),
                "failed": failed,
            }));
        }
    }
    if let Some(anchor) = &opts.pillow_anchor {
        let out = std::process::Command::new("python3")
            .arg(anchor)
            .arg(&opts.input)
            .output()
            .map_err(|e| Error::io(anchor, "run", e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "pillow N images T s R images/s/core"
        let rate = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[1] == "images/s/core")
            .and_then(|w| w[0].parse::<f64>().ok());
        emit(json!({
            "bench": "decode", "baseline": "pillow", "input": opts.input, "threads": 1,
            "images_per_s": rate, "ours_per_core_vs_pillow": rate.and_then(|r| per_core_1.map(|o| o / r)),
            "stderr": String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""),
        }));
    }
    Ok(())
}

/// Images/s of `threads` threads decoding `images` `repeat` times (each thread its own
/// slice), to CHW u8 or, with `f32_out`, on to f32 in [0, 1]; and the images that failed.
fn decode_rate(
    images: &[(String, Vec<u8>)],
    cfg: &lmd_data::transform::TransformConfig,
    threads: usize,
    repeat: usize,
    f32_out: bool,
) -> (f64, usize) {
    use lmd_data::transform::{prepare, unit_f32};
    let t0 = Instant::now();
    let failures = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for w in 0..threads {
            let failures = &failures;
            sc.spawn(move || {
                let mut resizer = lmd_data::transform::Resizer::new();
                let mut img = lmd_data::decode::Rgb8::default();
                for _ in 0..repeat {
                    for (key, bytes) in images.iter().skip(w).step_by(threads) {
                        let ok = lmd_data::decode::decode_rgb8_region_into(
                            bytes,
                            lmd_data::decode::DEFAULT_MAX_PIXELS,
                            |w, h| cfg.source_region(w, h),
                            &mut img,
                        )
                        .and_then(|()| prepare(&img, key, cfg, &mut resizer));
                        match ok {
                            Ok(v) if f32_out => {
                                std::hint::black_box(unit_f32(&v));
                            }
                            Ok(v) => {
                                std::hint::black_box(v);
                            }
                            Err(_) => {
                                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                }
            });
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    let n = images.len() * repeat;
    (
        n as f64 / secs,
        failures.load(std::sync::atomic::Ordering::Relaxed) / repeat,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_sd_vae_weights_time_the_real_sizes_and_taesd_needs_its_own() {
        let opts = VaeBenchOptions {
            vae: lmd_model::vae::VaeKind::SdVae,
            weights: "random".into(),
            batch: 1,
            size: 16,
            seconds: 0.0,
            device: crate::DeviceSpec::Cpu,
            precision: lmd_model::Precision::F32,
        };
        let mut lines = Vec::new();
        vae(&opts, |v| lines.push(v)).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["weights"], "random");
        assert!(
            lines[0]["encode_images_per_s"].as_f64().unwrap() > 0.0,
            "{lines:?}"
        );
        let taesd = VaeBenchOptions {
            vae: lmd_model::vae::VaeKind::Taesd,
            ..opts
        };
        let e = vae(&taesd, |_| {}).unwrap_err().to_string();
        assert!(e.contains("random") && e.contains("taesd"), "{e}");
    }
}
