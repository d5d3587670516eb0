//! A sink that keeps the disk in memory: for tests and embedding.

use super::Sink;
use crate::error::{Error, Result};
use std::sync::Mutex;

/// The virtual disk's bytes in memory (`size` bytes, zeros where nothing
/// was written).
#[derive(Debug)]
pub struct MemorySink {
    bytes: Mutex<Vec<u8>>,
}

impl MemorySink {
    /// A disk of `size` zero bytes.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] when `size` does not fit in memory's
    /// address space.
    pub fn new(size: u64) -> Result<Self> {
        let n = usize::try_from(size).map_err(|_| {
            Error::invalid_option("size", size, format!("{size} bytes do not fit in memory"))
        })?;
        Ok(MemorySink {
            bytes: Mutex::new(vec![0u8; n]),
        })
    }
    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

impl Sink for MemorySink {
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let start = usize::try_from(offset).ok();
        let range = start.and_then(|s| Some(s..s.checked_add(data.len())?));
        match range.filter(|r| r.end <= b.len()) {
            Some(r) => {
                b[r].copy_from_slice(data);
                Ok(())
            }
            None => Err(Error::OutOfRange {
                path: None,
                offset,
                len: data.len() as u64,
                size: b.len() as u64,
            }),
        }
    }
}
