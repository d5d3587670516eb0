//! Structural validation that reports every problem found, each with its
//! offset, rather than stopping at the first.
//!
//! The same validation code as [`Image::open`] runs in a collecting mode, and
//! checks that do not stop a reader (reserved fields, version fields, the
//! footer copy, BAT entries past the disk, locator data) run on top. With
//! `azure`, Azure's upload rules are checked too.
//!
//! Every [`Problem`] carries a stable machine-readable [`Problem::code`]
//! (`footer-checksum`, `bat-overlap`, `azure-not-fixed`...); README.md lists
//! them all with their meaning, and a test keeps the two in step.
//!
//! Rules beyond what a reader needs:
//!
//! * A file with no VHD footer (at the end or, for dynamic disks, at offset
//!   0) is an error (`no-vhd-footer`): it would read as a raw disk, which is
//!   what a truncated or overwritten VHD looks like. Checking with
//!   [`OpenOptions::format`]`(Format::Raw)` checks it as the raw disk it is
//!   (clean). A file in another format (qcow2, VHDX, VMDK...) is an error
//!   too (`foreign-format`).
//! * The end footer of a fixed disk starts on a sector boundary (a multiple
//!   of 512), or directly after the data when the size itself is not a
//!   whole number of sectors. Bytes between the data and a sector-aligned
//!   footer are padding, not part of the disk: a warning (`fixed-padding`).
//!   A footer anywhere else is an error (`fixed-footer-unaligned`): the data
//!   or the footer has been shifted (one byte too many in front of the
//!   footer, say). The 511-byte footer of Virtual PC before 2004 is judged
//!   by the same rule and stays accepted, with a warning (`footer-legacy-511`).
//! * In a dynamic disk, an allocated block whose sector bitmap has clear
//!   bits over non-zero data is a warning (`data-under-clear-bitmap`),
//!   naming the block and the sector ranges: vhdkit reads those sectors as
//!   zeros, as the specification says, but readers that ignore bitmaps
//!   (qemu-img) show the data, so the two disagree. Only the clear-bit
//!   sectors of blocks with partial bitmaps are read. Differencing disks are
//!   not checked for this: there a clear bit defers to the parent, and stale
//!   bytes under it are normal.

use crate::error::{Corruption, Error, LimitOf, Result, Rule, Structure};
use crate::image::{metadata_regions, Format, Image, OpenOptions};
use crate::io::ReadAt;
use crate::ondisk::{
    footer_fields as ff, header_fields as hf, Footer, SectorBitmap, FOOTER_SIZE, SECTOR,
    UNALLOCATED,
};
use crate::write::{MAX_VHD_SIZE, MIB};
use std::path::{Path, PathBuf};

/// How serious a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Severity {
    /// Unusual but readable; does not fail the check.
    Warning,
    /// The image is damaged, or breaks a rule asked for (Azure).
    Error,
}

impl Severity {
    /// `warning` or `error`, as `vhdkit check` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One problem.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// What kind of problem, as a stable machine-readable code
    /// (`footer-checksum`, `bat-overlap`, `azure-not-fixed`...): the list,
    /// with each code's meaning, is in README.md's `check` section.
    pub code: &'static str,
    /// The structure, when one is to blame ("footer", "BAT entry 3"...), in
    /// words (as the JSON prints it).
    pub structure: Option<String>,
    /// The same structure, typed, for callers that match on it.
    pub place: Option<Structure>,
    /// The field, when one is to blame.
    pub field: Option<String>,
    /// Absolute file offset, when known.
    pub offset: Option<u64>,
    /// What is wrong, in plain words.
    pub message: String,
}

/// The result of [`check`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CheckReport {
    /// The file checked.
    pub path: PathBuf,
    /// Its format, when it could be determined.
    pub format: Option<Format>,
    /// The virtual size, when it could be determined.
    pub virtual_size: Option<u64>,
    /// Every problem found, errors first, then by offset.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True when no problem of severity [`Severity::Error`] was found.
    pub fn is_clean(&self) -> bool {
        !self.problems.iter().any(|p| p.severity == Severity::Error)
    }
}

/// What to check.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// How to open the image (parents, limits). Checksums are always
    /// checked; `ignore_checksums` here only lets the walk go on past them.
    pub open: OpenOptions,
    /// Also check Azure's rules: fixed type, size a whole MiB, size range.
    pub azure: bool,
}

