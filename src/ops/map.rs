//! `map`: the virtual disk as extents of data and zero, streamed.

use crate::error::Result;
use crate::image::{Extent, ExtentKind, Image};
use crate::walk::{self, Chunk, Control, Piece, Read};
use std::path::PathBuf;

/// One extent of [`map`]: data or zero, and where data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MapExtent {
    /// Virtual offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// True when the range holds non-zero bytes (at the scan's granularity).
    pub data: bool,
    /// The file that holds the data.
    pub file: Option<PathBuf>,
    /// Where in that file.
    pub file_offset: Option<u64>,
}

/// The virtual disk as merged extents of data and zero: unallocated blocks,
/// clear bitmap bits and filesystem holes are zero without being read, and
/// the rest is scanned (in parallel) for zero pages when `scan` is set.
/// Collects [`map_each`]; prefer that for images that may have millions of
/// extents.
///
/// # Errors
/// I/O errors reading the image.
pub fn map(img: &Image, scan: bool) -> Result<Vec<MapExtent>> {
    let mut out = Vec::new();
    map_each(img, scan, |e| {
        out.push(e);
        Ok(())
    })?;
    Ok(out)
}

/// [`map`] as a stream: walks the disk a window at a time, merges adjacent
/// extents (across windows too) and hands each finished extent to `f`, in
/// order, so that memory stays flat however many extents the disk has.
///
/// # Errors
/// I/O errors reading the image, and the first error `f` returns (which
/// stops the walk).
pub fn map_each<F>(img: &Image, scan: bool, f: F) -> Result<()>
where
    F: FnMut(MapExtent) -> Result<()>,
{
    map_each_with(img, scan, &Control::new(), f)
}

/// [`map_each`] with progress and cancellation.
///
/// # Errors
/// As [`map_each`]; [`Error::Interrupted`](crate::Error::Interrupted) when cancelled.
pub fn map_each_with<F>(img: &Image, scan: bool, ctl: &Control<'_>, mut f: F) -> Result<()>
where
    F: FnMut(MapExtent) -> Result<()>,
{
    // The extent being grown; handed over when the next cannot join it.
    let mut pending: Vec<Extent> = Vec::with_capacity(2);
    let mut push = |e: Extent, f: &mut F| -> Result<()> {
        crate::image::push_extent(&mut pending, e);
        if pending.len() > 1 {
            let done = pending.remove(0);
            f(map_extent(img, done))?;
        }
        Ok(())
    };
    let read = if scan { Read::Scan } else { Read::Nothing };
    walk::fold(
        img,
        0,
        img.virtual_size(),
        read,
        ctl,
        |c, _, runs| Ok(if scan { scanned(c, runs) } else { Vec::new() }),
        |piece| {
            match piece {
                Piece::Zero(e) => push(e, &mut f)?,
                Piece::Data(c, found) if !scan => push(
                    Extent {
                        offset: c.offset,
                        length: c.len,
                        kind: ExtentKind::Data {
                            layer: c.layer,
                            file_offset: c.file_offset,
                        },
                    },
                    &mut f,
                )
                .map(|()| drop(found))?,
                Piece::Data(_, found) => {
                    for x in found {
                        push(x, &mut f)?;
                    }
                }
            }
            Ok(true)
        },
    )?;
    for e in pending {
        f(map_extent(img, e))?;
    }
    Ok(())
}

/// One data chunk, scanned: its data runs and the zero pages between them.
fn scanned(c: &Chunk, runs: &[std::ops::Range<u64>]) -> Vec<Extent> {
    let mut v = Vec::new();
    let mut pos = c.offset;
    for r in runs {
        if r.start > pos {
            v.push(Extent {
                offset: pos,
                length: r.start - pos,
                kind: ExtentKind::Zero,
            });
        }
        v.push(Extent {
            offset: r.start,
            length: r.end - r.start,
            kind: ExtentKind::Data {
                layer: c.layer,
                file_offset: c.file_offset + (r.start - c.offset),
            },
        });
        pos = r.end;
    }
    if pos < c.offset + c.len {
        v.push(Extent {
            offset: pos,
            length: c.offset + c.len - pos,
            kind: ExtentKind::Zero,
        });
    }
    v
}

fn map_extent(img: &Image, e: Extent) -> MapExtent {
    match e.kind {
        ExtentKind::Data { layer, file_offset } => MapExtent {
            offset: e.offset,
            length: e.length,
            data: true,
            file: img.layer(layer).map(|l| l.path().to_path_buf()),
            file_offset: Some(file_offset),
        },
        _ => MapExtent {
            offset: e.offset,
            length: e.length,
            data: false,
            file: None,
            file_offset: None,
        },
    }
}
