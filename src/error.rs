//! One error type for the whole crate.
//!
//! A damaged image is reported as [`Error::Corrupt`]: the file, the structure
//! (footer, dynamic header, BAT entry N, block N, parent locator N), the
//! field, the absolute file offset of that field, and what was found against
//! what was expected.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::Format;

/// A structure of a VHD file, named as the specification names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Structure {
    /// The footer at the end of the file (authoritative).
    Footer,
    /// The copy of the footer at offset 0 of a dynamic or differencing disk.
    FooterCopy,
    /// The 1024-byte dynamic disk header.
    DynamicHeader,
    /// The block allocation table as a whole.
    Bat,
    /// One entry of the block allocation table.
    BatEntry(u64),
    /// One data block (sector bitmap and data).
    Block(u64),
    /// One of the eight parent locator entries of the dynamic header.
    ParentLocator(usize),
    /// The parent chain of a differencing disk.
    ParentChain,
    /// The file as a whole (its length, its layout).
    File,
    /// A VHDX structure (file identifier, header 1 or 2, region table 1 or
    /// 2, metadata, BAT entry N, log, log entry at a log offset).
    Vhdx(crate::vhdx::VhdxStructure),
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Structure::Footer => f.write_str("footer"),
            Structure::FooterCopy => f.write_str("footer copy"),
            Structure::DynamicHeader => f.write_str("dynamic header"),
            Structure::Bat => f.write_str("BAT"),
            Structure::BatEntry(n) => write!(f, "BAT entry {n}"),
            Structure::Block(n) => write!(f, "block {n}"),
            Structure::ParentLocator(n) => write!(f, "parent locator {n}"),
            Structure::ParentChain => f.write_str("parent chain"),
            Structure::File => f.write_str("file"),
            Structure::Vhdx(v) => write!(f, "{v}"),
        }
    }
}

/// Which rule of the format a damaged field breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rule {
    /// The field holds a value the format does not allow (a bad cookie, a
    /// size that is not a power of two, an offset past the end...).
    Value,
    /// The range the field places overlaps another structure or block.
    Overlap,
}

/// Where a structure went wrong: enough to find the byte with a hex editor.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Corruption {
    /// The file, when known (parsers of in-memory structures leave it empty
    /// and [`Image::open`](crate::Image::open) fills it in).
    pub path: Option<PathBuf>,
    /// The structure that holds the bad field.
    pub structure: Structure,
    /// The field, in the specification's words.
    pub field: &'static str,
    /// Absolute offset of the field in the file.
    pub offset: u64,
    /// What the file holds.
    pub found: String,
    /// What a valid image holds.
    pub expected: String,
    /// The rule broken, for callers that decide by it.
    pub rule: Rule,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.path {
            write!(f, "{}: ", p.display())?;
        }
        write!(
            f,
            "{}, field {} at offset {}: found {}, expected {}",
            self.structure, self.field, self.offset, self.found, self.expected
        )
    }
}

/// What an [`Error::Limit`] counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitOf {
    /// The depth of a differencing chain
    /// ([`OpenOptions::max_chain_depth`](crate::OpenOptions::max_chain_depth)).
    ChainDepth,
    /// A VHD dynamic header's max table entries
    /// ([`OpenOptions::max_bat_entries`](crate::OpenOptions::max_bat_entries)).
    BatEntries,
    /// The entries of a VHDX BAT.
    VhdxBatEntries,
    /// The problems a check lists (the rest are counted).
    Problems,
    /// The 32-bit sector offset of a new block, the format's own limit.
    BlockSectorOffset,
}

impl fmt::Display for LimitOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitOf::ChainDepth => "parent chain depth",
            LimitOf::BatEntries => "dynamic header max table entries",
            LimitOf::VhdxBatEntries => "VHDX BAT entries",
            LimitOf::Problems => "the number of problems found (only the first are listed)",
            LimitOf::BlockSectorOffset => "the sector offset of a new block",
        })
    }
}

/// What kind of error an [`Error`] is, for callers that decide by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Not an image of a kind vhdkit reads: another format (qcow2, VHDX...),
    /// or a FIFO, socket or character device.
    NotAnImage,
    /// A valid image asking for something vhdkit does not do.
    Unsupported,
    /// A structure is damaged ([`Error::Corrupt`], typed: structure, field,
    /// offset, found, expected).
    Corrupt,
    /// A checksum does not match.
    Checksum,
    /// A differencing disk's parent was not found anywhere allowed.
    ParentMissing,
    /// Files of the parent's name were found, but with another unique id.
    ParentMismatch,
    /// The parent chain is deeper than allowed, or loops.
    ChainTooDeepOrLooping,
    /// The file asks for more than a limit allows (BAT entries...).
    Limit,
    /// An I/O error.
    Io,
    /// A caller's option or argument is out of range or contradictory.
    InvalidOption,
    /// An operation applied to a kind of image it does not apply to, or a
    /// forced format the file is not.
    WrongImageKind,
    /// A read or write past the end of the disk.
    OutOfRange,
    /// The output cannot be written (a directory, a FIFO, a device of
    /// another size, the input itself, a locked or read-only file).
    OutputRefused,
    /// The output exists and overwriting was not asked for.
    OutputExists,
    /// The operation was cancelled.
    Cancelled,
}

