//! Decoding image files to RGB8: JPEG (zune-jpeg, through `image`), PNG (8/16-bit, grey,
//! alpha), WebP. Greyscale and CMYK become RGB, alpha is dropped. The format is sniffed from
//! the bytes, not the name. The pixel count is checked from the header before any large
//! allocation (default limit 89,478,485 pixels, Pillow's `MAX_IMAGE_PIXELS`).
//!
//! Errors are plain reasons (`String`), meant for the skip report.

use std::io::Cursor;

/// Pillow's default decompression-bomb limit.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// A decoded image, row-major RGB.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Decode `bytes` to RGB8, refusing images over `max_pixels`.
pub fn decode_rgb8(bytes: &[u8], max_pixels: u64) -> Result<Rgb8, String> {
    if bytes.is_empty() {
        return Err("empty image member".into());
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
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(format!(
            "{w}x{h} = {:.1} megapixels, over the pixel limit of {:.1}",
            pixels as f64 / 1e6,
            max_pixels as f64 / 1e6
        ));
    }
    if format == image::ImageFormat::Jpeg && !has_jpeg_eoi(bytes) {
        return Err("truncated JPEG (no end-of-image marker)".into());
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(1 << 20));
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| format!("{format:?} decode failed: {e}"))?;
    let rgb = img.into_rgb8();
    Ok(Rgb8 {
        width: rgb.width(),
        height: rgb.height(),
        data: rgb.into_raw(),
    })
}

/// Whether a JPEG stream ends with an EOI marker (allowing trailing padding bytes).
fn has_jpeg_eoi(b: &[u8]) -> bool {
    let tail = &b[b.len().saturating_sub(4096)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
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

    #[test]
    fn decodes_png_and_refuses_bombs_and_garbage() {
        let p = png(5, 3);
        let img = decode_rgb8(&p, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!((img.width, img.height), (5, 3));
        assert_eq!(&img.data[..3], &[0, 0, 7]);
        let e = decode_rgb8(&p, 10).unwrap_err();
        assert!(e.contains("over the pixel limit"), "{e}");
        assert!(decode_rgb8(b"hello world, not an image", 100)
            .unwrap_err()
            .contains("not an image"));
        assert!(decode_rgb8(&[], 100).unwrap_err().contains("empty"));
    }
}
