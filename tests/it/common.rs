//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The qemu-img to use as an oracle (`VHDKIT_QEMU_IMG`, else `qemu-img`).
/// Panics, saying so, when it cannot be run: tests that need the oracle
/// fail loudly rather than pass without it.
pub fn qemu_img() -> PathBuf {
    let name: PathBuf = std::env::var_os("VHDKIT_QEMU_IMG")
        .unwrap_or_else(|| "qemu-img".into())
        .into();
    match Command::new(&name).arg("--version").output() {
        Ok(o) if o.status.success() => name,
        _ => panic!(
            "QEMU-IMG IS MISSING: qemu-img ({}) is required by these tests and could not be run: \
             install qemu-utils, or name another binary with VHDKIT_QEMU_IMG",
            name.display()
        ),
    }
}

/// Asserts equal bytes, naming the first difference (byte, sector, bytes)
/// instead of printing megabytes.
#[track_caller]
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let end = (i + 16).min(got.len());
        panic!(
            "{what}: first difference at byte {i} (sector {}): got {:02x?}, want {:02x?}",
            i / 512,
            &got[i..end],
            &want[i..end]
        );
    }
}

/// The shared corpus of real images: `VHDKIT_CORPUS`, else `../shared/corpus`
/// beside the crate. Panics, saying where it looked and how to point at it,
/// when the folder has no `manifest.json`: the tests that read real images
/// fail loudly rather than pass without them.
pub fn corpus() -> PathBuf {
    let dir = std::env::var_os("VHDKIT_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus"));
    assert!(
        dir.join("manifest.json").is_file() && dir.join("MANIFEST.md").is_file(),
        "THE VHD CORPUS IS MISSING: {} has no manifest.json and MANIFEST.md. These tests read \
         the real images of ../shared/corpus and do not pass without them; put the corpus there \
         or name its folder with VHDKIT_CORPUS=/path/to/corpus",
        dir.display()
    );
    dir
}

/// Bytes the filesystem has allocated to `file` (`st_blocks` × 512).
pub fn allocated_bytes(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}

/// Punches a hole over `range` of `file` (the file keeps its size).
pub fn punch_hole(file: &std::fs::File, range: std::ops::Range<u64>) -> std::io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        range.start,
        range.end - range.start,
    )?;
    Ok(())
}

/// The Python interpreter that has libvhdi's `pyvhdi`, for the tests that
/// read through libvhdi, a second independent reader; `None` (with a
/// SKIPPED line naming `test`) when it is not installed, unless
/// `VHDKIT_REQUIRE_LIBVHDI` is set (as CI sets it), which makes its absence a
/// failure. `VHDKIT_PYTHON` names another interpreter.
pub fn pyvhdi(test: &str) -> Option<String> {
    let python = std::env::var("VHDKIT_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", "import pyvhdi"])
        .output();
    if probe.as_ref().is_ok_and(|o| o.status.success()) {
        return Some(python);
    }
    assert!(
        std::env::var_os("VHDKIT_REQUIRE_LIBVHDI").is_none(),
        "libvhdi is required but `{python} -c 'import pyvhdi'` fails: pip install libvhdi-python"
    );
    eprintln!("{test}: SKIPPED, pyvhdi is not installed (pip install libvhdi-python)");
    None
}
