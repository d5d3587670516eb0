//! New, empty disks: fixed, dynamic, and differencing children of an
//! existing VHD.
//!
//! A fixed disk is a sparse file: a hole of the virtual size followed by the
//! footer, made in O(1) at any size. A dynamic disk is the footer copy, the
//! dynamic header, a BAT with every entry unallocated, and the footer. A
//! differencing disk is a dynamic disk whose header names its parent: the
//! parent's unique id and footer time stamp, its file name (UTF-16 BE), and
//! two locators laid out as Windows (diskpart, Hyper-V) writes them:
//!
//! - slot 0, `W2ku`: the parent's absolute path, UTF-16 LE, Windows
//!   separators (on Unix the canonical POSIX path with `\` for `/`, e.g.
//!   `\srv\disks\base.vhd`, as blktap's vhd-util writes it);
//! - slot 1, `W2ru`: the path relative to the child's folder, UTF-16 LE,
//!   e.g. `.\base.vhd` or `..\base\base.vhd`.
//!
//! Each locator's data starts on a 4 KiB boundary after the BAT, and its
//! data space is given in bytes, a multiple of 4096 — what Windows writes
//! (the corpus' `dfvfs__fat-differential.vhd`, made by Windows 10 diskpart,
//! has data spaces of 4096 and 65536 bytes, although the specification
//! speaks of sectors; readers such as blktap accept both).
//!
//! Every output is written under a temporary name and renamed into place
//! when complete.

use crate::error::{Error, Result};
use crate::image::{Format, Image, OpenOptions};
use crate::io::WriteAt;
use crate::ondisk::placement;
use crate::ondisk::{
    Bat, DiskType, DynamicHeader, Footer, ParentLocator, PlatformCode, Uuid, FOOTER_SIZE,
};
use crate::write::{
    azure_size, new_footer, AtomicOutput, DynamicLayout, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE,
    MAX_VHD_SIZE, MIN_BLOCK_SIZE,
};
use std::path::{Path, PathBuf};

/// The kind of a new, parentless disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiskKind {
    /// The raw disk (a hole) followed by a footer.
    Fixed,
    /// Footer copy, header, BAT; blocks are added as data is written.
    Dynamic,
}

/// What [`create`] makes.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Fixed or dynamic.
    pub kind: DiskKind,
    /// The virtual size in bytes: a multiple of 512 (of 1 MiB with `azure`,
    /// which rounds it up).
    pub size: u64,
    /// Bytes per block of a dynamic disk: a power of two from 512 KiB to
    /// 256 MiB (default 2 MiB).
    pub block_size: u32,
    /// Round the size up to a whole MiB (Azure's rule).
    pub azure: bool,
    /// Replace an existing file.
    pub overwrite: bool,
    /// Sync the file and its folder before returning (default on).
    pub sync: bool,
}

impl CreateOptions {
    /// A disk of `kind` and `size` bytes, 2 MiB blocks, synced, not
    /// replacing anything.
    pub fn new(kind: DiskKind, size: u64) -> CreateOptions {
        CreateOptions {
            kind,
            size,
            block_size: DEFAULT_BLOCK_SIZE,
            azure: false,
            overwrite: false,
            sync: true,
        }
    }
    /// Sets the block size of a dynamic disk.
    pub fn block_size(mut self, b: u32) -> Self {
        self.block_size = b;
        self
    }
    /// Rounds the size up to a whole MiB.
    pub fn azure(mut self, yes: bool) -> Self {
        self.azure = yes;
        self
    }
    /// Replaces an existing file.
    pub fn overwrite(mut self, yes: bool) -> Self {
        self.overwrite = yes;
        self
    }
    /// Syncs before returning (on by default).
    pub fn sync(mut self, yes: bool) -> Self {
        self.sync = yes;
        self
    }
}

