//! Pipeline operations around conversion: map, compare, checksum, in-place
//! conversion, sparsify and resize.
//!
//! Read-only operations walk the map a window at a time and never read what
//! the map knows to be zero. In-place operations are sequences of [`Step`]s
//! ordered so that an interruption after any step leaves a valid image (see
//! [`InPlacePlan`]).

use crate::convert::{chunks, Chunk};
use crate::error::{Error, Result};
use crate::image::{Extent, ExtentKind, Format, Image, OpenOptions};
use crate::io::WriteAt;
use crate::ondisk::{DiskType, FOOTER_SIZE, SECTOR, UNALLOCATED};
use crate::scan::{is_zero, nonzero_runs, ZERO_UNIT};
use crate::storage::window;
use crate::write::azure_size;
use rayon::prelude::*;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Virtual bytes mapped at a time by the read-only walks.
const WINDOW: u64 = 1 << 30;
/// Largest piece one worker reads at a time.
const PIECE: u64 = 4 << 20;

fn read_err(img: &Image, layer: usize) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| {
        let p = img.layer(layer).map(|l| l.path()).unwrap_or(img.path());
        Error::io(p, "read", e)
    }
}

/// Bytes of a data chunk.
fn chunk_bytes(img: &Image, c: &Chunk) -> Result<crate::storage::mmap::Window> {
    let src = img.layer(c.layer).expect("chunk layer inside the chain");
    window(src.storage(), c.file_offset, c.len).map_err(read_err(img, c.layer))
}

// ---------------------------------------------------------------- map

/// One extent of [`map`]: data or zero, and where data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// Virtual bytes mapped at a time by [`map_each`]: one window's extents are
/// held at once (at most one per sector, 32 bytes each: 4 MiB).
const MAP_WINDOW: u64 = 64 << 20;

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
pub fn map_each<F>(img: &Image, scan: bool, mut f: F) -> Result<()>
where
    F: FnMut(MapExtent) -> Result<()>,
{
    let size = img.virtual_size();
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
    let mut start = 0;
    while start < size {
        let len = MAP_WINDOW.min(size - start);
        let extents = img.map(start, len)?;
        if !scan {
            for e in extents {
                push(e, &mut f)?;
            }
        } else {
            let pieces = chunks(&extents, PIECE);
            let scanned: Vec<Vec<Extent>> = pieces
                .par_iter()
                .map(|c| scan_piece(img, c))
                .collect::<Result<_>>()?;
            // Put zero extents and scanned pieces back in order.
            let mut it = scanned.into_iter();
            for e in extents {
                if e.is_data() {
                    let mut pos = e.offset;
                    while pos < e.end() {
                        let piece = it.next().expect("one piece list per chunk");
                        pos = piece.last().map(|x| x.end()).unwrap_or(e.end());
                        for x in piece {
                            push(x, &mut f)?;
                        }
                    }
                } else {
                    push(e, &mut f)?;
                }
            }
        }
        start += len;
    }
    for e in pending {
        f(map_extent(img, e))?;
    }
    Ok(())
}

/// One data piece, scanned: its data runs and the zero pages between them.
fn scan_piece(img: &Image, c: &Chunk) -> Result<Vec<Extent>> {
    let data = chunk_bytes(img, c)?;
    let mut runs = Vec::new();
    nonzero_runs(&data, c.offset, ZERO_UNIT, &mut runs);
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
    Ok(v)
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

// ---------------------------------------------------------------- compare

/// The result of [`compare`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comparison {
    /// Virtual size of the first image.
    pub size_a: u64,
    /// Virtual size of the second image.
    pub size_b: u64,
    /// The first offset where the contents differ, if any. With
    /// `strict_size`, differing sizes differ at the smaller size.
    pub first_difference: Option<u64>,
}

impl Comparison {
    /// True when the contents are equal.
    pub fn equal(&self) -> bool {
        self.first_difference.is_none()
    }
}

/// Offset of the first byte where `a` and `b` differ.
fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    // Narrow down by 4 KiB pieces, then bytes.
    let mut base = 0;
    for (x, y) in a.chunks(4096).zip(b.chunks(4096)) {
        if x != y {
            return x.iter().zip(y).position(|(p, q)| p != q).map(|i| base + i);
        }
        base += x.len();
    }
    None
}

