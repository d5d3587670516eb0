//! Positional I/O on `&self`, and sparse-file helpers.
//!
//! Everything in vhdkit reads with [`ReadAt::read_exact_at`], so rayon
//! workers share one file without locks or seeks.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

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
        Ok(self.metadata()?.len())
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
