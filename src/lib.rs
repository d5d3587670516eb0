//! # vhdkit
//!
//! Read, check, map and convert VHD disk images — the Virtual PC / Hyper-V /
//! Azure format — and Hyper-V's VHDX (read-only: [`Image::open`] opens a
//! VHDX as [`Format::Vhdx`], and everything that reads an image reads it),
//! with sparse outputs and parallel, positional I/O.
//!
//! ```
//! use std::io::Read;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let raw = dir.path().join("disk.raw");
//! # std::fs::write(&raw, vec![7u8; 1 << 20])?;
//! // Convert a raw disk into a dynamic VHD, then read it back.
//! let vhd = dir.path().join("disk.vhd");
//! vhdkit::convert(&raw, &vhd, &vhdkit::ConvertOptions::new(vhdkit::Target::Dynamic))?;
//! let image = vhdkit::Image::open(&vhd)?;
//! assert_eq!(image.disk_type(), vhdkit::Format::Dynamic);
//! assert_eq!(image.virtual_size(), 1 << 20);
//! let mut first = [0u8; 512];
//! image.reader().read_exact(&mut first)?;
//! assert_eq!(first, [7u8; 512]);
//! // The map says what is data and what is zero, without reading it.
//! let extents = image.map_all()?;
//! assert!(extents.iter().all(|e| e.is_data()));
//! # Ok(()) }
//! ```

#![forbid(unsafe_op_in_unsafe_fn)]
// The declared MSRV (1.88, for the Azure SDK) has `is_multiple_of`; the
// crate's `x % n == 0` checks predate it and are left as written.
#![allow(clippy::manual_is_multiple_of)]
#![deny(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![warn(missing_docs)]

// vhdkit builds on Unix (Linux first): positional I/O, SEEK_DATA/SEEK_HOLE,
// hole punching and the parent-opening rules use Unix calls. Say so at build
// time rather than with a page of unresolved imports.
#[cfg(not(unix))]
compile_error!(
    "vhdkit builds on Unix-like systems only (Linux, the BSDs, macOS); Windows is not supported"
);

#[cfg(feature = "azure")]
pub mod azure;
pub mod check;
pub mod convert;
pub mod create;
pub(crate) mod detect;
pub mod error;
pub mod image;
pub(crate) mod io;
pub mod merge;
pub mod ondisk;
pub mod ops;
pub(crate) mod scan;
pub mod sinks;
pub mod storage;
pub mod vhdx;
pub mod walk;
pub(crate) mod write;
pub mod writer;

/// The zero scan's internals, for the project's benches (the
/// `bench-internals` feature); not part of the API.
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod internals {
    pub use crate::scan::{is_zero, nonzero_runs, ZERO_UNIT};
}

pub use check::{check, check_storage, CheckOptions, CheckReport, Problem, Severity};
pub use convert::{convert, ConvertOptions, Progress, Report, Target};
pub use create::{
    create, create_child, ChildOptions, CreateOptions, Created, CreatedParent, DiskKind,
};
pub use error::{Error, ErrorKind, LimitOf, Result, Rule};
pub use image::{
    Extent, ExtentKind, FolderResolver, Format, Image, OpenOptions, OwnedReader, ParentHint,
    ParentId, ParentRequest, ParentResolver, ParentSource, Reader, Warning,
};
pub use io::ReadAt;
pub use ops::{Checksum, Comparison, MapExtent, SparsifyReport};
pub use sinks::{MemorySink, Sink};
pub use storage::{FileStorage, MemoryStorage, Storage};
pub use walk::{cancel_all, clear_cancel, CancelToken, Control, Event};
pub use writer::VhdWriter;
