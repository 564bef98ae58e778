//! Pixels to VAE input: torchvision's `Resize(S)` (shorter side to S, long side
//! `int(S·long/short)`) + `CenterCrop(S)` (offsets `round((len−S)/2)`, half to even), or
//! `RandomResizedCrop(S, scale, ratio)` views seeded from (key, view), each optionally followed
//! by its horizontal flip. Resampling is `fast_image_resize`'s convolution (antialiased, like
//! Pillow), computed directly on the crop box, which equals resizing the whole image and then
//! cropping. Output: CHW u8 ([`prepare`]: what precompute moves to the VAE's device, a quarter
//! of the f32 bytes, and brings to [0, 1] there as [`unit_f32`] does on the host) or CHW f32 in
//! [0, 1] ([`hwc_to_chw`]: the pixel loader).

use crate::decode::Rgb8;
pub use fast_image_resize::Resizer;
use fast_image_resize::{
    images::{Image, ImageRef},
    FilterType, PixelType, ResizeAlg, ResizeOptions,
};
use serde::{Deserialize, Serialize};

/// How each view is cut from the image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum CropMode {
    /// Resize(S) + CenterCrop(S): one view.
    Center,
    /// RandomResizedCrop(S, scale, ratio) with the RNG seeded from (key, view index).
    RandomResized {
        scale: (f64, f64),
        ratio: (f64, f64),
    },
}

impl CropMode {
    pub fn rrc_default() -> Self {
        CropMode::RandomResized {
            scale: (0.2, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            CropMode::Center => "center",
            CropMode::RandomResized { .. } => "random-resized-crop",
        }
    }
}

/// Resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filter {
    #[default]
    #[serde(alias = "bilinear-antialias")]
    Bilinear,
    #[serde(alias = "bicubic-antialias")]
    Bicubic,
    #[serde(alias = "lanczos")]
    Lanczos3,
    Nearest,
}

impl Filter {
    pub fn name(self) -> &'static str {
        match self {
            Filter::Bilinear => "bilinear-antialias",
            Filter::Bicubic => "bicubic-antialias",
            Filter::Lanczos3 => "lanczos3",
            Filter::Nearest => "nearest",
        }
    }

    fn alg(self) -> ResizeAlg {
        match self {
            Filter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
            Filter::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
            Filter::Lanczos3 => ResizeAlg::Convolution(FilterType::Lanczos3),
            Filter::Nearest => ResizeAlg::Nearest,
        }
    }
}

impl std::str::FromStr for Filter {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Ok(match s {
            "bilinear" | "bilinear-antialias" => Filter::Bilinear,
            "bicubic" | "bicubic-antialias" => Filter::Bicubic,
            "lanczos3" | "lanczos" => Filter::Lanczos3,
            "nearest" => Filter::Nearest,
            o => {
                return Err(crate::Error::InvalidInput {
                    context: "--filter".into(),
                    detail: format!("unknown filter {o:?} (bilinear, bicubic, lanczos3, nearest)"),
                })
            }
        })
    }
}

/// What the transform makes of each image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransformConfig {
    /// Output side S.
    pub size: u32,
    pub crop: CropMode,
    /// Views per image (1 for `Center`).
    pub views: usize,
    /// Also emit each view mirrored.
    pub flip: bool,
    pub filter: Filter,
}

impl Default for TransformConfig {
    fn default() -> Self {
        TransformConfig {
            size: 224,
            crop: CropMode::Center,
            views: 1,
            flip: false,
            filter: Filter::Bilinear,
        }
    }
}

impl TransformConfig {
    /// Variants (views × flips) per image.
    pub fn variants(&self) -> usize {
        self.views * if self.flip { 2 } else { 1 }
    }

    /// Values per image (all variants, CHW each).
    pub fn values_per_image(&self) -> usize {
        self.variants() * 3 * (self.size as usize).pow(2)
    }
}

/// A crop box in source pixels (fractional).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CropBox {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

impl TransformConfig {
    /// The pixels of a `w`×`h` image that [`prepare`] reads, `[x0, y0, x1, y1)`, for a decoder
    /// that can skip the rest: the center crop's box widened by the resampling filter's reach
    /// (3 source pixels per output pixel, the widest filter's) plus 8 pixels for the decoder's
    /// own edge effects. `None` (all of it) for random-resized crops.
    pub fn source_region(&self, w: u32, h: u32) -> Option<[u32; 4]> {
        if self.crop != CropMode::Center {
            return None;
        }
        Some(read_region(center_box(w, h, self.size), self.size, w, h))
    }
}

