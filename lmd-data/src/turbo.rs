//! JPEG decoding through libjpeg-turbo 3's TurboJPEG API (`turbojpeg-sys`, built from its
//! vendored sources): the decoder Pillow uses, with Pillow's settings (accurate integer IDCT,
//! fancy upsampling), so whole-image pixels equal Pillow's.
//!
//! Partial decoding: given a rectangle, the cropping region is set to it, widened left to the
//! iMCU grid. libjpeg-turbo then skips the IDCT, upsampling and colour conversion of the iMCU
//! columns outside it and of the rows above it (their entropy data is still read), and stops
//! reading at its last row.
//!
//! One TurboJPEG handle per thread, made on first use and reused (`thread_local`).

use crate::pixels::{check_pixels, has_jpeg_eoi, Rect, Rgb8};
use std::cell::RefCell;
use std::os::raw::c_int;
use turbojpeg_sys as tj;

/// An initialised TurboJPEG decompression handle.
struct Handle(tj::tjhandle);

impl Handle {
    fn new() -> Option<Handle> {
        // SAFETY: tj3Init has no preconditions; a null return means failure.
        let h = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        (!h.is_null()).then_some(Handle(h))
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: the handle is valid for our lifetime.
        unsafe { tj::tj3Get(self.0, param as c_int) }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

thread_local! {
    static HANDLE: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

/// Width of an iMCU in pixels for a TurboJPEG subsampling code (`tjMCUWidth`).
fn mcu_width(subsamp: c_int) -> Option<u32> {
    const WIDTHS: [u32; 7] = [8, 16, 16, 8, 8, 32, 8];
    usize::try_from(subsamp)
        .ok()
        .and_then(|i| WIDTHS.get(i).copied())
}

/// Decode `bytes` (a JPEG) into `out`, only `region(w, h)` where given. `None`: not for this
/// decoder (no handle, a header it rejects, CMYK/YCCK, which TurboJPEG does not convert to RGB,
/// or a stream it fails or warns on: the lenient zune-jpeg path then decodes it). `Some(Err)`
/// only for our own verdicts (pixel limit, truncation).
pub(crate) fn decode_into(
    bytes: &[u8],
    max_pixels: u64,
    region: impl FnOnce(u32, u32) -> Option<Rect>,
    out: &mut Rgb8,
) -> Option<Result<(), String>> {
    HANDLE.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(Handle::new()?);
        }
        let h = cell.as_ref()?;
        // SAFETY: valid handle; the pointer and length describe `bytes`.
        if unsafe { tj::tj3DecompressHeader(h.0, bytes.as_ptr(), bytes.len() as _) } != 0 {
            return None;
        }
        let cs = h.get(tj::TJPARAM_TJPARAM_COLORSPACE);
        if cs == tj::TJCS_TJCS_CMYK as c_int || cs == tj::TJCS_TJCS_YCCK as c_int {
            return None;
        }
        let (w, hgt) = (
            u32::try_from(h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH)).ok()?,
            u32::try_from(h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT)).ok()?,
        );
        if let Err(e) = check_pixels(w as u64, hgt as u64, max_pixels) {
            return Some(Err(e));
        }
        if !has_jpeg_eoi(bytes) {
            return Some(Err("truncated JPEG (no end-of-image marker)".into()));
        }
        // The cropping region: the asked rectangle, clamped, its left edge on the iMCU grid.
        let mut rect = [0, 0, w, hgt];
        if let (Some([x0, y0, x1, y1]), Some(mw)) = (
            region(w, hgt),
            mcu_width(h.get(tj::TJPARAM_TJPARAM_SUBSAMP)),
        ) {
            let (x1, y1) = (x1.min(w), y1.min(hgt));
            if x0 < x1 && y0 < y1 {
                rect = [x0 / mw * mw, y0, x1, y1];
            }
        }
        let [x0, y0, x1, y1] = rect;
        let crop = if rect == [0, 0, w, hgt] {
            tj::tjregion {
                x: 0,
                y: 0,
                w: 0,
                h: 0,
            }
        } else {
            tj::tjregion {
                x: x0 as c_int,
                y: y0 as c_int,
                w: (x1 - x0) as c_int,
                h: (y1 - y0) as c_int,
            }
        };
        // SAFETY: valid handle; the header was read, so the region is checked against it.
        if unsafe { tj::tj3SetCroppingRegion(h.0, crop) } != 0 {
            return None;
        }
        let (rw, rh) = (x1 - x0, y1 - y0);
        let len = rw as usize * rh as usize * 3;
        if out.data.len() < len {
            out.data.resize(len, 0);
        }
        out.data.truncate(len);
        // SAFETY: `out.data` holds rh rows of pitch rw * 3 bytes, the size of the cropping
        // region TurboJPEG writes in RGB.
        let res = unsafe {
            tj::tj3Decompress8(
                h.0,
                bytes.as_ptr(),
                bytes.len() as _,
                out.data.as_mut_ptr(),
                (rw * 3) as c_int,
                tj::TJPF_TJPF_RGB as c_int,
            )
        };
        if res != 0 {
            return None;
        }
        out.width = rw;
        out.height = rh;
        out.origin = [x0, y0];
        out.full = [w, hgt];
        Some(Ok(()))
    })
}
