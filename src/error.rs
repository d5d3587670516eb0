//! One error type for the whole crate.
//!
//! A damaged image is reported as [`Error::Corrupt`]: the file, the structure
//! (footer, dynamic header, BAT entry N, block N, parent locator N), the
//! field, the absolute file offset of that field, and what was found against
//! what was expected.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

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

/// Where a structure went wrong: enough to find the byte with a hex editor.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The output exists and overwriting was not asked for.
    OutputExists,
    /// The operation was cancelled.
    Cancelled,
}

/// Every error vhdkit returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("read", "write", "open", ...).
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An I/O error where no file name is at hand (in-memory sources, adapters).
    #[error("{0}")]
    RawIo(#[from] io::Error),
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
    /// A limit set in [`OpenOptions`](crate::OpenOptions) was exceeded.
    #[error("{}: {what} is {value}, over the limit of {limit}", path.display())]
    Limit {
        /// The file.
        path: PathBuf,
        /// What was counted.
        what: &'static str,
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
    /// A caller's argument is out of range or contradictory.
    #[error("{0}")]
    InvalidArgument(String),
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

impl Error {
    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } | Error::RawIo(_) => ErrorKind::Io,
            Error::Corrupt(c) if c.structure == Structure::ParentChain => {
                ErrorKind::ChainTooDeepOrLooping
            }
            Error::Corrupt(_) => ErrorKind::Corrupt,
            Error::Checksum { .. } => ErrorKind::Checksum,
            Error::ParentNotFound { wrong_id, .. } if !wrong_id.is_empty() => {
                ErrorKind::ParentMismatch
            }
            Error::ParentNotFound { .. } => ErrorKind::ParentMissing,
            Error::Limit { what, .. } if what.contains("parent chain") => {
                ErrorKind::ChainTooDeepOrLooping
            }
            Error::Limit { .. } => ErrorKind::Limit,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::NotAnImageFile { .. } | Error::ForeignFormat { .. } => ErrorKind::NotAnImage,
            Error::InvalidArgument(_) => ErrorKind::InvalidOption,
            Error::OutputExists(_) => ErrorKind::OutputExists,
            Error::Interrupted => ErrorKind::Cancelled,
            #[cfg(feature = "azure")]
            Error::Azure(a) => match a.kind {
                crate::azure::AzureErrorKind::Interrupted => ErrorKind::Cancelled,
                crate::azure::AzureErrorKind::Exists => ErrorKind::OutputExists,
                crate::azure::AzureErrorKind::InvalidUrl => ErrorKind::InvalidOption,
                _ => ErrorKind::Io,
            },
        }
    }

    /// The file the error is about, when it names one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::ParentNotFound { path, .. }
            | Error::Limit { path, .. }
            | Error::Unsupported { path, .. }
            | Error::NotAnImageFile { path, .. }
            | Error::ForeignFormat { path, .. }
            | Error::OutputExists(path) => Some(path),
            Error::Checksum { path, .. } => path.as_deref(),
            Error::Corrupt(c) => c.path.as_deref(),
            Error::RawIo(_) | Error::InvalidArgument(_) | Error::Interrupted => None,
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
        }))
    }

    /// Names the file in errors that were built without one.
    pub fn with_path(self, path: &Path) -> Error {
        match self {
            Error::Corrupt(mut c) if c.path.is_none() => {
                c.path = Some(path.to_path_buf());
                Error::Corrupt(c)
            }
            Error::Checksum {
                path: None,
                structure,
                offset,
                found,
                computed,
            } => Error::Checksum {
                path: Some(path.to_path_buf()),
                structure,
                offset,
                found,
                computed,
            },
            Error::RawIo(source) => Error::Io {
                path: path.to_path_buf(),
                op: "I/O",
                source,
            },
            other => other,
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: &Path, op: &'static str, source: io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io { source, .. } | Error::RawIo(source) => source,
            Error::Interrupted => io::Error::new(io::ErrorKind::Interrupted, e),
            Error::InvalidArgument(_) => io::Error::new(io::ErrorKind::InvalidInput, e),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
