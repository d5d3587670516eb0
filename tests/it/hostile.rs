//! Hostile input: arbitrary bytes and damaged images must give an error,
//! never a panic, a hang or an allocation out of proportion to the file.
//!
//! * Property tests open arbitrary bytes, then small valid dynamic and
//!   differencing images (built here from `vhdkit::ondisk` types) with random
//!   byte flips, truncations and field overwrites aimed at the fields a
//!   reader must not trust. Whatever opens must map and read without error.
//!   The cases run in memory (`Image::from_storage` over `MemoryStorage`,
//!   parents offered with `OpenOptions::parent_storage`, `check_storage`),
//!   on one long-lived worker thread per test thread with a deadline: no
//!   file, folder or thread per case, so ten times the cases of the
//!   file-based version fit in the same time.
//! * A counting global allocator records the largest single allocation made
//!   on the test's thread; it must stay within a bound set by the file size.
//! * Targeted corruptions must be reported as `Corrupt`, `Checksum` or
//!   `Limit` naming the right structure, field and offset.
//! * Every file in `tests/regressions/` (inputs that once crashed or nearly
//!   crashed the library, and hand-made nasty ones) is replayed.
//!
//! Set `VHDKIT_SAVE_FAILURES=DIR` to have failing inputs written to DIR, for
//! adding to `tests/regressions/`.

use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vhdkit::error::Structure;
use vhdkit::ondisk::{
    bitmap_size, Bat, DiskType, DynamicHeader, Footer, Geometry, ParentLocator, PlatformCode,
    Timestamp, Uuid, FOOTER_SIZE, HEADER_SIZE,
};
use vhdkit::{Error, Format, Image, MemoryStorage, OpenOptions};

// ---------------------------------------------------------------------------
// The largest single allocation, per thread
// ---------------------------------------------------------------------------

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| {
        if size > c.get() {
            c.set(size)
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made.
pub(crate) fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|c| c.set(0));
    let r = f();
    (r, LARGEST.with(|c| c.get()))
}

// ---------------------------------------------------------------------------
// Building small valid images from the on-disk types
// ---------------------------------------------------------------------------

/// A non-zero byte for each virtual offset, different per image.
fn pattern(seed: u8, off: u64) -> u8 {
    ((off / 512) as u8)
        .wrapping_mul(37)
        .wrapping_add(off as u8 & 0x0f)
        ^ seed
        | 1
}

#[derive(Clone)]
struct Spec {
    disk_type: DiskType,
    virtual_size: u64,
    original_size: u64,
    block_size: u32,
    entries: u32,
    /// (block, sector bitmap) in file order.
    blocks: Vec<(usize, Vec<u8>)>,
    unique_id: Uuid,
    parent_id: Uuid,
    parent_name: &'static str,
    locators: Vec<(PlatformCode, Vec<u8>)>,
    seed: u8,
}

#[derive(Clone)]
struct Built {
    bytes: Vec<u8>,
    footer: Footer,
    /// The virtual disk as a correct reader presents it.
    expected: Vec<u8>,
    footer_at: u64,
}

const HDR: u64 = 512;
const TABLE: u64 = 1536;

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

fn build(s: &Spec, parent: Option<&Built>) -> Built {
    let n = s.entries as usize;
    let bs = u64::from(s.block_size);
    let bm = bitmap_size(s.block_size);
    let mut pos = TABLE + Bat::disk_size(n as u64);
    let mut header = DynamicHeader::new(TABLE, s.entries, s.block_size);
    header.parent_unique_id = s.parent_id;
    header.parent_timestamp = Timestamp(12345);
    header.set_parent_name(s.parent_name);
    let mut pieces: Vec<(u64, Vec<u8>)> = Vec::new();
    for (i, (code, data)) in s.locators.iter().enumerate() {
        let space = (data.len() as u64).div_ceil(512).max(1) * 512;
        header.parent_locators[i] = ParentLocator {
            platform_code: *code,
            data_space: space as u32,
            data_length: data.len() as u32,
            reserved: 0,
            data_offset: pos,
        };
        pieces.push((pos, data.clone()));
        pos += space;
    }
    let mut bat = Bat::new(n);
    let mut expected = match parent {
        Some(p) => {
            let mut e = p.expected.clone();
            e.resize(s.virtual_size as usize, 0);
            e
        }
        None => vec![0u8; s.virtual_size as usize],
    };
    for (b, bits) in &s.blocks {
        bat.entries[*b] = (pos / 512) as u32;
        let mut block = bits.clone();
        block.resize(bm as usize, 0);
        let base = *b as u64 * bs;
        for i in 0..bs {
            block.push(pattern(s.seed, base + i));
            let v = base + i;
            let sector = i / 512;
            let set = bits
                .get((sector / 8) as usize)
                .is_some_and(|x| x & (0x80 >> (sector % 8)) != 0);
            if set && v < s.virtual_size {
                expected[v as usize] = pattern(s.seed, v);
            }
        }
        pieces.push((pos, block));
        pos += bm + bs;
    }
    let footer = Footer {
        features: Footer::FEATURES_RESERVED,
        format_version: Footer::VERSION,
        data_offset: HDR,
        timestamp: Timestamp(700_000_000),
        creator_app: *b"test",
        creator_version: 0x0001_0000,
        creator_host_os: Footer::HOST_WINDOWS,
        original_size: s.original_size,
        current_size: s.virtual_size,
        geometry: Geometry::for_size(s.virtual_size),
        disk_type: s.disk_type,
        checksum: 0,
        unique_id: s.unique_id,
        saved_state: 0,
    }
    .with_checksum();
    let header = header.with_checksum();
    let footer_at = pos;
    let mut bytes = vec![0u8; (pos + 512) as usize];
    bytes[..512].copy_from_slice(&footer.to_bytes());
    bytes[512..1536].copy_from_slice(&header.to_bytes());
    let bat_bytes = bat.to_bytes();
    bytes[1536..1536 + bat_bytes.len()].copy_from_slice(&bat_bytes);
    for (at, data) in pieces {
        bytes[at as usize..at as usize + data.len()].copy_from_slice(&data);
    }
    bytes[pos as usize..].copy_from_slice(&footer.to_bytes());
    Built {
        bytes,
        footer,
        expected,
        footer_at,
    }
}

const PARENT_ID: Uuid = Uuid([0x11; 16]);
const CHILD_ID: Uuid = Uuid([0x22; 16]);

/// A dynamic disk of 26,112 bytes (6.375 blocks of 4 KiB; original size
/// 20,480 so the two size fields differ) with 8 BAT entries, four blocks
/// allocated out of order: full, partial, all-clear and a last partial block.
/// [`build_dynamic`], built once per process (the property tests use it
/// for every case).
fn dynamic() -> Built {
    static D: std::sync::OnceLock<Built> = std::sync::OnceLock::new();
    D.get_or_init(build_dynamic).clone()
}

fn build_dynamic() -> Built {
    build(
        &Spec {
            disk_type: DiskType::Dynamic,
            virtual_size: 26_112,
            original_size: 20_480,
            block_size: 4096,
            entries: 8,
            blocks: vec![
                (6, vec![0xff]),
                (0, vec![0xff]),
                (3, vec![0x00]),
                (2, vec![0b1011_0010]),
            ],
            unique_id: PARENT_ID,
            parent_id: Uuid::default(),
            parent_name: "",
            locators: vec![],
            seed: 0x40,
        },
        None,
    )
}

/// A differencing child of [`dynamic`] with 8 KiB blocks, named
/// `parent.vhd` by its W2ru and W2ku locators, a MacX URL and its name.
/// `differencing(&dynamic())`, built once per process.
fn child_of_dynamic() -> Built {
    static C: std::sync::OnceLock<Built> = std::sync::OnceLock::new();
    C.get_or_init(|| differencing(&dynamic())).clone()
}

