//! A VHDX file as an image: its structures, and the file as the replayed
//! log leaves it, as the storage the walk and the reads use.

use crate::io::ReadAt;
use crate::storage::Storage;
use crate::vhdx::Vhdx;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::sync::Arc;

/// The file beneath a VHDX, as the VHDX reader's positional source.
pub(crate) struct Source(pub(crate) Arc<dyn Storage>);

impl ReadAt for Source {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        ReadAt::read_exact_at(&*self.0, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        ReadAt::len(&*self.0)
    }
}

/// The VHDX file with its replayed log laid over it: every read of a data
/// extent's `file_offset` (the walk's, [`crate::Image::read_exact_at`]'s)
/// goes through [`Vhdx::read_file_at`], so it sees the bytes the log
/// wrote. When no log was replayed it is the file itself, and offers the
/// file for mapping and file-to-file copies.
#[derive(Debug)]
pub(crate) struct OverlaidStorage {
    pub(crate) vhdx: Arc<Vhdx>,
    pub(crate) inner: Arc<dyn Storage>,
}

impl ReadAt for OverlaidStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.vhdx.read_file_at(buf, offset).map_err(Into::into)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.vhdx.logical_file_len())
    }
}

impl Storage for OverlaidStorage {
    fn data_ranges(&self, start: u64, end: u64) -> io::Result<Vec<Range<u64>>> {
        if self.vhdx.log_replayed() {
            let mut v = Vec::new();
            if start < end {
                v.push(start..end);
            }
            return Ok(v);
        }
        self.inner.data_ranges(start, end)
    }
    fn file(&self) -> Option<&File> {
        // A replayed log changes bytes the file does not hold: whoever
        // reads the file directly would miss them.
        if self.vhdx.log_replayed() {
            None
        } else {
            self.inner.file()
        }
    }
    fn identity(&self) -> Option<(u64, u64)> {
        self.inner.identity()
    }
}
