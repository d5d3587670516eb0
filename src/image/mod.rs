//! Opening a file as a virtual disk.
//!
//! [`Image::open`] detects raw, fixed (512- and 511-byte footer), dynamic and
//! differencing images, validates every structure against the file's length
//! before trusting it, resolves parent chains through a gate the caller
//! controls, and answers [`Image::map`]: what is at each virtual offset.

pub(crate) mod map;
mod parent;
mod reader;
mod vhdx;

pub(crate) use map::{push_extent, range_end};
pub use map::{Extent, ExtentKind};
pub use parent::{
    FolderResolver, ParentHint, ParentId, ParentRequest, ParentResolver, ParentSource,
};
pub use reader::{OwnedReader, Reader};

use crate::error::{Error, Result, Structure};
use crate::io::ReadAt;
use crate::ondisk::{
    bitmap_size, Bat, DiskType, DynamicHeader, Footer, FOOTER_SIZE, HEADER_SIZE, SECTOR,
    UNALLOCATED,
};
use crate::ondisk::{footer_fields as ff, header_fields as hf};
use crate::storage::{FileStorage, MemoryStorage, Storage};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU8;
use std::sync::Arc;

/// What kind of image a file is.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[non_exhaustive]
pub enum Format {
    /// A plain disk image with no VHD structures.
    Raw,
    /// A fixed VHD: the raw disk followed by a footer.
    Fixed,
    /// A dynamic VHD: footer copy, header, BAT, blocks, footer.
    Dynamic,
    /// A differencing VHD: a dynamic VHD whose holes read from a parent.
    Differencing,
    /// A VHDX file (Hyper-V's format), read-only; [`Image::vhdx`] gives
    /// its structures and its own disk type.
    Vhdx,
}

impl Format {
    /// The name used in the CLI and its JSON: `raw`, `fixed`, `dynamic`,
    /// `differencing`, `vhdx`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Fixed => "fixed",
            Format::Dynamic => "dynamic",
            Format::Differencing => "differencing",
            Format::Vhdx => "vhdx",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to open an image: forced format, checksum policy, where parents may
/// come from, and limits on what a file may ask for.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub(crate) format: Option<Format>,
    pub(crate) ignore_checksums: bool,
    /// The default resolver's files, folders and storages.
    pub(crate) folders: FolderResolver,
    /// A resolver the caller set, in place of `folders`.
    pub(crate) parent_resolver: Option<Arc<dyn ParentResolver>>,
    pub(crate) missing_parent_as_zero: bool,
    pub(crate) max_bat_entries: u64,
    pub(crate) max_chain_depth: usize,
    pub(crate) writable: bool,
    /// Open the file alone, without looking for its parent (used to check a
    /// candidate parent's unique id before walking further).
    pub(crate) shallow: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            ignore_checksums: false,
            folders: FolderResolver::new(),
            parent_resolver: None,
            missing_parent_as_zero: false,
            // 2040 GiB in 512 KiB blocks needs 4,177,920 entries; 2^24 leaves room.
            max_bat_entries: 1 << 24,
            max_chain_depth: 32,
            writable: false,
            shallow: false,
        }
    }
}

impl OpenOptions {
    /// Defaults: detect the format, refuse bad checksums, open parents only
    /// from the child's own folder, at most 2^24 BAT entries and 32 parents.
    pub fn new() -> Self {
        Self::default()
    }
    /// Treat the file as this format instead of detecting it (`Raw` reads a
    /// VHD's bytes as they are, footer included).
    pub fn format(mut self, f: Format) -> Self {
        self.format = Some(f);
        self
    }
    /// Read images whose footer or dynamic header checksum does not match.
    pub fn ignore_checksums(mut self, yes: bool) -> Self {
        self.ignore_checksums = yes;
        self
    }
    /// Names a file that may serve as a parent (matched by unique id). It
    /// may lie anywhere, but must be a regular file.
    pub fn parent(mut self, path: impl AsRef<Path>) -> Self {
        self.folders = self.folders.parent(path);
        self
    }
    /// Allows parents to be opened from this folder, besides the child's
    /// own, and looks in it for the file names the child's locators give
    /// (regular files directly in it; no link leading out of it is followed).
    pub fn parent_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.folders = self.folders.parent_dir(dir);
        self
    }
    /// Offers a storage (bytes in memory, say) that may serve as a parent,
    /// matched by unique id like [`OpenOptions::parent`]; `name` names it in
    /// messages. An image over a storage other than a local file finds its
    /// parents only here and among the files and folders named with
    /// [`OpenOptions::parent`] and [`OpenOptions::parent_dir`].
    pub fn parent_storage(
        mut self,
        name: impl AsRef<Path>,
        storage: impl Storage + 'static,
    ) -> Self {
        self.folders = self.folders.parent_storage(name, storage);
        self
    }
    /// Finds parents with `resolver` instead of the default
    /// [`FolderResolver`]; the files, folders and storages named with
    /// [`OpenOptions::parent`], [`OpenOptions::parent_dir`] and
    /// [`OpenOptions::parent_storage`] are then not looked at (a resolver
    /// may still use a [`FolderResolver`] of its own). Every parent it
    /// returns is checked as [`ParentRequest::try_parent`] says, for VHD and
    /// VHDX differencing disks alike.
    pub fn parent_resolver(mut self, resolver: impl ParentResolver + 'static) -> Self {
        self.parent_resolver = Some(Arc::new(resolver));
        self
    }
    /// When no parent is found, open the child anyway and read what it
    /// leaves to the parent as zeros (for inspection; the content is not the
    /// disk's). [`Image::parent_missing`] then says so.
    pub fn missing_parent_as_zero(mut self, yes: bool) -> Self {
        self.missing_parent_as_zero = yes;
        self
    }
    /// The most BAT entries a file may declare.
    pub fn max_bat_entries(mut self, n: u64) -> Self {
        self.max_bat_entries = n;
        self
    }
    /// The most parents a chain may have.
    pub fn max_chain_depth(mut self, n: usize) -> Self {
        self.max_chain_depth = n;
        self
    }
    /// Opens the file for writing too (in-place operations).
    pub fn writable(mut self, yes: bool) -> Self {
        self.writable = yes;
        self
    }
}

