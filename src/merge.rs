//! Folding a differencing disk into its parent (or into an ancestor
//! further down its chain).
//!
//! # The plan, in order
//!
//! 1. Open the child's chain (as [`Image::open_with`] does) and find the
//!    target: the parent, or the ancestor asked for.
//! 2. Check, before anything is written: every layer from the child down to
//!    the target records its parent's unique id and time stamp as the
//!    parent has them (a recorded time stamp of 0 counts as not recorded);
//!    sizes agree; no other differencing disk in the folders of the chain
//!    names the target or a layer between (such a disk would read through
//!    the target and see its content change), unless `force`.
//! 3. Lock: the target exclusively (through [`VhdWriter`], which also
//!    fails when the target cannot be opened for writing), the layers above
//!    it shared (no vhdkit writer can change them meanwhile).
//! 4. Copy into the target, through the writer, only the sectors the layers
//!    above it hold (their sector bitmaps), reading each through the child
//!    so that the topmost layer's version wins.
//! 5. Flush (see [`crate::writer`] for the order of the target's writes).
//!
//! # Why an interruption loses nothing
//!
//! The target's unique id and time stamp are not changed, so the child
//! still opens on it at every moment. Every sector the merge changes in
//! the target is held by a layer above it, so the chain read through the
//! child reads the same content before, during and after the merge. The
//! target itself stays a valid image at any cut (the writer's order), its
//! content a mix of old and merged sectors until the merge completes; the
//! merge can be run again to finish. The child is left as it is: once the
//! merge completed it is no longer needed (the target holds its content),
//! and may be deleted.

use crate::error::{Error, Result};
use crate::image::{ExtentKind, Format, Image, OpenOptions};
use crate::io::ReadAt;
use crate::ondisk::{DiskType, DynamicHeader, Footer, Uuid, FOOTER_SIZE, HEADER_SIZE};
use crate::writer::{OpLog, VhdWriter};
use std::path::{Path, PathBuf};

/// How to merge.
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// The ancestor to merge into (by path; default the child's parent).
    pub into: Option<PathBuf>,
    /// Merge even when other differencing disks name the target (or a layer
    /// between), whose content then changes under them.
    pub force: bool,
    /// How the chain is opened.
    pub open: OpenOptions,
}

/// What a merge did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MergeReport {
    /// The disk merged into.
    pub target: PathBuf,
    /// The layers folded into it, the child first.
    pub merged: Vec<PathBuf>,
    /// Bytes copied (the sectors the merged layers hold).
    pub bytes_copied: u64,
    /// Other differencing disks that name the target or a layer between
    /// (merged anyway, with `force`).
    pub other_children: Vec<PathBuf>,
}

/// The most bytes copied at once.
const CHUNK: u64 = 4 << 20;

/// Folds the differencing disk `child` into its parent, or into the
/// ancestor `opts.into`. See the [module documentation](self).
///
/// # Errors
/// The open errors of [`Image::open_with`]; [`Error::WrongImageKind`] when
/// `child` is not a differencing disk (or a layer is raw);
/// [`Error::ParentNotFound`] when its parent is missing;
/// [`Error::InvalidOption`] when `into` is not in its chain, or other
/// differencing disks depend on the target and `force` is off (option
/// `"force"`); [`Error::ParentMismatch`] when a recorded parent id, time
/// stamp or size does not match; [`Error::OutputRefused`] when the target
/// is read-only or a layer is locked; I/O errors.
pub fn merge(child: impl AsRef<Path>, opts: &MergeOptions) -> Result<MergeReport> {
    merge_inner(child.as_ref(), opts, None)
}

/// [`merge`], recording the target's file operations (crash tests).
#[doc(hidden)]
pub fn merge_recording(
    child: impl AsRef<Path>,
    opts: &MergeOptions,
    log: OpLog,
) -> Result<MergeReport> {
    merge_inner(child.as_ref(), opts, Some(log))
}

