//! Outputs, interruption and durability (issue 8's output side, issue 7's
//! `--shrink` and directory outputs): what vhdkit writes to, what it refuses
//! to replace, how it cleans up after signals and dead processes, and that
//! every in-place plan leaves the old image or the new one, each state
//! passing `check`.

use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhdkit::ops::{self, InPlacePlan, Step};
use vhdkit::{ConvertOptions, Error, Format, Image, OpenOptions, Target};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- helpers

/// Says, past the test harness's capture (straight to the process's
/// stderr), that a part of a test could not run here.
macro_rules! skipped {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), "\n*** {} ***", format!($($arg)*));
    }};
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// A recognisable non-zero pattern of `len` bytes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// A sparse raw file of `size` bytes with data at a few places; returns its content.
fn sample_raw(path: &Path, size: u64) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut content = vec![0u8; size as usize];
    for (k, at) in [0, size / 3 + 7, size - 1000.min(size)]
        .into_iter()
        .enumerate()
    {
        let d = pattern(1000.min((size - at) as usize), k as u8 + 1);
        f.write_all_at(&d, at).unwrap();
        content[at as usize..at as usize + d.len()].copy_from_slice(&d);
    }
    content
}

fn open(path: &Path) -> Image {
    Image::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_exact_at(&mut v, 0).unwrap();
    v
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn temps_in(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.ends_with(".vhdkit-tmp"))
        .collect()
}

#[cfg(feature = "cli")]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

#[cfg(feature = "cli")]
fn vhdkit(args: &[&std::ffi::OsStr]) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_vhdkit"))
        .args(args)
        .output()
        .expect("run vhdkit");
    let r = Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
    r
}

#[cfg(feature = "cli")]
fn os<S: AsRef<std::ffi::OsStr> + ?Sized>(s: &S) -> &std::ffi::OsStr {
    s.as_ref()
}

// ---------------------------------------------------------------- non-regular outputs

/// The error of converting `input` onto `output`, with and without overwrite.
fn refused(input: &Path, output: &Path, overwrite: bool) -> Error {
    match vhdkit::convert(
        input,
        output,
        &ConvertOptions::new(Target::Fixed).overwrite(overwrite),
    ) {
        Err(e) => e,
        Ok(r) => panic!(
            "{} (overwrite {overwrite}) was written: {r:?}",
            output.display()
        ),
    }
}

/// A directory, a FIFO, a character device and a socket are never
/// replaced, with or without overwrite, and each is named for what it is.
/// (The character device is a node made here with /dev/null's numbers, so
/// that a failure cannot replace the machine's /dev/null.)
#[test]
fn non_regular_outputs_are_refused_and_left_in_place() {
    let dir = tempdir();
    let input = dir.path().join("in.raw");
    sample_raw(&input, MIB);
    let d = dir.path().join("adir");
    std::fs::create_dir(&d).unwrap();
    let fifo = dir.path().join("fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success(), "mkfifo");
    let sock = dir.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let chr = dir.path().join("null");
    let made = Command::new("mknod")
        .arg(&chr)
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());
    let mut cases: Vec<(&Path, &str)> = vec![
        (&d, "is a directory"),
        (&fifo, "is a FIFO"),
        (&sock, "is a socket"),
    ];
    if made {
        cases.push((&chr, "is a character device"));
    } else {
        skipped!("SKIPPED: mknod could not make a character device; /dev/null is tried without overwrite only");
    }
    for (path, what) in &cases {
        for overwrite in [false, true] {
            let e = refused(&input, path, overwrite);
            let m = e.to_string();
            assert!(
                m.contains(what) && m.contains(&path.display().to_string()),
                "{} (overwrite {overwrite}): {m}",
                path.display()
            );
            assert!(!m.contains("exists"), "{m}");
        }
        let t = std::fs::symlink_metadata(path).unwrap().file_type();
        assert!(!t.is_file(), "{} became a regular file", path.display());
    }
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::metadata(&sock).unwrap().file_type().is_socket());
    if made {
        assert!(std::fs::metadata(&chr)
            .unwrap()
            .file_type()
            .is_char_device());
    }
    assert!(names(&d).is_empty());
    let m = refused(&input, Path::new("/dev/null"), false).to_string();
    assert!(m.contains("character device"), "{m}");
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(temps_in(dir.path()).is_empty());
}

