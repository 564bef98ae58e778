//! Decoded pixels and the checks every decoder shares: the RGB8 image type (whole, or a
//! region of a larger image), the pixel limit, the JPEG end-of-image test. Below both
//! [`crate::decode`] and its libjpeg-turbo backend, so neither imports the other's internals.

/// A decoded image, row-major RGB: the whole image, or the part of it at `origin`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
    /// Position of `data`'s top-left pixel in the full image (`[0, 0]` for a whole image).
    pub origin: [u32; 2],
    /// The full image's width and height (`[width, height]` for a whole image).
    pub full: [u32; 2],
}

impl Rgb8 {
    /// A whole image.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Self {
        Rgb8 {
            width,
            height,
            data,
            origin: [0, 0],
            full: [width, height],
        }
    }

    pub(crate) fn set_whole(&mut self, width: u32, height: u32) {
        (self.width, self.height) = (width, height);
        self.origin = [0, 0];
        self.full = [width, height];
    }
}

/// Pixel rectangle `[x0, y0, x1, y1)` of an image.
pub type Rect = [u32; 4];

/// `w * h`, or the error for an image over the pixel limit.
pub(crate) fn check_pixels(w: u64, h: u64, max_pixels: u64) -> Result<u64, String> {
    let pixels = w * h;
    if pixels > max_pixels {
        return Err(format!(
            "{w}x{h} = {:.1} megapixels, over the pixel limit of {:.1}",
            pixels as f64 / 1e6,
            max_pixels as f64 / 1e6
        ));
    }
    Ok(pixels)
}

/// Whether a JPEG stream ends with an EOI marker (allowing trailing padding bytes).
pub(crate) fn has_jpeg_eoi(b: &[u8]) -> bool {
    let tail = &b[b.len().saturating_sub(4096)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}
