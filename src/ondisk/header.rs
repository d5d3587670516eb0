//! The 1024-byte dynamic disk header and its eight parent locator entries.

use super::{checksum, Timestamp, Uuid};
use crate::error::{Error, Result, Structure};
use byteorder::{BigEndian as BE, ByteOrder};

/// Bytes in the dynamic disk header.
pub const HEADER_SIZE: usize = 1024;

#[allow(missing_docs)]
mod off {
    pub const COOKIE: usize = 0;
    pub const DATA_OFFSET: usize = 8;
    pub const TABLE_OFFSET: usize = 16;
    pub const HEADER_VERSION: usize = 24;
    pub const MAX_TABLE_ENTRIES: usize = 28;
    pub const BLOCK_SIZE: usize = 32;
    pub const CHECKSUM: usize = 36;
    pub const PARENT_UNIQUE_ID: usize = 40;
    pub const PARENT_TIMESTAMP: usize = 56;
    pub const PARENT_UNICODE_NAME: usize = 64;
    pub const PARENT_LOCATORS: usize = 576;
    pub const LOCATOR_SIZE: usize = 24;
    /// Offsets within one 24-byte locator entry.
    pub const LOCATOR_PLATFORM_CODE: usize = 0;
    pub const LOCATOR_DATA_SPACE: usize = 4;
    pub const LOCATOR_DATA_LENGTH: usize = 8;
    pub const LOCATOR_RESERVED: usize = 12;
    pub const LOCATOR_DATA_OFFSET: usize = 16;
}

/// Offsets of fields, for errors raised outside this module.
#[allow(missing_docs)]
pub mod field_offset {
    pub use super::off::*;
}

/// The dynamic header's cookie.
pub const COOKIE: &[u8; 8] = b"cxsparse";

/// A parent locator's platform code (offset 0 of the entry).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PlatformCode {
    /// 0: the entry is unused.
    None,
    /// `Wi2r`: deprecated relative Windows path.
    Wi2r,
    /// `Wi2k`: deprecated absolute Windows path.
    Wi2k,
    /// `W2ru`: relative Windows path, UTF-16LE.
    W2ru,
    /// `W2ku`: absolute Windows path, UTF-16LE.
    W2ku,
    /// `Mac `: a Mac OS alias record.
    Mac,
    /// `MacX`: a UTF-8 `file://` URL.
    MacX,
    /// Anything else.
    Other(u32),
}

impl PlatformCode {
    /// From the field's value.
    pub fn from_code(v: u32) -> PlatformCode {
        match &v.to_be_bytes() {
            [0, 0, 0, 0] => PlatformCode::None,
            b"Wi2r" => PlatformCode::Wi2r,
            b"Wi2k" => PlatformCode::Wi2k,
            b"W2ru" => PlatformCode::W2ru,
            b"W2ku" => PlatformCode::W2ku,
            b"Mac " => PlatformCode::Mac,
            b"MacX" => PlatformCode::MacX,
            _ => PlatformCode::Other(v),
        }
    }

    /// The field's value.
    pub fn code(self) -> u32 {
        let b: &[u8; 4] = match self {
            PlatformCode::None => return 0,
            PlatformCode::Wi2r => b"Wi2r",
            PlatformCode::Wi2k => b"Wi2k",
            PlatformCode::W2ru => b"W2ru",
            PlatformCode::W2ku => b"W2ku",
            PlatformCode::Mac => b"Mac ",
            PlatformCode::MacX => b"MacX",
            PlatformCode::Other(v) => return v,
        };
        u32::from_be_bytes(*b)
    }
}

/// One 24-byte parent locator entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ParentLocator {
    /// Entry offset 0: the platform code.
    pub platform_code: PlatformCode,
    /// Entry offset 4: space reserved for the data, documented in sectors,
    /// stored in bytes by many writers.
    pub data_space: u32,
    /// Entry offset 8: length of the data in bytes.
    pub data_length: u32,
    /// Entry offset 12: reserved.
    pub reserved: u32,
    /// Entry offset 16: absolute file offset of the data.
    pub data_offset: u64,
}

