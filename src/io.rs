//! Positional I/O on `&self`, and sparse-file helpers.
//!
//! Everything in vhdkit reads with [`ReadAt::read_exact_at`], so rayon
//! workers share one file without locks or seeks.

use crate::error::{Error, Result};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Reads at an absolute offset without moving any cursor; safe to call from
/// many threads at once.
pub trait ReadAt: Sync {
    /// Fills `buf` from `offset`, or fails with `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The length of the source in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True when the source is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Writes at an absolute offset without moving any cursor.
pub trait WriteAt: Sync {
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        file_len(self)
    }
}

impl WriteAt for File {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
}

fn slice_read_at(src: &[u8], buf: &mut [u8], offset: u64) -> io::Result<()> {
    let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
    let end = start
        .checked_add(buf.len())
        .filter(|&e| e <= src.len())
        .ok_or(io::ErrorKind::UnexpectedEof)?;
    buf.copy_from_slice(&src[start..end]);
    Ok(())
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        slice_read_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        slice_read_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.as_slice().len() as u64)
    }
}

impl ReadAt for memmap2::Mmap {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        slice_read_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

/// The length of an open file in bytes: its size for a regular file, the
/// device's size for a block device (whose `st_size` is 0), found by seeking
/// to its end. vhdkit reads at absolute offsets only, so the file's cursor
/// does not matter.
pub fn file_len(file: &File) -> io::Result<u64> {
    use rustix::fs::{fstat, seek, FileType, SeekFrom};
    let st = fstat(file)?;
    if FileType::from_raw_mode(st.st_mode) == FileType::BlockDevice {
        return Ok(seek(file, SeekFrom::End(0))?);
    }
    Ok(st.st_size as u64)
}

/// A file type in words, for messages.
pub(crate) fn type_name(t: rustix::fs::FileType) -> &'static str {
    use rustix::fs::FileType;
    match t {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a folder",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "a file of unknown type",
    }
}

/// Flags of every open of an image or a candidate parent: `O_NONBLOCK`, so
/// that opening a FIFO with no writer (or a device waiting for a carrier)
/// returns at once instead of blocking for good; `O_NOCTTY`, so that a
/// terminal never becomes the process's controlling terminal.
pub(crate) fn open_flags(writable: bool) -> rustix::fs::OFlags {
    use rustix::fs::OFlags;
    let mode = if writable {
        OFlags::RDWR
    } else {
        OFlags::RDONLY
    };
    mode | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC
}

/// Checks with `fstat` what a file opened with [`open_flags`] is, before
/// anything is read from it. A regular file (and, with `block_ok`, a block
/// device) gets `O_NONBLOCK` cleared and its length returned; anything else
/// is returned as its type, untouched.
pub(crate) fn settle(
    file: &File,
    block_ok: bool,
) -> io::Result<std::result::Result<u64, rustix::fs::FileType>> {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, fstat, FileType, OFlags};
    let t = FileType::from_raw_mode(fstat(file)?.st_mode);
    if t != FileType::RegularFile && !(block_ok && t == FileType::BlockDevice) {
        return Ok(Err(t));
    }
    let flags = fcntl_getfl(file)?;
    if flags.contains(OFlags::NONBLOCK) {
        fcntl_setfl(file, flags - OFlags::NONBLOCK)?;
    }
    Ok(Ok(file_len(file)?))
}

/// Opens an input image without blocking and checks, before anything is
/// read, that it is a regular file or a block device (read at its real
/// size). A folder, a FIFO, a character device or a socket is refused.
/// Returns the file and its length.
pub(crate) fn open_input(path: &Path, writable: bool) -> Result<(File, u64)> {
    let fd = rustix::fs::open(path, open_flags(writable), rustix::fs::Mode::empty())
        .map_err(|e| Error::io(path, "open", e.into()))?;
    let file = File::from(fd);
    match settle(&file, true).map_err(|e| Error::io(path, "stat", e))? {
        Ok(len) => Ok((file, len)),
        Err(rustix::fs::FileType::Directory) => Err(Error::io(
            path,
            "open",
            io::Error::other("is a folder, not an image file"),
        )),
        Err(t) => Err(Error::NotAnImageFile {
            path: path.to_path_buf(),
            kind: type_name(t),
        }),
    }
}

/// The ranges of `start..end` that hold data according to the filesystem
/// (`SEEK_DATA`/`SEEK_HOLE`). Filesystems without hole support report the
/// whole range as data. Holes read as zeros, so a caller may skip them.
pub fn data_ranges(file: &File, start: u64, end: u64) -> io::Result<Vec<Range<u64>>> {
    use rustix::fs::{seek, SeekFrom};
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            // ENXIO: no data at or after pos.
            Err(rustix::io::Errno::NXIO) => break,
            // No SEEK_DATA support: everything is data.
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => {
                out.push(pos..end);
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h,
            Err(rustix::io::Errno::NXIO) => end,
            Err(e) => return Err(e.into()),
        };
        let stop = hole.min(end);
        if stop > data {
            out.push(data..stop);
        }
        pos = stop.max(data + 1);
    }
    Ok(out)
}

/// Deallocates `range` of `file`, which then reads as zeros. The file's
/// length is unchanged.
pub fn punch_hole(file: &File, range: Range<u64>) -> io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    if range.is_empty() {
        return Ok(());
    }
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        range.start,
        range.end - range.start,
    )?;
    Ok(())
}

/// Bytes the filesystem has allocated to `file` (`st_blocks` × 512).
pub fn allocated_bytes(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_read_at_offsets_and_refuse_overruns() {
        let v: Vec<u8> = (0..10).collect();
        let mut b = [0u8; 3];
        ReadAt::read_exact_at(&v, &mut b, 7).unwrap();
        assert_eq!(b, [7, 8, 9]);
        assert!(ReadAt::read_exact_at(&v, &mut b, 8).is_err());
        assert!(ReadAt::read_exact_at(&v, &mut b, u64::MAX).is_err());
    }

    #[test]
    fn finds_data_and_punches_holes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8 << 20).unwrap();
        FileExt::write_all_at(&f, &[1u8; 4096], 1 << 20).unwrap();
        FileExt::write_all_at(&f, &[2u8; 4096], 5 << 20).unwrap();
        let r = data_ranges(&f, 0, 8 << 20).unwrap();
        // Filesystems report at block granularity; the data must be covered.
        assert!(r.iter().any(|x| x.contains(&(1 << 20))), "{r:?}");
        assert!(r.iter().any(|x| x.contains(&(5 << 20))), "{r:?}");
        let covered: u64 = r.iter().map(|x| x.end - x.start).sum();
        assert!(covered < 8 << 20, "holes not reported: {r:?}");
        punch_hole(&f, (1 << 20)..(1 << 20) + 4096).unwrap();
        let mut b = [9u8; 4096];
        FileExt::read_exact_at(&f, &mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(f.metadata().unwrap().len(), 8 << 20);
    }
}
