//! The map of a virtual disk, and positional reads built on it.

use super::{Dynamic, Format, Image, Layout};
use crate::error::{Error, Result};
use crate::io::ReadAt;
use crate::ondisk::{SectorBitmap, SECTOR, UNALLOCATED};
use std::sync::atomic::Ordering;

/// What a range of the virtual disk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExtentKind {
    /// Bytes stored in the file of chain layer `layer` (0 is the image
    /// itself, 1 its parent...), starting at `file_offset`.
    Data {
        /// Index into [`Image::chain`].
        layer: usize,
        /// Absolute offset in that file.
        file_offset: u64,
    },
    /// Reads as zeros: an unallocated block, a clear bitmap bit, a hole.
    Zero,
    /// Left to the parent (only in [`Image::map_shallow`] of a differencing disk).
    Parent,
}

/// A run of the virtual disk of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Virtual offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What is there.
    pub kind: ExtentKind,
}

impl Extent {
    /// One past the last virtual byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
    /// True for data (anything that must be read).
    pub fn is_data(&self) -> bool {
        matches!(self.kind, ExtentKind::Data { .. })
    }
}

/// Appends an extent, merging it into the last one when they continue each other.
pub(crate) fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.end() == e.offset {
            let merged = match (last.kind, e.kind) {
                (ExtentKind::Zero, ExtentKind::Zero) | (ExtentKind::Parent, ExtentKind::Parent) => {
                    true
                }
                (
                    ExtentKind::Data {
                        layer: a,
                        file_offset: fa,
                    },
                    ExtentKind::Data {
                        layer: b,
                        file_offset: fb,
                    },
                ) => a == b && fa.checked_add(last.length) == Some(fb),
                _ => false,
            };
            if merged {
                last.length += e.length;
                return;
            }
        }
    }
    out.push(e);
}

const STATE_FULL: u8 = 1;
const STATE_PARTIAL: u8 = 2;

/// The end of `offset..offset + len`, or an error naming `path` when the
/// range leaves a virtual disk of `size` bytes (or overflows).
pub(crate) fn range_end(path: &std::path::Path, offset: u64, len: u64, size: u64) -> Result<u64> {
    offset
        .checked_add(len)
        .filter(|&e| e <= size)
        .ok_or_else(|| Error::OutOfRange {
            path: Some(path.to_path_buf()),
            offset,
            len,
            size,
        })
}

impl Image {
    fn check_range(&self, offset: u64, len: u64) -> Result<u64> {
        range_end(&self.path, offset, len, self.virtual_size)
    }

