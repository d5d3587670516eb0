//! A fixed VHD file: a raw disk file followed by a footer.

use super::raw::RawFileSink;
use super::{FileSink, Finished, Sink};
use crate::error::{Error, Result};
use crate::io::WriteAt;
use crate::ondisk::{Footer, FOOTER_SIZE};
use crate::write::AtomicOutput;

/// A fixed VHD: the disk's bytes, then `footer`.
pub(crate) struct FixedFileSink {
    raw: RawFileSink,
    footer: Footer,
}

impl FixedFileSink {
    pub(crate) fn new(out: AtomicOutput, footer: Footer, sparse: bool, sync: bool) -> Result<Self> {
        let size = footer.current_size;
        Ok(FixedFileSink {
            raw: RawFileSink::new(out, size, FOOTER_SIZE as u64, sparse, sync)?,
            footer,
        })
    }
}

impl Sink for FixedFileSink {
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.raw.write(offset, data)
    }
}

impl FileSink for FixedFileSink {
    fn finish(&mut self) -> Result<Finished> {
        let done = self.raw.finish()?;
        let size = self.raw.size;
        self.raw
            .out
            .file()
            .write_all_at(&self.footer.to_bytes(), size)
            .map_err(|e| Error::io_at(self.raw.out.temp_path(), "write footer", size, e))?;
        Ok(Finished {
            output_len: size + FOOTER_SIZE as u64,
            metadata: done.metadata + FOOTER_SIZE as u64,
            ..done
        })
    }
    fn commit(self: Box<Self>, sync: bool) -> Result<()> {
        Box::new(self.raw).commit(sync)
    }
}
