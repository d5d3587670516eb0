//! Output layouts and their metadata: sparse raw, fixed VHD (optionally
//! Azure-sized) and dynamic VHD, plus the atomic-output helper every
//! writing operation uses.

use crate::error::{Error, Result};
use crate::io::WriteAt;
use crate::ondisk::placement::{self, HEADER_OFFSET, TABLE_OFFSET};
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

pub use crate::ondisk::MAX_VHD_SIZE;

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
        let entries = placement::bat_entries(size, bs);
        let table_offset = TABLE_OFFSET;
        let meta_end = placement::bat_end(table_offset, entries);
        DynamicLayout {
            size,
            block_size: bs,
            bitmap_size: bmp,
            entries,
            table_offset,
            first_block: placement::next_block_offset(meta_end, bmp),
            stride: placement::block_stride(bmp, bs),
        }
    }

    /// The file offset of the bitmap of the `slot`-th allocated block.
    pub fn block_offset(&self, slot: u64) -> u64 {
        self.first_block + slot * self.stride
    }

    /// The file length when `allocated` blocks are stored (footer included).
    pub fn file_len(&self, allocated: u64) -> u64 {
        let end = if allocated == 0 {
            placement::bat_end(self.table_offset, self.entries)
        } else {
            self.block_offset(allocated - 1) + self.bitmap_size + self.block_size
        };
        end + FOOTER_SIZE as u64
    }

    /// The BAT entry (a sector number) for a block stored at `slot`.
    pub fn bat_entry(&self, slot: u64) -> Result<u32> {
        placement::offset_entry(self.block_offset(slot)).ok_or_else(|| {
            Error::invalid_option(
                "size",
                self.size,
                format!(
                    "a dynamic VHD of {} bytes does not fit the format's 32-bit sector offsets",
                    self.size
                ),
            )
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
        // The file is named by the caller (`with_path`); the offset here.
        let put = |bytes: &[u8], at: u64| {
            out.write_all_at(bytes, at).map_err(|source| Error::Io {
                path: None,
                op: "write",
                offset: Some(at),
                source,
            })
        };
        put(&fb, 0)?;
        put(&header.to_bytes(), HEADER_OFFSET)?;
        let bat_bytes = bat.to_bytes();
        put(&bat_bytes, self.table_offset)?;
        written += (2 * FOOTER_SIZE + HEADER_SIZE + bat_bytes.len()) as u64;
        // Bits beyond the block's sectors stay clear; bits for sectors past
        // the virtual size are set (the block is whole on disk).
        let sectors = self.block_size / SECTOR;
        let mut bitmap = vec![0u8; self.bitmap_size as usize];
        crate::ondisk::SectorBitmap::set_range(&mut bitmap, 0, sectors);
        for &e in &bat.entries {
            if e != crate::ondisk::UNALLOCATED {
                put(&bitmap, crate::ondisk::entry_offset(e))?;
                written += self.bitmap_size;
            }
        }
        put(&fb, file_len - FOOTER_SIZE as u64)?;
        Ok(written)
    }
}

/// A footer for a new output of `size` bytes.
pub fn new_footer(disk_type: DiskType, size: u64) -> Footer {
    let data_offset = if disk_type == DiskType::Fixed {
        Footer::NO_DATA_OFFSET
    } else {
        HEADER_OFFSET
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
///
/// The temporary name is `.NAME.<pid>.<random>.vhdkit-tmp`, and the writer
/// holds an exclusive `flock` on it: a process killed outright (SIGKILL, a
/// power cut) cannot remove its temporary file, so [`AtomicOutput::create`]
/// removes those left for the same target by a process that no longer runs
/// and whose lock is gone (a writer in another PID namespace still holds
/// its lock), and leaves the others alone.
///
/// A block device named as the output with `overwrite` is written in place
/// instead: every byte of the output, zeros included (see
/// [`AtomicOutput::fill_zeros`]), no temporary file, no rename, synced at
/// the end. Any other non-regular output (a directory, FIFO, character
/// device, socket) is refused before anything is written.
pub struct AtomicOutput {
    target: PathBuf,
    /// The target's folder (`.` for a bare name): synced after the rename.
    folder: PathBuf,
    kind: OutputKind,
    overwrite: bool,
}

enum OutputKind {
    Temp(tempfile::NamedTempFile),
    /// A block device written directly, and its size in bytes.
    Device(File, u64),
}

/// The folder an output lands in: its parent, or `.` for a bare name.
pub(crate) fn output_folder(target: &Path) -> PathBuf {
    match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Refuses a folder that is missing or not a directory, naming it.
fn check_folder(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::io(
            dir,
            "the output's folder",
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        )),
        Err(e) => Err(Error::io(dir, "the output's folder", e)),
    }
}

/// What kind of non-regular file `m` is, in words.
fn file_kind(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// True when a process with this id runs (or exists under another user).
fn pid_alive(pid: i32) -> bool {
    match rustix::process::Pid::from_raw(pid) {
        Some(p) => !matches!(
            rustix::process::test_kill_process(p),
            Err(rustix::io::Errno::SRCH)
        ),
        None => true,
    }
}

/// Removes `.NAME.<pid>.<random>.vhdkit-tmp` files in `dir` whose writer
/// (`pid`) no longer runs and holds no lock on them. Best effort: a file
/// that cannot be removed stays.
fn remove_stale_temps(dir: &Path, name: &std::ffi::OsStr) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(name.as_bytes());
    prefix.push(b'.');
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let n = file_name.as_bytes();
        let Some(rest) = n
            .strip_prefix(&prefix[..])
            .and_then(|r| r.strip_suffix(b".vhdkit-tmp"))
        else {
            continue;
        };
        let Some(pid) = rest
            .split(|&c| c == b'.')
            .next()
            .and_then(|p| std::str::from_utf8(p).ok())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() as i32 || pid_alive(pid) {
            continue;
        }
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nofollow_nonblock())
            .open(e.path())
        else {
            continue;
        };
        let unlocked =
            rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok();
        if unlocked && f.metadata().is_ok_and(|m| m.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// `O_NOFOLLOW | O_NONBLOCK`: a candidate is never followed out of the
/// folder, and opening a FIFO of that name does not block.
fn nofollow_nonblock() -> i32 {
    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32
}

impl AtomicOutput {
    /// Creates the temporary file in `target`'s folder, after removing the
    /// stale temporary files of dead vhdkit processes for this target.
    ///
    /// # Errors
    /// [`Error::OutputExists`] when the target exists and `overwrite` is off;
    /// [`Error::OutputRefused`] for a target that is a directory, FIFO,
    /// character device or socket (a block device without `overwrite` is
    /// [`Error::OutputExists`]); [`Error::Io`] naming the folder when it is
    /// missing, not a directory, or refuses a new file.
    pub fn create(target: &Path, overwrite: bool) -> Result<AtomicOutput> {
        Self::open(target, overwrite, false)
    }

    /// Like [`AtomicOutput::create`] with `overwrite`, for an output that
    /// replaces an existing regular file with a new version of itself: the
    /// new file gets the old one's owner, group and mode.
    pub fn rewrite(target: &Path) -> Result<AtomicOutput> {
        Self::open(target, true, true)
    }

    fn open(target: &Path, overwrite: bool, keep_owner: bool) -> Result<AtomicOutput> {
        let folder = output_folder(target);
        let existing = std::fs::metadata(target).ok();
        if let Some(m) = existing.as_ref().filter(|m| !m.is_file()) {
            use std::os::unix::fs::FileTypeExt;
            let block = m.file_type().is_block_device();
            if block && overwrite && !keep_owner {
                return Self::open_device(target, folder);
            }
            if !block || keep_owner {
                return Err(Error::refused(
                    target,
                    format!(
                        "is {}; the output must be a regular file (or a block device to overwrite)",
                        file_kind(m)
                    ),
                ));
            }
        }
        if !overwrite && std::fs::symlink_metadata(target).is_ok() {
            return Err(Error::OutputExists(target.to_path_buf()));
        }
        check_folder(&folder)?;
        let name = target.file_name().unwrap_or_default();
        remove_stale_temps(&folder, name);
        // An ordinary file's mode (0666 less the umask), not tempfile's 0600;
        // a rewrite in place keeps the replaced file's mode.
        let mode = match &existing {
            Some(m) if overwrite => m.permissions(),
            _ => std::os::unix::fs::PermissionsExt::from_mode(0o666),
        };
        // `.NAME.<pid>.`, byte for byte (a name need not be UTF-8).
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(name);
        prefix.push(format!(".{}.", std::process::id()));
        let temp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".vhdkit-tmp")
            .permissions(mode.clone())
            .tempfile_in(&folder)
            .map_err(|e| Error::io(&folder, "create a file in the output's folder", e))?;
        // Held while the file is open: tells a later run that this writer
        // lives, whatever PID namespace it runs in.
        let _ = rustix::fs::flock(
            temp.as_file(),
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        );
        if keep_owner {
            if let Some(m) = &existing {
                use std::os::unix::fs::MetadataExt;
                // Owner and group first: a change of owner clears set-id bits.
                std::os::unix::fs::fchown(temp.as_file(), Some(m.uid()), Some(m.gid()))
                    .map_err(|e| Error::io(temp.path(), "keep the owner and group of", e))?;
                temp.as_file()
                    .set_permissions(mode)
                    .map_err(|e| Error::io(temp.path(), "keep the mode of", e))?;
            }
        }
        Ok(AtomicOutput {
            target: target.to_path_buf(),
            folder,
            kind: OutputKind::Temp(temp),
            overwrite,
        })
    }

    fn open_device(target: &Path, folder: PathBuf) -> Result<AtomicOutput> {
        use std::io::Seek;
        use std::os::unix::fs::FileTypeExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(target)
            .map_err(|e| Error::io(target, "open the device for writing", e))?;
        // What was opened, not what was looked at.
        let m = f.metadata().map_err(|e| Error::io(target, "stat", e))?;
        if !m.file_type().is_block_device() {
            return Err(Error::refused(
                target,
                format!(
                    "is {}; the output must be a regular file (or a block device to overwrite)",
                    file_kind(&m)
                ),
            ));
        }
        let size = f
            .seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::io(target, "find the size of", e))?;
        Ok(AtomicOutput {
            target: target.to_path_buf(),
            folder,
            kind: OutputKind::Device(f, size),
            overwrite: true,
        })
    }

    /// The file written: the temporary file, or the block device.
    pub fn file(&self) -> &File {
        match &self.kind {
            OutputKind::Temp(t) => t.as_file(),
            OutputKind::Device(f, _) => f,
        }
    }

    /// The path written: the temporary file's, or the device's.
    pub fn temp_path(&self) -> &Path {
        match &self.kind {
            OutputKind::Temp(t) => t.path(),
            OutputKind::Device(..) => &self.target,
        }
    }

    /// True when the output is a block device written in place: holes are
    /// not zeros there, so every byte must be written ([`Self::fill_zeros`]).
    pub fn is_device(&self) -> bool {
        matches!(self.kind, OutputKind::Device(..))
    }

    fn fits(&self, end: u64) -> Result<()> {
        match &self.kind {
            OutputKind::Device(_, size) if end > *size => Err(Error::refused(
                &self.target,
                format!("the device holds {size} bytes; the output needs {end}"),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses a VHD of `len` bytes (`None`: a length known only at the
    /// end, a dynamic VHD) on a device of another size: a reader finds a
    /// VHD by the footer in the device's last 512 bytes, so a VHD written
    /// anywhere else on a device would not read back as one.
    pub fn vhd_fits_exactly(&self, len: Option<u64>) -> Result<()> {
        match &self.kind {
            OutputKind::Device(_, size) if len != Some(*size) => {
                Err(Error::refused(
                    &self.target,
                    format!(
                        "the device holds {size} bytes; a VHD written to a device must end where \
                         the device ends (its footer is read from the last 512 bytes), and this \
                         one {}: write a raw disk to the device, or a fixed VHD of exactly its size",
                        match len {
                            Some(l) => format!("is {l} bytes"),
                            None => "is dynamic (its length depends on its data)".to_string(),
                        }
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Makes the output `len` bytes long: the file's length, or (a device)
    /// a check that the device holds that many bytes.
    pub fn set_len(&self, len: u64) -> Result<()> {
        match &self.kind {
            OutputKind::Temp(t) => t
                .as_file()
                .set_len(len)
                .map_err(|e| Error::io(t.path(), "set length", e)),
            OutputKind::Device(..) => self.fits(len),
        }
    }

    /// Writes zeros over `at..at + len` of a device output (nothing for a
    /// file, whose unwritten bytes read as zeros).
    pub fn fill_zeros(&self, at: u64, len: u64) -> Result<()> {
        let OutputKind::Device(f, _) = &self.kind else {
            return Ok(());
        };
        let end = at.checked_add(len).ok_or_else(|| Error::OutOfRange {
            path: Some(self.target.clone()),
            offset: at,
            len,
            size: u64::MAX,
        })?;
        self.fits(end)?;
        if len == 0 {
            return Ok(());
        }
        // The device zeroes the range itself where it can (WRITE ZEROES, or
        // the kernel writing zero pages); otherwise zeros are written here.
        let flags = rustix::fs::FallocateFlags::ZERO_RANGE | rustix::fs::FallocateFlags::KEEP_SIZE;
        if rustix::fs::fallocate(f, flags, at, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; (1 << 20).min(len) as usize];
        let mut pos = at;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], pos)
                .map_err(|e| Error::io_at(&self.target, "write zeros", pos, e))?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Syncs the data (when `sync`), renames the file into place and syncs
    /// the folder (when `sync`), whatever the target's name: a bare name's
    /// folder is `.`. A device is synced (always) and left in place.
    pub fn commit(self, sync: bool) -> Result<()> {
        let target = self.target;
        let temp = match self.kind {
            OutputKind::Device(f, _) => {
                return f.sync_all().map_err(|e| Error::io(&target, "sync", e));
            }
            OutputKind::Temp(t) => t,
        };
        if sync {
            temp.as_file()
                .sync_all()
                .map_err(|e| Error::io(temp.path(), "sync", e))?;
        }
        let persisted = if self.overwrite {
            temp.persist(&target).map(|_| ())
        } else {
            temp.persist_noclobber(&target).map(|_| ())
        };
        persisted.map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                Error::OutputExists(target.clone())
            } else {
                Error::io(&target, "rename into place", e.error)
            }
        })?;
        if sync {
            if let Ok(d) = File::open(&self.folder) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary output is named `.NAME.<pid>.<random>.vhdkit-tmp`.
    #[test]
    fn temporary_outputs_carry_the_writers_pid() {
        let dir = tempfile::tempdir().unwrap();
        let o = AtomicOutput::create(&dir.path().join("x.vhd"), false).unwrap();
        let name = o
            .temp_path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let prefix = format!(".x.vhd.{}.", std::process::id());
        assert!(
            name.starts_with(&prefix) && name.ends_with(".vhdkit-tmp"),
            "{name}"
        );
    }

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
    fn every_output_has_a_folder_to_sync() {
        assert_eq!(output_folder(Path::new("out.vhd")), Path::new("."));
        assert_eq!(output_folder(Path::new("./out.vhd")), Path::new("."));
        assert_eq!(output_folder(Path::new("a/out.vhd")), Path::new("a"));
        assert_eq!(output_folder(Path::new("/out.vhd")), Path::new("/"));
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