/// The pixels of a `w`×`h` image that resampling `bx` to `s`×`s` reads, `[x0, y0, x1, y1)`:
/// the box widened by the resampling filter's reach (3 source pixels per output pixel, the
/// widest filter's) plus 8 pixels for the decoder's own edge effects.
pub fn read_region(bx: CropBox, s: u32, w: u32, h: u32) -> [u32; 4] {
    let reach = 3.0 * (bx.width.max(bx.height) / s as f64).max(1.0) + 8.0;
    let lo = |v: f64| (v - reach).floor().max(0.0) as u32;
    let hi = |v: f64, n: u32| ((v + reach).ceil() as u32).min(n);
    [
        lo(bx.left),
        lo(bx.top),
        hi(bx.left + bx.width, w),
        hi(bx.top + bx.height, h),
    ]
}

/// torchvision `Resize(S)` + `CenterCrop(S)` expressed as a source box.
pub fn center_box(w: u32, h: u32, s: u32) -> CropBox {
    let (w, h, s) = (w as f64, h as f64, s as f64);
    let (rw, rh) = if w <= h {
        (s, (s * h / w).floor())
    } else {
        ((s * w / h).floor(), s)
    };
    let left = ((rw - s) / 2.0).round_ties_even();
    let top = ((rh - s) / 2.0).round_ties_even();
    let (sx, sy) = (w / rw, h / rh);
    let (left, top) = (left * sx, top * sy);
    // s·(w/rw) can exceed the image by a rounding error: clamp to the image.
    CropBox {
        left,
        top,
        width: (s * sx).min(w - left),
        height: (s * sy).min(h - top),
    }
}

/// SplitMix64 stream seeded from a key and a view index (reruns give the same crops).
pub struct KeyRng(u64);

impl KeyRng {
    pub fn new(key: &str, view: usize) -> Self {
        KeyRng(xxhash_rust::xxh3::xxh3_64_with_seed(
            key.as_bytes(),
            view as u64 + 1,
        ))
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// A fair coin (the horizontal flip of `RandomHorizontalFlip(0.5)`).
    pub fn coin(&mut self) -> bool {
        self.next_u64() >> 63 == 1
    }
}

/// torchvision `RandomResizedCrop.get_params` (10 tries, then a ratio-clamped center crop).
pub fn random_resized_box(
    w: u32,
    h: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut KeyRng,
) -> CropBox {
    let (wf, hf) = (w as f64, h as f64);
    let area = wf * hf;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.uniform(scale.0, scale.1);
        let aspect = rng.uniform(lr0, lr1).exp();
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw > 0.0 && cw <= wf && ch > 0.0 && ch <= hf {
            let top = rng.below((hf - ch) as u64 + 1) as f64;
            let left = rng.below((wf - cw) as u64 + 1) as f64;
            return CropBox {
                left,
                top,
                width: cw,
                height: ch,
            };
        }
    }
    let in_ratio = wf / hf;
    let (cw, ch) = if in_ratio < ratio.0 {
        (wf, (wf / ratio.0).round())
    } else if in_ratio > ratio.1 {
        ((hf * ratio.1).round(), hf)
    } else {
        (wf, hf)
    };
    CropBox {
        left: ((wf - cw) / 2.0).floor(),
        top: ((hf - ch) / 2.0).floor(),
        width: cw,
        height: ch,
    }
}

/// Resample `bx` of `img` to `s`×`s` RGB8 (HWC).
pub fn resize_box(
    img: &Rgb8,
    bx: CropBox,
    s: u32,
    filter: Filter,
    resizer: &mut Resizer,
) -> Result<Vec<u8>, String> {
    let src = ImageRef::new(img.width, img.height, &img.data, PixelType::U8x3)
        .map_err(|e| format!("resize: {e}"))?;
    let mut dst = Image::new(s, s, PixelType::U8x3);
    // `bx` is in full-image coordinates; `img` may hold only the part at `origin`.
    let (left, top) = (
        bx.left - img.origin[0] as f64,
        bx.top - img.origin[1] as f64,
    );
    let opts = ResizeOptions::new()
        .resize_alg(filter.alg())
        .crop(left, top, bx.width, bx.height);
    resizer
        .resize(&src, &mut dst, &opts)
        .map_err(|e| format!("resize: {e}"))?;
    Ok(dst.into_vec())
}