fn merge_inner(child: &Path, opts: &MergeOptions, log: Option<OpLog>) -> Result<MergeReport> {
    let img = Image::open_with(child, &opts.open)?;
    if img.disk_type() != Format::Differencing {
        return Err(Error::wrong_kind(
            child,
            "merge",
            img.disk_type(),
            format!(
                "is a {} disk; only a differencing disk is merged into its parent",
                img.disk_type()
            ),
        ));
    }
    if img.parent_missing() {
        return Err(Error::ParentNotFound {
            path: child.to_path_buf(),
            parent_id: img
                .header()
                .map(|h| h.parent_unique_id.to_string())
                .unwrap_or_default(),
            tried: vec!["the image was opened with its parent missing (read as zeros)".into()],
            wrong_id: Vec::new(),
        });
    }
    let chain = img.chain();
    let k = match &opts.into {
        None => 1,
        Some(into) => {
            let want = file_id(into)?;
            chain
                .iter()
                .skip(1)
                .position(|l| file_id(l.path()).ok() == Some(want))
                .map(|p| p + 1)
                .ok_or_else(|| {
                    Error::invalid_option_for(
                        into,
                        "into",
                        into.display(),
                        format!(
                            "is not an ancestor of {} (its chain: {})",
                            child.display(),
                            chain
                                .iter()
                                .map(|l| l.path().display().to_string())
                                .collect::<Vec<_>>()
                                .join(" -> ")
                        ),
                    )
                })?
        }
    };
    let target = chain[k];
    let size = img.virtual_size();
    for j in 0..k {
        let (upper, lower) = (chain[j], chain[j + 1]);
        let h = upper.header().ok_or_else(|| {
            Error::wrong_kind(
                upper.path(),
                "merge",
                upper.disk_type(),
                "is not a differencing disk",
            )
        })?;
        let lf = lower.footer().ok_or_else(|| {
            Error::wrong_kind(
                lower.path(),
                "merge into",
                lower.disk_type(),
                "is raw; only a VHD can be merged into",
            )
        })?;
        if h.parent_unique_id != lf.unique_id {
            return Err(Error::ParentMismatch {
                path: upper.path().to_path_buf(),
                parent: lower.path().to_path_buf(),
                field: "unique id",
                recorded: h.parent_unique_id.to_string(),
                found: lf.unique_id.to_string(),
            });
        }
        if h.parent_timestamp.0 != 0 && h.parent_timestamp != lf.timestamp {
            return Err(Error::ParentMismatch {
                path: upper.path().to_path_buf(),
                parent: lower.path().to_path_buf(),
                field: "time stamp",
                recorded: h.parent_timestamp.to_string(),
                found: format!(
                    "{} (the parent changed since the child was made)",
                    lf.timestamp
                ),
            });
        }
        if lower.virtual_size() != size {
            return Err(Error::ParentMismatch {
                path: upper.path().to_path_buf(),
                parent: lower.path().to_path_buf(),
                field: "size",
                recorded: size.to_string(),
                found: lower.virtual_size().to_string(),
            });
        }
    }
    if let Ok(m) = std::fs::metadata(target.path()) {
        if m.permissions().readonly() {
            return Err(Error::refused(
                target.path(),
                "is read-only; merging changes it",
            ));
        }
    }
    // Other children of the target and of the layers between.
    let members: Vec<(u64, u64)> = chain[..=k]
        .iter()
        .filter_map(|l| file_id(l.path()).ok())
        .collect();
    let ids: Vec<Uuid> = chain[1..=k]
        .iter()
        .filter_map(|l| l.footer().map(|f| f.unique_id))
        .collect();
    let mut folders: Vec<PathBuf> = Vec::new();
    for l in &chain[..=k] {
        let f = crate::write::output_folder(l.path());
        let f = std::fs::canonicalize(&f).unwrap_or(f);
        if !folders.contains(&f) {
            folders.push(f);
        }
    }
    let mut others = Vec::new();
    for f in &folders {
        others.extend(children_naming(f, &ids, &members));
    }
    if !others.is_empty() && !opts.force {
        return Err(Error::invalid_option_for(
            target.path(),
            "force",
            false,
            format!(
                "other differencing disks depend on it and would see their content change: {}",
                others
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    for l in &chain[..k] {
        let file = l.file().ok_or_else(|| Error::Unsupported {
            path: l.path().to_path_buf(),
            what: "is not a file; only local files are merged".into(),
        })?;
        rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockShared).map_err(
            |_| {
                Error::refused(
                    l.path(),
                    "another program holds a lock on it (open for writing elsewhere)",
                )
            },
        )?;
    }
    // The target's own parent, where it was found.
    let wopts = match target.parent() {
        Some(p) => opts.open.clone().parent(p.path()),
        None => opts.open.clone(),
    };
    let writer = match log {
        Some(l) => VhdWriter::open_recording(target.path(), &wopts, l),
        None => VhdWriter::open(target.path(), &wopts),
    }
    .map_err(|e| match e {
        Error::Io {
            path: Some(path),
            source,
            ..
        } if source.kind() == std::io::ErrorKind::PermissionDenied => Error::refused(
            &path,
            format!("cannot be opened for writing ({source}); merging changes it"),
        ),
        e => e,
    })?;

    // The ranges the layers above the target hold.
    let mut held: Vec<(u64, u64)> = Vec::new();
    for l in &chain[..k] {
        for e in l.map_shallow(0, size)? {
            if matches!(e.kind, ExtentKind::Data { .. }) {
                held.push((e.offset, e.end()));
            }
        }
    }
    held.sort_unstable();
    let mut merged_ranges: Vec<(u64, u64)> = Vec::new();
    for (a, b) in held {
        match merged_ranges.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged_ranges.push((a, b)),
        }
    }
    let mut copied = 0u64;
    let mut buf = Vec::new();
    for (a, b) in merged_ranges {
        let mut pos = a;
        while pos < b {
            let n = (b - pos).min(CHUNK);
            buf.resize(n as usize, 0);
            img.read_exact_at(&mut buf, pos)?;
            writer.write_all_at(&buf, pos)?;
            pos += n;
            copied += n;
        }
    }
    writer.close()?;
    Ok(MergeReport {
        target: target.path().to_path_buf(),
        merged: chain[..k].iter().map(|l| l.path().to_path_buf()).collect(),
        bytes_copied: copied,
        other_children: others,
    })
}

fn file_id(p: &Path) -> Result<(u64, u64)> {
    let st = rustix::fs::stat(p).map_err(|e| Error::io(p, "stat", e.into()))?;
    Ok((st.st_dev as u64, st.st_ino as u64))
}

/// Regular files in `dir`, other than `members`, whose footer says
/// differencing and whose header names one of `ids` as parent. Files that
/// cannot be read are passed over.
fn children_naming(dir: &Path, ids: &[Uuid], members: &[(u64, u64)]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if !m.is_file() || m.len() < (2 * FOOTER_SIZE + HEADER_SIZE) as u64 {
            continue;
        }
        if file_id(&p).is_ok_and(|id| members.contains(&id)) {
            continue;
        }
        if names_parent(&p, m.len(), ids) {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn names_parent(p: &Path, len: u64, ids: &[Uuid]) -> bool {
    let Ok(f) = std::fs::File::open(p) else {
        return false;
    };
    let mut fb = [0u8; FOOTER_SIZE];
    // The end footer, else the copy at 0.
    let footer = [len - FOOTER_SIZE as u64, 0].into_iter().find_map(|at| {
        ReadAt::read_exact_at(&f, &mut fb, at).ok()?;
        Footer::parse(&fb, at, crate::error::Structure::Footer).ok()
    });
    let Some(footer) = footer else { return false };
    if footer.disk_type != DiskType::Differencing {
        return false;
    }
    let mut hb = [0u8; HEADER_SIZE];
    if footer.data_offset > len.saturating_sub(HEADER_SIZE as u64)
        || ReadAt::read_exact_at(&f, &mut hb, footer.data_offset).is_err()
    {
        return false;
    }
    match DynamicHeader::parse(&hb, footer.data_offset) {
        Ok(h) => ids.contains(&h.parent_unique_id),
        Err(_) => false,
    }
}
