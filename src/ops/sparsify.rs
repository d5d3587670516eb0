//! `sparsify`: zero regions cost no disk space, in place.

use super::resize::rewrite_dynamic;
use crate::error::{Error, Result};
use crate::image::{Format, Image, OpenOptions};
use crate::scan::ZERO_UNIT;
use crate::walk::{self, Control, Piece, Read};
use std::fs::File;
use std::path::Path;

/// What [`sparsify`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SparsifyReport {
    /// Bytes the file occupied on disk before.
    pub allocated_before: u64,
    /// Bytes the file occupies on disk after.
    pub allocated_after: u64,
    /// Zero bytes made holes (raw, fixed) or blocks freed (dynamic) × block size.
    pub zero_bytes: u64,
    /// All-zero blocks freed (dynamic images).
    pub freed_blocks: Option<u64>,
}

/// Makes every zero region of an image cost no disk space, in place:
/// raw and fixed images get holes punched over their zero pages (found in
/// parallel; the content is unchanged after each punch, so an interruption
/// leaves a valid image); a dynamic image is rewritten compactly without its
/// all-zero blocks into a temporary file renamed over it (keeping its unique
/// id, so differencing children still match). Differencing disks are refused:
/// a zero block in a child hides its parent's data.
///
/// The rewrite of a dynamic image follows a symbolic link (the file it
/// names is replaced, and the link stays a link), gives the new file the old
/// one's owner, group and mode, and refuses a file with other hard links:
/// the rename would give the new image to this name only.
///
/// # Errors
/// [`Error::WrongImageKind`] for differencing disks and VHDX files;
/// [`Error::OutputRefused`], for a dynamic image, a file with other hard
/// links; I/O errors.
pub fn sparsify(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<SparsifyReport> {
    sparsify_with(path, opts, &Control::new())
}

/// [`sparsify`] with progress and cancellation (of the hole punching; a
/// dynamic image's rewrite stops as a conversion does).
///
/// # Errors
/// As [`sparsify`]; [`Error::Interrupted`] when cancelled (the holes
/// punched so far stay: the content is unchanged).
pub fn sparsify_with(
    path: impl AsRef<Path>,
    opts: &OpenOptions,
    ctl: &Control<'_>,
) -> Result<SparsifyReport> {
    let path = path.as_ref();
    let img = Image::open_with(path, &opts.clone().writable(true))?;
    let before = crate::io::allocated_bytes(img.local_file("stat")?)
        .map_err(|e| Error::io(path, "stat", e))?;
    let zero_bytes;
    match img.disk_type() {
        Format::Raw | Format::Fixed => {
            let file = img.local_file("punch holes")?;
            let size = img.virtual_size();
            let mut zeros = 0u64;
            walk::fold(
                &img,
                0,
                size,
                Read::Scan,
                ctl,
                |c, _, runs| -> Result<u64> {
                    // Punch page-aligned zero gaps between the runs.
                    let mut punched = 0;
                    let mut pos = c.offset;
                    let end = c.offset + c.len;
                    for r in runs
                        .iter()
                        .map(|r| (r.start, r.end))
                        .chain(std::iter::once((end, end)))
                    {
                        let a = pos.div_ceil(ZERO_UNIT) * ZERO_UNIT;
                        let b = r.0 / ZERO_UNIT * ZERO_UNIT;
                        // Only whole pages inside the data area of the disk.
                        let b = if r.0 == end && end == size { r.0 } else { b };
                        if b > a {
                            crate::io::punch_hole(file, a..b)
                                .map_err(|e| Error::io(path, "punch hole", e))?;
                            punched += b - a;
                        }
                        pos = r.1;
                    }
                    Ok(punched)
                },
                |piece| {
                    if let Piece::Data(_, n) = piece {
                        zeros += n;
                    }
                    Ok(true)
                },
            )?;
            file.sync_all().map_err(|e| Error::io(path, "sync", e))?;
            zero_bytes = zeros;
        }
        Format::Dynamic => {
            let report = rewrite_dynamic(&img, None)?;
            let freed = img.allocated_blocks() - report.allocated_blocks.unwrap_or(0);
            let bs = img.block_size();
            drop(img);
            let after = crate::io::allocated_bytes(
                &File::open(path).map_err(|e| Error::io(path, "open", e))?,
            )
            .map_err(|e| Error::io(path, "stat", e))?;
            return Ok(SparsifyReport {
                allocated_before: before,
                allocated_after: after,
                zero_bytes: freed * bs,
                freed_blocks: Some(freed),
            });
        }
        Format::Vhdx => {
            return Err(Error::wrong_kind(
                path,
                "sparsify",
                Format::Vhdx,
                "a VHDX file is read-only to vhdkit: convert it to sparsify the disk",
            ))
        }
        Format::Differencing => {
            return Err(Error::wrong_kind(
                path,
                "sparsify",
                Format::Differencing,
                "a differencing disk cannot be sparsified: its zero blocks hide the parent's data",
            ))
        }
    }
    let after = crate::io::allocated_bytes(img.local_file("stat")?)
        .map_err(|e| Error::io(path, "stat", e))?;
    Ok(SparsifyReport {
        allocated_before: before,
        allocated_after: after,
        zero_bytes,
        freed_blocks: None,
    })
}
