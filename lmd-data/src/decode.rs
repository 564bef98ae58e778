//! Decoding image files to RGB8: JPEG (libjpeg-turbo 3 with the default `turbojpeg` feature,
//! the decoder Pillow uses; zune-jpeg for CMYK/YCCK, for streams libjpeg-turbo rejects or warns
//! about, and without the feature), PNG (8/16-bit, grey, alpha) and WebP (through `image`).
//! Greyscale and CMYK become RGB, alpha is dropped. The format is sniffed from the bytes, not
//! the name. The pixel count is checked from the header before any large allocation (default
//! limit 89,478,485 pixels, Pillow's `MAX_IMAGE_PIXELS`).
//!
//! [`decode_rgb8_region_into`] decodes only the rectangle a transform will read, where the
//! decoder can skip the rest (libjpeg-turbo: the iMCU columns left and right of it, its IDCT
//! and colour conversion above it, everything below it); the result records where it sits.
//!
//! Errors are [`Error::Decode`] with the plain reason the skip report records.

use std::io::Cursor;

use crate::{Error, Result};

use crate::pixels::{check_pixels, has_jpeg_eoi};
pub use crate::pixels::{Rect, Rgb8};

/// The decoder JPEGs go through in this build (reported by `lmd-bench decode`).
pub const JPEG_DECODER: &str = if cfg!(feature = "turbojpeg") {
    "libjpeg-turbo 3.1 (region)"
} else {
    "zune-jpeg"
};

/// Pillow's default decompression-bomb limit.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// Decode `bytes` to RGB8, refusing images over `max_pixels`.
pub fn decode_rgb8(bytes: &[u8], max_pixels: u64) -> Result<Rgb8> {
    let mut out = Rgb8::default();
    decode_rgb8_into(bytes, max_pixels, &mut out)?;
    Ok(out)
}

/// [`decode_rgb8`] into `out`, reusing its buffer: a worker that keeps one `Rgb8` between images
/// allocates (and the kernel zeroes) no new pixel memory per image. On error `out` is unspecified.
pub fn decode_rgb8_into(bytes: &[u8], max_pixels: u64, out: &mut Rgb8) -> Result<()> {
    decode_rgb8_region_into(bytes, max_pixels, |_, _| None, out)
}

/// [`decode_rgb8_into`], decoding at least the rectangle `region(full_width, full_height)`
/// (`None`: all) where the decoder can skip the rest; `out.origin` and `out.full` say which part
/// `out` holds. Pixels inside the rectangle equal a whole decode's, except within a few pixels
/// of a cut edge (chroma upsampling there has no neighbours): ask for a margin.
pub fn decode_rgb8_region_into(
    bytes: &[u8],
    max_pixels: u64,
    region: impl FnOnce(u32, u32) -> Option<Rect>,
    out: &mut Rgb8,
) -> Result<()> {
    decode_region(bytes, max_pixels, region, out).map_err(|reason| Error::Decode { reason })
}

/// [`decode_rgb8_region_into`] with the bare reason (what the pipeline's skip report keeps).
pub(crate) fn decode_region(
    bytes: &[u8],
    max_pixels: u64,
    region: impl FnOnce(u32, u32) -> Option<Rect>,
    out: &mut Rgb8,
) -> std::result::Result<(), String> {
    if bytes.is_empty() {
        return Err("empty image member".into());
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        #[cfg(feature = "turbojpeg")]
        if let Some(done) = crate::turbo::decode_into(bytes, max_pixels, region, out) {
            return done;
        }
        #[cfg(not(feature = "turbojpeg"))]
        let _ = region;
        return decode_jpeg_into(bytes, max_pixels, out);
    }
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    let format = reader
        .format()
        .ok_or_else(|| "not an image (unknown format)".to_string())?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| format!("not an image ({format:?} header unreadable: {e})"))?;
    let pixels = check_pixels(w as u64, h as u64, max_pixels)?;
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(1 << 20));
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| format!("{format:?} decode failed: {e}"))?;
    let rgb = img.into_rgb8();
    out.set_whole(rgb.width(), rgb.height());
    out.data = rgb.into_raw();
    Ok(())
}

