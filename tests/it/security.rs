//! Attacks through the file system (issue 8): parent locators aimed at
//! FIFOs, devices and files outside the allowed folders, a symlink swapped
//! in between the folder check and the open, the existence oracle of the
//! parent-not-found message, and FIFOs, character and block devices as
//! inputs. Every open here runs under a deadline: a regression that blocks
//! fails the test instead of hanging the suite.

use crate::make_testdata::{self, Fixture};

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rustix::fs::{FileType, Mode, CWD};
use vhdkit::ondisk::PlatformCode;
use vhdkit::{Error, Format, Image, OpenOptions};

/// Longest any single open may take here; they take milliseconds.
const DEADLINE: Duration = Duration::from_secs(20);

/// Runs `f` on another thread and fails if it has not returned within
/// [`DEADLINE`]. `release` is called first when it has not (to unblock a
/// FIFO open, so that the stuck thread ends too).
fn within_deadline<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
    release: impl FnOnce(),
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => v,
        Err(_) => {
            release();
            panic!("{what}: still blocked after {DEADLINE:?}");
        }
    }
}

/// Opens a FIFO for writing without blocking, which lets a reader blocked
/// in open() go on. Used only when a test has already failed.
fn release_fifo(p: &Path) {
    let _ = rustix::fs::open(
        p,
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::NONBLOCK,
        Mode::empty(),
    );
}

fn mkfifo(p: &Path) {
    rustix::fs::mknodat(CWD, p, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
}

fn open_within_deadline(
    path: &Path,
    opts: OpenOptions,
    fifo: Option<&Path>,
) -> vhdkit::Result<Image> {
    let p = path.to_path_buf();
    within_deadline(
        &format!("opening {}", path.display()),
        move || Image::open_with(&p, &opts),
        || {
            if let Some(f) = fifo {
                release_fifo(f)
            }
        },
    )
}

fn tried(r: vhdkit::Result<Image>, what: &str) -> Vec<String> {
    match r {
        Err(Error::ParentNotFound { tried, .. }) => tried,
        Err(e) => panic!("{what}: expected ParentNotFound, got {e:?}"),
        Ok(img) => panic!(
            "{what}: expected ParentNotFound, but it opened with parent {:?}",
            img.parent().map(|p| p.path().to_path_buf())
        ),
    }
}

/// The entries of `tried` that mention `s`.
fn mentioning<'a>(tried: &'a [String], s: &str) -> Vec<&'a String> {
    tried.iter().filter(|t| t.contains(s)).collect()
}

/// The entries of `tried` about the file `name` in a folder (not about a
/// path from the image refused unseen).
fn about<'a>(tried: &'a [String], name: &str) -> Vec<&'a String> {
    let needle = format!("/{name} ");
    tried
        .iter()
        .filter(|t| t.contains(&needle) && !t.contains("refused without looking"))
        .collect()
}

/// A child of [`make_testdata::chain_base`] naming its parent with these
/// locators and parent name.
fn child(base: &Fixture, parent_name: &str, locators: &[(PlatformCode, &str)]) -> Fixture {
    make_testdata::chain_child_with("c.vhd", base, parent_name, locators)
}

/// The composed disk of `child` over `base`, as the fixtures' models say.
fn expected(base: &Fixture, child: &Fixture) -> Vec<u8> {
    let all = vec![base.clone(), child.clone()];
    make_testdata::content(&all, &child.name)
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_exact_at(&mut v, 0).unwrap();
    v
}

// ------------------------------------------------------------------ parents

