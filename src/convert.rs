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
use crate::image::{Extent, ExtentKind, Image, OpenOptions};
use crate::io::WriteAt;
use crate::ondisk::{Bat, DiskType, FOOTER_SIZE, SECTOR, UNALLOCATED};
use crate::scan::{is_zero, nonzero_runs, ZERO_UNIT};
use crate::storage::with_bytes;
use crate::write::{self, AtomicOutput, DynamicLayout};
use rayon::prelude::*;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The kind of image to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// The output replaces the input itself (sparsify, resize).
    pub(crate) rewrite: bool,
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
            rewrite: false,
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

    fn validate(&self) -> Result<()> {
        let bs = self.block_size;
        // A rewrite in place keeps whatever block size the image has.
        let range = if self.rewrite {
            512..=u32::MAX
        } else {
            write::MIN_BLOCK_SIZE..=write::MAX_BLOCK_SIZE
        };
        if !bs.is_power_of_two() || !range.contains(&bs) {
            return Err(Error::InvalidArgument(format!(
                "block size {bs}: must be a power of two from 512 KiB to 256 MiB"
            )));
        }
        if self.azure && self.target != Target::Fixed {
            return Err(Error::InvalidArgument(
                "Azure takes fixed VHDs only: Azure sizing goes with a fixed target".into(),
            ));
        }
        if self.threads == Some(0) {
            return Err(Error::InvalidArgument("threads must be at least 1".into()));
        }
        if let Some(n) = self.threads.filter(|&n| n > max_threads()) {
            return Err(Error::InvalidArgument(format!(
                "{n} threads is over the limit of {} (256, or 4 per core where that is more)",
                max_threads()
            )));
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
/// Any error opening the input ([`Image::open_with`]); [`Error::InvalidArgument`]
/// for bad options, an input too large for the target, or an output that is
/// the input (or one of its parents); [`Error::OutputExists`] without
/// overwrite; [`Error::Interrupted`] when the cancel flag is set; I/O errors.
/// On every error no file is left at `output`.
pub fn convert(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    opts: &ConvertOptions,
) -> Result<Report> {
    opts.validate()?;
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
            return Err(Error::InvalidArgument(format!(
                "{}: the output is the input{}; write to another file",
                output.display(),
                if std::ptr::eq(layer, img) {
                    ""
                } else {
                    "'s parent"
                }
            )));
        }
    }
    Ok(())
}

