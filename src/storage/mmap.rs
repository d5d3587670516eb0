//! Memory-mapped windows of a file: the one module with `unsafe` code
//! (mapping a file is unsafe in Rust's terms; see the SAFETY comment).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

/// Windows at least this large are memory-mapped; smaller ones are read.
const MAP_THRESHOLD: u64 = 256 * 1024;

thread_local! {
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Bytes of a file held for a while: a read-only mapping or a copy.
pub(crate) enum Window {
    /// A mapping of the file (large windows).
    Mapped(memmap2::Mmap),
    /// A copy (small windows).
    Read(Vec<u8>),
}

impl std::ops::Deref for Window {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Window::Mapped(m) => m,
            Window::Read(v) => v,
        }
    }
}

/// Fails with `UnexpectedEof` when `offset + len` lies past the end of the
/// file as it is now: touching a mapped page past the end raises SIGBUS,
/// which would kill the process (leaving temporary outputs behind) where a
/// read reports an error. Inputs are validated against their length when
/// opened, but a file may shrink after that.
fn check_mappable(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let file_len = crate::io::file_len(file)?;
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{len} bytes at offset {offset} lie past the end of the file ({file_len} bytes)"
            ),
        ));
    }
    Ok(())
}

/// A read-only mapping of `len` bytes of `file` at `offset`.
fn map(file: &File, offset: u64, len: usize) -> io::Result<memmap2::Mmap> {
    check_mappable(file, offset, len as u64)?;
    // SAFETY: the mapping is read-only and lives for one window. vhdkit never
    // writes to its inputs while reading them, and the length was checked
    // just above; another process truncating the file meanwhile could still
    // raise SIGBUS, the usual caveat of mapped I/O.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .populate()
            .map(file)
    }
}

/// `len` bytes of `file` at `offset`, mapped when large, read when small.
pub(crate) fn window(file: &File, offset: u64, len: u64) -> io::Result<Window> {
    let n = usize::try_from(len).map_err(|_| io::Error::other("window too large"))?;
    if len >= MAP_THRESHOLD {
        return Ok(Window::Mapped(map(file, offset, n)?));
    }
    let mut v = vec![0u8; n];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut v, offset)?;
    Ok(Window::Read(v))
}

/// Calls `f` with `len` bytes of `file` at `offset`: a read-only mapping for
/// large windows (no copy), a per-thread buffer for small ones. The mapping
/// lives only for the call, so resident memory stays at one window per
/// thread whatever the file's size.
pub(crate) fn with_bytes<R>(
    file: &File,
    offset: u64,
    len: u64,
    f: impl FnOnce(&[u8]) -> R,
) -> io::Result<R> {
    let n = usize::try_from(len).map_err(|_| io::Error::other("window too large"))?;
    if len >= MAP_THRESHOLD {
        return Ok(f(&map(file, offset, n)?));
    }
    BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.resize(n, 0);
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf[..n], offset)?;
        Ok(f(&buf[..n]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_read_small_and_map_large() {
        let f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).unwrap();
        let small = with_bytes(&f, 1000, 10, |b| b.to_vec()).unwrap();
        assert_eq!(small, &data[1000..1010]);
        let large = with_bytes(&f, 4097, 500_000, |b| b.to_vec()).unwrap();
        assert_eq!(large, &data[4097..504_097]);
    }
}
