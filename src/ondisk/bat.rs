//! The block allocation table and the per-block sector bitmap.

use super::SECTOR;
use byteorder::{BigEndian as BE, ByteOrder};

/// A BAT entry that marks an unallocated block.
pub const UNALLOCATED: u32 = u32::MAX;

/// The file offset a BAT entry names: entries count 512-byte sectors. The
/// one place this arithmetic is written.
pub fn entry_offset(e: u32) -> u64 {
    u64::from(e) * SECTOR
}

/// The block allocation table: entry *i* is the sector offset of block *i*
/// in the file, or [`UNALLOCATED`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Bat {
    /// The entries, in block order.
    pub entries: Vec<u32>,
}

impl Bat {
    /// A table of `n` unallocated entries.
    pub fn new(n: usize) -> Bat {
        Bat {
            entries: vec![UNALLOCATED; n],
        }
    }

    /// Parses `bytes.len() / 4` entries.
    pub fn parse(bytes: &[u8]) -> Bat {
        Bat {
            entries: bytes.chunks_exact(4).map(BE::read_u32).collect(),
        }
    }

    /// Bytes the table occupies on disk: 4 per entry, padded to a sector
    /// (saturating at `u64::MAX` for counts no file can hold).
    pub fn disk_size(entries: u64) -> u64 {
        entries
            .saturating_mul(4)
            .div_ceil(SECTOR)
            .saturating_mul(SECTOR)
    }

    /// The table as written on disk, padded with `0xFF` to a whole sector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = Self::disk_size(self.entries.len() as u64) as usize;
        let mut b = vec![0xffu8; len];
        for (i, e) in self.entries.iter().enumerate() {
            BE::write_u32(&mut b[i * 4..], *e);
        }
        b
    }

    /// The file offset of block `i`'s bitmap, if allocated.
    pub fn block_offset(&self, i: usize) -> Option<u64> {
        match self.entries.get(i) {
            Some(&e) if e != UNALLOCATED => Some(entry_offset(e)),
            _ => None,
        }
    }

    /// Number of allocated entries.
    pub fn allocated(&self) -> usize {
        self.entries.iter().filter(|&&e| e != UNALLOCATED).count()
    }
}

/// Bytes of the sector bitmap in front of each block of `block_size` bytes:
/// one bit per sector, padded to a whole sector.
pub fn bitmap_size(block_size: u32) -> u64 {
    (u64::from(block_size) / SECTOR)
        .div_ceil(8)
        .div_ceil(SECTOR)
        * SECTOR
}

/// A block's sector bitmap: bit 7 of byte 0 is sector 0; a set bit means the
/// sector holds data in this file.
#[derive(Clone, Copy, Debug)]
pub struct SectorBitmap<'a>(pub &'a [u8]);

impl SectorBitmap<'_> {
    /// True when sector `s` of the block is present in this file.
    pub fn is_set(&self, s: u64) -> bool {
        let byte = (s / 8) as usize;
        byte < self.0.len() && self.0[byte] & (0x80 >> (s % 8)) != 0
    }

    /// True when the first `sectors` bits are all set.
    pub fn all_set(&self, sectors: u64) -> bool {
        let full = (sectors / 8) as usize;
        full <= self.0.len()
            && self.0[..full].iter().all(|&b| b == 0xff)
            && (full as u64 * 8..sectors).all(|s| self.is_set(s))
    }

    /// True when the first `sectors` bits are all clear.
    pub fn all_clear(&self, sectors: u64) -> bool {
        let full = ((sectors / 8) as usize).min(self.0.len());
        self.0[..full].iter().all(|&b| b == 0)
            && (full as u64 * 8..sectors).all(|s| !self.is_set(s))
    }

    /// Runs of equal bits among sectors `start..end`: `(first sector, count, set)`.
    pub fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut s = start;
        while s < end {
            // Whole bytes of equal bits go in one step.
            let bit = self.is_set(s);
            let mut e = s + 1;
            while e < end {
                if e % 8 == 0 && end - e >= 8 {
                    let byte = self.0.get((e / 8) as usize).copied().unwrap_or(0);
                    if byte == if bit { 0xff } else { 0 } {
                        e += 8;
                        continue;
                    }
                }
                if self.is_set(e) != bit {
                    break;
                }
                e += 1;
            }
            out.push((s, e - s, bit));
            s = e;
        }
        out
    }

    /// Sets sectors `start..end` in a mutable bitmap.
    pub fn set_range(bits: &mut [u8], start: u64, end: u64) {
        for s in start..end {
            if let Some(b) = bits.get_mut((s / 8) as usize) {
                *b |= 0x80 >> (s % 8);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sizes() {
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512 << 10), 512);
        assert_eq!(bitmap_size(256 << 20), 64 << 10);
        assert_eq!(bitmap_size(4096), 512);
    }

    #[test]
    fn runs_split_on_bit_changes() {
        let bits = [0b1110_0000u8, 0xff, 0x00, 0x01];
        let runs = SectorBitmap(&bits).runs(0, 32);
        assert_eq!(
            runs,
            vec![
                (0, 3, true),
                (3, 5, false),
                (8, 8, true),
                (16, 15, false),
                (31, 1, true)
            ]
        );
        assert_eq!(SectorBitmap(&bits).runs(9, 12), vec![(9, 3, true)]);
        assert!(SectorBitmap(&[0xff, 0xf0]).all_set(12));
        assert!(!SectorBitmap(&[0xff, 0xf0]).all_set(13));
        assert!(SectorBitmap(&[0, 0x0f]).all_clear(12));
    }

    #[test]
    fn bat_pads_with_ones() {
        let bat = Bat {
            entries: vec![3, UNALLOCATED, 7],
        };
        let b = bat.to_bytes();
        assert_eq!(b.len(), 512);
        assert_eq!(&b[..12], &[0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 7]);
        assert!(b[12..].iter().all(|&x| x == 0xff));
        assert_eq!(Bat::parse(&b[..12]), bat);
        assert_eq!(bat.block_offset(2), Some(7 * 512));
        assert_eq!(bat.block_offset(1), None);
        assert_eq!(bat.allocated(), 2);
    }
}