fn differencing(parent: &Built) -> Built {
    build(
        &Spec {
            disk_type: DiskType::Differencing,
            virtual_size: 26_112,
            original_size: 16_384,
            block_size: 8192,
            entries: 4,
            blocks: vec![(3, vec![0xff, 0xff]), (1, vec![0xa5, 0x0f])],
            unique_id: CHILD_ID,
            parent_id: PARENT_ID,
            parent_name: "parent.vhd",
            locators: vec![
                (PlatformCode::W2ru, utf16le(".\\parent.vhd")),
                (PlatformCode::W2ku, utf16le("C:\\vms\\parent.vhd")),
                (
                    PlatformCode::MacX,
                    b"file://localhost/nonexistent/parent.vhd".to_vec(),
                ),
            ],
            seed: 0x80,
        },
        Some(parent),
    )
}

/// A fixed disk of 8 KiB plus its footer.
fn fixed() -> Vec<u8> {
    let mut v: Vec<u8> = (0..8192u64).map(|o| pattern(7, o)).collect();
    let mut f = Footer::new(DiskType::Fixed, 8192, Footer::NO_DATA_OFFSET);
    f.original_size = 4096;
    v.extend_from_slice(&f.to_bytes());
    v
}

// ---------------------------------------------------------------------------
// Opening, mapping and reading, with a deadline and an allocation bound
// ---------------------------------------------------------------------------

/// At most this much of the virtual disk is read.
const READ_CAP: u64 = 4 << 20;

struct Outcome {
    open: Result<(), String>,
    largest: usize,
}

/// The files of one case: the first is the image opened; the others are
/// offered to it as parents (by unique id, as `OpenOptions::parent_storage`).
/// Everything stays in memory: no folder, no file, no open per case.
type Files = Vec<(String, Vec<u8>)>;

fn files(list: &[(&str, &[u8])]) -> Files {
    list.iter()
        .map(|(n, b)| (n.to_string(), b.to_vec()))
        .collect()
}

/// The options of a case: `opts` with the other files offered as parents.
fn with_parents(files: &Files, opts: &OpenOptions) -> OpenOptions {
    let mut o = opts.clone();
    for (name, bytes) in &files[1..] {
        o = o.parent_storage(name, MemoryStorage::new(bytes.clone()));
    }
    o
}

/// The length of the file an error names: the image's (`<memory>`) or a
/// parent's, by name.
fn named_len(files: &Files, p: &Path) -> u64 {
    if p == Path::new("<memory>") {
        return files[0].1.len() as u64;
    }
    files
        .iter()
        .find(|(n, _)| p.ends_with(n))
        .map_or(0, |(_, b)| b.len() as u64)
}

/// Opens the first file from memory, then maps and reads (up to
/// [`READ_CAP`]) whatever opened. Panics if anything fails after a
/// successful open, or if an open error is of a kind a damaged file should
/// not produce.
fn exercise(files: Files, opts: &OpenOptions) -> Result<(), String> {
    let o = with_parents(&files, opts);
    let img = match Image::from_storage(MemoryStorage::new(files[0].1.clone()), &o) {
        Ok(i) => i,
        Err(e) => {
            let text = e.to_string();
            match &e {
                Error::Corrupt(c) => {
                    let p = c.path.as_ref().expect("corrupt errors name the file");
                    let len = named_len(&files, p);
                    assert!(
                        c.offset < len.max(1),
                        "error offset {} past the end of {} ({} bytes): {text}",
                        c.offset,
                        p.display(),
                        len
                    );
                }
                Error::Checksum { path: Some(_), .. }
                | Error::Limit { .. }
                | Error::ParentNotFound { .. } => {}
                other => panic!("unexpected kind of error for a damaged image: {other:?}"),
            }
            return Err(text);
        }
    };
    let size = img.virtual_size();
    // The whole map, then the first READ_CAP bytes read through it.
    let extents = img
        .map_all()
        .unwrap_or_else(|e| panic!("map_all after a good open: {e}"));
    let mut pos = 0;
    for e in &extents {
        assert_eq!(e.offset, pos, "extents are contiguous");
        assert!(e.length > 0);
        pos = e.end();
    }
    assert_eq!(pos, size, "extents cover the disk");
    let cap = size.min(READ_CAP);
    let mut buf = vec![0u8; 256 << 10];
    let mut off = 0;
    while off < cap {
        let n = (cap - off).min(buf.len() as u64) as usize;
        img.read_exact_at(&mut buf[..n], off)
            .unwrap_or_else(|e| panic!("read at {off} after a good open: {e}"));
        off += n as u64;
    }
    // A read that straddles the end is refused, not mis-served.
    if size > 0 {
        let mut two = [0u8; 2];
        assert!(img.read_exact_at(&mut two, size - 1).is_err());
    }
    let _ = img.map_shallow(0, size.min(1 << 20));
    // The Read + Seek adapter near both ends.
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut r = img.reader();
        let mut head = vec![0u8; (size.min(64 << 10)) as usize];
        r.read_exact(&mut head)
            .unwrap_or_else(|e| panic!("reader after a good open: {e}"));
        let back = size.min(4096);
        r.seek(SeekFrom::End(-(back as i64))).unwrap();
        let mut tail = Vec::new();
        r.read_to_end(&mut tail)
            .unwrap_or_else(|e| panic!("reader at the end: {e}"));
        assert_eq!(tail.len() as u64, back);
        assert!(r.seek(SeekFrom::Current(-(size as i64) - 1)).is_err());
    }
    let _ = format!("{:?} {:?}", img.footer(), img.warnings());
    Ok(())
}

/// Runs [`vhdkit::check_storage`] (the collecting walk, which goes on past
/// problems) with strict and lenient options; it must not panic.
fn exercise_check(files: Files, opts: &OpenOptions) -> Result<(), String> {
    check_with(files, opts, false)
}

/// As [`exercise_check`], with Azure's rules too.
fn exercise_check_azure(files: Files, opts: &OpenOptions) -> Result<(), String> {
    check_with(files, opts, true)
}