impl ParentLocator {
    /// An unused entry.
    pub const EMPTY: ParentLocator = ParentLocator {
        platform_code: PlatformCode::None,
        data_space: 0,
        data_length: 0,
        reserved: 0,
        data_offset: 0,
    };

    /// True when the entry names no locator.
    pub fn is_empty(&self) -> bool {
        self.platform_code == PlatformCode::None
    }

    fn parse(b: &[u8]) -> ParentLocator {
        ParentLocator {
            platform_code: PlatformCode::from_code(BE::read_u32(&b[off::LOCATOR_PLATFORM_CODE..])),
            data_space: BE::read_u32(&b[off::LOCATOR_DATA_SPACE..]),
            data_length: BE::read_u32(&b[off::LOCATOR_DATA_LENGTH..]),
            reserved: BE::read_u32(&b[off::LOCATOR_RESERVED..]),
            data_offset: BE::read_u64(&b[off::LOCATOR_DATA_OFFSET..]),
        }
    }

    fn write(&self, b: &mut [u8]) {
        BE::write_u32(
            &mut b[off::LOCATOR_PLATFORM_CODE..],
            self.platform_code.code(),
        );
        BE::write_u32(&mut b[off::LOCATOR_DATA_SPACE..], self.data_space);
        BE::write_u32(&mut b[off::LOCATOR_DATA_LENGTH..], self.data_length);
        BE::write_u32(&mut b[off::LOCATOR_RESERVED..], self.reserved);
        BE::write_u64(&mut b[off::LOCATOR_DATA_OFFSET..], self.data_offset);
    }
}

/// The dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Offset 8: unused, all ones.
    pub data_offset: u64,
    /// Offset 16: absolute offset of the BAT.
    pub table_offset: u64,
    /// Offset 24: 0x00010000.
    pub header_version: u32,
    /// Offset 28: number of BAT entries.
    pub max_table_entries: u32,
    /// Offset 32: bytes of data per block.
    pub block_size: u32,
    /// Offset 36: the checksum as stored.
    pub checksum: u32,
    /// Offset 40: the parent's unique id (differencing disks).
    pub parent_unique_id: Uuid,
    /// Offset 56: the parent's modification time (differencing disks).
    pub parent_timestamp: Timestamp,
    /// Offset 60: reserved.
    pub reserved1: u32,
    /// Offset 64: the parent's name, 256 UTF-16 big-endian code units.
    pub parent_unicode_name: [u16; 256],
    /// Offset 576: eight parent locator entries.
    pub parent_locators: [ParentLocator; 8],
}

impl DynamicHeader {
    /// The only header version.
    pub const VERSION: u32 = 0x0001_0000;

    /// A header for a new dynamic disk.
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> DynamicHeader {
        DynamicHeader {
            data_offset: u64::MAX,
            table_offset,
            header_version: Self::VERSION,
            max_table_entries,
            block_size,
            checksum: 0,
            parent_unique_id: Uuid::default(),
            parent_timestamp: Timestamp(0),
            reserved1: 0,
            parent_unicode_name: [0; 256],
            parent_locators: [ParentLocator::EMPTY; 8],
        }
    }

