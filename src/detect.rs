//! What a file that holds no VHD footer is: another disk image format, or a
//! raw disk.
//!
//! [`Image::open`](crate::Image::open) looks for a VHD footer first. When it
//! finds none, the file would read as a raw disk, and [`foreign_format`]
//! decides whether that would be a mistake: a qcow2 or VMDK file read as
//! raw is a "disk" of its own metadata. (A VHDX file, `vhdxfile` at 0, is
//! not foreign: it opens as [`Format::Vhdx`](crate::Format::Vhdx).) The signatures recognised, each at
//! the offset its format puts it:
//!
//! | format | signature | version |
//! |---|---|---|
//! | qcow2, qcow | `QFI\xfb` at 0 | u32 BE at 4 (1: qcow, 2 or 3: qcow2) |
//! | QED | `QED\0` at 0 | none |
//! | VMDK sparse, stream-optimized | `KDMV` at 0 | u32 LE at 4; flags at 8 (bit 16: compressed grains) |
//! | VMDK ESX sparse | `COWD` at 0 | u32 LE at 4 |
//! | VMDK descriptor | `# Disk DescriptorFile` at 0 | its `version=` line |
//! | VDI | `0xbeda107f` (u32 LE) at 64 | u16.u16 LE at 68 |
//! | Parallels | `WithoutFreeSpace` or `WithouFreSpacExt` at 0 | u32 LE at 16 |
//! | LUKS | `LUKS\xba\xbe` at 0 | u16 BE at 6 |
//! | dmg (UDIF) | `koly` 512 bytes from the end | u32 BE after it |
//!
//! A caller who knows the file is a raw disk (one whose first sector happens
//! to look like one of these) says so with
//! [`OpenOptions::format`](crate::OpenOptions::format)`(Format::Raw)`, which
//! skips all detection.

use crate::io::ReadAt;
use std::io;

/// A disk image format vhdkit recognises but does not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Foreign {
    /// The format's name: `qcow2`, `qcow`, `QED`, `VMDK sparse`,
    /// `VMDK stream-optimized`, `VMDK ESX sparse`, `VMDK descriptor`, `VDI`,
    /// `Parallels`, `LUKS`, `dmg`.
    pub format: &'static str,
    /// The version the file states, when it states one.
    pub version: Option<String>,
}

impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{} (version {v})", self.format),
            None => f.write_str(self.format),
        }
    }
}

fn u16_be(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u32_be(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Recognises another format from the first bytes of a file (up to 512; a
/// shorter slice is a shorter file). Formats whose signature lies elsewhere
/// (dmg at the end) are [`foreign_format`]'s.
pub fn sniff_head(head: &[u8]) -> Option<Foreign> {
    let has =
        |at: usize, sig: &[u8]| head.len() >= at + sig.len() && &head[at..at + sig.len()] == sig;
    let found = |format, version: Option<String>| Some(Foreign { format, version });
    if has(0, b"QFI\xfb") && head.len() >= 8 {
        let v = u32_be(head, 4);
        let name = if v == 1 { "qcow" } else { "qcow2" };
        return found(name, Some(v.to_string()));
    }
    if has(0, b"QED\0") {
        return found("QED", None);
    }
    if has(0, b"KDMV") && head.len() >= 12 {
        let v = u32_le(head, 4);
        let flags = u32_le(head, 8);
        // Bit 16: grains are compressed, which only stream-optimized
        // files (version 3, with markers in bit 17) use.
        let name = if flags & (1 << 16) != 0 {
            "VMDK stream-optimized"
        } else {
            "VMDK sparse"
        };
        return found(name, Some(v.to_string()));
    }
    if has(0, b"COWD") && head.len() >= 8 {
        return found("VMDK ESX sparse", Some(u32_le(head, 4).to_string()));
    }
    if has(0, b"# Disk DescriptorFile") {
        // The descriptor is text: `version=1` on a line of its own.
        let text = String::from_utf8_lossy(head);
        let version = text.lines().find_map(|l| {
            let v = l.trim().strip_prefix("version")?.trim_start();
            let v = v.strip_prefix('=')?.trim();
            (!v.is_empty() && v.len() <= 8 && v.chars().all(|c| c.is_ascii_alphanumeric()))
                .then(|| v.to_string())
        });
        return found("VMDK descriptor", version);
    }
    if has(0x40, &0xbeda_107fu32.to_le_bytes()) && head.len() >= 0x48 {
        let v = u32_le(head, 0x44);
        return found("VDI", Some(format!("{}.{}", v >> 16, v & 0xffff)));
    }
    if (has(0, b"WithoutFreeSpace") || has(0, b"WithouFreSpacExt")) && head.len() >= 20 {
        return found("Parallels", Some(u32_le(head, 16).to_string()));
    }
    if has(0, b"LUKS\xba\xbe") && head.len() >= 8 {
        return found("LUKS", Some(u16_be(head, 6).to_string()));
    }
    None
}

/// Recognises another disk image format in `src` of length `len` (see the
/// module docs for the list). Reads at most three small pieces: the first
/// 512 bytes and the last 512 bytes.
///
/// # Errors
/// The source's read errors.
pub fn foreign_format<R: ReadAt + ?Sized>(src: &R, len: u64) -> io::Result<Option<Foreign>> {
    let n = len.min(512) as usize;
    let mut head = [0u8; 512];
    src.read_exact_at(&mut head[..n], 0)?;
    if let Some(f) = sniff_head(&head[..n]) {
        return Ok(Some(f));
    }
    // dmg (UDIF): a 512-byte `koly` trailer at the end of the file.
    if len >= 512 {
        let mut t = [0u8; 8];
        src.read_exact_at(&mut t, len - 512)?;
        if &t[..4] == b"koly" {
            return Ok(Some(Foreign {
                format: "dmg",
                version: Some(u32_be(&t, 4).to_string()),
            }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_empty_files_are_not_foreign() {
        assert_eq!(foreign_format(&[][..], 0).unwrap(), None);
        assert_eq!(foreign_format(&b"QFI"[..], 3).unwrap(), None);
        assert_eq!(foreign_format(&[0u8; 4096][..], 4096).unwrap(), None);
    }

    #[test]
    fn signatures_name_format_and_version() {
        let mut q = vec![0u8; 600];
        q[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        let f = foreign_format(&q[..], 600).unwrap().unwrap();
        assert_eq!(f.to_string(), "qcow2 (version 3)");
        let mut d = vec![0u8; 4096];
        d[4096 - 512..4096 - 504].copy_from_slice(b"koly\0\0\0\x04");
        let f = foreign_format(&d[..], 4096).unwrap().unwrap();
        assert_eq!(f.to_string(), "dmg (version 4)");
        let desc = b"# Disk DescriptorFile\nversion=1\nCID=1\n";
        let f = sniff_head(desc).unwrap();
        assert_eq!(f.to_string(), "VMDK descriptor (version 1)");
    }
}