/// HWC u8 -> CHW f32 in [0, 1], appended to `out`; mirrored horizontally when `flip`.
pub fn hwc_to_chw(hwc: &[u8], s: usize, flip: bool, out: &mut Vec<f32>) {
    hwc_to_chw_as(hwc, s, flip, out, unit);
}

/// HWC u8 -> CHW u8, appended to `out`; mirrored horizontally when `flip`.
pub fn hwc_to_chw_u8(hwc: &[u8], s: usize, flip: bool, out: &mut Vec<u8>) {
    hwc_to_chw_as(hwc, s, flip, out, |p| p);
}

/// A pixel value in [0, 1]: `p / 255` in f32, the one rounding every path uses (the device's
/// `to_dtype(f32) / 255` in precompute gives the same value).
#[inline(always)]
pub fn unit(p: u8) -> f32 {
    p as f32 / 255.0
}

/// CHW u8 (what [`prepare`] gives) -> the same values as f32 in [0, 1].
pub fn unit_f32(px: &[u8]) -> Vec<f32> {
    px.iter().map(|&p| unit(p)).collect()
}

/// HWC u8 -> CHW `T` through `f`, appended to `out`; mirrored horizontally when `flip`.
#[inline(always)]
fn hwc_to_chw_as<T: Copy + Default>(
    hwc: &[u8],
    s: usize,
    flip: bool,
    out: &mut Vec<T>,
    f: impl Fn(u8) -> T,
) {
    let start = out.len();
    out.resize(start + 3 * s * s, T::default());
    let o = &mut out[start..];
    let (r, rest) = o.split_at_mut(s * s);
    let (g, b) = rest.split_at_mut(s * s);
    // Row by row over exact 3-byte chunks: the loop vectorises (no bounds checks inside).
    for y in 0..s {
        let src = &hwc[y * s * 3..(y + 1) * s * 3];
        let row = y * s..(y + 1) * s;
        let (r, g, b) = (&mut r[row.clone()], &mut g[row.clone()], &mut b[row]);
        let dst = r.iter_mut().zip(g.iter_mut().zip(b.iter_mut()));
        if flip {
            for (p, (r, (g, b))) in src.chunks_exact(3).rev().zip(dst) {
                (*r, *g, *b) = (f(p[0]), f(p[1]), f(p[2]));
            }
        } else {
            for (p, (r, (g, b))) in src.chunks_exact(3).zip(dst) {
                (*r, *g, *b) = (f(p[0]), f(p[1]), f(p[2]));
            }
        }
    }
}

/// All variants of one image, CHW u8 each, in layout order (view, then flip) ([`unit_f32`]
/// gives the VAE's [0, 1] input).
pub fn prepare(
    img: &Rgb8,
    key: &str,
    cfg: &TransformConfig,
    resizer: &mut Resizer,
) -> crate::Result<Vec<u8>> {
    prepare_views(img, key, cfg, resizer).map_err(|reason| crate::Error::Transform {
        key: key.to_string(),
        reason,
    })
}

