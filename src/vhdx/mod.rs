//! VHDX, Hyper-V's disk format ([MS-VHDX]), read-only.
//!
//! [`Vhdx::open`] reads the file identifier, both headers (the valid one
//! with the larger sequence number is used), replays a dirty log in memory
//! (the input is never written), reads the region table, the metadata
//! (block size, virtual size, sector sizes, page 83 id, parent locator) and
//! the BAT, and checks every offset and length against the file before it is
//! used. [`Vhdx::map`] then says what each range of the virtual disk is,
//! with the crate's [`Extent`]s, and [`Vhdx::read_exact_at`] reads it.
//!
//! ```no_run
//! # fn main() -> vhdkit::Result<()> {
//! use vhdkit::vhdx::{Vhdx, VhdxOptions};
//! let disk = Vhdx::open("disk.vhdx", &VhdxOptions::new())?;
//! println!("{} bytes, {:?}, blocks of {}", disk.virtual_size(), disk.disk_type(), disk.block_size());
//! let mut first = [0u8; 512];
//! disk.read_exact_at(&mut first, 0)?;
//! for e in disk.map(0, disk.virtual_size())? {
//!     println!("{e:?}");
//! }
//! # Ok(()) }
//! ```
//!
//! Data extents name offsets in the file **as the replayed log leaves it**:
//! read them with [`Vhdx::read_file_at`] (which is a plain read of the file
//! when no log was replayed). A differencing disk's `Parent` extents are left
//! to the caller, who finds the parent with [`Vhdx::parent_locator`].
//!
//! The layout and every rule checked are described in `docs/vhdx-format.md`.

pub mod format;
mod log;

pub use format::{
    BatEntry, FileParameters, Guid, Header, MetadataEntry, ParentLocator, PayloadState,
    RegionEntry, RegionTable,
};
pub use log::LogReplay;

use crate::error::{Error, Result, Structure};
use crate::image::map::push_extent;
use crate::image::{Extent, ExtentKind};
use crate::io::ReadAt;
use format::*;
use log::Overlay;
use std::fmt;
use std::path::{Path, PathBuf};

/// A structure of a VHDX file, for [`Structure::Vhdx`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VhdxStructure {
    /// The file type identifier at offset 0.
    FileIdentifier,
    /// Header 1 (at 64 KiB) or 2 (at 128 KiB).
    Header(u8),
    /// Region table 1 (at 192 KiB) or 2 (at 256 KiB).
    RegionTable(u8),
    /// The metadata region: its table and its items.
    Metadata,
    /// The parent locator metadata item.
    ParentLocator,
    /// The BAT entry of this index.
    BatEntry(u64),
    /// The log as a whole (its place in the file).
    Log,
    /// The log entry at this offset in the log.
    LogEntry(u64),
}

impl fmt::Display for VhdxStructure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VhdxStructure::FileIdentifier => f.write_str("VHDX file identifier"),
            VhdxStructure::Header(n) => write!(f, "VHDX header {n}"),
            VhdxStructure::RegionTable(n) => write!(f, "VHDX region table {n}"),
            VhdxStructure::Metadata => f.write_str("VHDX metadata"),
            VhdxStructure::ParentLocator => f.write_str("VHDX parent locator"),
            VhdxStructure::BatEntry(n) => write!(f, "VHDX BAT entry {n}"),
            VhdxStructure::Log => f.write_str("VHDX log"),
            VhdxStructure::LogEntry(o) => write!(f, "VHDX log entry at log offset {o}"),
        }
    }
}

fn st(s: VhdxStructure) -> Structure {
    Structure::Vhdx(s)
}

/// Limits on what a VHDX file may ask for.
#[derive(Clone, Debug)]
pub struct VhdxOptions {
    max_bat_entries: u64,
}

impl Default for VhdxOptions {
    fn default() -> Self {
        VhdxOptions {
            // 32 TiB in 1 MiB blocks; 64 TiB (the format's limit) in 2 MiB blocks.
            max_bat_entries: 1 << 25,
        }
    }
}

impl VhdxOptions {
    /// Defaults: at most 2^25 BAT entries (256 MiB of table in memory).
    pub fn new() -> Self {
        Self::default()
    }
    /// The most BAT entries (payload and sector bitmap) a file may need.
    pub fn max_bat_entries(mut self, n: u64) -> Self {
        self.max_bat_entries = n;
        self
    }
}

/// What a VHDX virtual disk is, from its file parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiskType {
    /// Leave-blocks-allocated set: every block allocated up front.
    Fixed,
    /// Blocks allocated as they are written.
    Dynamic,
    /// Has-parent set: what is not in the file is the parent's.
    Differencing,
}

impl DiskType {
    /// `fixed`, `dynamic` or `differencing`.
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// An opened VHDX file. Safe to share between threads: every read is positional.
pub struct Vhdx {
    src: Box<dyn ReadAt + Send>,
    path: PathBuf,
    file_len: u64,
    /// The file's length after log replay (beyond `file_len` it reads as zeros).
    logical_len: u64,
    overlay: Overlay,
    header: Header,
    header_index: u8,
    log_replay: Option<LogReplay>,
    region_table_index: u8,
    regions: Vec<RegionEntry>,
    metadata_offset: u64,
    metadata_region_len: u64,
    metadata: Vec<MetadataEntry>,
    params: FileParameters,
    virtual_size: u64,
    logical_sector_size: u32,
    physical_sector_size: u32,
    page83: Guid,
    parent_locator: Option<ParentLocator>,
    bat_offset: u64,
    bat_region_len: u64,
    bat: Vec<BatEntry>,
    chunk_ratio: u64,
    data_blocks: u64,
    /// The warnings, each with its place and check code.
    located: Vec<VhdxWarning>,
    /// Check mode: the problems that did not stop the open.
    diag: Option<Vec<Error>>,
    /// Problems found in check mode beyond the listed ones.
    diag_dropped: u64,
}

/// A warning of [`Vhdx::warnings`] with its place in the file and the code
/// `check` reports it under.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VhdxWarning {
    /// The `check` code (`vhdx-header-damaged`...).
    pub code: &'static str,
    /// The structure it is about.
    pub structure: VhdxStructure,
    /// The field, in the specification's words.
    pub field: &'static str,
    /// Absolute offset of the field in the file.
    pub offset: u64,
    /// The warning, as [`Vhdx::warnings`] gives it.
    pub message: String,
}

/// What [`Vhdx::check_source`] found: every problem it could, rather than
/// the first.
#[derive(Debug)]
#[non_exhaustive]
pub struct VhdxCheck {
    /// The file, opened in spite of the problems listed in `errors`; or the
    /// problem that stopped it (none of the others could be looked past).
    pub vhdx: Result<Vhdx>,
    /// Problems that did not stop the reading, in the order found; each an
    /// [`Error::Corrupt`] naming its structure, field and absolute offset.
    /// BAT entries found bad read as zeros in `vhdx`.
    pub errors: Vec<Error>,
    /// Problems found beyond the first [`VhdxCheck::MAX_LISTED`] (not listed).
    pub unlisted: u64,
}