#[test]
fn a_fifo_named_as_parent_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_testdata::chain_base();
    let c = child(&base, "p.fifo", &[(PlatformCode::W2ru, ".\\p.fifo")]);
    let path = dir.path().join("c.vhd");
    std::fs::write(&path, &c.bytes).unwrap();
    let fifo = dir.path().join("p.fifo");
    mkfifo(&fifo);

    let t0 = Instant::now();
    let t = tried(
        open_within_deadline(&path, OpenOptions::new(), Some(&fifo)),
        "FIFO parent",
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let fifo_entries = about(&t, "p.fifo");
    assert!(!fifo_entries.is_empty(), "{t:?}");
    for e in &fifo_entries {
        assert!(
            e.contains("a FIFO (named pipe), not a regular file"),
            "the reason is given: {e}"
        );
    }
    // The check mode and the zero-filled read go the same way.
    let p2 = path.clone();
    let report = within_deadline(
        "checking a child whose parent is a FIFO",
        move || vhdkit::check(&p2, &vhdkit::CheckOptions::default()),
        || release_fifo(&fifo),
    )
    .unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.message.contains("not a regular file")),
        "{:?}",
        report.problems
    );
    let img = open_within_deadline(
        &path,
        OpenOptions::new().missing_parent_as_zero(true),
        Some(&dir.path().join("p.fifo")),
    )
    .unwrap();
    assert!(img.parent_missing());
    // The same FIFO named by the caller: trusted, but still not opened as a file.
    let t = tried(
        open_within_deadline(
            &path,
            OpenOptions::new().parent(dir.path().join("p.fifo")),
            Some(&dir.path().join("p.fifo")),
        ),
        "FIFO named by the caller",
    );
    assert!(
        mentioning(&t, "named by the caller")
            .iter()
            .all(|e| e.contains("FIFO")),
        "{t:?}"
    );
}

#[test]
fn a_device_named_as_parent_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_testdata::chain_base();
    let c = child(
        &base,
        "",
        &[
            (PlatformCode::W2ru, ".\\zero-link.vhd"),
            (PlatformCode::W2ku, "C:\\vms\\zero-node.vhd"),
            (PlatformCode::W2ru, "loop-node.vhd"),
        ],
    );
    let path = dir.path().join("c.vhd");
    std::fs::write(&path, &c.bytes).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero-link.vhd")).unwrap();
    // Device nodes need root (CAP_MKNOD).
    let char_node = rustix::fs::mknodat(
        CWD,
        dir.path().join("zero-node.vhd"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o600),
        rustix::fs::makedev(1, 5),
    );
    let block_node = rustix::fs::mknodat(
        CWD,
        dir.path().join("loop-node.vhd"),
        FileType::BlockDevice,
        Mode::from_raw_mode(0o600),
        rustix::fs::makedev(7, 0),
    );
    if char_node.is_err() || block_node.is_err() {
        eprintln!(
            "SKIPPED: device nodes cannot be made here ({char_node:?}, {block_node:?}); only \
             the symbolic link to /dev/zero is tested"
        );
    }
    let t = tried(
        open_within_deadline(&path, OpenOptions::new(), None),
        "device parents",
    );
    let link = about(&t, "zero-link.vhd");
    assert!(!link.is_empty(), "{t:?}");
    for e in link {
        assert!(
            e.contains("a link leading out of the folder")
                || e.contains("a symbolic link (not followed)"),
            "{e}"
        );
    }
    if char_node.is_ok() {
        let e = about(&t, "zero-node.vhd");
        assert!(!e.is_empty(), "{t:?}");
        assert!(
            e.iter()
                .all(|e| e.contains("a character device, not a regular file")),
            "{e:?}"
        );
    }
    if block_node.is_ok() {
        let e = about(&t, "loop-node.vhd");
        assert!(!e.is_empty(), "{t:?}");
        assert!(
            e.iter()
                .all(|e| e.contains("a block device, not a regular file")),
            "{e:?}"
        );
    }
    // Nothing was read from any of them as an image.
    assert!(mentioning(&t, "unique id").is_empty(), "{t:?}");
}