/// JPEG through zune-jpeg directly (the decoder `image` wraps): one header parse, no copy of
/// the input, output straight into `out`'s buffer. Greyscale, YCCK and CMYK become RGB in the
/// decoder, as they do through `image`.
fn decode_jpeg_into(
    bytes: &[u8],
    max_pixels: u64,
    out: &mut Rgb8,
) -> std::result::Result<(), String> {
    use zune_core::{bytestream::ZCursor, colorspace::ColorSpace, options::DecoderOptions};
    let opts = DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), opts);
    dec.decode_headers()
        .map_err(|e| format!("not an image (Jpeg header unreadable: {e})"))?;
    let (w, h) = dec
        .dimensions()
        .ok_or_else(|| "not an image (Jpeg header unreadable)".to_string())?;
    check_pixels(w as u64, h as u64, max_pixels)?;
    if !has_jpeg_eoi(bytes) {
        return Err("truncated JPEG (no end-of-image marker)".into());
    }
    let len = dec
        .output_buffer_size()
        .ok_or_else(|| "Jpeg decode failed: image size overflows".to_string())?;
    // Grow without clearing: the decoder writes every byte of `[..len]`.
    if out.data.len() < len {
        out.data.resize(len, 0);
    }
    out.data.truncate(len);
    dec.decode_into(&mut out.data)
        .map_err(|e| format!("Jpeg decode failed: {e}"))?;
    out.set_whole(w as u32, h as u32);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn jpeg(img: image::DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
            .unwrap();
        out
    }

    #[test]
    fn jpeg_paths_agree_and_refuse_bombs_and_truncation() {
        let rgb = image::RgbImage::from_fn(37, 21, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 11) as u8, (x * y) as u8])
        });
        let grey = image::GrayImage::from_fn(19, 33, |x, y| image::Luma([(x * 13 + y) as u8]));
        let mut out = Rgb8::default();
        for bytes in [
            jpeg(image::DynamicImage::ImageRgb8(rgb)),
            jpeg(image::DynamicImage::ImageLuma8(grey)),
        ] {
            // zune-jpeg called directly == zune-jpeg through `image`, into a reused buffer
            let want = image::load_from_memory(&bytes).unwrap().into_rgb8();
            decode_jpeg_into(&bytes, DEFAULT_MAX_PIXELS, &mut out).unwrap();
            assert_eq!((out.width, out.height), want.dimensions());
            assert_eq!(out.data, want.as_raw().as_slice());
            assert_eq!((out.origin, out.full), ([0, 0], [out.width, out.height]));
            // the default path (libjpeg-turbo where built) agrees within a few levels
            decode_rgb8_into(&bytes, DEFAULT_MAX_PIXELS, &mut out).unwrap();
            assert_eq!((out.width, out.height), want.dimensions());
            let worst = out
                .data
                .iter()
                .zip(want.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max();
            assert!(worst <= Some(4), "{worst:?}");
            let e = decode_rgb8(&bytes, 100).unwrap_err().to_string();
            assert!(e.contains("over the pixel limit"), "{e}");
            let cut = &bytes[..bytes.len() - 2];
            let e = decode_rgb8(cut, DEFAULT_MAX_PIXELS)
                .unwrap_err()
                .to_string();
            assert!(e.contains("truncated JPEG"), "{e}");
        }
    }

    #[test]
    fn decodes_png_and_refuses_bombs_and_garbage() {
        let p = png(5, 3);
        let img = decode_rgb8(&p, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!((img.width, img.height), (5, 3));
        assert_eq!(&img.data[..3], &[0, 0, 7]);
        let e = decode_rgb8(&p, 10).unwrap_err().to_string();
        assert!(e.contains("over the pixel limit"), "{e}");
        assert!(decode_rgb8(b"hello world, not an image", 100)
            .unwrap_err()
            .to_string()
            .contains("not an image"));
        assert!(decode_rgb8(&[], 100)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }
}