#[cfg(feature = "cli")]
#[test]
fn converting_onto_a_directory_says_so() {
    let dir = tempdir();
    let input = dir.path().join("in.raw");
    sample_raw(&input, MIB);
    let d = dir.path().join("out");
    std::fs::create_dir(&d).unwrap();
    for force in [false, true] {
        let mut args = vec![os("convert"), input.as_os_str(), d.as_os_str()];
        args.extend([os("--to"), os("dynamic")]);
        if force {
            args.push(os("--force"));
        }
        let r = vhdkit(&args);
        assert_eq!(r.code, Some(2), "{}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains("is a directory"), "{}", r.stderr);
        assert!(!r.stderr.contains("output exists"), "{}", r.stderr);
        assert!(!r.stderr.contains("rename"), "{}", r.stderr);
    }
    assert!(d.is_dir() && names(&d).is_empty());
    assert_eq!(names(dir.path()), ["in.raw", "out"]);
}

/// A loop device attached for one test, detached when dropped.
struct LoopDevice {
    dev: PathBuf,
}

impl LoopDevice {
    /// Attaches `backing`, or says loudly why not.
    fn attach(backing: &Path) -> Option<LoopDevice> {
        if !Path::new("/dev/loop-control").exists() {
            skipped!("SKIPPED: no loop device (/dev/loop-control is missing)");
            return None;
        }
        let o = match Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
        {
            Ok(o) if o.status.success() => o,
            other => {
                skipped!("SKIPPED: no loop device (losetup -f --show: {other:?})");
                return None;
            }
        };
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if !dev.starts_with("/dev/") {
            skipped!("SKIPPED: no loop device (losetup printed {dev:?})");
            return None;
        }
        Some(LoopDevice { dev: dev.into() })
    }

    /// The device's first `len` bytes.
    fn head(&self, len: u64) -> Vec<u8> {
        let f = std::fs::File::open(&self.dev).unwrap();
        let mut v = vec![0u8; len as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A block device is written into with overwrite only: every byte of the
/// output, zeros included (the device is filled with 0xAA first, so a
/// skipped zero would show), no temporary file, no rename; without
/// overwrite, and when the output does not fit, it is left as it was.
#[test]
fn a_block_device_output_is_written_in_place_only_with_overwrite() {
    let dir = tempdir();
    let backing = dir.path().join("backing.img");
    let dev_size = 8 * MIB;
    std::fs::write(&backing, vec![0xAAu8; dev_size as usize]).unwrap();
    let Some(lo) = LoopDevice::attach(&backing) else {
        return;
    };
    let input = dir.path().join("in.raw");
    let content = sample_raw(&input, 3 * MIB + 4096);
    // Without overwrite: refused, untouched.
    match vhdkit::convert(&input, &lo.dev, &ConvertOptions::new(Target::Raw)) {
        Err(Error::OutputExists(_)) => {}
        other => panic!("{other:?}"),
    }
    assert!(lo.head(dev_size).iter().all(|&b| b == 0xAA));
    // Too large for the device: refused before a byte is written.
    let big = dir.path().join("big.raw");
    sample_raw(&big, 9 * MIB);
    let e = vhdkit::convert(
        &big,
        &lo.dev,
        &ConvertOptions::new(Target::Raw).overwrite(true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("the device holds"), "{e}");
    assert!(lo.head(dev_size).iter().all(|&b| b == 0xAA));
    // A VHD must end where the device ends (its footer is read from the
    // last sector): a fixed VHD of another size and a dynamic VHD (whose
    // length depends on its data) are refused before a byte is written.
    for target in [Target::Fixed, Target::Dynamic] {
        let e = vhdkit::convert(
            &input,
            &lo.dev,
            &ConvertOptions::new(target).overwrite(true),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("must end where the device ends"),
            "{target:?}: {e}"
        );
        assert!(lo.head(dev_size).iter().all(|&b| b == 0xAA), "{target:?}");
    }
    // A fixed VHD of exactly the device's size is written, footer last.
    let exact = dir.path().join("exact.raw");
    let exact_content = sample_raw(&exact, dev_size - 512);
    let r = vhdkit::convert(
        &exact,
        &lo.dev,
        &ConvertOptions::new(Target::Fixed).overwrite(true),
    )
    .unwrap();
    assert_eq!(r.output_len, dev_size);
    let whole = dir.path().join("whole-device.vhd");
    std::fs::write(&whole, lo.head(dev_size)).unwrap();
    let img = open(&whole);
    assert_eq!(img.disk_type(), Format::Fixed);
    assert!(
        read_all(&img) == exact_content,
        "fixed on the device: content differs"
    );
    for (target, format, sparse) in [
        (Target::Raw, Format::Raw, true),
        // Without sparseness nothing is allocated after the copy on a
        // device (a fallback writing zeros would wipe the data).
        (Target::Raw, Format::Raw, false),
    ] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&lo.dev)
            .unwrap()
            .write_all_at(&vec![0xAAu8; dev_size as usize], 0)
            .unwrap();
        let r = vhdkit::convert(
            &input,
            &lo.dev,
            &ConvertOptions::new(target).overwrite(true).sparse(sparse),
        )
        .unwrap_or_else(|e| panic!("{target:?} onto {}: {e}", lo.dev.display()));
        assert!(std::fs::metadata(&lo.dev)
            .unwrap()
            .file_type()
            .is_block_device());
        // The device's first output_len bytes are the image.
        let copy = dir.path().join(format!("got-{target:?}-{sparse}"));
        std::fs::write(&copy, lo.head(r.output_len)).unwrap();
        let img = open(&copy);
        assert_eq!(img.disk_type(), format, "{target:?}");
        assert!(
            read_all(&img) == content,
            "{target:?} sparse {sparse}: content differs"
        );
        if format != Format::Raw {
            let report = vhdkit::check(&copy, &Default::default()).unwrap();
            assert!(
                report.problems.is_empty(),
                "{target:?}: {:?}",
                report.problems
            );
        }
    }
    let dev_dir = lo.dev.parent().unwrap();
    assert!(temps_in(dev_dir).is_empty(), "{:?}", temps_in(dev_dir));
}

#[cfg(feature = "cli")]
#[test]
fn the_command_line_writes_a_block_device_with_force_only() {
    let dir = tempdir();
    let backing = dir.path().join("backing.img");
    std::fs::write(&backing, vec![0xAAu8; 4 * MIB as usize]).unwrap();
    let Some(lo) = LoopDevice::attach(&backing) else {
        return;
    };
    let input = dir.path().join("in.raw");
    // A fixed VHD of exactly the device's size (its footer the last sector).
    let content = sample_raw(&input, 4 * MIB - 512);
    let base = [
        os("convert"),
        input.as_os_str(),
        lo.dev.as_os_str(),
        os("--to"),
        os("fixed"),
    ];
    let r = vhdkit(&base);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(lo.head(4 * MIB).iter().all(|&b| b == 0xAA));
    let mut args = base.to_vec();
    args.push(os("--force"));
    let r = vhdkit(&args);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(std::fs::metadata(&lo.dev)
        .unwrap()
        .file_type()
        .is_block_device());
    let head = lo.head(4 * MIB);
    assert!(head[..(4 * MIB - 512) as usize] == content[..]);
    assert_eq!(&head[(4 * MIB - 512) as usize..][..8], b"conectix");
}

// ---------------------------------------------------------------- folders

/// An output whose folder is missing, is a file, or refuses new files is
/// refused before the conversion starts (progress never starts), naming
/// the folder.
#[test]
fn a_bad_output_folder_is_refused_before_the_conversion_naming_it() {
    struct Started(AtomicBool);
    impl vhdkit::Progress for Started {
        fn start(&self, _total: u64) {
            self.0.store(true, Ordering::SeqCst);
        }
        fn advance(&self, _bytes: u64) {}
    }
    /// Makes a folder immutable (root cannot create files in it either)
    /// and undoes it when dropped.
    struct Immutable(PathBuf);
    impl Drop for Immutable {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
    let dir = tempdir();
    let input = dir.path().join("in.raw");
    sample_raw(&input, MIB);
    let file = dir.path().join("afile");
    std::fs::write(&file, b"x").unwrap();
    let missing = dir.path().join("missing");
    let ro = dir.path().join("readonly");
    std::fs::create_dir(&ro).unwrap();
    let frozen = Command::new("chattr")
        .arg("+i")
        .arg(&ro)
        .status()
        .is_ok_and(|s| s.success())
        .then(|| Immutable(ro.clone()));
    let mut cases = vec![
        (file.join("out.vhd"), file.clone(), "not a directory"),
        (missing.join("out.vhd"), missing.clone(), "No such file"),
        (
            missing.join("deeper/out.vhd"),
            missing.join("deeper"),
            "No such file",
        ),
    ];
    if frozen.is_some() {
        cases.push((ro.join("out.vhd"), ro.clone(), "not permitted"));
    } else {
        skipped!("SKIPPED: chattr +i is not available here; the read-only folder case is not run");
    }
    for (out, folder, why) in &cases {
        let started = Arc::new(Started(AtomicBool::new(false)));
        let e = vhdkit::convert(
            &input,
            out,
            &ConvertOptions::new(Target::Dynamic).progress(started.clone()),
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with(&format!("{}: ", folder.display()))
                && m.contains("folder")
                && m.contains(why),
            "{}: {m}",
            out.display()
        );
        assert!(
            !started.0.load(Ordering::SeqCst),
            "{}: the conversion started",
            out.display()
        );
    }
    drop(frozen);
    assert!(names(&ro).is_empty());
    assert_eq!(names(dir.path()), ["afile", "in.raw", "readonly"]);
}

/// The folder of an output named without one (`out.vhd`) is synced after
/// the rename, as `./out.vhd`'s is: watched with strace.
#[cfg(feature = "cli")]
#[test]
fn the_folder_of_a_bare_output_name_is_synced() {
    if !Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        skipped!("SKIPPED: strace is not installed; the folder sync is not observed");
        return;
    }
    let dir = tempdir();
    sample_raw(&dir.path().join("in.raw"), MIB);
    for out in ["out.vhd", "./out2.vhd"] {
        let o = Command::new("strace")
            .args(["-f", "-e", "trace=openat,fsync,rename,renameat,renameat2"])
            .arg(env!("CARGO_BIN_EXE_vhdkit"))
            .args(["convert", "in.raw", out, "--to", "dynamic", "-q"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let trace = String::from_utf8_lossy(&o.stderr);
        let lines: Vec<&str> = trace.lines().collect();
        let renamed = lines
            .iter()
            .position(|l| l.contains("rename") && l.contains(out.trim_start_matches("./")))
            .unwrap_or_else(|| panic!("{out}: no rename in\n{trace}"));
        // After the rename: the folder opened, and that descriptor synced.
        let fd = lines[renamed..]
            .iter()
            .find(|l| l.contains("openat(AT_FDCWD, \".\"") && l.contains("O_RDONLY"))
            .and_then(|l| l.rsplit("= ").next())
            .and_then(|n| n.trim().parse::<i32>().ok())
            .unwrap_or_else(|| {
                panic!("{out}: the folder is not opened after the rename:\n{trace}")
            });
        assert!(
            lines[renamed..]
                .iter()
                .any(|l| l.contains(&format!("fsync({fd})")) && l.ends_with("= 0")),
            "{out}: the folder (fd {fd}) is not synced:\n{trace}"
        );
    }
}

// ---------------------------------------------------------------- interruption

/// Ctrl-C (SIGINT), SIGTERM and SIGHUP stop a conversion, exit 2 and leave
/// neither output nor temporary file. The process is frozen (SIGSTOP) once
/// its temporary output exists, so the signal lands mid-conversion however
/// fast the machine, then let go (SIGCONT) with the signal pending.
#[cfg(feature = "cli")]
#[test]
fn ctrl_c_sigterm_and_sighup_mid_conversion_leave_nothing() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = tempdir();
    let raw = dir.path().join("in.raw");
    {
        let f = std::fs::File::create(&raw).unwrap();
        let chunk = pattern(4 << 20, 7);
        for i in 0..64u64 {
            f.write_all_at(&chunk, i * (4 << 20)).unwrap();
        }
    }
    let kill = |sig: &str, pid: u32| {
        let s = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(s.success(), "kill {sig} {pid}");
    };
    for sig in ["-INT", "-TERM", "-HUP"] {
        let out = dir.path().join("out.vhd");
        let mut child = Command::new(env!("CARGO_BIN_EXE_vhdkit"))
            .args(["convert", "--threads", "1", "--no-sync"])
            .arg(&raw)
            .arg(&out)
            .args(["--to", "dynamic"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let started = Instant::now();
        while temps_in(dir.path()).is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no temporary output appeared"
            );
            if child.try_wait().unwrap().is_some() {
                panic!("the conversion ended before it could be interrupted");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        kill("-STOP", pid);
        kill(sig, pid);
        kill("-CONT", pid);
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{sig}: {} {stderr}", o.status);
        assert!(stderr.contains("interrupted"), "{sig}: {stderr}");
        assert!(!out.exists(), "{sig}: output left behind");
        assert_eq!(names(dir.path()), ["in.raw"], "{sig}: files left");
    }
}

/// A temporary file left by a writer that no longer runs (killed outright)
/// is removed by the next conversion to the same output; one whose writer
/// runs is left alone, as are other outputs' temporary files.
#[test]
fn a_dead_writers_temporary_file_is_removed_by_the_next_run() {
    let dir = tempdir();
    let input = dir.path().join("in.raw");
    sample_raw(&input, MIB);
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let alive = std::process::id();
    let stale = format!(".out.vhd.{dead}.AbC123.vhdkit-tmp");
    let live = format!(".out.vhd.{alive}.XyZ789.vhdkit-tmp");
    let other = format!(".other.vhd.{dead}.QwE456.vhdkit-tmp");
    // A writer whose PID is not ours to see (another PID namespace) but
    // which still holds its lock: kept.
    let locked = format!(".out.vhd.{dead}.LoCk42.vhdkit-tmp");
    for n in [&stale, &live, &other, &locked] {
        std::fs::write(dir.path().join(n), vec![1u8; 4096]).unwrap();
    }
    struct Holder(std::process::Child);
    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let locked_path = dir.path().join(&locked);
    let holder = Holder(
        Command::new("flock")
            .arg("-x")
            .arg(&locked_path)
            .args(["sleep", "60"])
            .spawn()
            .expect("flock(1)"),
    );
    // Wait until the lock is held.
    let t = std::time::Instant::now();
    while Command::new("flock")
        .args(["-n", "-x"])
        .arg(&locked_path)
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        assert!(t.elapsed().as_secs() < 10, "flock never took the lock");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    vhdkit::convert(
        &input,
        dir.path().join("out.vhd"),
        &ConvertOptions::new(Target::Dynamic),
    )
    .unwrap();
    let left = names(dir.path());
    assert!(
        !left.contains(&stale),
        "the dead writer's file stays: {left:?}"
    );
    assert!(
        left.contains(&live),
        "a live writer's file was removed: {left:?}"
    );
    assert!(
        left.contains(&other),
        "another output's file was removed: {left:?}"
    );
    assert!(
        left.contains(&locked),
        "a locked file was removed: {left:?}"
    );
    drop(holder);
    assert!(left.contains(&"out.vhd".to_string()));
}

// ---------------------------------------------------------------- rewrites

/// A dynamic image with an allocated all-zero block (so that sparsify
/// rewrites it) and its content.
fn dynamic_with_a_zero_block(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let raw = dir.join(format!("{name}.raw"));
    let f = std::fs::File::create(&raw).unwrap();
    let mut content = vec![0u8; 4 * MIB as usize];
    let d = pattern(4096, 3);
    f.write_all_at(&d, 0).unwrap();
    content[..4096].copy_from_slice(&d);
    // Explicit zeros: an allocated, all-zero block in a non-sparse output.
    f.write_all_at(&vec![0u8; 2 * MIB as usize], 2 * MIB)
        .unwrap();
    drop(f);
    let out = dir.join(name);
    vhdkit::convert(
        &raw,
        &out,
        &ConvertOptions::new(Target::Dynamic)
            .block_size(512 * KIB as u32)
            .sparse(false),
    )
    .unwrap();
    std::fs::remove_file(&raw).unwrap();
    assert!(open(&out).allocated_blocks() >= 5);
    (out, content)
}

/// sparsify and a resize that rewrites rewrite the file a symbolic link
/// names (the link stays a link) and keep owner, group and mode.
#[test]
fn rewrites_follow_symlinks_and_keep_owner_group_and_mode() {
    let dir = tempdir();
    let real_dir = dir.path().join("real");
    std::fs::create_dir(&real_dir).unwrap();
    let (real, content) = dynamic_with_a_zero_block(&real_dir, "disk.vhd");
    std::os::unix::fs::chown(&real, Some(1234), Some(1234)).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
    let link = dir.path().join("link.vhd");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let ino = std::fs::metadata(&real).unwrap().ino();

    let r = ops::sparsify(&link, &OpenOptions::new()).unwrap();
    assert!(r.freed_blocks.unwrap() >= 4, "{r:?}");
    let check_kept = |what: &str| {
        let l = std::fs::symlink_metadata(&link).unwrap();
        assert!(l.file_type().is_symlink(), "{what}: the link was replaced");
        assert_eq!(std::fs::read_link(&link).unwrap(), real, "{what}");
        let m = std::fs::metadata(&real).unwrap();
        assert_eq!((m.uid(), m.gid()), (1234, 1234), "{what}: owner and group");
        assert_eq!(m.mode() & 0o7777, 0o640, "{what}: mode {:o}", m.mode());
        assert!(temps_in(&real_dir).is_empty() && temps_in(dir.path()).is_empty());
    };
    check_kept("sparsify");
    assert_ne!(
        std::fs::metadata(&real).unwrap().ino(),
        ino,
        "the real file was not rewritten"
    );
    let img = open(&real);
    assert_eq!(img.allocated_blocks(), 1);
    assert!(read_all(&img) == content);
    drop(img);

    // Grow past what the BAT holds: a rewrite.
    let new_size = 2 << 30;
    assert!(ops::plan_resize(&open(&link), new_size, false, false)
        .unwrap()
        .is_none());
    ops::resize(&link, new_size, false, false, &OpenOptions::new()).unwrap();
    check_kept("resize");
    let img = open(&real);
    assert_eq!(img.virtual_size(), new_size);
    let mut head = vec![0u8; content.len()];
    img.read_exact_at(&mut head, 0).unwrap();
    assert!(head == content);
}

/// A file with other hard links is not rewritten (the other names would
/// keep the old image), saying why; what can be done in place still is.
#[test]
fn rewrites_refuse_files_with_other_hard_links() {
    let dir = tempdir();
    let (p, content) = dynamic_with_a_zero_block(dir.path(), "disk.vhd");
    let other = dir.path().join("other-name.vhd");
    std::fs::hard_link(&p, &other).unwrap();
    let before = std::fs::read(&p).unwrap();
    let m = ops::sparsify(&p, &OpenOptions::new())
        .unwrap_err()
        .to_string();
    assert!(
        m.contains("2 hard links") && m.contains("other names"),
        "{m}"
    );
    let m = ops::resize(&p, 2 << 30, false, false, &OpenOptions::new())
        .unwrap_err()
        .to_string();
    assert!(m.contains("hard links"), "{m}");
    assert!(std::fs::read(&p).unwrap() == before);
    assert_eq!(std::fs::metadata(&p).unwrap().nlink(), 2);
    // In place (room in the BAT): done, and both names see it.
    ops::resize(&p, 4 * MIB + 512 * KIB, false, false, &OpenOptions::new()).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().nlink(), 2);
    let img = open(&other);
    assert_eq!(img.virtual_size(), 4 * MIB + 512 * KIB);
    assert!(read_all(&img)[..content.len()] == content[..]);
}

// ---------------------------------------------------------------- raw -> fixed in place

/// After every prefix of the raw -> fixed plan, the image is the old raw
/// disk (perhaps zero-padded to the size the plan makes) or the new fixed
/// one, and running the conversion again makes a fixed VHD of the size the
/// first run would have made, never one 512 bytes (or a MiB) larger.
#[test]
fn raw_to_fixed_in_place_retried_after_any_step_makes_the_right_size() {
    let dir = tempdir();
    for size in [777, MIB, 2 * MIB + 1000, 3 * MIB + 5 * 512] {
        for azure in [false, true] {
            let raw = dir.path().join(format!("d-{size}-{azure}.raw"));
            let content = sample_raw(&raw, size);
            let want = if azure {
                size.div_ceil(MIB) * MIB
            } else {
                size.div_ceil(512) * 512
            };
            let plan = ops::plan_in_place(&raw, Format::Fixed, azure, &OpenOptions::new()).unwrap();
            for n in 0..=plan.steps.len() {
                let copy = dir.path().join("copy.raw");
                std::fs::copy(&raw, &copy).unwrap();
                ops::plan_in_place(&copy, Format::Fixed, azure, &OpenOptions::new())
                    .unwrap()
                    .run_steps(n)
                    .unwrap();
                let img = open(&copy);
                let got = read_all(&img);
                let old = img.disk_type() == Format::Raw
                    && got[..content.len()] == content[..]
                    && got[content.len()..].iter().all(|&b| b == 0);
                let new = img.disk_type() == Format::Fixed
                    && img.virtual_size() == want
                    && got[..content.len()] == content[..];
                assert!(old || new, "{size} azure {azure}: after {n} steps: neither");
                drop(img);
                // The retry.
                ops::plan_in_place(&copy, Format::Fixed, azure, &OpenOptions::new())
                    .unwrap()
                    .run()
                    .unwrap();
                let img = open(&copy);
                assert_eq!(
                    (img.disk_type(), img.virtual_size(), img.file_len()),
                    (Format::Fixed, want, want + 512),
                    "{size} azure {azure}: retried after {n} of {} steps {:?}",
                    plan.steps.len(),
                    plan.steps
                );
            }
        }
    }
}

/// A step that fails after the plan only extended the file cuts it back
/// to its old length: the old image, byte for byte.
#[test]
fn a_failed_in_place_step_restores_the_old_length() {
    let dir = tempdir();
    let raw = dir.path().join("d.raw");
    let content = sample_raw(&raw, MIB + 1000);
    let plan = InPlacePlan::new(
        &raw,
        "extend, then fail",
        vec![
            Step::SetLen(2 * MIB),
            Step::Sync,
            // An offset no file can have: the write fails.
            Step::Write(1 << 63, vec![1; 512]),
        ],
    );
    assert!(plan.run().is_err());
    assert!(std::fs::read(&raw).unwrap() == content, "not restored");
}

/// The same with a real failure: a file-size limit (as a full disk would)
/// stops raw -> fixed at its extension or at its footer write; the raw
/// disk keeps its length.
#[cfg(feature = "cli")]
#[test]
fn raw_to_fixed_in_place_under_a_file_size_limit_keeps_the_raw_disk() {
    let dir = tempdir();
    let raw = dir.path().join("d.raw");
    let content = sample_raw(&raw, 3 * MIB / 2);
    // bash's ulimit -f counts KiB. 1792: the extension to 2 MiB fails;
    // 2048: it succeeds and the footer write past 2 MiB fails.
    for kib in [1792, 2048] {
        let o = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "trap '' XFSZ; ulimit -f {kib}; exec \"$0\" convert --in-place \"$1\" --to fixed --azure"
            ))
            .arg(env!("CARGO_BIN_EXE_vhdkit"))
            .arg(&raw)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "limit {kib} KiB: {stderr}");
        assert!(
            stderr.contains("File too large") || stderr.contains("file too large"),
            "limit {kib} KiB: {stderr}"
        );
        assert_eq!(
            std::fs::metadata(&raw).unwrap().len(),
            3 * MIB / 2,
            "limit {kib} KiB"
        );
        assert!(std::fs::read(&raw).unwrap() == content);
    }
}

// ---------------------------------------------------------------- resize

/// Every prefix of a dynamic resize plan passes `check` (no error), and
/// running the same resize again afterwards completes it: the image has
/// the new size and no problem at all.
#[test]
fn every_prefix_of_a_dynamic_resize_passes_check_and_a_rerun_completes_it() {
    let dir = tempdir();
    let raw = dir.path().join("src.raw");
    // Data in the first MiB only: the shrinks below cut zeros.
    let mut content = vec![0u8; 2 * MIB as usize];
    content[..4096].copy_from_slice(&pattern(4096, 1));
    content[600 * KIB as usize..600 * KIB as usize + 100].copy_from_slice(&pattern(100, 2));
    std::fs::write(&raw, &content).unwrap();
    let mut checked = 0;
    let mut intermediate = 0;
    for (name, bs) in [("d2m.vhd", 2 * MIB), ("d512k.vhd", 512 * KIB)] {
        let p = dir.path().join(name);
        vhdkit::convert(
            &raw,
            &p,
            &ConvertOptions::new(Target::Dynamic).block_size(bs as u32),
        )
        .unwrap();
        for new_size in [2 * MIB + 512, 9 * MIB, 2 * MIB - 1024 * 512, MIB + 1536] {
            let plan = ops::plan_resize(&open(&p), new_size, false, true)
                .unwrap_or_else(|e| panic!("{name} -> {new_size}: {e}"))
                .unwrap_or_else(|| panic!("{name} -> {new_size}: no in-place plan"));
            for n in 0..=plan.steps.len() {
                let copy = dir.path().join("copy.vhd");
                std::fs::copy(&p, &copy).unwrap();
                ops::plan_resize(&open(&copy), new_size, false, true)
                    .unwrap()
                    .unwrap()
                    .run_steps(n)
                    .unwrap();
                let report = vhdkit::check(&copy, &Default::default()).unwrap();
                assert!(
                    report.is_clean(),
                    "{name} -> {new_size}, after {n} of {} steps: {:?}",
                    plan.steps.len(),
                    report.problems
                );
                if !report.problems.is_empty() {
                    intermediate += 1;
                    assert!(
                        report
                            .problems
                            .iter()
                            .any(|p| p.message.contains("resize stopped")),
                        "{:?}",
                        report.problems
                    );
                }
                checked += 1;
                ops::resize(&copy, new_size, false, true, &OpenOptions::new()).unwrap();
                let report = vhdkit::check(&copy, &Default::default()).unwrap();
                assert!(
                    report.problems.is_empty(),
                    "{name} -> {new_size}: rerun after {n} steps: {:?}",
                    report.problems
                );
                let img = open(&copy);
                assert_eq!(img.virtual_size(), new_size);
                let mut want = content.clone();
                want.resize(new_size as usize, 0);
                assert!(read_all(&img) == want, "{name} -> {new_size} after {n}");
            }
        }
    }
    assert!(checked > 20, "{checked}");
    assert!(
        intermediate >= 4,
        "the footer-copy state was seen {intermediate} times"
    );
}

/// Sizes are checked before any rounding: u64::MAX and its neighbours do
/// not wrap to a small size, and 2040 GiB is the most a VHD holds.
#[test]
fn resize_refuses_sizes_past_the_formats_limit_without_wrapping() {
    let dir = tempdir();
    let raw = dir.path().join("d.raw");
    sample_raw(&raw, MIB);
    let fixed = dir.path().join("d-fixed.vhd");
    vhdkit::convert(&raw, &fixed, &ConvertOptions::new(Target::Fixed)).unwrap();
    let dynv = dir.path().join("d-dyn.vhd");
    vhdkit::convert(&raw, &dynv, &ConvertOptions::new(Target::Dynamic)).unwrap();
    let max = vhdkit::ondisk::MAX_VHD_SIZE;
    for p in [&raw, &fixed, &dynv] {
        let before = std::fs::read(p).unwrap();
        let mut sizes = vec![u64::MAX, u64::MAX - 100, u64::MAX - 511];
        if p != &raw {
            sizes.extend([max + 1, max + 512, max + MIB]);
        }
        for size in sizes {
            for (azure, shrink) in [(false, false), (false, true), (true, true)] {
                let e = ops::resize(p, size, azure, shrink, &OpenOptions::new())
                    .expect_err(&format!("{} resized to {size}", p.display()));
                let m = e.to_string();
                assert!(m.contains("larger than"), "{}: {m}", p.display());
                if p != &raw {
                    assert!(
                        m.contains("2040 GiB") && m.contains(&max.to_string()),
                        "{m}"
                    );
                }
            }
            assert!(
                std::fs::read(p).unwrap() == before,
                "{} changed",
                p.display()
            );
        }
    }
    // 2040 GiB itself is allowed (a fixed disk: a sparse file).
    ops::resize(&fixed, max, false, false, &OpenOptions::new()).unwrap();
    assert_eq!(open(&fixed).virtual_size(), max);
}

/// A smaller size is an error that states the current size unless
/// shrinking is asked for.
#[test]
fn resize_shrinks_only_when_asked() {
    let dir = tempdir();
    let raw = dir.path().join("d.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(4 * MIB).unwrap();
    drop(f);
    let fixed = dir.path().join("d.vhd");
    vhdkit::convert(&raw, &fixed, &ConvertOptions::new(Target::Fixed)).unwrap();
    for p in [&raw, &fixed] {
        let e = ops::resize(p, 100, false, false, &OpenOptions::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&(4 * MIB).to_string()) && e.contains("shrink"),
            "{e}"
        );
        assert_eq!(open(p).virtual_size(), 4 * MIB);
        ops::resize(p, MIB, false, true, &OpenOptions::new()).unwrap();
        assert_eq!(open(p).virtual_size(), MIB);
    }
}

#[cfg(feature = "cli")]
#[test]
fn the_command_line_shrinks_with_shrink_only() {
    let dir = tempdir();
    let raw = dir.path().join("d.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(4 * MIB).unwrap();
    drop(f);
    let r = vhdkit(&[os("resize"), raw.as_os_str(), os("--size"), os("100")]);
    assert_eq!(r.code, Some(2), "{}", r.stdout);
    assert!(
        r.stderr.contains(&(4 * MIB).to_string()) && r.stderr.contains("--shrink"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 4 * MIB);
    let r = vhdkit(&[
        os("resize"),
        raw.as_os_str(),
        os("--size"),
        os("18446744073709551615"),
        os("--shrink"),
    ]);
    assert_eq!(r.code, Some(2), "{}", r.stdout);
    assert!(r.stderr.contains("larger than"), "{}", r.stderr);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 4 * MIB);
    let r = vhdkit(&[
        os("resize"),
        raw.as_os_str(),
        os("--size"),
        os("1M"),
        os("--shrink"),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), MIB);
}

/// A command with no output to clean up (here `map`, blocked writing to a
/// pipe nobody reads) exits 2 at once on SIGTERM or SIGHUP, as on Ctrl-C,
/// instead of dying by the signal or waiting for a second one.
#[cfg(feature = "cli")]
#[test]
fn a_signal_stops_a_read_only_command_with_exit_2() {
    use std::io::Read;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = tempdir();
    let raw = dir.path().join("striped.raw");
    // 4 KiB of data every 8 KiB over 32 MiB: 8192 extents, far more JSON
    // than a pipe holds.
    {
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(32 * MIB).unwrap();
        let page = pattern(4096, 5);
        for i in 0..(32 * MIB / 8192) {
            f.write_all_at(&page, i * 8192).unwrap();
        }
    }
    for sig in ["-TERM", "-HUP", "-INT"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vhdkit"))
            .args(["map", "--json"])
            .arg(&raw)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Its first bytes: it runs, its handler installed.
        let mut first = [0u8; 16];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut first)
            .unwrap();
        let s = Command::new("kill")
            .arg(sig)
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(s.success());
        let t = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{sig}: still running 10 s after the signal");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(status.code(), Some(2), "{sig}: {status} {stderr}");
        assert!(stderr.contains("interrupted"), "{sig}: {stderr}");
    }
}
