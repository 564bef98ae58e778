//! Byte-plane shuffling (as Blosc's "shuffle" filter): element byte `k` of every element goes to
//! plane `k`. The high bytes of f16/bf16/f32 latents (sign, exponent) are nearly constant and
//! compress well once they stand together; the low (mantissa) bytes do not.

/// Split `src` (elements of `size` bytes) into `size` planes written to `dst`.
pub fn shuffle(src: &[u8], size: usize, dst: &mut Vec<u8>) {
    debug_assert_eq!(src.len() % size, 0);
    let n = src.len() / size;
    dst.clear();
    dst.resize(src.len(), 0);
    match size {
        1 => dst.copy_from_slice(src),
        2 => {
            let (lo, hi) = dst.split_at_mut(n);
            for ((l, h), e) in lo.iter_mut().zip(hi.iter_mut()).zip(src.chunks_exact(2)) {
                *l = e[0];
                *h = e[1];
            }
        }
        _ => {
            for (i, e) in src.chunks_exact(size).enumerate() {
                for (k, b) in e.iter().enumerate() {
                    dst[k * n + i] = *b;
                }
            }
        }
    }
}

/// Inverse of [`shuffle`]: interleave `size` planes of `src` into `dst` (same length).
pub fn unshuffle(src: &[u8], size: usize, dst: &mut [u8]) {
    debug_assert_eq!(src.len(), dst.len());
    debug_assert_eq!(src.len() % size, 0);
    let n = src.len() / size;
    match size {
        1 => dst.copy_from_slice(src),
        2 => {
            let (lo, hi) = src.split_at(n);
            for ((e, l), h) in dst.chunks_exact_mut(2).zip(lo).zip(hi) {
                e[0] = *l;
                e[1] = *h;
            }
        }
        4 => {
            let (p0, rest) = src.split_at(n);
            let (p1, rest) = rest.split_at(n);
            let (p2, p3) = rest.split_at(n);
            for (i, e) in dst.chunks_exact_mut(4).enumerate() {
                e[0] = p0[i];
                e[1] = p1[i];
                e[2] = p2[i];
                e[3] = p3[i];
            }
        }
        _ => {
            for (i, e) in dst.chunks_exact_mut(size).enumerate() {
                for (k, b) in e.iter_mut().enumerate() {
                    *b = src[k * n + i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_roundtrip_all_sizes() {
        let src: Vec<u8> = (0..240u32).map(|i| (i * 7 + 3) as u8).collect();
        for size in [1, 2, 3, 4, 8] {
            let mut planes = Vec::new();
            shuffle(&src, size, &mut planes);
            if size > 1 {
                assert_ne!(planes, src);
                // plane 0 is byte 0 of each element
                assert_eq!(planes[1], src[size]);
            }
            let mut back = vec![0u8; src.len()];
            unshuffle(&planes, size, &mut back);
            assert_eq!(back, src, "size {size}");
        }
    }
}
