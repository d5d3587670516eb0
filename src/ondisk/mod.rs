//! The VHD specification as types, with no I/O.
//!
//! Each structure has `parse` (from a fixed-size byte array) and `to_bytes`
//! (back to one). Every integer on disk is big-endian. Offsets of fields are
//! named constants written once, beside the field's doc comment. Parsers
//! check what can be checked from the bytes alone (cookies); checks that need
//! the file (offsets, sizes) live in [`crate::image`].

mod bat;
mod footer;
mod geometry;
mod header;
pub mod placement;

pub use bat::{bitmap_size, entry_offset, Bat, SectorBitmap, UNALLOCATED};
pub use footer::off as footer_fields;
pub use footer::{
    DiskType, Footer, CHECKSUM_OFFSET as FOOTER_CHECKSUM_OFFSET, FOOTER_SIZE, LEGACY_FOOTER_SIZE,
};
pub use geometry::Geometry;
pub use header::field_offset as header_fields;
pub use header::{DynamicHeader, ParentLocator, PlatformCode, HEADER_SIZE};

use std::fmt;

/// A sector is 512 bytes.
pub const SECTOR: u64 = 512;

/// The largest virtual size the VHD format holds: 2040 GiB.
pub const MAX_VHD_SIZE: u64 = 2040 * 1024 * 1024 * 1024;

/// Seconds from the Unix epoch to the VHD epoch, 2000-01-01 00:00:00 UTC.
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;

/// The checksum of the specification: the one's complement of the sum of
/// all bytes, with the four bytes of the checksum field taken as zero.
pub fn checksum(bytes: &[u8], field_offset: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !(field_offset..field_offset + 4).contains(&i) {
            sum = sum.wrapping_add(u32::from(b));
        }
    }
    !sum
}

/// A 16-byte unique id, kept and printed in on-disk (RFC 4122) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A random version-4 id from the operating system's generator.
    pub fn random() -> Uuid {
        let mut b = [0u8; 16];
        let mut filled = 0;
        while filled < b.len() {
            match rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty()) {
                Ok(n) => filled += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => {
                    // No kernel generator: fall back on time and address entropy.
                    let t = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0);
                    let addr = &b as *const _ as usize as u128;
                    b = (t ^ (addr << 64) ^ u128::from(std::process::id())).to_be_bytes();
                    break;
                }
            }
        }
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Uuid(b)
    }

    /// True for the all-zero id.
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uuid({self})")
    }
}

/// A VHD timestamp: seconds since 2000-01-01 00:00:00 UTC.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Timestamp(pub u32);

impl Timestamp {
    /// Now, saturated to the field's range.
    pub fn now() -> Timestamp {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(VHD_EPOCH_UNIX);
        Timestamp(u32::try_from(unix.saturating_sub(VHD_EPOCH_UNIX)).unwrap_or(u32::MAX))
    }

    /// Seconds since the Unix epoch.
    pub fn unix(&self) -> u64 {
        VHD_EPOCH_UNIX + u64::from(self.0)
    }
}

impl fmt::Display for Timestamp {
    /// ISO 8601 in UTC, e.g. `2020-03-24T16:35:33Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.unix();
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60
        )
    }
}

/// A four-character code (creator application, host OS, platform code),
/// printed with non-printable bytes escaped.
pub fn fourcc(b: [u8; 4]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                (c as char).to_string()
            } else {
                format!("\\x{c:02x}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_utc_dates() {
        // Values from the corpus manifest.
        assert_eq!(Timestamp(638_382_933).to_string(), "2020-03-24T16:35:33Z");
        assert_eq!(Timestamp(0).to_string(), "2000-01-01T00:00:00Z");
        assert_eq!(Timestamp(848_634_016).to_string(), "2026-11-22T03:40:16Z");
    }

    #[test]
    fn uuids_print_in_disk_order() {
        let u = Uuid([
            0xb8, 0x95, 0xe4, 0x18, 0x38, 0x94, 0xe7, 0x44, 0x9a, 0x88, 0x9a, 0x42, 0x0b, 0xe4,
            0xe5, 0xca,
        ]);
        assert_eq!(u.to_string(), "b895e418-3894-e744-9a88-9a420be4e5ca");
        let r = Uuid::random();
        assert_ne!(r, Uuid::random());
        assert_eq!(r.0[6] >> 4, 4);
    }

    #[test]
    fn fourcc_escapes() {
        assert_eq!(fourcc(*b"tap\0"), "tap\\x00");
        assert_eq!(fourcc(*b"win "), "win ");
    }
}
