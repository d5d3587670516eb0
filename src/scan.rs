//! Zero detection: a fast all-zero test for a buffer and the split of a
//! buffer into runs of non-zero units, for the parallel walks of
//! [`mod@crate::convert`] and [`crate::ops`].

use std::ops::Range;

/// The granularity at which zero regions are found and left as holes:
/// one page, the smallest unit a filesystem can deallocate.
pub const ZERO_UNIT: u64 = 4096;

/// True when every byte of `buf` is zero.
///
/// Works on 256-byte stripes OR-ed together in u64 lanes, which the compiler
/// vectorises; returns at the first stripe with a set bit.
#[inline]
pub fn is_zero(buf: &[u8]) -> bool {
    let mut stripes = buf.chunks_exact(256);
    for s in &mut stripes {
        let mut acc = 0u64;
        for w in s.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    stripes.remainder().iter().all(|&b| b == 0)
}

/// Appends to `out` the ranges of virtual offsets in `buf` (which starts at
/// virtual offset `base`) that are not all zero, at the granularity of
/// `unit`-byte units aligned on multiples of `unit` in virtual space.
/// Adjacent non-zero units are merged, also with the last range in `out`.
pub fn nonzero_runs(buf: &[u8], base: u64, unit: u64, out: &mut Vec<Range<u64>>) {
    let end = base + buf.len() as u64;
    let mut pos = base;
    while pos < end {
        let stop = ((pos / unit + 1) * unit).min(end);
        let piece = &buf[(pos - base) as usize..(stop - base) as usize];
        if !is_zero(piece) {
            match out.last_mut() {
                Some(last) if last.end == pos => last.end = stop,
                _ => out.push(pos..stop),
            }
        }
        pos = stop;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_test_finds_any_set_byte() {
        let mut v = vec![0u8; 10_000];
        assert!(is_zero(&v));
        assert!(is_zero(&[]));
        for i in [0, 7, 255, 256, 4095, 9_999] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
    }

    #[test]
    fn runs_merge_and_align() {
        let mut buf = vec![0u8; 5 * 4096 + 100];
        buf[10] = 1;
        buf[4096 + 5] = 1;
        buf[3 * 4096] = 1;
        buf[5 * 4096 + 99] = 1;
        let mut out = Vec::new();
        nonzero_runs(&buf, 0, 4096, &mut out);
        assert_eq!(out, vec![0..8192, 12288..16384, 20480..20580]);
        // A base that is not unit-aligned splits on virtual boundaries.
        let mut out = Vec::new();
        nonzero_runs(&[1u8; 100], 4090, 4096, &mut out);
        assert_eq!(out, vec![4090..4190]);
    }

    proptest! {
        #[test]
        fn runs_cover_exactly_the_nonzero_units(
            bytes in proptest::collection::vec(prop_oneof![9 => Just(0u8), 1 => any::<u8>()], 0..3000),
            base in 0u64..1024,
        ) {
            let unit = 256;
            let mut out = Vec::new();
            nonzero_runs(&bytes, base, unit, &mut out);
            for (i, &b) in bytes.iter().enumerate() {
                let v = base + i as u64;
                let covered = out.iter().any(|r| r.contains(&v));
                if b != 0 {
                    prop_assert!(covered);
                }
                if covered {
                    // The unit holding v has a non-zero byte.
                    let u0 = (v / unit * unit).max(base);
                    let u1 = ((v / unit + 1) * unit).min(base + bytes.len() as u64);
                    prop_assert!(!is_zero(&bytes[(u0 - base) as usize..(u1 - base) as usize]));
                }
            }
        }
    }
}
