//! In-place conversion (raw <-> fixed) as plans of steps, each leaving a
//! valid image.

use crate::error::{Error, Result};
use crate::image::{Format, Image, OpenOptions};
use crate::io::WriteAt;
use crate::ondisk::{DiskType, SECTOR};
use crate::write::azure_size;
use std::path::{Path, PathBuf};

/// One step of an in-place operation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Change the file's length (a single metadata operation).
    SetLen(u64),
    /// Write these bytes at this offset (at most one sector: storage writes
    /// a sector whole).
    Write(u64, Vec<u8>),
    /// Deallocate a range (it reads as zeros).
    PunchHole(u64, u64),
    /// Flush data and metadata to disk.
    Sync,
}

/// The steps of an in-place operation, in an order chosen so that stopping
/// after any of them leaves a valid image: the old one or the new one.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct InPlacePlan {
    /// The file.
    pub path: PathBuf,
    /// What the steps do, in words.
    pub description: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

impl InPlacePlan {
    /// A plan of `steps` on the file at `path`, described by
    /// `description`. The steps are run as given: the order that keeps the
    /// image valid at every step is the caller's to choose.
    pub fn new(path: impl AsRef<Path>, description: impl Into<String>, steps: Vec<Step>) -> Self {
        InPlacePlan {
            path: path.as_ref().to_path_buf(),
            description: description.into(),
            steps,
        }
    }
    /// Runs the first `n` steps (all of them with `usize::MAX`).
    ///
    /// When a step fails (a full disk, a file-size limit) and no step run so
    /// far has touched a byte of the file as it was (they only extended it:
    /// a length at least the old one, writes and holes at or past the old
    /// end), the file is cut back to its old length, which restores it
    /// exactly, before the error is returned.
    pub fn run_steps(&self, n: usize) -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, "open for writing", e))?;
        let old_len = f
            .metadata()
            .map_err(|e| Error::io(&self.path, "stat", e))?
            .len();
        let mut only_extended = true;
        for s in self.steps.iter().take(n) {
            only_extended &= match s {
                Step::SetLen(l) => *l >= old_len,
                Step::Write(at, _) | Step::PunchHole(at, _) => *at >= old_len,
                Step::Sync => true,
            };
            let r = match s {
                Step::SetLen(l) => f.set_len(*l),
                Step::Write(at, b) => f.write_all_at(b, *at),
                Step::PunchHole(at, n) => crate::io::punch_hole(&f, *at..*at + *n),
                Step::Sync => f.sync_all(),
            };
            if let Err(e) = r {
                if only_extended && f.set_len(old_len).is_ok() {
                    let _ = f.sync_all();
                }
                return Err(Error::Io {
                    path: Some(self.path.clone()),
                    op: "in-place step",
                    offset: match s {
                        Step::Write(at, _) | Step::PunchHole(at, _) => Some(*at),
                        Step::SetLen(_) | Step::Sync => None,
                    },
                    source: e,
                });
            }
        }
        Ok(())
    }

    /// Runs every step.
    pub fn run(&self) -> Result<()> {
        self.run_steps(usize::MAX)
    }
}

/// A fresh fixed-disk footer for `size` bytes.
pub(crate) fn fixed_footer(size: u64) -> Vec<u8> {
    crate::write::new_footer(DiskType::Fixed, size)
        .to_bytes()
        .to_vec()
}

/// The steps that grow a fixed image whose disk ends at `size` and whose
/// footer `old` sits at `old_at` to the size of `new`, its new footer. Every
/// byte from `size` to the new size ends up zero (bytes between the data and
/// the footer are not part of the disk and may hold anything), and each step
/// leaves the old image or the new one.
pub(crate) fn grow_fixed(
    size: u64,
    old_at: u64,
    old: &crate::ondisk::Footer,
    new: &crate::ondisk::Footer,
) -> Vec<Step> {
    let new_size = new.current_size;
    if new_size <= old_at {
        // The disk grows into the padding before the footer: zero that (not
        // part of the old disk), then the footer takes the new size in place.
        return vec![
            Step::PunchHole(size, new_size - size),
            Step::Sync,
            Step::Write(old_at, new.to_bytes().to_vec()),
            Step::Sync,
        ];
    }
    vec![
        // Old footer copied to the new end: the old image with padding.
        Step::Write(new_size, old.to_bytes().to_vec()),
        Step::Sync,
        Step::PunchHole(size, new_size - size),
        Step::Sync,
        Step::Write(new_size, new.to_bytes().to_vec()),
        Step::Sync,
    ]
}