fn check_with(files: Files, opts: &OpenOptions, azure: bool) -> Result<(), String> {
    let co = vhdkit::CheckOptions {
        open: with_parents(&files, opts),
        azure,
    };
    let image = files.into_iter().next().map(|f| f.1).unwrap_or_default();
    match vhdkit::check_storage(MemoryStorage::new(image), &co) {
        Ok(r) => {
            // Each problem must print; the report as a whole may be long
            // (see `check_lists_a_problem_per_bat_entry`).
            for p in &r.problems {
                let _ = format!("{p:?}");
            }
            // Each has a code from README's list.
            crate::formats::assert_documented(&r);
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

fn save_failure(name: &str, bytes: &[u8]) {
    if let Some(dir) = std::env::var_os("VHDKIT_SAVE_FAILURES") {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let p = PathBuf::from(dir).join(format!("{name}-{}-{h:016x}.vhd", bytes.len()));
        let _ = std::fs::write(p, bytes);
    }
}

/// One case's work, run on the worker thread: its result, the largest
/// single allocation it made, and the time it took.
type Job = Box<dyn FnOnce() -> (Result<(), String>, usize, Duration) + Send>;
type Done = (Result<(), String>, usize, Duration);

/// A thread that runs the cases of one test thread, one at a time, so that
/// a hang is caught by a deadline without a thread per case.
struct Worker {
    jobs: std::sync::mpsc::Sender<Job>,
    done: std::sync::mpsc::Receiver<Done>,
    handle: std::thread::JoinHandle<()>,
}

impl Worker {
    fn spawn() -> Worker {
        let (jobs, job_rx) = std::sync::mpsc::channel::<Job>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            for job in job_rx {
                if done_tx.send(job()).is_err() {
                    break;
                }
            }
        });
        Worker { jobs, done, handle }
    }
}

thread_local! {
    static WORKER: std::cell::RefCell<Option<Worker>> = const { std::cell::RefCell::new(None) };
}

/// Runs [`exercise`] on the worker thread with a deadline, and checks the
/// allocation bound. The first of `files` is opened, the others offered
/// as parents.
fn check_files(files: &[(&str, &[u8])], opts: &OpenOptions) -> Outcome {
    check_files_with(files, opts, exercise)
}

fn check_files_with(
    list: &[(&str, &[u8])],
    opts: &OpenOptions,
    run: fn(Files, &OpenOptions) -> Result<(), String>,
) -> Outcome {
    let longest = list.iter().map(|f| f.1.len()).max().unwrap_or(0);
    let case = files(list);
    let opts2 = opts.clone();
    let job: Job = Box::new(move || {
        let started = Instant::now();
        let (open, largest) = largest_allocation(|| run(case, &opts2));
        (open, largest, started.elapsed())
    });
    let deadline = Duration::from_secs(20);
    let got = WORKER.with(|cell| {
        let mut w = cell.borrow_mut();
        let worker = w.get_or_insert_with(Worker::spawn);
        worker.jobs.send(job).expect("the worker takes jobs");
        match worker.done.recv_timeout(deadline) {
            Ok(d) => Ok(d),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(None),
            // The worker panicked: its panic is passed on below.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(w.take().map(|w| w.handle)),
        }
    });
    let (open, largest, elapsed) = match got {
        Ok(d) => d,
        Err(None) => {
            save_failure("hang", list[0].1);
            panic!("open + map + read took more than {deadline:?}: a hang");
        }
        Err(Some(handle)) => {
            save_failure("panic", list[0].1);
            match handle.join() {
                Err(p) => std::panic::resume_unwind(p),
                Ok(()) => panic!("the worker stopped without an answer"),
            }
        }
    };
    let out = Outcome { open, largest };
    let bound = (4 * longest).max(1 << 20) + (64 << 10);
    if out.largest > bound {
        save_failure("alloc", list[0].1);
        panic!(
            "largest single allocation {} bytes for a {} byte file (bound {}); open: {:?}",
            out.largest, longest, bound, out.open
        );
    }
    assert!(elapsed < Duration::from_secs(5), "slow: {elapsed:?}");
    out
}

/// Cases per property: `default`, or `VHDKIT_HOSTILE_CASES` for a longer hunt.
fn cases(default: u32) -> u32 {
    std::env::var("VHDKIT_HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn opts_variants() -> [OpenOptions; 2] {
    [
        OpenOptions::new(),
        OpenOptions::new()
            .ignore_checksums(true)
            .missing_parent_as_zero(true),
    ]
}

// ---------------------------------------------------------------------------
// The builders are right (otherwise the rest proves little)
// ---------------------------------------------------------------------------

fn open_bytes(
    files: &[(&str, &[u8])],
    opts: &OpenOptions,
) -> (tempfile::TempDir, vhdkit::Result<Image>) {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let r = Image::open_with(dir.path().join(files[0].0), opts);
    (dir, r)
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_exact_at(&mut v, 0).unwrap();
    v
}

#[test]
fn built_images_open_and_read_as_expected() {
    let d = dynamic();
    let (_dir, r) = open_bytes(&[("d.vhd", &d.bytes)], &OpenOptions::new());
    let img = r.unwrap();
    assert_eq!(img.disk_type(), Format::Dynamic);
    assert_eq!(img.virtual_size(), 26_112);
    assert_eq!(img.footer().unwrap().original_size, 20_480);
    assert!(img.warnings().is_empty(), "{:?}", img.warnings());
    assert_eq!(img.allocated_blocks(), 4);
    assert_eq!(read_all(&img), d.expected);
    assert!(d.expected.iter().any(|&b| b != 0));
    assert!(
        d.expected[3 * 4096..4 * 4096].iter().all(|&b| b == 0),
        "all-clear block"
    );

    let c = differencing(&d);
    let (_dir, r) = open_bytes(
        &[("c.vhd", &c.bytes), ("parent.vhd", &d.bytes)],
        &OpenOptions::new(),
    );
    let img = r.unwrap();
    assert_eq!(img.disk_type(), Format::Differencing);
    assert_eq!(img.chain().len(), 2);
    assert_eq!(read_all(&img), c.expected);
    assert_ne!(c.expected, d.expected);

    let f = fixed();
    let (_dir, r) = open_bytes(&[("f.vhd", &f)], &OpenOptions::new());
    let img = r.unwrap();
    assert_eq!(img.disk_type(), Format::Fixed);
    assert_eq!(read_all(&img), f[..8192]);
}

// ---------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Field {
    FooterDataOffset,
    FooterCurrentSize,
    FooterDiskType,
    HeaderTableOffset,
    HeaderMaxTableEntries,
    HeaderBlockSize,
    HeaderDataOffset,
    BatEntry(usize),
    LocatorCode(usize),
    LocatorSpace(usize),
    LocatorLength(usize),
    LocatorOffset(usize),
}

#[derive(Clone, Debug)]
enum Mutation {
    /// XOR one byte (position as a fraction of the length).
    Flip(u32, u8),
    /// Overwrite a run of bytes.
    Fill(u32, u16, u8),
    /// Cut the file to a fraction of its length.
    Truncate(u32),
    /// Grow the file by so many bytes (zeros).
    Grow(u16),
    /// Drop the last n bytes (a footer cut short).
    Chop(u16),
    /// Set a field to a value in the end footer, the copy or both.
    Set(Field, u64, Which),
}

#[derive(Clone, Copy, Debug)]
enum Which {
    End,
    Copy,
    Both,
}

fn arb_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0u64, 1, 2, 3, 7, 511, 512, 513, 1023, 1024, 1535, 1536, 2048, 3000, 4095, 4096,
            8192, 1 << 20, 1 << 31, (1 << 31) + 512, 0x7fff_ffff, 0x8000_0000, 0xffff_fffe,
            0xffff_ffff, 1 << 32, 1 << 40, 1 << 55, 1 << 63, u64::MAX - 511, u64::MAX - 1,
            u64::MAX,
        ]),
        1 => 0u64..70_000,
        1 => any::<u64>(),
    ]
}

fn arb_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        Just(Field::FooterDataOffset),
        Just(Field::FooterCurrentSize),
        Just(Field::FooterDiskType),
        Just(Field::HeaderTableOffset),
        Just(Field::HeaderMaxTableEntries),
        Just(Field::HeaderBlockSize),
        Just(Field::HeaderDataOffset),
        (0usize..10).prop_map(Field::BatEntry),
        (0usize..4).prop_map(Field::LocatorCode),
        (0usize..4).prop_map(Field::LocatorSpace),
        (0usize..4).prop_map(Field::LocatorLength),
        (0usize..4).prop_map(Field::LocatorOffset),
    ]
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let which = prop_oneof![Just(Which::End), Just(Which::Copy), Just(Which::Both)];
    prop_oneof![
        2 => (any::<u32>(), 1u8..=255).prop_map(|(a, b)| Mutation::Flip(a, b)),
        1 => (any::<u32>(), 1u16..600, any::<u8>()).prop_map(|(a, n, b)| Mutation::Fill(a, n, b)),
        1 => any::<u32>().prop_map(Mutation::Truncate),
        1 => any::<u16>().prop_map(Mutation::Grow),
        1 => (1u16..1100).prop_map(Mutation::Chop),
        6 => (arb_field(), arb_value(), which).prop_map(|(f, v, w)| Mutation::Set(f, v, w)),
    ]
}

