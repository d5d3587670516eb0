//! A local file (or block device) as a storage.

use super::Storage;
use crate::io::ReadAt;
use std::fs::File;
use std::io;
use std::ops::Range;

/// A local file or block device, read with `pread` (and, for large windows,
/// through a read-only memory mapping), its holes found with `SEEK_DATA`.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Storage over an open file.
    pub fn new(file: File) -> Self {
        FileStorage { file }
    }
    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl ReadAt for FileStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        ReadAt::read_exact_at(&self.file, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        crate::io::file_len(&self.file)
    }
}

impl Storage for FileStorage {
    fn data_ranges(&self, start: u64, end: u64) -> io::Result<Vec<Range<u64>>> {
        crate::io::data_ranges(&self.file, start, end)
    }
    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
    fn identity(&self) -> Option<(u64, u64)> {
        let st = rustix::fs::fstat(&self.file).ok()?;
        Some((st.st_dev, st.st_ino))
    }
}