/// Something odd found while opening an image that did not stop the open
/// (a damaged end footer replaced by its copy, a checksum ignored on
/// request, padding...). Its `code` is assigned where it is made.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Warning {
    /// The stable code, as check's codes in the README name it
    /// (`footer-copy-used`, `checksum-ignored`, `fixed-padding`,
    /// `footer-copy-differs`, `parent-size-differs`, `parent-missing`,
    /// `vhdx-log-replayed`, or `image-warning` for any other).
    pub code: &'static str,
    /// What was found, in a sentence.
    pub message: String,
    /// The structure concerned, when there is one.
    pub structure: Option<Structure>,
    /// The field, in the specification's words, when one is to blame.
    pub field: Option<&'static str>,
    /// The offset in the file of that structure (of the field, when one is
    /// named), when known.
    pub offset: Option<u64>,
}

impl Warning {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Warning {
        Warning {
            code,
            message: message.into(),
            structure: None,
            field: None,
            offset: None,
        }
    }
    pub(crate) fn at(mut self, structure: Structure, offset: u64) -> Warning {
        self.structure = Some(structure);
        self.offset = Some(offset);
        self
    }
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Where the footer was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FooterSource {
    /// The last 512 bytes.
    End,
    /// The last 511 bytes (Virtual PC before 2004).
    EndLegacy,
    /// The copy at offset 0, because the end footer is missing or damaged.
    Copy,
}

/// An image opened as a virtual disk.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    file_len: u64,
    virtual_size: u64,
    /// Where the data area ends: the end footer's offset, or the file length.
    data_end: u64,
    /// What the image is, with exactly the structures of its kind.
    layout: Layout,
    parent: Option<Box<Image>>,
    parent_missing: bool,
    warnings: Vec<Warning>,
    /// Check mode: problems that did not stop the walk (None: fail fast).
    diag: Option<Vec<Error>>,
    /// Problems found in check mode beyond [`MAX_LISTED_PROBLEMS`].
    diag_dropped: u64,
}

/// What an image is, carrying exactly the structures each kind has: the
/// read path matches on it and unwraps nothing. (Another format, VHDX say,
/// is one more variant with its own structures.)
#[derive(Debug)]
pub(crate) enum Layout {
    /// No VHD structure: the file is the disk.
    Raw,
    /// The disk, then a footer.
    Fixed(Vhd),
    /// Footer copy, header, BAT, blocks, footer.
    Dynamic(Vhd, Box<Dynamic>),
    /// A dynamic layout whose holes read from a parent.
    Differencing(Vhd, Box<Dynamic>),
    /// A VHDX file; the image's storage is the file with its replayed log
    /// laid over it, so data extents read the right bytes.
    Vhdx(Arc<crate::vhdx::Vhdx>),
}

/// The footer in force and where it was read.
#[derive(Debug)]
pub(crate) struct Vhd {
    pub(crate) footer: Footer,
    pub(crate) source: FooterSource,
}

/// The structures of a dynamic or differencing image.
#[derive(Debug)]
pub(crate) struct Dynamic {
    pub(crate) header: DynamicHeader,
    /// Absolute offset of the dynamic header.
    pub(crate) header_offset: u64,
    pub(crate) bat: Bat,
    /// Bytes of data per block.
    pub(crate) block_size: u64,
    /// Bytes of sector bitmap in front of each block.
    pub(crate) bitmap_size: u64,
    /// Per block: 0 not yet known, 1 bitmap all set, 2 partial bitmap.
    pub(crate) bitmap_state: Vec<AtomicU8>,
}

/// The name in messages of an image opened over a storage rather than a path.
pub(crate) const STORAGE_NAME: &str = "<memory>";

/// The most problems check mode lists for one file.
pub(crate) const MAX_LISTED_PROBLEMS: usize = 1000;

/// Reads `N` bytes at `offset` into an array.
fn read_array<const N: usize>(file: &dyn Storage, offset: u64) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    file.read_exact_at(&mut b, offset)?;
    Ok(b)
}

