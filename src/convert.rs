//! Conversion between raw, fixed and dynamic images, writing sparse outputs.
//!
//! The walk: the input's map (parents resolved, filesystem holes and
//! unallocated blocks already `Zero`) is taken a window at a time, so memory
//! stays flat however large the disk. Data extents are cut into chunks that
//! rayon workers scan for zero pages and write with positional I/O; zero
//! extents cost nothing. A dynamic output first learns which of its blocks
//! hold any non-zero byte (a scan that stops at the first one), gives those
//! blocks file slots in block order, then copies. Everything is written to a
//! temporary file beside the target, synced, and renamed into place.

use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use crate::ondisk::{DiskType, SECTOR};
use crate::sinks::dynamic::DynamicFileSink;
use crate::sinks::fixed::FixedFileSink;
use crate::sinks::raw::RawFileSink;
use crate::sinks::FileSink;
use crate::walk::{self, CancelToken, Control, Event};
use crate::write::{self, AtomicOutput, DynamicLayout};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::walk::{cancel_all, clear_cancel};

/// The kind of image to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target {
    /// A plain disk image (sparse: zero pages are holes).
    Raw,
    /// A fixed VHD: the raw disk and a footer.
    Fixed,
    /// A dynamic VHD: only non-zero blocks are stored.
    Dynamic,
}

/// Receives progress of a long operation, in bytes of the virtual disk.
///
/// A conversion calls [`start`](Progress::start) once with the input's
/// virtual size, then [`advance`](Progress::advance) until the advances add
/// up to exactly that size: zero regions as they are passed, data as it has
/// been written (or found to be zero). [`written`](Progress::written)
/// reports, besides, the bytes of data actually written to the output, so
/// that a sparse input can show both rates (virtual and written).
pub trait Progress: Send + Sync {
    /// The total, known once the input is open.
    fn start(&self, total: u64);
    /// `bytes` more of the virtual disk are done.
    fn advance(&self, bytes: u64);
    /// `bytes` of data were written to the output (called from the writer
    /// thread; metadata is not counted). The default does nothing.
    fn written(&self, bytes: u64) {
        let _ = bytes;
    }
}

/// The most worker threads a conversion accepts: 256, or 4 per core where
/// that is more. Threads beyond the cores only wait on I/O, and each costs
/// a stack and a start-up: thousands of them make a conversion slower and
/// slow to answer Ctrl-C.
pub fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.saturating_mul(4).max(256)
}

/// How to convert.
#[derive(Clone)]
pub struct ConvertOptions {
    pub(crate) target: Target,
    pub(crate) block_size: u32,
    pub(crate) threads: Option<usize>,
    pub(crate) sparse: bool,
    pub(crate) azure: bool,
    pub(crate) overwrite: bool,
    pub(crate) sync: bool,
    pub(crate) identity: Option<crate::ondisk::Footer>,
    pub(crate) size: Option<u64>,
    pub(crate) open: OpenOptions,
    pub(crate) progress: Option<Arc<dyn Progress>>,
    pub(crate) cancel: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for ConvertOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("target", &self.target)
            .field("block_size", &self.block_size)
            .field("threads", &self.threads)
            .field("sparse", &self.sparse)
            .field("azure", &self.azure)
            .field("overwrite", &self.overwrite)
            .field("sync", &self.sync)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl ConvertOptions {
    /// Defaults: 2 MiB blocks, all cores, sparse output, no Azure sizing,
    /// an existing output is not replaced.
    pub fn new(target: Target) -> Self {
        ConvertOptions {
            target,
            block_size: write::DEFAULT_BLOCK_SIZE,
            threads: None,
            sparse: true,
            azure: false,
            overwrite: false,
            sync: true,
            identity: None,
            size: None,
            open: OpenOptions::default(),
            progress: None,
            cancel: None,
        }
    }
    /// Block size of a dynamic output: a power of two from 512 KiB to 256 MiB.
    pub fn block_size(mut self, bytes: u32) -> Self {
        self.block_size = bytes;
        self
    }
    /// Worker threads (default: one per core); at most [`max_threads`].
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = Some(n);
        self
    }
    /// Leave zero regions unwritten (default on). Off, every byte of a raw
    /// or fixed output is allocated, and a dynamic output keeps every block
    /// the input had allocated.
    pub fn sparse(mut self, yes: bool) -> Self {
        self.sparse = yes;
        self
    }
    /// Prepare for Azure: a fixed VHD whose size is rounded up to a whole MiB.
    pub fn azure(mut self, yes: bool) -> Self {
        self.azure = yes;
        self
    }
    /// Replace an existing output.
    pub fn overwrite(mut self, yes: bool) -> Self {
        self.overwrite = yes;
        self
    }
    /// Sync the output to disk before renaming it into place (default on).
    /// Off, the output is complete and renamed atomically, but a power
    /// failure soon after may lose data that was still in the page cache.
    pub fn sync(mut self, yes: bool) -> Self {
        self.sync = yes;
        self
    }
    /// Write the output under this footer's identity (unique id, creator,
    /// timestamp, original size), for rewrites of an image in place.
    pub fn identity(mut self, footer: crate::ondisk::Footer) -> Self {
        self.identity = Some(footer);
        self
    }
    /// Make the output this many bytes (at least the input's virtual size;
    /// the extra reads as zeros). Never cuts data.
    pub fn virtual_size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }
    /// How to open the input (parents, checksum policy, limits).
    pub fn open_options(mut self, o: OpenOptions) -> Self {
        self.open = o;
        self
    }
    /// Receives progress.
    pub fn progress(mut self, p: Arc<dyn Progress>) -> Self {
        self.progress = Some(p);
        self
    }
    /// Stops the conversion, leaving no output, when set.
    pub fn cancel_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    fn validate(&self, output: Output) -> Result<()> {
        let bs = self.block_size;
        // A rewrite in place keeps whatever block size the image has.
        let range = if output == Output::Replace {
            512..=u32::MAX
        } else {
            write::MIN_BLOCK_SIZE..=write::MAX_BLOCK_SIZE
        };
        if !bs.is_power_of_two() || !range.contains(&bs) {
            return Err(Error::invalid_option(
                "block size",
                bs,
                format!("block size {bs}: must be a power of two from 512 KiB to 256 MiB"),
            ));
        }
        if self.azure && self.target != Target::Fixed {
            return Err(Error::invalid_option(
                "azure",
                format!("{:?}", self.target).to_lowercase(),
                "Azure takes fixed VHDs only: Azure sizing goes with a fixed target",
            ));
        }
        if self.threads == Some(0) {
            return Err(Error::invalid_option(
                "threads",
                0,
                "threads must be at least 1",
            ));
        }
        if let Some(n) = self.threads.filter(|&n| n > max_threads()) {
            return Err(Error::invalid_option(
                "threads",
                n,
                format!(
                    "{n} threads is over the limit of {} (256, or 4 per core where that is more)",
                    max_threads()
                ),
            ));
        }
        Ok(())
    }
}

