//! The one engine under every long operation: a virtual range of an image
//! is taken a window at a time; each window's map is cut into chunks; the
//! chunks are read (mapped or copied) and scanned for zero runs in
//! parallel; and what was found goes either, in virtual order, to a fold
//! (the crate's `fold`: map, checksum, compare) or, as data runs, to a [`Sink`]
//! ([`copy`]: convert, sparsify's and resize's rewrites).
//!
//! The engine knows no options struct and no writer: a call says what to
//! scan, gives a [`Control`] (progress closure and cancellation token, per
//! call) and a sink or a fold. Window and chunk sizes are one set, chosen
//! by measurement (docs/performance.md).

use crate::error::{Error, Result};
use crate::image::{Extent, ExtentKind, Image};
use crate::scan::{is_zero, nonzero_runs, ZERO_UNIT};
use crate::storage::{window, with_bytes};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Virtual bytes per window: the map of one window is held at a time.
pub(crate) const WINDOW: u64 = 256 << 20;
/// Largest chunk one worker reads and scans at a time.
pub(crate) const CHUNK: u64 = 2 << 20;
/// Largest chunk one worker reads at a time in [`fold`] (the walks that
/// only read): twice [`CHUNK`]. Nothing waits in a queue there, so the
/// larger chunk costs no memory beyond one mapped chunk per worker, and it
/// halves the mappings: measured 8-10 % faster than 2 MiB for checksum,
/// map and compare of 1 GiB of data (docs/performance.md).
pub(crate) const FOLD_CHUNK: u64 = 2 * CHUNK;
/// Chunks waiting for the writer of [`copy`]: bounds the memory held.
const QUEUE: usize = 2;

/// Where a long operation is, as it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The total, in bytes of the virtual disk (sent once, first).
    Start(u64),
    /// So many more bytes of the virtual disk are done. The advances add up
    /// to the total.
    Advance(u64),
    /// So many bytes of data were written to the output (not metadata).
    Written(u64),
}

/// A request to stop, shared between the caller and one operation (or
/// several): set it from any thread, and the operation stops at its next
/// chunk with [`Error::Interrupted`].
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// A token over an existing flag (set means cancelled).
    pub fn from_flag(flag: Arc<AtomicBool>) -> Self {
        CancelToken(flag)
    }
    /// Asks the operations holding this token to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// True once [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Set by [`cancel_all`].
static CANCEL_ALL: AtomicBool = AtomicBool::new(false);

/// Asks every long operation of this process to stop at its next chunk,
/// returning [`Error::Interrupted`] (writers remove their partial output).
/// For a Ctrl-C handler. The request stays in force, failing later
/// operations too, until [`clear_cancel`]; a per-call alternative is a
/// [`CancelToken`].
pub fn cancel_all() {
    CANCEL_ALL.store(true, Ordering::SeqCst);
}

/// True while a [`cancel_all`] request is in force (for operations that do
/// not run on the walk, such as uploads).
#[cfg(feature = "azure")]
pub(crate) fn cancel_requested() -> bool {
    CANCEL_ALL.load(Ordering::SeqCst)
}

/// Withdraws a [`cancel_all`] request, so that new operations run again.
pub fn clear_cancel() {
    CANCEL_ALL.store(false, Ordering::SeqCst);
}

fn ignore(_: Event) {}

/// Progress and cancellation of one call.
#[derive(Clone, Copy)]
pub struct Control<'a> {
    progress: &'a (dyn Fn(Event) + Sync),
    cancel: Option<&'a CancelToken>,
}

impl Default for Control<'_> {
    fn default() -> Self {
        Control {
            progress: &ignore,
            cancel: None,
        }
    }
}

impl std::fmt::Debug for Control<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("cancel", &self.cancel)
            .finish_non_exhaustive()
    }
}