impl Image {
    /// Opens `path` with default options.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read (or is a folder);
    /// [`Error::NotAnImageFile`] when it is a FIFO, a character device or a
    /// socket (a block device is read at its size); [`Error::Corrupt`] naming
    /// the structure, field and offset when a structure is damaged;
    /// [`Error::Checksum`] on a checksum mismatch; [`Error::ParentNotFound`]
    /// when a differencing disk's parent cannot be found in the allowed places.
    pub fn open(path: impl AsRef<Path>) -> Result<Image> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// Opens `path` with `opts`. Errors as for [`Image::open`], plus
    /// [`Error::Limit`] when the file asks for more than the options allow.
    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let mut visited = parent::Walk::default();
        Self::open_level(path, opts, 0, &mut visited)
    }

    /// Opens an image held in memory, with default options. `Image::path()`
    /// is then `<memory>`.
    ///
    /// # Errors
    /// As for [`Image::open`].
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Image> {
        Self::from_storage(MemoryStorage::new(bytes), &OpenOptions::default())
    }

    /// Opens an image over any storage. Parents are found among those the
    /// options name ([`OpenOptions::parent_storage`], and the files and
    /// folders named with [`OpenOptions::parent`] and
    /// [`OpenOptions::parent_dir`]). `Image::path()` is `<memory>` for a
    /// storage.
    ///
    /// # Errors
    /// As for [`Image::open_with`].
    pub fn from_storage(storage: impl Storage + 'static, opts: &OpenOptions) -> Result<Image> {
        Self::from_storage_named(Arc::new(storage), Path::new(STORAGE_NAME), opts)
    }

    /// [`Image::from_storage`], named `name` in messages and by
    /// `Image::path()` (a blob's URL, its signature redacted).
    pub(crate) fn from_storage_named(
        storage: Arc<dyn Storage>,
        name: &Path,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let len = ReadAt::len(&*storage).map_err(|e| Error::io(name, "stat", e))?;
        let mut visited = parent::Walk::default();
        Self::open_file(name, storage, len, opts, 0, &mut visited, None)
    }

    /// [`Image::from_storage`] in check mode (see `open_collect`).
    pub(crate) fn from_storage_collect(
        storage: Arc<dyn Storage>,
        path: &Path,
        opts: &OpenOptions,
    ) -> (Option<Image>, Vec<Error>) {
        let len = match ReadAt::len(&*storage) {
            Ok(l) => l,
            Err(e) => return (None, vec![Error::io(path, "stat", e)]),
        };
        let mut visited = parent::Walk::default();
        let mut problems = Vec::new();
        match Self::open_file(
            path,
            storage,
            len,
            opts,
            0,
            &mut visited,
            Some(&mut problems),
        ) {
            Ok(img) => (Some(img), problems),
            Err(e) => {
                problems.push(e);
                (None, problems)
            }
        }
    }

    /// Opens in check mode: problems that still allow the walk to go on are
    /// collected rather than returned. Returns the image when the walk got
    /// through, and every problem found either way.
    pub(crate) fn open_collect(path: &Path, opts: &OpenOptions) -> (Option<Image>, Vec<Error>) {
        let mut visited = parent::Walk::default();
        let mut problems = Vec::new();
        match Self::open_level_mode(path, opts, 0, &mut visited, Some(&mut problems)) {
            Ok(img) => (Some(img), problems),
            Err(e) => {
                problems.push(e);
                (None, problems)
            }
        }
    }

    fn open_level(
        path: &Path,
        opts: &OpenOptions,
        depth: usize,
        visited: &mut parent::Walk,
    ) -> Result<Image> {
        Self::open_level_mode(path, opts, depth, visited, None)
    }

    fn open_level_mode(
        path: &Path,
        opts: &OpenOptions,
        depth: usize,
        visited: &mut parent::Walk,
        collect: Option<&mut Vec<Error>>,
    ) -> Result<Image> {
        // Opened without blocking and checked with fstat before anything is
        // read: a FIFO or a character device is refused, a block device is
        // read at its real size.
        let (file, file_len) = crate::io::open_input(path, opts.writable)?;
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(file));
        Self::open_file(path, storage, file_len, opts, depth, visited, collect)
    }

    /// Opens as an image a file already opened and checked (a regular file,
    /// or a block device for an input); `path` names it in messages and
    /// gives the folder its parent is looked for in.
    pub(crate) fn open_file(
        path: &Path,
        storage: Arc<dyn Storage>,
        file_len: u64,
        opts: &OpenOptions,
        depth: usize,
        visited: &mut parent::Walk,
        collect: Option<&mut Vec<Error>>,
    ) -> Result<Image> {
        let mut img = Image {
            path: path.to_path_buf(),
            storage,
            file_len,
            virtual_size: file_len,
            data_end: file_len,
            layout: Layout::Raw,
            parent: None,
            parent_missing: false,
            warnings: Vec::new(),
            diag: None,
            diag_dropped: 0,
        };
        if collect.is_some() {
            img.diag = Some(Vec::new());
        }
        let detected = if opts.format != Some(Format::Raw) {
            img.detect(opts).map_err(|e| e.with_path(path))
        } else {
            Ok(())
        };
        let mut result = detected.map(|_| ());
        if result.is_ok() && img.is_differencing() && !opts.shallow {
            visited.path.push(parent::storage_id(&img.storage));
            result = parent::resolve(&mut img, opts, depth, visited);
            visited.path.pop();
            if let (Err(e), Some(d)) = (&result, &img.diag) {
                // A check goes on without the parent; a VHDX's unusable
                // parent locator, when its reader listed it, is not listed twice.
                let locator = vhdx::locator_error(e);
                if matches!(e, Error::ParentNotFound { .. }) || locator {
                    let listed = locator && d.iter().any(vhdx::locator_error);
                    img.parent_missing = true;
                    let e = std::mem::replace(&mut result, Ok(()));
                    if let (Some(d), Err(e)) = (img.diag.as_mut(), e) {
                        if !listed {
                            d.push(e);
                        }
                    }
                }
            }
        }
        if let (Some(out), Some(found)) = (collect, img.diag.take()) {
            let listed = found.len() as u64;
            out.extend(found.into_iter().map(|e| e.with_path(path)));
            if img.diag_dropped > 0 {
                out.push(Error::Limit {
                    path: path.to_path_buf(),
                    what: crate::error::LimitOf::Problems,
                    value: listed + img.diag_dropped,
                    limit: listed,
                });
            }
        }
        result.map(|_| img)
    }

    /// A problem that need not stop the walk: returned when failing fast,
    /// recorded in check mode.
    fn report(&mut self, e: Error) -> Result<()> {
        match &mut self.diag {
            Some(d) => {
                // A hostile file can have a problem per BAT entry: list the
                // first ones and count the rest.
                if d.len() < MAX_LISTED_PROBLEMS {
                    d.push(e);
                } else {
                    self.diag_dropped += 1;
                }
                Ok(())
            }
            None => Err(e),
        }
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |e| Error::io(&self.path, op, e)
    }

    /// An I/O error reading or writing `op` at `offset` of this image's file.
    fn io_at(&self, op: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |e| Error::io_at(&self.path, op, offset, e)
    }

    /// Finds and validates the footer, then the dynamic structures.
    fn detect(&mut self, opts: &OpenOptions) -> Result<()> {
        let len = self.file_len;
        if len >= 8
            && &read_array::<8>(&*self.storage, 0).map_err(self.io_at("read", 0))? == b"vhdxfile"
        {
            return self.load_vhdx(opts);
        }
        if opts.format == Some(Format::Vhdx) {
            return Err(Error::FormatMismatch {
                path: self.path.clone(),
                asked: Format::Vhdx,
                found: None,
            });
        }
        // The end footer: the last 512 bytes, or the last 511.
        let mut tail: Option<([u8; FOOTER_SIZE], u64, FooterSource)> = None;
        if len >= 511 {
            let start = len.saturating_sub(512);
            let mut b = [0u8; FOOTER_SIZE];
            let n = (len - start) as usize;
            ReadAt::read_exact_at(&*self.storage, &mut b[..n], start)
                .map_err(self.io_at("read", start))?;
            if n == 512 && Footer::has_cookie(&b) {
                tail = Some((b, start, FooterSource::End));
            } else {
                let skip = n - 511;
                if Footer::has_cookie(&b[skip..]) {
                    let mut f = [0u8; FOOTER_SIZE];
                    f[..511].copy_from_slice(&b[skip..n]);
                    tail = Some((f, len - 511, FooterSource::EndLegacy));
                }
            }
        }
        // The copy at offset 0 (dynamic and differencing disks only).
        let mut head: Option<Footer> = None;
        if len >= (FOOTER_SIZE + HEADER_SIZE + FOOTER_SIZE) as u64 {
            let b: [u8; FOOTER_SIZE] =
                read_array(&*self.storage, 0).map_err(self.io_at("read", 0))?;
            if Footer::has_cookie(&b) {
                if let Ok(f) = Footer::parse(&b, 0, Structure::FooterCopy) {
                    let sum_ok = Footer::verify_checksum(&b, 0, Structure::FooterCopy).is_ok();
                    if matches!(f.disk_type, DiskType::Dynamic | DiskType::Differencing)
                        && (sum_ok || opts.ignore_checksums)
                    {
                        head = Some(f);
                    }
                }
            }
        }

        let (footer, source, data_end) = match tail {
            Some((bytes, at, source)) => {
                let f = Footer::parse(&bytes, at, Structure::Footer)?;
                match Footer::verify_checksum(&bytes, at, Structure::Footer) {
                    Ok(()) => (f, source, at),
                    Err(e) => {
                        if let Some(copy) = head.clone() {
                            self.warnings.push(
                                Warning::new(
                                    "footer-copy-used",
                                    format!(
                                        "{e}; the footer copy at offset 0 is intact and was used \
                                         instead"
                                    ),
                                )
                                .at(Structure::Footer, at),
                            );
                            (copy, FooterSource::Copy, at)
                        } else if opts.ignore_checksums {
                            self.warnings.push(
                                Warning::new(
                                    "checksum-ignored",
                                    format!("{e} (ignored on request)"),
                                )
                                .at(Structure::Footer, at),
                            );
                            (f, source, at)
                        } else {
                            self.report(e)?;
                            (f, source, at)
                        }
                    }
                }
            }
            None => match head.clone() {
                Some(copy) => {
                    self.warnings.push(
                        Warning::new(
                            "footer-copy-used",
                            format!(
                                "no footer in the last 512 bytes (file truncated or footer \
                                 overwritten); the footer copy at offset 0 was used (file length \
                                 {len})"
                            ),
                        )
                        .at(Structure::Footer, len.saturating_sub(FOOTER_SIZE as u64)),
                    );
                    (copy, FooterSource::Copy, len)
                }
                None => {
                    // No footer anywhere: a raw disk, unless the file is
                    // another format, which read as raw would be a "disk"
                    // of its own metadata. (A caller who knows it is raw
                    // forces Format::Raw, which skips detect() entirely.)
                    if let Some(f) = crate::detect::foreign_format(&*self.storage, len)
                        .map_err(self.io("read"))?
                    {
                        return Err(Error::ForeignFormat {
                            path: self.path.clone(),
                            format: f.format,
                            version: f.version,
                        });
                    }
                    // A VHD format forced by the caller cannot be honoured
                    // without a footer.
                    if let Some(forced) = opts.format {
                        return Err(Error::FormatMismatch {
                            path: self.path.clone(),
                            asked: forced,
                            found: None,
                        });
                    }
                    return Ok(());
                }
            },
        };
        let foot_at = if source == FooterSource::Copy {
            0
        } else {
            data_end
        };
        self.data_end = data_end;
        let format = match footer.disk_type {
            DiskType::Fixed => Format::Fixed,
            DiskType::Dynamic => Format::Dynamic,
            DiskType::Differencing => Format::Differencing,
            other => {
                return Err(Error::corrupt(
                    Structure::Footer,
                    "disk type",
                    foot_at + ff::DISK_TYPE as u64,
                    other.code(),
                    "2 (fixed), 3 (dynamic) or 4 (differencing)",
                ))
            }
        };
        if let Some(forced) = opts.format {
            if forced != format {
                return Err(Error::FormatMismatch {
                    path: self.path.clone(),
                    asked: forced,
                    found: Some(format),
                });
            }
        }
        self.virtual_size = footer.current_size;
        if format == Format::Fixed {
            if footer.current_size > data_end {
                self.report(Error::corrupt(
                    Structure::Footer,
                    "current size",
                    foot_at + ff::CURRENT_SIZE as u64,
                    footer.current_size,
                    format!(
                        "at most {data_end}, the bytes in front of the footer (file truncated?)"
                    ),
                ))?;
            }
            if footer.current_size < data_end {
                self.warnings.push(
                    Warning::new(
                        "fixed-padding",
                        format!(
                            "{} bytes between the end of the data ({}) and the footer are not part \
                             of the disk",
                            data_end - footer.current_size,
                            footer.current_size
                        ),
                    )
                    .at(Structure::File, footer.current_size),
                );
            }
            self.layout = Layout::Fixed(Vhd { footer, source });
            return Ok(());
        }
        if let Some(copy) = &head {
            if source != FooterSource::Copy && copy != &footer {
                self.warnings.push(
                    Warning::new(
                        "footer-copy-differs",
                        "the footer copy at offset 0 differs from the footer at the end",
                    )
                    .at(Structure::FooterCopy, 0),
                );
            }
        }
        self.load_dynamic(opts, foot_at, Vhd { footer, source }, format)
    }

    /// Opens the file as a VHDX, whose reads then go through its replayed log.
    fn load_vhdx(&mut self, opts: &OpenOptions) -> Result<()> {
        if let Some(forced) = opts.format.filter(|&f| f != Format::Vhdx) {
            return Err(Error::FormatMismatch {
                path: self.path.clone(),
                asked: forced,
                found: Some(Format::Vhdx),
            });
        }
        let vopts =
            crate::vhdx::VhdxOptions::new().max_bat_entries(opts.max_bat_entries.saturating_mul(2));
        let src = Box::new(vhdx::Source(Arc::clone(&self.storage)));
        let v = if self.diag.is_some() {
            // Check mode: every problem the VHDX reader can look past.
            let c = crate::vhdx::Vhdx::check_source(src, &self.path, &vopts);
            for e in c.errors {
                self.report(e)?;
            }
            self.diag_dropped += c.unlisted;
            c.vhdx?
        } else {
            crate::vhdx::Vhdx::from_source_named(src, &self.path, &vopts)?
        };
        let v = Arc::new(v);
        self.virtual_size = v.virtual_size();
        self.data_end = self.file_len;
        // The reader's warnings come with their code and place.
        self.warnings
            .extend(v.located_warnings().iter().map(|l| Warning {
                code: l.code,
                message: l.message.clone(),
                structure: Some(Structure::Vhdx(l.structure)),
                field: Some(l.field),
                offset: Some(l.offset),
            }));
        if let Some(r) = v.log_replay() {
            self.warnings.push(Warning::new(
                "vhdx-log-replayed",
                format!(
                    "the disk was not closed cleanly: {} log entries were replayed in memory \
                     (the file was not changed)",
                    r.entries
                ),
            ));
        }
        self.storage = Arc::new(vhdx::OverlaidStorage {
            vhdx: Arc::clone(&v),
            inner: Arc::clone(&self.storage),
        });
        self.layout = Layout::Vhdx(v);
        Ok(())
    }

    /// Reads and validates the dynamic header and the BAT.
    fn load_dynamic(
        &mut self,
        opts: &OpenOptions,
        foot_at: u64,
        vhd: Vhd,
        format: Format,
    ) -> Result<()> {
        let footer = &vhd.footer;
        let end = self.data_end;
        let hdr_at = footer.data_offset;
        let footer_structure = if vhd.source == FooterSource::Copy {
            Structure::FooterCopy
        } else {
            Structure::Footer
        };
        if hdr_at < SECTOR
            || hdr_at
                .checked_add(HEADER_SIZE as u64)
                .is_none_or(|e| e > end)
        {
            return Err(Error::corrupt(
                footer_structure,
                "data offset",
                foot_at + ff::DATA_OFFSET as u64,
                format!("{hdr_at:#x}"),
                // A range only where one exists: a file too short for any
                // header says so instead of "between 512 and 0".
                match end.checked_sub(HEADER_SIZE as u64).filter(|&l| l >= SECTOR) {
                    Some(last) => {
                        format!("the offset of a 1024-byte dynamic header between 512 and {last}")
                    }
                    None => format!(
                        "the offset of a 1024-byte dynamic header from 512 on, in a file too \
                         short for one ({end} bytes in front of the footer; a header needs {})",
                        SECTOR + HEADER_SIZE as u64
                    ),
                },
            ));
        }
        let bytes: [u8; HEADER_SIZE] =
            read_array(&*self.storage, hdr_at).map_err(self.io_at("read", hdr_at))?;
        let header = DynamicHeader::parse(&bytes, hdr_at)?;
        if let Err(e) = DynamicHeader::verify_checksum(&bytes, hdr_at) {
            if opts.ignore_checksums {
                self.warnings.push(
                    Warning::new("checksum-ignored", format!("{e} (ignored on request)"))
                        .at(Structure::DynamicHeader, hdr_at),
                );
            } else {
                self.report(e)?;
            }
        }
        let bs = header.block_size;
        if bs < 512 || !bs.is_power_of_two() {
            return Err(Error::corrupt(
                Structure::DynamicHeader,
                "block size",
                hdr_at + hf::BLOCK_SIZE as u64,
                bs,
                "a power of two of at least 512",
            ));
        }
        let n = u64::from(header.max_table_entries);
        if n > opts.max_bat_entries {
            return Err(Error::Limit {
                path: self.path.clone(),
                what: crate::error::LimitOf::BatEntries,
                value: n,
                limit: opts.max_bat_entries,
            });
        }
        let size = footer.current_size;
        let needed = size.div_ceil(u64::from(bs));
        if n < needed {
            self.report(Error::corrupt(
                Structure::DynamicHeader,
                "max table entries",
                hdr_at + hf::MAX_TABLE_ENTRIES as u64,
                n,
                format!("at least {needed}, to cover the current size {size} in blocks of {bs}"),
            ))?;
        }
        let tbl = header.table_offset;
        let bat_len = n * 4;
        if tbl < SECTOR || tbl.checked_add(bat_len).is_none_or(|e| e > end) {
            return Err(Error::corrupt(
                Structure::DynamicHeader,
                "table offset",
                hdr_at + hf::TABLE_OFFSET as u64,
                format!("{tbl:#x}"),
                match end.checked_sub(bat_len).filter(|&l| l >= SECTOR) {
                    Some(last) => format!(
                        "an offset between 512 and {last}, where the {bat_len} bytes of BAT fit \
                         in front of the footer at {end}"
                    ),
                    None => format!(
                        "an offset from 512 on where the {bat_len} bytes of BAT fit, in a file \
                         too short for them ({end} bytes in front of the footer)"
                    ),
                },
            ));
        }
        // bat_len <= file length here, so this allocation is bounded by the file.
        let mut raw = vec![0u8; bat_len as usize];
        ReadAt::read_exact_at(&*self.storage, &mut raw, tbl).map_err(self.io_at("read", tbl))?;
        let bat = Bat::parse(&raw);
        let sizes = (u64::from(bs), bitmap_size(bs));
        let differencing = format == Format::Differencing;
        self.validate_layout(&header, hdr_at, &bat, needed, sizes, differencing)?;
        let dynamic = Box::new(Dynamic {
            bitmap_state: (0..bat.entries.len()).map(|_| AtomicU8::new(0)).collect(),
            header,
            header_offset: hdr_at,
            bat,
            block_size: sizes.0,
            bitmap_size: sizes.1,
        });
        self.layout = if differencing {
            Layout::Differencing(vhd, dynamic)
        } else {
            Layout::Dynamic(vhd, dynamic)
        };
        Ok(())
    }

    /// Every allocated block lies inside the file and overlaps neither the
    /// metadata nor another block.
    fn validate_layout(
        &mut self,
        header: &DynamicHeader,
        hdr_at: u64,
        bat: &Bat,
        needed: u64,
        (bs, bm): (u64, u64),
        differencing: bool,
    ) -> Result<()> {
        let tbl = header.table_offset;
        // The metadata among itself first: a BAT over the header, say, makes
        // every entry read from it meaningless.
        let mut meta =
            metadata_regions(self, header, hdr_at, differencing, bat.entries.len() as u64);
        meta.sort_by_key(|r| (r.start, r.end));
        self.report_overlaps(header, hdr_at, meta.iter().cloned(), false)?;
        // Then the blocks. They are kept as indices sorted by file offset, 4
        // bytes per block: the BAT may hold millions of entries, and the
        // bookkeeping must stay within the size of the BAT itself.
        let in_disk = |&(i, e): &(usize, &u32)| *e != UNALLOCATED && (i as u64) < needed;
        let count = bat.entries.iter().enumerate().filter(in_disk).count();
        let mut blocks: Vec<u32> = Vec::with_capacity(count);
        for (i, &e) in bat.entries.iter().enumerate().filter(in_disk) {
            let (_, end) = block_span_of(self.virtual_size, bs, bm, i as u64, e);
            if end > self.data_end {
                self.report(Error::corrupt(
                    Structure::BatEntry(i as u64),
                    "block sector offset",
                    tbl + 4 * i as u64,
                    format!("sector {e} (block ends at {end})"),
                    format!(
                        "a block that ends inside the data area (before {})",
                        self.data_end
                    ),
                ))?;
                continue;
            }
            // Entries number at most u32::MAX (the field is a u32).
            blocks.push(i as u32);
        }
        let size = self.virtual_size;
        let span = |i: u32| block_span_of(size, bs, bm, u64::from(i), bat.entries[i as usize]);
        blocks.sort_unstable_by_key(|&i| (span(i), i));
        // Metadata and blocks merged in (start, end) order.
        let mut meta = meta.into_iter().peekable();
        let mut blocks = blocks.into_iter().peekable();
        let merged = std::iter::from_fn(move || {
            let next_block = blocks.peek().map(|&i| (span(i), i));
            match (meta.peek(), next_block) {
                (Some(m), Some(((s, e), _))) if (m.start, m.end) <= (s, e) => meta.next(),
                (_, Some(((start, end), i))) => {
                    blocks.next();
                    Some(Region {
                        start,
                        end,
                        what: RegionKind::Block(u64::from(i)),
                    })
                }
                (Some(_), None) => meta.next(),
                (None, None) => None,
            }
        });
        self.report_overlaps(header, hdr_at, merged, true)
    }

    /// Reports regions (in `(start, end)` order) that overlap: each against
    /// the one reaching furthest before it. With `blocks_only`, overlaps
    /// between two pieces of metadata are left out (already reported).
    fn report_overlaps(
        &mut self,
        header: &DynamicHeader,
        hdr_at: u64,
        regions: impl Iterator<Item = Region>,
        blocks_only: bool,
    ) -> Result<()> {
        // Who is to blame for an overlap: a block before a locator before
        // the rest (the BAT's place is the table offset's doing).
        let rank = |r: &Region| match r.what {
            RegionKind::Block(_) => 2,
            RegionKind::Locator(_) => 1,
            _ => 0,
        };
        let mut reach: Option<Region> = None;
        for r in regions {
            if let Some(a) = &reach {
                if a.end > r.start && (!blocks_only || rank(a) == 2 || rank(&r) == 2) {
                    let (culprit, other) = if rank(&r) >= rank(a) {
                        (&r, a)
                    } else {
                        (a, &r)
                    };
                    let (structure, field, at) = match culprit.what {
                        RegionKind::Block(i) => (
                            Structure::BatEntry(i),
                            "block sector offset",
                            crate::ondisk::placement::bat_entry_at(header.table_offset, i),
                        ),
                        RegionKind::Locator(i) => (
                            Structure::ParentLocator(i),
                            "platform data offset",
                            hdr_at
                                + (hf::PARENT_LOCATORS
                                    + hf::LOCATOR_SIZE * i
                                    + hf::LOCATOR_DATA_OFFSET)
                                    as u64,
                        ),
                        _ => (
                            Structure::DynamicHeader,
                            "table offset",
                            hdr_at + hf::TABLE_OFFSET as u64,
                        ),
                    };
                    let e = Error::overlap(
                        structure,
                        field,
                        at,
                        format!(
                            "{} at {}..{} overlapping {} at {}..{}",
                            culprit.what,
                            culprit.start,
                            culprit.end,
                            other.what,
                            other.start,
                            other.end
                        ),
                        "no overlap between blocks and metadata",
                    );
                    self.report(e)?;
                }
            }
            if reach.as_ref().is_none_or(|a| r.end > a.end) {
                reach = Some(r);
            }
        }
        Ok(())
    }

    /// File bytes that block `i` (BAT entry `e`) must occupy: its bitmap and
    /// the sectors of its data that lie inside the virtual disk.
    pub(crate) fn block_span(&self, i: u64, e: u32) -> (u64, u64) {
        block_span_of(
            self.virtual_size,
            self.block_size(),
            self.bitmap_size(),
            i,
            e,
        )
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The local file the image is read from; `None` for an image over
    /// another storage (bytes in memory, say).
    pub fn file(&self) -> Option<&File> {
        self.storage.file()
    }
    /// The local file, for the operations that need one (in-place rewrites,
    /// hole punching); an error naming `op` for an image over another storage.
    pub(crate) fn local_file(&self, op: &'static str) -> Result<&File> {
        self.file().ok_or_else(|| {
            Error::io(
                &self.path,
                op,
                std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "the image is not a local file",
                ),
            )
        })
    }
    /// The footer of a VHD; an error for a raw image (for operations that
    /// need one).
    pub(crate) fn vhd_footer(&self) -> Result<&Footer> {
        self.footer().ok_or_else(|| self.not_a("VHD"))
    }
    /// The dynamic header and BAT of a dynamic or differencing image; an
    /// error for the others.
    pub(crate) fn dynamic_parts(&self) -> Result<(&DynamicHeader, &Bat)> {
        self.dynamic()
            .map(|d| (&d.header, &d.bat))
            .ok_or_else(|| self.not_a("dynamic or differencing VHD"))
    }
    /// The structures of a dynamic or differencing image.
    pub(crate) fn dynamic(&self) -> Option<&Dynamic> {
        match &self.layout {
            Layout::Dynamic(_, d) | Layout::Differencing(_, d) => Some(d),
            Layout::Raw | Layout::Fixed(_) | Layout::Vhdx(_) => None,
        }
    }
    /// The VHDX structures of an image opened from a VHDX file.
    pub fn vhdx(&self) -> Option<&crate::vhdx::Vhdx> {
        match &self.layout {
            Layout::Vhdx(v) => Some(v),
            _ => None,
        }
    }
    /// The footer in force and its source (VHDs).
    fn vhd(&self) -> Option<&Vhd> {
        match &self.layout {
            Layout::Fixed(v) | Layout::Dynamic(v, _) | Layout::Differencing(v, _) => Some(v),
            Layout::Raw | Layout::Vhdx(_) => None,
        }
    }
    fn not_a(&self, what: &str) -> Error {
        Error::wrong_kind(
            &self.path,
            "rewrite in place",
            self.disk_type(),
            format!("a {} image, not a {what}", self.disk_type()),
        )
    }
    /// The storage the image is read from.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }
    /// Bytes the filesystem has allocated to the image's file; `None` when
    /// the image is not over a local file or the filesystem cannot tell.
    pub fn allocated_file_bytes(&self) -> Option<u64> {
        crate::io::allocated_bytes(self.file()?).ok()
    }
    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
    /// Raw, fixed, dynamic or differencing.
    pub fn disk_type(&self) -> Format {
        match self.layout {
            Layout::Raw => Format::Raw,
            Layout::Fixed(_) => Format::Fixed,
            Layout::Dynamic(..) => Format::Dynamic,
            Layout::Differencing(..) => Format::Differencing,
            Layout::Vhdx(_) => Format::Vhdx,
        }
    }
    /// True for a disk whose holes read from a parent: a differencing VHD,
    /// or a VHDX whose file parameters say it has a parent.
    pub fn is_differencing(&self) -> bool {
        match &self.layout {
            Layout::Differencing(..) => true,
            Layout::Vhdx(v) => v.disk_type() == crate::vhdx::DiskType::Differencing,
            _ => false,
        }
    }
    /// The virtual disk's size in bytes: the footer's current size (the
    /// file's length for raw images).
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    /// The footer in force (None for raw images).
    pub fn footer(&self) -> Option<&Footer> {
        self.vhd().map(|v| &v.footer)
    }
    /// Where the footer in force was read from.
    pub fn footer_source(&self) -> Option<FooterSource> {
        self.vhd().map(|v| v.source)
    }
    /// The offset where the data area ends (the end footer's offset).
    pub fn data_end(&self) -> u64 {
        self.data_end
    }
    /// The dynamic header (dynamic and differencing images).
    pub fn header(&self) -> Option<&DynamicHeader> {
        self.dynamic().map(|d| &d.header)
    }
    /// Absolute offset of the dynamic header.
    pub fn header_offset(&self) -> u64 {
        self.dynamic().map_or(0, |d| d.header_offset)
    }
    /// The block allocation table (dynamic and differencing images).
    pub fn bat(&self) -> Option<&Bat> {
        self.dynamic().map(|d| &d.bat)
    }
    /// Bytes of data per block (0 for raw and fixed images; a VHDX's
    /// payload block size).
    pub fn block_size(&self) -> u64 {
        if let Layout::Vhdx(v) = &self.layout {
            return v.block_size();
        }
        self.dynamic().map_or(0, |d| d.block_size)
    }
    /// Bytes of sector bitmap in front of each block.
    pub fn bitmap_size(&self) -> u64 {
        self.dynamic().map_or(0, |d| d.bitmap_size)
    }
    /// Blocks that cover the virtual disk.
    pub fn block_count(&self) -> u64 {
        match self.dynamic() {
            Some(d) => self.virtual_size.div_ceil(d.block_size),
            None => 0,
        }
    }
    /// The parent of a differencing disk.
    pub fn parent(&self) -> Option<&Image> {
        self.parent.as_deref()
    }
    /// True when the parent was not found and reads as zeros
    /// ([`OpenOptions::missing_parent_as_zero`]).
    pub fn parent_missing(&self) -> bool {
        self.parent_missing
    }
    /// This image followed by its parents, nearest first.
    pub fn chain(&self) -> Vec<&Image> {
        let mut v = vec![self];
        while let Some(p) = v.last().and_then(|i| i.parent()) {
            v.push(p);
        }
        v
    }
    /// The image at `layer` of the chain (0 is this one).
    pub fn layer(&self, layer: usize) -> Option<&Image> {
        let mut img = self;
        for _ in 0..layer {
            img = img.parent()?;
        }
        Some(img)
    }
    /// Things that were odd but did not stop the open (a damaged end footer
    /// replaced by its copy, a checksum ignored on request, padding).
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }
    /// Allocated blocks (those inside the virtual disk).
    pub fn allocated_blocks(&self) -> u64 {
        match self.bat() {
            Some(b) => b
                .entries
                .iter()
                .take(self.block_count() as usize)
                .filter(|&&e| e != UNALLOCATED)
                .count() as u64,
            None => 0,
        }
    }
}

