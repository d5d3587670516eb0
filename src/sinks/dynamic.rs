//! A dynamic VHD file: blocks that hold data get file slots in block order
//! as the walk finds them (slot planning); the footer copy, header, BAT,
//! bitmaps and end footer are written once the data is.

use super::{allocate, write_at, FileSink, Finished, Sink};
use crate::error::{Error, Result};
use crate::ondisk::{Bat, Footer, UNALLOCATED};
use crate::write::{AtomicOutput, DynamicLayout};
use std::sync::{Mutex, MutexGuard};

/// The BAT being filled and the next free slot.
struct Slots {
    bat: Bat,
    next: u64,
}

/// A dynamic VHD of `layout`, under `footer`.
pub(crate) struct DynamicFileSink {
    out: AtomicOutput,
    layout: DynamicLayout,
    footer: Footer,
    slots: Mutex<Slots>,
    sparse: bool,
    sync: bool,
}

impl DynamicFileSink {
    /// Starts the output; on a device (whose unwritten bytes are not
    /// zeros) the metadata area is written with zeros now, each block's
    /// slot when it is given.
    pub(crate) fn new(
        out: AtomicOutput,
        layout: DynamicLayout,
        footer: Footer,
        sparse: bool,
        sync: bool,
    ) -> Result<Self> {
        let entries = usize::try_from(layout.entries).map_err(|_| {
            Error::invalid_option(
                "size",
                layout.size,
                format!("{} BAT entries do not fit in memory", layout.entries),
            )
        })?;
        out.vhd_fits_exactly(None)?;
        out.fill_zeros(0, layout.first_block)?;
        Ok(DynamicFileSink {
            out,
            layout,
            footer,
            slots: Mutex::new(Slots {
                bat: Bat::new(entries),
                next: 0,
            }),
            sparse,
            sync,
        })
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        // A panic elsewhere cannot leave the table half-updated in a way
        // that matters: the output is then removed anyway.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file offset of the block holding virtual `offset`, if stored.
    fn block_data_at(&self, offset: u64) -> Option<(u64, u64)> {
        let b = offset / self.layout.block_size;
        let bitmap_at = self.slots().bat.block_offset(usize::try_from(b).ok()?)?;
        Some((b, bitmap_at + self.layout.bitmap_size))
    }
}

impl Sink for DynamicFileSink {
    fn block_size(&self) -> Option<u64> {
        Some(self.layout.block_size)
    }

    fn plan(&self, blocks: &[(u64, bool)]) -> Result<()> {
        let mut g = self.slots();
        for &(b, keep) in blocks {
            if keep {
                let slot = g.next;
                let entry = self.layout.bat_entry(slot)?;
                let i = usize::try_from(b).ok().filter(|&i| i < g.bat.entries.len());
                let Some(i) = i else {
                    let blocks = g.bat.entries.len() as u64;
                    return Err(Error::OutOfRange {
                        path: None,
                        offset: b.saturating_mul(self.layout.block_size),
                        len: self.layout.block_size,
                        size: blocks.saturating_mul(self.layout.block_size),
                    });
                };
                g.bat.entries[i] = entry;
                g.next += 1;
                self.out
                    .fill_zeros(self.layout.block_offset(slot), self.layout.stride)?;
            }
        }
        Ok(())
    }

    fn wants(&self, offset: u64) -> bool {
        self.block_data_at(offset).is_some()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let Some((b, data_at)) = self.block_data_at(offset) else {
            return Err(Error::invalid_option(
                "offset",
                offset,
                format!("data at virtual offset {offset} for a block that was given no slot"),
            ));
        };
        let at = data_at + (offset - b * self.layout.block_size);
        write_at(self.out.file(), self.out.temp_path(), data, at, self.sync)
    }
}

impl FileSink for DynamicFileSink {
    fn finish(&mut self) -> Result<Finished> {
        let (bat, allocated) = {
            let mut g = self.slots();
            (std::mem::take(&mut g.bat), g.next)
        };
        let len = self.layout.file_len(allocated);
        self.out.set_len(len)?;
        let meta = self
            .layout
            .write_metadata(self.out.file(), &self.footer, &bat)
            .map_err(|e| e.with_path(self.out.temp_path()))?;
        if !self.sparse && !self.out.is_device() {
            for i in 0..bat.entries.len() {
                if let Some(at) = bat.block_offset(i) {
                    allocate(
                        self.out.file(),
                        at + self.layout.bitmap_size,
                        self.layout.block_size,
                        self.out.temp_path(),
                    )?;
                }
            }
        }
        debug_assert!(
            bat.entries.iter().filter(|&&e| e != UNALLOCATED).count() as u64 == allocated
        );
        Ok(Finished {
            output_len: len,
            allocated_blocks: Some(allocated),
            metadata: meta,
        })
    }

    fn commit(self: Box<Self>, sync: bool) -> Result<()> {
        self.out.commit(sync)
    }
}
