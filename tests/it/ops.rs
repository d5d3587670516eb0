//! The pipeline operations of `vhdkit::ops` (issue 4): checksum, compare,
//! map, in-place conversion, sparsify and resize.
//!
//! Every property is checked against an independent expectation: the bytes
//! a test wrote itself, `crc32fast` over bytes read with `read_exact_at`,
//! the models of the hand-made chain in `examples/make_testdata.rs`
//! (included below), and qemu-img. qemu-img must be installed (Debian:
//! `qemu-utils`; another binary can be named with `VHDKIT_QEMU_IMG`):
//! without it the tests that ask it fail, loudly.
//!
//! In-place operations are interrupted after each of their steps
//! (`InPlacePlan::run_steps(n)` for every `n`), and the file must then open
//! and read as the old image or the new one, never fail.

use crate::common::qemu_img;
use crate::make_testdata;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use make_testdata::Fixture;
use proptest::prelude::*;
use vhdkit::ops::{self, InPlacePlan, MapExtent, Step};
use vhdkit::{ConvertOptions, Error, Format, Image, OpenOptions, Target};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------- helpers

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary folder")
}

/// A raw image of `size` bytes with `writes` (offset, bytes) in it, sparse
/// elsewhere. Returns the bytes it holds.
fn sparse_raw(path: &Path, size: u64, writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let f = std::fs::File::create(path).expect("create raw");
    f.set_len(size).expect("set length");
    let mut content = vec![0u8; size as usize];
    for (at, bytes) in writes {
        let at = *at;
        if at >= size {
            continue;
        }
        let n = (bytes.len() as u64).min(size - at) as usize;
        f.write_all_at(&bytes[..n], at).expect("write");
        content[at as usize..at as usize + n].copy_from_slice(&bytes[..n]);
    }
    content
}

/// A recognisable non-zero pattern of `len` bytes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// A disk with data in a few places and zeros elsewhere, `size` bytes.
fn sample_writes(size: u64) -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, pattern(4096, 1)),
        (70_000, pattern(300, 2)),
        (MIB - 100, pattern(1000, 3)),
        (size / 2 + 513, pattern(5000, 4)),
        (size - 700, pattern(700, 5)),
    ]
}

fn convert(input: &Path, output: &Path, opts: &ConvertOptions) {
    vhdkit::convert(input, output, opts)
        .unwrap_or_else(|e| panic!("convert {} -> {}: {e}", input.display(), output.display()));
}

fn to(target: Target) -> ConvertOptions {
    ConvertOptions::new(target).sync(false)
}

fn dynamic(block_size: u32) -> ConvertOptions {
    to(Target::Dynamic).block_size(block_size)
}

fn open(path: &Path) -> Image {
    Image::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// The whole virtual disk, read with `read_exact_at`.
fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.virtual_size() as usize];
    // In pieces, so that reads cross extents and blocks at odd places.
    let mut pos = 0;
    while pos < v.len() {
        let n = (v.len() - pos).min(777_777);
        img.read_exact_at(&mut v[pos..pos + n], pos as u64)
            .unwrap_or_else(|e| panic!("read {} at {pos}: {e}", img.path().display()));
        pos += n;
    }
    v
}

fn crc(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h.finalize()
}

fn checksum(path: &Path) -> (u32, u64) {
    pair(ops::checksum(&open(path)).expect("checksum"))
}

/// The typed checksum as (CRC-32, size).
fn pair(c: ops::Checksum) -> (u32, u64) {
    (c.crc32, c.size)
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// `content` cut or extended with zeros to `size` bytes.
fn resized(content: &[u8], size: u64) -> Vec<u8> {
    let mut v = content.to_vec();
    v.resize(size as usize, 0);
    v
}

/// Index of the first byte where `a` and `b` differ, for messages.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

fn assert_content(img: &Image, expected: &[u8], what: &str) {
    let got = read_all(img);
    assert_eq!(
        got.len(),
        expected.len(),
        "{what}: size {} instead of {}",
        got.len(),
        expected.len()
    );
    if let Some(at) = first_diff(&got, expected) {
        panic!(
            "{what}: content differs at byte {at}: {:#04x} instead of {:#04x}",
            got[at], expected[at]
        );
    }
}

/// The hand-made chain of testdata (base, child, grandchild) written into
/// `dir` side by side. Returns the fixtures, nearest last.
fn write_chain(dir: &Path) -> Vec<Fixture> {
    let base = make_testdata::chain_base();
    let child = make_testdata::chain_child(&base);
    let grandchild = make_testdata::chain_grandchild(&child);
    let all = vec![base, child, grandchild];
    for f in &all {
        std::fs::write(dir.join(&f.name), &f.bytes).expect("write fixture");
    }
    all
}

const GRANDCHILD: &str = "hand-chain-grandchild.vhd";

// ---------------------------------------------------------------- qemu-img

/// `qemu-img compare -f vpc -F raw VHD RAW` must say they are identical.
fn qemu_compare(vhd: &Path, raw: &Path) {
    let out = Command::new(qemu_img())
        .args(["compare", "-f", "vpc", "-F", "raw"])
        .arg(vhd)
        .arg(raw)
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}\n{}{}",
        vhd.display(),
        raw.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The virtual size qemu-img reads from a VHD.
fn qemu_size(vhd: &Path) -> u64 {
    // The human output: its first "virtual size" line is the image's own
    // (the JSON also holds the file node's size, which is the file length).
    let out = Command::new(qemu_img())
        .args(["info", "-f", "vpc"])
        .arg(vhd)
        .output()
        .expect("run qemu-img info");
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        vhd.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("virtual size:"))
        .and_then(|l| l.split('(').nth(1))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no virtual size in qemu-img info: {text}"))
}

// ---------------------------------------------------------------- checksum

#[test]
fn checksum_is_the_same_for_raw_fixed_dynamic_forms() {
    let dir = tempdir();
    // Not a whole number of blocks of any size, so last blocks are partial.
    let size = 3 * MIB + 7 * 512;
    let raw = dir.path().join("disk.raw");
    let content = sparse_raw(&raw, size, &sample_writes(size));
    let want = crc(&content);
    assert_eq!(checksum(&raw), (want, size), "raw");
    assert_eq!(crc(&read_all(&open(&raw))), want, "read_exact_at of raw");

    let fixed = dir.path().join("disk-fixed.vhd");
    convert(&raw, &fixed, &to(Target::Fixed));
    assert_eq!(checksum(&fixed), (want, size), "fixed");
    for bs in [512 * KIB, MIB, 2 * MIB, 4 * MIB] {
        let dynv = dir.path().join(format!("disk-dyn-{bs}.vhd"));
        convert(&raw, &dynv, &dynamic(bs as u32));
        let img = open(&dynv);
        assert_eq!(img.block_size(), bs);
        assert_eq!(
            pair(ops::checksum(&img).unwrap()),
            (want, size),
            "dynamic, {bs}-byte blocks"
        );
        assert_eq!(crc(&read_all(&img)), want, "read_exact_at of dynamic {bs}");
        // And back to raw, through a dynamic input.
        let back = dir.path().join(format!("back-{bs}.raw"));
        convert(&dynv, &back, &to(Target::Raw));
        assert_eq!(checksum(&back), (want, size), "raw from dynamic {bs}");
    }
    // Non-sparse forms hash the same.
    let dense = dir.path().join("dense-fixed.vhd");
    convert(&raw, &dense, &to(Target::Fixed).sparse(false));
    assert_eq!(checksum(&dense), (want, size), "non-sparse fixed");
}

