//! The 512-byte hard disk footer (and the old 511-byte form).

use super::{checksum, Geometry, Timestamp, Uuid};
use crate::error::{Error, Result, Structure};
use byteorder::{BigEndian as BE, ByteOrder};

/// Bytes in a footer.
pub const FOOTER_SIZE: usize = 512;
/// Bytes in the footer written by Virtual PC before 2004 (one reserved byte short).
pub const LEGACY_FOOTER_SIZE: usize = 511;

/// Field offsets within the footer, for errors and checks that name a
/// field's absolute offset (footer offset + field offset).
#[allow(missing_docs)]
pub mod off {
    pub const COOKIE: usize = 0;
    pub const FEATURES: usize = 8;
    pub const FORMAT_VERSION: usize = 12;
    pub const DATA_OFFSET: usize = 16;
    pub const TIMESTAMP: usize = 24;
    pub const CREATOR_APP: usize = 28;
    pub const CREATOR_VERSION: usize = 32;
    pub const CREATOR_HOST_OS: usize = 36;
    pub const ORIGINAL_SIZE: usize = 40;
    pub const CURRENT_SIZE: usize = 48;
    pub const GEOMETRY: usize = 56;
    pub const DISK_TYPE: usize = 60;
    pub const CHECKSUM: usize = 64;
    pub const UNIQUE_ID: usize = 68;
    pub const SAVED_STATE: usize = 84;
    pub const RESERVED: usize = 85;
}

/// Offset of the checksum field, for callers that report it.
pub const CHECKSUM_OFFSET: usize = off::CHECKSUM;

/// The footer's cookie.
pub const COOKIE: &[u8; 8] = b"conectix";

/// The disk type field (offset 60).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DiskType {
    /// 0: none.
    None,
    /// 2: fixed hard disk.
    Fixed,
    /// 3: dynamic hard disk.
    Dynamic,
    /// 4: differencing hard disk.
    Differencing,
    /// Any other value (1, 5 and 6 are obsolete).
    Other(u32),
}

impl DiskType {
    /// The field's value.
    pub fn code(self) -> u32 {
        match self {
            DiskType::None => 0,
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
            DiskType::Other(v) => v,
        }
    }

    /// From the field's value.
    pub fn from_code(v: u32) -> DiskType {
        match v {
            0 => DiskType::None,
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            v => DiskType::Other(v),
        }
    }
}

/// The hard disk footer, field by field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Offset 8: bit 0 temporary disk, bit 1 reserved (always set).
    pub features: u32,
    /// Offset 12: 0x00010000.
    pub format_version: u32,
    /// Offset 16: absolute offset of the dynamic header; all ones for fixed disks.
    pub data_offset: u64,
    /// Offset 24: creation time, seconds since 2000-01-01 UTC.
    pub timestamp: Timestamp,
    /// Offset 28: the application that created the image (`vpc `, `win `, `qemu`...).
    pub creator_app: [u8; 4],
    /// Offset 32: the creator's version, major in the high u16.
    pub creator_version: u32,
    /// Offset 36: `Wi2k` or `Mac `.
    pub creator_host_os: [u8; 4],
    /// Offset 40: the virtual size at creation, bytes.
    pub original_size: u64,
    /// Offset 48: the virtual size now, bytes. The size vhdkit presents.
    pub current_size: u64,
    /// Offset 56: cylinders, heads, sectors per track.
    pub geometry: Geometry,
    /// Offset 60: the disk type.
    pub disk_type: DiskType,
    /// Offset 64: the checksum as stored.
    pub checksum: u32,
    /// Offset 68: the disk's unique id.
    pub unique_id: Uuid,
    /// Offset 84: 1 when the virtual machine was saved.
    pub saved_state: u8,
}

impl Footer {
    /// The data offset value of a fixed disk.
    pub const NO_DATA_OFFSET: u64 = u64::MAX;
    /// The features value with only the reserved bit set.
    pub const FEATURES_RESERVED: u32 = 0x2;
    /// The only format version.
    pub const VERSION: u32 = 0x0001_0000;
    /// Our creator application code.
    pub const CREATOR_APP: [u8; 4] = *b"vhdk";
    /// The Windows host OS code.
    pub const HOST_WINDOWS: [u8; 4] = *b"Wi2k";

    /// A footer for a new image of `size` bytes, with the spec's geometry,
    /// our creator code, the current time and a random unique id. The
    /// checksum is computed by [`Footer::to_bytes`].
    pub fn new(disk_type: DiskType, size: u64, data_offset: u64) -> Footer {
        Footer {
            features: Self::FEATURES_RESERVED,
            format_version: Self::VERSION,
            data_offset,
            timestamp: Timestamp::now(),
            creator_app: Self::CREATOR_APP,
            creator_version: 0x0001_0000,
            creator_host_os: Self::HOST_WINDOWS,
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type,
            checksum: 0,
            unique_id: Uuid::random(),
            saved_state: 0,
        }
    }

    /// True when `bytes` starts with the footer cookie.
    pub fn has_cookie(bytes: &[u8]) -> bool {
        bytes.starts_with(COOKIE)
    }