/// A thread that swaps `name` between the real parent and a symbolic link
/// to a decoy outside the folder until stopped.
struct Swapper {
    stop: Arc<AtomicBool>,
    swaps: Arc<std::sync::atomic::AtomicU64>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl Swapper {
    fn start(dir: PathBuf, keep: PathBuf, decoy: PathBuf) -> Swapper {
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, count) = (stop.clone(), swaps.clone());
        let handle = std::thread::spawn(move || {
            let name = dir.join("hand-chain-base.vhd");
            let (tmp_link, tmp_real) = (dir.join(".swap-link"), dir.join(".swap-real"));
            // Absolute and relative links, in turn.
            let rel = Path::new("..")
                .join("outside")
                .join(decoy.file_name().unwrap());
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let target = if n % 2 == 0 {
                    decoy.as_path()
                } else {
                    rel.as_path()
                };
                let _ = std::fs::remove_file(&tmp_link);
                std::os::unix::fs::symlink(target, &tmp_link).unwrap();
                std::fs::rename(&tmp_link, &name).unwrap();
                std::thread::yield_now();
                let _ = std::fs::remove_file(&tmp_real);
                std::fs::hard_link(&keep, &tmp_real).unwrap();
                std::fs::rename(&tmp_real, &name).unwrap();
                std::thread::yield_now();
                n += 1;
                count.store(n, Ordering::Relaxed);
            }
            n
        });
        Swapper {
            stop,
            swaps,
            handle: Some(handle),
        }
    }
    fn swaps(&self) -> u64 {
        self.swaps.load(Ordering::Relaxed)
    }
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn a_parent_swapped_for_a_link_outside_is_never_read() {
    let root = tempfile::tempdir().unwrap();
    let (kids, outside) = (root.path().join("kids"), root.path().join("outside"));
    std::fs::create_dir(&kids).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let base = make_testdata::chain_base();
    let c = make_testdata::chain_child(&base);
    let path = kids.join("c.vhd");
    std::fs::write(&path, &c.bytes).unwrap();
    // The real parent, kept under a second name to swap it back in.
    let keep = kids.join("real-parent.keep");
    std::fs::write(&keep, &base.bytes).unwrap();
    std::fs::hard_link(&keep, kids.join("hand-chain-base.vhd")).unwrap();
    // The decoy: the same unique id, other bytes where the child reads
    // through to its parent (virtual sector 50: clear in the child).
    const SECTOR: u64 = 50;
    let at = base.model.present[SECTOR as usize].expect("base defines sector 50") as usize;
    let mut decoy_bytes = base.bytes.clone();
    decoy_bytes[at..at + 512].fill(0x5a);
    let decoy = outside.join("decoy.vhd");
    std::fs::write(&decoy, &decoy_bytes).unwrap();
    let want = expected(&base, &c);
    let real_sector = &want[(SECTOR * 512) as usize..(SECTOR * 512 + 512) as usize];
    assert_ne!(real_sector, &[0x5a; 512][..]);

    let swapper = Swapper::start(kids.clone(), keep.clone(), decoy.clone());
    let (mut real, mut refused) = (0u32, 0u32);
    // At least 600 opens, and more (up to a minute) until the swapper has
    // swapped 300 times and both outcomes were seen, so that a busy machine
    // that starves the swapper still exercises the race.
    let t0 = Instant::now();
    let mut i = 0u32;
    while i < 600
        || (real == 0 || refused == 0 || swapper.swaps() < 300)
            && t0.elapsed() < Duration::from_secs(60)
    {
        i += 1;
        match Image::open(&path) {
            Ok(img) => {
                let mut s = [0u8; 512];
                img.read_exact_at(&mut s, SECTOR * 512).unwrap();
                assert_eq!(
                    &s[..],
                    real_sector,
                    "open {i}: the decoy outside the folder was read (parent {})",
                    img.parent().unwrap().path().display()
                );
                assert_eq!(img.parent().unwrap().path().parent(), Some(&*canon(&kids)));
                real += 1;
            }
            Err(Error::ParentNotFound { .. }) => refused += 1,
            Err(e) => panic!("open {i}: {e}"),
        }
    }
    let swaps = swapper.finish();
    eprintln!(
        "swapped {swaps} times in {:?}: {real} opens read the real parent, {refused} were refused",
        t0.elapsed()
    );
    assert!(swaps >= 300, "the swapper ran {swaps} times only");
    assert!(
        real > 0 && refused > 0,
        "the race was not exercised: {real} real, {refused} refused"
    );
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap()
}

