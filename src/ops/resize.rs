//! `resize`: a larger (or, asked, smaller) virtual disk, in place where
//! the layout allows, else rewritten.

use super::in_place::{grow_fixed, InPlacePlan, Step};
use crate::error::{Error, Result};
use crate::image::{Format, Image, OpenOptions};
use crate::ondisk::placement::{self, bat_entry_at};
use crate::ondisk::{entry_offset, FOOTER_SIZE, SECTOR, UNALLOCATED};
use std::path::Path;

/// The size a resize of `img` to `asked` bytes makes: rounded up to a
/// sector (and to a whole MiB with `azure`), checked before any rounding
/// and after it against the largest size the image's format holds.
fn resize_target(img: &Image, asked: u64, azure: bool) -> Result<u64> {
    let path = img.path();
    let (limit, what) = if img.disk_type() == Format::Raw {
        // A file's length is a signed 64-bit number.
        (
            i64::MAX as u64 / crate::write::MIB * crate::write::MIB,
            "a file",
        )
    } else {
        (crate::write::MAX_VHD_SIZE, "a VHD (2040 GiB)")
    };
    let too_large = |n: u64| {
        Error::invalid_option_for(
            path,
            "size",
            n,
            format!("{n} bytes is larger than {what} can hold: at most {limit} bytes"),
        )
    };
    if asked > limit {
        return Err(too_large(asked));
    }
    // A VHD's size is a whole number of sectors; a raw file keeps the size
    // asked for, as a conversion to raw keeps the input's.
    let unit = if img.disk_type() == Format::Raw {
        1
    } else {
        SECTOR
    };
    let mut new_size = asked
        .checked_next_multiple_of(unit)
        .ok_or_else(|| too_large(asked))?;
    if azure {
        new_size = new_size
            .checked_next_multiple_of(crate::write::MIB)
            .ok_or_else(|| too_large(asked))?;
    }
    if new_size > limit {
        return Err(too_large(new_size));
    }
    Ok(new_size)
}