impl<'a> Control<'a> {
    /// No progress, no cancellation but [`cancel_all`].
    pub fn new() -> Self {
        Self::default()
    }
    /// Calls `f` with each [`Event`] (from worker threads too).
    pub fn progress(mut self, f: &'a (dyn Fn(Event) + Sync)) -> Self {
        self.progress = f;
        self
    }
    /// Stops when `token` is cancelled.
    pub fn cancel(mut self, token: &'a CancelToken) -> Self {
        self.cancel = Some(token);
        self
    }
    pub(crate) fn token(&self) -> Option<&'a CancelToken> {
        self.cancel
    }
    pub(crate) fn event(&self, e: Event) {
        (self.progress)(e)
    }
    /// [`Error::Interrupted`] once cancelled (by the token or [`cancel_all`]).
    pub(crate) fn check(&self) -> Result<()> {
        if self.cancel.is_some_and(|c| c.is_cancelled()) || CANCEL_ALL.load(Ordering::Relaxed) {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// Where bytes go: a destination of [`copy`]. Each destination (a raw
/// file, a fixed or dynamic VHD, memory, a page blob) is one implementation;
/// the engine knows none of them.
pub trait Sink: Sync {
    /// The block size of a destination that places data by blocks (a
    /// dynamic VHD): chunks then never cross a block boundary, each window's
    /// blocks are found to hold data or not before their data is handed
    /// over, and [`Sink::plan`] hears of them. `None` (the default): no
    /// planning.
    fn block_size(&self) -> Option<u64> {
        None
    }
    /// Called once per window, in order, before any of its data: each block
    /// of the window with data in the map, and whether it holds a non-zero
    /// byte (always true when the walk does not scan).
    ///
    /// # Errors
    /// The sink's own (a slot that cannot be given, an I/O error).
    fn plan(&self, blocks: &[(u64, bool)]) -> Result<()> {
        let _ = blocks;
        Ok(())
    }
    /// False when the destination needs nothing from the chunk at virtual
    /// offset `offset` (a block it left out); the chunk is then not read.
    fn wants(&self, offset: u64) -> bool {
        let _ = offset;
        true
    }
    /// Writes `data`, the virtual disk's bytes at `offset`. Called from one
    /// thread at a time, in no promised order. Ranges not written read as
    /// zeros in the destination.
    ///
    /// # Errors
    /// The sink's own (an I/O error naming its file).
    fn write(&self, offset: u64, data: &[u8]) -> Result<()>;
}

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

/// An extent's layer outside the image's chain: a bug, reported rather than
/// panicked on.
pub(crate) fn bad_layer(img: &Image, layer: usize) -> Error {
    Error::io(
        img.path(),
        "read",
        std::io::Error::other(format!("layer {layer} is not in the image's chain")),
    )
}

/// The image a chunk's bytes are in.
fn source(img: &Image, layer: usize) -> Result<&Image> {
    img.layer(layer).ok_or_else(|| bad_layer(img, layer))
}

/// The bytes of a data chunk: mapped or copied.
pub(crate) fn chunk_bytes(img: &Image, c: &Chunk) -> Result<crate::storage::mmap::Window> {
    let src = source(img, c.layer)?;
    window(src.storage(), c.file_offset, c.len)
        .map_err(|e| Error::io_at(src.path(), "read", c.file_offset, e))
}

/// The windows of `start..start + len`, each a multiple of `unit` long.
fn windows(start: u64, len: u64, unit: u64) -> Vec<(u64, u64)> {
    let w = WINDOW.max(unit) / unit * unit;
    let end = start + len;
    let mut v = Vec::new();
    let mut pos = start;
    while pos < end {
        let n = w.min(end - pos);
        v.push((pos, n));
        pos += n;
    }
    v
}

// ------------------------------------------------------------------ fold

/// What [`fold`] hands over, in virtual order.
pub(crate) enum Piece<R> {
    /// A range the map knows to be zero (not read).
    Zero(Extent),
    /// A data chunk and what the per-chunk function made of it.
    Data(Chunk, R),
}

/// What [`fold`] reads of each data chunk.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// Nothing: the chunk function gets no bytes (a map without scanning).
    Nothing,
    /// The bytes.
    Bytes,
    /// The bytes and their runs of non-zero pages.
    Scan,
}

/// The walk for operations that read: window by window over
/// `start..start + len`, data chunks are read (per `read`) and given to
/// `per_chunk` in parallel; zero extents and the chunks' results are then
/// given to `each`, in virtual order, on the calling thread. `each` returns
/// `false` to stop the walk early. Progress advances as chunks are done.
pub(crate) fn fold<R, C, E>(
    img: &Image,
    start: u64,
    len: u64,
    read: Read,
    ctl: &Control<'_>,
    per_chunk: C,
    mut each: E,
) -> Result<()>
where
    R: Send,
    C: Fn(&Chunk, &[u8], &[Range<u64>]) -> Result<R> + Sync,
    E: FnMut(Piece<R>) -> Result<bool>,
{
    for (ws, wl) in windows(start, len, FOLD_CHUNK) {
        ctl.check()?;
        let extents = img.map(ws, wl)?;
        let work = chunks(&extents, FOLD_CHUNK);
        let results: Vec<R> = work
            .par_iter()
            .map(|c| -> Result<R> {
                ctl.check()?;
                let r = match read {
                    Read::Nothing => per_chunk(c, &[], &[]),
                    Read::Bytes => per_chunk(c, &chunk_bytes(img, c)?, &[]),
                    Read::Scan => {
                        let d = chunk_bytes(img, c)?;
                        let mut runs = Vec::new();
                        nonzero_runs(&d, c.offset, ZERO_UNIT, &mut runs);
                        per_chunk(c, &d, &runs)
                    }
                };
                ctl.event(Event::Advance(c.len));
                r
            })
            .collect::<Result<_>>()?;
        let mut results = work.into_iter().zip(results);
        for e in extents {
            if e.is_data() {
                // The chunks of this extent, in order.
                let mut pos = e.offset;
                while pos < e.end() {
                    let Some((c, r)) = results.next() else {
                        return Err(Error::io(
                            img.path(),
                            "walk",
                            std::io::Error::other("a data extent without its chunks"),
                        ));
                    };
                    pos = c.offset + c.len;
                    if !each(Piece::Data(c, r))? {
                        return Ok(());
                    }
                }
            } else {
                ctl.event(Event::Advance(e.length));
                if !each(Piece::Zero(e))? {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ copy

/// What [`copy`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Copied {
    /// Bytes read from the image (data only).
    pub read: u64,
    /// Bytes of data handed to the sink.
    pub written: u64,
}

#[derive(Default)]
struct Stats {
    read: AtomicU64,
    written: AtomicU64,
}

/// A scanned chunk on its way to the writer.
struct WriteJob {
    data: crate::storage::mmap::Window,
    /// Virtual bytes this chunk covers, reported to progress once written.
    len: u64,
    /// Virtual offset of `data[0]`.
    offset: u64,
    /// Virtual ranges to write.
    runs: Vec<Range<u64>>,
}

/// The walk for operations that write: the whole virtual disk of `img`,
/// window by window, into `sink`. With `scan`, zero pages are found and
/// left out (and a planning sink hears which blocks hold data); without,
/// every data byte the map shows is written. The next window is mapped (and
/// its blocks scanned) while the current one is written; chunks are read
/// and scanned in parallel and written from one thread, since writers to
/// one file contend on its lock.
///
/// Run it inside a rayon pool to bound its threads.
///
/// # Errors
/// Errors reading the image, the sink's errors, and
/// [`Error::Interrupted`] when cancelled.
pub fn copy<S: Sink + ?Sized>(
    img: &Image,
    sink: &S,
    scan: bool,
    ctl: &Control<'_>,
) -> Result<Copied> {
    let size = img.virtual_size();
    let stats = Stats::default();
    let bs = sink.block_size();
    let wins = windows(0, size, bs.unwrap_or(CHUNK));
    let mut next = match wins.first() {
        Some(&(s, l)) => Some(prepare(img, scan, &stats, bs, s, l)?),
        None => None,
    };
    for i in 0..wins.len() {
        ctl.check()?;
        let Some(cur) = next.take() else { break };
        ctl.event(Event::Advance(cur.zero_bytes));
        if bs.is_some() {
            sink.plan(&cur.blocks)?;
        }
        let following = wins.get(i + 1).copied();
        let (copied, prepared) = rayon::join(
            || copy_chunks(img, sink, scan, &stats, &cur.work, ctl),
            || {
                following
                    .map(|(s, l)| prepare(img, scan, &stats, bs, s, l))
                    .transpose()
            },
        );
        copied?;
        next = prepared?;
    }
    Ok(Copied {
        read: stats.read.load(Ordering::Relaxed),
        written: stats.written.load(Ordering::Relaxed),
    })
}

/// One window, mapped and (for a planning sink) scanned for the blocks that
/// hold data.
struct Prepared {
    work: Vec<Chunk>,
    /// `(block, holds data)` for each block with data extents, in order.
    blocks: Vec<(u64, bool)>,
    /// Bytes of the window the map already knows to be zero.
    zero_bytes: u64,
}

fn prepare(
    img: &Image,
    scan: bool,
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
        if scan {
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
        let src = source(img, c.layer)?;
        let mut pos = 0;
        while pos < c.len {
            // Data blocks almost always show a non-zero byte in their first
            // page: one small read settles them without mapping the block.
            let n = if pos == 0 {
                c.len.min(ZERO_UNIT)
            } else {
                (c.len - pos).min(CHUNK)
            };
            let nz = with_bytes(src.storage(), c.file_offset + pos, n, |d| !is_zero(d))
                .map_err(|e| Error::io_at(src.path(), "read", c.file_offset + pos, e))?;
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

/// Scans chunks in parallel and hands what is not zero to the sink from one
/// thread.
fn copy_chunks<S: Sink + ?Sized>(
    img: &Image,
    sink: &S,
    scan: bool,
    stats: &Stats,
    work: &[Chunk],
    ctl: &Control<'_>,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<WriteJob>(QUEUE);
    std::thread::scope(|s| -> Result<()> {
        let writer = s.spawn(move || -> Result<()> {
            for job in rx {
                // Stop writing as soon as asked (the queued chunks are dropped).
                ctl.check()?;
                let mut wrote = 0;
                for r in &job.runs {
                    let from = (r.start - job.offset) as usize;
                    let to = (r.end - job.offset) as usize;
                    sink.write(r.start, &job.data[from..to])?;
                    stats.written.fetch_add(r.end - r.start, Ordering::Relaxed);
                    wrote += r.end - r.start;
                }
                ctl.event(Event::Written(wrote));
                ctl.event(Event::Advance(job.len));
            }
            Ok(())
        });
        let scanned = work
            .par_iter()
            .try_for_each_with(tx, |tx, c| -> Result<()> {
                ctl.check()?;
                if sink.wants(c.offset) {
                    let data = chunk_bytes(img, c)?;
                    stats.read.fetch_add(c.len, Ordering::Relaxed);
                    let mut runs = Vec::new();
                    if scan {
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
                        });
                        return Ok(());
                    }
                }
                ctl.event(Event::Advance(c.len));
                Ok(())
            });
        let written = writer
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        written?;
        scanned
    })
}