#[test]
fn paths_outside_the_folders_are_not_looked_at() {
    let root = tempfile::tempdir().unwrap();
    let kids = root.path().join("kids");
    let secret = root.path().join("secret");
    std::fs::create_dir(&kids).unwrap();
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("shadow"), b"root:x:0:0").unwrap();
    let base = make_testdata::chain_base();
    // Pairs of the same file name: one exists, one does not.
    let there = secret.join("shadow").display().to_string();
    let missing = root
        .path()
        .join("nothere")
        .join("shadow")
        .display()
        .to_string();
    let pairs = [
        (
            "/etc/shadow".to_string(),
            "/no-such-dir-vhdkit/shadow".to_string(),
        ),
        (there, missing),
    ];
    for (exists, absent) in pairs {
        let mut texts = Vec::new();
        for p in [&exists, &absent] {
            let c = child(
                &base,
                p,
                &[
                    (PlatformCode::W2ku, p.as_str()),
                    (PlatformCode::W2ru, p.as_str()),
                ],
            );
            let path = kids.join("c.vhd");
            std::fs::write(&path, &c.bytes).unwrap();
            let t = tried(open_within_deadline(&path, OpenOptions::new(), None), p);
            assert_eq!(
                mentioning(&t, "refused without looking at it").len(),
                3,
                "{p}: {t:?}"
            );
            let msg = Image::open(&path).unwrap_err().to_string();
            texts.push((
                t.join("\n").replace(p.as_str(), "<PATH>"),
                msg.replace(p.as_str(), "<PATH>"),
            ));
        }
        assert_eq!(
            texts[0], texts[1],
            "an existing and a missing file outside the folder read differently"
        );
    }
}

