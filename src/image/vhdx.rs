//! A VHDX file as an image: its structures, and the file as the replayed
//! log leaves it, as the storage the walk and the reads use.

use super::{Extent, ExtentKind};
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
/// sees the bytes the log wrote. When no log was replayed it is the file
/// itself, and offers the file for mapping and direct reads; when one was,
/// it offers the file for the ranges no replayed sector touches
/// ([`Storage::file_at`], from [`Vhdx::is_plain`]), so the walk maps or
/// reads the payload there as it does a VHD's, and goes through
/// [`Vhdx::read_file_at`] only where the overlay lies.
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
    fn file_at(&self, offset: u64, len: u64) -> Option<&File> {
        // Where no replayed sector lies, the file is read (or mapped) as it
        // is: the same path as a VHD's data, whether a log was replayed or not.
        if !self.vhdx.log_replayed() || self.vhdx.is_plain(offset, len) {
            self.inner.file_at(offset, len)
        } else {
            None
        }
    }
    fn identity(&self) -> Option<(u64, u64)> {
        self.inner.identity()
    }
}

/// `extents` (a VHDX's map) with the data extents cut where the file
/// beneath has holes (`SEEK_DATA`/`SEEK_HOLE`): a hole reads as zeros, so
/// its bytes are `Zero` and the walk neither reads nor scans them, as for
/// a raw or fixed VHD file. qemu-img, for one, leaves the unwritten parts
/// of a VHDX's payload blocks as holes. A storage that cannot tell (or a
/// replayed log, which may write into a hole) keeps every data extent.
pub(crate) fn without_holes(
    storage: &dyn Storage,
    extents: Vec<Extent>,
) -> io::Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        let ExtentKind::Data { layer, file_offset } = e.kind else {
            super::map::push_extent(&mut out, e);
            continue;
        };
        let end = file_offset + e.length;
        let mut pos = file_offset;
        let zero = |from: u64, to: u64| Extent {
            offset: e.offset + (from - file_offset),
            length: to - from,
            kind: ExtentKind::Zero,
        };
        for r in storage.data_ranges(file_offset, end)? {
            let (a, b) = (r.start.max(pos), r.end.min(end));
            if a >= b {
                continue;
            }
            super::map::push_extent(&mut out, zero(pos, a));
            super::map::push_extent(
                &mut out,
                Extent {
                    offset: e.offset + (a - file_offset),
                    length: b - a,
                    kind: ExtentKind::Data {
                        layer,
                        file_offset: a,
                    },
                },
            );
            pos = b;
        }
        super::map::push_extent(&mut out, zero(pos, end));
    }
    Ok(out)
}

/// True for a VHDX parent locator that cannot name the parent.
pub(crate) fn locator_error(e: &crate::Error) -> bool {
    matches!(e, crate::Error::Corrupt(c)
        if c.structure == crate::error::Structure::Vhdx(crate::vhdx::VhdxStructure::ParentLocator))
}