impl Problem {
    fn error(code: &'static str, message: impl Into<String>) -> Problem {
        Problem {
            severity: Severity::Error,
            code,
            structure: None,
            place: None,
            field: None,
            offset: None,
            message: message.into(),
        }
    }

    fn warning(code: &'static str, message: impl Into<String>) -> Problem {
        Problem {
            severity: Severity::Warning,
            ..Problem::error(code, message)
        }
    }

    fn at(mut self, structure: Structure, field: &str, offset: u64) -> Problem {
        self.structure = Some(structure.to_string());
        self.place = Some(structure);
        self.field = Some(field.to_string());
        self.offset = Some(offset);
        self
    }

    fn from_error(e: &Error) -> Problem {
        let code = error_code(e);
        match e {
            Error::Corrupt(c) => Problem::error(
                code,
                format!("{}: found {}, expected {}", c.field, c.found, c.expected),
            )
            .at(c.structure, c.field, c.offset),
            Error::Checksum {
                structure,
                offset,
                found,
                computed,
                ..
            } => Problem::error(
                code,
                format!("checksum mismatch: stored {found:#010x}, computed {computed:#010x}"),
            )
            .at(*structure, "checksum", *offset),
            other => Problem::error(code, other.to_string()),
        }
    }
}

/// The code of a problem that stopped (or would stop) a reader.
fn error_code(e: &Error) -> &'static str {
    match e {
        Error::Corrupt(c) => corrupt_code(c),
        Error::Checksum { structure, .. } => match structure {
            Structure::Footer => "footer-checksum",
            Structure::FooterCopy => "footer-copy-checksum",
            _ => "header-checksum",
        },
        Error::ParentNotFound { .. } => "parent-not-found",
        Error::Limit { what, .. } => match what {
            LimitOf::Problems => "too-many-problems",
            LimitOf::BatEntries => "bat-entries-over-limit",
            LimitOf::ChainDepth => "parent-chain-too-deep",
            _ => "over-limit",
        },
        Error::ForeignFormat { .. } => "foreign-format",
        Error::FormatMismatch { .. } => "format-mismatch",
        Error::Io { .. } => "read-error",
        _ => "not-readable",
    }
}

/// The code of a damaged field, from its structure and field names.
fn corrupt_code(c: &Corruption) -> &'static str {
    use crate::vhdx::VhdxStructure as V;
    use Structure as S;
    if let S::Vhdx(v) = c.structure {
        return match v {
            V::FileIdentifier => "vhdx-file-identifier",
            V::Header(_) => "vhdx-header",
            V::RegionTable(_) => "vhdx-region-table",
            V::Metadata => "vhdx-metadata",
            V::ParentLocator => "vhdx-parent-locator",
            V::BatEntry(_) if c.rule == Rule::Overlap => "vhdx-bat-overlap",
            V::BatEntry(_) if c.field == "file offset" => "vhdx-bat-out-of-file",
            V::BatEntry(_) => "vhdx-bat",
            V::Log | V::LogEntry(_) => "vhdx-log",
        };
    }
    if c.rule == Rule::Overlap {
        return match c.structure {
            S::BatEntry(_) => "bat-overlap",
            S::ParentLocator(_) => "locator-overlap",
            _ => "metadata-overlap",
        };
    }
    match (c.structure, c.field) {
        (S::Footer, "cookie") => "footer-cookie",
        (S::FooterCopy, "cookie") => "footer-copy-cookie",
        (S::Footer | S::FooterCopy, "disk type") => "footer-disk-type",
        (S::Footer | S::FooterCopy, "current size") => "fixed-size-past-data",
        (S::Footer | S::FooterCopy, "data offset") => "footer-data-offset",
        (S::DynamicHeader, "cookie") => "header-cookie",
        (S::DynamicHeader, "block size") => "header-block-size",
        (S::DynamicHeader, "max table entries") => "header-max-table-entries",
        (S::DynamicHeader, "table offset") => "header-table-offset",
        (S::BatEntry(_), "block sector offset") => "bat-entry-out-of-file",
        (S::ParentChain, _) => "parent-chain-loop",
        _ => "corrupt-field",
    }
}