/// What [`create_child`] makes.
#[derive(Clone, Debug)]
pub struct ChildOptions {
    /// Bytes per block; `None`: the parent's block size when it has blocks,
    /// else 2 MiB.
    pub block_size: Option<u32>,
    /// Replace an existing file.
    pub overwrite: bool,
    /// Sync the file and its folder before returning (default on).
    pub sync: bool,
    /// How the parent is opened (its own parents included).
    pub open: OpenOptions,
}

impl Default for ChildOptions {
    fn default() -> Self {
        ChildOptions {
            block_size: None,
            overwrite: false,
            sync: true,
            open: OpenOptions::new(),
        }
    }
}

/// What was created.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Created {
    /// The new file.
    pub path: PathBuf,
    /// Fixed, dynamic or differencing.
    pub disk_type: Format,
    /// The virtual size in bytes.
    pub virtual_size: u64,
    /// The size asked for, when `azure` rounded it up.
    pub rounded_from: Option<u64>,
    /// The file's length in bytes.
    pub file_len: u64,
    /// Bytes per block (0 for a fixed disk).
    pub block_size: u64,
    /// The new disk's unique id.
    pub unique_id: Uuid,
    /// A differencing disk's parent.
    pub parent: Option<CreatedParent>,
}

/// The parent a new differencing disk names.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreatedParent {
    /// Its path, as given.
    pub path: PathBuf,
    /// Its unique id (the child's header's parent unique id).
    pub unique_id: Uuid,
}

fn check_block_size(bs: u32) -> Result<()> {
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::invalid_option(
            "block size",
            bs,
            format!(
                "block size {bs}: must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE} bytes"
            ),
        ));
    }
    Ok(())
}

/// Creates an empty fixed or dynamic disk at `path`.
///
/// # Errors
/// [`Error::InvalidOption`] for a size of zero, not a multiple of 512,
/// or over 2040 GiB, or a bad block size; [`Error::OutputExists`] when the
/// file exists and `overwrite` is off; I/O errors naming the file.
pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Created> {
    let path = path.as_ref();
    let size = if opts.azure {
        azure_size(opts.size)
    } else {
        opts.size
    };
    if size == 0 || size % 512 != 0 {
        return Err(Error::invalid_option(
            "size",
            opts.size,
            format!(
                "size {}: a VHD's size is a positive multiple of 512 bytes",
                opts.size
            ),
        ));
    }
    if size > MAX_VHD_SIZE {
        return Err(Error::invalid_option(
            "size",
            size,
            format!("size {size}: over the largest VHD, {MAX_VHD_SIZE} bytes (2040 GiB)"),
        ));
    }
    let out = AtomicOutput::create(path, opts.overwrite)?;
    let file = out.file();
    let tmp = out.temp_path().to_path_buf();
    let (footer, file_len, block_size) = match opts.kind {
        DiskKind::Fixed => {
            let footer = new_footer(DiskType::Fixed, size);
            let len = size + FOOTER_SIZE as u64;
            out.set_len(len)?;
            out.fill_zeros(0, size)?;
            file.write_all_at(&footer.to_bytes(), size)
                .map_err(|e| Error::io(&tmp, "write the footer", e))?;
            (footer, len, 0)
        }
        DiskKind::Dynamic => {
            check_block_size(opts.block_size)?;
            let layout = DynamicLayout::new(size, opts.block_size);
            // Every BAT entry must fit 32 bits of sectors: checked on the
            // last slot a full disk would use.
            layout.bat_entry(layout.entries.saturating_sub(1))?;
            let footer = new_footer(DiskType::Dynamic, size);
            let len = layout.file_len(0);
            out.set_len(len)?;
            out.fill_zeros(0, len)?;
            layout
                .write_metadata(file, &footer, &Bat::new(layout.entries as usize))
                .map_err(|e| e.with_path(&tmp))?;
            (footer, len, layout.block_size)
        }
    };
    out.commit(opts.sync)?;
    Ok(Created {
        path: path.to_path_buf(),
        disk_type: match opts.kind {
            DiskKind::Fixed => Format::Fixed,
            DiskKind::Dynamic => Format::Dynamic,
        },
        virtual_size: size,
        rounded_from: (size != opts.size).then_some(opts.size),
        file_len,
        block_size,
        unique_id: footer.unique_id,
        parent: None,
    })
}