#[test]
fn locators_aimed_outside_the_folder_open_nothing_there() {
    let root = tempfile::tempdir().unwrap();
    let kids = root.path().join("a").join("b").join("kids");
    std::fs::create_dir_all(&kids).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", kids.join("link.vhd")).unwrap();
    std::os::unix::fs::symlink(
        "../../../../../../../../etc/hostname",
        kids.join("rel-link.vhd"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/proc/self/mem", kids.join("mem-link.vhd")).unwrap();
    let base = make_testdata::chain_base();
    let locators: [(PlatformCode, &str); 7] = [
        (
            PlatformCode::W2ru,
            "..\\..\\..\\..\\..\\..\\..\\..\\etc\\passwd",
        ),
        (PlatformCode::W2ku, "/proc/self/mem"),
        (PlatformCode::W2ru, "/etc/shadow"),
        (PlatformCode::W2ku, "C:\\..\\..\\etc\\passwd"),
        (PlatformCode::W2ru, ".\\link.vhd"),
        (PlatformCode::W2ru, "rel-link.vhd"),
        (PlatformCode::W2ku, "\\\\server\\share\\mem-link.vhd"),
    ];
    let c = child(&base, "/etc/passwd", &locators);
    let path = kids.join("c.vhd");
    std::fs::write(&path, &c.bytes).unwrap();
    let t = tried(
        open_within_deadline(&path, OpenOptions::new(), None),
        "locators aimed outside",
    );
    // Nothing was opened as an image: no unique id compared, no open error.
    assert!(mentioning(&t, "unique id").is_empty(), "{t:?}");
    assert!(mentioning(&t, "could not be opened").is_empty(), "{t:?}");
    // Each outside path is refused unseen; each link is refused.
    for p in [
        "../../../../../../../../etc/passwd",
        "/proc/self/mem",
        "/etc/shadow",
        "C:/../../etc/passwd",
    ] {
        assert!(
            t.iter()
                .any(|e| e.contains(&format!("{p} refused without looking at it"))),
            "{p}: {t:?}"
        );
    }
    for l in ["link.vhd", "rel-link.vhd", "mem-link.vhd"] {
        let e = about(&t, l);
        assert!(!e.is_empty(), "{l}: {t:?}");
        assert!(
            e.iter()
                .all(|e| e.contains("refused: a link leading out of the folder")
                    || e.contains("refused: a symbolic link (not followed)")),
            "{l}: {e:?}"
        );
    }

    // With the real parent in the folder under one of the reduced names,
    // that one and only that one is used.
    std::fs::write(kids.join("passwd"), &base.bytes).unwrap();
    let img = open_within_deadline(&path, OpenOptions::new(), None).unwrap();
    let parent = img.parent().unwrap();
    assert_eq!(parent.path(), canon(&kids).join("passwd"));
    crate::common::assert_same("in-folder parent", &read_all(&img), &expected(&base, &c));
}

#[test]
fn a_symlink_inside_the_folder_and_a_named_parent_still_work() {
    let root = tempfile::tempdir().unwrap();
    let (kids, other) = (root.path().join("kids"), root.path().join("other"));
    std::fs::create_dir(&kids).unwrap();
    std::fs::create_dir(&other).unwrap();
    let base = make_testdata::chain_base();
    let c = make_testdata::chain_child(&base);
    let path = kids.join("c.vhd");
    std::fs::write(&path, &c.bytes).unwrap();
    let want = expected(&base, &c);
    // A parent outside, named by the caller through a link: trusted.
    std::fs::write(other.join("b.vhd"), &base.bytes).unwrap();
    std::os::unix::fs::symlink(other.join("b.vhd"), root.path().join("named-link.vhd")).unwrap();
    let img = open_within_deadline(
        &path,
        OpenOptions::new().parent(root.path().join("named-link.vhd")),
        None,
    )
    .unwrap();
    crate::common::assert_same("named parent", &read_all(&img), &want);
    // Allowed with parent_dir: found by its file name there.
    std::fs::rename(other.join("b.vhd"), other.join("hand-chain-base.vhd")).unwrap();
    let img = open_within_deadline(&path, OpenOptions::new().parent_dir(&other), None).unwrap();
    assert_eq!(
        img.parent().unwrap().path(),
        canon(&other).join("hand-chain-base.vhd")
    );
    crate::common::assert_same("parent in an allowed folder", &read_all(&img), &want);
}

// ------------------------------------------------------------------- inputs

fn expect_not_a_file(r: vhdkit::Result<Image>, kind: &str, what: &str) {
    match r {
        Err(e @ Error::NotAnImageFile { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(kind), "{what}: {msg}");
            assert!(
                !msg.contains("--"),
                "{what}: a library message names no flag: {msg}"
            );
        }
        Err(e) => panic!("{what}: expected NotAnImageFile, got {e:?}"),
        Ok(img) => panic!(
            "{what}: opened as a {} image of {} bytes",
            img.disk_type(),
            img.virtual_size()
        ),
    }
}

/// A loop device over a file, detached when dropped (panics included).
struct Loop(PathBuf);

impl Loop {
    /// Attaches `file`, or says why it cannot.
    fn attach(file: &Path) -> Result<Loop, String> {
        if !Path::new("/dev/loop-control").exists() {
            return Err("/dev/loop-control is missing".into());
        }
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(Loop(PathBuf::from(dev)))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let ok = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("could not detach {}", self.0.display());
        }
    }
}

#[test]
fn fifos_and_character_devices_are_refused_as_inputs_and_block_devices_read_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("in.fifo");
    mkfifo(&fifo);
    let f = fifo.clone();
    let r = open_within_deadline(&fifo, OpenOptions::new(), Some(&fifo));
    expect_not_a_file(r, "FIFO", "a FIFO");
    let r = open_within_deadline(&fifo, OpenOptions::new().writable(true), Some(&fifo));
    expect_not_a_file(r, "FIFO", "a FIFO opened for writing");
    let r = within_deadline(
        "checking a FIFO",
        move || vhdkit::check(&f, &vhdkit::CheckOptions::default()),
        || release_fifo(&fifo),
    );
    assert!(matches!(r, Err(Error::NotAnImageFile { .. })), "{r:?}");
    expect_not_a_file(
        open_within_deadline(Path::new("/dev/null"), OpenOptions::new(), None),
        "character device",
        "/dev/null",
    );
    let out = dir.path().join("out.vhd");
    let r = vhdkit::convert(
        "/dev/zero",
        &out,
        &vhdkit::ConvertOptions::new(vhdkit::Target::Dynamic),
    );
    assert!(matches!(r, Err(Error::NotAnImageFile { .. })), "{r:?}");
    assert!(!out.exists());

    // A block device: read at its real size, not as 0 bytes.
    const SIZE: usize = 3 << 20;
    let raw: Vec<u8> = (0..SIZE).map(|i| (i / 512 * 7 + i % 251) as u8).collect();
    let raw_path = dir.path().join("disk.raw");
    std::fs::write(&raw_path, &raw).unwrap();
    let dev = match Loop::attach(&raw_path) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("SKIPPED: no loop device ({why}); block devices as inputs are not tested");
            return;
        }
    };
    let img = open_within_deadline(&dev.0, OpenOptions::new(), None)
        .unwrap_or_else(|e| panic!("{}: {e}", dev.0.display()));
    assert_eq!(img.disk_type(), Format::Raw);
    assert_eq!(
        (img.file_len(), img.virtual_size()),
        (SIZE as u64, SIZE as u64)
    );
    crate::common::assert_same("block device", &read_all(&img), &raw);
    drop(img);
    // Converted as a raw input: every byte.
    let out = dir.path().join("from-dev.vhd");
    vhdkit::convert(
        &dev.0,
        &out,
        &vhdkit::ConvertOptions::new(vhdkit::Target::Dynamic).sync(false),
    )
    .unwrap();
    let img = Image::open(&out).unwrap();
    assert_eq!(img.disk_type(), Format::Dynamic);
    crate::common::assert_same("converted from a block device", &read_all(&img), &raw);
    drop(dev);

    // A fixed VHD on a block device is detected as one.
    let fixed = dir.path().join("f.vhd");
    vhdkit::convert(
        &raw_path,
        &fixed,
        &vhdkit::ConvertOptions::new(vhdkit::Target::Fixed).sync(false),
    )
    .unwrap();
    let dev = Loop::attach(&fixed).expect("a second loop device");
    let img = open_within_deadline(&dev.0, OpenOptions::new(), None).unwrap();
    assert_eq!(img.disk_type(), Format::Fixed);
    assert_eq!(img.virtual_size(), SIZE as u64);
    let mut tail = [0u8; 512];
    FileExt::read_exact_at(img.file().unwrap(), &mut tail, SIZE as u64).unwrap();
    assert_eq!(&tail[..8], b"conectix");
    crate::common::assert_same("fixed VHD on a block device", &read_all(&img), &raw);
}

