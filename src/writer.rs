//! A VHD opened for writing: positional writes of any length and alignment
//! into fixed, dynamic and differencing disks.
//!
//! # What a write does
//!
//! - Fixed: the bytes go to the file at the same offset.
//! - Dynamic and differencing: the write is cut at block boundaries. A
//!   block that is not allocated gets a slot at the end of the file (its
//!   data 4 KiB aligned, as Hyper-V does), unless the write is all zeros
//!   and the block reads as zeros anyway (no parent, or the parent's range
//!   is zero): then nothing is allocated. Sectors of a differencing disk
//!   that the write covers only in part, and that the child does not hold
//!   yet, are first read from the parent (from zeros for a dynamic disk)
//!   so that the whole sector can be claimed. Reads through the writer see
//!   every write at once.
//!
//! # The order of writes, and why a crash loses nothing flushed
//!
//! Allocating block `b`, with the end footer at `E`:
//!
//! 1. the footer is written at the new end `E'` (beyond the new block), so
//!    the file always ends with a valid footer;
//! 2. the block's bitmap is written at the slot (which may overwrite the
//!    old footer at `E`, now unreferenced): all set for a dynamic disk (its
//!    data area is a hole past the old end, and reads as zeros), all clear
//!    for a differencing disk;
//! 3. the data is written.
//!
//! The BAT entry of a new block, and the bitmap bits a write sets in a
//! differencing disk (or in a partial bitmap of a dynamic disk written by
//! another tool), are kept in memory and written by [`VhdWriter::flush`]:
//! first `fdatasync` (every data byte, slot and footer is durable), then the
//! dirty bitmaps, then the dirty BAT sectors, then `fdatasync` again. A BAT
//! entry or bitmap bit on disk therefore never points at data that is not
//! durable. Whatever prefix of these operations reaches the disk, the file
//! ends with a valid footer, every BAT entry points inside the file at a
//! slot whose bitmap and data were written before it, and each sector reads
//! either its content at the last flush or a later written one; after
//! `flush()` returns, everything written before it is on disk. An
//! allocation cut short leaves at most an unreferenced slot (space, not
//! data). The writer locks the file (`flock`) so that no other vhdkit
//! writer changes it meanwhile.
//!
//! # Concurrency
//!
//! `write_all_at` and `read_exact_at` take `&self` and may be called from
//! many threads. Writes to one block are serialized (a stripe lock chosen
//! by block number); the BAT and the end of the file are under one short
//! lock held only while a slot is handed out; `flush` waits for writes in
//! progress and holds new ones until it is done.

use crate::error::{Error, Result, Structure};
use crate::image::{ExtentKind, Format, Image, OpenOptions};
use crate::io::{ReadAt, WriteAt};
use crate::ondisk::placement::{self, ENTRIES_PER_SECTOR};
use crate::ondisk::{entry_offset, SectorBitmap, FOOTER_SIZE, SECTOR, UNALLOCATED};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// The number of locks writes to blocks are spread over.
const STRIPES: usize = 64;

/// One low-level operation on the image file, as recorded for crash tests.
#[doc(hidden)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileOp {
    /// Bytes written at an offset.
    Write(u64, Vec<u8>),
    /// An `fdatasync`.
    Sync,
}

/// The log a recording writer appends its file operations to.
#[doc(hidden)]
pub type OpLog = Arc<Mutex<Vec<FileOp>>>;

struct Meta {
    bat: Vec<u32>,
    /// Offset of the end footer.
    end: u64,
    dirty_bat: BTreeSet<u64>,
    dirty_bitmaps: BTreeSet<u64>,
    /// Partial bitmaps read or changed since the last flush, by block.
    bitmaps: HashMap<u64, Vec<u8>>,
    /// Blocks whose bitmap is all set (no bitmap kept for them).
    full: HashSet<u64>,
}