fn prepare_views(
    img: &Rgb8,
    key: &str,
    cfg: &TransformConfig,
    resizer: &mut Resizer,
) -> Result<Vec<u8>, String> {
    let s = cfg.size;
    let mut out = Vec::with_capacity(cfg.values_per_image());
    let [w, h] = img.full;
    for view in 0..cfg.views {
        let bx = match cfg.crop {
            CropMode::Center => center_box(w, h, s),
            CropMode::RandomResized { scale, ratio } => {
                random_resized_box(w, h, scale, ratio, &mut KeyRng::new(key, view))
            }
        };
        let hwc = resize_box(img, bx, s, cfg.filter, resizer)?;
        hwc_to_chw_u8(&hwc, s as usize, false, &mut out);
        if cfg.flip {
            hwc_to_chw_u8(&hwc, s as usize, true, &mut out);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn center_box_matches_torchvision_arithmetic() {
        // 500x375 landscape: resized to 298x224 (int(224*500/375) = 298), crop left round(37) = 37
        let b = center_box(500, 375, 224);
        let sx = 500.0 / 298.0;
        assert!((b.left - 37.0 * sx).abs() < 1e-9 && b.top == 0.0);
        assert!((b.width - 224.0 * sx).abs() < 1e-9 && (b.height - 375.0).abs() < 1e-9);
        // square: identity box
        assert_eq!(
            center_box(224, 224, 224),
            CropBox {
                left: 0.0,
                top: 0.0,
                width: 224.0,
                height: 224.0
            }
        );
        // (225 - 224) / 2 = 0.5 rounds to even: 0
        assert_eq!(center_box(224, 225, 224).top, 0.0);
    }

    #[test]
    fn center_box_stays_inside_every_image() {
        for w in 1..700u32 {
            for h in [1u32, 5, 223, 224, 225, 239, 450, 478, 485, w] {
                let b = center_box(w, h, 224);
                assert!(b.left >= 0.0 && b.top >= 0.0, "{w}x{h}");
                assert!(
                    b.left + b.width <= w as f64 && b.top + b.height <= h as f64,
                    "{w}x{h}: {b:?}"
                );
            }
        }
    }

    #[test]
    fn rrc_is_seeded_and_in_bounds() {
        for k in 0..200 {
            let key = format!("k{k}");
            let a = random_resized_box(
                640,
                480,
                (0.2, 1.0),
                (0.75, 4.0 / 3.0),
                &mut KeyRng::new(&key, 1),
            );
            let b = random_resized_box(
                640,
                480,
                (0.2, 1.0),
                (0.75, 4.0 / 3.0),
                &mut KeyRng::new(&key, 1),
            );
            assert_eq!(a, b);
            assert!(
                a.left >= 0.0
                    && a.top >= 0.0
                    && a.left + a.width <= 640.0
                    && a.top + a.height <= 480.0
            );
            assert!(a.width * a.height >= 0.19 * 640.0 * 480.0);
        }
        let a = random_resized_box(
            640,
            480,
            (0.2, 1.0),
            (0.75, 4.0 / 3.0),
            &mut KeyRng::new("x", 0),
        );
        let b = random_resized_box(
            640,
            480,
            (0.2, 1.0),
            (0.75, 4.0 / 3.0),
            &mut KeyRng::new("x", 1),
        );
        assert_ne!(a, b);
        // 50:1 falls back to a ratio-clamped center crop when no try fits
        let c = random_resized_box(
            500,
            10,
            (0.9, 1.0),
            (0.75, 4.0 / 3.0),
            &mut KeyRng::new("y", 0),
        );
        assert!(c.width <= 14.0 && c.height == 10.0);
    }

    #[test]
    fn prepare_makes_views_and_flips() {
        let img = Rgb8::new(40, 30, (0..40 * 30 * 3).map(|i| (i % 251) as u8).collect());
        let cfg = TransformConfig {
            size: 16,
            crop: CropMode::rrc_default(),
            views: 2,
            flip: true,
            filter: Filter::Bilinear,
        };
        let mut r = Resizer::new();
        let v = prepare(&img, "key", &cfg, &mut r).unwrap();
        assert_eq!(v.len(), cfg.values_per_image());
        let t = 3 * 16 * 16;
        // variant 1 is variant 0 mirrored
        for y in 0..16 {
            for x in 0..16 {
                assert_eq!(v[y * 16 + x], v[t + y * 16 + 15 - x]);
            }
        }
        assert_eq!(v, prepare(&img, "key", &cfg, &mut r).unwrap());
        // the f32 conversion of the pixel loader gives the same values as unit_f32 of the u8
        let hwc: Vec<u8> = (0..16 * 16 * 3).map(|i| (i * 7 % 256) as u8).collect();
        for flip in [false, true] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            hwc_to_chw(&hwc, 16, flip, &mut a);
            hwc_to_chw_u8(&hwc, 16, flip, &mut b);
            assert_eq!(a, unit_f32(&b));
        }
        let all = unit_f32(&(0..=255).collect::<Vec<u8>>());
        assert_eq!((all[0], all[255]), (0.0, 1.0));
        assert!(all.windows(2).all(|w| w[0] < w[1]));
    }
}
