//! A raw disk file: the virtual disk's bytes at their own offsets, zero
//! pages left as holes.

use super::{allocate, write_at, FileSink, Finished, Sink};
use crate::error::Result;
use crate::write::AtomicOutput;

/// A raw disk file of `size` bytes (and `tail` bytes after them, for a
/// fixed VHD's footer), written through an atomic output.
pub(crate) struct RawFileSink {
    pub(crate) out: AtomicOutput,
    pub(crate) size: u64,
    sparse: bool,
    sync: bool,
}

impl RawFileSink {
    /// Sizes the output (`size + tail` bytes) and, on a device (whose
    /// unwritten bytes are not zeros), writes zeros over all of it.
    pub(crate) fn new(
        out: AtomicOutput,
        size: u64,
        tail: u64,
        sparse: bool,
        sync: bool,
    ) -> Result<Self> {
        let len = size + tail;
        if tail > 0 {
            // A fixed VHD: its footer must be the device's last sector.
            out.vhd_fits_exactly(Some(len))?;
        }
        out.set_len(len)?;
        out.fill_zeros(0, len)?;
        Ok(RawFileSink {
            out,
            size,
            sparse,
            sync,
        })
    }
}

impl Sink for RawFileSink {
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        write_at(
            self.out.file(),
            self.out.temp_path(),
            data,
            offset,
            self.sync,
        )
    }
}

impl FileSink for RawFileSink {
    fn finish(&mut self) -> Result<Finished> {
        if !self.sparse && !self.out.is_device() {
            allocate(self.out.file(), 0, self.size, self.out.temp_path())?;
        }
        Ok(Finished {
            output_len: self.size,
            allocated_blocks: None,
            metadata: 0,
        })
    }
    fn commit(self: Box<Self>, sync: bool) -> Result<()> {
        self.out.commit(sync)
    }
}