impl VhdxCheck {
    /// The most problems listed in [`VhdxCheck::errors`].
    pub const MAX_LISTED: usize = 1000;
}

impl fmt::Debug for Vhdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vhdx")
            .field("path", &self.path)
            .field("file_len", &self.file_len)
            .field("header", &self.header)
            .field("header_index", &self.header_index)
            .field("log_replay", &self.log_replay)
            .field("params", &self.params)
            .field("virtual_size", &self.virtual_size)
            .field("logical_sector_size", &self.logical_sector_size)
            .field("physical_sector_size", &self.physical_sector_size)
            .field("bat_entries", &self.bat.len())
            .field("warnings", &self.located)
            .finish_non_exhaustive()
    }
}

fn corrupt(
    s: VhdxStructure,
    field: &'static str,
    at: u64,
    found: impl fmt::Display,
    expected: impl fmt::Display,
) -> Error {
    Error::corrupt(st(s), field, at, found, expected)
}

/// `at..at + len` lies within `limit` bytes.
fn within(at: u64, len: u64, limit: u64) -> bool {
    at.checked_add(len).is_some_and(|e| e <= limit)
}

impl Vhdx {
    /// Opens the VHDX file at `path` for reading.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened or read;
    /// [`Error::Corrupt`] naming the structure, field and offset of the
    /// first rule the file breaks (a log that cannot be replayed among
    /// them); [`Error::Unsupported`] for a version other than 1 or a
    /// required region or metadata item vhdkit does not know;
    /// [`Error::Limit`] when the BAT needs more entries than the options allow.
    pub fn open(path: impl AsRef<Path>, opts: &VhdxOptions) -> Result<Vhdx> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
        Self::from_file(file, path, opts)
    }

    /// Opens a VHDX file already open as `file` (named `path` in errors),
    /// for callers that opened it themselves.
    ///
    /// # Errors
    /// As [`Vhdx::open`].
    pub fn from_file(
        file: std::fs::File,
        path: impl AsRef<Path>,
        opts: &VhdxOptions,
    ) -> Result<Vhdx> {
        let path = path.as_ref();
        Self::open_source(Box::new(file), path.to_path_buf(), opts).map_err(|e| e.with_path(path))
    }

    /// Opens a VHDX held by any positional source (a file, bytes in memory),
    /// of `ReadAt::len` bytes. Errors name no file.
    ///
    /// # Errors
    /// As [`Vhdx::open`].
    pub fn from_source(source: Box<dyn ReadAt + Send>, opts: &VhdxOptions) -> Result<Vhdx> {
        Self::open_source(source, PathBuf::from("(VHDX in memory)"), opts)
    }

    /// [`Vhdx::from_source`] naming the file `path` in errors.
    pub(crate) fn from_source_named(
        source: Box<dyn ReadAt + Send>,
        path: &Path,
        opts: &VhdxOptions,
    ) -> Result<Vhdx> {
        Self::open_source(source, path.to_path_buf(), opts)
    }

    fn open_source(src: Box<dyn ReadAt + Send>, path: PathBuf, opts: &VhdxOptions) -> Result<Vhdx> {
        let file_len = src
            .len()
            .map_err(|e| Error::io(&path, "find the length of", e))?;
        let mut v = Vhdx::empty(src, path, file_len);
        v.read_all(opts)?;
        Ok(v)
    }

    fn empty(src: Box<dyn ReadAt + Send>, path: PathBuf, file_len: u64) -> Vhdx {
        Vhdx {
            src,
            path,
            file_len,
            logical_len: file_len,
            overlay: Overlay::default(),
            header: Header {
                checksum: 0,
                sequence_number: 0,
                file_write_guid: Guid::ZERO,
                data_write_guid: Guid::ZERO,
                log_guid: Guid::ZERO,
                log_version: 0,
                version: 0,
                log_length: 0,
                log_offset: 0,
            },
            header_index: 0,
            log_replay: None,
            region_table_index: 0,
            regions: Vec::new(),
            metadata_offset: 0,
            metadata_region_len: 0,
            metadata: Vec::new(),
            params: FileParameters {
                block_size: 0,
                leave_blocks_allocated: false,
                has_parent: false,
            },
            virtual_size: 0,
            logical_sector_size: 0,
            physical_sector_size: 0,
            page83: Guid::ZERO,
            parent_locator: None,
            bat_offset: 0,
            bat_region_len: 0,
            bat: Vec::new(),
            chunk_ratio: 1,
            data_blocks: 0,
            located: Vec::new(),
            diag: None,
            diag_dropped: 0,
        }
    }

    fn read_all(&mut self, opts: &VhdxOptions) -> Result<()> {
        self.read_identifier()?;
        self.read_headers()?;
        self.read_log()?;
        self.read_region_tables()?;
        self.read_metadata()?;
        self.read_bat(opts)?;
        if self.diag.is_some() {
            self.check_bat_layout()?;
        }
        Ok(())
    }

    /// Checks a VHDX held by `source` (named `path` in errors) and reports
    /// every problem it can find rather than the first: a problem that
    /// leaves the rest readable (a damaged BAT entry, a metadata entry out
    /// of place, a log that cannot be replayed, a damaged parent locator) is
    /// listed and the check goes on; one that leaves nothing to go on with
    /// (no valid header, no valid region table, block size or sector size
    /// unknown) stops it. Rules beyond the reader's are checked too: blocks
    /// overlapping each other or the file's structures, reserved BAT bits,
    /// sector bitmap blocks in a disk without parent, and the second region
    /// table (unused when the first is valid) — see `docs/vhdx-format.md`.
    ///
    /// [`Vhdx::open`] and the others stop at the first problem instead.
    pub fn check_source(
        source: Box<dyn ReadAt + Send>,
        path: &Path,
        opts: &VhdxOptions,
    ) -> VhdxCheck {
        let mut v = match Self::open_source_checking(source, path.to_path_buf()) {
            Ok(v) => v,
            Err(e) => {
                return VhdxCheck {
                    vhdx: Err(e),
                    errors: Vec::new(),
                    unlisted: 0,
                }
            }
        };
        let r = v.read_all(opts);
        let errors = v.diag.take().unwrap_or_default();
        let unlisted = v.diag_dropped;
        VhdxCheck {
            vhdx: r.map(|()| v),
            errors,
            unlisted,
        }
    }

    fn open_source_checking(src: Box<dyn ReadAt + Send>, path: PathBuf) -> Result<Vhdx> {
        let file_len = src
            .len()
            .map_err(|e| Error::io(&path, "find the length of", e))?;
        let mut v = Vhdx::empty(src, path, file_len);
        v.diag = Some(Vec::new());
        Ok(v)
    }

    /// A problem that need not stop the reading: returned when failing
    /// fast, listed in check mode.
    fn report(&mut self, e: Error) -> Result<()> {
        match &mut self.diag {
            Some(d) => {
                if d.len() < VhdxCheck::MAX_LISTED {
                    d.push(e);
                } else {
                    self.diag_dropped += 1;
                }
                Ok(())
            }
            None => Err(e),
        }
    }

    fn checking(&self) -> bool {
        self.diag.is_some()
    }

    /// Records a warning with its place.
    fn warn(
        &mut self,
        code: &'static str,
        structure: VhdxStructure,
        field: &'static str,
        offset: u64,
        message: String,
    ) {
        self.located.push(VhdxWarning {
            code,
            structure,
            field,
            offset,
            message,
        });
    }

    /// Reads `len` bytes of the (replayed) file at `at` for `structure`,
    /// after checking they lie within it.
    fn read_struct(
        &self,
        at: u64,
        len: u64,
        s: VhdxStructure,
        field: &'static str,
    ) -> Result<Vec<u8>> {
        if !within(at, len, self.logical_len) {
            return Err(corrupt(
                s,
                field,
                at.min(self.logical_len.saturating_sub(1)),
                format!("{len} bytes at offset {at}"),
                format!("a structure within the file of {} bytes", self.logical_len),
            ));
        }
        let mut b = vec![0u8; len as usize];
        self.read_file_at(&mut b, at)?;
        Ok(b)
    }

    fn read_identifier(&mut self) -> Result<()> {
        let s = VhdxStructure::FileIdentifier;
        let mut sig = [0u8; 8];
        if self.file_len < 8 {
            return Err(corrupt(
                s,
                "signature",
                0,
                format!("a file of {} bytes", self.file_len),
                "\"vhdxfile\" at offset 0",
            ));
        }
        self.read_file_at(&mut sig, 0)?;
        if &sig != FILE_SIGNATURE {
            return Err(corrupt(
                s,
                "signature",
                0,
                format!("{sig:02x?}"),
                "\"vhdxfile\"",
            ));
        }
        Ok(())
    }

    fn read_headers(&mut self) -> Result<()> {
        let mut parsed: Vec<Result<Header>> = Vec::new();
        for (i, &at) in HEADER_OFFSETS.iter().enumerate() {
            let n = i as u8 + 1;
            let avail = self.file_len.saturating_sub(at).min(HEADER_SIZE as u64);
            let mut b = vec![0u8; avail as usize];
            self.read_file_at(&mut b, at)?;
            parsed.push(Header::parse(&b, n, at));
        }
        let (Some(h2), Some(h1)) = (parsed.pop(), parsed.pop()) else {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: "a VHDX file must have two header slots".into(),
            });
        };
        let (header, index) = match (h1, h2) {
            (Ok(a), Ok(b)) => {
                if a.sequence_number > b.sequence_number {
                    (a, 1)
                } else if b.sequence_number > a.sequence_number {
                    (b, 2)
                } else if a == b {
                    // Two identical headers (some tools write both alike).
                    (a, 1)
                } else {
                    let seq = a.sequence_number;
                    self.report(corrupt(
                        VhdxStructure::Header(2),
                        "sequence number",
                        HEADER_OFFSETS[1] + 8,
                        b.sequence_number,
                        format!(
                            "a number other than header 1's ({seq}): the two valid headers \
                             differ and neither is newer"
                        ),
                    ))?;
                    // Checking goes on with header 1.
                    (a, 1)
                }
            }
            (Ok(a), Err(e)) => {
                self.header_damaged(2, &e, &a);
                (a, 1)
            }
            (Err(e), Ok(b)) => {
                self.header_damaged(1, &e, &b);
                (b, 2)
            }
            (Err(e1), Err(e2)) => {
                if self.checking() {
                    self.report(e2)?;
                }
                return Err(e1);
            }
        };
        let hs = VhdxStructure::Header(index);
        let at = HEADER_OFFSETS[index as usize - 1];
        if header.version != 1 {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: format!(
                    "VHDX header {index} version {} (vhdkit reads version 1)",
                    header.version
                ),
            });
        }
        if header.log_version != 0 {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: format!(
                    "VHDX header {index} log version {} (vhdkit reads log version 0)",
                    header.log_version
                ),
            });
        }
        let mut header = header;
        if header.log_length != 0 {
            let (off, len) = (header.log_offset, u64::from(header.log_length));
            let bad = if off < MIB || off % MIB != 0 {
                Some(corrupt(
                    hs,
                    "log offset",
                    at + 72,
                    off,
                    "a multiple of 1 MiB, at least 1 MiB",
                ))
            } else if len % MIB != 0 {
                Some(corrupt(
                    hs,
                    "log length",
                    at + 68,
                    len,
                    "a multiple of 1 MiB",
                ))
            } else if !within(off, len, self.file_len) {
                Some(corrupt(
                    hs,
                    "log length",
                    at + 68,
                    format!("{len} bytes at {off}"),
                    format!("a log within the file of {} bytes", self.file_len),
                ))
            } else {
                None
            };
            if let Some(e) = bad {
                self.report(e)?;
                // Checking goes on as if the header named no log: nothing
                // is replayed, and the regions are not checked against it.
                header.log_length = 0;
                header.log_guid = Guid::ZERO;
            }
        }
        self.header = header;
        self.header_index = index;
        Ok(())
    }

    /// Header `n` is damaged (`e`); the other one, `used`, is read.
    fn header_damaged(&mut self, n: u8, e: &Error, used: &Header) {
        let (field, offset) = match e {
            Error::Corrupt(c) => (c.field, c.offset),
            _ => ("signature", HEADER_OFFSETS[n as usize - 1]),
        };
        self.warn(
            "vhdx-header-damaged",
            VhdxStructure::Header(n),
            field,
            offset,
            format!(
                "header {n} is damaged ({e}); header {} (sequence number {}) was used",
                3 - n,
                used.sequence_number
            ),
        );
    }

    fn read_log(&mut self) -> Result<()> {
        let h = &self.header;
        if h.log_guid.is_zero() {
            return Ok(());
        }
        let n = self.header_index;
        let guid_at = HEADER_OFFSETS[n as usize - 1] + 48;
        if h.log_length == 0 {
            let msg = format!(
                "header {n} names log {} but gives it no room (log length 0); nothing was replayed",
                h.log_guid
            );
            self.warn(
                "vhdx-log-not-replayed",
                VhdxStructure::Header(n),
                "log guid",
                guid_at,
                msg,
            );
            return Ok(());
        }
        // The log was checked to lie within the file; it is read as it is
        // (the overlay is empty yet).
        let mut log = vec![0u8; h.log_length as usize];
        self.src
            .read_exact_at(&mut log, h.log_offset)
            .map_err(|e| Error::io_at(&self.path, "read the log", h.log_offset, e))?;
        let mut overlay = Overlay::default();
        let mut said = Vec::new();
        let replay = log::replay(
            &log,
            h.log_offset,
            h,
            self.file_len,
            &mut overlay,
            &mut said,
        );
        let log_at = h.log_offset;
        for msg in said {
            self.warn(
                "vhdx-log-not-replayed",
                VhdxStructure::Log,
                "log guid",
                log_at,
                msg,
            );
        }
        let replay = match replay {
            Ok(r) => r,
            Err(e) => {
                // Checking goes on with the file as it is.
                self.report(e)?;
                None
            }
        };
        if let Some(r) = &replay {
            self.logical_len = r.file_length;
            self.overlay = overlay;
        }
        self.log_replay = replay;
        Ok(())
    }

    fn read_region_tables(&mut self) -> Result<()> {
        let first = self.region_table(1);
        if let Err(e @ Error::Unsupported { .. }) = first {
            return Err(e);
        }
        // Table 2 is read when table 1 cannot be used, and by a check,
        // which says when it is damaged though unused.
        let second = (first.is_err() || self.checking()).then(|| self.region_table(2));
        let (table, n) = match (first, second) {
            (Ok(t), second) => {
                if let Some(Err(e)) = second {
                    if matches!(e, Error::Unsupported { .. }) {
                        return Err(e);
                    }
                    self.table_damaged(2, &e, "region table 1 was used");
                }
                (t, 1)
            }
            (Err(e), Some(Ok(t))) => {
                self.table_damaged(1, &e, "region table 2 was used");
                (t, 2)
            }
            (Err(e1), Some(Err(e2))) => {
                if matches!(e2, Error::Unsupported { .. }) {
                    return Err(e2);
                }
                if self.checking() {
                    self.report(e2)?;
                }
                return Err(e1);
            }
            (Err(e1), None) => return Err(e1),
        };
        for (code, s, field, at, msg) in table.warnings {
            self.warn(code, s, field, at, msg);
        }
        self.region_table_index = n;
        self.regions = table.entries;
        self.bat_offset = table.bat.file_offset;
        self.metadata_offset = table.meta.file_offset;
        self.bat_region_len = u64::from(table.bat.length);
        self.metadata_region_len = u64::from(table.meta.length);
        Ok(())
    }

    /// Region table `n` is damaged (`e`): a warning, since the other is used.
    fn table_damaged(&mut self, n: u8, e: &Error, used: &str) {
        let at = REGION_TABLE_OFFSETS[n as usize - 1];
        let (field, offset) = match e {
            Error::Corrupt(c) => (c.field, c.offset),
            _ => ("signature", at),
        };
        self.warn(
            "vhdx-region-table-damaged",
            VhdxStructure::RegionTable(n),
            field,
            offset,
            format!("region table {n} is damaged ({e}); {used}"),
        );
    }

    /// Reads, parses and checks region table `n`.
    fn region_table(&self, n: u8) -> Result<CheckedRegions> {
        let at = REGION_TABLE_OFFSETS[n as usize - 1];
        let avail = self
            .logical_len
            .saturating_sub(at)
            .min(REGION_TABLE_SIZE as u64);
        let mut b = vec![0u8; avail as usize];
        self.read_file_at(&mut b, at)?;
        let t = RegionTable::parse(&b, n, at)?;
        self.check_regions(&t, n, at)
    }

    /// Checks a region table's entries and finds the BAT and metadata regions.
    fn check_regions(&self, t: &RegionTable, n: u8, at: u64) -> Result<CheckedRegions> {
        let s = VhdxStructure::RegionTable(n);
        let mut bat = None;
        let mut meta = None;
        let mut warnings = Vec::new();
        let mut spans: Vec<(u64, u64, String)> = Vec::new();
        if self.header.log_length != 0 {
            let o = self.header.log_offset;
            spans.push((o, o + u64::from(self.header.log_length), "the log".into()));
        }
        for (i, e) in t.entries.iter().enumerate() {
            let eat = at + 16 + 32 * i as u64;
            let len = u64::from(e.length);
            if e.file_offset < MIB || e.file_offset % MIB != 0 {
                return Err(corrupt(
                    s,
                    "file offset",
                    eat + 16,
                    e.file_offset,
                    format!("a multiple of 1 MiB, at least 1 MiB (entry {i})"),
                ));
            }
            if len == 0 || len % MIB != 0 {
                return Err(corrupt(
                    s,
                    "length",
                    eat + 24,
                    len,
                    format!("a non-zero multiple of 1 MiB (entry {i})"),
                ));
            }
            if !within(e.file_offset, len, self.logical_len) {
                return Err(corrupt(
                    s,
                    "length",
                    eat + 24,
                    format!("{len} bytes at {}", e.file_offset),
                    format!(
                        "a region within the file of {} bytes (entry {i})",
                        self.logical_len
                    ),
                ));
            }
            let end = e.file_offset + len;
            if let Some((_, _, what)) = spans
                .iter()
                .find(|(a, b, _)| e.file_offset < *b && *a < end)
            {
                return Err(corrupt(
                    s,
                    "file offset",
                    eat + 16,
                    format!("{len} bytes at {}", e.file_offset),
                    format!("a region that does not overlap {what} (entry {i})"),
                ));
            }
            spans.push((e.file_offset, end, format!("region entry {i}")));
            let slot = if e.guid == BAT_REGION {
                &mut bat
            } else if e.guid == METADATA_REGION {
                &mut meta
            } else if e.required {
                return Err(Error::Unsupported {
                    path: self.path.clone(),
                    what: format!(
                        "VHDX region table {n} entry {i}: required region {} is not one vhdkit \
                         knows",
                        e.guid
                    ),
                });
            } else {
                warnings.push((
                    "vhdx-unknown-region",
                    s,
                    "guid",
                    eat,
                    format!(
                        "region table {n} entry {i}: unknown optional region {} ignored",
                        e.guid
                    ),
                ));
                continue;
            };
            if slot.is_some() {
                return Err(corrupt(
                    s,
                    "guid",
                    eat,
                    e.guid,
                    format!("one entry per region (entry {i} repeats it)"),
                ));
            }
            *slot = Some(*e);
        }
        let missing = |what: &str| {
            corrupt(
                s,
                "entry count",
                at + 8,
                format!("{} entries without the {what} region", t.entries.len()),
                format!("a {what} region entry"),
            )
        };
        let bat = bat.ok_or_else(|| missing("BAT"))?;
        let meta = meta.ok_or_else(|| missing("metadata"))?;
        Ok(CheckedRegions {
            entries: t.entries.clone(),
            bat,
            meta,
            warnings,
        })
    }
}