/// Converts an open image into `output`.
pub fn convert_image(img: &Image, output: &Path, opts: &ConvertOptions) -> Result<Report> {
    opts.validate()?;
    let started = Instant::now();
    if !opts.rewrite {
        refuse_self(img, output)?;
    }
    let input_size = img.virtual_size();
    let wanted = opts.size.unwrap_or(input_size);
    if wanted < input_size {
        return Err(Error::InvalidArgument(format!(
            "output size {wanted} is smaller than the input's {input_size} bytes; conversion never cuts data"
        )));
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
        return Err(Error::InvalidArgument(format!(
            "{}: {size} bytes is larger than a VHD can hold ({} bytes, 2040 GiB)",
            img.path().display(),
            write::MAX_VHD_SIZE
        )));
    }
    let out = if opts.rewrite {
        AtomicOutput::rewrite(output)?
    } else {
        AtomicOutput::create(output, opts.overwrite)?
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::InvalidArgument(format!("thread pool: {e}")))?;
    if let Some(p) = &opts.progress {
        p.start(input_size);
    }
    let stats = Stats::default();
    let file = out.file();
    let (output_len, allocated_blocks) = pool.install(|| -> Result<(u64, Option<u64>)> {
        match opts.target {
            Target::Raw | Target::Fixed => {
                let footer_len = if opts.target == Target::Fixed {
                    FOOTER_SIZE as u64
                } else {
                    0
                };
                let len = size + footer_len;
                out.set_len(len)?;
                // A device's unwritten bytes are not zeros: write them all.
                out.fill_zeros(0, len)?;
                walk(
                    img,
                    opts,
                    &stats,
                    &|_block| Ok(()),
                    &Dest::Linear,
                    file,
                    out.temp_path(),
                )?;
                if !opts.sparse && !out.is_device() {
                    allocate(file, 0, size, out.temp_path())?;
                }
                if opts.target == Target::Fixed {
                    let footer = output_footer(opts, DiskType::Fixed, size);
                    file.write_all_at(&footer.to_bytes(), size)
                        .map_err(|e| Error::io(out.temp_path(), "write footer", e))?;
                    stats
                        .written
                        .fetch_add(FOOTER_SIZE as u64, Ordering::Relaxed);
                }
                Ok((len, None))
            }
            Target::Dynamic => {
                let layout = DynamicLayout::new(size, opts.block_size);
                let slots = std::sync::Mutex::new((Bat::new(layout.entries as usize), 0u64));
                let dest = Dest::Dynamic {
                    layout,
                    slots: &slots,
                };
                // On a device, every byte of the file is written: the
                // metadata area now, each block's slot when it is given.
                out.fill_zeros(0, layout.first_block)?;
                let plan = |blocks: &[(u64, bool)]| -> Result<()> {
                    let mut g = slots.lock().expect("slot lock");
                    for &(b, keep) in blocks {
                        if keep {
                            let slot = g.1;
                            g.0.entries[b as usize] = layout.bat_entry(slot)?;
                            g.1 += 1;
                            out.fill_zeros(layout.block_offset(slot), layout.stride)?;
                        }
                    }
                    Ok(())
                };
                walk(img, opts, &stats, &plan, &dest, file, out.temp_path())?;
                let (bat, allocated) = slots.into_inner().expect("slot lock");
                let len = layout.file_len(allocated);
                out.set_len(len)?;
                let footer = output_footer(opts, DiskType::Dynamic, size);
                let meta = layout
                    .write_metadata(file, &footer, &bat)
                    .map_err(|e| e.with_path(out.temp_path()))?;
                stats.written.fetch_add(meta, Ordering::Relaxed);
                if !opts.sparse && !out.is_device() {
                    for &e in bat.entries.iter().filter(|&&e| e != UNALLOCATED) {
                        let at = u64::from(e) * SECTOR + layout.bitmap_size;
                        allocate(file, at, layout.block_size, out.temp_path())?;
                    }
                }
                Ok((len, Some(allocated)))
            }
        }
    })?;
    check_cancel(opts)?;
    let written = stats.written.load(Ordering::Relaxed);
    let data_written = stats.data_written.load(Ordering::Relaxed);
    out.commit(opts.sync)?;
    Ok(Report {
        virtual_size: size,
        bytes_read: stats.read.load(Ordering::Relaxed),
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

/// Allocates `len` bytes at `at` without writing them (falls back to
/// writing zeros where the filesystem cannot).
fn allocate(file: &File, at: u64, len: u64, path: &Path) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), at, len) {
        Ok(()) => Ok(()),
        Err(_) => {
            let zeros = vec![0u8; 1 << 20];
            let mut pos = at;
            while pos < at + len {
                let n = (at + len - pos).min(zeros.len() as u64);
                file.write_all_at(&zeros[..n as usize], pos)
                    .map_err(|e| Error::io(path, "write", e))?;
                pos += n;
            }
            Ok(())
        }
    }
}

#[derive(Default)]
struct Stats {
    read: AtomicU64,
    written: AtomicU64,
    data_written: AtomicU64,
}

/// Where virtual offsets land in the output.
enum Dest<'a> {
    /// At the same offset (raw and fixed).
    Linear,
    /// In the block's slot (dynamic).
    Dynamic {
        layout: DynamicLayout,
        slots: &'a std::sync::Mutex<(Bat, u64)>,
    },
}

/// Set by [`cancel_all`].
static CANCEL_ALL: AtomicBool = AtomicBool::new(false);

/// Asks every long operation of this process (conversions and the rewrites
/// of sparsify and resize) to stop at its next chunk, removing its partial
/// output and returning [`Error::Interrupted`]. For a Ctrl-C handler. The
/// request stays in force, failing later operations too, until
/// [`clear_cancel`]; a per-operation alternative is
/// [`ConvertOptions::cancel_flag`].
pub fn cancel_all() {
    CANCEL_ALL.store(true, Ordering::SeqCst);
}

/// Withdraws a [`cancel_all`] request, so that new operations run again.
pub fn clear_cancel() {
    CANCEL_ALL.store(false, Ordering::SeqCst);
}