fn frac(x: u32, len: usize) -> usize {
    ((u64::from(x) * len as u64) >> 32) as usize
}

fn put(bytes: &mut [u8], at: u64, v: u64, width: usize) {
    let at = at as usize;
    if at + width <= bytes.len() {
        let be = v.to_be_bytes();
        bytes[at..at + width].copy_from_slice(&be[8 - width..]);
    }
}

fn apply(b: &Built, muts: &[Mutation], fix_checksums: bool) -> Vec<u8> {
    let mut v = b.bytes.clone();
    let end = b.footer_at;
    for m in muts {
        let len = v.len();
        match *m {
            Mutation::Flip(at, x) if len > 0 => {
                let i = frac(at, len);
                v[i] ^= x;
            }
            Mutation::Fill(at, n, x) if len > 0 => {
                let i = frac(at, len);
                let j = (i + n as usize).min(len);
                v[i..j].fill(x);
            }
            Mutation::Truncate(at) => v.truncate(frac(at, len)),
            Mutation::Grow(n) => v.resize(len + n as usize, 0),
            Mutation::Chop(n) => v.truncate(len.saturating_sub(n as usize)),
            Mutation::Set(f, val, which) => {
                let footers: &[u64] = match which {
                    Which::End => &[end],
                    Which::Copy => &[0],
                    Which::Both => &[0, end],
                };
                let loc = |i: usize| HDR + 576 + 24 * i as u64;
                match f {
                    Field::FooterDataOffset => {
                        footers.iter().for_each(|&at| put(&mut v, at + 16, val, 8))
                    }
                    Field::FooterCurrentSize => {
                        footers.iter().for_each(|&at| put(&mut v, at + 48, val, 8))
                    }
                    Field::FooterDiskType => {
                        footers.iter().for_each(|&at| put(&mut v, at + 60, val, 4))
                    }
                    Field::HeaderTableOffset => put(&mut v, HDR + 16, val, 8),
                    Field::HeaderMaxTableEntries => put(&mut v, HDR + 28, val, 4),
                    Field::HeaderBlockSize => put(&mut v, HDR + 32, val, 4),
                    Field::HeaderDataOffset => put(&mut v, HDR + 8, val, 8),
                    Field::BatEntry(i) => put(&mut v, TABLE + 4 * i as u64, val, 4),
                    Field::LocatorCode(i) => put(&mut v, loc(i), val, 4),
                    Field::LocatorSpace(i) => put(&mut v, loc(i) + 4, val, 4),
                    Field::LocatorLength(i) => put(&mut v, loc(i) + 8, val, 4),
                    Field::LocatorOffset(i) => put(&mut v, loc(i) + 16, val, 8),
                }
            }
            _ => {}
        }
    }
    if fix_checksums {
        refresh_checksums(&mut v, end);
    }
    v
}

/// Recomputes the checksums of whatever footers and header are still where
/// the builder put them, so that mutations reach past the checksum checks.
fn refresh_checksums(v: &mut [u8], footer_at: u64) {
    for at in [0usize, footer_at as usize] {
        if at + FOOTER_SIZE <= v.len() {
            let f: &mut [u8; FOOTER_SIZE] = (&mut v[at..at + FOOTER_SIZE]).try_into().unwrap();
            let sum = Footer::compute_checksum(f);
            f[64..68].copy_from_slice(&sum.to_be_bytes());
        }
    }
    let h = HDR as usize;
    if h + HEADER_SIZE <= v.len() {
        let b: &mut [u8; HEADER_SIZE] = (&mut v[h..h + HEADER_SIZE]).try_into().unwrap();
        let sum = DynamicHeader::compute_checksum(b);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
    }
}

fn with_checksummed_footer_at_end(mut bytes: Vec<u8>, f: Footer) -> Vec<u8> {
    bytes.extend_from_slice(&f.to_bytes());
    bytes
}

prop_compose! {
    /// A footer with arbitrary but plausible fields and a valid checksum.
    fn arb_footer()(
        disk_type in prop_oneof![Just(2u32), Just(3), Just(4), any::<u32>()],
        data_offset in arb_value(),
        current_size in arb_value(),
        unique_id in any::<[u8; 16]>(),
    ) -> Footer {
        let mut f = Footer::new(DiskType::from_code(disk_type), current_size, data_offset);
        f.unique_id = Uuid(unique_id);
        f
    }
}