    /// Parses a header; only the cookie is checked. `base` is its absolute offset.
    pub fn parse(b: &[u8; HEADER_SIZE], base: u64) -> Result<DynamicHeader> {
        if &b[off::COOKIE..off::COOKIE + 8] != COOKIE {
            return Err(Error::corrupt(
                Structure::DynamicHeader,
                "cookie",
                base,
                format!("{:?}", String::from_utf8_lossy(&b[..8])),
                "\"cxsparse\"",
            ));
        }
        let mut name = [0u16; 256];
        for (i, u) in name.iter_mut().enumerate() {
            *u = BE::read_u16(&b[off::PARENT_UNICODE_NAME + 2 * i..]);
        }
        let mut locators = [ParentLocator::EMPTY; 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let at = off::PARENT_LOCATORS + i * off::LOCATOR_SIZE;
            *l = ParentLocator::parse(&b[at..at + off::LOCATOR_SIZE]);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[off::PARENT_UNIQUE_ID..off::PARENT_UNIQUE_ID + 16]);
        Ok(DynamicHeader {
            data_offset: BE::read_u64(&b[off::DATA_OFFSET..]),
            table_offset: BE::read_u64(&b[off::TABLE_OFFSET..]),
            header_version: BE::read_u32(&b[off::HEADER_VERSION..]),
            max_table_entries: BE::read_u32(&b[off::MAX_TABLE_ENTRIES..]),
            block_size: BE::read_u32(&b[off::BLOCK_SIZE..]),
            checksum: BE::read_u32(&b[off::CHECKSUM..]),
            parent_unique_id: Uuid(id),
            parent_timestamp: Timestamp(BE::read_u32(&b[off::PARENT_TIMESTAMP..])),
            reserved1: BE::read_u32(&b[off::PARENT_TIMESTAMP + 4..]),
            parent_unicode_name: name,
            parent_locators: locators,
        })
    }

    /// The checksum of `bytes` as they are.
    pub fn compute_checksum(b: &[u8; HEADER_SIZE]) -> u32 {
        checksum(b, off::CHECKSUM)
    }

    /// Checks the stored checksum against the bytes.
    pub fn verify_checksum(b: &[u8; HEADER_SIZE], base: u64) -> Result<()> {
        let found = BE::read_u32(&b[off::CHECKSUM..]);
        let computed = Self::compute_checksum(b);
        if found == computed {
            Ok(())
        } else {
            Err(Error::Checksum {
                path: None,
                structure: Structure::DynamicHeader,
                offset: base.saturating_add(off::CHECKSUM as u64),
                found,
                computed,
            })
        }
    }

    /// The 1024 bytes of the header with a freshly computed checksum.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[off::COOKIE..off::COOKIE + 8].copy_from_slice(COOKIE);
        BE::write_u64(&mut b[off::DATA_OFFSET..], self.data_offset);
        BE::write_u64(&mut b[off::TABLE_OFFSET..], self.table_offset);
        BE::write_u32(&mut b[off::HEADER_VERSION..], self.header_version);
        BE::write_u32(&mut b[off::MAX_TABLE_ENTRIES..], self.max_table_entries);
        BE::write_u32(&mut b[off::BLOCK_SIZE..], self.block_size);
        b[off::PARENT_UNIQUE_ID..off::PARENT_UNIQUE_ID + 16]
            .copy_from_slice(&self.parent_unique_id.0);
        BE::write_u32(&mut b[off::PARENT_TIMESTAMP..], self.parent_timestamp.0);
        BE::write_u32(&mut b[off::PARENT_TIMESTAMP + 4..], self.reserved1);
        for (i, u) in self.parent_unicode_name.iter().enumerate() {
            BE::write_u16(&mut b[off::PARENT_UNICODE_NAME + 2 * i..], *u);
        }
        for (i, l) in self.parent_locators.iter().enumerate() {
            let at = off::PARENT_LOCATORS + i * off::LOCATOR_SIZE;
            l.write(&mut b[at..at + off::LOCATOR_SIZE]);
        }
        let sum = checksum(&b, off::CHECKSUM);
        BE::write_u32(&mut b[off::CHECKSUM..], sum);
        b
    }

    /// The same header with its `checksum` field set from its bytes.
    pub fn with_checksum(mut self) -> DynamicHeader {
        self.checksum = Self::compute_checksum(&self.to_bytes());
        self
    }

    /// The parent's name, up to the first NUL.
    pub fn parent_name(&self) -> String {
        let end = self
            .parent_unicode_name
            .iter()
            .position(|&u| u == 0)
            .unwrap_or(256);
        String::from_utf16_lossy(&self.parent_unicode_name[..end])
    }

    /// Sets the parent's name (truncated to 256 UTF-16 code units).
    pub fn set_parent_name(&mut self, name: &str) {
        self.parent_unicode_name = [0; 256];
        for (slot, u) in self.parent_unicode_name.iter_mut().zip(name.encode_utf16()) {
            *slot = u;
        }
    }
}