/// Checks the image at `path`.
///
/// # Errors
/// Only when the file cannot be opened or read at all; every problem of the
/// image itself is in the report.
pub fn check(path: impl AsRef<Path>, opts: &CheckOptions) -> Result<CheckReport> {
    let path = path.as_ref();
    // Fail with an error (exit 2) when the file is not readable at all. A
    // folder opens on Unix, but is no image either; nor is a FIFO or a
    // character device (opened without blocking, so they cannot hang it).
    drop(crate::io::open_input(path, false)?);
    let (img, errors) = Image::open_collect(path, &opts.open);
    check_opened(path, img, errors, opts)
}

/// Checks an image over any storage (bytes in memory, say): the same
/// checks as [`check`]. Parents are found as [`crate::Image::from_storage`]
/// finds them. The report's path is `<memory>`.
///
/// # Errors
/// Only when the storage cannot be read at all.
pub fn check_storage(
    storage: impl crate::storage::Storage + 'static,
    opts: &CheckOptions,
) -> Result<CheckReport> {
    check_storage_named(
        std::sync::Arc::new(storage),
        Path::new(crate::image::STORAGE_NAME),
        opts,
    )
}

/// [`check_storage`], the storage named `name` in the report.
pub(crate) fn check_storage_named(
    storage: std::sync::Arc<dyn crate::storage::Storage>,
    name: &Path,
    opts: &CheckOptions,
) -> Result<CheckReport> {
    let (img, errors) = Image::from_storage_collect(storage, name, &opts.open);
    check_opened(name, img, errors, opts)
}

fn check_opened(
    path: &Path,
    img: Option<Image>,
    errors: Vec<crate::Error>,
    opts: &CheckOptions,
) -> Result<CheckReport> {
    let mut problems: Vec<Problem> = errors.iter().map(Problem::from_error).collect();
    let raw_stated = opts.open.format == Some(Format::Raw);
    let mut report = CheckReport {
        path: path.to_path_buf(),
        format: img.as_ref().map(|i| i.disk_type()),
        virtual_size: img.as_ref().map(|i| i.virtual_size()),
        problems: Vec::new(),
    };
    if let Some(img) = &img {
        if img.disk_type() == Format::Raw && !raw_stated {
            problems.push(
                Problem::error(
                    "no-vhd-footer",
                    "no VHD footer at the end or at offset 0; it reads as a raw disk",
                )
                .at(
                    Structure::Footer,
                    "cookie",
                    img.file_len().saturating_sub(512),
                ),
            );
        }
        for w in img.warnings() {
            match (w.structure, w.field, w.offset) {
                // A warning with its place (the VHDX reader's).
                (Some(s), Some(f), Some(o)) => {
                    problems.push(Problem::warning(w.code, w.message.clone()).at(s, f, o));
                }
                // Judged by check's own rule in extra_checks.
                _ if w.code == "fixed-padding" => {}
                _ => problems.push(Problem::warning(w.code, w.message.clone())),
            }
        }
        extra_checks(img, &mut problems)?;
        data_under_clear_bits(img, &mut problems)?;
        for p in img.chain().iter().skip(1) {
            for w in p.warnings() {
                problems.push(Problem::warning(
                    w.code,
                    format!("parent {}: {w}", p.path().display()),
                ));
            }
        }
    }
    if opts.azure {
        azure_checks(img.as_ref(), &mut problems);
    }
    problems.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.offset.cmp(&b.offset)));
    problems.dedup();
    report.problems = problems;
    Ok(report)
}

/// True when two footers are equal but for the fields an in-place resize
/// changes (size, geometry, creator, checksum): the state between the last
/// two writes of a dynamic resize (see [`crate::ops::plan_resize`]).
pub(crate) fn differ_by_resize_only(a: &[u8; FOOTER_SIZE], b: &[u8; FOOTER_SIZE]) -> bool {
    let masked = |x: &[u8; FOOTER_SIZE]| {
        let mut m = *x;
        m[ff::CREATOR_APP..ff::CREATOR_HOST_OS].fill(0);
        m[ff::CURRENT_SIZE..ff::DISK_TYPE].fill(0);
        m[ff::CHECKSUM..ff::UNIQUE_ID].fill(0);
        m
    };
    masked(a) == masked(b)
}