fn first_nonzero(a: &[u8]) -> Option<usize> {
    if is_zero(a) {
        return None;
    }
    let mut base = 0;
    for x in a.chunks(4096) {
        if !is_zero(x) {
            return x.iter().position(|&b| b != 0).map(|i| base + i);
        }
        base += x.len();
    }
    None
}

/// A piece of one image: data at a layer/file offset, or zero.
#[derive(Clone, Copy)]
enum Side {
    Zero,
    Data { layer: usize, file_offset: u64 },
}

fn side_bytes(img: &Image, s: Side, len: u64) -> Result<Option<crate::storage::mmap::Window>> {
    match s {
        Side::Zero => Ok(None),
        Side::Data { layer, file_offset } => {
            let src = img.layer(layer).expect("layer");
            window(src.storage(), file_offset, len)
                .map(Some)
                .map_err(read_err(img, layer))
        }
    }
}

/// Splits `extents` at `offset` boundaries into sides.
fn side_at(extents: &[Extent], idx: &mut usize, pos: u64) -> (Side, u64) {
    while extents[*idx].end() <= pos {
        *idx += 1;
    }
    let e = extents[*idx];
    let side = match e.kind {
        ExtentKind::Data { layer, file_offset } => Side::Data {
            layer,
            file_offset: file_offset + (pos - e.offset),
        },
        _ => Side::Zero,
    };
    (side, e.end())
}

/// Compares the virtual contents of two images of any types. Regions both
/// sides know to be zero are not read; the rest is compared in parallel.
/// Without `strict_size`, the larger image's extra bytes must be zero.
///
/// # Errors
/// I/O errors reading either image.
pub fn compare(a: &Image, b: &Image, strict_size: bool) -> Result<Comparison> {
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    let common = sa.min(sb);
    let mut result = Comparison {
        size_a: sa,
        size_b: sb,
        first_difference: None,
    };
    let mut start = 0;
    while start < common {
        let len = WINDOW.min(common - start);
        let (ea, eb) = (a.map(start, len)?, b.map(start, len)?);
        // Segments where both sides are of one kind, cut to pieces.
        let mut tasks: Vec<(u64, u64, Side, Side)> = Vec::new();
        let (mut ia, mut ib) = (0, 0);
        let mut pos = start;
        while pos < start + len {
            let (xa, enda) = side_at(&ea, &mut ia, pos);
            let (xb, endb) = side_at(&eb, &mut ib, pos);
            let end = enda.min(endb).min((pos / PIECE + 1) * PIECE);
            if !matches!((xa, xb), (Side::Zero, Side::Zero)) {
                tasks.push((pos, end - pos, xa, xb));
            }
            pos = end;
        }
        let found = tasks
            .par_iter()
            .map(|&(off, n, xa, xb)| -> Result<Option<u64>> {
                let da = side_bytes(a, xa, n)?;
                let db = side_bytes(b, xb, n)?;
                let at = match (&da, &db) {
                    (Some(x), Some(y)) => first_mismatch(x, y),
                    (Some(x), None) | (None, Some(x)) => first_nonzero(x),
                    (None, None) => None,
                };
                Ok(at.map(|i| off + i as u64))
            })
            .filter_map(|r| r.transpose())
            .collect::<Result<Vec<u64>>>()?;
        if let Some(&first) = found.iter().min() {
            result.first_difference = Some(first);
            return Ok(result);
        }
        start += len;
    }
    if sa != sb {
        if strict_size {
            result.first_difference = Some(common);
        } else {
            let larger = if sa > sb { a } else { b };
            result.first_difference = first_nonzero_in(larger, common, larger.virtual_size())?;
        }
    }
    Ok(result)
}

/// The first non-zero byte of `img` in `from..to`.
fn first_nonzero_in(img: &Image, from: u64, to: u64) -> Result<Option<u64>> {
    let mut start = from;
    while start < to {
        let len = WINDOW.min(to - start);
        let extents = img.map(start, len)?;
        let pieces = chunks(&extents, PIECE);
        let found = pieces
            .par_iter()
            .map(|c| -> Result<Option<u64>> {
                let d = chunk_bytes(img, c)?;
                Ok(first_nonzero(&d).map(|i| c.offset + i as u64))
            })
            .filter_map(|r| r.transpose())
            .collect::<Result<Vec<u64>>>()?;
        if let Some(&m) = found.iter().min() {
            return Ok(Some(m));
        }
        start += len;
    }
    Ok(None)
}

// ---------------------------------------------------------------- checksum