fn check_cancel(opts: &ConvertOptions) -> Result<()> {
    let flagged = opts
        .cancel
        .as_ref()
        .is_some_and(|f| f.load(Ordering::Relaxed));
    if flagged || CANCEL_ALL.load(Ordering::Relaxed) {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// Virtual bytes per window of the walk: the map of one window is held at a time.
const WINDOW: u64 = 256 << 20;
/// Largest chunk one worker scans and writes at a time.
const CHUNK: u64 = 2 << 20;

/// A run of data: virtual range and where it lives.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk {
    pub offset: u64,
    pub len: u64,
    pub layer: usize,
    pub file_offset: u64,
}

/// Cuts the data extents into chunks that do not cross `align` boundaries.
pub(crate) fn chunks(extents: &[Extent], align: u64) -> Vec<Chunk> {
    let mut v = Vec::new();
    for e in extents {
        if let ExtentKind::Data { layer, file_offset } = e.kind {
            let mut pos = e.offset;
            while pos < e.end() {
                let stop = e.end().min((pos / align + 1) * align);
                v.push(Chunk {
                    offset: pos,
                    len: stop - pos,
                    layer,
                    file_offset: file_offset + (pos - e.offset),
                });
                pos = stop;
            }
        }
    }
    v
}

/// Chunks waiting for the writer: bounds the memory held in windows.
const QUEUE: usize = 2;

/// A scanned chunk on its way to the writer.
struct WriteJob {
    data: crate::storage::mmap::Window,
    /// Virtual bytes this chunk covers, reported to progress once written.
    len: u64,
    /// Virtual offset of `data[0]`.
    offset: u64,
    /// Virtual ranges to write.
    runs: Vec<std::ops::Range<u64>>,
    /// Output offset minus virtual offset, for these runs.
    shift: i128,
}

/// Scans chunks in parallel and writes what is not zero from one thread:
/// buffered writers to one file contend on its inode lock, and a single
/// writer keeps the page cache copy running at full speed while the other
/// cores scan ahead.
fn copy_chunks(
    img: &Image,
    opts: &ConvertOptions,
    stats: &Stats,
    dest: &Dest<'_>,
    work: &[Chunk],
    out: &File,
    out_path: &Path,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<WriteJob>(QUEUE);
    std::thread::scope(|s| -> Result<()> {
        let writer = s.spawn(move || -> Result<()> {
            for job in rx {
                // Stop writing as soon as asked (the queued chunks are dropped).
                check_cancel(opts)?;
                let mut wrote = 0;
                for r in &job.runs {
                    let from = (r.start - job.offset) as usize;
                    let to = (r.end - job.offset) as usize;
                    let at = (i128::from(r.start) + job.shift) as u64;
                    out.write_all_at(&job.data[from..to], at)
                        .map_err(|e| Error::io(out_path, "write", e))?;
                    stats
                        .data_written
                        .fetch_add(r.end - r.start, Ordering::Relaxed);
                    wrote += r.end - r.start;
                    if opts.sync {
                        // Start writeback now, so the final sync finds little to do.
                        let _ = rustix::fs::fadvise(
                            out,
                            at,
                            std::num::NonZeroU64::new(r.end - r.start),
                            rustix::fs::Advice::DontNeed,
                        );
                    }
                }
                if let Some(p) = &opts.progress {
                    p.written(wrote);
                    p.advance(job.len);
                }
            }
            Ok(())
        });
        let scanned = work
            .par_iter()
            .try_for_each_with(tx, |tx, c| -> Result<()> {
                check_cancel(opts)?;
                let shift = match dest {
                    Dest::Linear => Some(0i128),
                    Dest::Dynamic { layout, slots } => {
                        let b = c.offset / layout.block_size;
                        let e = slots.lock().expect("slot lock").0.entries[b as usize];
                        (e != UNALLOCATED).then(|| {
                            i128::from(e) * 512 + i128::from(layout.bitmap_size)
                                - i128::from(b * layout.block_size)
                        })
                    }
                };
                if let Some(shift) = shift {
                    let src = img.layer(c.layer).expect("layer");
                    let data = crate::storage::window(src.storage(), c.file_offset, c.len)
                        .map_err(|e| Error::io(src.path(), "read", e))?;
                    stats.read.fetch_add(c.len, Ordering::Relaxed);
                    let mut runs = Vec::new();
                    if opts.sparse {
                        nonzero_runs(&data, c.offset, ZERO_UNIT, &mut runs);
                    } else {
                        runs.push(c.offset..c.offset + c.len);
                    }
                    if !runs.is_empty() {
                        // A closed channel means the writer failed; its error
                        // is reported below. The writer advances the progress
                        // once the chunk is written.
                        let _ = tx.send(WriteJob {
                            data,
                            len: c.len,
                            offset: c.offset,
                            runs,
                            shift,
                        });
                        return Ok(());
                    }
                }
                if let Some(p) = &opts.progress {
                    p.advance(c.len);
                }
                Ok(())
            });
        let written = writer.join().expect("writer thread panicked");
        written?;
        scanned
    })
}

/// Receives, per window, the blocks that hold data: `(block, keep)`.
type PlanFn<'a> = dyn Fn(&[(u64, bool)]) -> Result<()> + Sync + 'a;

/// One window of the walk, mapped and (for dynamic outputs) scanned for
/// the blocks that hold data.
struct Prepared {
    work: Vec<Chunk>,
    /// `(block, holds data)` for each block with data extents, in order.
    blocks: Vec<(u64, bool)>,
    /// Bytes of the window the map already knows to be zero.
    zero_bytes: u64,
}

/// Maps `start..start + len` and, for a dynamic output, finds which blocks
/// hold a non-zero byte (stopping at the first one).
fn prepare(
    img: &Image,
    opts: &ConvertOptions,
    stats: &Stats,
    bs: Option<u64>,
    start: u64,
    len: u64,
) -> Result<Prepared> {
    let align = bs.unwrap_or(CHUNK).min(CHUNK);
    let extents = img.map(start, len)?;
    let work = chunks(&extents, align);
    let zero_bytes = len - work.iter().map(|c| c.len).sum::<u64>();
    let mut blocks: Vec<(u64, bool)> = Vec::new();
    if let Some(bs) = bs {
        for c in &work {
            let b = c.offset / bs;
            if blocks.last().map(|l| l.0) != Some(b) {
                blocks.push((b, true));
            }
        }
        if opts.sparse {
            let flags: Vec<bool> = blocks
                .par_iter()
                .map(|&(b, _)| -> Result<bool> {
                    let lo = work.partition_point(|c| c.offset / bs < b);
                    let hi = work.partition_point(|c| c.offset / bs <= b);
                    block_has_data(img, &work[lo..hi], stats)
                })
                .collect::<Result<_>>()?;
            for (b, f) in blocks.iter_mut().zip(flags) {
                b.1 = f;
            }
        }
    }
    Ok(Prepared {
        work,
        blocks,
        zero_bytes,
    })
}

/// True when any chunk of one block holds a non-zero byte.
fn block_has_data(img: &Image, chunks: &[Chunk], stats: &Stats) -> Result<bool> {
    let mut examined = 0;
    for c in chunks {
        let f = img
            .layer(c.layer)
            .ok_or_else(|| bad_layer(img, c.layer))?
            .storage();
        let mut pos = 0;
        while pos < c.len {
            // Data blocks almost always show a non-zero byte in their first
            // page: one small read settles them without mapping the block.
            let n = if pos == 0 {
                c.len.min(ZERO_UNIT)
            } else {
                (c.len - pos).min(CHUNK)
            };
            let nz = with_bytes(f, c.file_offset + pos, n, |d| !is_zero(d))
                .map_err(|e| Error::io(img.path(), "read", e))?;
            if nz {
                // The copy reads this block again and counts it then.
                return Ok(true);
            }
            examined += n;
            pos += n;
        }
    }
    stats.read.fetch_add(examined, Ordering::Relaxed);
    Ok(false)
}

/// The walk shared by every target: window by window, map, plan the blocks
/// of a dynamic output, copy chunks in parallel. The next window is mapped
/// and scanned while the current one is written, so the zero scan of a
/// dynamic output overlaps the writes.
fn walk(
    img: &Image,
    opts: &ConvertOptions,
    stats: &Stats,
    plan: &PlanFn<'_>,
    dest: &Dest<'_>,
    out: &File,
    out_path: &Path,
) -> Result<()> {
    let size = img.virtual_size();
    let bs = match dest {
        Dest::Dynamic { layout, .. } => Some(layout.block_size),
        Dest::Linear => None,
    };
    let unit = bs.unwrap_or(CHUNK);
    let window = WINDOW.max(unit) / unit * unit;
    let windows: Vec<(u64, u64)> = (0..size.div_ceil(window))
        .map(|i| (i * window, window.min(size - i * window)))
        .collect();
    let mut next = match windows.first() {
        Some(&(s, l)) => Some(prepare(img, opts, stats, bs, s, l)?),
        None => None,
    };
    for i in 0..windows.len() {
        check_cancel(opts)?;
        let cur = next
            .take()
            .expect("each window is prepared before it is copied");
        if let Some(p) = &opts.progress {
            p.advance(cur.zero_bytes);
        }
        if bs.is_some() {
            plan(&cur.blocks)?;
        }
        let following = windows.get(i + 1).copied();
        let (copied, prepared) = rayon::join(
            || copy_chunks(img, opts, stats, dest, &cur.work, out, out_path),
            || {
                following
                    .map(|(s, l)| prepare(img, opts, stats, bs, s, l))
                    .transpose()
            },
        );
        copied?;
        next = prepared?;
    }
    let dw = stats.data_written.load(Ordering::Relaxed);
    stats.written.fetch_add(dw, Ordering::Relaxed);
    Ok(())
}

/// An extent's layer outside the image's chain: a bug, reported rather than
/// panicked on.
pub(crate) fn bad_layer(img: &Image, layer: usize) -> Error {
    Error::io(
        img.path(),
        "read",
        std::io::Error::other(format!("layer {layer} is not in the image's chain")),
    )
}