/// Every error vhdkit returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error: on a file when one is named, at an offset when the
    /// error is a read or a write at one.
    #[error(
        "{}{op}{}: {source}",
        path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default(),
        offset.map(|o| format!(" at offset {o}")).unwrap_or_default()
    )]
    Io {
        /// The file, when known (in-memory storages and adapters have none).
        path: Option<PathBuf>,
        /// What was being done ("read", "write", "open", ...).
        op: &'static str,
        /// The offset read or written, when the operation has one.
        offset: Option<u64>,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A structure of the image is damaged or inconsistent.
    #[error("{0}")]
    Corrupt(Box<Corruption>),
    /// A checksum does not match; the image may be read anyway on request.
    #[error(
        "{}{structure} checksum at offset {offset}: found {found:#010x}, computed {computed:#010x} \
         (the image is damaged or was edited by hand; it can still be read with checksums \
         ignored)",
        path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default()
    )]
    Checksum {
        /// The file.
        path: Option<PathBuf>,
        /// Footer or dynamic header.
        structure: Structure,
        /// Absolute offset of the checksum field.
        offset: u64,
        /// The stored checksum.
        found: u32,
        /// The checksum of the bytes as they are.
        computed: u32,
    },
    /// The parent of a differencing disk could not be found or was refused.
    #[error(
        "{}: parent with unique id {parent_id} not found; tried: {}",
        path.display(),
        if tried.is_empty() { "nothing (no locator and no parent name)".to_string() } else { tried.join("; ") }
    )]
    ParentNotFound {
        /// The child.
        path: PathBuf,
        /// The unique id the child's header names.
        parent_id: String,
        /// Each candidate and why it was not used.
        tried: Vec<String>,
        /// Candidates that were found and opened but carry another unique
        /// id: files of that name exist, but are not this disk's parent.
        wrong_id: Vec<PathBuf>,
    },
    /// A differencing disk's header records its parent otherwise than the
    /// parent is (unique id, time stamp, size): the parent changed since
    /// the child was made, or is another disk.
    #[error(
        "{}: records its parent's {field} as {recorded}, but {} has {found}",
        path.display(),
        parent.display()
    )]
    ParentMismatch {
        /// The child.
        path: PathBuf,
        /// The parent it was checked against.
        parent: PathBuf,
        /// What differs ("unique id", "time stamp", "size").
        field: &'static str,
        /// What the child records.
        recorded: String,
        /// What the parent has.
        found: String,
    },
    /// A limit was exceeded: one set in [`OpenOptions`](crate::OpenOptions),
    /// or one of the format's own (a block's 32-bit sector offset).
    #[error("{}: {what} is {value}, over the limit of {limit}", path.display())]
    Limit {
        /// The file.
        path: PathBuf,
        /// What was counted.
        what: LimitOf,
        /// The value found.
        value: u64,
        /// The limit in force.
        limit: u64,
    },
    /// A valid image that asks for something vhdkit does not do.
    #[error("{}: {what}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        what: String,
    },
    /// The file is neither a regular file nor a block device (a FIFO, a
    /// character device, a socket): it is not read as a disk image.
    #[error(
        "{}: is {kind}; only regular files and block devices are read as disk images",
        path.display()
    )]
    NotAnImageFile {
        /// The file.
        path: PathBuf,
        /// What it is ("a FIFO (named pipe)", "a character device", ...).
        kind: &'static str,
    },
    /// The file is another disk image format (qcow2, VHDX, VMDK...), which
    /// vhdkit does not read; read as raw it would be a disk of its own
    /// metadata. Forcing the raw format reads its bytes anyway.
    #[error(
        "{} is a {format}{} image; vhdkit reads VHD, VHDX and raw disks",
        path.display(),
        version.as_ref().map(|v| format!(" (version {v})")).unwrap_or_default()
    )]
    #[non_exhaustive]
    ForeignFormat {
        /// The file.
        path: PathBuf,
        /// The format found (`qcow2`, `vmdk`, …).
        format: &'static str,
        /// The version the file states, when it states one.
        version: Option<String>,
    },
    /// The caller forced a format ([`OpenOptions::format`](crate::OpenOptions::format))
    /// that the file is not.
    #[error(
        "{}: {}",
        path.display(),
        match found {
            Some(found) => format!("the file is {found}, not {asked}"),
            None if *asked == Format::Vhdx => "no VHDX file identifier at offset 0, so not vhdx".to_string(),
            None => format!("no VHD footer at the end or at offset 0, so not {asked}"),
        }
    )]
    FormatMismatch {
        /// The file.
        path: PathBuf,
        /// The format the caller asked for.
        asked: Format,
        /// The format the file is, when it is one (`None`: none of the
        /// structures of the format asked for were found).
        found: Option<Format>,
    },
    /// An operation that does not apply to this kind of image: resizing a
    /// differencing disk, writing into a raw file, merging a disk that has
    /// no parent...
    #[error("{}: {reason}", path.display())]
    WrongImageKind {
        /// The image.
        path: PathBuf,
        /// The operation ("resize", "sparsify", "merge", "write", ...).
        operation: &'static str,
        /// What the image is.
        kind: Format,
        /// Why the operation does not apply, in a sentence.
        reason: String,
    },
    /// A caller's option or argument is out of range or contradictory.
    #[error(
        "{}{message}",
        path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default()
    )]
    InvalidOption {
        /// The file the option applies to, when there is one.
        path: Option<PathBuf>,
        /// The option, as the library names it ("block size", "size",
        /// "threads", "shrink", "force", "parent", ...).
        option: &'static str,
        /// The value given (empty when the option is a switch left off).
        value: String,
        /// What is wrong, in a sentence.
        message: String,
    },
    /// A range that leaves the virtual disk (or overflows).
    #[error(
        "{}{len} bytes at offset {offset} leave the disk of {size} bytes",
        path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default()
    )]
    OutOfRange {
        /// The image, when known.
        path: Option<PathBuf>,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the disk.
        size: u64,
    },
    /// The output cannot be written: a directory, a FIFO, a device of
    /// another size, the input itself, a file locked or read-only...
    #[error("{}: {reason}", path.display())]
    OutputRefused {
        /// The target.
        path: PathBuf,
        /// Why it is refused, in a sentence.
        reason: String,
    },
    /// The output exists and overwriting was not requested.
    #[error("{}: the output exists and was left as it is", .0.display())]
    OutputExists(PathBuf),
    /// The operation was cancelled (Ctrl-C); no output was left behind.
    #[error("interrupted; no output was written")]
    Interrupted,
    /// A blob could not be read or written (the SAS signature redacted).
    #[cfg(feature = "azure")]
    #[error("{0}")]
    Azure(Box<crate::azure::AzureError>),
}

