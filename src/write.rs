//! Output layouts and their metadata: sparse raw, fixed VHD (optionally
//! Azure-sized) and dynamic VHD, plus the atomic-output helper every
//! writing operation uses.

use crate::error::{Error, Result};
use crate::io::WriteAt;
use crate::ondisk::{
    bitmap_size, Bat, DiskType, DynamicHeader, Footer, FOOTER_SIZE, HEADER_SIZE, SECTOR,
};
use std::fs::File;
use std::path::{Path, PathBuf};

/// One MiB, the unit of Azure's size rule.
pub const MIB: u64 = 1 << 20;

/// The smallest and largest block sizes vhdkit writes.
pub const MIN_BLOCK_SIZE: u32 = 512 * 1024;
/// See [`MIN_BLOCK_SIZE`].
pub const MAX_BLOCK_SIZE: u32 = 256 * 1024 * 1024;
/// The default block size of dynamic outputs.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 * 1024 * 1024;

/// The largest virtual size the VHD format holds: 2040 GiB.
pub const MAX_VHD_SIZE: u64 = 2040 * 1024 * 1024 * 1024;

/// Where data blocks start in a dynamic file: data is aligned to this, as
/// Hyper-V does, so that zero pages of a block can be holes.
const DATA_ALIGN: u64 = 4096;

/// The layout of a dynamic VHD of a given size and block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DynamicLayout {
    /// Virtual size in bytes.
    pub size: u64,
    /// Bytes of data per block.
    pub block_size: u64,
    /// Bytes of sector bitmap per block.
    pub bitmap_size: u64,
    /// BAT entries: ceil(size / block size).
    pub entries: u64,
    /// Absolute offset of the BAT.
    pub table_offset: u64,
    /// Offset of the first block's bitmap.
    pub first_block: u64,
    /// Distance between consecutive blocks' bitmaps.
    pub stride: u64,
}

impl DynamicLayout {
    /// The layout for `size` bytes in blocks of `block_size`.
    pub fn new(size: u64, block_size: u32) -> DynamicLayout {
        let bs = u64::from(block_size);
        let bmp = bitmap_size(block_size);
        let entries = size.div_ceil(bs);
        let table_offset = (FOOTER_SIZE + HEADER_SIZE) as u64;
        let meta_end = table_offset + Bat::disk_size(entries);
        let first_data = (meta_end + bmp).div_ceil(DATA_ALIGN) * DATA_ALIGN;
        DynamicLayout {
            size,
            block_size: bs,
            bitmap_size: bmp,
            entries,
            table_offset,
            first_block: first_data - bmp,
            stride: (bmp + bs).div_ceil(DATA_ALIGN) * DATA_ALIGN,
        }
    }

    /// The file offset of the bitmap of the `slot`-th allocated block.
    pub fn block_offset(&self, slot: u64) -> u64 {
        self.first_block + slot * self.stride
    }

    /// The file length when `allocated` blocks are stored (footer included).
    pub fn file_len(&self, allocated: u64) -> u64 {
        let end = if allocated == 0 {
            self.table_offset + Bat::disk_size(self.entries)
        } else {
            self.block_offset(allocated - 1) + self.bitmap_size + self.block_size
        };
        end + FOOTER_SIZE as u64
    }

    /// The BAT entry (a sector number) for a block stored at `slot`.
    pub fn bat_entry(&self, slot: u64) -> Result<u32> {
        u32::try_from(self.block_offset(slot) / SECTOR).map_err(|_| {
            Error::InvalidArgument(format!(
                "a dynamic VHD of {} bytes does not fit the format's 32-bit sector offsets",
                self.size
            ))
        })
    }

    /// Writes footer copy, header, BAT, the bitmaps of allocated blocks (all
    /// bits set) and the end footer. `bat` maps block index to slot.
    pub fn write_metadata(&self, out: &impl WriteAt, footer: &Footer, bat: &Bat) -> Result<u64> {
        let fb = footer.to_bytes();
        let header = DynamicHeader::new(
            self.table_offset,
            self.entries as u32,
            self.block_size as u32,
        );
        let allocated = bat.allocated() as u64;
        let file_len = self.file_len(allocated);
        let mut written = 0u64;
        out.write_all_at(&fb, 0)?;
        out.write_all_at(&header.to_bytes(), FOOTER_SIZE as u64)?;
        let bat_bytes = bat.to_bytes();
        out.write_all_at(&bat_bytes, self.table_offset)?;
        written += (2 * FOOTER_SIZE + HEADER_SIZE + bat_bytes.len()) as u64;
        // Bits beyond the block's sectors stay clear; bits for sectors past
        // the virtual size are set (the block is whole on disk).
        let sectors = self.block_size / SECTOR;
        let mut bitmap = vec![0u8; self.bitmap_size as usize];
        crate::ondisk::SectorBitmap::set_range(&mut bitmap, 0, sectors);
        for &e in &bat.entries {
            if e != crate::ondisk::UNALLOCATED {
                out.write_all_at(&bitmap, u64::from(e) * SECTOR)?;
                written += self.bitmap_size;
            }
        }
        out.write_all_at(&fb, file_len - FOOTER_SIZE as u64)?;
        Ok(written)
    }
}