    /// Parses a footer. Only the cookie is checked here; the checksum is
    /// verified by [`Footer::verify_checksum`], and fields that need the
    /// file's context by the image layer. `base` is the footer's absolute
    /// offset, used in errors.
    pub fn parse(b: &[u8; FOOTER_SIZE], base: u64, structure: Structure) -> Result<Footer> {
        if &b[off::COOKIE..off::COOKIE + 8] != COOKIE {
            return Err(Error::corrupt(
                structure,
                "cookie",
                base,
                format!("{:?}", String::from_utf8_lossy(&b[..8])),
                "\"conectix\"",
            ));
        }
        let four = |o: usize| -> [u8; 4] { [b[o], b[o + 1], b[o + 2], b[o + 3]] };
        Ok(Footer {
            features: BE::read_u32(&b[off::FEATURES..]),
            format_version: BE::read_u32(&b[off::FORMAT_VERSION..]),
            data_offset: BE::read_u64(&b[off::DATA_OFFSET..]),
            timestamp: Timestamp(BE::read_u32(&b[off::TIMESTAMP..])),
            creator_app: four(off::CREATOR_APP),
            creator_version: BE::read_u32(&b[off::CREATOR_VERSION..]),
            creator_host_os: four(off::CREATOR_HOST_OS),
            original_size: BE::read_u64(&b[off::ORIGINAL_SIZE..]),
            current_size: BE::read_u64(&b[off::CURRENT_SIZE..]),
            geometry: Geometry::from_bytes(four(off::GEOMETRY)),
            disk_type: DiskType::from_code(BE::read_u32(&b[off::DISK_TYPE..])),
            checksum: BE::read_u32(&b[off::CHECKSUM..]),
            unique_id: Uuid(
                b[off::UNIQUE_ID..off::UNIQUE_ID + 16]
                    .try_into()
                    .unwrap_or([0; 16]),
            ),
            saved_state: b[off::SAVED_STATE],
        })
    }

    /// The checksum of `bytes` as they are.
    pub fn compute_checksum(b: &[u8; FOOTER_SIZE]) -> u32 {
        checksum(b, off::CHECKSUM)
    }

    /// Checks the stored checksum against the bytes.
    pub fn verify_checksum(b: &[u8; FOOTER_SIZE], base: u64, structure: Structure) -> Result<()> {
        let found = BE::read_u32(&b[off::CHECKSUM..]);
        let computed = Self::compute_checksum(b);
        if found == computed {
            Ok(())
        } else {
            Err(Error::Checksum {
                path: None,
                structure,
                offset: base.saturating_add(off::CHECKSUM as u64),
                found,
                computed,
            })
        }
    }

    /// True when any reserved byte (85..512) is non-zero.
    pub fn reserved_nonzero(b: &[u8; FOOTER_SIZE]) -> bool {
        b[off::RESERVED..].iter().any(|&x| x != 0)
    }

    /// The 512 bytes of the footer, with a freshly computed checksum (the
    /// `checksum` field of `self` is ignored).
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[off::COOKIE..off::COOKIE + 8].copy_from_slice(COOKIE);
        BE::write_u32(&mut b[off::FEATURES..], self.features);
        BE::write_u32(&mut b[off::FORMAT_VERSION..], self.format_version);
        BE::write_u64(&mut b[off::DATA_OFFSET..], self.data_offset);
        BE::write_u32(&mut b[off::TIMESTAMP..], self.timestamp.0);
        b[off::CREATOR_APP..off::CREATOR_APP + 4].copy_from_slice(&self.creator_app);
        BE::write_u32(&mut b[off::CREATOR_VERSION..], self.creator_version);
        b[off::CREATOR_HOST_OS..off::CREATOR_HOST_OS + 4].copy_from_slice(&self.creator_host_os);
        BE::write_u64(&mut b[off::ORIGINAL_SIZE..], self.original_size);
        BE::write_u64(&mut b[off::CURRENT_SIZE..], self.current_size);
        b[off::GEOMETRY..off::GEOMETRY + 4].copy_from_slice(&self.geometry.to_bytes());
        BE::write_u32(&mut b[off::DISK_TYPE..], self.disk_type.code());
        b[off::UNIQUE_ID..off::UNIQUE_ID + 16].copy_from_slice(&self.unique_id.0);
        b[off::SAVED_STATE] = self.saved_state;
        let sum = checksum(&b, off::CHECKSUM);
        BE::write_u32(&mut b[off::CHECKSUM..], sum);
        b
    }

    /// The same footer with its `checksum` field set from its bytes.
    pub fn with_checksum(mut self) -> Footer {
        self.checksum = Self::compute_checksum(&self.to_bytes());
        self
    }

    /// The same footer describing a disk of `size` bytes: current size,
    /// the specification's geometry, and vhdkit as creator. The creator
    /// changes because readers such as qemu take the geometry's size, not
    /// the current size, from images whose creator is `vpc ` or `qemu`, and
    /// the geometry of a freely chosen size is rarely exact.
    pub fn resized(&self, size: u64) -> Footer {
        Footer {
            current_size: size,
            geometry: Geometry::for_size(size),
            creator_app: Self::CREATOR_APP,
            creator_version: Self::new(DiskType::Fixed, 0, 0).creator_version,
            ..self.clone()
        }
    }

    /// The creator version as `major.minor`.
    pub fn creator_version_string(&self) -> String {
        format!(
            "{}.{}",
            self.creator_version >> 16,
            self.creator_version & 0xffff
        )
    }
}