/// An I/O error where nothing but the error is known (no file, no offset);
/// [`Error::with_path`] names the file.
impl From<io::Error> for Error {
    fn from(source: io::Error) -> Error {
        Error::Io {
            path: None,
            op: "I/O",
            offset: None,
            source,
        }
    }
}

impl Error {
    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Corrupt(c) if c.structure == Structure::ParentChain => {
                ErrorKind::ChainTooDeepOrLooping
            }
            Error::Corrupt(_) => ErrorKind::Corrupt,
            Error::Checksum { .. } => ErrorKind::Checksum,
            Error::ParentNotFound { wrong_id, .. } if !wrong_id.is_empty() => {
                ErrorKind::ParentMismatch
            }
            Error::ParentNotFound { .. } => ErrorKind::ParentMissing,
            Error::ParentMismatch { .. } => ErrorKind::ParentMismatch,
            Error::Limit {
                what: LimitOf::ChainDepth,
                ..
            } => ErrorKind::ChainTooDeepOrLooping,
            Error::Limit { .. } => ErrorKind::Limit,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::NotAnImageFile { .. } | Error::ForeignFormat { .. } => ErrorKind::NotAnImage,
            Error::FormatMismatch { .. } | Error::WrongImageKind { .. } => {
                ErrorKind::WrongImageKind
            }
            Error::InvalidOption { .. } => ErrorKind::InvalidOption,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::OutputRefused { .. } => ErrorKind::OutputRefused,
            Error::OutputExists(_) => ErrorKind::OutputExists,
            Error::Interrupted => ErrorKind::Cancelled,
            #[cfg(feature = "azure")]
            Error::Azure(a) => match a.kind {
                crate::azure::AzureErrorKind::Interrupted => ErrorKind::Cancelled,
                crate::azure::AzureErrorKind::Exists => ErrorKind::OutputExists,
                crate::azure::AzureErrorKind::InvalidUrl
                | crate::azure::AzureErrorKind::PlainHttp => ErrorKind::InvalidOption,
                _ => ErrorKind::Io,
            },
        }
    }

    /// The file the error is about, when it names one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::ParentNotFound { path, .. }
            | Error::ParentMismatch { path, .. }
            | Error::Limit { path, .. }
            | Error::Unsupported { path, .. }
            | Error::NotAnImageFile { path, .. }
            | Error::ForeignFormat { path, .. }
            | Error::FormatMismatch { path, .. }
            | Error::WrongImageKind { path, .. }
            | Error::OutputRefused { path, .. }
            | Error::OutputExists(path) => Some(path),
            Error::Io { path, .. }
            | Error::Checksum { path, .. }
            | Error::InvalidOption { path, .. }
            | Error::OutOfRange { path, .. } => path.as_deref(),
            Error::Corrupt(c) => c.path.as_deref(),
            Error::Interrupted => None,
            #[cfg(feature = "azure")]
            Error::Azure(_) => None,
        }
    }

    /// Builds an [`Error::Corrupt`].
    pub fn corrupt(
        structure: Structure,
        field: &'static str,
        offset: u64,
        found: impl fmt::Display,
        expected: impl fmt::Display,
    ) -> Error {
        Error::Corrupt(Box::new(Corruption {
            path: None,
            structure,
            field,
            offset,
            found: found.to_string(),
            expected: expected.to_string(),
            rule: Rule::Value,
        }))
    }

    /// Builds an [`Error::Corrupt`] for a range that overlaps another
    /// structure ([`Rule::Overlap`]).
    pub fn overlap(
        structure: Structure,
        field: &'static str,
        offset: u64,
        found: impl fmt::Display,
        expected: impl fmt::Display,
    ) -> Error {
        match Error::corrupt(structure, field, offset, found, expected) {
            Error::Corrupt(mut c) => {
                c.rule = Rule::Overlap;
                Error::Corrupt(c)
            }
            other => other,
        }
    }

    /// Names the file in errors that were built without one.
    pub fn with_path(mut self, path: &Path) -> Error {
        match &mut self {
            Error::Corrupt(c) => fill(&mut c.path, path),
            Error::Checksum { path: p, .. }
            | Error::Io { path: p, .. }
            | Error::OutOfRange { path: p, .. } => fill(p, path),
            _ => {}
        }
        self
    }

    /// An I/O error on `path`.
    pub fn io(path: &Path, op: &'static str, source: io::Error) -> Error {
        Error::Io {
            path: Some(path.to_path_buf()),
            op,
            offset: None,
            source,
        }
    }

    /// An I/O error on `path` reading or writing at `offset`.
    pub fn io_at(path: &Path, op: &'static str, offset: u64, source: io::Error) -> Error {
        Error::Io {
            path: Some(path.to_path_buf()),
            op,
            offset: Some(offset),
            source,
        }
    }

    /// An [`Error::InvalidOption`] that names no file.
    pub fn invalid_option(
        option: &'static str,
        value: impl fmt::Display,
        message: impl Into<String>,
    ) -> Error {
        Error::InvalidOption {
            path: None,
            option,
            value: value.to_string(),
            message: message.into(),
        }
    }

    /// An [`Error::InvalidOption`] about the file `path`.
    pub(crate) fn invalid_option_for(
        path: &Path,
        option: &'static str,
        value: impl fmt::Display,
        message: impl Into<String>,
    ) -> Error {
        Error::InvalidOption {
            path: Some(path.to_path_buf()),
            option,
            value: value.to_string(),
            message: message.into(),
        }
    }

    /// An [`Error::WrongImageKind`].
    pub(crate) fn wrong_kind(
        path: &Path,
        operation: &'static str,
        kind: Format,
        reason: impl Into<String>,
    ) -> Error {
        Error::WrongImageKind {
            path: path.to_path_buf(),
            operation,
            kind,
            reason: reason.into(),
        }
    }

    /// An [`Error::OutputRefused`].
    pub(crate) fn refused(path: &Path, reason: impl Into<String>) -> Error {
        Error::OutputRefused {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        use io::ErrorKind as K;
        let kind = match &e {
            Error::Interrupted => K::Interrupted,
            Error::InvalidOption { .. }
            | Error::OutOfRange { .. }
            | Error::FormatMismatch { .. }
            | Error::WrongImageKind { .. }
            | Error::OutputRefused { .. } => K::InvalidInput,
            Error::OutputExists(_) => K::AlreadyExists,
            Error::ParentNotFound { wrong_id, .. } if wrong_id.is_empty() => K::NotFound,
            Error::Unsupported { .. } => K::Unsupported,
            _ => K::InvalidData,
        };
        match e {
            Error::Io { source, .. } => source,
            other => io::Error::new(kind, other),
        }
    }
}

/// Sets `slot` to `path` when it names no file yet.
fn fill(slot: &mut Option<PathBuf>, path: &Path) {
    if slot.is_none() {
        *slot = Some(path.to_path_buf());
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
