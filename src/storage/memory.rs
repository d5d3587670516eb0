//! Bytes in memory as a storage.

use super::Storage;
use crate::io::ReadAt;
use std::io;

/// An image's bytes held in memory: for embedding, fuzzing and tests.
#[derive(Clone, Debug, Default)]
pub struct MemoryStorage {
    bytes: Vec<u8>,
}

impl MemoryStorage {
    /// Storage over `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        MemoryStorage { bytes }
    }
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// The bytes, given back.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

impl ReadAt for MemoryStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        ReadAt::read_exact_at(self.bytes.as_slice(), buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }
}

impl Storage for MemoryStorage {}