/// The CRC-32 (IEEE, as zlib and `crc32fast`) of `n` zero bytes, as a
/// hasher that can be combined: built by doubling, in O(log n) combinations.
fn zeros_hasher(n: u64) -> crc32fast::Hasher {
    let mut result = crc32fast::Hasher::new();
    let mut unit = crc32fast::Hasher::new();
    unit.update(&[0u8; 4096]);
    let mut q = n / 4096;
    while q > 0 {
        if q & 1 == 1 {
            result.combine(&unit);
        }
        let u2 = unit.clone();
        unit.combine(&u2);
        q >>= 1;
    }
    let mut tail = crc32fast::Hasher::new();
    tail.update(&vec![0u8; (n % 4096) as usize]);
    result.combine(&tail);
    result
}

/// CRC-32 of the virtual content and its length. Identical for the raw,
/// fixed, dynamic and differencing forms of one disk. Data pieces are hashed
/// in parallel and combined; zero regions are combined without being read.
///
/// # Errors
/// I/O errors reading the image.
pub fn checksum(img: &Image) -> Result<(u32, u64)> {
    let size = img.virtual_size();
    let mut total = crc32fast::Hasher::new();
    let mut start = 0;
    while start < size {
        let len = WINDOW.min(size - start);
        let extents = img.map(start, len)?;
        let mut pieces: Vec<Extent> = Vec::new();
        for e in &extents {
            if e.is_data() {
                for c in chunks(std::slice::from_ref(e), PIECE) {
                    pieces.push(Extent {
                        offset: c.offset,
                        length: c.len,
                        kind: ExtentKind::Data {
                            layer: c.layer,
                            file_offset: c.file_offset,
                        },
                    });
                }
            } else {
                pieces.push(*e);
            }
        }
        let hashes = pieces
            .par_iter()
            .map(|e| -> Result<crc32fast::Hasher> {
                match e.kind {
                    ExtentKind::Data { layer, file_offset } => {
                        let c = Chunk {
                            offset: e.offset,
                            len: e.length,
                            layer,
                            file_offset,
                        };
                        let d = chunk_bytes(img, &c)?;
                        let mut h = crc32fast::Hasher::new();
                        h.update(&d);
                        Ok(h)
                    }
                    _ => Ok(zeros_hasher(e.length)),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        for h in hashes {
            total.combine(&h);
        }
        start += len;
    }
    Ok((total.finalize(), size))
}

// ---------------------------------------------------------------- in place

/// One step of an in-place operation.
#[derive(Clone, Debug, PartialEq, Eq)]
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
pub struct InPlacePlan {
    /// The file.
    pub path: PathBuf,
    /// What the steps do, in words.
    pub description: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

impl InPlacePlan {
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
                return Err(Error::io(&self.path, "in-place step", e));
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
fn fixed_footer(size: u64) -> Vec<u8> {
    crate::write::new_footer(DiskType::Fixed, size)
        .to_bytes()
        .to_vec()
}

/// The steps that grow a fixed image whose disk ends at `size` and whose
/// footer `old` sits at `old_at` to the size of `new`, its new footer. Every
/// byte from `size` to the new size ends up zero (bytes between the data and
/// the footer are not part of the disk and may hold anything), and each step
/// leaves the old image or the new one.
fn grow_fixed(
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
/// [`Error::InvalidArgument`] for dynamic or differencing images (convert to
/// a new file instead) or an unsupported direction; open errors.
pub fn plan_in_place(
    path: &Path,
    target: Format,
    azure: bool,
    opts: &OpenOptions,
) -> Result<InPlacePlan> {
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
                return Err(Error::InvalidArgument(format!(
                    "{}: {new_size} bytes is larger than a VHD can hold (2040 GiB)",
                    path.display()
                )));
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
                return Err(Error::InvalidArgument(
                    "Azure sizing goes with a fixed target".into(),
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
                let old = img.footer().expect("fixed has a footer").clone();
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
            return Err(Error::InvalidArgument(format!(
                "{}: in-place conversion goes between raw and fixed only, not {from} -> {to}; \
                 convert to a new file instead",
                path.display()
            )))
        }
    }
    Ok(InPlacePlan {
        path: path.to_path_buf(),
        description,
        steps,
    })
}

// ---------------------------------------------------------------- sparsify

/// What [`sparsify`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
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
/// [`Error::InvalidArgument`] for differencing disks and, for a dynamic
/// image, a file with other hard links; I/O errors.
pub fn sparsify(path: &Path, opts: &OpenOptions) -> Result<SparsifyReport> {
    let img = Image::open_with(path, &opts.clone().writable(true))?;
    let before = crate::io::allocated_bytes(img.local_file("stat")?)
        .map_err(|e| Error::io(path, "stat", e))?;
    let zero_bytes;
    match img.disk_type() {
        Format::Raw | Format::Fixed => {
            let file = img.local_file("punch holes")?;
            let size = img.virtual_size();
            let mut zeros = 0u64;
            let mut start = 0;
            while start < size {
                let len = WINDOW.min(size - start);
                let extents = img.map(start, len)?;
                let pieces = chunks(&extents, PIECE);
                zeros += pieces
                    .par_iter()
                    .map(|c| -> Result<u64> {
                        let d = chunk_bytes(&img, c)?;
                        let mut runs = Vec::new();
                        nonzero_runs(&d, c.offset, ZERO_UNIT, &mut runs);
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
                    })
                    .sum::<Result<u64>>()?;
                start += len;
            }
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
        Format::Differencing => {
            return Err(Error::InvalidArgument(format!(
            "{}: a differencing disk cannot be sparsified: its zero blocks hide the parent's data",
            path.display()
        )))
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

// ---------------------------------------------------------------- resize

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
        Error::InvalidArgument(format!(
            "{}: {n} bytes is larger than {what} can hold: at most {limit} bytes",
            path.display()
        ))
    };
    if asked > limit {
        return Err(too_large(asked));
    }
    let mut new_size = asked
        .checked_next_multiple_of(SECTOR)
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
/// Fixed images move their footer as in [`plan_in_place`]'s Azure case.
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
/// [`Error::InvalidArgument`] for a size larger than the format holds (2040
/// GiB for a VHD; [`crate::write::MAX_VHD_SIZE`]), a smaller size without
/// `shrink` (the message states the current size), a cut region that holds
/// data, or a differencing disk; I/O errors reading the image.
pub fn plan_resize(
    img: &Image,
    new_size: u64,
    azure: bool,
    shrink: bool,
) -> Result<Option<InPlacePlan>> {
    let path = img.path();
    let size = img.virtual_size();
    if img.disk_type() == Format::Differencing {
        return Err(Error::InvalidArgument(format!(
            "{}: a differencing disk cannot be resized: its parent fixes the size",
            path.display()
        )));
    }
    let new_size = resize_target(img, new_size, azure)?;
    if new_size < size && !shrink {
        return Err(Error::InvalidArgument(format!(
            "{}: the disk is {size} bytes; {new_size} bytes would shrink it, and shrinking was not asked for",
            path.display()
        )));
    }
    if new_size < size {
        if let Some(at) = first_nonzero_in(img, new_size, size)? {
            return Err(Error::InvalidArgument(format!(
                "{}: cannot shrink to {new_size} bytes: the region cut away holds data (first non-zero byte at {at})",
                path.display()
            )));
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
            .and_then(|()| f.read_exact_at(&mut copy, 0))
            .map_err(|e| Error::io(path, "read footers", e))?;
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
            let old = img.footer().expect("fixed").clone();
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
            let h = img.header().expect("dynamic").clone();
            let bat = img.bat().expect("dynamic");
            let bs = img.block_size();
            let needed = new_size.div_ceil(bs);
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
                            h.table_offset + 4 * b,
                            UNALLOCATED.to_be_bytes().to_vec(),
                        ));
                    }
                }
                let last = size / bs;
                match bat.entries.get(last as usize) {
                    Some(&e) if size % bs != 0 && e != UNALLOCATED => {
                        let data_at = u64::from(e) * SECTOR + img.bitmap_size();
                        let from = data_at + (size - last * bs);
                        let to = data_at + (new_size.min((last + 1) * bs) - last * bs);
                        let (_, old_end) = img.block_span(last, e);
                        let mut starts = bat
                            .entries
                            .iter()
                            .take(img.block_count() as usize)
                            .filter(|&&x| x != UNALLOCATED)
                            .map(|&x| u64::from(x) * SECTOR)
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
                let bat_end = h.table_offset + needed * 4;
                let mut next = img.data_end();
                for (i, &e) in bat.entries.iter().enumerate() {
                    if e != UNALLOCATED && (i as u64) < img.block_count() {
                        next = next.min(u64::from(e) * SECTOR);
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
                let fill = vec![0xffu8; ((needed - have) * 4) as usize];
                for (k, piece) in fill.chunks(512).enumerate() {
                    steps.push(Step::Write(
                        h.table_offset + have * 4 + 512 * k as u64,
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
                            h.table_offset + 4 * b,
                            UNALLOCATED.to_be_bytes().to_vec(),
                        ));
                    }
                }
                steps.push(Step::Sync);
            }
            let f = img.footer().expect("dynamic").resized(new_size);
            let fb = f.to_bytes().to_vec();
            // The end footer (vhdkit's authority) first, then the copy (qemu's).
            steps.push(Step::Write(img.data_end(), fb.clone()));
            steps.push(Step::Sync);
            steps.push(Step::Write(0, fb));
            steps.push(Step::Sync);
        }
        Format::Differencing => unreachable!("refused above"),
    }
    Ok(Some(InPlacePlan {
        path: path.to_path_buf(),
        description,
        steps,
    }))
}

/// Resizes the image at `path` in place (see [`plan_resize`]); returns what
/// was done. A symbolic link is followed: the image it names is resized.
///
/// # Errors
/// As [`plan_resize`]; for a dynamic image that must be rewritten, as the
/// rewrite of [`sparsify`] (an image with other hard links is refused); and
/// I/O errors.
pub fn resize(
    path: &Path,
    new_size: u64,
    azure: bool,
    shrink: bool,
    opts: &OpenOptions,
) -> Result<String> {
    let img = Image::open_with(path, opts)?;
    match plan_resize(&img, new_size, azure, shrink)? {
        Some(plan) => {
            drop(img);
            plan.run()?;
            Ok(plan.description)
        }
        None => {
            // Rewrite with a larger BAT into a temporary file, renamed over the image.
            let target = resize_target(&img, new_size, azure)?;
            rewrite_dynamic(&img, Some(target))?;
            Ok(format!(
                "dynamic: rewritten with {target} bytes (the BAT had no room to grow in place)"
            ))
        }
    }
}

/// Rewrites a dynamic image over itself: compactly (no all-zero blocks),
/// with the same block size and identity (unique id, creator, timestamp),
/// optionally larger. The new file is written beside the image and renamed
/// over it when complete, with the old file's owner, group and mode; until
/// then the old image is untouched. A symbolic link is resolved first: the
/// file it names is replaced, and the link stays a link. A file with other
/// hard links is refused: the rename would give only this name the new
/// image, leaving the old one under the others.
fn rewrite_dynamic(img: &Image, size: Option<u64>) -> Result<crate::Report> {
    use std::os::unix::fs::MetadataExt;
    let path = img.path();
    let links = img
        .local_file("stat")?
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?
        .nlink();
    if links > 1 {
        return Err(Error::InvalidArgument(format!(
            "{}: the file has {links} hard links, and this operation rewrites a dynamic image \
             into a new file renamed over it: the other names would keep the old image; \
             copy the image to a file of its own first",
            path.display()
        )));
    }
    let real = std::fs::canonicalize(path).map_err(|e| Error::io(path, "resolve", e))?;
    if !crate::convert::same_file(img.local_file("stat")?, &real) {
        return Err(Error::InvalidArgument(format!(
            "{}: the file changed while it was open; nothing was written",
            path.display()
        )));
    }
    let mut o = crate::ConvertOptions::new(crate::Target::Dynamic)
        .block_size(u32::try_from(img.block_size()).unwrap_or(crate::write::DEFAULT_BLOCK_SIZE))
        .overwrite(true)
        .identity(img.footer().expect("dynamic has a footer").clone());
    if let Some(s) = size {
        o = o.virtual_size(s);
    }
    o.rewrite = true;
    crate::convert::convert_image(img, &real, &o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_crc_matches_hashing_zeros() {
        for n in [0u64, 1, 511, 4096, 4097, 100_000, 1 << 20] {
            let mut h = crc32fast::Hasher::new();
            h.update(&vec![0u8; n as usize]);
            assert_eq!(zeros_hasher(n).finalize(), h.finalize(), "n = {n}");
        }
    }

    #[test]
    fn mismatch_positions() {
        let a = vec![0u8; 10_000];
        let mut b = a.clone();
        assert_eq!(first_mismatch(&a, &b), None);
        b[9_000] = 1;
        assert_eq!(first_mismatch(&a, &b), Some(9_000));
        assert_eq!(first_nonzero(&b), Some(9_000));
        assert_eq!(first_nonzero(&a), None);
    }
}