/// A VHD open for writing. See the [module documentation](self).
pub struct VhdWriter {
    img: Image,
    /// The image's file, opened for writing (an image opened from a path
    /// always has one).
    file: std::fs::File,
    path: PathBuf,
    format: Format,
    size: u64,
    block_size: u64,
    bitmap_size: u64,
    table_offset: u64,
    footer_bytes: [u8; FOOTER_SIZE],
    meta: Mutex<Meta>,
    stripes: Vec<Mutex<()>>,
    gate: RwLock<()>,
    log: Option<OpLog>,
}

impl std::fmt::Debug for VhdWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdWriter")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("size", &self.size)
            .finish()
    }
}

/// `len` bytes from virtual `offset` cut at block boundaries: (block, offset
/// inside the block, the piece's range within the buffer).
fn block_pieces(
    offset: u64,
    len: usize,
    block_size: u64,
) -> impl Iterator<Item = (u64, u64, std::ops::Range<usize>)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let in_block = pos % block_size;
        let n = ((block_size - in_block) as usize).min(len - done);
        let piece = (pos / block_size, in_block, done..done + n);
        done += n;
        Some(piece)
    })
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(path, op, e)
}

impl VhdWriter {
    /// Opens the fixed, dynamic or differencing VHD at `path` for writing
    /// (its parents, found as [`Image::open_with`] finds them, are only
    /// read), and takes an exclusive lock on it.
    ///
    /// # Errors
    /// The open errors of [`Image::open_with`]; [`Error::WrongImageKind`]
    /// for a raw image; [`Error::ParentNotFound`] for a missing parent;
    /// [`Error::Corrupt`] for a file whose end footer is missing or damaged,
    /// or whose blocks overlap metadata or each other;
    /// [`Error::Unsupported`] for a 511-byte footer or an image that is not
    /// a local file; [`Error::OutputRefused`] for a file locked by another
    /// writer.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<VhdWriter> {
        Self::open_inner(path.as_ref(), opts, None)
    }

    /// Like [`VhdWriter::open`], and records every file operation in `log`
    /// (for crash tests, which replay each prefix of it).
    #[doc(hidden)]
    pub fn open_recording(path: impl AsRef<Path>, opts: &OpenOptions, log: OpLog) -> Result<Self> {
        Self::open_inner(path.as_ref(), opts, Some(log))
    }

    fn open_inner(path: &Path, opts: &OpenOptions, log: Option<OpLog>) -> Result<VhdWriter> {
        let img = Image::open_with(path, &opts.clone().writable(true))?;
        if img.parent_missing() {
            return Err(Error::ParentNotFound {
                path: path.to_path_buf(),
                parent_id: img
                    .header()
                    .map(|h| h.parent_unique_id.to_string())
                    .unwrap_or_default(),
                tried: vec![
                    "the image was opened with its parent missing (read as zeros), and a disk \
                     whose parent reads as zeros cannot be written"
                        .into(),
                ],
                wrong_id: Vec::new(),
            });
        }
        let format = img.disk_type();
        if format == Format::Raw {
            return Err(Error::wrong_kind(
                path,
                "write",
                format,
                "is not a VHD (raw images are written as plain files)",
            ));
        }
        match img.footer_source() {
            Some(crate::image::FooterSource::End) => {}
            Some(crate::image::FooterSource::EndLegacy) => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    what: "a 511-byte footer (Virtual PC before 2004) is not written to; \
                           convert the image before writing to it"
                        .into(),
                })
            }
            _ => {
                let mut c = Error::corrupt(
                    Structure::Footer,
                    "cookie",
                    img.file_len().saturating_sub(FOOTER_SIZE as u64),
                    "no intact footer at the end of the file (the copy at offset 0 was read)",
                    "an intact 512-byte footer: repair the image (convert it) before writing to it",
                );
                c = c.with_path(path);
                return Err(c);
            }
        }
        let file = img
            .file()
            .ok_or_else(|| Error::Unsupported {
                path: path.to_path_buf(),
                what: "is not a file; only local files are written in place".into(),
            })?
            .try_clone()
            .map_err(io_err(path, "open"))?;
        // A lock still held after a short wait: another writer. (A writer
        // that just closed the file may hold it for an instant longer
        // through a process forked meanwhile, until that one execs.)
        let mut locked = false;
        for _ in 0..50 {
            let op = rustix::fs::FlockOperation::NonBlockingLockExclusive;
            if rustix::fs::flock(&file, op).is_ok() {
                locked = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if !locked {
            return Err(Error::refused(
                path,
                "another program holds a lock on it (open for writing elsewhere)",
            ));
        }
        let Some(footer) = img.footer().cloned() else {
            return Err(Error::wrong_kind(
                path,
                "write",
                format,
                "is not a VHD (raw images are written as plain files)",
            ));
        };
        let (bat, table_offset) = match (img.bat(), img.header()) {
            (Some(b), Some(h)) => {
                let mut entries = b.entries.clone();
                entries.resize(img.block_count() as usize, UNALLOCATED);
                (entries, h.table_offset)
            }
            _ => (Vec::new(), 0),
        };
        if let Some(h) = img.header() {
            check_blocks(&img, h, &bat)?;
        }
        let footer_bytes = footer.to_bytes();
        Ok(VhdWriter {
            file,
            path: path.to_path_buf(),
            format,
            size: img.virtual_size(),
            block_size: img.block_size(),
            bitmap_size: img.bitmap_size(),
            table_offset,
            footer_bytes,
            meta: Mutex::new(Meta {
                bat,
                end: img.data_end(),
                dirty_bat: BTreeSet::new(),
                dirty_bitmaps: BTreeSet::new(),
                bitmaps: HashMap::new(),
                full: HashSet::new(),
            }),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            gate: RwLock::new(()),
            log,
            img,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Fixed, dynamic or differencing.
    pub fn disk_type(&self) -> Format {
        self.format
    }
    /// The virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }
    /// The parent of a differencing disk (read-only).
    pub fn parent(&self) -> Option<&Image> {
        self.img.parent()
    }

    fn file_write(&self, buf: &[u8], off: u64) -> Result<()> {
        if let Some(l) = &self.log {
            l.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(FileOp::Write(off, buf.to_vec()));
        }
        WriteAt::write_all_at(&self.file, buf, off)
            .map_err(|e| Error::io_at(&self.path, "write", off, e))
    }

    fn file_read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        ReadAt::read_exact_at(&self.file, buf, off)
            .map_err(|e| Error::io_at(&self.path, "read", off, e))
    }

    fn sync(&self) -> Result<()> {
        if let Some(l) = &self.log {
            l.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(FileOp::Sync);
        }
        self.file.sync_data().map_err(io_err(&self.path, "sync"))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                path: Some(self.path.clone()),
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Writes `buf` at virtual `offset`: any length, any alignment. Safe
    /// to call from many threads at once.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] when the range leaves the disk; [`Error::Limit`]
    /// when a new block would lie beyond the format's 32-bit sector
    /// offsets; I/O errors.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let _g = self
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.format == Format::Fixed {
            return self.file_write(buf, offset);
        }
        for (b, in_block, r) in block_pieces(offset, buf.len(), self.block_size) {
            self.write_block(b, in_block, &buf[r])?;
        }
        Ok(())
    }

    /// True when virtual `offset..offset + len` reads as zeros beneath this
    /// file (no parent, or zeros in the parent's chain).
    fn backing_is_zero(&self, offset: u64, len: u64) -> Result<bool> {
        match self.img.parent() {
            None => Ok(true),
            Some(p) => {
                // A parent smaller than the child reads as zeros past its end.
                let n = p.virtual_size().saturating_sub(offset).min(len);
                Ok(n == 0 || p.map(offset, n)?.iter().all(|e| e.kind == ExtentKind::Zero))
            }
        }
    }

    /// Reads what lies beneath this file: the parent, or zeros.
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.img.parent() {
            Some(p) => {
                // A parent smaller than the child reads as zeros past its end.
                let n = p
                    .virtual_size()
                    .saturating_sub(offset)
                    .min(buf.len() as u64) as usize;
                buf[n..].fill(0);
                if n > 0 {
                    p.read_exact_at(&mut buf[..n], offset)?;
                }
                Ok(())
            }
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// The bitmap of block `b`, stored at `base`: `None` when all its bits
    /// are set, else the bitmap (cached until the next flush, or read).
    fn bitmap(&self, b: u64, base: u64) -> Result<Option<Vec<u8>>> {
        {
            let m = self
                .meta
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if m.full.contains(&b) {
                return Ok(None);
            }
            if let Some(bm) = m.bitmaps.get(&b) {
                return Ok(Some(bm.clone()));
            }
        }
        let mut bm = vec![0u8; self.bitmap_size as usize];
        self.file_read(&mut bm, base)?;
        let mut m = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if SectorBitmap(&bm).all_set(self.block_size / SECTOR) {
            m.full.insert(b);
            return Ok(None);
        }
        m.bitmaps.entry(b).or_insert(bm.clone());
        Ok(Some(bm))
    }

    /// Gives block `b` a slot at the end of the file; returns its BAT entry.
    fn allocate(&self, b: u64) -> Result<u32> {
        let mut m = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bmp = self.bitmap_size;
        let slot = placement::next_block_offset(m.end, bmp);
        let entry = placement::offset_entry(slot).ok_or_else(|| Error::Limit {
            path: self.path.clone(),
            what: crate::error::LimitOf::BlockSectorOffset,
            value: slot / SECTOR,
            limit: u64::from(u32::MAX),
        })?;
        let new_end = slot + bmp + self.block_size;
        // 1. The footer at the new end: the file always ends with one.
        self.file_write(&self.footer_bytes, new_end)?;
        // 2. The bitmap (over the old footer, now unreferenced).
        let mut bitmap = vec![0u8; bmp as usize];
        if self.format == Format::Dynamic {
            SectorBitmap::set_range(&mut bitmap, 0, self.block_size / SECTOR);
        }
        self.file_write(&bitmap, slot)?;
        m.end = new_end;
        m.bat[b as usize] = entry;
        m.dirty_bat.insert(placement::bat_sector_of(b));
        if self.format == Format::Dynamic {
            m.full.insert(b);
        } else {
            m.bitmaps.insert(b, bitmap);
        }
        Ok(entry)
    }

    fn write_block(&self, b: u64, in_block: u64, data: &[u8]) -> Result<()> {
        let _s = self.stripes[b as usize % STRIPES]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let vbase = b * self.block_size;
        let len = data.len() as u64;
        let mut entry = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .bat[b as usize];
        if entry == UNALLOCATED {
            if data.iter().all(|&x| x == 0) && self.backing_is_zero(vbase + in_block, len)? {
                return Ok(());
            }
            entry = self.allocate(b)?;
        }
        let base = entry_offset(entry);
        let data_at = base + self.bitmap_size;
        let Some(mut bitmap) = self.bitmap(b, base)? else {
            // Every sector is the block's own: the bytes go in place.
            return self.file_write(data, data_at + in_block);
        };
        let bits = SectorBitmap(&bitmap);
        let s0 = in_block / SECTOR;
        let s1 = (in_block + len).div_ceil(SECTOR);
        let head_partial = in_block % SECTOR != 0;
        let tail_partial = (in_block + len) % SECTOR != 0;
        let needs_fill =
            (head_partial && !bits.is_set(s0)) || (tail_partial && !bits.is_set(s1 - 1));
        if needs_fill {
            // Whole sectors: the partial ones completed from what they hold
            // now (the file when claimed, else the parent or zeros).
            let start = s0 * SECTOR;
            let mut full = vec![0u8; ((s1 - s0) * SECTOR) as usize];
            let last = full.len() - SECTOR as usize;
            for (s, at) in [(s0, 0usize), (s1 - 1, last)] {
                let sec = &mut full[at..at + SECTOR as usize];
                if bits.is_set(s) {
                    self.file_read(sec, data_at + s * SECTOR)?;
                } else {
                    self.read_backing(sec, vbase + s * SECTOR)?;
                }
            }
            let from = (in_block - start) as usize;
            full[from..from + data.len()].copy_from_slice(data);
            self.file_write(&full, data_at + start)?;
        } else {
            self.file_write(data, data_at + in_block)?;
        }
        if !bits.all_set_in(s0, s1) {
            SectorBitmap::set_range(&mut bitmap, s0, s1);
            let mut m = self
                .meta
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            m.bitmaps.insert(b, bitmap);
            m.dirty_bitmaps.insert(b);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of the disk at `offset`, as written so far
    /// (flushed or not). Safe to call from many threads at once.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] when the range leaves the disk; I/O errors.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let _g = self
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.format == Format::Fixed {
            return self.file_read(buf, offset);
        }
        for (b, in_block, r) in block_pieces(offset, buf.len(), self.block_size) {
            self.read_block(b, in_block, &mut buf[r])?;
        }
        Ok(())
    }

    fn read_block(&self, b: u64, in_block: u64, out: &mut [u8]) -> Result<()> {
        let _s = self.stripes[b as usize % STRIPES]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let vbase = b * self.block_size;
        let entry = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .bat[b as usize];
        if entry == UNALLOCATED {
            return self.read_backing(out, vbase + in_block);
        }
        let base = entry_offset(entry);
        let Some(bitmap) = self.bitmap(b, base)? else {
            return self.file_read(out, base + self.bitmap_size + in_block);
        };
        let end = in_block + out.len() as u64;
        for (s, n, set) in SectorBitmap(&bitmap).runs(in_block / SECTOR, end.div_ceil(SECTOR)) {
            let from = (s * SECTOR).max(in_block);
            let to = ((s + n) * SECTOR).min(end);
            let dst = &mut out[(from - in_block) as usize..(to - in_block) as usize];
            if set {
                self.file_read(dst, base + self.bitmap_size + from)?;
            } else {
                self.read_backing(dst, vbase + from)?;
            }
        }
        Ok(())
    }

    /// Makes every write so far durable: syncs the data, then writes the
    /// changed bitmaps and BAT sectors, then syncs again (see the
    /// [module documentation](self) for why this order).
    ///
    /// # Errors
    /// I/O errors.
    pub fn flush(&self) -> Result<()> {
        let _g = self
            .gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.sync()?;
        if self.format == Format::Fixed {
            return Ok(());
        }
        let mut m = self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.dirty_bat.is_empty() && m.dirty_bitmaps.is_empty() {
            return Ok(());
        }
        // The dirty sets are cleared only once written: a flush that fails
        // leaves them for the next one.
        let dirty: Vec<u64> = m.dirty_bitmaps.iter().copied().collect();
        for b in dirty {
            let at = entry_offset(m.bat[b as usize]);
            self.file_write(&m.bitmaps[&b], at)?;
            m.dirty_bitmaps.remove(&b);
        }
        // What is on disk need not be kept: the cache stays as small as
        // the writes between two flushes (full blocks cost a set entry).
        let sectors = self.block_size / SECTOR;
        let m = &mut *m;
        for (b, bm) in m.bitmaps.drain() {
            if SectorBitmap(&bm).all_set(sectors) {
                m.full.insert(b);
            }
        }
        let dirty: Vec<u64> = m.dirty_bat.iter().copied().collect();
        for sec in dirty {
            let mut bytes = vec![0xffu8; SECTOR as usize];
            let first = (sec * ENTRIES_PER_SECTOR) as usize;
            let per_sector = ENTRIES_PER_SECTOR as usize;
            for (i, e) in m.bat.iter().skip(first).take(per_sector).enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&e.to_be_bytes());
            }
            // The BAT on disk may hold more entries than the disk has blocks:
            // keep those as they are.
            let on_disk: &[u32] = self.img.bat().map(|b| &b.entries[..]).unwrap_or_default();
            for i in m.bat.len().max(first)..on_disk.len().min(first + per_sector) {
                let e = on_disk[i];
                bytes[(i - first) * 4..(i - first) * 4 + 4].copy_from_slice(&e.to_be_bytes());
            }
            self.file_write(&bytes, placement::bat_sector_at(self.table_offset, sec))?;
            m.dirty_bat.remove(&sec);
        }
        self.sync()
    }

    /// Flushes and closes, reporting what the implicit flush of `drop`
    /// cannot.
    ///
    /// # Errors
    /// Those of [`VhdWriter::flush`].
    pub fn close(self) -> Result<()> {
        self.flush()
    }

    /// A `Read + Write + Seek` view starting at offset 0.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor { w: self, pos: 0 }
    }
}

impl Drop for VhdWriter {
    /// Flushes (best effort: call [`VhdWriter::close`] to see errors), so
    /// that a dropped writer does not leave its new blocks out of the BAT.
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Refuses an image whose blocks overlap its metadata (footer copy,
/// header, BAT, parent locator data) or each other: a write into such a
/// block would overwrite what it overlaps. (`Image::open` refuses such
/// images today; this check keeps the writer safe whatever the reader
/// comes to tolerate.)
fn check_blocks(img: &Image, h: &crate::ondisk::DynamicHeader, bat: &[u32]) -> Result<()> {
    let mut meta_end = (img.header_offset() + crate::ondisk::HEADER_SIZE as u64).max(
        placement::bat_end(h.table_offset, u64::from(h.max_table_entries)),
    );
    for l in h.parent_locators.iter().filter(|l| !l.is_empty()) {
        meta_end = meta_end.max(l.data_offset.saturating_add(u64::from(l.data_length)));
    }
    let span = img.bitmap_size() + img.block_size();
    let mut blocks: Vec<(u64, usize)> = bat
        .iter()
        .enumerate()
        .filter(|(_, &e)| e != UNALLOCATED)
        .map(|(i, &e)| (entry_offset(e), i))
        .collect();
    blocks.sort_unstable();
    let refuse = |i: usize, at: u64, what: String| {
        Err(Error::corrupt(
            Structure::BatEntry(i as u64),
            "block sector offset",
            h.table_offset + 4 * i as u64,
            format!("sector {} (block at offset {at})", at / SECTOR),
            format!("a block that does not overlap {what} (it cannot be written)"),
        )
        .with_path(img.path()))
    };
    let mut prev: Option<(u64, usize)> = None;
    for &(at, i) in &blocks {
        if at < meta_end {
            return refuse(i, at, format!("the metadata, which ends at {meta_end}"));
        }
        if let Some((p, j)) = prev {
            if at < p + span {
                return refuse(i, at, format!("the block of BAT entry {j} at {p}"));
            }
        }
        prev = Some((at, i));
    }
    Ok(())
}

trait AllSetIn {
    fn all_set_in(&self, s0: u64, s1: u64) -> bool;
}

impl AllSetIn for SectorBitmap<'_> {
    fn all_set_in(&self, s0: u64, s1: u64) -> bool {
        (s0..s1).all(|s| self.is_set(s))
    }
}

/// A `Read + Write + Seek` adapter over a [`VhdWriter`], like
/// [`crate::Reader`] over an image.
#[derive(Debug)]
pub struct Cursor<'a> {
    w: &'a VhdWriter,
    pos: u64,
}

impl Cursor<'_> {
    /// The current offset.
    pub fn position(&self) -> u64 {
        self.pos
    }
}

impl std::io::Write for Cursor<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.w.size.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(room) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "at the end of the disk",
            ));
        }
        self.w
            .write_all_at(&buf[..n], self.pos)
            .map_err(std::io::Error::from)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush().map_err(std::io::Error::from)
    }
}

impl std::io::Read for Cursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.w.size.saturating_sub(self.pos)) as usize;
        self.w
            .read_exact_at(&mut buf[..n], self.pos)
            .map_err(std::io::Error::from)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for Cursor<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            std::io::SeekFrom::Start(o) => Some(o),
            std::io::SeekFrom::End(d) => self.w.size.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )),
        }
    }
}
