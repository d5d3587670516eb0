//! Structural validation that reports every problem found, each with its
//! offset, rather than stopping at the first.
//!
//! The same validation code as [`Image::open`] runs in a collecting mode, and
//! checks that do not stop a reader (reserved fields, version fields, the
//! footer copy, BAT entries past the disk, locator data) run on top. With
//! `azure`, Azure's upload rules are checked too.

use crate::error::{Error, Result, Structure};
use crate::image::{metadata_regions, Format, Image, OpenOptions};
use crate::io::ReadAt;
use crate::ondisk::{footer_fields as ff, header_fields as hf, Footer, FOOTER_SIZE, UNALLOCATED};
use crate::write::{MAX_VHD_SIZE, MIB};
use std::path::{Path, PathBuf};

/// How serious a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Unusual but readable; does not fail the check.
    Warning,
    /// The image is damaged, or breaks a rule asked for (Azure).
    Error,
}

/// One problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// The structure, when one is to blame ("footer", "BAT entry 3"...).
    pub structure: Option<String>,
    /// The field, when one is to blame.
    pub field: Option<String>,
    /// Absolute file offset, when known.
    pub offset: Option<u64>,
    /// What is wrong, in plain words.
    pub message: String,
}

/// The result of [`check`].
#[derive(Clone, Debug)]
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
    fn error(message: impl Into<String>) -> Problem {
        Problem {
            severity: Severity::Error,
            structure: None,
            field: None,
            offset: None,
            message: message.into(),
        }
    }

    fn warning(message: impl Into<String>) -> Problem {
        Problem {
            severity: Severity::Warning,
            ..Problem::error(message)
        }
    }

    fn at(mut self, structure: Structure, field: &str, offset: u64) -> Problem {
        self.structure = Some(structure.to_string());
        self.field = Some(field.to_string());
        self.offset = Some(offset);
        self
    }

    fn from_error(e: &Error) -> Problem {
        match e {
            Error::Corrupt(c) => Problem::error(format!(
                "{}: found {}, expected {}",
                c.field, c.found, c.expected
            ))
            .at(c.structure, c.field, c.offset),
            Error::Checksum {
                structure,
                offset,
                found,
                computed,
                ..
            } => Problem::error(format!(
                "checksum mismatch: stored {found:#010x}, computed {computed:#010x}"
            ))
            .at(*structure, "checksum", *offset),
            other => Problem::error(other.to_string()),
        }
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
    // folder opens on Unix, but is no image either.
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    if file.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(Error::io(
            path,
            "open",
            std::io::Error::other("is a folder, not an image file"),
        ));
    }
    let (img, errors) = Image::open_collect(path, &opts.open);
    let mut problems: Vec<Problem> = errors.iter().map(Problem::from_error).collect();
    let mut report = CheckReport {
        path: path.to_path_buf(),
        format: img.as_ref().map(|i| i.disk_type()),
        virtual_size: img.as_ref().map(|i| i.virtual_size()),
        problems: Vec::new(),
    };
    if let Some(img) = &img {
        for w in img.warnings() {
            problems.push(Problem::warning(w.clone()));
        }
        extra_checks(img, &mut problems)?;
        for p in img.chain().iter().skip(1) {
            for w in p.warnings() {
                problems.push(Problem::warning(format!(
                    "parent {}: {w}",
                    p.path().display()
                )));
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
    ReadAt::read_exact_at(img.file(), &mut b[..n], at)
        .map_err(|e| Error::io(img.path(), "read", e))?;
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
            problems.push(Problem::warning("reserved bytes 85..512 are not zero").at(
                s,
                "reserved",
                foot_at + ff::RESERVED as u64,
            ));
        }
        if img.footer_source() == Some(crate::image::FooterSource::EndLegacy) {
            problems.push(
                Problem::warning("511-byte footer (written by Virtual PC before 2004)")
                    .at(s, "cookie", foot_at),
            );
        }
    }
    let s = Structure::Footer;
    if footer.format_version != Footer::VERSION {
        problems.push(
            Problem::error(format!(
                "format version {:#010x}, expected 0x00010000",
                footer.format_version
            ))
            .at(s, "format version", foot_at + ff::FORMAT_VERSION as u64),
        );
    }
    if footer.features & 0x2 == 0 {
        problems.push(
            Problem::warning(format!(
                "features {:#x}: the reserved bit 0x2 is not set",
                footer.features
            ))
            .at(s, "features", foot_at + ff::FEATURES as u64),
        );
    }
    if footer.current_size % 512 != 0 {
        problems.push(
            Problem::warning(format!(
                "current size {} is not a whole number of sectors",
                footer.current_size
            ))
            .at(s, "current size", foot_at + ff::CURRENT_SIZE as u64),
        );
    }
    if footer.saved_state != 0 {
        problems.push(
            Problem::warning(
                "saved state is set: the virtual machine was saved with this disk attached",
            )
            .at(s, "saved state", foot_at + ff::SAVED_STATE as u64),
        );
    }
    if img.disk_type() == Format::Fixed {
        if footer.data_offset != Footer::NO_DATA_OFFSET {
            problems.push(
                Problem::warning(format!(
                    "data offset {:#x} in a fixed disk, expected all ones",
                    footer.data_offset
                ))
                .at(s, "data offset", foot_at + ff::DATA_OFFSET as u64),
            );
        }
        return Ok(());
    }
    // Dynamic and differencing.
    let copy = read_footer(img, 0)?;
    if !Footer::has_cookie(&copy) {
        problems.push(Problem::error("no footer copy at offset 0").at(
            Structure::FooterCopy,
            "cookie",
            0,
        ));
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
                Problem::warning(format!(
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
                Problem::error(format!(
                    "the footer copy at offset 0 differs from the footer at {foot_at} (first at byte {first})"
                ))
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
                    "the footer at the end is damaged; the copy at offset 0 was used",
                )
                .at(Structure::Footer, "cookie", foot_at),
            }
        } else {
            Problem::error(
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
                Problem::error(format!(
                    "header version {:#010x}, expected 0x00010000",
                    h.header_version
                ))
                .at(
                    Structure::DynamicHeader,
                    "header version",
                    at + hf::HEADER_VERSION as u64,
                ),
            );
        }
        if h.data_offset != u64::MAX {
            problems.push(
                Problem::warning(format!(
                    "data offset {:#x}, expected all ones",
                    h.data_offset
                ))
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
                    Problem::warning(format!(
                        "{} BAT entries past the end of the disk are allocated (ignored)",
                        past.len()
                    ))
                    .at(
                        Structure::BatEntry(first as u64),
                        "block sector offset",
                        h.table_offset + 4 * first as u64,
                    ),
                );
            }
        }
        if img.disk_type() == Format::Differencing {
            let regions = metadata_regions(img, h, 0);
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
                        Problem::error(format!(
                            "locator data at {}+{} lies outside the file",
                            l.data_offset, l.data_length
                        ))
                        .at(
                            Structure::ParentLocator(i),
                            "platform data offset",
                            field_at + hf::LOCATOR_DATA_OFFSET as u64,
                        ),
                    );
                }
                if let crate::ondisk::PlatformCode::Other(c) = l.platform_code {
                    problems.push(
                        Problem::warning(format!(
                            "unknown platform code {}",
                            crate::ondisk::fourcc(c.to_be_bytes())
                        ))
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
            "Azure: the image could not be read, so it cannot be uploaded",
        ));
        return;
    };
    let size = img.virtual_size();
    let fix = "convert it with `vhdkit convert IN OUT --to fixed --azure`";
    if img.disk_type() != Format::Fixed {
        problems.push(Problem::error(format!(
            "Azure: the disk is {}, but Azure takes fixed VHDs only; {fix}",
            img.disk_type()
        )));
    }
    if size % MIB != 0 {
        let next = match size.div_ceil(MIB).checked_mul(MIB) {
            Some(n) => format!("the next is {n} bytes"),
            None => "no whole MiB above it fits in 64 bits".to_string(),
        };
        problems.push(Problem::error(format!(
            "Azure: the virtual size {size} bytes is not a whole number of MiB ({next}); {fix}"
        )));
    }
    if size == 0 || size > MAX_VHD_SIZE {
        problems.push(Problem::error(format!(
            "Azure: the virtual size {size} bytes is outside 1 MiB to 2040 GiB, the sizes a VHD holds"
        )));
    }
}