#[test]
fn checksum_agrees_with_zlib_over_a_raw_file() {
    let dir = tempdir();
    let size = 2 * MIB + 4096 + 17; // not even whole sectors: a raw file is any length
    let raw = dir.path().join("disk.raw");
    let content = sparse_raw(&raw, size, &sample_writes(size));
    let (value, n) = checksum(&raw);
    assert_eq!(n, size);
    // crc32fast over the file's own bytes, read independently of vhdkit.
    assert_eq!(value, crc(&std::fs::read(&raw).unwrap()));
    assert_eq!(value, crc(&content));
    // And zlib, a separate implementation.
    let py = Command::new("python3")
        .args([
            "-c",
            "import sys, zlib; print(zlib.crc32(open(sys.argv[1], 'rb').read()) & 0xffffffff)",
        ])
        .arg(&raw)
        .output();
    match py {
        Ok(o) if o.status.success() => {
            let z: u32 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
            assert_eq!(value, z, "vhdkit {value:08x}, zlib {z:08x}");
        }
        _ => eprintln!("NOTE: python3 is not available; zlib.crc32 was not consulted"),
    }
    // The empty disk, and a disk of zeros only (never read).
    let empty = dir.path().join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(checksum(&empty), (0, 0));
    let zeros = dir.path().join("zeros.raw");
    sparse_raw(&zeros, 5 * MIB + 3, &[]);
    assert_eq!(
        checksum(&zeros),
        (crc(&vec![0u8; (5 * MIB + 3) as usize]), 5 * MIB + 3)
    );
}

#[test]
fn checksum_of_a_differencing_chain_is_that_of_its_flat_forms() {
    let dir = tempdir();
    let all = write_chain(dir.path());
    for f in &all {
        let content = make_testdata::content(&all, &f.name);
        let want = crc(&content);
        let path = dir.path().join(&f.name);
        let img = open(&path);
        assert_eq!(img.disk_type(), f.format);
        assert_eq!(
            pair(ops::checksum(&img).unwrap()),
            (want, f.model.size),
            "{}",
            f.name
        );
        assert_eq!(crc(&read_all(&img)), want, "read_exact_at of {}", f.name);
        // Flattened: raw, fixed and dynamic forms of the same disk.
        for (target, ext) in [
            (Target::Raw, "raw"),
            (Target::Fixed, "fixed.vhd"),
            (Target::Dynamic, "dyn.vhd"),
        ] {
            let out = dir.path().join(format!("{}.{ext}", f.name));
            convert(&path, &out, &to(target));
            assert_eq!(checksum(&out), (want, f.model.size), "{} as {ext}", f.name);
        }
    }
}