    /// The extents of `offset..offset + len` with parents resolved: only
    /// `Data` and `Zero`, adjacent extents merged. Raw and fixed images
    /// report filesystem holes as `Zero`.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] when the range leaves the disk; I/O errors
    /// reading sector bitmaps or asking the filesystem for holes.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        self.map_into(offset, len, 0, &mut out)?;
        Ok(out)
    }

    /// The whole virtual disk, as [`Image::map`] gives it.
    pub fn map_all(&self) -> Result<Vec<Extent>> {
        self.map(0, self.virtual_size)
    }

    fn map_into(&self, offset: u64, len: u64, layer: usize, out: &mut Vec<Extent>) -> Result<()> {
        let shallow = self.map_shallow(offset, len)?;
        for e in shallow {
            match e.kind {
                ExtentKind::Parent => match self.parent() {
                    Some(p) => {
                        // The parent may be smaller than the child: beyond it, zeros.
                        let psize = p.virtual_size();
                        let in_parent = psize.saturating_sub(e.offset).min(e.length);
                        if in_parent > 0 {
                            p.map_into(e.offset, in_parent, layer + 1, out)?;
                        }
                        push_extent(
                            out,
                            Extent {
                                offset: e.offset + in_parent,
                                length: e.length - in_parent,
                                kind: ExtentKind::Zero,
                            },
                        );
                    }
                    None => push_extent(
                        out,
                        Extent {
                            kind: ExtentKind::Zero,
                            ..e
                        },
                    ),
                },
                ExtentKind::Data { file_offset, .. } => push_extent(
                    out,
                    Extent {
                        kind: ExtentKind::Data { layer, file_offset },
                        ..e
                    },
                ),
                ExtentKind::Zero => push_extent(out, e),
            }
        }
        Ok(())
    }

    /// The extents of this file alone: what a differencing disk leaves to
    /// its parent is `Parent`. `Data` extents have layer 0.
    pub fn map_shallow(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = self.check_range(offset, len)?;
        let mut out = Vec::new();
        match &self.layout {
            Layout::Vhdx(v) => {
                return super::vhdx::without_holes(&*self.storage, v.map(offset, end - offset)?)
                    .map_err(|e| Error::io(&self.path, "seek data/hole", e))
            }
            Layout::Raw | Layout::Fixed(_) => {
                // A file that shrank since it was opened would read as holes
                // (zeros) past its new end: refuse rather than invent data.
                let now = crate::io::ReadAt::len(&*self.storage)
                    .map_err(|e| Error::io(&self.path, "stat", e))?;
                if now < end {
                    return Err(Error::io(
                        &self.path,
                        "map",
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!(
                                "the file shrank to {now} bytes since it was opened ({} bytes)",
                                self.file_len
                            ),
                        ),
                    ));
                }
                let ranges = self
                    .storage
                    .data_ranges(offset, end)
                    .map_err(|e| Error::io(&self.path, "seek data/hole", e))?;
                let mut pos = offset;
                for r in ranges {
                    push_extent(
                        &mut out,
                        Extent {
                            offset: pos,
                            length: r.start - pos,
                            kind: ExtentKind::Zero,
                        },
                    );
                    push_extent(
                        &mut out,
                        Extent {
                            offset: r.start,
                            length: r.end - r.start,
                            kind: ExtentKind::Data {
                                layer: 0,
                                file_offset: r.start,
                            },
                        },
                    );
                    pos = r.end;
                }
                push_extent(
                    &mut out,
                    Extent {
                        offset: pos,
                        length: end - pos,
                        kind: ExtentKind::Zero,
                    },
                );
            }
            Layout::Dynamic(_, d) | Layout::Differencing(_, d) => {
                let mut bitmap = Vec::new();
                let mut pos = offset;
                while pos < end {
                    let block = pos / d.block_size;
                    let block_start = block * d.block_size;
                    let stop = end.min(block_start + d.block_size);
                    self.map_block(
                        d,
                        block,
                        pos - block_start,
                        stop - block_start,
                        &mut bitmap,
                        &mut out,
                    )?;
                    pos = stop;
                }
            }
        }
        Ok(out)
    }

    /// Maps bytes `a..b` of block `block`.
    fn map_block(
        &self,
        d: &Dynamic,
        block: u64,
        a: u64,
        b: u64,
        bitmap: &mut Vec<u8>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let base = block * d.block_size;
        let absent = if self.disk_type() == Format::Differencing {
            ExtentKind::Parent
        } else {
            ExtentKind::Zero
        };
        let entry = d
            .bat
            .entries
            .get(block as usize)
            .copied()
            .unwrap_or(UNALLOCATED);
        if entry == UNALLOCATED {
            push_extent(
                out,
                Extent {
                    offset: base + a,
                    length: b - a,
                    kind: absent,
                },
            );
            return Ok(());
        }
        let Some(bitmap_at) = d.bat.block_offset(block as usize) else {
            return Ok(());
        };
        let data_at = bitmap_at + d.bitmap_size;
        let data = |from: u64, to: u64| Extent {
            offset: base + from,
            length: to - from,
            kind: ExtentKind::Data {
                layer: 0,
                file_offset: data_at + from,
            },
        };
        let Some(state) = d.bitmap_state.get(block as usize) else {
            return Err(crate::error::Error::corrupt(
                crate::error::Structure::BatEntry(block),
                "block sector offset",
                crate::ondisk::placement::bat_entry_at(d.header.table_offset, block),
                "an entry past the table",
                "a block inside the table",
            ));
        };
        if state.load(Ordering::Relaxed) == STATE_FULL {
            push_extent(out, data(a, b));
            return Ok(());
        }
        bitmap.resize(d.bitmap_size as usize, 0);
        ReadAt::read_exact_at(&*self.storage, bitmap, bitmap_at)
            .map_err(|e| Error::io_at(&self.path, "read sector bitmap", bitmap_at, e))?;
        let bits = SectorBitmap(bitmap);
        let sectors_in_block = d.block_size / SECTOR;
        if bits.all_set(sectors_in_block) {
            state.store(STATE_FULL, Ordering::Relaxed);
            push_extent(out, data(a, b));
            return Ok(());
        }
        state.store(STATE_PARTIAL, Ordering::Relaxed);
        let (s0, s1) = (a / SECTOR, b.div_ceil(SECTOR));
        for (s, n, set) in bits.runs(s0, s1) {
            let from = (s * SECTOR).max(a);
            let to = ((s + n) * SECTOR).min(b);
            if set {
                push_extent(out, data(from, to));
            } else {
                push_extent(
                    out,
                    Extent {
                        offset: base + from,
                        length: to - from,
                        kind: absent,
                    },
                );
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`. Safe to call
    /// from many threads at once.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] when the range leaves the disk; I/O errors.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if matches!(self.layout, Layout::Raw | Layout::Fixed(_)) {
            // Holes read as zeros: no need to ask the filesystem where they are.
            return ReadAt::read_exact_at(&*self.storage, buf, offset)
                .map_err(|e| Error::io_at(&self.path, "read", offset, e));
        }
        let extents = self.map(offset, len)?;
        self.read_extents(&extents, offset, buf)
    }

    /// Fills `buf` (which starts at virtual offset `base`) from `extents`.
    pub(crate) fn read_extents(&self, extents: &[Extent], base: u64, buf: &mut [u8]) -> Result<()> {
        for e in extents {
            let from = (e.offset - base) as usize;
            let dst = &mut buf[from..from + e.length as usize];
            match e.kind {
                ExtentKind::Data { layer, file_offset } => {
                    let img = self
                        .layer(layer)
                        .ok_or_else(|| crate::walk::bad_layer(self, layer))?;
                    ReadAt::read_exact_at(&*img.storage, dst, file_offset)
                        .map_err(|err| Error::io_at(&img.path, "read", file_offset, err))?;
                }
                ExtentKind::Zero | ExtentKind::Parent => dst.fill(0),
            }
        }
        Ok(())
    }
}

impl ReadAt for Image {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        Image::read_exact_at(self, buf, offset).map_err(Into::into)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.virtual_size)
    }
}
