//! The VHDX structures ([MS-VHDX] section 2), as types: parsing from bytes
//! only, no I/O. Every integer is **little-endian**. Offsets in the comments
//! are from the start of the structure.

use super::VhdxStructure;
use crate::error::{Error, Result, Structure};
use std::fmt;

/// 1 KiB.
pub const KIB: u64 = 1 << 10;
/// 1 MiB: the unit of region offsets and lengths, of the log, and of BAT file offsets.
pub const MIB: u64 = 1 << 20;

/// Signature at offset 0 of the file.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// The two headers, at 64 KiB and 128 KiB.
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// A header is 4 KiB (its checksum covers all of it).
pub const HEADER_SIZE: usize = 4096;
/// The two region tables, at 192 KiB and 256 KiB.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// A region table is 64 KiB (its checksum covers all of it).
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// The most entries a region table or a metadata table may hold.
pub const MAX_TABLE_ENTRIES: u32 = 2047;
/// The metadata table at the start of the metadata region is 64 KiB.
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// A metadata item is at most 1 MiB.
pub const MAX_METADATA_ITEM: u32 = 1 << 20;
/// Log sectors are 4 KiB.
pub const LOG_SECTOR: u64 = 4096;
/// Block sizes allowed by the specification: powers of two in this range.
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// See [`MIN_BLOCK_SIZE`].
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// The largest virtual disk the specification allows: 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

fn st(s: VhdxStructure) -> Structure {
    Structure::Vhdx(s)
}

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// CRC-32C of `b` with the four bytes at `field` taken as zero (how every
/// VHDX checksum is computed).
pub fn checksum_with_zero_field(b: &[u8], field: usize) -> u32 {
    let crc = crc32c::crc32c(&b[..field]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &b[field + 4..])
}