/// Plans an in-place conversion of `path` between raw and fixed, in constant
/// time whatever its size:
///
/// * raw → fixed: write the footer at the new end (the size rounded up to
///   a whole number of sectors, or with `azure` of MiB) with one sector
///   write, which extends the file in the same call (the bytes between read
///   as zeros), and sync. The states: the old raw image (before the write,
///   or if it is lost) or the new fixed image (after it); no state leaves a
///   raw disk padded or 512 bytes longer, so a retry plans the same size. A
///   failed write (a full disk) cuts the file back to its old length (see
///   [`InPlacePlan::run_steps`]).
/// * fixed → raw: cut the footer off with one truncation (atomic).
/// * fixed → fixed with `azure`: write a copy of the old footer at the new
///   end (the bytes between are padding a reader skips: still the old
///   image), clear the old footer, sync, then rewrite the end footer with
///   the new size in one sector write.
///
/// # Errors
/// [`Error::WrongImageKind`] for dynamic or differencing images (convert to
/// a new file instead) or an unsupported direction; [`Error::InvalidOption`]
/// for a raw image too large for a VHD, or Azure sizing with a raw target;
/// open errors.
pub fn plan_in_place(
    path: impl AsRef<Path>,
    target: Format,
    azure: bool,
    opts: &OpenOptions,
) -> Result<InPlacePlan> {
    let path = path.as_ref();
    let img = Image::open_with(path, opts)?;
    let size = img.virtual_size();
    let mut steps = Vec::new();
    let description;
    match (img.disk_type(), target) {
        (Format::Raw, Format::Fixed) => {
            let mut new_size = size.div_ceil(SECTOR) * SECTOR;
            if azure {
                new_size = azure_size(new_size);
            }
            if new_size > crate::write::MAX_VHD_SIZE {
                return Err(Error::invalid_option_for(
                    path,
                    "format",
                    target,
                    format!("{new_size} bytes is larger than a VHD can hold (2040 GiB)"),
                ));
            }
            // One write puts the footer at the new end and extends the file
            // in the same call (the bytes between read as zeros): a crash or
            // a kill leaves the raw file as it was or the fixed image whole,
            // never a raw disk padded to the new size.
            steps.push(Step::Write(new_size, fixed_footer(new_size)));
            steps.push(Step::Sync);
            description = if new_size != size {
                format!(
                    "raw -> fixed: extended {size} -> {new_size} bytes with zeros, footer appended"
                )
            } else {
                format!("raw -> fixed: footer appended ({size} bytes)")
            };
        }
        (Format::Fixed, Format::Raw) => {
            if azure {
                return Err(Error::invalid_option(
                    "azure",
                    target,
                    "Azure sizing goes with a fixed target",
                ));
            }
            steps.push(Step::SetLen(size));
            steps.push(Step::Sync);
            description = format!("fixed -> raw: footer removed ({size} bytes)");
        }
        (Format::Fixed, Format::Fixed) if azure => {
            let new_size = azure_size(size);
            let old_at = img.data_end();
            if new_size == size {
                description = format!("already a whole number of MiB ({size} bytes)");
            } else {
                let old = img.vhd_footer()?.clone();
                let mut f = old.resized(new_size);
                f.original_size = new_size;
                steps = grow_fixed(size, old_at, &old, &f);
                description =
                    format!("fixed: grown {size} -> {new_size} bytes (a whole number of MiB)");
            }
        }
        (Format::Raw, Format::Raw) | (Format::Fixed, Format::Fixed) => {
            description = format!("already {target}");
        }
        (from, to) => {
            return Err(Error::wrong_kind(
                path,
                "in-place conversion",
                from,
                format!(
                    "in-place conversion goes between raw and fixed only, not {from} -> {to}; \
                     convert to a new file instead"
                ),
            ))
        }
    }
    Ok(InPlacePlan {
        path: path.to_path_buf(),
        description,
        steps,
    })
}