/// A footer for a new output of `size` bytes.
pub fn new_footer(disk_type: DiskType, size: u64) -> Footer {
    let data_offset = if disk_type == DiskType::Fixed {
        Footer::NO_DATA_OFFSET
    } else {
        FOOTER_SIZE as u64
    };
    Footer::new(disk_type, size, data_offset)
}

/// `size` rounded up to a whole MiB.
pub fn azure_size(size: u64) -> u64 {
    size.div_ceil(MIB) * MIB
}

/// An output written under a temporary name beside its target and renamed
/// into place by [`AtomicOutput::commit`] only when complete. Dropped
/// without commit (an error, a panic, a cancellation), it removes itself.
pub struct AtomicOutput {
    target: PathBuf,
    temp: tempfile::NamedTempFile,
    overwrite: bool,
}

impl AtomicOutput {
    /// Creates the temporary file in `target`'s folder. Fails with
    /// [`Error::OutputExists`] when the target exists and `overwrite` is off.
    pub fn create(target: &Path, overwrite: bool) -> Result<AtomicOutput> {
        if !overwrite && std::fs::symlink_metadata(target).is_ok() {
            return Err(Error::OutputExists(target.to_path_buf()));
        }
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // An ordinary file's mode (0666 less the umask), not tempfile's 0600;
        // a rewrite in place keeps the replaced file's mode.
        let mode = match std::fs::metadata(target) {
            Ok(m) if overwrite => m.permissions(),
            _ => std::os::unix::fs::PermissionsExt::from_mode(0o666),
        };
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".vhdkit-tmp")
            .permissions(mode)
            .tempfile_in(&dir)
            .map_err(|e| Error::io(&dir, "create temporary file in", e))?;
        Ok(AtomicOutput {
            target: target.to_path_buf(),
            temp,
            overwrite,
        })
    }

    /// The temporary file.
    pub fn file(&self) -> &File {
        self.temp.as_file()
    }

    /// The temporary file's path.
    pub fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    /// Syncs the data (when `sync`), renames the file into place and syncs
    /// the folder.
    pub fn commit(self, sync: bool) -> Result<()> {
        let target = self.target;
        if sync {
            self.temp
                .as_file()
                .sync_all()
                .map_err(|e| Error::io(self.temp.path(), "sync", e))?;
        }
        let persisted = if self.overwrite {
            self.temp.persist(&target).map(|_| ())
        } else {
            self.temp.persist_noclobber(&target).map(|_| ())
        };
        persisted.map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                Error::OutputExists(target.clone())
            } else {
                Error::io(&target, "rename into place", e.error)
            }
        })?;
        if let Some(dir) = target
            .parent()
            .filter(|d| sync && !d.as_os_str().is_empty())
        {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_layout_aligns_data_to_pages() {
        let l = DynamicLayout::new(10 << 20, DEFAULT_BLOCK_SIZE);
        assert_eq!(l.entries, 5);
        assert_eq!(l.table_offset, 1536);
        assert_eq!((l.block_offset(0) + l.bitmap_size) % 4096, 0);
        assert_eq!((l.block_offset(3) + l.bitmap_size) % 4096, 0);
        assert!(l.block_offset(0) >= 1536 + 512);
        assert_eq!(l.file_len(0), 1536 + 512 + 512);
        let big = DynamicLayout::new(1 << 30, MAX_BLOCK_SIZE);
        assert_eq!(big.bitmap_size, 64 << 10);
        assert_eq!((big.block_offset(1) + big.bitmap_size) % 4096, 0);
    }

    #[test]
    fn azure_rounds_up_only() {
        assert_eq!(azure_size(0), 0);
        assert_eq!(azure_size(1), MIB);
        assert_eq!(azure_size(MIB), MIB);
        assert_eq!(azure_size(MIB + 512), 2 * MIB);
    }

    #[test]
    fn atomic_output_leaves_nothing_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.vhd");
        {
            let o = AtomicOutput::create(&target, false).unwrap();
            o.file().write_all_at(b"partial", 0).unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let o = AtomicOutput::create(&target, false).unwrap();
        o.file().write_all_at(b"done", 0).unwrap();
        o.commit(true).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"done");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&target).unwrap().permissions(),
        );
        assert_eq!(
            mode & 0o644,
            0o644,
            "an ordinary file's mode, not 0600: {mode:o}"
        );
        assert!(matches!(
            AtomicOutput::create(&target, false),
            Err(Error::OutputExists(_))
        ));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