/// What a conversion did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The output's virtual size.
    pub virtual_size: u64,
    /// Bytes read from the input (data only; zeros the map knows are not read).
    pub bytes_read: u64,
    /// Bytes written to the output, metadata included.
    pub bytes_written: u64,
    /// Bytes of the virtual disk skipped as zero.
    pub bytes_skipped: u64,
    /// The output file's length.
    pub output_len: u64,
    /// Blocks stored, for a dynamic output.
    pub allocated_blocks: Option<u64>,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// The size asked for (the input's virtual size, unless
    /// [`ConvertOptions::virtual_size`] set one) when the output's was rounded up from it:
    /// to a whole number of 512-byte sectors (every VHD vhdkit writes has
    /// one), or to a whole MiB for Azure. The bytes added read as zeros.
    pub rounded_from: Option<u64>,
    /// Things the caller should know about the output (a size rounded up).
    pub warnings: Vec<String>,
}

/// Converts the image at `input` into `output`.
///
/// # Errors
/// Any error opening the input ([`Image::open_with`]); [`Error::InvalidOption`]
/// for bad options or an input too large for the target;
/// [`Error::OutputRefused`] for an output that is the input (or one of its
/// parents), a directory or a FIFO; [`Error::OutputExists`] without
/// overwrite; [`Error::Interrupted`] when the cancel flag is set; I/O errors.
/// On every error no file is left at `output`.
pub fn convert(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    opts: &ConvertOptions,
) -> Result<Report> {
    opts.validate(Output::New)?;
    let img = Image::open_with(input.as_ref(), &opts.open)?;
    convert_image(&img, output.as_ref(), opts)
}

