//! Decoding against Pillow (the reference vectors) and region decodes against whole decodes.

mod common;

use common::{jpeg_bytes, shared};
use lmd_data::decode::decode_rgb8;
use lmd_data::source::{InputSpec, Labels, SourceEvent};
use lmd_data::transform::TransformConfig;
use std::collections::HashMap;

#[test]
#[ignore = "needs LMD_SHARED"]
fn decoded_pixels_match_pillow() {
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let tv = sh.join("testvectors/taesd_imagenette_val16.safetensors");
    let bytes = std::fs::read(&tv).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let keys: Vec<String> =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["keys"]).unwrap();
    let images = st.tensor("images").unwrap();
    let want = images.data();
    let mut found = HashMap::new();
    let shard = sh.join("data/imagenette/imagenette-val-000000.tar");
    lmd_data::source::read_webdataset_shard(&shard, Labels::Required, &mut |ev| {
        if let SourceEvent::Sample(s) = ev {
            let key = format!("{}.{}", s.key, s.ext);
            if keys.contains(&key) {
                found.insert(key, s.image);
            }
        }
        true
    });
    assert_eq!(found.len(), 16);
    let (mut max, mut sum, mut n) = (0u8, 0u64, 0u64);
    for (i, k) in keys.iter().enumerate() {
        let img = decode_rgb8(&found[k], u64::MAX).unwrap();
        assert_eq!((img.width, img.height), (224, 224));
        let w = &want[i * 224 * 224 * 3..(i + 1) * 224 * 224 * 3];
        for (a, b) in img.data.iter().zip(w) {
            let d = a.abs_diff(*b);
            max = max.max(d);
            sum += d as u64;
            n += 1;
        }
    }
    let mean = sum as f64 / n as f64;
    eprintln!("decode vs Pillow: max abs diff {max}, mean abs diff {mean:.4}");
    if cfg!(feature = "turbojpeg") {
        // libjpeg-turbo with Pillow's settings: Pillow's decoder, Pillow's pixels
        assert_eq!(max, 0, "mean {mean}");
    } else {
        assert!(max <= 8 && mean < 1.0, "max {max}, mean {mean}");
    }
}

/// Every image through `decode_rgb8_region_into` (only the part the center crop reads) and
/// `prepare` gives bit-identical CHW pixels to a whole decode; returns how many were cut.
fn region_decode_matches_whole(images: &[(String, Vec<u8>)], cfg: &TransformConfig) -> usize {
    use lmd_data::decode::{decode_rgb8_region_into, Rgb8};
    use lmd_data::transform::{prepare, Resizer};
    let (mut r, mut part, mut cut) = (Resizer::new(), Rgb8::default(), 0);
    for (key, bytes) in images {
        let whole = decode_rgb8(bytes, u64::MAX).unwrap();
        let want = prepare(&whole, key, cfg, &mut r).unwrap();
        decode_rgb8_region_into(bytes, u64::MAX, |w, h| cfg.source_region(w, h), &mut part)
            .unwrap();
        assert_eq!(part.full, [whole.width, whole.height], "{key}");
        if part.width < whole.width || part.height < whole.height {
            cut += 1;
        }
        assert_eq!(prepare(&part, key, cfg, &mut r).unwrap(), want, "{key}");
    }
    cut
}

#[test]
fn region_decode_equals_whole_decode_on_made_jpegs() {
    let sizes = [
        (500, 375),
        (375, 500),
        (333, 500),
        (640, 427),
        (224, 224),
        (97, 300),
    ];
    let images: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(w, h))| (format!("made{i}"), jpeg_bytes(w, h, i as u32)))
        .collect();
    for size in [224, 64] {
        let cfg = TransformConfig {
            size,
            ..Default::default()
        };
        let cut = region_decode_matches_whole(&images, &cfg);
        // Without libjpeg-turbo nothing is cut; with it every image but the square one (whose
        // center crop is all of it).
        let want = if cfg!(feature = "turbojpeg") {
            images.len() - 1
        } else {
            0
        };
        assert_eq!(cut, want, "size {size}");
    }
}

#[test]
#[ignore = "needs LMD_SHARED"]
fn region_decode_equals_whole_decode_on_ilsvrc_and_imagenette_photos() {
    let sh = shared().expect("needs LMD_SHARED: run with --include-ignored where it is set");
    let mut images = Vec::new();
    for input in [
        "data/imagenet-samples/ILSVRC-sample_img_train.tar",
        "data/imagenette/imagenette-val-000000.tar",
    ] {
        let spec = InputSpec::detect(sh.join(input).to_str().unwrap(), None, None).unwrap();
        spec.read(Labels::Optional, &mut |ev| {
            if let SourceEvent::Sample(s) = ev {
                images.push((s.key, s.image));
            }
            true
        })
        .unwrap();
    }
    assert_eq!(images.len(), 800);
    let cut = region_decode_matches_whole(&images, &TransformConfig::default());
    eprintln!("{cut} of {} photos decoded in part", images.len());
    if cfg!(feature = "turbojpeg") {
        assert!(cut >= 250, "{cut}");
    }
}