/// The path of `target` relative to the folder `from` (both absolute and
/// canonical), with Windows separators: `.\b.vhd`, `..\base\b.vhd`.
pub(crate) fn relative_windows(from: &Path, target: &Path) -> Option<String> {
    let f: Vec<_> = from.components().collect();
    let t: Vec<_> = target.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    if common == f.len() {
        parts.push(".".into());
    }
    for _ in common..f.len() {
        parts.push("..".into());
    }
    for c in &t[common..] {
        parts.push(c.as_os_str().to_str()?.to_string());
    }
    Some(parts.join("\\"))
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Creates at `path` an empty differencing disk whose parent is `parent`
/// (any VHD vhdkit reads: fixed, dynamic or differencing, opened with
/// `opts.open`, its own parents included). The child has the parent's
/// virtual size and geometry and opens through the usual parent rules:
/// it finds the parent in its own folder, or where the caller allows.
///
/// # Errors
/// The parent's open errors; [`Error::WrongImageKind`] when the parent is
/// not a VHD (raw); [`Error::InvalidOption`] when its path is not UTF-8 or
/// too long for a locator, or its size over the largest VHD;
/// [`Error::OutputExists`]; I/O errors naming the file.
pub fn create_child(
    path: impl AsRef<Path>,
    parent: impl AsRef<Path>,
    opts: &ChildOptions,
) -> Result<Created> {
    let path = path.as_ref();
    let parent_path = parent.as_ref();
    let pimg = Image::open_with(parent_path, &opts.open)?;
    let pfooter = match (pimg.disk_type(), pimg.footer()) {
        (Format::Raw, _) | (_, None) => {
            return Err(Error::wrong_kind(
                parent_path,
                "be a parent",
                pimg.disk_type(),
                "a raw image cannot be a parent (a differencing disk names its parent's \
                 unique id); convert it to a VHD first",
            ))
        }
        (_, Some(f)) => f.clone(),
    };
    let block_size = match opts.block_size {
        Some(b) => b,
        None if pimg.block_size() > 0 => u32::try_from(pimg.block_size()).unwrap_or(0),
        None => DEFAULT_BLOCK_SIZE,
    };
    check_block_size(block_size)?;
    let size = pimg.virtual_size();
    if size > MAX_VHD_SIZE {
        return Err(Error::invalid_option_for(
            parent_path,
            "parent",
            parent_path.display(),
            format!("the parent's size, {size} bytes, is over the largest VHD (2040 GiB)"),
        ));
    }

    // Locator paths: the parent's canonical path, and that path relative to
    // the child's (canonical) folder.
    let abs = std::fs::canonicalize(parent_path)
        .map_err(|e| Error::io(parent_path, "find the absolute path of", e))?;
    let child_dir = crate::write::output_folder(path);
    let child_dir_abs = std::fs::canonicalize(&child_dir)
        .map_err(|e| Error::io(&child_dir, "the output's folder", e))?;
    let not_utf8 = || {
        Error::invalid_option_for(
            &abs,
            "parent",
            abs.display(),
            "the parent's path is not valid UTF-8 and cannot be written in a locator",
        )
    };
    let abs_str = abs.to_str().ok_or_else(not_utf8)?;
    let w2ku = abs_str.replace('/', "\\");
    let w2ru = relative_windows(&child_dir_abs, &abs).ok_or_else(not_utf8)?;
    let name = abs
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(not_utf8)?;
    if name.encode_utf16().count() >= 256 {
        return Err(Error::invalid_option(
            "parent",
            name,
            format!("{name}: the parent's file name is longer than the header's 255 UTF-16 units"),
        ));
    }

    // Layout: footer copy, header, BAT, locator data (each on 4 KiB), footer.
    const ALIGN: u64 = 4096;
    let entries = placement::bat_entries(size, u64::from(block_size));
    let table_offset = placement::TABLE_OFFSET;
    let bat_end = placement::bat_end(table_offset, entries);
    let mut at = placement::align_up(bat_end, ALIGN);
    let mut header = DynamicHeader::new(table_offset, entries as u32, block_size);
    header.parent_unique_id = pfooter.unique_id;
    header.parent_timestamp = pfooter.timestamp;
    header.set_parent_name(name);
    let mut blobs = Vec::new();
    for (slot, (code, text)) in [(PlatformCode::W2ku, &w2ku), (PlatformCode::W2ru, &w2ru)]
        .into_iter()
        .enumerate()
    {
        let data = utf16le(text);
        let space = placement::align_up(data.len() as u64, ALIGN).max(ALIGN);
        let too_long = || {
            Error::invalid_option(
                "parent",
                text,
                format!("{text}: too long for a parent locator"),
            )
        };
        header.parent_locators[slot] = ParentLocator {
            platform_code: code,
            data_space: u32::try_from(space).map_err(|_| too_long())?,
            data_length: u32::try_from(data.len()).map_err(|_| too_long())?,
            reserved: 0,
            data_offset: at,
        };
        blobs.push((at, data));
        at += space;
    }
    let footer = Footer {
        geometry: pfooter.geometry,
        ..new_footer(DiskType::Differencing, size)
    };
    let file_len = at + FOOTER_SIZE as u64;

    let out = AtomicOutput::create(path, opts.overwrite)?;
    let file = out.file();
    let tmp = out.temp_path().to_path_buf();
    out.set_len(file_len)?;
    out.fill_zeros(0, file_len)?;
    let w = |bytes: &[u8], off: u64, what: &'static str| {
        file.write_all_at(bytes, off)
            .map_err(|e| Error::io(&tmp, what, e))
    };
    let fb = footer.to_bytes();
    w(&fb, 0, "write the footer copy")?;
    w(
        &header.to_bytes(),
        placement::HEADER_OFFSET,
        "write the header",
    )?;
    w(
        &Bat::new(entries as usize).to_bytes(),
        table_offset,
        "write the BAT",
    )?;
    for (off, data) in &blobs {
        w(data, *off, "write a parent locator")?;
    }
    w(&fb, at, "write the footer")?;
    out.commit(opts.sync)?;
    Ok(Created {
        path: path.to_path_buf(),
        disk_type: Format::Differencing,
        virtual_size: size,
        rounded_from: None,
        file_len,
        block_size: u64::from(block_size),
        unique_id: footer.unique_id,
        parent: Some(CreatedParent {
            path: parent_path.to_path_buf(),
            unique_id: pfooter.unique_id,
        }),
    })
}

impl Image {
    /// Creates a new empty fixed or dynamic disk at `path` (see [`create`])
    /// and opens it.
    ///
    /// # Errors
    /// As [`create`], and as [`Image::open`].
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Image> {
        let c = create(path.as_ref(), opts)?;
        Image::open(&c.path)
    }

    /// Creates a differencing disk at `path` whose parent is the VHD at
    /// `parent` (see [`create_child`]), and opens it with its chain.
    ///
    /// # Errors
    /// As [`create_child`], and as [`Image::open_with`].
    pub fn create_child(path: impl AsRef<Path>, parent: impl AsRef<Path>) -> Result<Image> {
        let opts = ChildOptions::default();
        let c = create_child(path.as_ref(), parent.as_ref(), &opts)?;
        Image::open_with(&c.path, &opts.open.clone().parent(parent.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_use_windows_separators() {
        let r = |a: &str, b: &str| relative_windows(Path::new(a), Path::new(b)).unwrap();
        assert_eq!(r("/d", "/d/base.vhd"), ".\\base.vhd");
        assert_eq!(r("/d/c", "/d/b/base.vhd"), "..\\b\\base.vhd");
        assert_eq!(r("/d/c", "/base.vhd"), "..\\..\\base.vhd");
    }
}
