//! Helpers shared by lmd-data's integration tests: where `../shared` is, and images made here.

// Each test file uses some of these.
#![allow(dead_code)]

use std::path::PathBuf;

/// `$LMD_SHARED` when it names a directory (tests that need it are `#[ignore = "needs LMD_SHARED"]`).
pub fn shared() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("LMD_SHARED")?);
    p.is_dir().then_some(p)
}

/// A PNG with a pattern from `seed`.
pub fn png_bytes(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 ^ seed, y as u8, seed]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A JPEG with detail everywhere (so that cut regions differ), from `seed`.
pub fn jpeg_bytes(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = x.wrapping_mul(31 + seed) ^ y.wrapping_mul(17) ^ (x * y / 7);
        image::Rgb([v as u8, (v >> 3) as u8 ^ (x as u8), (y * 3) as u8])
    });
    let mut out = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut out),
        image::ImageFormat::Jpeg,
    )
    .unwrap();
    out
}

/// A JPEG of a flat colour, `w` x `h`.
pub fn jpeg(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}
