//! Where an image's bytes live: a positional storage with a hint of which
//! ranges hold data.
//!
//! [`Storage`] is what an [`Image`](crate::Image) reads from. Two kinds come
//! with the crate: [`FileStorage`] (a local file or block device, read with
//! `pread` or through a memory mapping, its holes found with `SEEK_DATA`) and
//! [`MemoryStorage`] (bytes in memory: embedding, fuzzing, tests). Another
//! source (a page blob, say) is one more implementation of the trait, with
//! its allocated ranges as the data hint.

mod file;
mod memory;
pub(crate) mod mmap;

pub use file::FileStorage;
pub use memory::MemoryStorage;

use crate::io::ReadAt;
use std::fs::File;
use std::io;
use std::ops::Range;

/// Bytes at positions: read at an offset from many threads at once, a
/// length, and an optional hint of which ranges hold data.
pub trait Storage: ReadAt + Send + std::fmt::Debug {
    /// The ranges of `start..end` that may hold data, in order; the rest is
    /// known to read as zeros and need not be read. The default, for a
    /// storage that cannot tell, is the whole range.
    ///
    /// # Errors
    /// I/O errors of the storage.
    fn data_ranges(&self, start: u64, end: u64) -> io::Result<Vec<Range<u64>>> {
        let mut v = Vec::new();
        if start < end {
            v.push(start..end);
        }
        Ok(v)
    }

    /// The local file beneath, for the operations that need one (in-place
    /// rewrites, hole punching, memory mapping). `None` for other storages.
    fn file(&self) -> Option<&File> {
        None
    }

    /// The local file beneath when `len` bytes at `offset` read exactly as
    /// that file holds them at the same offset, for mapping or reading them
    /// there directly. The default is [`Storage::file`]; a storage that
    /// changes some ranges of its file (a VHDX's replayed log) offers it
    /// for the others.
    fn file_at(&self, offset: u64, len: u64) -> Option<&File> {
        let _ = (offset, len);
        self.file()
    }

    /// An identity that two handles of one underlying object share (device
    /// and inode for a file), used to find loops in parent chains. `None`
    /// when the storage has none; each handle is then its own.
    fn identity(&self) -> Option<(u64, u64)> {
        None
    }
}

/// `len` bytes of `storage` at `offset`, held for a while: mapped for a large
/// window of a file, copied otherwise.
pub(crate) fn window(storage: &dyn Storage, offset: u64, len: u64) -> io::Result<mmap::Window> {
    if let Some(f) = storage.file_at(offset, len) {
        return mmap::window(f, offset, len);
    }
    let n = usize::try_from(len).map_err(|_| io::Error::other("window too large"))?;
    let mut v = vec![0u8; n];
    storage.read_exact_at(&mut v, offset)?;
    Ok(mmap::Window::Read(v))
}

thread_local! {
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Calls `f` with `len` bytes of `storage` at `offset`: a mapping of a
/// file's large window (no copy), a per-thread buffer otherwise.
pub(crate) fn with_bytes<R>(
    storage: &dyn Storage,
    offset: u64,
    len: u64,
    f: impl FnOnce(&[u8]) -> R,
) -> io::Result<R> {
    if let Some(file) = storage.file_at(offset, len) {
        return mmap::with_bytes(file, offset, len, f);
    }
    let n = usize::try_from(len).map_err(|_| io::Error::other("window too large"))?;
    BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.resize(n, 0);
        storage.read_exact_at(&mut buf[..n], offset)?;
        Ok(f(&buf[..n]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_windows_copy_the_bytes_and_refuse_overruns() {
        let m = MemoryStorage::new((0..200u8).collect());
        assert_eq!(&*window(&m, 10, 5).unwrap(), &[10, 11, 12, 13, 14]);
        assert!(window(&m, 198, 5).is_err());
        assert_eq!(
            with_bytes(&m, 100, 2, |b| b.to_vec()).unwrap(),
            vec![100, 101]
        );
        assert_eq!(m.data_ranges(5, 9).unwrap(), vec![5..9]);
        assert!(m.data_ranges(9, 9).unwrap().is_empty());
    }
}
