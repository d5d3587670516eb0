//! `checksum`: a CRC-32 of the virtual content, the same for every form of one disk.

use crate::error::Result;
use crate::image::Image;
use crate::walk::{self, Control, Piece, Read};

/// The CRC-32 (IEEE, as zlib and `crc32fast`) of `n` zero bytes, as a
/// hasher that can be combined: built by doubling, in O(log n) combinations.
pub(crate) fn zeros_hasher(n: u64) -> crc32fast::Hasher {
    let mut result = crc32fast::Hasher::new();
    let mut unit = crc32fast::Hasher::new();
    unit.update(&[0u8; 4096]);
    let mut q = n / 4096;
    while q > 0 {
        if q & 1 == 1 {
            result.combine(&unit);
        }
        let u2 = unit.clone();
        unit.combine(&u2);
        q >>= 1;
    }
    let mut tail = crc32fast::Hasher::new();
    tail.update(&vec![0u8; (n % 4096) as usize]);
    result.combine(&tail);
    result
}

/// A checksum of a virtual disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Checksum {
    /// CRC-32 (IEEE) of the virtual content.
    pub crc32: u32,
    /// Bytes hashed: the virtual size.
    pub size: u64,
}

/// CRC-32 of the virtual content and its length. Identical for the raw,
/// fixed, dynamic and differencing forms of one disk. Data chunks are
/// hashed in parallel and combined; zero regions are combined without
/// being read.
///
/// # Errors
/// I/O errors reading the image.
pub fn checksum(img: &Image) -> Result<Checksum> {
    checksum_with(img, &Control::new())
}

/// [`checksum`] with progress and cancellation.
///
/// # Errors
/// I/O errors reading the image; [`Error::Interrupted`](crate::Error::Interrupted) when cancelled.
pub fn checksum_with(img: &Image, ctl: &Control<'_>) -> Result<Checksum> {
    let size = img.virtual_size();
    let mut total = crc32fast::Hasher::new();
    walk::fold(
        img,
        0,
        size,
        Read::Bytes,
        ctl,
        |_, d, _| {
            let mut h = crc32fast::Hasher::new();
            h.update(d);
            Ok(h)
        },
        |piece| {
            match piece {
                Piece::Data(_, h) => total.combine(&h),
                Piece::Zero(e) => total.combine(&zeros_hasher(e.length)),
            }
            Ok(true)
        },
    )?;
    Ok(Checksum {
        crc32: total.finalize(),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_crc_matches_hashing_zeros() {
        for n in [0u64, 1, 511, 4096, 4097, 100_000, 1 << 20] {
            let mut h = crc32fast::Hasher::new();
            h.update(&vec![0u8; n as usize]);
            assert_eq!(zeros_hasher(n).finalize(), h.finalize(), "n = {n}");
        }
    }
}