/// Random sparse content: (size in sectors plus a tail, writes).
fn sparse_content() -> impl Strategy<Value = (u64, Vec<(u64, Vec<u8>)>)> {
    (1u64..=6 * 1024, 0u64..512).prop_flat_map(|(sectors, tail)| {
        let size = sectors * 512 + tail;
        let write = (0..size, 1usize..9000, any::<u8>()).prop_map(move |(at, len, seed)| {
            let len = len.min((size - at) as usize);
            (at, pattern(len, seed))
        });
        (Just(size), proptest::collection::vec(write, 0..6))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn checksum_of_random_sparse_content((size, writes) in sparse_content()) {
        let dir = tempdir();
        let raw = dir.path().join("disk.raw");
        let content = sparse_raw(&raw, size, &writes);
        let want = (crc(&content), size);
        prop_assert_eq!(checksum(&raw), want);
        // VHD sizes are whole sectors: the VHD forms hold the disk padded.
        let padded = resized(&content, size.div_ceil(512) * 512);
        let want_vhd = (crc(&padded), padded.len() as u64);
        let fixed = dir.path().join("f.vhd");
        convert(&raw, &fixed, &to(Target::Fixed));
        let dynv = dir.path().join("d.vhd");
        convert(&raw, &dynv, &dynamic(512 * KIB as u32));
        for p in [&fixed, &dynv] {
            let img = open(p);
            if size % 512 == 0 {
                prop_assert_eq!(img.virtual_size(), size);
            }
            let got = pair(ops::checksum(&img).unwrap());
            let read = (crc(&read_all(&img)), img.virtual_size());
            prop_assert_eq!(got, read);
            prop_assert_eq!(got, (crc(&resized(&content, img.virtual_size())), img.virtual_size()));
            if img.virtual_size() == padded.len() as u64 {
                prop_assert_eq!(got, want_vhd);
            }
        }
    }
}

// ---------------------------------------------------------------- compare

fn compare(a: &Path, b: &Path, strict: bool) -> ops::Comparison {
    ops::compare(&open(a), &open(b), strict).expect("compare")
}

#[test]
fn compare_equal_images_of_every_type() {
    let dir = tempdir();
    let size = 5 * MIB;
    let raw = dir.path().join("disk.raw");
    sparse_raw(&raw, size, &sample_writes(size));
    let fixed = dir.path().join("f.vhd");
    convert(&raw, &fixed, &to(Target::Fixed));
    let dyn1 = dir.path().join("d1.vhd");
    convert(&raw, &dyn1, &dynamic(512 * KIB as u32));
    let dyn2 = dir.path().join("d2.vhd");
    convert(&raw, &dyn2, &dynamic(2 * MIB as u32).sparse(false));
    let forms = [&raw, &fixed, &dyn1, &dyn2];
    for a in forms {
        for b in forms {
            let c = compare(a, b, true);
            assert!(c.equal(), "{} vs {}: {c:?}", a.display(), b.display());
            assert_eq!((c.size_a, c.size_b), (size, size));
        }
    }
    // A differencing chain and its flat forms.
    let all = write_chain(dir.path());
    let child = dir.path().join(GRANDCHILD);
    let flat = dir.path().join("flat.raw");
    std::fs::write(&flat, make_testdata::content(&all, GRANDCHILD)).unwrap();
    let flat_dyn = dir.path().join("flat.vhd");
    convert(&child, &flat_dyn, &to(Target::Dynamic));
    for other in [&flat, &flat_dyn] {
        assert!(compare(&child, other, true).equal());
        assert!(compare(other, &child, true).equal());
    }
    // The chain's layers are different disks: the first difference is
    // where the models first differ.
    let base = dir.path().join("hand-chain-base.vhd");
    let want = first_diff(
        &make_testdata::content(&all, GRANDCHILD),
        &make_testdata::content(&all, "hand-chain-base.vhd"),
    )
    .map(|x| x as u64);
    assert!(want.is_some());
    assert_eq!(compare(&child, &base, false).first_difference, want);
}

#[test]
fn compare_sizes_with_zero_and_non_zero_tails() {
    let dir = tempdir();
    let small = dir.path().join("small.raw");
    let content = sparse_raw(&small, 3 * MIB, &sample_writes(3 * MIB));
    // The same disk, 2 MiB larger, the extra zero: a dynamic image.
    let big_raw = dir.path().join("big.raw");
    sparse_raw(&big_raw, 5 * MIB, &[(0, content.clone())]);
    let big = dir.path().join("big.vhd");
    convert(&big_raw, &big, &dynamic(512 * KIB as u32));
    let c = compare(&small, &big, false);
    assert!(c.equal(), "{c:?}");
    assert_eq!((c.size_a, c.size_b), (3 * MIB, 5 * MIB));
    assert!(compare(&big, &small, false).equal());
    let c = compare(&small, &big, true);
    assert_eq!(
        c.first_difference,
        Some(3 * MIB),
        "strict sizes differ at the smaller size"
    );
    assert_eq!(compare(&big, &small, true).first_difference, Some(3 * MIB));

    // A non-zero byte in the tail: the first one is the difference, from
    // either side and for every form.
    let tail_at = 4 * MIB + 12_345;
    let odd_raw = dir.path().join("odd.raw");
    sparse_raw(
        &odd_raw,
        5 * MIB,
        &[
            (0, content.clone()),
            (tail_at, vec![0x11; 10]),
            (5 * MIB - 1, vec![0x22]),
        ],
    );
    let odd_fixed = dir.path().join("odd.vhd");
    convert(&odd_raw, &odd_fixed, &to(Target::Fixed));
    let odd_dyn = dir.path().join("odd-dyn.vhd");
    convert(&odd_raw, &odd_dyn, &dynamic(2 * MIB as u32));
    for odd in [&odd_raw, &odd_fixed, &odd_dyn] {
        assert_eq!(compare(&small, odd, false).first_difference, Some(tail_at));
        assert_eq!(compare(odd, &small, false).first_difference, Some(tail_at));
        assert_eq!(compare(odd, &small, true).first_difference, Some(3 * MIB));
    }
    // A difference in the common part comes before the tail's.
    let early = dir.path().join("early.raw");
    let mut changed = content.clone();
    changed[2 * MIB as usize + 5] ^= 0x40;
    std::fs::write(&early, &changed).unwrap();
    assert_eq!(
        compare(&early, &odd_dyn, false).first_difference,
        Some(2 * MIB + 5)
    );
    assert_eq!(
        compare(&early, &odd_dyn, true).first_difference,
        Some(2 * MIB + 5)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// One changed byte anywhere (data or hole, to zero or from zero) is
    /// found at exactly its offset, whatever the two images' types; so is
    /// the first of two (the second anywhere after it: in a later hole or
    /// data run, which the walk may look at first).
    #[test]
    fn compare_finds_a_single_changed_byte(
        (size, writes) in sparse_content(),
        where_frac in 0.0f64..1.0,
        flip in 1u8..=255,
        forms in (0usize..3, 0usize..3),
        second in proptest::option::of(0.0f64..1.0),
    ) {
        let size = size.div_ceil(512) * 512; // every form holds the same size
        let at = ((size as f64 * where_frac) as u64).min(size - 1);
        let dir = tempdir();
        let a_raw = dir.path().join("a.raw");
        let content = sparse_raw(&a_raw, size, &writes);
        let mut other = content.clone();
        other[at as usize] ^= flip;
        if let Some(f) = second.filter(|_| at + 1 < size) {
            // Preferably in data after `at` (the walk reads data chunks
            // before it searches holes), else anywhere after it.
            let data: Vec<usize> = (at as usize + 1..size as usize)
                .filter(|&i| content[i] != 0)
                .collect();
            let at2 = if data.is_empty() {
                at as usize + 1 + ((size - at - 1) as f64 * f) as usize
            } else {
                data[((data.len() as f64 * f) as usize).min(data.len() - 1)]
            };
            other[at2.min(size as usize - 1)] ^= 0x5a;
        }
        let b_raw = dir.path().join("b.raw");
        // b written whole: zero pages are allocated data on this side.
        std::fs::write(&b_raw, &other).unwrap();
        let form = |raw: &Path, k: usize, name: &str| -> PathBuf {
            let out = dir.path().join(name);
            match k {
                0 => return raw.to_path_buf(),
                1 => convert(raw, &out, &to(Target::Fixed)),
                _ => convert(raw, &out, &dynamic(512 * KIB as u32)),
            }
            out
        };
        let a = form(&a_raw, forms.0, "a.vhd");
        let b = form(&b_raw, forms.1, "b.vhd");
        let c = compare(&a, &b, true);
        prop_assert_eq!(c.first_difference, Some(at), "a {:?} b {:?}", forms.0, forms.1);
        prop_assert_eq!(compare(&b, &a, false).first_difference, Some(at));
        prop_assert!(compare(&a, &a_raw, true).equal());
    }
}

// ---------------------------------------------------------------- map

/// What every map must satisfy: extents in order, covering the disk
/// exactly, merged (no two neighbours of one kind that continue each
/// other), zero extents reading as zero, data extents holding what the
/// disk holds at the file and offset they name, and — when scanned — a
/// non-zero byte in every 4 KiB unit of every data extent.
fn check_map(img: &Image, extents: &[MapExtent], content: &[u8], scanned: bool) {
    let size = img.virtual_size();
    let mut pos = 0;
    for (i, e) in extents.iter().enumerate() {
        assert_eq!(e.offset, pos, "extent {i} {e:?} does not follow on");
        assert!(e.length > 0, "empty extent {i} {e:?}");
        pos += e.length;
        let bytes = &content[e.offset as usize..(e.offset + e.length) as usize];
        if e.data {
            let (file, fo) = (
                e.file.as_ref().expect("data has a file"),
                e.file_offset.expect("data has a file offset"),
            );
            let mut stored = vec![0u8; e.length as usize];
            std::fs::File::open(file)
                .unwrap()
                .read_exact_at(&mut stored, fo)
                .unwrap_or_else(|err| panic!("read {} at {fo}: {err}", file.display()));
            assert!(
                stored == bytes,
                "extent {i} {e:?}: the file's bytes are not the disk's"
            );
            if scanned {
                let mut u = e.offset / 4096 * 4096;
                while u < e.offset + e.length {
                    let a = u.max(e.offset);
                    let b = (u + 4096).min(e.offset + e.length);
                    assert!(
                        content[a as usize..b as usize].iter().any(|&x| x != 0),
                        "extent {i} {e:?}: 4 KiB unit at {u} is all zero"
                    );
                    u += 4096;
                }
            }
        } else {
            assert!(
                e.file.is_none() && e.file_offset.is_none(),
                "zero extent {i} names a file: {e:?}"
            );
            if let Some(k) = bytes.iter().position(|&x| x != 0) {
                panic!(
                    "zero extent {i} {e:?} has a non-zero byte at {}",
                    e.offset + k as u64
                );
            }
        }
        if i > 0 {
            let p = &extents[i - 1];
            let merge = match (p.data, e.data) {
                (false, false) => true,
                (true, true) => {
                    p.file == e.file && p.file_offset.unwrap() + p.length == e.file_offset.unwrap()
                }
                _ => false,
            };
            assert!(
                !merge,
                "extents {} and {i} should be one: {p:?} {e:?}",
                i - 1
            );
        }
    }
    assert_eq!(pos, size, "the extents cover {pos} bytes of {size}");
}

fn map(img: &Image, scan: bool) -> Vec<MapExtent> {
    ops::map(img, scan).unwrap_or_else(|e| panic!("map {}: {e}", img.path().display()))
}

#[test]
fn map_of_a_sparse_raw_file_finds_its_holes() {
    let dir = tempdir();
    let size = 8 * MIB;
    let raw = dir.path().join("disk.raw");
    let mut writes = sample_writes(size);
    // Zeros written out (allocated, but zero) in the middle of 6..7 MiB.
    writes.push((6 * MIB, vec![0u8; MIB as usize]));
    let content = sparse_raw(&raw, size, &writes);
    for form in ["raw", "fixed"] {
        let path = if form == "raw" {
            raw.clone()
        } else {
            let p = dir.path().join("disk.vhd");
            convert(&raw, &p, &to(Target::Fixed).sparse(false));
            // The zeros of a non-sparse fixed image are allocated: a hole
            // punched by hand must show.
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            crate::common::punch_hole(&f, 3 * MIB..4 * MIB).unwrap();
            p
        };
        let img = open(&path);
        let plain = map(&img, false);
        check_map(&img, &plain, &content, false);
        // Without a scan, a hole in the middle of the file is known to be zero.
        let zero_at = |m: &[MapExtent], x: u64| {
            m.iter()
                .any(|e| !e.data && e.offset <= x && x < e.offset + e.length)
        };
        assert!(
            zero_at(&plain, 3 * MIB + 5),
            "{form}: hole at 3 MiB not found: {plain:?}"
        );
        let scanned = map(&img, true);
        check_map(&img, &scanned, &content, true);
        // The scan finds the written zeros too; the data is all there.
        assert!(
            zero_at(&scanned, 6 * MIB + 5),
            "{form}: written zeros not found: {scanned:?}"
        );
        let data: u64 = scanned.iter().filter(|e| e.data).map(|e| e.length).sum();
        assert!(
            data <= 7 * 4096 + 2 * 4096,
            "{form}: {data} bytes of data for 5 small writes: {scanned:?}"
        );
        for (at, bytes) in sample_writes(size) {
            for x in [at, at + bytes.len() as u64 - 1] {
                assert!(
                    scanned
                        .iter()
                        .any(|e| e.data && e.offset <= x && x < e.offset + e.length),
                    "{form}: {x} not data"
                );
            }
        }
        if form == "fixed" {
            assert!(scanned
                .iter()
                .filter(|e| e.data)
                .all(|e| e.file.as_deref() == Some(path.as_path())));
        }
    }
}

#[test]
fn map_of_dynamic_images_at_several_block_sizes() {
    let dir = tempdir();
    let size = 6 * MIB + 512;
    let raw = dir.path().join("disk.raw");
    let content = sparse_raw(&raw, size, &sample_writes(size));
    for bs in [512 * KIB, 2 * MIB] {
        for sparse in [true, false] {
            let p = dir.path().join(format!("d-{bs}-{sparse}.vhd"));
            convert(&raw, &p, &dynamic(bs as u32).sparse(sparse));
            let img = open(&p);
            for scan in [false, true] {
                let m = map(&img, scan);
                check_map(&img, &m, &content, scan);
            }
            // Unscanned, the data is the allocated blocks: exactly those
            // with a non-zero byte when sparse; more when not (the blocks
            // the raw input's filesystem had allocated).
            let m = map(&img, false);
            let data: u64 = m.iter().filter(|e| e.data).map(|e| e.length).sum();
            let want: u64 = content
                .chunks(bs as usize)
                .filter(|b| b.iter().any(|&x| x != 0))
                .map(|b| b.len() as u64)
                .sum();
            if sparse {
                assert_eq!(data, want, "{bs}: {m:?}");
            } else {
                assert!(data >= want, "{bs}, not sparse: {m:?}");
            }
        }
    }
}

/// A run of the disk: offset, length, and the file (by name) and file
/// offset that hold it, or none for zeros.
type Run = (u64, u64, Option<(String, u64)>);

/// The hand-made chain: bitmaps and parents decide, sector by sector, which
/// file holds each sector. Unscanned, the map is exactly that model.
#[test]
fn map_honours_bitmaps_and_parents() {
    let dir = tempdir();
    let all = write_chain(dir.path());
    for f in &all {
        let chain = make_testdata::chain(&all, &f.name);
        let content = make_testdata::content(&all, &f.name);
        let img = open(&dir.path().join(&f.name));
        let plain = map(&img, false);
        check_map(&img, &plain, &content, false);
        check_map(&img, &map(&img, true), &content, true);
        // Expected, per sector: the nearest layer that defines it.
        let mut want: Vec<Run> = Vec::new();
        for s in 0..f.model.size / 512 {
            let holder = chain
                .iter()
                .find_map(|l| l.model.present[s as usize].map(|at| (l.name.clone(), at)));
            match (want.last_mut(), holder) {
                (Some(last), None) if last.2.is_none() => last.1 += 512,
                (Some(last), Some((n, at)))
                    if last
                        .2
                        .as_ref()
                        .is_some_and(|(ln, lat)| *ln == n && lat + last.1 == at) =>
                {
                    last.1 += 512
                }
                (_, h) => want.push((s * 512, 512, h)),
            }
        }
        let got: Vec<Run> = plain
            .iter()
            .map(|e| {
                let holder = e.file.as_ref().map(|p| {
                    (
                        p.file_name().unwrap().to_string_lossy().into_owned(),
                        e.file_offset.unwrap(),
                    )
                });
                (e.offset, e.length, holder)
            })
            .collect();
        assert_eq!(got, want, "{}", f.name);
        // Every layer of a differencing chain contributes somewhere.
        for l in &chain {
            assert!(
                got.iter()
                    .any(|g| g.2.as_ref().is_some_and(|(n, _)| *n == l.name)),
                "{}: nothing from {}",
                f.name,
                l.name
            );
        }
    }
}

// ---------------------------------------------------------------- in place

/// What an image must read as: its format, and its content.
#[derive(Clone)]
struct State {
    format: Format,
    content: Vec<u8>,
}

impl State {
    fn of(path: &Path) -> State {
        let img = open(path);
        State {
            format: img.disk_type(),
            content: read_all(&img),
        }
    }

    /// True when `img` reads as this state. A raw image may carry zeros
    /// after its content (raw images have no size but their length).
    fn matches(&self, img: &Image, got: &[u8]) -> bool {
        if img.disk_type() != self.format {
            return false;
        }
        if self.format == Format::Raw && got.len() >= self.content.len() {
            got[..self.content.len()] == self.content[..]
                && got[self.content.len()..].iter().all(|&x| x == 0)
        } else {
            got == &self.content[..]
        }
    }
}

/// Runs the first `n` steps of `plan(path)` on a fresh copy of `original`
/// for every `n`, and checks that the copy opens as `old` or `new` each
/// time, `old` with no step run and `new` with all. Returns the plan.
fn interrupt_each_step(
    original: &Path,
    old: &State,
    new: &State,
    plan: &dyn Fn(&Path) -> InPlacePlan,
) -> InPlacePlan {
    let dir = original.parent().unwrap();
    let first = plan(original);
    assert_sector_atomic_steps(original, &first);
    for n in 0..=first.steps.len() {
        let copy = dir.join(format!("interrupted-{n}"));
        std::fs::copy(original, &copy).unwrap();
        let p = plan(&copy);
        // The same plan (a fresh footer carries a fresh unique id: compare
        // what is done where).
        let names = |q: &InPlacePlan| q.steps.iter().map(step_name).collect::<Vec<_>>();
        assert_eq!(
            names(&p),
            names(&first),
            "the plan depends on the file only"
        );
        p.run_steps(n)
            .unwrap_or_else(|e| panic!("{}: steps 0..{n}: {e}", p.description));
        let img = Image::open(&copy).unwrap_or_else(|e| {
            panic!(
                "{}: interrupted after {n} of {} steps ({:?}): does not open: {e}",
                p.description,
                p.steps.len(),
                &p.steps[..n]
            )
        });
        let got = read_all(&img);
        let is_old = old.matches(&img, &got);
        let is_new = new.matches(&img, &got);
        assert!(
            is_old || is_new,
            "{}: interrupted after {n} of {} steps (last {:?}): a {} image of {} bytes, neither old nor new (differs from new at {:?})",
            p.description,
            p.steps.len(),
            n.checked_sub(1).map(|k| step_name(&p.steps[k])),
            img.disk_type(),
            got.len(),
            first_diff(&got, &new.content)
        );
        if n == 0 {
            assert!(
                is_old,
                "{}: nothing run, yet not the old image",
                p.description
            );
        }
        if n == p.steps.len() {
            assert!(
                is_new,
                "{}: every step run, yet not the new image",
                p.description
            );
        }
        drop(img);
        std::fs::remove_file(&copy).unwrap();
    }
    first
}

fn step_name(s: &Step) -> String {
    match s {
        Step::SetLen(l) => format!("SetLen({l})"),
        Step::Write(at, b) => format!("Write({at}, {} bytes)", b.len()),
        Step::PunchHole(at, n) => format!("PunchHole({at}, {n})"),
        Step::Sync => "Sync".into(),
        other => format!("{other:?}"),
    }
}

fn plan_in_place(path: &Path, target: Format, azure: bool) -> InPlacePlan {
    ops::plan_in_place(path, target, azure, &OpenOptions::new())
        .unwrap_or_else(|e| panic!("plan {} -> {target}: {e}", path.display()))
}

/// Each write of the plan changes at most one sector of the file as it is
/// when the write comes (storage writes a sector whole, so a torn write
/// cannot leave half of a change). Checked by running the steps one at a
/// time on a scratch copy of `original`.
fn assert_sector_atomic_steps(original: &Path, plan: &InPlacePlan) {
    let scratch = original.parent().unwrap().join("scratch-steps");
    std::fs::copy(original, &scratch).unwrap();
    for (i, step) in plan.steps.iter().enumerate() {
        if let Step::Write(at, bytes) = step {
            let f = std::fs::File::open(&scratch).unwrap();
            let len = f.metadata().unwrap().len();
            let mut now = vec![0u8; bytes.len()];
            let have = len.saturating_sub(*at).min(bytes.len() as u64) as usize;
            f.read_exact_at(&mut now[..have], *at).unwrap();
            let mut sectors: Vec<u64> = (0..bytes.len())
                .filter(|&k| now[k] != bytes[k] || (k >= have))
                .map(|k| (at + k as u64) / 512)
                .collect();
            sectors.dedup();
            assert!(
                sectors.len() <= 1,
                "{}: step {i} ({}) changes sectors {sectors:?}",
                plan.description,
                step_name(step)
            );
        }
        let one = InPlacePlan::new(&scratch, plan.description.clone(), vec![step.clone()]);
        one.run().unwrap();
    }
    std::fs::remove_file(&scratch).unwrap();
}

/// No step writes more than a sector: storage writes a sector whole.
fn assert_small_steps(plan: &InPlacePlan) {
    for s in &plan.steps {
        if let Step::Write(_, b) = s {
            assert!(
                b.len() <= 512,
                "{}: a write of {} bytes",
                plan.description,
                b.len()
            );
        }
    }
}

#[test]
fn in_place_raw_to_fixed_survives_interruption_at_every_step() {
    let dir = tempdir();
    // Whole MiB; whole sectors but not MiB; neither.
    for size in [MIB, 3 * MIB + 5 * 512, 2 * MIB + 1000, 777] {
        for azure in [false, true] {
            let raw = dir.path().join(format!("disk-{size}-{azure}.raw"));
            let content = sparse_raw(&raw, size, &sample_writes(size.max(1001)));
            let new_size = if azure {
                size.div_ceil(MIB) * MIB
            } else {
                size.div_ceil(512) * 512
            };
            let old = State {
                format: Format::Raw,
                content: content.clone(),
            };
            let new = State {
                format: Format::Fixed,
                content: resized(&content, new_size),
            };
            let plan = interrupt_each_step(&raw, &old, &new, &|p| {
                plan_in_place(p, Format::Fixed, azure)
            });
            plan.run().unwrap();
            let img = open(&raw);
            assert_eq!(
                (img.disk_type(), img.virtual_size()),
                (Format::Fixed, new_size)
            );
            assert_eq!(img.file_len(), new_size + 512);
            assert_content(&img, &new.content, "raw -> fixed");
            if azure {
                let report = vhdkit::check(
                    &raw,
                    &vhdkit::CheckOptions {
                        azure: true,
                        ..Default::default()
                    },
                )
                .unwrap();
                assert!(report.is_clean(), "{:?}", report.problems);
            }
            // qemu reads the result as the original disk (zero-padded).
            let orig = dir.path().join(format!("orig-{size}-{azure}.raw"));
            std::fs::write(&orig, &content).unwrap();
            qemu_compare(&raw, &orig);
            assert_eq!(qemu_size(&raw), new_size);
        }
    }
}

#[test]
fn in_place_fixed_to_raw_and_to_azure_fixed_survive_interruption() {
    let dir = tempdir();
    for size in [3 * MIB + 5 * 512, 2 * MIB] {
        let raw = dir.path().join(format!("src-{size}.raw"));
        let content = sparse_raw(&raw, size, &sample_writes(size));
        let fixed = dir.path().join(format!("disk-{size}.vhd"));
        convert(&raw, &fixed, &to(Target::Fixed));
        let old = State::of(&fixed);
        assert_eq!(old.format, Format::Fixed);

        // fixed -> raw
        let new = State {
            format: Format::Raw,
            content: content.clone(),
        };
        let work = dir.path().join(format!("to-raw-{size}.vhd"));
        std::fs::copy(&fixed, &work).unwrap();
        let plan =
            interrupt_each_step(&work, &old, &new, &|p| plan_in_place(p, Format::Raw, false));
        plan.run().unwrap();
        assert_eq!(
            std::fs::read(&work).unwrap(),
            content,
            "fixed -> raw leaves exactly the disk"
        );

        // fixed -> fixed --azure
        let new_size = size.div_ceil(MIB) * MIB;
        let new = State {
            format: Format::Fixed,
            content: resized(&content, new_size),
        };
        let work = dir.path().join(format!("to-azure-{size}.vhd"));
        std::fs::copy(&fixed, &work).unwrap();
        let plan = interrupt_each_step(&work, &old, &new, &|p| {
            plan_in_place(p, Format::Fixed, true)
        });
        if size == new_size {
            assert!(
                plan.steps.is_empty(),
                "already a whole MiB: {:?}",
                plan.steps
            );
        }
        plan.run().unwrap();
        let img = open(&work);
        assert_eq!(
            (img.virtual_size(), img.file_len()),
            (new_size, new_size + 512)
        );
        assert!(img.warnings().is_empty(), "{:?}", img.warnings());
        let report = vhdkit::check(
            &work,
            &vhdkit::CheckOptions {
                azure: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        qemu_compare(&work, &raw);
        assert_eq!(qemu_size(&work), new_size);
    }
    // A fixed image made by qemu (creator 'qem2', not a whole MiB), and
    // the 511-byte footer of Virtual PC before 2004.
    let qemu = dir.path().join("qemu.vhd");
    let gz = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/qemu-fixed-force-1000448.vhd.gz"),
    )
    .unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut bytes).unwrap();
    std::fs::write(&qemu, bytes).unwrap();
    let legacy = dir.path().join("legacy.vhd");
    std::fs::write(&legacy, make_testdata::fixed_legacy_footer().bytes).unwrap();
    for path in [qemu, legacy] {
        let old = State::of(&path);
        let new = State {
            format: Format::Fixed,
            content: resized(&old.content, MIB),
        };
        let plan = interrupt_each_step(&path, &old, &new, &|p| {
            plan_in_place(p, Format::Fixed, true)
        });
        plan.run().unwrap();
        let img = open(&path);
        assert_eq!(img.virtual_size(), MIB);
        assert_content(&img, &new.content, "fixed -> azure fixed");
        let flat = dir.path().join("flat.raw");
        std::fs::write(&flat, &old.content).unwrap();
        qemu_compare(&path, &flat);
    }
}

#[test]
fn in_place_conversion_takes_constant_time() {
    let dir = tempdir();
    let small = dir.path().join("small.raw");
    sparse_raw(&small, MIB, &[(0, pattern(512, 9))]);
    let large = dir.path().join("large.raw");
    // 1 GiB that costs nothing: a sparse file.
    sparse_raw(
        &large,
        GIB,
        &[(0, pattern(512, 9)), (GIB - 512, pattern(512, 8))],
    );
    let shape = |p: &InPlacePlan| {
        p.steps
            .iter()
            .map(std::mem::discriminant)
            .collect::<Vec<_>>()
    };
    for azure in [false, true] {
        let a = plan_in_place(&small, Format::Fixed, azure);
        let b = plan_in_place(&large, Format::Fixed, azure);
        assert_eq!(
            shape(&a),
            shape(&b),
            "raw -> fixed (azure {azure}): the same steps whatever the size"
        );
        assert!(a.steps.len() <= 8, "{:?}", a.steps);
        assert_small_steps(&b);
    }
    let started = Instant::now();
    plan_in_place(&large, Format::Fixed, false).run().unwrap();
    let to_fixed = started.elapsed();
    let img = open(&large);
    assert_eq!((img.disk_type(), img.virtual_size()), (Format::Fixed, GIB));
    drop(img);
    assert!(
        allocated(&large) < 64 * MIB,
        "the conversion allocated {} bytes",
        allocated(&large)
    );
    plan_in_place(&small, Format::Fixed, false).run().unwrap();
    let a = plan_in_place(&small, Format::Raw, false);
    let b = plan_in_place(&large, Format::Raw, false);
    assert_eq!(
        shape(&a),
        shape(&b),
        "fixed -> raw: the same steps whatever the size"
    );
    let started = Instant::now();
    b.run().unwrap();
    let to_raw = started.elapsed();
    assert_eq!(std::fs::metadata(&large).unwrap().len(), GIB);
    assert_eq!(open(&large).disk_type(), Format::Raw);
    // Generous bounds: a sync on a busy machine; reading 1 GiB would take longer.
    assert!(
        to_fixed < Duration::from_secs(10) && to_raw < Duration::from_secs(10),
        "{to_fixed:?} {to_raw:?}"
    );
    eprintln!("in place, 1 GiB: raw -> fixed {to_fixed:?}, fixed -> raw {to_raw:?}");
}

#[test]
fn in_place_conversion_refuses_dynamic_and_differencing_inputs() {
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    sparse_raw(&raw, 2 * MIB, &sample_writes(2 * MIB));
    let dynv = dir.path().join("disk.vhd");
    convert(&raw, &dynv, &to(Target::Dynamic));
    write_chain(dir.path());
    let child = dir.path().join(GRANDCHILD);
    for (path, target, azure) in [
        (&dynv, Format::Fixed, false),
        (&dynv, Format::Fixed, true),
        (&dynv, Format::Raw, false),
        (&child, Format::Fixed, false),
        (&child, Format::Raw, false),
        // Not in place either: to dynamic.
        (&raw, Format::Dynamic, false),
    ] {
        let before = std::fs::read(path).unwrap();
        match ops::plan_in_place(path, target, azure, &OpenOptions::new()) {
            Err(Error::WrongImageKind {
                operation, reason, ..
            }) => {
                assert_eq!(operation, "in-place conversion");
                assert!(reason.contains("raw and fixed only"), "{reason}");
            }
            other => panic!("{} -> {target}: {other:?}", path.display()),
        }
        assert_eq!(
            std::fs::read(path).unwrap(),
            before,
            "a refused plan touches nothing"
        );
    }
    // raw --azure to raw makes no sense.
    let fixed = dir.path().join("f.vhd");
    convert(&raw, &fixed, &to(Target::Fixed));
    assert!(matches!(
        ops::plan_in_place(&fixed, Format::Raw, true, &OpenOptions::new()),
        Err(Error::InvalidOption {
            option: "azure",
            ..
        })
    ));
}

// ---------------------------------------------------------------- sparsify

#[test]
fn sparsify_raw_and_fixed_punches_the_zeros() {
    let dir = tempdir();
    let size = 4 * MIB;
    let raw = dir.path().join("disk.raw");
    // Every byte written, most of them zeros.
    let mut content = vec![0u8; size as usize];
    for (at, b) in sample_writes(size) {
        content[at as usize..at as usize + b.len()].copy_from_slice(&b);
    }
    std::fs::write(&raw, &content).unwrap();
    let fixed = dir.path().join("disk.vhd");
    convert(&raw, &fixed, &to(Target::Fixed).sparse(false));
    for path in [&raw, &fixed] {
        std::fs::File::open(path).unwrap().sync_all().unwrap();
        let before = checksum(path);
        let blocks_before = allocated(path);
        assert!(
            blocks_before >= size,
            "{}: {blocks_before} allocated before",
            path.display()
        );
        let r = ops::sparsify(path, &OpenOptions::new()).unwrap();
        let after = checksum(path);
        assert_eq!(after, before, "{}: content changed", path.display());
        assert_eq!(after.0, crc(&content));
        let blocks_after = allocated(path);
        assert!(
            blocks_after <= 12 * 4096 + 4096,
            "{}: {blocks_after} allocated after",
            path.display()
        );
        assert_eq!(
            (r.allocated_before, r.allocated_after),
            (blocks_before, blocks_after)
        );
        assert!(r.zero_bytes >= size - 12 * 4096, "{r:?}");
        let img = open(path);
        assert_content(&img, &content, "sparsified");
        if path == &fixed {
            assert_eq!(img.disk_type(), Format::Fixed);
            qemu_compare(path, &raw);
        }
        // A second run finds nothing more to do.
        let again = ops::sparsify(path, &OpenOptions::new()).unwrap();
        assert_eq!(again.allocated_after, blocks_after);
    }
}

#[test]
fn sparsify_dynamic_frees_zero_blocks_and_keeps_identity() {
    let dir = tempdir();
    let size = 6 * MIB;
    let raw = dir.path().join("disk.raw");
    let mut content = vec![0u8; size as usize];
    content[..4096].copy_from_slice(&pattern(4096, 1));
    content[5 * MIB as usize + 17] = 0x99;
    std::fs::write(&raw, &content).unwrap();
    let dynv = dir.path().join("disk.vhd");
    // Not sparse: every block allocated, most of them all zero.
    convert(&raw, &dynv, &dynamic(512 * KIB as u32).sparse(false));
    let before_img = open(&dynv);
    assert_eq!(before_img.allocated_blocks(), 12);
    let id = before_img.footer().unwrap().unique_id;
    drop(before_img);
    let sum = checksum(&dynv);
    let blocks_before = allocated(&dynv);
    let r = ops::sparsify(&dynv, &OpenOptions::new()).unwrap();
    let img = open(&dynv);
    assert_eq!(img.disk_type(), Format::Dynamic);
    assert_eq!(img.allocated_blocks(), 2, "only the blocks with data stay");
    assert_eq!(img.block_size(), 512 * KIB);
    assert_eq!(
        img.footer().unwrap().unique_id,
        id,
        "the unique id is kept, so children still match"
    );
    assert_eq!(pair(ops::checksum(&img).unwrap()), sum);
    assert_content(&img, &content, "sparsified dynamic");
    assert_eq!(r.zero_bytes, 10 * 512 * KIB);
    assert!(r.allocated_after < blocks_before / 2, "{r:?}");
    assert!(allocated(&dynv) < blocks_before / 2);
    let report = vhdkit::check(&dynv, &Default::default()).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    qemu_compare(&dynv, &raw);
    // No temporary file is left beside it.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn sparsify_keeps_a_chain_readable_and_refuses_differencing_disks() {
    let dir = tempdir();
    let all = write_chain(dir.path());
    let child = dir.path().join(GRANDCHILD);
    let before = std::fs::read(&child).unwrap();
    match ops::sparsify(&child, &OpenOptions::new()) {
        Err(Error::WrongImageKind {
            operation: "sparsify",
            kind: Format::Differencing,
            reason,
            ..
        }) => assert!(reason.contains("differencing"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&child).unwrap(), before);
    // The base sparsified in place: the chain above it still opens (same
    // unique id) and reads the same.
    let base = dir.path().join("hand-chain-base.vhd");
    ops::sparsify(&base, &OpenOptions::new()).unwrap();
    assert_content(
        &open(&child),
        &make_testdata::content(&all, GRANDCHILD),
        "chain over a sparsified base",
    );
}

// ---------------------------------------------------------------- resize

/// A resize that may shrink (the cut must still be zero).
fn resize(path: &Path, size: u64, azure: bool) -> vhdkit::Result<ops::ResizeReport> {
    ops::resize(path, size, azure, true, &OpenOptions::new())
}

/// Images of one content in each resizable form, made from `raw`.
fn forms(dir: &Path, raw: &Path, tag: &str) -> Vec<PathBuf> {
    let fixed = dir.join(format!("{tag}-fixed.vhd"));
    convert(raw, &fixed, &to(Target::Fixed));
    let dynv = dir.join(format!("{tag}-dyn.vhd"));
    convert(raw, &dynv, &to(Target::Dynamic));
    let dyn_small = dir.join(format!("{tag}-dyn512k.vhd"));
    convert(raw, &dyn_small, &dynamic(512 * KIB as u32).sparse(false));
    let copy = dir.join(format!("{tag}.raw"));
    std::fs::copy(raw, &copy).unwrap();
    vec![copy, fixed, dynv, dyn_small]
}

/// Check options for an image of `format`: a raw file is checked as the
/// raw disk it is (without saying so, check reports it has no VHD footer).
fn raw_stated(format: Format) -> vhdkit::CheckOptions {
    let mut o = vhdkit::CheckOptions::default();
    if format == Format::Raw {
        o.open = OpenOptions::new().format(Format::Raw);
    }
    o
}

#[test]
fn resize_grows_every_form_and_qemu_agrees() {
    let dir = tempdir();
    let size = 3 * MIB;
    let src = dir.path().join("src.raw");
    let content = sparse_raw(&src, size, &sample_writes(size));
    for new_size in [3 * MIB + 512, 7 * MIB, 64 * MIB + 4096] {
        for path in forms(dir.path(), &src, &format!("g{new_size}")) {
            let before = open(&path);
            let (format, id) = (before.disk_type(), before.footer().map(|f| f.unique_id));
            drop(before);
            resize(&path, new_size, false).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let img = open(&path);
            assert_eq!(
                (img.disk_type(), img.virtual_size()),
                (format, new_size),
                "{}",
                path.display()
            );
            assert_eq!(
                img.footer().map(|f| f.unique_id),
                id,
                "{}: unique id",
                path.display()
            );
            assert_content(
                &img,
                &resized(&content, new_size),
                &path.display().to_string(),
            );
            let report = vhdkit::check(&path, &raw_stated(format)).unwrap();
            assert!(
                report.problems.is_empty(),
                "{}: {:?}",
                path.display(),
                report.problems
            );
            if format != Format::Raw {
                assert_eq!(qemu_size(&path), new_size, "{}", path.display());
                qemu_compare(&path, &src);
            }
        }
    }
}

#[test]
fn resize_shrinks_only_when_the_cut_is_zero() {
    let dir = tempdir();
    let size = 6 * MIB;
    let src = dir.path().join("src.raw");
    // Data up to 2 MiB + 100, and one byte at 5 MiB + 1000.
    let content = sparse_raw(
        &src,
        size,
        &[
            (0, pattern(4096, 1)),
            (2 * MIB + 100, vec![7]),
            (5 * MIB + 1000, vec![8]),
        ],
    );
    for path in forms(dir.path(), &src, "s") {
        let before = std::fs::read(&path).unwrap();
        // Data in the cut: refused, naming the first non-zero byte, untouched.
        for new_size in [5 * MIB, 3 * MIB, MIB] {
            let want = if new_size == MIB {
                2 * MIB + 100
            } else {
                5 * MIB + 1000
            };
            match resize(&path, new_size, false) {
                Err(e) => {
                    let m = e.to_string();
                    assert!(m.contains(&want.to_string()), "{}: {m}", path.display());
                }
                Ok(d) => panic!("{}: shrunk over data to {new_size}: {d:?}", path.display()),
            }
            assert!(
                std::fs::read(&path).unwrap() == before,
                "{}: changed by a refused resize",
                path.display()
            );
        }
        // An all-zero cut: fine.
        let format = open(&path).disk_type();
        let new_size = 5 * MIB + 1024;
        resize(&path, new_size, false).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let img = open(&path);
        assert_eq!((img.disk_type(), img.virtual_size()), (format, new_size));
        assert_content(
            &img,
            &content[..new_size as usize],
            &path.display().to_string(),
        );
        let report = vhdkit::check(&path, &raw_stated(format)).unwrap();
        assert!(
            report.is_clean(),
            "{}: {:?}",
            path.display(),
            report.problems
        );
        if format != Format::Raw {
            assert_eq!(qemu_size(&path), new_size);
            let flat = dir.path().join("flat.raw");
            std::fs::write(&flat, &content[..new_size as usize]).unwrap();
            qemu_compare(&path, &flat);
        }
    }
}

#[test]
fn resize_refuses_differencing_disks() {
    let dir = tempdir();
    write_chain(dir.path());
    for name in [GRANDCHILD, "hand-chain-child.vhd"] {
        let p = dir.path().join(name);
        let before = std::fs::read(&p).unwrap();
        match resize(&p, 10 * MIB, false) {
            Err(Error::WrongImageKind {
                operation: "resize",
                kind: Format::Differencing,
                reason,
                ..
            }) => assert!(reason.contains("differencing"), "{reason}"),
            other => panic!("{name}: {other:?}"),
        }
        assert!(matches!(
            ops::plan_resize(&open(&p), 10 * MIB, false, true),
            Err(Error::WrongImageKind { .. })
        ));
        assert!(std::fs::read(&p).unwrap() == before);
    }
}

#[test]
fn resize_with_azure_rounds_up_to_a_whole_mib() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let content = sparse_raw(&src, 3 * MIB, &sample_writes(3 * MIB));
    for path in forms(dir.path(), &src, "a") {
        for (ask, want) in [
            (3 * MIB + 1, 4 * MIB),
            (5 * MIB, 5 * MIB),
            (5 * MIB + 512, 6 * MIB),
        ] {
            resize(&path, ask, true).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let img = open(&path);
            assert_eq!(img.virtual_size(), want, "{} asked {ask}", path.display());
            assert_content(&img, &resized(&content, want), &path.display().to_string());
        }
        if open(&path).disk_type() == Format::Fixed {
            let r = vhdkit::check(
                &path,
                &vhdkit::CheckOptions {
                    azure: true,
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(r.is_clean(), "{:?}", r.problems);
        }
    }
    // Without --azure a size is only rounded to a whole sector, and the
    // report says so.
    let p = dir.path().join("a-fixed.vhd");
    let r = resize(&p, 7 * MIB + 1, false).unwrap();
    assert_eq!(open(&p).virtual_size(), 7 * MIB + 512);
    assert_eq!(
        (r.new_size, r.rounded_from),
        (7 * MIB + 512, Some(7 * MIB + 1))
    );
    assert!(r.warnings[0].contains("rounded up"), "{:?}", r.warnings);
    // A size that needs no rounding says nothing.
    let r = resize(&p, 8 * MIB, false).unwrap();
    assert_eq!((r.rounded_from, r.warnings.len()), (None, 0));
    // A raw file keeps the size asked for: it is no VHD.
    let raw = dir.path().join("plain.raw");
    std::fs::write(&raw, vec![1u8; 4096]).unwrap();
    let r = ops::resize(
        &raw,
        1_000_001,
        false,
        false,
        &OpenOptions::new().format(Format::Raw),
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1_000_001);
    assert_eq!(r.rounded_from, None);
}

#[test]
fn resize_grows_a_dynamic_disk_past_its_bat_by_rewriting_it() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let content = sparse_raw(&src, MIB, &sample_writes(MIB));
    let p = dir.path().join("small.vhd");
    convert(&src, &p, &dynamic(512 * KIB as u32));
    let img = open(&p);
    let id = img.footer().unwrap().unique_id;
    let new_size = 10 * GIB;
    // More BAT entries than fit before the first block: no in-place plan.
    assert!(ops::plan_resize(&img, new_size, false, true)
        .unwrap()
        .is_none());
    drop(img);
    let started = Instant::now();
    resize(&p, new_size, false).unwrap();
    let took = started.elapsed();
    let img = open(&p);
    assert_eq!(
        (img.disk_type(), img.virtual_size()),
        (Format::Dynamic, new_size)
    );
    assert_eq!(
        img.footer().unwrap().unique_id,
        id,
        "the rewrite keeps the unique id"
    );
    assert_eq!(img.block_size(), 512 * KIB);
    assert_eq!(
        u64::from(img.header().unwrap().max_table_entries),
        new_size / (512 * KIB)
    );
    let mut head = vec![0u8; MIB as usize];
    img.read_exact_at(&mut head, 0).unwrap();
    assert!(head == content);
    let mut tail = vec![1u8; 4096];
    img.read_exact_at(&mut tail, new_size - 4096).unwrap();
    assert!(tail.iter().all(|&x| x == 0));
    // Checksum of 10 GiB that is nearly all zero: the zeros are combined, not
    // read. The expectation: crc32fast over the data, combined with 10 GiB - 1 MiB
    // of zeros built by doubling a hashed MiB of zeros.
    let mut h = crc32fast::Hasher::new();
    h.update(&content);
    let mut unit = crc32fast::Hasher::new();
    unit.update(&vec![0u8; MIB as usize]);
    let mut zeros = crc32fast::Hasher::new();
    let mut q = (new_size - MIB) / MIB;
    while q > 0 {
        if q & 1 == 1 {
            zeros.combine(&unit);
        }
        let u = unit.clone();
        unit.combine(&u);
        q >>= 1;
    }
    h.combine(&zeros);
    assert_eq!(pair(ops::checksum(&img).unwrap()), (h.finalize(), new_size));
    drop(img);
    assert!(allocated(&p) < 4 * MIB, "{} bytes allocated", allocated(&p));
    assert_eq!(qemu_size(&p), new_size);
    let flat = dir.path().join("flat.raw");
    sparse_raw(&flat, new_size, &[(0, content.clone())]);
    qemu_compare(&p, &flat);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 3, "a temporary file is left: {left:?}");
    eprintln!("dynamic 1 MiB -> 10 GiB by rewrite: {took:?}");
}

fn plan_resize(path: &Path, size: u64) -> InPlacePlan {
    ops::plan_resize(&open(path), size, false, true)
        .unwrap_or_else(|e| panic!("plan resize {}: {e}", path.display()))
        .unwrap_or_else(|| panic!("{}: no in-place plan", path.display()))
}

#[test]
fn resize_survives_interruption_at_every_step() {
    let dir = tempdir();
    let size = 3 * MIB;
    let src = dir.path().join("src.raw");
    // Data in the first 2 MiB only: the rest may be cut.
    let content = sparse_raw(
        &src,
        size,
        &[(0, pattern(4096, 1)), (MIB + 3, pattern(2000, 2))],
    );
    let mut cases = 0;
    for path in forms(dir.path(), &src, "i") {
        let old = State::of(&path);
        // Grow a little, grow past the BAT's entries (in place: there is
        // room before the first block), shrink within a block, shrink by
        // whole blocks.
        for new_size in [3 * MIB + 512, 9 * MIB, 2 * MIB + 512 * 3, 2 * MIB] {
            let new = State {
                format: old.format,
                content: resized(&old.content, new_size),
            };
            interrupt_each_step(&path, &old, &new, &|p| plan_resize(p, new_size));
            cases += 1;
        }
    }
    assert_eq!(cases, 16);
    // And a dynamic image whose BAT is extended in place, run for real.
    let p = dir.path().join("i-dyn.vhd");
    let plan = plan_resize(&p, 9 * MIB);
    assert!(
        plan.steps
            .iter()
            .any(|s| matches!(s, Step::Write(_, b) if b.iter().all(|&x| x == 0xff))),
        "{:?}",
        plan.description
    );
    plan.run().unwrap();
    let img = open(&p);
    assert_eq!(u64::from(img.header().unwrap().max_table_entries), 5);
    assert_content(&img, &resized(&content, 9 * MIB), "dynamic grown in place");
    qemu_compare(&p, &src);
}

/// Growing a disk makes bytes that were past its end part of it: they must
/// read as zeros, whatever the file held there.
#[test]
fn resize_grows_a_partial_last_block_with_zeros() {
    let dir = tempdir();
    // 2 MiB + 300 KiB in 2 MiB blocks; block 1's bytes past the size hold 0xEE.
    let f = make_testdata::dynamic_partial_last_block();
    let p = dir.path().join(&f.name);
    std::fs::write(&p, &f.bytes).unwrap();
    let old = State::of(&p);
    assert_eq!(old.content, f.model.data);
    for new_size in [4 * MIB, 2 * MIB + 600 * KIB, 9 * MIB] {
        let new = State {
            format: Format::Dynamic,
            content: resized(&old.content, new_size),
        };
        if let Some(plan) = ops::plan_resize(&open(&p), new_size, false, true).unwrap() {
            interrupt_each_step(&p, &old, &new, &|q| plan_resize(q, new_size));
            assert!(plan.steps.len() < 40);
        }
        let work = dir.path().join("work.vhd");
        std::fs::copy(&p, &work).unwrap();
        resize(&work, new_size, false).unwrap();
        let img = open(&work);
        assert_content(&img, &new.content, &format!("grown to {new_size}"));
        // qemu ignores bitmaps: the bytes themselves must be zero.
        let flat = dir.path().join("flat.raw");
        std::fs::write(&flat, &new.content).unwrap();
        qemu_compare(&work, &flat);
    }
}

/// A fixed image whose footer sits past the end of its data (bytes between
/// are "not part of the disk", and hold junk here): growing it, in place or
/// for Azure, must make the new area read as zeros, whether the new size
/// ends before, at or past the old footer.
#[test]
fn fixed_images_with_padding_before_the_footer_grow_with_zeros() {
    let dir = tempdir();
    let data = 3 * MIB - 8192;
    let src = dir.path().join("src.raw");
    let content = sparse_raw(&src, data, &sample_writes(data));
    let padded = dir.path().join("padded.vhd");
    {
        let fixed = dir.path().join("plain.vhd");
        convert(&src, &fixed, &to(Target::Fixed));
        let img = open(&fixed);
        let mut f = img.footer().unwrap().clone();
        drop(img);
        // 8 KiB of junk, then the footer at 3 MiB: current size 3 MiB - 8 KiB.
        let mut bytes = std::fs::read(&fixed).unwrap();
        bytes.truncate(data as usize);
        bytes.extend(std::iter::repeat_n(0xa5u8, 8192));
        f.current_size = data;
        bytes.extend_from_slice(&f.to_bytes());
        std::fs::write(&padded, bytes).unwrap();
    }
    let old = State::of(&padded);
    assert_eq!(old.content, content);
    assert!(
        !open(&padded).warnings().is_empty(),
        "the padding is reported"
    );
    for new_size in [data + 4096, 3 * MIB, 3 * MIB + 512 * 3, 5 * MIB] {
        let new = State {
            format: Format::Fixed,
            content: resized(&content, new_size),
        };
        let work = dir.path().join(format!("grow-{new_size}.vhd"));
        std::fs::copy(&padded, &work).unwrap();
        let plan = interrupt_each_step(&work, &old, &new, &|p| plan_resize(p, new_size));
        plan.run().unwrap();
        assert_content(&open(&work), &new.content, &format!("grown to {new_size}"));
        qemu_compare(&work, &src);
    }
    // For Azure, in place: to 3 MiB, where the old footer is.
    let new = State {
        format: Format::Fixed,
        content: resized(&content, 3 * MIB),
    };
    let plan = interrupt_each_step(&padded, &old, &new, &|p| {
        plan_in_place(p, Format::Fixed, true)
    });
    plan.run().unwrap();
    assert_content(&open(&padded), &new.content, "azure");
    qemu_compare(&padded, &src);
}

/// A dynamic image whose BAT holds allocated entries past the end of the
/// disk (ignored, with a warning: left by a tool that shrank it by editing
/// the footer alone). Growing it must not bring their stale data back.
#[test]
fn resize_does_not_bring_back_blocks_past_the_end() {
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let content = sparse_raw(
        &src,
        5 * MIB,
        &[
            (0, pattern(4096, 1)),
            (4 * MIB + 700 * KIB, pattern(8192, 2)),
        ],
    );
    let p = dir.path().join("shrunk.vhd");
    convert(&src, &p, &dynamic(512 * KIB as u32));
    let img = open(&p);
    let mut f = img.footer().unwrap().clone();
    let at = img.data_end();
    drop(img);
    f.current_size = 3 * MIB;
    let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    file.write_all_at(&f.to_bytes(), 0).unwrap();
    file.write_all_at(&f.to_bytes(), at).unwrap();
    drop(file);
    let img = open(&p);
    assert_eq!(img.virtual_size(), 3 * MIB);
    assert!(img.bat().unwrap().entries[9] != vhdkit::ondisk::UNALLOCATED);
    drop(img);
    let old = State::of(&p);
    assert_eq!(old.content, content[..3 * MIB as usize]);
    let new_size = 5 * MIB;
    let new = State {
        format: Format::Dynamic,
        content: resized(&old.content, new_size),
    };
    interrupt_each_step(&p, &old, &new, &|q| plan_resize(q, new_size));
    resize(&p, new_size, false).unwrap();
    let img = open(&p);
    assert_content(&img, &new.content, "grown over a stale block");
    assert!(img.warnings().is_empty(), "{:?}", img.warnings());
    let flat = dir.path().join("flat.raw");
    std::fs::write(&flat, &new.content).unwrap();
    qemu_compare(&p, &flat);
}