fn read_footer(img: &Image, at: u64) -> Result<[u8; FOOTER_SIZE]> {
    let mut b = [0u8; FOOTER_SIZE];
    let n = (img.file_len() - at).min(FOOTER_SIZE as u64) as usize;
    ReadAt::read_exact_at(img.storage(), &mut b[..n], at)
        .map_err(|e| Error::io_at(img.path(), "read", at, e))?;
    Ok(b)
}

/// Checks that do not stop a reader.
fn extra_checks(img: &Image, problems: &mut Vec<Problem>) -> Result<()> {
    let Some(footer) = img.footer() else {
        return Ok(());
    };
    let foot_at = img.data_end();
    if img.footer_source() != Some(crate::image::FooterSource::Copy) {
        let bytes = read_footer(img, foot_at)?;
        let s = Structure::Footer;
        if Footer::reserved_nonzero(&bytes) {
            problems.push(
                Problem::warning(
                    "footer-reserved-nonzero",
                    "reserved bytes 85..512 are not zero",
                )
                .at(s, "reserved", foot_at + ff::RESERVED as u64),
            );
        }
        if img.footer_source() == Some(crate::image::FooterSource::EndLegacy) {
            problems.push(
                Problem::warning(
                    "footer-legacy-511",
                    "511-byte footer (written by Virtual PC before 2004)",
                )
                .at(s, "cookie", foot_at),
            );
        }
    }
    let s = Structure::Footer;
    if footer.format_version != Footer::VERSION {
        problems.push(
            Problem::error(
                "footer-format-version",
                format!(
                    "format version {:#010x}, expected 0x00010000",
                    footer.format_version
                ),
            )
            .at(s, "format version", foot_at + ff::FORMAT_VERSION as u64),
        );
    }
    if footer.features & 0x2 == 0 {
        problems.push(
            Problem::warning(
                "footer-features",
                format!(
                    "features {:#x}: the reserved bit 0x2 is not set",
                    footer.features
                ),
            )
            .at(s, "features", foot_at + ff::FEATURES as u64),
        );
    }
    if footer.current_size % 512 != 0 {
        problems.push(
            Problem::warning(
                "size-not-whole-sectors",
                format!(
                    "current size {} is not a whole number of sectors",
                    footer.current_size
                ),
            )
            .at(s, "current size", foot_at + ff::CURRENT_SIZE as u64),
        );
    }
    if footer.saved_state != 0 {
        problems.push(
            Problem::warning(
                "saved-state",
                "saved state is set: the virtual machine was saved with this disk attached",
            )
            .at(s, "saved state", foot_at + ff::SAVED_STATE as u64),
        );
    }
    if img.disk_type() == Format::Fixed {
        fixed_footer_place(img, footer.current_size, problems);
        if footer.data_offset != Footer::NO_DATA_OFFSET {
            problems.push(
                Problem::warning(
                    "fixed-data-offset",
                    format!(
                        "data offset {:#x} in a fixed disk, expected all ones",
                        footer.data_offset
                    ),
                )
                .at(s, "data offset", foot_at + ff::DATA_OFFSET as u64),
            );
        }
        return Ok(());
    }
    // Dynamic and differencing.
    let copy = read_footer(img, 0)?;
    if !Footer::has_cookie(&copy) {
        problems.push(
            Problem::error("footer-copy-missing", "no footer copy at offset 0").at(
                Structure::FooterCopy,
                "cookie",
                0,
            ),
        );
    } else if let Err(e) = Footer::verify_checksum(&copy, 0, Structure::FooterCopy) {
        problems.push(Problem::from_error(&e));
    } else if img.footer_source() != Some(crate::image::FooterSource::Copy) {
        let end = read_footer(img, foot_at)?;
        if end != copy && differ_by_resize_only(&end, &copy) {
            // The state between the last two writes of an in-place resize
            // (ops::plan_resize): documented, consistent, read as the new size.
            let size_of = |b: &[u8; FOOTER_SIZE]| {
                let mut v = [0u8; 8];
                v.copy_from_slice(&b[ff::CURRENT_SIZE..ff::CURRENT_SIZE + 8]);
                u64::from_be_bytes(v)
            };
            problems.push(
                Problem::warning("footer-copy-resize-pending", format!(
                    "the footer copy at offset 0 gives a size of {} bytes, the footer at {foot_at} {}: \
                     a resize stopped before its last write; vhdkit reads the footer at the end, \
                     other readers may read the copy; the same resize run again completes it",
                    size_of(&copy),
                    size_of(&end)
                ))
                .at(Structure::FooterCopy, "current size", ff::CURRENT_SIZE as u64),
            );
        } else if end != copy {
            let first = end
                .iter()
                .zip(copy.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            problems.push(
                Problem::error(
                    "footer-copy-differs",
                    format!(
                        "the footer copy at offset 0 differs from the footer at {foot_at} (first at byte {first})"
                    ),
                )
                .at(Structure::FooterCopy, "footer copy", first as u64),
            );
        }
    }
    if img.footer_source() == Some(crate::image::FooterSource::Copy) {
        // The end footer, the authority, is damaged or missing: the image
        // reads through the copy, but it is damaged all the same.
        let p = if img.file_len() >= foot_at + FOOTER_SIZE as u64 {
            match Footer::verify_checksum(&read_footer(img, foot_at)?, foot_at, Structure::Footer) {
                Err(e) => Problem::from_error(&e),
                Ok(()) => Problem::error(
                    "footer-damaged",
                    "the footer at the end is damaged; the copy at offset 0 was used",
                )
                .at(Structure::Footer, "cookie", foot_at),
            }
        } else {
            Problem::error(
                "footer-missing",
                "no footer at the end of the file (truncated?); the copy at offset 0 was used",
            )
            .at(Structure::Footer, "cookie", foot_at)
        };
        problems.push(p);
    }
    if let Some(h) = img.header() {
        let at = img.header_offset();
        if h.header_version != crate::ondisk::DynamicHeader::VERSION {
            problems.push(
                Problem::error(
                    "header-version",
                    format!(
                        "header version {:#010x}, expected 0x00010000",
                        h.header_version
                    ),
                )
                .at(
                    Structure::DynamicHeader,
                    "header version",
                    at + hf::HEADER_VERSION as u64,
                ),
            );
        }
        if h.data_offset != u64::MAX {
            problems.push(
                Problem::warning(
                    "header-data-offset",
                    format!("data offset {:#x}, expected all ones", h.data_offset),
                )
                .at(
                    Structure::DynamicHeader,
                    "data offset",
                    at + hf::DATA_OFFSET as u64,
                ),
            );
        }
        if let Some(bat) = img.bat() {
            let needed = img.block_count();
            let past: Vec<usize> = bat
                .entries
                .iter()
                .enumerate()
                .skip(needed as usize)
                .filter(|(_, &e)| e != UNALLOCATED)
                .map(|(i, _)| i)
                .collect();
            if let Some(&first) = past.first() {
                problems.push(
                    Problem::warning(
                        "bat-entries-past-disk",
                        format!(
                            "{} BAT entries past the end of the disk are allocated (ignored)",
                            past.len()
                        ),
                    )
                    .at(
                        Structure::BatEntry(first as u64),
                        "block sector offset",
                        crate::ondisk::placement::bat_entry_at(h.table_offset, first as u64),
                    ),
                );
            }
        }
        if img.disk_type() == Format::Differencing {
            let regions = metadata_regions(
                img,
                h,
                img.header_offset(),
                img.disk_type() == Format::Differencing,
                0,
            );
            for (i, l) in h.parent_locators.iter().enumerate() {
                if l.is_empty() {
                    continue;
                }
                let field_at = at + (hf::PARENT_LOCATORS + hf::LOCATOR_SIZE * i) as u64;
                let inside = regions
                    .iter()
                    .any(|r| r.what == crate::image::RegionKind::Locator(i));
                if l.data_length > 0 && !inside {
                    problems.push(
                        Problem::error(
                            "locator-outside-file",
                            format!(
                                "locator data at {}+{} lies outside the file",
                                l.data_offset, l.data_length
                            ),
                        )
                        .at(
                            Structure::ParentLocator(i),
                            "platform data offset",
                            field_at + hf::LOCATOR_DATA_OFFSET as u64,
                        ),
                    );
                }
                if let crate::ondisk::PlatformCode::Other(c) = l.platform_code {
                    problems.push(
                        Problem::warning(
                            "locator-platform-code",
                            format!(
                                "unknown platform code {}",
                                crate::ondisk::fourcc(c.to_be_bytes())
                            ),
                        )
                        .at(
                            Structure::ParentLocator(i),
                            "platform code",
                            field_at,
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Azure's rules: fixed type, size a whole MiB, size within range.
fn azure_checks(img: Option<&Image>, problems: &mut Vec<Problem>) {
    let Some(img) = img else {
        problems.push(Problem::error(
            "azure-not-readable",
            "Azure: the image could not be read, so it cannot be uploaded",
        ));
        return;
    };
    let size = img.virtual_size();
    let fix = "convert it to a fixed VHD whose size is rounded up to a whole MiB";
    if img.disk_type() != Format::Fixed {
        problems.push(Problem::error(
            "azure-not-fixed",
            format!(
                "Azure: the disk is {}, but Azure takes fixed VHDs only; {fix}",
                img.disk_type()
            ),
        ));
    }
    if size % MIB != 0 {
        let next = match size.div_ceil(MIB).checked_mul(MIB) {
            Some(n) => format!("the next is {n} bytes"),
            None => "no whole MiB above it fits in 64 bits".to_string(),
        };
        problems.push(Problem::error(
            "azure-size-not-whole-mib",
            format!(
                "Azure: the virtual size {size} bytes is not a whole number of MiB ({next}); {fix}"
            ),
        ));
    }
    if size == 0 || size > MAX_VHD_SIZE {
        problems.push(Problem::error(
            "azure-size-out-of-range",
            format!(
                "Azure: the virtual size {size} bytes is outside 1 MiB to 2040 GiB, the sizes a VHD holds"
            ),
        ));
    }
}

/// Where a fixed disk's end footer lies: on a sector boundary, or directly
/// after the data. Padding before an aligned footer is a warning; any other
/// place is an error (the data or the footer was shifted).
fn fixed_footer_place(img: &Image, size: u64, problems: &mut Vec<Problem>) {
    let at = img.data_end();
    if img.footer_source() == Some(crate::image::FooterSource::Copy) || at <= size {
        // Nothing between the data and the footer (or the footer is inside
        // the data, reported as fixed-size-past-data).
        return;
    }
    let pad = at - size;
    if at % SECTOR == 0 {
        problems.push(
            Problem::warning(
                "fixed-padding",
                format!(
                    "{pad} bytes between the end of the data ({size}) and the footer are not part \
                     of the disk"
                ),
            )
            .at(Structure::Footer, "cookie", at),
        );
    } else {
        problems.push(
            Problem::error(
                "fixed-footer-unaligned",
                format!(
                    "the footer starts at {at}, {pad} bytes after the end of the data ({size}): \
                     neither on a sector boundary nor right after the data, so the data or the \
                     footer has been shifted"
                ),
            )
            .at(Structure::Footer, "cookie", at),
        );
    }
}

/// The most blocks [`data_under_clear_bits`] names one by one, and the most
/// sector ranges it lists per block.
const MAX_BLOCKS_LISTED: usize = 100;
const MAX_RANGES_LISTED: usize = 8;

/// Dynamic disks: allocated blocks whose bitmap has clear bits over
/// non-zero data (read as zeros here, as the data by bitmap-blind readers).
/// Reads only the clear-bit sectors of blocks with partial bitmaps, in
/// pieces of at most 1 MiB, and at most as many bytes as the file holds in
/// all: blocks that overlap (reported as such) cannot make it read more.
fn data_under_clear_bits(img: &Image, problems: &mut Vec<Problem>) -> Result<()> {
    if img.disk_type() != Format::Dynamic {
        return Ok(());
    }
    let Some(bat) = img.bat() else {
        return Ok(());
    };
    let (bs, bm, size) = (img.block_size(), img.bitmap_size(), img.virtual_size());
    let read = |buf: &mut [u8], at: u64| {
        ReadAt::read_exact_at(img.storage(), buf, at)
            .map_err(|e| Error::io_at(img.path(), "read", at, e))
    };
    // bitmap_size is at most 512 KiB (a 2^31-byte block); the bitmap is read
    // only for blocks that lie inside the file.
    let mut bitmap = vec![0u8; bm as usize];
    let mut buf = Vec::new();
    let (mut listed, mut unlisted) = (0usize, 0u64);
    let mut budget = img.data_end();
    let mut stopped = false;
    'blocks: for (i, &e) in bat
        .entries
        .iter()
        .enumerate()
        .take(img.block_count() as usize)
    {
        if e == UNALLOCATED {
            continue;
        }
        let (start, end) = img.block_span(i as u64, e);
        if end > img.data_end() {
            continue; // reported as bat-entry-out-of-file
        }
        if budget < bm {
            stopped = true;
            break 'blocks;
        }
        budget -= bm;
        read(&mut bitmap, start)?;
        let base = i as u64 * bs;
        let sectors = size.saturating_sub(base).min(bs).div_ceil(SECTOR);
        let bits = SectorBitmap(&bitmap);
        if bits.all_set(sectors) {
            continue;
        }
        let data_at = start + bm;
        // Block-relative sector ranges [a, b) of non-zero data under clear
        // bits: the first few kept, the rest counted.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let (mut nranges, mut count) = (0u64, 0u64);
        let mut open: Option<(u64, u64)> = None;
        let mut close = |r: (u64, u64), ranges: &mut Vec<(u64, u64)>| {
            if ranges.len() < MAX_RANGES_LISTED {
                ranges.push(r);
            }
            nranges += 1;
            count += r.1 - r.0;
        };
        let mut s = 0u64;
        while s < sectors {
            if s % 8 == 0 && s + 8 <= sectors && bitmap[(s / 8) as usize] == 0xff {
                s += 8;
                continue;
            }
            if bits.is_set(s) {
                s += 1;
                continue;
            }
            // A run of clear bits, at most 1 MiB.
            let mut e = s + 1;
            while e < sectors && e - s < 2048 && !bits.is_set(e) {
                e += 1;
            }
            let len = (e - s) * SECTOR;
            if budget < len {
                stopped = true;
                break 'blocks;
            }
            budget -= len;
            buf.resize(len as usize, 0);
            read(&mut buf, data_at + s * SECTOR)?;
            for (j, sec) in buf.chunks(SECTOR as usize).enumerate() {
                let x = s + j as u64;
                if crate::scan::is_zero(sec) {
                    continue;
                }
                open = match open {
                    Some(r) if r.1 == x => Some((r.0, x + 1)),
                    Some(r) => {
                        close(r, &mut ranges);
                        Some((x, x + 1))
                    }
                    None => Some((x, x + 1)),
                };
            }
            s = e;
        }
        if let Some(r) = open {
            close(r, &mut ranges);
        }
        if ranges.is_empty() {
            continue;
        }
        if listed == MAX_BLOCKS_LISTED {
            unlisted += 1;
            continue;
        }
        listed += 1;
        let mut list: Vec<String> = ranges
            .iter()
            .map(|(a, b)| {
                if b - a == 1 {
                    a.to_string()
                } else {
                    format!("{a}..{b}")
                }
            })
            .collect();
        if nranges > ranges.len() as u64 {
            list.push(format!("and {} more ranges", nranges - ranges.len() as u64));
        }
        problems.push(
            Problem::warning(
                "data-under-clear-bitmap",
                format!(
                    "block {i} (virtual bytes {base}..{}): {count} sector{} of the block ({}) \
                     hold non-zero data but their bitmap bits are clear; vhdkit reads them as \
                     zeros, as the VHD specification says, but other readers (qemu-img, which \
                     ignores bitmaps) may show that data",
                    (base + bs).min(size),
                    if count == 1 { "" } else { "s" },
                    list.join(", ")
                ),
            )
            .at(Structure::Block(i as u64), "sector bitmap", start),
        );
    }
    if stopped {
        problems.push(Problem::warning(
            "data-under-clear-bitmap",
            format!(
                "the search for data under clear bitmap bits stopped after reading {} bytes, \
                 the file's length: blocks overlap",
                img.data_end()
            ),
        ));
    }
    if unlisted > 0 {
        problems.push(Problem::warning(
            "data-under-clear-bitmap",
            format!(
                "{unlisted} more blocks hold non-zero data under clear bitmap bits (not listed)"
            ),
        ));
    }
    Ok(())
}