/// [`Image::block_span`] from the image's sizes: the file bytes block `i`
/// (BAT entry `e`) occupies, its bitmap and its sectors inside the disk.
fn block_span_of(
    virtual_size: u64,
    block_size: u64,
    bitmap_size: u64,
    i: u64,
    e: u32,
) -> (u64, u64) {
    let start = crate::ondisk::entry_offset(e);
    let in_disk = virtual_size
        .saturating_sub(i.saturating_mul(block_size))
        .min(block_size);
    let data = in_disk.div_ceil(SECTOR) * SECTOR;
    // At most (2^32 - 1) * 512 + 512 KiB + 2 GiB: no overflow.
    (start, start + bitmap_size + data)
}

/// A byte range of the file that belongs to one structure.
#[derive(Debug, Clone)]
pub(crate) struct Region {
    pub start: u64,
    pub end: u64,
    pub what: RegionKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RegionKind {
    FooterCopy,
    Header,
    Bat,
    Locator(usize),
    Footer,
    Block(u64),
}

impl std::fmt::Display for RegionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegionKind::FooterCopy => f.write_str("footer copy"),
            RegionKind::Header => f.write_str("dynamic header"),
            RegionKind::Bat => f.write_str("BAT"),
            RegionKind::Locator(i) => write!(f, "parent locator {i} data"),
            RegionKind::Footer => f.write_str("footer"),
            RegionKind::Block(i) => write!(f, "block {i}"),
        }
    }
}

