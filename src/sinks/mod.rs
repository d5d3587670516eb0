//! Where bytes go: the destinations of [`crate::walk::copy`], one file each.
//!
//! * `raw.rs`: a raw disk file (zero pages left as holes).
//! * `fixed.rs`: a fixed VHD file (a raw file and a footer).
//! * `dynamic.rs`: a dynamic VHD file, with its slot planning and metadata.
//! * `memory.rs`: bytes in memory ([`MemorySink`]: tests, embedding).
//!
//! The file sinks write to a temporary file beside the target and rename it
//! into place only when complete (`write::AtomicOutput`): atomic
//! output is a property of the file sinks, not of the engine or of
//! `convert`. Adding a destination (a page blob, say) is one more file
//! implementing [`Sink`] (and the crate's `FileSink` when it commits like a
//! file).

pub(crate) mod dynamic;
pub(crate) mod fixed;
pub(crate) mod memory;
pub(crate) mod raw;

pub use crate::walk::Sink;
pub use memory::MemorySink;

use crate::error::{Error, Result};
use crate::io::WriteAt;
use std::fs::File;
use std::path::Path;

/// What a file sink did once finished and committed.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Finished {
    /// The output's length.
    pub output_len: u64,
    /// Blocks stored (dynamic outputs).
    pub allocated_blocks: Option<u64>,
    /// Bytes of metadata written (footers, header, BAT).
    pub metadata: u64,
}

/// A sink that ends in a file: finished (metadata written), then committed
/// (synced when asked and renamed into place), or dropped (removed).
pub(crate) trait FileSink: Sink + Send {
    /// Writes what comes after the data (footer, header, BAT), allocates
    /// what a non-sparse output must hold, and returns what it did.
    fn finish(&mut self) -> Result<Finished>;
    /// Renames the finished output into place (after a sync when `sync`).
    fn commit(self: Box<Self>, sync: bool) -> Result<()>;
}

/// Writes `data` at `at` of `file`; with `sync`, starts writeback at once
/// so that the final sync finds little to do.
pub(crate) fn write_at(file: &File, path: &Path, data: &[u8], at: u64, sync: bool) -> Result<()> {
    file.write_all_at(data, at)
        .map_err(|e| Error::io_at(path, "write", at, e))?;
    if sync {
        let _ = rustix::fs::fadvise(
            file,
            at,
            std::num::NonZeroU64::new(data.len() as u64),
            rustix::fs::Advice::DontNeed,
        );
    }
    Ok(())
}

/// Allocates `len` bytes at `at` without writing them (falls back to
/// writing zeros where the filesystem cannot).
pub(crate) fn allocate(file: &File, at: u64, len: u64, path: &Path) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), at, len) {
        Ok(()) => Ok(()),
        Err(_) => {
            let zeros = vec![0u8; 1 << 20];
            let mut pos = at;
            while pos < at + len {
                let n = (at + len - pos).min(zeros.len() as u64);
                file.write_all_at(&zeros[..n as usize], pos)
                    .map_err(|e| Error::io_at(path, "write", pos, e))?;
                pos += n;
            }
            Ok(())
        }
    }
}