/// A region table that passed: its entries, the BAT and metadata regions,
/// and warnings for the regions ignored.
struct CheckedRegions {
    entries: Vec<RegionEntry>,
    bat: RegionEntry,
    meta: RegionEntry,
    warnings: Vec<(&'static str, VhdxStructure, &'static str, u64, String)>,
}

/// Minimum length of each known metadata item.
const KNOWN_ITEMS: [(Guid, u32, &str); 6] = [
    (FILE_PARAMETERS, 8, "file parameters"),
    (VIRTUAL_DISK_SIZE, 8, "virtual disk size"),
    (PAGE_83_DATA, 16, "page 83 data"),
    (LOGICAL_SECTOR_SIZE, 4, "logical sector size"),
    (PHYSICAL_SECTOR_SIZE, 4, "physical sector size"),
    (PARENT_LOCATOR, 20, "parent locator"),
];

impl Vhdx {
    fn read_metadata(&mut self) -> Result<()> {
        let s = VhdxStructure::Metadata;
        let base = self.metadata_offset;
        let table = self.read_struct(base, METADATA_TABLE_SIZE as u64, s, "signature")?;
        let entries = parse_metadata_table(&table, base)?;
        // Entries found bad (in check mode) are left out of the table kept.
        let mut kept = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            match self.check_metadata_entry(&entries, i) {
                Ok(()) => kept.push(*e),
                Err(e @ Error::Unsupported { .. }) => return Err(e),
                Err(e) => {
                    self.report(e)?;
                    // Keep the place of the others (their index names them).
                    kept.push(MetadataEntry {
                        item_id: Guid::ZERO,
                        offset: 0,
                        length: 0,
                        is_user: true,
                        is_virtual_disk: false,
                        is_required: false,
                    });
                }
            }
        }
        self.metadata = kept;
        let left_out: Vec<Guid> = entries
            .iter()
            .zip(&self.metadata)
            .filter(|(e, k)| e != k && !e.is_user)
            .map(|(e, _)| e.item_id)
            .collect();
        self.read_metadata_items(&left_out)
    }

    /// Checks entry `i` of the metadata table.
    fn check_metadata_entry(&self, entries: &[MetadataEntry], i: usize) -> Result<()> {
        let s = VhdxStructure::Metadata;
        let base = self.metadata_offset;
        let e = &entries[i];
        {
            let eat = base + 32 + 32 * i as u64;
            if e.length == 0 {
                if e.offset != 0 {
                    return Err(corrupt(
                        s,
                        "offset",
                        eat + 16,
                        e.offset,
                        format!("0 for an empty item (entry {i})"),
                    ));
                }
            } else {
                if u64::from(e.offset) < METADATA_TABLE_SIZE as u64 {
                    return Err(corrupt(
                        s,
                        "offset",
                        eat + 16,
                        e.offset,
                        format!("at least 65536, past the table (entry {i})"),
                    ));
                }
                if e.length > MAX_METADATA_ITEM {
                    return Err(corrupt(
                        s,
                        "length",
                        eat + 20,
                        e.length,
                        format!("at most 1 MiB (entry {i})"),
                    ));
                }
                if !within(
                    u64::from(e.offset),
                    u64::from(e.length),
                    self.metadata_region_len,
                ) {
                    return Err(corrupt(
                        s,
                        "length",
                        eat + 20,
                        format!("{} bytes at region offset {}", e.length, e.offset),
                        format!(
                            "an item within the {}-byte metadata region (entry {i})",
                            self.metadata_region_len
                        ),
                    ));
                }
            }
            if entries[..i]
                .iter()
                .any(|p| p.item_id == e.item_id && p.is_user == e.is_user)
            {
                return Err(corrupt(
                    s,
                    "item id",
                    eat,
                    e.item_id,
                    format!("one entry per item (entry {i} repeats it)"),
                ));
            }
            let known = !e.is_user && KNOWN_ITEMS.iter().any(|k| k.0 == e.item_id);
            if !known && e.is_required {
                return Err(Error::Unsupported {
                    path: self.path.clone(),
                    what: format!(
                        "VHDX metadata entry {i}: required item {} is not one vhdkit knows",
                        e.item_id
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reads the known items of the metadata table kept.
    fn read_metadata_items(&mut self, entries_left_out: &[Guid]) -> Result<()> {
        let s = VhdxStructure::Metadata;
        let base = self.metadata_offset;
        let item = |v: &Vhdx, k: usize| -> Result<Option<(Vec<u8>, u64)>> {
            let (id, min, name) = KNOWN_ITEMS[k];
            let Some((i, e)) = v
                .metadata
                .iter()
                .enumerate()
                .find(|(_, e)| !e.is_user && e.item_id == id)
            else {
                return Ok(None);
            };
            let eat = base + 32 + 32 * i as u64;
            if e.length < min {
                return Err(corrupt(
                    s,
                    "length",
                    eat + 20,
                    e.length,
                    format!("at least {min} bytes for the {name} item (entry {i})"),
                ));
            }
            let at = base + u64::from(e.offset);
            Ok(Some((v.read_struct(at, u64::from(e.length), s, name)?, at)))
        };
        let required = |v: &Vhdx, k: usize| -> Result<(Vec<u8>, u64)> {
            item(v, k)?.ok_or_else(|| {
                corrupt(
                    s,
                    "entry count",
                    base + 10,
                    format!(
                        "{} entries, none for {}",
                        v.metadata.len(),
                        KNOWN_ITEMS[k].2
                    ),
                    format!(
                        "an entry for the {} item {}",
                        KNOWN_ITEMS[k].2, KNOWN_ITEMS[k].0
                    ),
                )
            })
        };
        let (fp, fp_at) = required(self, 0)?;
        let flags = le32(&fp, 4);
        self.params = FileParameters {
            block_size: le32(&fp, 0),
            leave_blocks_allocated: flags & 1 != 0,
            has_parent: flags & 2 != 0,
        };
        let bs = self.params.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(corrupt(
                s,
                "block size",
                fp_at,
                bs,
                "a power of two from 1 MiB to 256 MiB",
            ));
        }
        let (ls, ls_at) = required(self, 3)?;
        self.logical_sector_size = le32(&ls, 0);
        if !matches!(self.logical_sector_size, 512 | 4096) {
            return Err(corrupt(
                s,
                "logical sector size",
                ls_at,
                self.logical_sector_size,
                "512 or 4096",
            ));
        }
        // Nothing read depends on the physical sector size or the page 83
        // id: a check goes on past them.
        // An item whose entry was listed as bad and left out is not listed
        // again as missing.
        let left_out =
            |v: &Vhdx, k: usize| v.checking() && entries_left_out.contains(&KNOWN_ITEMS[k].0);
        match required(self, 4) {
            Ok((ps, ps_at)) => {
                self.physical_sector_size = le32(&ps, 0);
                if !matches!(self.physical_sector_size, 512 | 4096) {
                    self.report(corrupt(
                        s,
                        "physical sector size",
                        ps_at,
                        self.physical_sector_size,
                        "512 or 4096",
                    ))?;
                }
            }
            Err(_) if left_out(self, 4) => {}
            Err(e) => self.report(e)?,
        }
        let (vs, vs_at) = required(self, 1)?;
        self.virtual_size = le64(&vs, 0);
        let lss = u64::from(self.logical_sector_size);
        if self.virtual_size % lss != 0 || self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(corrupt(
                s,
                "virtual disk size",
                vs_at,
                self.virtual_size,
                format!("a multiple of the logical sector size ({lss}), at most 64 TiB"),
            ));
        }
        match required(self, 2) {
            Ok((p83, _)) => self.page83 = Guid::read(&p83, 0),
            Err(_) if left_out(self, 2) => {}
            Err(e) => self.report(e)?,
        }
        let locator = match item(self, 5) {
            Ok(l) => l,
            Err(e) => {
                self.report(e)?;
                // Reported: not reported again as missing.
                if self.params.has_parent {
                    return Ok(());
                }
                None
            }
        };
        match (locator, self.params.has_parent) {
            (Some((b, at)), true) => {
                let pl = match ParentLocator::parse(&b, at) {
                    Ok(pl) => pl,
                    Err(e) => return self.report(e),
                };
                if pl.locator_type != VHDX_PARENT_LOCATOR_TYPE {
                    let msg = format!(
                        "the parent locator's type is {}, not the VHDX locator type {}",
                        pl.locator_type, VHDX_PARENT_LOCATOR_TYPE
                    );
                    self.warn(
                        "vhdx-locator-type",
                        VhdxStructure::ParentLocator,
                        "locator type",
                        at,
                        msg,
                    );
                } else if pl.parent_linkage().is_none() {
                    return self.report(corrupt(
                        VhdxStructure::ParentLocator,
                        "parent_linkage",
                        at,
                        format!("{} keys without parent_linkage", pl.entries.len()),
                        "a parent_linkage key naming the parent's data write GUID",
                    ));
                }
                self.parent_locator = Some(pl);
            }
            (None, true) if left_out(self, 5) => {}
            (None, true) => {
                return self.report(corrupt(
                    s,
                    "entry count",
                    base + 10,
                    format!(
                        "{} entries, none for the parent locator",
                        self.metadata.len()
                    ),
                    "a parent locator item in a disk whose file parameters say it has a parent",
                ))
            }
            (Some((_, at)), false) => self.warn(
                "vhdx-locator-ignored",
                VhdxStructure::ParentLocator,
                "locator type",
                at,
                "a parent locator is present but the file parameters say the disk has no \
                 parent; it was ignored"
                    .into(),
            ),
            (None, false) => {}
        }
        Ok(())
    }

    fn read_bat(&mut self, opts: &VhdxOptions) -> Result<()> {
        let bs = u64::from(self.params.block_size);
        let lss = u64::from(self.logical_sector_size);
        let cr = (1u64 << 23) * lss / bs;
        let data_blocks = self.virtual_size.div_ceil(bs);
        let total = if self.params.has_parent {
            data_blocks.div_ceil(cr) * (cr + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / cr
        };
        self.chunk_ratio = cr;
        self.data_blocks = data_blocks;
        if total > opts.max_bat_entries {
            return Err(Error::Limit {
                path: self.path.clone(),
                what: crate::error::LimitOf::VhdxBatEntries,
                value: total,
                limit: opts.max_bat_entries,
            });
        }
        let bytes = total * 8;
        if bytes > self.bat_region_len || bytes > self.file_len {
            return Err(corrupt(
                VhdxStructure::RegionTable(self.region_table_index),
                "length",
                REGION_TABLE_OFFSETS[self.region_table_index as usize - 1],
                format!("a BAT region of {} bytes", self.bat_region_len),
                format!(
                    "at least {bytes} bytes for {total} entries ({data_blocks} blocks of {bs} \
                     bytes, chunk ratio {cr}), within the file"
                ),
            ));
        }
        let mut bat = Vec::with_capacity(total as usize);
        let mut buf = vec![0u8; (MIB as usize).min(bytes as usize)];
        let mut done = 0u64;
        while done < bytes {
            let n = (bytes - done).min(buf.len() as u64) as usize;
            self.read_file_at(&mut buf[..n], self.bat_offset + done)?;
            bat.extend(buf[..n].chunks_exact(8).map(|c| BatEntry(le64(c, 0))));
            done += n as u64;
        }
        self.bat = bat;
        for i in 0..total {
            if let Err(e) = self.check_bat_entry(i) {
                self.report(e)?;
                // Checking goes on with the entry read as zeros (payload:
                // state 2, zero) or absent (sector bitmap: state 0).
                let cr = self.chunk_ratio;
                self.bat[i as usize] = BatEntry(if (i + 1) % (cr + 1) == 0 { 0 } else { 2 });
            }
        }
        Ok(())
    }

    /// Check mode: the rules beyond what reading needs. Blocks (payload and
    /// sector bitmap) must not overlap each other, the first MiB (headers
    /// and region tables), the log or the BAT and metadata regions; reserved
    /// BAT bits are zero; a disk without parent has no sector bitmap block.
    fn check_bat_layout(&mut self) -> Result<()> {
        let cr = self.chunk_ratio;
        let bs = self.block_size();
        // (start, end, what): BAT entries by index, structures by name.
        let mut spans: Vec<(u64, u64, u64)> = Vec::new();
        let mut named: Vec<(u64, u64, String)> =
            vec![(0, MIB, "the headers and region tables".into())];
        if self.header.log_length != 0 {
            let o = self.header.log_offset;
            named.push((o, o + u64::from(self.header.log_length), "the log".into()));
        }
        named.push((
            self.bat_offset,
            self.bat_offset + self.bat_region_len,
            "the BAT region".into(),
        ));
        named.push((
            self.metadata_offset,
            self.metadata_offset + self.metadata_region_len,
            "the metadata region".into(),
        ));
        let mut reserved: Option<(u64, u64)> = None;
        let mut bitmaps: Option<(u64, u64)> = None;
        for (i, e) in self.bat.iter().enumerate() {
            let i = i as u64;
            if e.0 & 0x000f_fff8 != 0 {
                let r = reserved.get_or_insert((i, 0));
                r.1 += 1;
            }
            let len = if (i + 1) % (cr + 1) == 0 {
                if e.state() != SB_BLOCK_PRESENT {
                    continue;
                }
                if !self.params.has_parent {
                    let b = bitmaps.get_or_insert((i, 0));
                    b.1 += 1;
                }
                MIB
            } else {
                let block = i - i / (cr + 1);
                if block >= self.data_blocks
                    || !matches!(
                        PayloadState::from_code(e.state()),
                        Some(PayloadState::FullyPresent | PayloadState::PartiallyPresent)
                    )
                {
                    continue;
                }
                bs.min(self.virtual_size - block * bs)
            };
            spans.push((e.file_offset(), e.file_offset() + len, i));
        }
        if let Some((first, n)) = reserved {
            let at = self.bat_offset + 8 * first;
            self.warn(
                "vhdx-bat-reserved",
                VhdxStructure::BatEntry(first),
                "reserved",
                at,
                format!("{n} BAT entries have reserved bits 3..19 set (ignored)"),
            );
        }
        if let Some((first, n)) = bitmaps {
            let at = self.bat_offset + 8 * first;
            self.warn(
                "vhdx-bitmap-without-parent",
                VhdxStructure::BatEntry(first),
                "state",
                at,
                format!("{n} sector bitmap blocks are present in a disk without parent (ignored)"),
            );
        }
        // Blocks against the structures: each block found in the sorted
        // structures; then blocks against each other: sorted, each against
        // the furthest-reaching one before it.
        named.sort();
        spans.sort_unstable();
        let mut reach: Option<(u64, u64)> = None; // (end, entry)
        for &(a, b, i) in &spans {
            let what = if let Some((_, _, what)) = named.iter().find(|(x, y, _)| a < *y && *x < b) {
                Some(what.clone())
            } else {
                reach
                    .filter(|&(end, _)| a < end)
                    .map(|(_, j)| format!("the block of BAT entry {j}"))
            };
            if let Some(what) = what {
                self.report(Error::overlap(
                    st(VhdxStructure::BatEntry(i)),
                    "file offset",
                    self.bat_offset + 8 * i,
                    format!("{} bytes at {a}", b - a),
                    format!("no overlap with {what}"),
                ))?;
            }
            if reach.is_none_or(|(end, _)| b > end) {
                reach = Some((b, i));
            }
        }
        Ok(())
    }

    fn check_bat_entry(&self, i: u64) -> Result<()> {
        let cr = self.chunk_ratio;
        let e = self.bat[i as usize];
        let s = VhdxStructure::BatEntry(i);
        let at = self.bat_offset + 8 * i;
        let in_file = |len: u64, what: &str| -> Result<()> {
            let off = e.file_offset();
            if off < MIB || !within(off, len, self.logical_len) {
                return Err(corrupt(
                    s,
                    "file offset",
                    at,
                    format!("{} MiB", e.file_offset_mb()),
                    format!(
                        "{what} of {len} bytes at or past 1 MiB and within the file of {} bytes",
                        self.logical_len
                    ),
                ));
            }
            Ok(())
        };
        if (i + 1) % (cr + 1) == 0 {
            return match e.state() {
                SB_BLOCK_NOT_PRESENT => Ok(()),
                SB_BLOCK_PRESENT => in_file(MIB, "a sector bitmap block"),
                x => Err(corrupt(
                    s,
                    "state",
                    at,
                    x,
                    "0 (not present) or 6 (present) for a sector bitmap entry",
                )),
            };
        }
        let block = i - i / (cr + 1);
        if block >= self.data_blocks {
            return Ok(());
        }
        let bs = u64::from(self.params.block_size);
        let need = bs.min(self.virtual_size - block * bs);
        match PayloadState::from_code(e.state()) {
            None => Err(corrupt(
                s,
                "state",
                at,
                e.state(),
                "a payload block state: 0, 1, 2, 3, 6 or 7",
            )),
            Some(PayloadState::FullyPresent) => in_file(need, "a payload block"),
            Some(PayloadState::PartiallyPresent) => {
                if !self.params.has_parent {
                    return Err(corrupt(
                        s,
                        "state",
                        at,
                        "7 (partially present)",
                        "a state other than partially present in a disk without a parent",
                    ));
                }
                in_file(need, "a payload block")?;
                let sb = (block / cr) * (cr + 1) + cr;
                let sbe = self.bat[sb as usize];
                if sbe.state() != SB_BLOCK_PRESENT {
                    return Err(corrupt(
                        s,
                        "state",
                        at,
                        "7 (partially present)",
                        format!(
                            "a present sector bitmap block for its chunk (BAT entry {sb} has \
                             state {})",
                            sbe.state()
                        ),
                    ));
                }
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }

    // -----------------------------------------------------------------------
    // What was read
    // -----------------------------------------------------------------------

    /// The file (or a placeholder name for an in-memory source).
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The file's length in bytes, as it is on disk.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
    /// Bytes of virtual disk.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    /// 512 or 4096.
    pub fn logical_sector_size(&self) -> u32 {
        self.logical_sector_size
    }
    /// 512 or 4096.
    pub fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }
    /// Bytes of virtual disk per payload block (1 MiB to 256 MiB).
    pub fn block_size(&self) -> u64 {
        u64::from(self.params.block_size)
    }
    /// The file parameters item as read.
    pub fn file_parameters(&self) -> FileParameters {
        self.params
    }
    /// Fixed (leave blocks allocated), dynamic, or differencing (has parent).
    pub fn disk_type(&self) -> DiskType {
        if self.params.has_parent {
            DiskType::Differencing
        } else if self.params.leave_blocks_allocated {
            DiskType::Fixed
        } else {
            DiskType::Dynamic
        }
    }
    /// The page 83 data item: the virtual disk's SCSI identifier.
    pub fn page83_id(&self) -> Guid {
        self.page83
    }
    /// The data write GUID of the header in use (what a child's
    /// `parent_linkage` names).
    pub fn data_write_guid(&self) -> Guid {
        self.header.data_write_guid
    }
    /// The file write GUID of the header in use.
    pub fn file_write_guid(&self) -> Guid {
        self.header.file_write_guid
    }
    /// The header in use.
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// Which header is in use: 1 (at 64 KiB) or 2 (at 128 KiB).
    pub fn header_index(&self) -> u8 {
        self.header_index
    }
    /// The sequence number of the header in use.
    pub fn header_sequence(&self) -> u64 {
        self.header.sequence_number
    }
    /// What replaying the log did, when the file was not closed cleanly.
    pub fn log_replay(&self) -> Option<&LogReplay> {
        self.log_replay.as_ref()
    }
    /// True when log entries were replayed (in memory) to read the file.
    pub fn log_replayed(&self) -> bool {
        self.log_replay.is_some()
    }
    /// Which region table was used: 1 or 2.
    pub fn region_table_index(&self) -> u8 {
        self.region_table_index
    }
    /// The entries of the region table used.
    pub fn regions(&self) -> &[RegionEntry] {
        &self.regions
    }
    /// The metadata table's entries.
    pub fn metadata_entries(&self) -> &[MetadataEntry] {
        &self.metadata
    }
    /// The parent locator of a differencing disk.
    pub fn parent_locator(&self) -> Option<&ParentLocator> {
        self.parent_locator.as_ref()
    }
    /// Things worth knowing that did not stop the file from opening.
    pub fn warnings(&self) -> Vec<&str> {
        self.located.iter().map(|w| w.message.as_str()).collect()
    }
    /// The same warnings, each with its place in the file and its `check` code.
    pub fn located_warnings(&self) -> &[VhdxWarning] {
        &self.located
    }
    /// Payload blocks per sector bitmap block.
    pub fn chunk_ratio(&self) -> u64 {
        self.chunk_ratio
    }
    /// Payload blocks covering the virtual disk.
    pub fn block_count(&self) -> u64 {
        self.data_blocks
    }
    /// The whole BAT, payload and sector bitmap entries interleaved.
    pub fn bat(&self) -> &[BatEntry] {
        &self.bat
    }
    /// The BAT entry of payload block `block`.
    pub fn payload_entry(&self, block: u64) -> Option<BatEntry> {
        if block >= self.data_blocks {
            return None;
        }
        self.bat
            .get((block + block / self.chunk_ratio) as usize)
            .copied()
    }
    /// The state of payload block `block`.
    pub fn payload_state(&self, block: u64) -> Option<PayloadState> {
        self.payload_entry(block)
            .and_then(|e| PayloadState::from_code(e.state()))
    }
    /// Payload blocks fully or partially present in the file.
    pub fn allocated_blocks(&self) -> u64 {
        (0..self.data_blocks)
            .filter(|&b| {
                matches!(
                    self.payload_state(b),
                    Some(PayloadState::FullyPresent | PayloadState::PartiallyPresent)
                )
            })
            .count() as u64
    }

    // -----------------------------------------------------------------------
    // Map and reads
    // -----------------------------------------------------------------------

    fn check_range(&self, offset: u64, len: u64) -> Result<u64> {
        crate::image::range_end(&self.path, offset, len, self.virtual_size)
    }

    /// The extents of `offset..offset + len` of this file alone, adjacent
    /// ones merged: `Data` (layer 0, at an offset of the replayed file),
    /// `Zero`, and `Parent` for what a differencing disk leaves to its parent.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] when the range leaves the disk; I/O errors
    /// reading sector bitmaps.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = self.check_range(offset, len)?;
        let bs = self.block_size();
        let mut out = Vec::new();
        let mut bits = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let start = block * bs;
            let stop = end.min(start + bs);
            self.map_block(block, pos - start, stop - start, &mut bits, &mut out)?;
            pos = stop;
        }
        Ok(out)
    }

    /// The whole virtual disk, as [`Vhdx::map`] gives it.
    pub fn map_all(&self) -> Result<Vec<Extent>> {
        self.map(0, self.virtual_size)
    }

    /// Maps bytes `a..b` of payload block `block`.
    fn map_block(
        &self,
        block: u64,
        a: u64,
        b: u64,
        bits: &mut Vec<u8>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let base = block * self.block_size();
        let absent = if self.params.has_parent {
            ExtentKind::Parent
        } else {
            ExtentKind::Zero
        };
        let ext = |from: u64, to: u64, kind| Extent {
            offset: base + from,
            length: to - from,
            kind,
        };
        let Some(entry) = self.payload_entry(block) else {
            // Past the disk: nothing to map (callers stay inside it).
            return Ok(());
        };
        let data = |from: u64, to: u64| {
            ext(
                from,
                to,
                ExtentKind::Data {
                    layer: 0,
                    file_offset: entry.file_offset() + from,
                },
            )
        };
        match PayloadState::from_code(entry.state()) {
            Some(PayloadState::NotPresent) => push_extent(out, ext(a, b, absent)),
            Some(PayloadState::FullyPresent) => push_extent(out, data(a, b)),
            Some(PayloadState::PartiallyPresent) => {
                let cr = self.chunk_ratio;
                let sb = self.bat[((block / cr) * (cr + 1) + cr) as usize];
                if sb.state() != SB_BLOCK_PRESENT {
                    // Only in check mode, where a bad entry is let by.
                    push_extent(out, ext(a, b, absent));
                    return Ok(());
                }
                let lss = u64::from(self.logical_sector_size);
                let spb = self.block_size() / lss;
                let (s0, s1) = (a / lss, b.div_ceil(lss));
                // Bit k of the chunk's bitmap (least significant bit first)
                // is sector k of the chunk.
                let first = (block % cr) * spb + s0;
                let byte0 = first / 8;
                let byte1 = ((block % cr) * spb + s1).div_ceil(8);
                bits.resize((byte1 - byte0) as usize, 0);
                self.read_file_at(bits, sb.file_offset() + byte0)?;
                let bit = |s: u64| {
                    let k = first - byte0 * 8 + (s - s0);
                    bits[(k / 8) as usize] & (1 << (k % 8)) != 0
                };
                let mut s = s0;
                while s < s1 {
                    let set = bit(s);
                    let mut t = s + 1;
                    while t < s1 && bit(t) == set {
                        t += 1;
                    }
                    let (from, to) = ((s * lss).max(a), (t * lss).min(b));
                    push_extent(
                        out,
                        if set {
                            data(from, to)
                        } else {
                            ext(from, to, absent)
                        },
                    );
                    s = t;
                }
            }
            // Undefined, zero, unmapped (and nothing else: checked at open).
            _ => push_extent(out, ext(a, b, ExtentKind::Zero)),
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`: data from
    /// the (replayed) file, zeros for zero extents and for what a
    /// differencing disk leaves to its parent. Safe to call from many
    /// threads at once.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] when the range leaves the disk; I/O errors.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let extents = self.map(offset, buf.len() as u64)?;
        for e in extents {
            let from = (e.offset - offset) as usize;
            let dst = &mut buf[from..from + e.length as usize];
            match e.kind {
                ExtentKind::Data { file_offset, .. } => self.read_file_at(dst, file_offset)?,
                ExtentKind::Zero | ExtentKind::Parent => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Reads the file as the replayed log leaves it: the file's bytes, with
    /// the log's sectors laid over them, and zeros between the file's end
    /// and its length after replay. A plain read when no log was replayed.
    ///
    /// # Errors
    /// An I/O error (`UnexpectedEof` past the file's length after replay).
    pub fn read_file_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        if !within(offset, len, self.logical_len) {
            return Err(Error::io_at(
                &self.path,
                "read",
                offset,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{len} bytes at {offset} are past the end of the file ({} bytes)",
                        self.logical_len
                    ),
                ),
            ));
        }
        let real = self.file_len.saturating_sub(offset).min(len) as usize;
        if real > 0 {
            self.src
                .read_exact_at(&mut buf[..real], offset)
                .map_err(|e| Error::io_at(&self.path, "read", offset, e))?;
        }
        buf[real..].fill(0);
        if !self.overlay.is_empty() {
            self.overlay.apply(buf, offset);
        }
        Ok(())
    }
}

impl Vhdx {
    /// True when `len` bytes of the file at `file_offset` read as they are
    /// on disk: no replayed log sector lies over them and they are inside
    /// the file. Callers that copy data extents with file-to-file calls
    /// (`copy_file_range`) may do so for such ranges; the others must go
    /// through [`Vhdx::read_file_at`].
    pub fn is_plain(&self, file_offset: u64, len: u64) -> bool {
        within(file_offset, len, self.file_len)
            && !self.overlay.touches(file_offset, file_offset + len)
    }

    /// The file's length as the replayed log leaves it (its length when no
    /// log was replayed): what [`Vhdx::read_file_at`] reads.
    pub fn logical_file_len(&self) -> u64 {
        self.logical_len
    }
}

impl ReadAt for Vhdx {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        Vhdx::read_exact_at(self, buf, offset).map_err(Into::into)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.virtual_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vhdx_is_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Vhdx>();
    }

    #[test]
    fn guids_print_as_windows_writes_them() {
        assert_eq!(
            BAT_REGION.to_string(),
            "2DC27766-F623-4200-9D64-115E9BFD4A08"
        );
        assert_eq!(
            &BAT_REGION.0[..8],
            &[0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42]
        );
    }

    #[test]
    fn guids_parse_from_their_text() {
        let g = Guid::parse("{2dc27766-f623-4200-9d64-115e9bfd4a08}").unwrap();
        assert_eq!(g, BAT_REGION);
        assert_eq!(Guid::parse(&BAT_REGION.to_string()), Some(BAT_REGION));
        for bad in [
            "",
            "{}",
            "2DC27766-F623-4200-9D64-115E9BFD4A0",
            "2DC27766-F623-4200-9D64-115E9BFD4A08-",
            "2DC27766F623-4200-9D64-115E9BFD4A08",
            "2DC27766-F623-4200-9D64-115E9BFD4AG8",
            "+DC27766-F623-4200-9D64-115E9BFD4A08",
            "2DC27766-F623-4200-9D6é-115E9BFD4A0",
        ] {
            assert_eq!(Guid::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn structures_name_themselves() {
        let e = Error::corrupt(
            Structure::Vhdx(VhdxStructure::BatEntry(7)),
            "state",
            2_097_208,
            4,
            "a payload block state",
        );
        assert_eq!(
            e.to_string(),
            "VHDX BAT entry 7, field state at offset 2097208: found 4, expected a payload block state"
        );
    }
}