prop_compose! {
    fn arb_header()(
        table_offset in arb_value(),
        max_table_entries in arb_value(),
        block_size in prop_oneof![Just(512u64), Just(4096), Just(2 << 20), arb_value()],
        locator in (arb_value(), arb_value()),
    ) -> DynamicHeader {
        let mut h = DynamicHeader::new(table_offset, max_table_entries as u32, block_size as u32);
        h.parent_locators[0] = ParentLocator {
            platform_code: PlatformCode::W2ru,
            data_space: 512,
            data_length: locator.1 as u32,
            reserved: 0,
            data_offset: locator.0,
        };
        h.set_parent_name("x.vhd");
        h
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(5120), ..ProptestConfig::default() })]

    /// (a) Arbitrary bytes.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
        for opts in &opts_variants() {
            check_files(&[("x.vhd", &bytes)], opts);
        }
    }

    /// Arbitrary bytes that end in a footer (and may start with its copy
    /// and hold a header at 512): every field is hostile, every checksum right.
    #[test]
    fn hostile_footers_and_headers_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..5000),
        f in arb_footer(),
        h in arb_header(),
        copy in any::<bool>(),
        with_header in any::<bool>(),
    ) {
        let mut body = body;
        if copy && body.len() >= 512 {
            body[..512].copy_from_slice(&f.to_bytes());
        }
        if with_header && body.len() >= 1536 {
            body[512..1536].copy_from_slice(&h.to_bytes());
        }
        let bytes = with_checksummed_footer_at_end(body, f);
        for opts in &opts_variants() {
            check_files(&[("x.vhd", &bytes)], opts);
        }
    }

    /// (b) A valid dynamic image, damaged.
    #[test]
    fn damaged_dynamic_images_never_panic(
        muts in prop::collection::vec(arb_mutation(), 1..5),
        fix in any::<bool>(),
    ) {
        let base = dynamic();
        let bytes = apply(&base, &muts, fix);
        for opts in &opts_variants() {
            check_files(&[("d.vhd", &bytes)], opts);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2560), ..ProptestConfig::default() })]

    /// (b) A valid differencing child and its parent, one of them damaged.
    #[test]
    fn damaged_differencing_pairs_never_panic(
        muts in prop::collection::vec(arb_mutation(), 1..5),
        fix in any::<bool>(),
        damage_parent in prop::bool::weighted(0.25),
    ) {
        let parent = dynamic();
        let child = child_of_dynamic();
        let (c, p) = if damage_parent {
            (child.bytes.clone(), apply(&parent, &muts, fix))
        } else {
            (apply(&child, &muts, fix), parent.bytes.clone())
        };
        for opts in &opts_variants() {
            check_files(&[("c.vhd", &c), ("parent.vhd", &p)], opts);
        }
    }

    /// A fixed image, damaged.
    #[test]
    fn damaged_fixed_images_never_panic(
        muts in prop::collection::vec(arb_mutation(), 1..4),
        fix in any::<bool>(),
    ) {
        let f = fixed();
        let footer_at = (f.len() - 512) as u64;
        let b = Built {
            footer: Footer::parse(&f[f.len() - 512..].try_into().unwrap(), 0, Structure::Footer).unwrap(),
            expected: Vec::new(),
            bytes: f,
            footer_at,
        };
        let bytes = apply(&b, &muts, fix);
        for opts in &opts_variants() {
            check_files(&[("f.vhd", &bytes)], opts);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2560), ..ProptestConfig::default() })]

    /// `check` walks on past problems that stop `open`: it must survive the
    /// same damage.
    #[test]
    fn check_survives_damaged_images(
        muts in prop::collection::vec(arb_mutation(), 1..5),
        fix in any::<bool>(),
        differencing_pair in any::<bool>(),
    ) {
        let parent = dynamic();
        if differencing_pair {
            let child = child_of_dynamic();
            let c = apply(&child, &muts, fix);
            for opts in &opts_variants() {
                check_files_with(&[("c.vhd", &c), ("parent.vhd", &parent.bytes)], opts, exercise_check);
            }
        } else {
            let bytes = apply(&parent, &muts, fix);
            for opts in &opts_variants() {
                check_files_with(&[("d.vhd", &bytes)], opts, exercise_check);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Regression inputs
// ---------------------------------------------------------------------------

fn regressions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/regressions")
}

#[test]
fn regression_inputs_replay_without_panic() {
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(regressions_dir())
        .expect("tests/regressions exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "vhd"))
        .collect();
    entries.sort();
    for p in entries {
        let bytes = std::fs::read(&p).unwrap();
        // Each is also offered as its own parent, as a file named `r.vhd`
        // alone in a folder would be: a locator naming it finds it.
        let pair: [(&str, &[u8]); 2] = [("r.vhd", &bytes), ("r.vhd", &bytes)];
        for opts in &opts_variants() {
            let out = check_files(&pair, opts);
            // The outcome is printed so that `--nocapture` shows what each gives.
            println!("{}: {:?}", p.display(), out.open);
            check_files_with(&pair, opts, exercise_check);
        }
        n += 1;
    }
    assert!(n >= 3, "tests/regressions holds {n} inputs");
}

/// `check --azure` on every regression input.
#[test]
fn regression_inputs_replay_through_check_azure() {
    for e in std::fs::read_dir(regressions_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "vhd") {
            let bytes = std::fs::read(&p).unwrap();
            for opts in &opts_variants() {
                check_files_with(
                    &[("r.vhd", &bytes), ("r.vhd", &bytes)],
                    opts,
                    exercise_check_azure,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Targeted corruptions: the right error, naming the right place
// ---------------------------------------------------------------------------

fn corrupt(r: vhdkit::Result<Image>) -> Box<vhdkit::error::Corruption> {
    match r {
        Err(Error::Corrupt(c)) => c,
        Err(e) => panic!("expected a Corrupt error, got {e:?}"),
        Ok(_) => panic!("expected a Corrupt error, the image opened"),
    }
}

fn set(b: &Built, f: Field, v: u64) -> Vec<u8> {
    apply(b, &[Mutation::Set(f, v, Which::Both)], true)
}

fn open_one(bytes: &[u8]) -> (tempfile::TempDir, vhdkit::Result<Image>) {
    open_bytes(&[("d.vhd", bytes)], &OpenOptions::new())
}

#[test]
fn block_size_not_a_power_of_two() {
    let (_d, r) = open_one(&set(&dynamic(), Field::HeaderBlockSize, 3000));
    let c = corrupt(r);
    assert_eq!(
        (c.structure, c.field, c.offset),
        (Structure::DynamicHeader, "block size", 512 + 32)
    );
    assert_eq!(c.found, "3000");
    assert!(c.path.as_ref().unwrap().ends_with("d.vhd"));
    for bs in [0, 256, 511, 4097, 0x8000_0001] {
        let (_d, r) = open_one(&set(&dynamic(), Field::HeaderBlockSize, bs));
        assert_eq!(corrupt(r).field, "block size", "{bs}");
    }
}

#[test]
fn bat_entry_past_the_end_of_the_file() {
    let d = dynamic();
    let past = d.bytes.len() as u64 / 512 + 4;
    let (_dir, r) = open_one(&set(&d, Field::BatEntry(2), past));
    let c = corrupt(r);
    assert_eq!(c.structure, Structure::BatEntry(2));
    assert_eq!(c.offset, TABLE + 4 * 2);
    assert_eq!(c.field, "block sector offset");
    // A block that starts inside the file but runs into the footer.
    let into_footer = (d.footer_at - 1024) / 512;
    let (_dir, r) = open_one(&set(&d, Field::BatEntry(1), into_footer));
    let c = corrupt(r);
    assert_eq!((c.structure, c.offset), (Structure::BatEntry(1), TABLE + 4));
    // The largest sector number there is.
    let (_dir, r) = open_one(&set(&d, Field::BatEntry(0), 0xffff_fffe));
    assert_eq!(corrupt(r).structure, Structure::BatEntry(0));
}

#[test]
fn two_bat_entries_for_one_block_overlap() {
    let d = dynamic();
    let b0 = d.bytes[TABLE as usize..TABLE as usize + 4].to_vec();
    let e0 = u32::from_be_bytes(b0.try_into().unwrap());
    let (_dir, r) = open_one(&set(&d, Field::BatEntry(5), u64::from(e0)));
    let c = corrupt(r);
    assert!(
        matches!(c.structure, Structure::BatEntry(0) | Structure::BatEntry(5)),
        "{c:?}"
    );
    assert_eq!(c.field, "block sector offset");
    assert!(c.offset == TABLE || c.offset == TABLE + 20, "{c:?}");
    assert!(c.found.contains("overlapping block"), "{}", c.found);
    assert!(c.expected.contains("no overlap"));
    assert_eq!(c.rule, vhdkit::Rule::Overlap);
    // Half a block over another.
    let (_dir, r) = open_one(&set(&d, Field::BatEntry(4), u64::from(e0) + 4));
    assert!(corrupt(r).found.contains("overlapping"));
}

#[test]
fn bat_entry_over_the_metadata() {
    let d = dynamic();
    for sector in [0u64, 1, 2, 3] {
        let (_dir, r) = open_one(&set(&d, Field::BatEntry(1), sector));
        let c = corrupt(r);
        assert_eq!(
            c.structure,
            Structure::BatEntry(1),
            "sector {sector}: {c:?}"
        );
        assert_eq!(c.offset, TABLE + 4);
        assert!(c.found.contains("overlapping"), "{}", c.found);
    }
}

#[test]
fn max_table_entries_too_small_for_the_current_size() {
    let (_d, r) = open_one(&set(&dynamic(), Field::HeaderMaxTableEntries, 6));
    let c = corrupt(r);
    assert_eq!(
        (c.structure, c.field, c.offset),
        (Structure::DynamicHeader, "max table entries", 512 + 28)
    );
    assert!(c.expected.contains("at least 7"), "{}", c.expected);
    // Or the current size too large for the table.
    let (_d, r) = open_one(&set(&dynamic(), Field::FooterCurrentSize, 8 * 4096 + 1));
    assert_eq!(corrupt(r).field, "max table entries");
    let (_d, r) = open_one(&set(&dynamic(), Field::FooterCurrentSize, u64::MAX));
    assert_eq!(corrupt(r).field, "max table entries");
}

#[test]
fn max_table_entries_over_the_limit() {
    let (_d, r) = open_one(&set(&dynamic(), Field::HeaderMaxTableEntries, 0xffff_ffff));
    match r {
        Err(Error::Limit {
            what,
            value,
            limit,
            path,
        }) => {
            assert_eq!(what, vhdkit::LimitOf::BatEntries);
            assert_eq!(value, 0xffff_ffff);
            assert_eq!(limit, 1 << 24);
            assert!(path.ends_with("d.vhd"));
        }
        other => panic!("{other:?}"),
    }
    // Under the limit but larger than the file: the BAT cannot fit.
    let (_d, r) = open_one(&set(&dynamic(), Field::HeaderMaxTableEntries, 1 << 20));
    let c = corrupt(r);
    assert_eq!(
        (c.structure, c.field, c.offset),
        (Structure::DynamicHeader, "table offset", 512 + 16)
    );
    // A tighter limit of the caller's.
    let d = dynamic();
    let (_dir, r) = open_bytes(
        &[("d.vhd", &d.bytes)],
        &OpenOptions::new().max_bat_entries(7),
    );
    assert!(
        matches!(
            r,
            Err(Error::Limit {
                value: 8,
                limit: 7,
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn table_offset_outside_the_file() {
    let d = dynamic();
    for t in [0u64, 511, d.footer_at, d.bytes.len() as u64, u64::MAX - 8] {
        let (_dir, r) = open_one(&set(&d, Field::HeaderTableOffset, t));
        let c = corrupt(r);
        assert_eq!(
            (c.structure, c.field, c.offset),
            (Structure::DynamicHeader, "table offset", 512 + 16),
            "table offset {t}"
        );
    }
    // Inside the file but over the header.
    let (_dir, r) = open_one(&set(&d, Field::HeaderTableOffset, 1024));
    let c = corrupt(r);
    assert_eq!(
        (c.structure, c.field),
        (Structure::DynamicHeader, "table offset")
    );
}

#[test]
fn data_offset_outside_the_file() {
    let d = dynamic();
    for off in [
        d.bytes.len() as u64 + 512,
        d.footer_at,
        u64::MAX,
        u64::MAX - 1023,
        0,
        511,
    ] {
        let (_dir, r) = open_one(&set(&d, Field::FooterDataOffset, off));
        let c = corrupt(r);
        assert_eq!(
            (c.structure, c.field, c.offset),
            (Structure::Footer, "data offset", d.footer_at + 16),
            "data offset {off}"
        );
    }
    // Pointing at a place with no header: the header's cookie is wrong.
    let (_dir, r) = open_one(&set(&d, Field::FooterDataOffset, 2048));
    let c = corrupt(r);
    assert_eq!(
        (c.structure, c.field, c.offset),
        (Structure::DynamicHeader, "cookie", 2048)
    );
}

#[test]
fn data_offset_of_the_footer_copy_is_blamed_on_the_copy() {
    // The end footer is gone (cut off), so the copy at 0 is in force; its
    // data offset is wrong. The error must point at offset 16, in the copy.
    let d = dynamic();
    let mut v = set(&d, Field::FooterDataOffset, u64::MAX);
    v.truncate(d.footer_at as usize);
    let (_dir, r) = open_one(&v);
    let c = corrupt(r);
    assert_eq!(
        (c.structure, c.field, c.offset),
        (Structure::FooterCopy, "data offset", 16)
    );
}

#[test]
fn bad_footer_checksum_without_a_copy() {
    // A fixed image has no copy.
    let mut f = fixed();
    let at = f.len() - 512;
    f[at + 100] ^= 1;
    let (_dir, r) = open_one(&f);
    let e = r.unwrap_err();
    match &e {
        Error::Checksum {
            structure,
            offset,
            path,
            ..
        } => {
            assert_eq!(*structure, Structure::Footer);
            assert_eq!(*offset, at as u64 + 64);
            assert!(path.is_some());
        }
        other => panic!("{other:?}"),
    }
    // The way on is said in the library's words (the CLI adds its flag).
    assert!(e.to_string().contains("checksums ignored"), "{e}");
    assert!(!e.to_string().contains("--"), "{e}");
    // ...and opens on request, with a warning.
    let (_dir, r) = open_bytes(&[("d.vhd", &f)], &OpenOptions::new().ignore_checksums(true));
    let img = r.unwrap();
    assert!(img
        .warnings()
        .iter()
        .any(|w| w.code == "checksum-ignored" && w.message.contains("ignored on request")));

    // A dynamic image whose copy is damaged too.
    let d = dynamic();
    let mut v = d.bytes.clone();
    v[100] ^= 1;
    v[d.footer_at as usize + 100] ^= 1;
    let (_dir, r) = open_one(&v);
    let e = r.unwrap_err();
    assert!(
        matches!(e, Error::Checksum { structure: Structure::Footer, offset, .. } if offset == d.footer_at + 64),
        "{e:?}"
    );
    assert!(e.to_string().contains("checksums ignored"), "{e}");
}

#[test]
fn bad_header_checksum() {
    let d = dynamic();
    let mut v = d.bytes.clone();
    v[512 + 700] ^= 4;
    let (_dir, r) = open_one(&v);
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Checksum {
                structure: Structure::DynamicHeader,
                offset: 548,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("checksums ignored"), "{e}");
    let (_dir, r) = open_bytes(&[("d.vhd", &v)], &OpenOptions::new().ignore_checksums(true));
    let img = r.unwrap();
    assert_eq!(read_all(&img), d.expected);
    assert!(!img.warnings().is_empty());
}

#[test]
fn damaged_end_footer_with_an_intact_copy_opens_with_a_warning() {
    let d = dynamic();
    // Checksum broken at the end.
    let mut v = d.bytes.clone();
    v[d.footer_at as usize + 30] ^= 0x55;
    let (_dir, r) = open_one(&v);
    let img = r.unwrap();
    assert_eq!(img.footer_source(), Some(vhdkit::image::FooterSource::Copy));
    assert!(!img.warnings().is_empty());
    let w = &img.warnings()[0];
    assert!(w.message.contains("copy"), "{:?}", img.warnings());
    assert_eq!(w.code, "footer-copy-used");
    assert_eq!(w.structure, Some(vhdkit::error::Structure::Footer));
    assert_eq!(w.offset, Some(d.footer_at));
    assert_eq!(img.footer(), Some(&d.footer));
    assert_eq!(read_all(&img), d.expected);
    // The end footer zeroed (no cookie).
    let mut v = d.bytes.clone();
    v[d.footer_at as usize..].fill(0);
    let (_dir, r) = open_one(&v);
    let img = r.unwrap();
    assert_eq!(img.footer_source(), Some(vhdkit::image::FooterSource::Copy));
    assert_eq!(read_all(&img), d.expected);
    // The end footer cut off altogether.
    let mut v = d.bytes.clone();
    v.truncate(d.footer_at as usize);
    let (_dir, r) = open_one(&v);
    let img = r.unwrap();
    assert_eq!(img.footer_source(), Some(vhdkit::image::FooterSource::Copy));
    assert!(!img.warnings().is_empty());
    assert_eq!(read_all(&img), d.expected);
}

#[test]
fn unknown_disk_type() {
    let (_d, r) = open_one(&set(&dynamic(), Field::FooterDiskType, 5));
    let c = corrupt(r);
    assert_eq!((c.structure, c.field), (Structure::Footer, "disk type"));
    assert_eq!(c.found, "5");
}

#[test]
fn fixed_current_size_larger_than_the_data() {
    let mut f = fixed();
    let at = f.len() - 512;
    let mut foot = Footer::parse(&f[at..].try_into().unwrap(), 0, Structure::Footer).unwrap();
    foot.current_size = 8193;
    f[at..].copy_from_slice(&foot.to_bytes());
    let (_dir, r) = open_one(&f);
    let c = corrupt(r);
    assert_eq!(
        (c.structure, c.field, c.offset),
        (Structure::Footer, "current size", at as u64 + 48)
    );
}

#[test]
fn parent_locator_outside_the_file_is_skipped() {
    let p = dynamic();
    let c = differencing(&p);
    // W2ru's data far past the end: the next hint still finds the parent.
    let v = set(&c, Field::LocatorOffset(0), u64::MAX - 3);
    let (_dir, r) = open_bytes(
        &[("c.vhd", &v), ("parent.vhd", &p.bytes)],
        &OpenOptions::new(),
    );
    let img = r.unwrap();
    assert_eq!(read_all(&img), c.expected);
    // Every hint broken: ParentNotFound says why each one failed.
    let mut muts = Vec::new();
    for i in 0..3 {
        muts.push(Mutation::Set(
            Field::LocatorLength(i),
            0xffff_fff0,
            Which::Both,
        ));
    }
    let mut v = apply(&c, &muts, false);
    // The unicode name too.
    v[512 + 64..512 + 64 + 512].fill(0);
    refresh_checksums(&mut v, c.footer_at);
    let (_dir, r) = open_bytes(
        &[("c.vhd", &v), ("parent.vhd", &p.bytes)],
        &OpenOptions::new(),
    );
    match r {
        Err(Error::ParentNotFound {
            tried, parent_id, ..
        }) => {
            assert_eq!(parent_id, PARENT_ID.to_string());
            assert_eq!(
                tried
                    .iter()
                    .filter(|t| t.contains("outside the file"))
                    .count(),
                3,
                "{tried:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn parent_locator_data_over_the_bat_is_blamed_on_the_locator() {
    let p = dynamic();
    let c = differencing(&p);
    let v = set(&c, Field::LocatorOffset(1), TABLE);
    let (_dir, r) = open_bytes(
        &[("c.vhd", &v), ("parent.vhd", &p.bytes)],
        &OpenOptions::new(),
    );
    let e = corrupt(r);
    assert_eq!(e.structure, Structure::ParentLocator(1), "{e:?}");
    assert_eq!(e.offset, 512 + 576 + 24 + 16);
}

#[test]
fn parent_with_the_wrong_unique_id_is_refused() {
    let p = dynamic();
    let c = differencing(&p);
    let mut other = p.bytes.clone();
    for at in [0, p.footer_at as usize] {
        other[at + 68] ^= 1;
    }
    refresh_checksums(&mut other, p.footer_at);
    let (_dir, r) = open_bytes(
        &[("c.vhd", &c.bytes), ("parent.vhd", &other)],
        &OpenOptions::new(),
    );
    match r {
        Err(Error::ParentNotFound { tried, .. }) => {
            assert!(
                tried.iter().any(|t| t.contains("has unique id")),
                "{tried:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    let (_dir, r) = open_bytes(
        &[("c.vhd", &c.bytes), ("parent.vhd", &other)],
        &OpenOptions::new().missing_parent_as_zero(true),
    );
    let img = r.unwrap();
    assert!(img.parent_missing());
    let v = read_all(&img);
    assert_eq!(v.len(), c.expected.len());
}

#[test]
fn a_child_that_names_itself_as_parent_is_a_loop() {
    let p = dynamic();
    let mut s = differencing(&p);
    // The child's parent id is its own id, and its locator names itself.
    let mut v = s.bytes.clone();
    v[512 + 40..512 + 56].copy_from_slice(&CHILD_ID.0);
    refresh_checksums(&mut v, s.footer_at);
    s.bytes = v;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("parent.vhd"), &s.bytes).unwrap();
    let r = Image::open(dir.path().join("parent.vhd"));
    let c = corrupt(r);
    assert_eq!(c.structure, Structure::ParentChain);
}

/// A chain base <- mid <- top whose locators lead nowhere; the caller names
/// every file of the chain with `OpenOptions::parent`, in any order.
#[test]
fn naming_every_file_of_a_chain_as_a_parent_works() {
    let base = dynamic();
    let mut mid_spec_child = differencing(&base);
    // mid: the differencing child of base, with id MID; locators pointing nowhere.
    const MID: Uuid = Uuid([0x33; 16]);
    let mid = {
        let mut b = mid_spec_child.bytes.clone();
        let at = mid_spec_child.footer_at as usize;
        for o in [0, at] {
            b[o + 68..o + 84].copy_from_slice(&MID.0);
        }
        // Point every locator (and the name) at nothing.
        for i in 0..3 {
            let l = 512 + 576 + 24 * i;
            b[l..l + 4].copy_from_slice(b"Mac ");
        }
        b[512 + 64..512 + 576].fill(0);
        refresh_checksums(&mut b, mid_spec_child.footer_at);
        mid_spec_child.bytes = b;
        mid_spec_child
    };
    let top = {
        let mut t = differencing(&base);
        let at = t.footer_at as usize;
        let mut b = t.bytes.clone();
        for o in [0, at] {
            b[o + 68..o + 84].copy_from_slice(&[0x44; 16]);
        }
        b[512 + 40..512 + 56].copy_from_slice(&MID.0);
        for i in 0..3 {
            let l = 512 + 576 + 24 * i;
            b[l..l + 4].copy_from_slice(b"Mac ");
        }
        b[512 + 64..512 + 576].fill(0);
        refresh_checksums(&mut b, t.footer_at);
        t.bytes = b;
        t
    };
    let dir = tempfile::tempdir().unwrap();
    let (pb, pm, pt) = (
        dir.path().join("base.vhd"),
        dir.path().join("mid.vhd"),
        dir.path().join("top.vhd"),
    );
    std::fs::write(&pb, &base.bytes).unwrap();
    std::fs::write(&pm, &mid.bytes).unwrap();
    std::fs::write(&pt, &top.bytes).unwrap();
    let orders = [
        vec![&pb, &pm],
        vec![&pm, &pb],
        vec![&pt, &pm, &pb],
        vec![&pb, &pm, &pt],
    ];
    for order in orders {
        let mut o = OpenOptions::new();
        for p in &order {
            o = o.parent(*p);
        }
        let img = Image::open_with(&pt, &o)
            .unwrap_or_else(|e| panic!("parents named in order {order:?}: {e}"));
        assert_eq!(img.chain().len(), 3, "{order:?}");
        assert_eq!(img.parent().unwrap().footer().unwrap().unique_id, MID);
    }
}

#[test]
fn a_forced_format_applies_to_the_image_not_its_parent() {
    let p = dynamic();
    let c = differencing(&p);
    let (_dir, r) = open_bytes(
        &[("c.vhd", &c.bytes), ("parent.vhd", &p.bytes)],
        &OpenOptions::new().format(Format::Differencing),
    );
    let img = r.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_all(&img), c.expected);
}

#[test]
fn a_forced_vhd_format_on_a_file_without_a_footer_is_refused() {
    let raw = vec![0u8; 4096];
    for f in [Format::Fixed, Format::Dynamic, Format::Differencing] {
        let (_dir, r) = open_bytes(&[("r.img", &raw)], &OpenOptions::new().format(f));
        assert!(r.is_err(), "{f}: {:?}", r.map(|i| i.disk_type()));
    }
    let (_dir, r) = open_bytes(&[("r.img", &raw)], &OpenOptions::new().format(Format::Raw));
    assert_eq!(r.unwrap().disk_type(), Format::Raw);
}

#[test]
fn a_read_only_parent_opens_under_a_writable_child() {
    use std::os::unix::fs::PermissionsExt;
    let p = dynamic();
    let c = differencing(&p);
    let dir = tempfile::tempdir().unwrap();
    let pp = dir.path().join("parent.vhd");
    std::fs::write(dir.path().join("c.vhd"), &c.bytes).unwrap();
    std::fs::write(&pp, &p.bytes).unwrap();
    std::fs::set_permissions(&pp, std::fs::Permissions::from_mode(0o444)).unwrap();
    // Root may write to anything; the test only means something for others.
    let can_write = std::fs::OpenOptions::new().write(true).open(&pp).is_ok();
    let img = Image::open_with(dir.path().join("c.vhd"), &OpenOptions::new().writable(true))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_all(&img), c.expected);
    if !can_write {
        assert!(img.parent().is_some());
    }
}

#[test]
fn tiny_and_empty_files() {
    for len in [0usize, 1, 510, 511, 512, 513, 1535, 2047, 2048] {
        let v = vec![0u8; len];
        let (_dir, r) = open_one(&v);
        let img = r.unwrap();
        assert_eq!(img.disk_type(), Format::Raw);
        assert_eq!(img.virtual_size(), len as u64);
    }
    // A 511-byte file that is an old-style footer alone: a fixed disk of 0 bytes.
    let f = Footer::new(DiskType::Fixed, 0, Footer::NO_DATA_OFFSET).to_bytes();
    let (_dir, r) = open_one(&f[..511]);
    let img = r.unwrap();
    assert_eq!(img.disk_type(), Format::Fixed);
    assert_eq!(img.virtual_size(), 0);
    assert_eq!(
        img.footer_source(),
        Some(vhdkit::image::FooterSource::EndLegacy)
    );
}

/// A 2 MiB BAT whose 524,288 entries all name the same sector: the
/// overlap must be found without bookkeeping many times the file's size.
#[test]
fn a_huge_bat_of_one_block_stays_within_the_allocation_bound() {
    let n: u32 = 1 << 19;
    let bat_len = 4 * n as usize;
    let mut v = vec![0u8; 1536 + bat_len + 4096];
    let mut h = DynamicHeader::new(1536, n, 512);
    h.max_table_entries = n;
    let mut f = Footer::new(DiskType::Dynamic, u64::from(n) * 512, 512);
    f.original_size = 512;
    let footer_at = v.len() as u64;
    v[..512].copy_from_slice(&f.to_bytes());
    v[512..1536].copy_from_slice(&h.to_bytes());
    // Every entry: the sector just after the BAT.
    let sector = ((1536 + bat_len) / 512) as u32;
    for i in 0..n as usize {
        v[1536 + 4 * i..1536 + 4 * i + 4].copy_from_slice(&sector.to_be_bytes());
    }
    v.extend_from_slice(&f.to_bytes());
    let _ = footer_at;
    let out = check_files(&[("big.vhd", &v)], &OpenOptions::new());
    let err = out.open.unwrap_err();
    assert!(err.contains("overlapping"), "{err}");
    assert!(
        out.largest <= 2 * v.len(),
        "largest allocation {} for a {} byte file",
        out.largest,
        v.len()
    );
}

/// Builds a differencing disk with unique id `id`, parent id `parent`, and
/// W2ru locators naming `names` (at most 8).
fn child_naming(id: Uuid, parent: Uuid, names: &[&str]) -> Vec<u8> {
    build(
        &Spec {
            disk_type: DiskType::Differencing,
            virtual_size: 8192,
            original_size: 8192,
            block_size: 4096,
            entries: 2,
            blocks: vec![(1, vec![0xf0])],
            unique_id: id,
            parent_id: parent,
            parent_name: "",
            locators: names
                .iter()
                .map(|n| (PlatformCode::W2ru, utf16le(n)))
                .collect(),
            seed: 3,
        },
        None,
    )
    .bytes
}

#[test]
fn a_chain_deeper_than_the_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let id = |k: u8| Uuid([k + 1; 16]);
    // base (dynamic, id 1) <- c1 <- c2 <- c3 <- c4, each naming the one below.
    let mut base = dynamic().bytes;
    for at in [0, base.len() - 512] {
        base[at + 68..at + 84].copy_from_slice(&id(0).0);
    }
    let len = base.len();
    refresh_checksums(&mut base, (len - 512) as u64);
    std::fs::write(dir.path().join("c0.vhd"), &base).unwrap();
    for k in 1..5u8 {
        let below = format!("c{}.vhd", k - 1);
        let v = child_naming(id(k), id(k - 1), &[&below]);
        std::fs::write(dir.path().join(format!("c{k}.vhd")), v).unwrap();
    }
    let top = dir.path().join("c4.vhd");
    let img = Image::open(&top).unwrap();
    assert_eq!(img.chain().len(), 5);
    let r = Image::open_with(&top, &OpenOptions::new().max_chain_depth(3));
    match r {
        Err(Error::Limit { what, limit: 3, .. }) => assert_eq!(what, vhdkit::LimitOf::ChainDepth),
        other => panic!("{other:?}"),
    }
    assert!(Image::open_with(&top, &OpenOptions::new().max_chain_depth(4)).is_ok());
}

/// A folder of hostile images, all with the same unique id and parent id,
/// in layers that each name every image of the next layer; the last layer
/// names nothing. Walking every path would open 5^10 files; each image must
/// be walked at most once.
#[test]
fn a_maze_of_images_naming_each_other_is_walked_once() {
    let dir = tempfile::tempdir().unwrap();
    let (width, depth) = (5usize, 10usize);
    let id = Uuid([0x99; 16]);
    for layer in 0..depth {
        let next: Vec<String> = if layer + 1 < depth {
            (0..width)
                .map(|j| format!("m{}-{j}.vhd", layer + 1))
                .collect()
        } else {
            Vec::new()
        };
        let names: Vec<&str> = next.iter().map(|s| s.as_str()).collect();
        for j in 0..width {
            let v = child_naming(id, id, &names);
            std::fs::write(dir.path().join(format!("m{layer}-{j}.vhd")), v).unwrap();
        }
    }
    let started = Instant::now();
    let r = Image::open(dir.path().join("m0-0.vhd"));
    let took = started.elapsed();
    assert!(
        matches!(r, Err(Error::ParentNotFound { .. })),
        "{:?}",
        r.map(|_| ())
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // With missing parents read as zeros, the first path opens at once.
    let img = Image::open_with(
        dir.path().join("m0-0.vhd"),
        &OpenOptions::new().missing_parent_as_zero(true),
    )
    .unwrap();
    assert_eq!(img.chain().len(), depth);
    assert!(img.layer(depth - 1).unwrap().parent_missing());
}

/// `check` lists every overlapping BAT entry: a 2 MiB file whose 524,288
/// entries name one sector yields 524,287 problems and 77 MB of messages
/// (more with the errors kept behind them). The walk should stop listing
/// after a few hundred of a kind and say how many more there were.
#[test]
fn check_lists_a_problem_per_bat_entry() {
    let n: u32 = 1 << 19;
    let bat_len = 4 * n as usize;
    let mut v = vec![0u8; 1536 + bat_len + 4096];
    let h = DynamicHeader::new(1536, n, 512);
    let f = Footer::new(DiskType::Dynamic, u64::from(n) * 512, 512);
    v[..512].copy_from_slice(&f.to_bytes());
    v[512..1536].copy_from_slice(&h.to_bytes());
    let sector = ((1536 + bat_len) / 512) as u32;
    for i in 0..n as usize {
        v[1536 + 4 * i..1536 + 4 * i + 4].copy_from_slice(&sector.to_be_bytes());
    }
    v.extend_from_slice(&f.to_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.vhd");
    std::fs::write(&p, &v).unwrap();
    let r = vhdkit::check(&p, &vhdkit::CheckOptions::default()).unwrap();
    let bytes: usize = r.problems.iter().map(|p| p.message.len()).sum();
    assert!(
        r.problems.len() <= 10_000,
        "{} problems, {} bytes of messages, for a {} byte file",
        r.problems.len(),
        bytes,
        v.len()
    );
    // The cut is said, with the count of what was not listed.
    assert!(
        r.problems.iter().any(
            |p| p.message.contains("only the first are listed") && p.message.contains("524287")
        ),
        "no summary of the unlisted problems"
    );
}
