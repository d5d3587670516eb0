//! Cylinders, heads and sectors per track, and the specification's algorithm.

use super::SECTOR;

/// The CHS geometry field of the footer (offset 56: u16 cylinders, u8 heads,
/// u8 sectors per track).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

impl Geometry {
    /// The largest geometry the field can hold; writers such as qemu with
    /// `force_size` store it to say "use the current size".
    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors: 255,
    };

    /// The geometry for a disk of `size` bytes, by the specification's
    /// appendix. CHS rounds down: the result may describe fewer bytes.
    pub fn for_size(size: u64) -> Geometry {
        let mut total = size / SECTOR;
        if total > 65535 * 16 * 255 {
            total = 65535 * 16 * 255;
        }
        let (spt, heads, cth);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = total / spt;
        } else {
            let mut s = 17;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        Geometry {
            // The clamps above bound these: cth/heads <= 65535, heads <= 16, spt <= 255.
            cylinders: u16::try_from(cth / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(u8::MAX),
            sectors: u8::try_from(spt).unwrap_or(u8::MAX),
        }
    }

    /// Bytes addressed by this geometry: cylinders × heads × sectors × 512.
    pub fn size(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors) * SECTOR
    }

    /// The four bytes of the field.
    pub fn to_bytes(self) -> [u8; 4] {
        let c = self.cylinders.to_be_bytes();
        [c[0], c[1], self.heads, self.sectors]
    }

    /// From the four bytes of the field.
    pub fn from_bytes(b: [u8; 4]) -> Geometry {
        Geometry {
            cylinders: u16::from_be_bytes([b[0], b[1]]),
            heads: b[2],
            sectors: b[3],
        }
    }
}

impl std::fmt::Display for Geometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.cylinders, self.heads, self.sectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_geometries_real_tools_wrote() {
        // (current size, CHS that the corpus manifest records for it)
        let cases = [
            (10_485_760, (301, 4, 17)),
            (3_145_728, (90, 4, 17)),
            (4_212_736, (121, 4, 17)),
            (1_020_055_040, (1976, 16, 63)),
            (5_242_880, (150, 4, 17)),
            (3_221_225_472, (6241, 16, 63)),
            (34_359_738_368, (16448, 16, 255)),
            (107_374_182_400, (51400, 16, 255)),
            (21_474_836_480, (41610, 16, 63)),
            (160_041_885_696, (65535, 16, 255)),
        ];
        for (size, (c, h, s)) in cases {
            let g = Geometry::for_size(size);
            assert_eq!((g.cylinders, g.heads, g.sectors), (c, h, s), "size {size}");
            assert!(g.size() <= size);
        }
    }

    #[test]
    fn bytes_round_trip() {
        let g = Geometry {
            cylinders: 0x1234,
            heads: 16,
            sectors: 63,
        };
        assert_eq!(g.to_bytes(), [0x12, 0x34, 16, 63]);
        assert_eq!(Geometry::from_bytes(g.to_bytes()), g);
    }
}