/// Plans a resize of `path` to `new_size` bytes (rounded up to a whole MiB
/// with `azure`, and to a sector always). Grows raw, fixed and dynamic
/// images; shrinks only when `shrink` is set and the region cut away is all
/// zero; refuses differencing disks (their parents fix the size).
///
/// Fixed images move their footer as in [`plan_in_place`](super::plan_in_place)'s Azure case.
/// Dynamic images update the BAT, header and both footers in that order,
/// each a write that leaves a consistent image; when the BAT needs more
/// entries than fit before the first block, the plan is `None` and
/// [`resize`] rewrites the image to a new file renamed into place instead.
///
/// The last two writes of a dynamic plan are the end footer (the one
/// vhdkit reads) and then its copy at offset 0 (the one qemu reads). In
/// between, the two differ in their size fields only: the image reads as
/// the new one, and [`check`](crate::check()) reports that state, an
/// interrupted resize, as a warning rather than damage; running the same
/// resize again completes it.
///
/// # Errors
/// [`Error::InvalidOption`] for a size larger than the format holds (2040
/// GiB for a VHD; [`crate::ondisk::MAX_VHD_SIZE`]), a smaller size without
/// `shrink` (option `"shrink"`; the message states the current size), or a
/// cut region that holds data (option `"size"`);
/// [`Error::WrongImageKind`] for a differencing disk or a VHDX; I/O errors
/// reading the image.
pub fn plan_resize(
    img: &Image,
    new_size: u64,
    azure: bool,
    shrink: bool,
) -> Result<Option<InPlacePlan>> {
    let path = img.path();
    let size = img.virtual_size();
    if img.disk_type() == Format::Vhdx {
        return Err(Error::wrong_kind(
            path,
            "resize",
            Format::Vhdx,
            "a VHDX file is read-only to vhdkit: convert it to resize the disk",
        ));
    }
    if img.disk_type() == Format::Differencing {
        return Err(Error::wrong_kind(
            path,
            "resize",
            Format::Differencing,
            "a differencing disk cannot be resized: its parent fixes the size",
        ));
    }
    let new_size = resize_target(img, new_size, azure)?;
    if new_size < size && !shrink {
        return Err(Error::invalid_option_for(
            path,
            "shrink",
            false,
            format!(
                "the disk is {size} bytes; {new_size} bytes would shrink it, and shrinking was not asked for"
            ),
        ));
    }
    if new_size < size {
        if let Some(at) =
            super::compare::first_nonzero_in(img, new_size, size, &crate::walk::Control::new())?
        {
            return Err(Error::invalid_option_for(
                path,
                "size",
                new_size,
                format!(
                    "cannot shrink to {new_size} bytes: the region cut away holds data (first non-zero byte at {at})"
                ),
            ));
        }
    }
    let mut steps = Vec::new();
    let description = format!("{}: {size} -> {new_size} bytes", img.disk_type());
    if new_size == size && img.disk_type() == Format::Dynamic {
        // A resize stopped before its last write: the footer copy still
        // has the old size. Finish it.
        let mut end = [0u8; FOOTER_SIZE];
        let mut copy = [0u8; FOOTER_SIZE];
        let f = img.storage();
        f.read_exact_at(&mut end, img.data_end())
            .map_err(|e| Error::io_at(path, "read the footer", img.data_end(), e))?;
        f.read_exact_at(&mut copy, 0)
            .map_err(|e| Error::io_at(path, "read the footer copy", 0, e))?;
        if end != copy && crate::check::differ_by_resize_only(&end, &copy) {
            return Ok(Some(InPlacePlan {
                path: path.to_path_buf(),
                description: format!(
                    "dynamic: {size} bytes; the footer copy updated (an earlier resize had stopped before it)"
                ),
                steps: vec![Step::Write(0, end.to_vec()), Step::Sync],
            }));
        }
    }
    if new_size == size {
        return Ok(Some(InPlacePlan {
            path: path.to_path_buf(),
            description: format!("already {size} bytes"),
            steps,
        }));
    }
    match img.disk_type() {
        Format::Raw => {
            steps.push(Step::SetLen(new_size));
            steps.push(Step::Sync);
        }
        Format::Fixed => {
            let old = img.vhd_footer()?.clone();
            let f = old.resized(new_size);
            let old_at = img.data_end();
            if new_size > size {
                steps = grow_fixed(size, old_at, &old, &f);
            } else {
                // The cut region is zero. The footer in place takes the new
                // size first (the cut bytes become padding: the new image),
                // then a copy goes where the file will end, and one
                // truncation drops the padding.
                steps.push(Step::Write(old_at, f.to_bytes().to_vec()));
                steps.push(Step::Sync);
                steps.push(Step::Write(new_size, f.to_bytes().to_vec()));
                steps.push(Step::Sync);
                steps.push(Step::SetLen(new_size + FOOTER_SIZE as u64));
                steps.push(Step::Sync);
            }
        }
        Format::Dynamic => {
            let (h, bat) = img.dynamic_parts()?;
            let h = h.clone();
            let bs = img.block_size();
            let needed = placement::bat_entries(new_size, bs);
            let have = u64::from(h.max_table_entries);
            let mut h2 = h.clone();
            if new_size > size {
                // Bytes past the old end join the disk and must read as
                // zeros: allocated BAT entries past the end (ignored until
                // now) are freed, and the last block's bytes past the old
                // size zeroed, when nothing else lies there (else rewrite).
                for b in img.block_count()..needed.min(have) {
                    if bat.entries[b as usize] != UNALLOCATED {
                        steps.push(Step::Write(
                            bat_entry_at(h.table_offset, b),
                            UNALLOCATED.to_be_bytes().to_vec(),
                        ));
                    }
                }
                let last = size / bs;
                match bat.entries.get(last as usize) {
                    Some(&e) if size % bs != 0 && e != UNALLOCATED => {
                        let data_at = entry_offset(e) + img.bitmap_size();
                        let from = data_at + (size - last * bs);
                        let to = data_at + (new_size.min((last + 1) * bs) - last * bs);
                        let (_, old_end) = img.block_span(last, e);
                        let mut starts = bat
                            .entries
                            .iter()
                            .take(img.block_count() as usize)
                            .filter(|&&x| x != UNALLOCATED)
                            .map(|&x| entry_offset(x))
                            .chain([img.header_offset(), h.table_offset])
                            .chain(
                                h.parent_locators
                                    .iter()
                                    .filter(|l| !l.is_empty())
                                    .map(|l| l.data_offset),
                            );
                        if to > img.data_end() || starts.any(|x| x >= old_end && x < to) {
                            return Ok(None);
                        }
                        steps.push(Step::PunchHole(from, to - from));
                    }
                    _ => {}
                }
                if !steps.is_empty() {
                    steps.push(Step::Sync);
                }
            }
            if needed > have {
                // Room for more entries before anything that follows the BAT?
                let bat_end = bat_entry_at(h.table_offset, needed);
                let mut next = img.data_end();
                for (i, &e) in bat.entries.iter().enumerate() {
                    if e != UNALLOCATED && (i as u64) < img.block_count() {
                        next = next.min(entry_offset(e));
                    }
                }
                for l in h.parent_locators.iter().filter(|l| !l.is_empty()) {
                    if l.data_offset >= h.table_offset {
                        next = next.min(l.data_offset);
                    }
                }
                if img.header_offset() > h.table_offset {
                    next = next.min(img.header_offset());
                }
                if bat_end > next {
                    return Ok(None);
                }
                // New entries, unallocated, before the header points at them.
                let fill = vec![0xffu8; (bat_end - bat_entry_at(h.table_offset, have)) as usize];
                for (k, piece) in fill.chunks(SECTOR as usize).enumerate() {
                    steps.push(Step::Write(
                        bat_entry_at(h.table_offset, have) + SECTOR * k as u64,
                        piece.to_vec(),
                    ));
                }
                steps.push(Step::Sync);
                h2.max_table_entries = needed as u32;
                // Both changed fields (max table entries, checksum) lie in the first sector.
                steps.push(Step::Write(
                    img.header_offset(),
                    h2.to_bytes()[..SECTOR as usize].to_vec(),
                ));
                steps.push(Step::Sync);
            } else if new_size < size {
                // Free the blocks past the new end (their data is zero).
                for b in needed..img.block_count() {
                    if bat.entries[b as usize] != UNALLOCATED {
                        steps.push(Step::Write(
                            bat_entry_at(h.table_offset, b),
                            UNALLOCATED.to_be_bytes().to_vec(),
                        ));
                    }
                }
                steps.push(Step::Sync);
            }
            let f = img.vhd_footer()?.resized(new_size);
            let fb = f.to_bytes().to_vec();
            // The end footer (vhdkit's authority) first, then the copy (qemu's).
            steps.push(Step::Write(img.data_end(), fb.clone()));
            steps.push(Step::Sync);
            steps.push(Step::Write(0, fb));
            steps.push(Step::Sync);
        }
        Format::Differencing | Format::Vhdx => unreachable!("refused above"),
    }
    Ok(Some(InPlacePlan {
        path: path.to_path_buf(),
        description,
        steps,
    }))
}