/// The metadata of a dynamic image as file regions. Locator data is listed
/// only for differencing disks and only where it lies inside the file.
pub(crate) fn metadata_regions(
    img: &Image,
    header: &DynamicHeader,
    header_offset: u64,
    differencing: bool,
    entries: u64,
) -> Vec<Region> {
    let mut r = vec![
        Region {
            start: 0,
            end: SECTOR,
            what: RegionKind::FooterCopy,
        },
        // Saturating: callers may pass a header that failed validation.
        Region {
            start: header_offset,
            end: header_offset.saturating_add(HEADER_SIZE as u64),
            what: RegionKind::Header,
        },
        Region {
            start: header.table_offset,
            end: crate::ondisk::placement::bat_entry_at(header.table_offset, entries),
            what: RegionKind::Bat,
        },
    ];
    if differencing {
        for (i, l) in header.parent_locators.iter().enumerate() {
            let end = l.data_offset.saturating_add(u64::from(l.data_length));
            if !l.is_empty() && l.data_length > 0 && end <= img.data_end {
                r.push(Region {
                    start: l.data_offset,
                    end,
                    what: RegionKind::Locator(i),
                });
            }
        }
    }
    if img.data_end < img.file_len {
        r.push(Region {
            start: img.data_end,
            end: img.file_len,
            what: RegionKind::Footer,
        });
    }
    r
}
