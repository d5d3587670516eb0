//! `Read + Seek` over a virtual disk, for crates that want a stream.

use super::Image;
use std::io::{self, Read, Seek, SeekFrom};

/// A cursor over an [`Image`]'s virtual disk. Reads stop at the virtual size.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    image: &'a Image,
    pos: u64,
}

impl Image {
    /// A `Read + Seek` cursor over the virtual disk, starting at offset 0.
    pub fn reader(&self) -> Reader<'_> {
        Reader {
            image: self,
            pos: 0,
        }
    }
}

impl Reader<'_> {
    /// The current position.
    pub fn position(&self) -> u64 {
        self.pos
    }
}

impl Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.image.virtual_size();
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - self.pos) as usize;
        self.image.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Reader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let (base, delta) = match to {
            SeekFrom::Start(p) => {
                self.pos = p;
                return Ok(p);
            }
            SeekFrom::End(d) => (self.image.virtual_size(), d),
            SeekFrom::Current(d) => (self.pos, d),
        };
        let p = base.checked_add_signed(delta).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )
        })?;
        self.pos = p;
        Ok(p)
    }
}

/// A `Read + Seek` cursor that owns its [`Image`] (see [`Image::into_reader`]),
/// for callers that hand the stream on.
#[derive(Debug)]
pub struct OwnedReader {
    image: Image,
    pos: u64,
}

impl Image {
    /// A `Read + Seek` cursor that owns the image, starting at offset 0.
    pub fn into_reader(self) -> OwnedReader {
        OwnedReader {
            image: self,
            pos: 0,
        }
    }
}

impl OwnedReader {
    /// The current position.
    pub fn position(&self) -> u64 {
        self.pos
    }
    /// The image read.
    pub fn image(&self) -> &Image {
        &self.image
    }
    /// The image, given back.
    pub fn into_inner(self) -> Image {
        self.image
    }
}

impl Read for OwnedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut r = Reader {
            image: &self.image,
            pos: self.pos,
        };
        let n = r.read(buf)?;
        self.pos = r.pos;
        Ok(n)
    }
}

impl Seek for OwnedReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let mut r = Reader {
            image: &self.image,
            pos: self.pos,
        };
        let p = r.seek(to)?;
        self.pos = p;
        Ok(p)
    }
}