/// A GUID as stored on disk: the first three fields little-endian, the last
/// eight bytes as they are.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// All zeros (an empty log GUID means a clean log).
    pub const ZERO: Guid = Guid([0; 16]);

    /// The GUID written `d1-d2-d3-d4[0..2]-d4[2..8]`.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// Reads 16 bytes at `at`.
    pub fn read(b: &[u8], at: usize) -> Guid {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[at..at + 16]);
        Guid(a)
    }

    /// True for the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`, in either case, with
    /// or without braces (as `parent_linkage` writes it); `None` otherwise.
    pub fn parse(text: &str) -> Option<Guid> {
        let t = text.trim();
        let t = t
            .strip_prefix('{')
            .and_then(|x| x.strip_suffix('}'))
            .unwrap_or(t);
        let parts: Vec<&str> = t.split('-').collect();
        if parts.iter().map(|p| p.len()).ne([8, 4, 4, 4, 12])
            || !t.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
        {
            return None;
        }
        let d1 = u32::from_str_radix(parts[0], 16).ok()?;
        let d2 = u16::from_str_radix(parts[1], 16).ok()?;
        let d3 = u16::from_str_radix(parts[2], 16).ok()?;
        let rest = format!("{}{}", parts[3], parts[4]);
        let mut d4 = [0u8; 8];
        for (i, b) in d4.iter_mut().enumerate() {
            *b = u8::from_str_radix(&rest[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Guid::from_fields(d1, d2, d3, d4))
    }
}

impl fmt::Display for Guid {
    /// `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`, upper case, as the
    /// specification and Windows write GUIDs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-",
            le32(b, 0),
            le16(b, 4),
            le16(b, 6),
            b[8],
            b[9]
        )?;
        for x in &b[10..] {
            write!(f, "{x:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

/// Region: the block allocation table.
pub const BAT_REGION: Guid = Guid::from_fields(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// Region: the metadata.
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// Metadata item: file parameters (block size, flags).
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Metadata item: virtual disk size.
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Metadata item: page 83 data (the virtual disk's SCSI identifier).
pub const PAGE_83_DATA: Guid = Guid::from_fields(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Metadata item: parent locator (differencing disks).
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// Locator type of a parent locator whose parent is a VHDX file.
pub const VHDX_PARENT_LOCATOR_TYPE: Guid = Guid::from_fields(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// One of the two headers (4 KiB at 64 KiB and 128 KiB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 4: CRC-32C of the 4 KiB with this field zero.
    pub checksum: u32,
    /// 8: the valid header with the larger sequence number is current.
    pub sequence_number: u64,
    /// 16: changes whenever the file is written.
    pub file_write_guid: Guid,
    /// 32: changes whenever the virtual disk's content is written; a child
    /// names its parent by it (`parent_linkage`).
    pub data_write_guid: Guid,
    /// 48: zero when the log is empty; else the GUID of the log entries to replay.
    pub log_guid: Guid,
    /// 64: must be 0.
    pub log_version: u16,
    /// 66: must be 1.
    pub version: u16,
    /// 68: bytes of log, a multiple of 1 MiB.
    pub log_length: u32,
    /// 72: absolute offset of the log, a multiple of 1 MiB, at least 1 MiB.
    pub log_offset: u64,
}

impl Header {
    /// Parses header `n` (1 or 2) read from absolute offset `at`: signature
    /// `head` and checksum. The other rules are checked on the header in use.
    pub fn parse(b: &[u8], n: u8, at: u64) -> Result<Header> {
        let s = st(VhdxStructure::Header(n));
        if b.len() < HEADER_SIZE {
            return Err(Error::corrupt(
                s,
                "signature",
                at,
                format!("{} bytes to the end of the file", b.len()),
                "a 4096-byte header",
            ));
        }
        let b = &b[..HEADER_SIZE];
        if &b[..4] != b"head" {
            return Err(Error::corrupt(
                s,
                "signature",
                at,
                format!("{:02x?}", &b[..4]),
                "\"head\"",
            ));
        }
        let checksum = le32(b, 4);
        let computed = checksum_with_zero_field(b, 4);
        if checksum != computed {
            return Err(Error::corrupt(
                s,
                "checksum",
                at + 4,
                format!("{checksum:#010x}"),
                format!("{computed:#010x} (CRC-32C of the 4 KiB header)"),
            ));
        }
        Ok(Header {
            checksum,
            sequence_number: le64(b, 8),
            file_write_guid: Guid::read(b, 16),
            data_write_guid: Guid::read(b, 32),
            log_guid: Guid::read(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }
}

/// One entry of a region table (32 bytes at 16 + 32 × i).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    /// 0: what the region is ([`BAT_REGION`], [`METADATA_REGION`], or unknown).
    pub guid: Guid,
    /// 16: absolute offset, a multiple of 1 MiB, at least 1 MiB.
    pub file_offset: u64,
    /// 24: bytes, a multiple of 1 MiB.
    pub length: u32,
    /// 28, bit 0: a reader that does not know the region must refuse the file.
    pub required: bool,
}

/// A region table (64 KiB at 192 KiB and 256 KiB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionTable {
    /// 4: CRC-32C of the 64 KiB with this field zero.
    pub checksum: u32,
    /// 16..: the entries (8: entry count, at most 2047).
    pub entries: Vec<RegionEntry>,
}

impl RegionTable {
    /// Parses region table `n` (1 or 2), read from absolute offset `at`:
    /// signature `regi`, checksum, entry count.
    pub fn parse(b: &[u8], n: u8, at: u64) -> Result<RegionTable> {
        let s = st(VhdxStructure::RegionTable(n));
        if b.len() < REGION_TABLE_SIZE {
            return Err(Error::corrupt(
                s,
                "signature",
                at,
                format!("{} bytes to the end of the file", b.len()),
                "a 65536-byte region table",
            ));
        }
        let b = &b[..REGION_TABLE_SIZE];
        if &b[..4] != b"regi" {
            return Err(Error::corrupt(
                s,
                "signature",
                at,
                format!("{:02x?}", &b[..4]),
                "\"regi\"",
            ));
        }
        let checksum = le32(b, 4);
        let computed = checksum_with_zero_field(b, 4);
        if checksum != computed {
            return Err(Error::corrupt(
                s,
                "checksum",
                at + 4,
                format!("{checksum:#010x}"),
                format!("{computed:#010x} (CRC-32C of the 64 KiB table)"),
            ));
        }
        let count = le32(b, 8);
        if count > MAX_TABLE_ENTRIES {
            return Err(Error::corrupt(
                s,
                "entry count",
                at + 8,
                count,
                format!("at most {MAX_TABLE_ENTRIES}"),
            ));
        }
        let entries = (0..count as usize)
            .map(|i| {
                let e = 16 + 32 * i;
                RegionEntry {
                    guid: Guid::read(b, e),
                    file_offset: le64(b, e + 16),
                    length: le32(b, e + 24),
                    required: le32(b, e + 28) & 1 != 0,
                }
            })
            .collect();
        Ok(RegionTable { checksum, entries })
    }
}

/// One entry of the metadata table (32 bytes at 32 + 32 × i).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    /// 0: what the item is.
    pub item_id: Guid,
    /// 16: offset of the item from the start of the metadata region (at
    /// least 64 KiB; 0 when the length is 0).
    pub offset: u32,
    /// 20: bytes, at most 1 MiB.
    pub length: u32,
    /// 24, bit 0: a user item (the system items below have it clear).
    pub is_user: bool,
    /// 24, bit 1: describes the virtual disk rather than the file.
    pub is_virtual_disk: bool,
    /// 24, bit 2: a reader that does not know the item must refuse the file.
    pub is_required: bool,
}

/// Parses the metadata table (64 KiB at the start of the metadata region,
/// absolute offset `at`): signature `metadata`, entry count, entries.
pub fn parse_metadata_table(b: &[u8], at: u64) -> Result<Vec<MetadataEntry>> {
    let s = st(VhdxStructure::Metadata);
    if &b[..8] != b"metadata" {
        return Err(Error::corrupt(
            s,
            "signature",
            at,
            format!("{:02x?}", &b[..8]),
            "\"metadata\"",
        ));
    }
    let count = u32::from(le16(b, 10));
    if count > MAX_TABLE_ENTRIES {
        return Err(Error::corrupt(
            s,
            "entry count",
            at + 10,
            count,
            format!("at most {MAX_TABLE_ENTRIES}"),
        ));
    }
    Ok((0..count as usize)
        .map(|i| {
            let e = 32 + 32 * i;
            let flags = le32(b, e + 24);
            MetadataEntry {
                item_id: Guid::read(b, e),
                offset: le32(b, e + 16),
                length: le32(b, e + 20),
                is_user: flags & 1 != 0,
                is_virtual_disk: flags & 2 != 0,
                is_required: flags & 4 != 0,
            }
        })
        .collect())
}

/// The file parameters item (8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileParameters {
    /// 0: bytes of virtual disk per payload block; a power of two, 1 MiB to 256 MiB.
    pub block_size: u32,
    /// 4, bit 0: blocks are allocated up front (a fixed disk).
    pub leave_blocks_allocated: bool,
    /// 4, bit 1: a differencing disk.
    pub has_parent: bool,
}

/// The state of a payload block (low 3 bits of its BAT entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadState {
    /// 0: never written: zeros, or the parent's data in a differencing disk.
    NotPresent,
    /// 1: content undefined (read as zeros).
    Undefined,
    /// 2: zeros.
    Zero,
    /// 3: unmapped by a trim (read as zeros).
    Unmapped,
    /// 6: all of the block is in the file.
    FullyPresent,
    /// 7: the sector bitmap says which sectors are in the file; the others
    /// are the parent's.
    PartiallyPresent,
}

impl PayloadState {
    /// The state of a 3-bit code, `None` for the reserved codes 4 and 5.
    pub fn from_code(c: u8) -> Option<PayloadState> {
        Some(match c {
            0 => PayloadState::NotPresent,
            1 => PayloadState::Undefined,
            2 => PayloadState::Zero,
            3 => PayloadState::Unmapped,
            6 => PayloadState::FullyPresent,
            7 => PayloadState::PartiallyPresent,
            _ => return None,
        })
    }
}

/// Sector bitmap block state: not present.
pub const SB_BLOCK_NOT_PRESENT: u8 = 0;
/// Sector bitmap block state: present.
pub const SB_BLOCK_PRESENT: u8 = 6;

/// A BAT entry (8 bytes): state in bits 0..3, reserved bits 3..20, file
/// offset in MiB in bits 20..64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BatEntry(pub u64);

impl BatEntry {
    /// Bits 0..3.
    pub fn state(self) -> u8 {
        (self.0 & 7) as u8
    }
    /// Bits 20..64: file offset in MiB.
    pub fn file_offset_mb(self) -> u64 {
        self.0 >> 20
    }
    /// The absolute file offset of the block (at most 2^64 − 1 MiB, so it fits).
    pub fn file_offset(self) -> u64 {
        self.file_offset_mb() << 20
    }
}

/// The parent locator item of a differencing disk: a type and key/value pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLocator {
    /// 0: the locator type ([`VHDX_PARENT_LOCATOR_TYPE`] for a VHDX parent).
    pub locator_type: Guid,
    /// The key/value pairs, in file order (keys and values are UTF-16LE on disk).
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// Parses the item `b` read from absolute offset `at`: a 20-byte header
    /// (type GUID, reserved u16, key/value count u16) then 12-byte entries
    /// (key offset u32, value offset u32, key length u16, value length u16;
    /// offsets from the start of the item).
    pub fn parse(b: &[u8], at: u64) -> Result<ParentLocator> {
        let s = st(VhdxStructure::ParentLocator);
        if b.len() < 20 {
            return Err(Error::corrupt(
                s,
                "length",
                at,
                b.len(),
                "at least 20 bytes",
            ));
        }
        let locator_type = Guid::read(b, 0);
        let count = le16(b, 18) as usize;
        if 20 + 12 * count > b.len() {
            return Err(Error::corrupt(
                s,
                "key value count",
                at + 18,
                count,
                format!("entries within the {}-byte item", b.len()),
            ));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let e = 20 + 12 * i;
            let eat = at + e as u64;
            let string = |off: u32, len: u16, field: &'static str| -> Result<String> {
                let (o, l) = (off as usize, len as usize);
                if l % 2 != 0 || o.checked_add(l).is_none_or(|end| end > b.len()) {
                    return Err(Error::corrupt(
                        s,
                        field,
                        eat,
                        format!("{l} bytes at item offset {o}"),
                        format!(
                            "an even length within the {}-byte item (entry {i})",
                            b.len()
                        ),
                    ));
                }
                let units: Vec<u16> = b[o..o + l]
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16(&units).map_err(|_| {
                    Error::corrupt(
                        s,
                        field,
                        at + o as u64,
                        "invalid UTF-16",
                        format!("UTF-16LE text (entry {i})"),
                    )
                })
            };
            let key = string(le32(b, e), le16(b, e + 8), "key")?;
            let value = string(le32(b, e + 4), le16(b, e + 10), "value")?;
            entries.push((key, value));
        }
        Ok(ParentLocator {
            locator_type,
            entries,
        })
    }

    /// The value of `key` (the first, if the file repeats it).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `parent_linkage`: the parent's data write GUID, as `{GUID}` text.
    pub fn parent_linkage(&self) -> Option<&str> {
        self.get("parent_linkage")
    }

    /// `parent_linkage` parsed: the data write GUID the parent must have.
    /// `None` when the key is missing or is not a GUID.
    pub fn parent_linkage_guid(&self) -> Option<Guid> {
        self.parent_linkage().and_then(Guid::parse)
    }

    /// The parent's paths in the order the specification says to try them:
    /// `relative_path`, `volume_path`, `absolute_win32_path` (those present).
    pub fn paths(&self) -> Vec<(&'static str, &str)> {
        ["relative_path", "volume_path", "absolute_win32_path"]
            .into_iter()
            .filter_map(|k| self.get(k).map(|v| (k, v)))
            .collect()
    }
}