/// True when `a` and `b` are the same file (device and inode).
pub(crate) fn same_file(a: &File, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Refuses an output that is the input or one of its parents.
pub(crate) fn refuse_self(img: &Image, output: &Path) -> Result<()> {
    for layer in img.chain() {
        if layer.file().is_some_and(|f| same_file(f, output)) {
            return Err(Error::refused(
                output,
                format!(
                    "the output is the input{}; write to another file",
                    if std::ptr::eq(layer, img) {
                        ""
                    } else {
                        "'s parent"
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// Where a conversion writes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// A new file (or an existing one, with overwrite): never the input.
    New,
    /// The input itself, replaced by a rename (sparsify's and resize's
    /// rewrites): any block size the image has is kept.
    Replace,
}

/// Converts an open image into `output`.
///
/// # Errors
/// As [`convert`], but for opening the input.
pub fn convert_image(
    img: &Image,
    output: impl AsRef<Path>,
    opts: &ConvertOptions,
) -> Result<Report> {
    let output = output.as_ref();
    convert_into(img, output, opts, Output::New)
}

/// [`convert_image`], or a rewrite of the image over itself.
pub(crate) fn convert_into(
    img: &Image,
    output: &Path,
    opts: &ConvertOptions,
    to: Output,
) -> Result<Report> {
    opts.validate(to)?;
    let started = Instant::now();
    if to == Output::New {
        refuse_self(img, output)?;
    }
    let input_size = img.virtual_size();
    let wanted = opts.size.unwrap_or(input_size);
    if wanted < input_size {
        return Err(Error::invalid_option(
            "size",
            wanted,
            format!(
                "output size {wanted} is smaller than the input's {input_size} bytes; conversion never cuts data"
            ),
        ));
    }
    // Every VHD written has a size of whole 512-byte sectors: a reader that
    // counts sectors (qemu-img) would otherwise lose the tail, and a fixed
    // disk's footer would sit off a sector boundary. Raw outputs keep the
    // exact size.
    let mut warnings = Vec::new();
    let sectors = if opts.target != Target::Raw && wanted % SECTOR != 0 {
        let up = wanted.div_ceil(SECTOR) * SECTOR;
        warnings.push(format!(
            "the size, {wanted} bytes, is not a whole number of 512-byte sectors: rounded up to \
             {up} bytes, the last {} of them zeros",
            up - wanted
        ));
        up
    } else {
        wanted
    };
    let size = if opts.azure {
        write::azure_size(sectors)
    } else {
        sectors
    };
    let rounded_from = (size != wanted).then_some(wanted);
    if opts.target != Target::Raw && size > write::MAX_VHD_SIZE {
        return Err(Error::invalid_option_for(
            img.path(),
            "size",
            size,
            format!(
                "{size} bytes is larger than a VHD can hold ({} bytes, 2040 GiB)",
                write::MAX_VHD_SIZE
            ),
        ));
    }
    let out = if to == Output::Replace {
        AtomicOutput::rewrite(output)?
    } else {
        AtomicOutput::create(output, opts.overwrite)?
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::Io {
            path: None,
            op: "start the thread pool",
            offset: None,
            source: std::io::Error::other(e),
        })?;
    let progress = |e: Event| {
        if let Some(p) = &opts.progress {
            match e {
                Event::Start(n) => p.start(n),
                Event::Advance(n) => p.advance(n),
                Event::Written(n) => p.written(n),
            }
        }
    };
    let token = opts.cancel.clone().map(CancelToken::from_flag);
    let mut ctl = Control::new().progress(&progress);
    if let Some(t) = &token {
        ctl = ctl.cancel(t);
    }
    ctl.event(Event::Start(input_size));
    let (sparse, sync) = (opts.sparse, opts.sync);
    let mut sink: Box<dyn FileSink> = match opts.target {
        Target::Raw => Box::new(RawFileSink::new(out, size, 0, sparse, sync)?),
        Target::Fixed => {
            let footer = output_footer(opts, DiskType::Fixed, size);
            Box::new(FixedFileSink::new(out, footer, sparse, sync)?)
        }
        Target::Dynamic => {
            let layout = DynamicLayout::new(size, opts.block_size);
            let footer = output_footer(opts, DiskType::Dynamic, size);
            Box::new(DynamicFileSink::new(out, layout, footer, sparse, sync)?)
        }
    };
    let (copied, finished) = pool.install(|| -> Result<_> {
        let copied = walk::copy(img, &*sink, sparse, &ctl)?;
        Ok((copied, sink.finish()?))
    })?;
    ctl.check()?;
    sink.commit(sync)?;
    let data_written = copied.written;
    let output_len = finished.output_len;
    let allocated_blocks = finished.allocated_blocks;
    let written = data_written + finished.metadata;
    Ok(Report {
        virtual_size: size,
        bytes_read: copied.read,
        bytes_written: written,
        bytes_skipped: size - data_written.min(size),
        output_len,
        allocated_blocks,
        elapsed: started.elapsed(),
        rounded_from,
        warnings,
    })
}

/// The footer of a new output: fresh, or under the identity asked for.
fn output_footer(opts: &ConvertOptions, disk_type: DiskType, size: u64) -> crate::ondisk::Footer {
    let fresh = write::new_footer(disk_type, size);
    match &opts.identity {
        Some(id) => {
            let f = if id.current_size == size {
                id.clone()
            } else {
                id.resized(size)
            };
            crate::ondisk::Footer {
                disk_type,
                data_offset: fresh.data_offset,
                ..f
            }
        }
        None => fresh,
    }
}