// ---------------------------------------------------------------------- CLI

/// Runs vhdkit with a deadline; kills it and fails when it is exceeded.
#[cfg(feature = "cli")]
fn vhdkit_within_deadline(args: &[&std::ffi::OsStr], fifo: Option<&Path>) -> (i32, String) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_vhdkit"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(!err.contains("panicked"), "vhdkit {args:?} panicked: {err}");
            return (status.code().expect("vhdkit was killed"), err);
        }
        if t0.elapsed() > DEADLINE {
            if let Some(f) = fifo {
                release_fifo(f);
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("vhdkit {args:?} still blocked after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(feature = "cli")]
#[test]
fn the_cli_refuses_fifos_and_character_devices_and_does_not_block_on_a_fifo_parent() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("in.fifo");
    mkfifo(&fifo);
    let out = dir.path().join("out.vhd");
    let dev_null = PathBuf::from("/dev/null");
    for (input, kind) in [(&fifo, "FIFO"), (&dev_null, "character device")] {
        let runs: [Vec<&std::ffi::OsStr>; 3] = [
            vec!["info".as_ref(), input.as_ref()],
            vec!["check".as_ref(), input.as_ref()],
            vec![
                "convert".as_ref(),
                input.as_ref(),
                out.as_ref(),
                "--to".as_ref(),
                "dynamic".as_ref(),
            ],
        ];
        for args in runs {
            let (code, err) = vhdkit_within_deadline(&args, Some(&fifo));
            assert_eq!(code, 2, "vhdkit {args:?}: {err}");
            assert!(err.contains(kind), "vhdkit {args:?}: {err}");
        }
        assert!(!out.exists(), "no output from a refused input");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("in.fifo")],
        "nothing left behind"
    );

    // A child whose parent is a FIFO: info, check and convert end.
    let base = make_testdata::chain_base();
    let c = child(&base, "p.fifo", &[(PlatformCode::W2ru, ".\\p.fifo")]);
    let path = dir.path().join("c.vhd");
    std::fs::write(&path, &c.bytes).unwrap();
    let pfifo = dir.path().join("p.fifo");
    mkfifo(&pfifo);
    let runs: [(Vec<&std::ffi::OsStr>, i32); 3] = [
        // info describes the child without its parent; check reports it missing.
        (vec!["info".as_ref(), path.as_ref()], 0),
        (vec!["check".as_ref(), path.as_ref()], 1),
        (
            vec![
                "convert".as_ref(),
                path.as_ref(),
                out.as_ref(),
                "--to".as_ref(),
                "dynamic".as_ref(),
            ],
            2,
        ),
    ];
    for (args, want) in runs {
        let (code, err) = vhdkit_within_deadline(&args, Some(&pfifo));
        assert_eq!(code, want, "vhdkit {args:?}: {err}");
    }
    assert!(!out.exists());
}