/// What [`resize`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResizeReport {
    /// What was done, in words.
    pub done: String,
    /// The virtual size before.
    pub old_size: u64,
    /// The virtual size now.
    pub new_size: u64,
    /// The size asked for, when the new size was rounded up from it (to a
    /// whole sector for a VHD, to a whole MiB with `azure`).
    pub rounded_from: Option<u64>,
    /// Things worth telling the user (a rounded size).
    pub warnings: Vec<String>,
}

/// Resizes the image at `path` in place (see [`plan_resize`]); returns what
/// was done. A symbolic link is followed: the image it names is resized. A
/// size that is not a whole number of sectors (for a VHD; of MiB with
/// `azure`) is rounded up, and the report says so.
///
/// # Errors
/// As [`plan_resize`]; for a dynamic image that must be rewritten, as the
/// rewrite of [`sparsify`](super::sparsify) (an image with other hard links is refused); and
/// I/O errors.
pub fn resize(
    path: impl AsRef<Path>,
    new_size: u64,
    azure: bool,
    shrink: bool,
    opts: &OpenOptions,
) -> Result<ResizeReport> {
    let path = path.as_ref();
    let img = Image::open_with(path, opts)?;
    let old_size = img.virtual_size();
    let target = resize_target(&img, new_size, azure)?;
    let done = match plan_resize(&img, new_size, azure, shrink)? {
        Some(plan) => {
            drop(img);
            plan.run()?;
            plan.description
        }
        None => {
            // Rewrite with a larger BAT into a temporary file, renamed over the image.
            rewrite_dynamic(&img, Some(target))?;
            format!("dynamic: rewritten with {target} bytes (the BAT had no room to grow in place)")
        }
    };
    let rounded_from = (target != new_size).then_some(new_size);
    let warnings = rounded_from
        .map(|asked| {
            format!(
                "{asked} bytes was rounded up to {target}: {}",
                if azure {
                    "Azure takes whole MiB"
                } else {
                    "a VHD's size is a whole number of 512-byte sectors"
                }
            )
        })
        .into_iter()
        .collect();
    Ok(ResizeReport {
        done,
        old_size,
        new_size: target,
        rounded_from,
        warnings,
    })
}

/// Rewrites a dynamic image over itself: compactly (no all-zero blocks),
/// with the same block size and identity (unique id, creator, timestamp),
/// optionally larger. The new file is written beside the image and renamed
/// over it when complete, with the old file's owner, group and mode; until
/// then the old image is untouched. A symbolic link is resolved first: the
/// file it names is replaced, and the link stays a link. A file with other
/// hard links is refused: the rename would give only this name the new
/// image, leaving the old one under the others.
pub(crate) fn rewrite_dynamic(img: &Image, size: Option<u64>) -> Result<crate::Report> {
    use std::os::unix::fs::MetadataExt;
    let path = img.path();
    let links = img
        .local_file("stat")?
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?
        .nlink();
    if links > 1 {
        return Err(Error::refused(
            path,
            format!(
                "the file has {links} hard links, and this operation rewrites a dynamic image \
                 into a new file renamed over it: the other names would keep the old image; \
                 copy the image to a file of its own first"
            ),
        ));
    }
    let real = std::fs::canonicalize(path).map_err(|e| Error::io(path, "resolve", e))?;
    if !crate::convert::same_file(img.local_file("stat")?, &real) {
        return Err(Error::refused(
            path,
            "the file changed while it was open; nothing was written",
        ));
    }
    let mut o = crate::ConvertOptions::new(crate::Target::Dynamic)
        .block_size(u32::try_from(img.block_size()).unwrap_or(crate::write::DEFAULT_BLOCK_SIZE))
        .overwrite(true)
        .identity(img.footer().cloned().ok_or_else(|| {
            Error::wrong_kind(path, "rewrite", img.disk_type(), "not a dynamic image")
        })?);
    if let Some(s) = size {
        o = o.virtual_size(s);
    }
    crate::convert::convert_into(img, &real, &o, crate::convert::Output::Replace)
}
