//! What a file is, and what vhdkit writes (issue 7, "Wrong results"):
//! other formats are refused by name unless the raw format is stated; a
//! file with no VHD structure is no clean VHD; every VHD written has a size
//! of whole sectors; a fixed footer off its place is an error; data under
//! clear bitmap bits is a warning; and every problem `check` reports has a
//! code that README.md documents. Foreign files are made by qemu-img itself.

use crate::common::qemu_img;
use crate::make_testdata;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use vhdkit::ondisk::{DiskType, Footer};
use vhdkit::{
    CheckOptions, CheckReport, ConvertOptions, Error, Format, Image, OpenOptions, Target,
};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- helpers

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary folder")
}

fn qemu(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = Command::new(qemu_img())
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("run qemu-img");
    let argv: Vec<_> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    assert!(
        out.status.success(),
        "qemu-img {argv:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The codes README.md's `check` section documents: the first backquoted
/// word of each table row under "Problem codes".
pub fn documented_codes() -> &'static BTreeSet<String> {
    static CODES: OnceLock<BTreeSet<String>> = OnceLock::new();
    CODES.get_or_init(|| {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .expect("README.md");
        let start = readme
            .find("Problem codes")
            .expect("README.md has a \"Problem codes\" list in its check section");
        let mut codes = BTreeSet::new();
        let mut rows = 0;
        for line in readme[start..].lines().skip(1) {
            let line = line.trim();
            if line.is_empty() && rows > 0 {
                break;
            }
            let Some(rest) = line.strip_prefix("| `") else {
                continue;
            };
            let code = rest.split('`').next().unwrap().to_string();
            assert!(
                !code.is_empty()
                    && code
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "README code {code:?} is not lower-case words joined by hyphens"
            );
            assert!(codes.insert(code.clone()), "README lists {code} twice");
            rows += 1;
        }
        assert!(rows >= 20, "only {rows} codes parsed from README.md");
        codes
    })
}

/// Every problem of `r` has a non-empty code from README's list.
#[track_caller]
pub fn assert_documented(r: &CheckReport) {
    let codes = documented_codes();
    for p in &r.problems {
        assert!(
            codes.contains(p.code),
            "{}: problem code {:?} is not in README.md's list: {p:?}",
            r.path.display(),
            p.code
        );
    }
}

fn check(path: &Path, open: OpenOptions) -> CheckReport {
    let r = vhdkit::check(path, &CheckOptions { open, azure: false })
        .unwrap_or_else(|e| panic!("check {}: {e}", path.display()));
    assert_documented(&r);
    r
}

fn codes(r: &CheckReport) -> Vec<&'static str> {
    r.problems.iter().map(|p| p.code).collect()
}

/// `size` bytes, none of them zero (so a lost tail shows).
fn nonzero(size: u64) -> Vec<u8> {
    (0..size)
        .map(|i| ((i * 7 + i / 511) % 251) as u8 | 1)
        .collect()
}

// ---------------------------------------------------------------- foreign formats

/// Files of every format qemu-img creates, with what vhdkit must call them.
/// `(file name, qemu-img create arguments, format, version)`.
const FOREIGN: &[(&str, &[&str], &str, Option<&str>)] = &[
    (
        "cloud.qcow2",
        &["-f", "qcow2", "-o", "compat=1.1"],
        "qcow2",
        Some("3"),
    ),
    (
        "old.qcow2",
        &["-f", "qcow2", "-o", "compat=0.10"],
        "qcow2",
        Some("2"),
    ),
    ("disk.qcow", &["-f", "qcow"], "qcow", Some("1")),
    ("disk.qed", &["-f", "qed"], "QED", None),
    (
        "sparse.vmdk",
        &["-f", "vmdk", "-o", "subformat=monolithicSparse"],
        "VMDK sparse",
        Some("1"),
    ),
    (
        "stream.vmdk",
        &["-f", "vmdk", "-o", "subformat=streamOptimized"],
        "VMDK stream-optimized",
        Some("3"),
    ),
    (
        "flat.vmdk",
        &["-f", "vmdk", "-o", "subformat=monolithicFlat"],
        "VMDK descriptor",
        Some("1"),
    ),
    ("disk.vdi", &["-f", "vdi"], "VDI", Some("1.1")),
    ("disk.hdd", &["-f", "parallels"], "Parallels", Some("2")),
];

/// Makes the foreign files in `dir` (qemu-img, plus a dmg and a LUKS header
/// by hand); returns `(path, format, version)`.
fn make_foreign(dir: &Path) -> Vec<(PathBuf, &'static str, Option<&'static str>)> {
    let mut v = Vec::new();
    for (name, args, format, version) in FOREIGN {
        let p = dir.join(name);
        let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"create", &"-q"];
        for x in args.iter() {
            a.push(x);
        }
        a.push(&p);
        a.push(&"4M");
        qemu(&a);
        // qemu-img writes data into it too, so it is a used image.
        v.push((p, *format, *version));
    }
    // dmg (UDIF): data, then a 512-byte trailer "koly", version 4.
    let dmg = dir.join("disk.dmg");
    let mut b = nonzero(64 * 1024);
    let mut koly = [0u8; 512];
    koly[..8].copy_from_slice(b"koly\0\0\0\x04");
    b.extend_from_slice(&koly);
    std::fs::write(&dmg, b).unwrap();
    v.push((dmg, "dmg", Some("4")));
    // LUKS version 1 header (qemu-img makes one too, but spends seconds
    // deriving a key).
    let luks = dir.join("disk.luks");
    let mut b = vec![0u8; 1 << 20];
    b[..8].copy_from_slice(b"LUKS\xba\xbe\0\x01");
    b[8..11].copy_from_slice(b"aes");
    std::fs::write(&luks, b).unwrap();
    v.push((luks, "LUKS", Some("1")));
    v
}

#[test]
fn foreign_formats_are_refused_by_name_unless_raw_is_stated() {
    let dir = tempdir();
    let files = make_foreign(dir.path());
    for (path, format, version) in &files {
        let what = path.display().to_string();
        // Opening names the format and version.
        match Image::open(path) {
            Err(e @ Error::ForeignFormat { .. }) => {
                let Error::ForeignFormat {
                    path: p,
                    format: f,
                    version: v,
                    ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(p, path, "{what}");
                assert_eq!(f, format, "{what}");
                assert_eq!(v.as_deref(), *version, "{what}");
                let want = match version {
                    Some(v) => format!(
                        "{} is a {format} (version {v}) image; vhdkit reads VHD, VHDX and raw disks",
                        path.display()
                    ),
                    None => format!(
                        "{} is a {format} image; vhdkit reads VHD, VHDX and raw disks",
                        path.display()
                    ),
                };
                assert_eq!(e.to_string(), want);
            }
            Err(e) => panic!("{what}: refused, but not as a foreign format: {e}"),
            Ok(img) => panic!("{what}: opened as {}", img.disk_type()),
        }
        // Converting it is refused, leaving nothing behind.
        let out = dir.path().join("out.vhd");
        let r = vhdkit::convert(path, &out, &ConvertOptions::new(Target::Dynamic));
        assert!(
            matches!(r, Err(Error::ForeignFormat { .. })),
            "{what}: convert gave {r:?}"
        );
        assert!(!out.exists(), "{what}: an output was left");
        // check reports it as a problem with its code.
        let r = check(path, OpenOptions::new());
        assert!(!r.is_clean(), "{what}: check calls it clean");
        assert_eq!(codes(&r), ["foreign-format"], "{what}: {:?}", r.problems);
        assert!(r.problems[0].message.contains(format), "{what}");
        // Stated raw, it is read as its bytes.
        let img = Image::open_with(path, &OpenOptions::new().format(Format::Raw))
            .unwrap_or_else(|e| panic!("{what} as raw: {e}"));
        assert_eq!(img.disk_type(), Format::Raw);
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(img.virtual_size(), bytes.len() as u64);
        let mut head = vec![0u8; bytes.len().min(4096)];
        img.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(head, bytes[..head.len()]);
        let r = check(path, OpenOptions::new().format(Format::Raw));
        assert!(r.problems.is_empty(), "{what} as raw: {:?}", r.problems);
    }
    // A VHD whose disk holds a qcow2 image is a VHD: the footer decides.
    let (inner, ..) = &files[0];
    let vhd = dir.path().join("holds-a-qcow2.vhd");
    vhdkit::convert(
        inner,
        &vhd,
        &ConvertOptions::new(Target::Fixed).open_options(OpenOptions::new().format(Format::Raw)),
    )
    .unwrap();
    let img = Image::open(&vhd).unwrap();
    assert_eq!(img.disk_type(), Format::Fixed);
    let mut magic = [0u8; 4];
    img.read_exact_at(&mut magic, 0).unwrap();
    assert_eq!(&magic, b"QFI\xfb");
}

#[test]
fn a_file_with_no_vhd_footer_fails_check_unless_raw_is_stated() {
    let dir = tempdir();
    // Text, and a fixed VHD whose footer was cut off.
    let text = dir.path().join("passwd");
    std::fs::write(&text, "root:x:0:0:root:/root:/bin/bash\n".repeat(20)).unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, nonzero(MIB)).unwrap();
    let cut = dir.path().join("cut.vhd");
    vhdkit::convert(&raw, &cut, &ConvertOptions::new(Target::Fixed)).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    f.set_len(MIB).unwrap();
    drop(f);
    for p in [&text, &cut] {
        let r = check(p, OpenOptions::new());
        assert!(!r.is_clean(), "{}: {:?}", p.display(), r.problems);
        assert_eq!(codes(&r), ["no-vhd-footer"]);
        assert_eq!(
            r.problems[0].message,
            "no VHD footer at the end or at offset 0; it reads as a raw disk"
        );
        assert_eq!(r.format, Some(Format::Raw));
        let r = check(p, OpenOptions::new().format(Format::Raw));
        assert!(r.is_clean() && r.problems.is_empty(), "{:?}", r.problems);
    }
}

// ---------------------------------------------------------------- sizes

/// `content` padded with zeros to `len`, written to `path`.
fn padded(path: &Path, content: &[u8], len: u64) {
    let mut v = content.to_vec();
    v.resize(len as usize, 0);
    std::fs::write(path, v).unwrap();
}

/// qemu-img reads `vhd` as `size` bytes equal to the raw file `want`.
#[track_caller]
fn qemu_reads(vhd: &Path, size: u64, want: &Path) {
    let info = qemu(&[&"info", &"-f", &"vpc", &"--output=json", &vhd]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], size, "{}: {info}", vhd.display());
    // The sizes are equal (above and below), so a plain compare sees every byte.
    assert_eq!(std::fs::metadata(want).unwrap().len(), size);
    qemu(&[&"compare", &"-f", &"vpc", &"-F", &"raw", &vhd, &want]);
}

#[test]
fn sizes_that_are_not_whole_sectors_are_rounded_up_in_every_vhd_written() {
    let dir = tempdir();
    for size in [1_000_000u64, 4_194_303] {
        let content = nonzero(size);
        let raw = dir.path().join(format!("in-{size}.raw"));
        std::fs::write(&raw, &content).unwrap();
        let up = size.div_ceil(512) * 512;
        let want = dir.path().join(format!("want-{size}.raw"));
        padded(&want, &content, up);
        for target in [Target::Fixed, Target::Dynamic] {
            let out = dir.path().join(format!("{size}-{target:?}.vhd"));
            let r = vhdkit::convert(&raw, &out, &ConvertOptions::new(target)).unwrap();
            assert_eq!(r.virtual_size, up, "{target:?}");
            assert_eq!(r.rounded_from, Some(size));
            assert!(
                r.warnings.iter().any(|w| w.contains(&size.to_string())
                    && w.contains(&up.to_string())
                    && w.contains("sectors")),
                "{:?}",
                r.warnings
            );
            let img = Image::open(&out).unwrap();
            assert_eq!(img.virtual_size(), up);
            if target == Target::Fixed {
                assert_eq!(img.file_len(), up + 512);
                assert_eq!(img.data_end() % 512, 0);
            }
            qemu_reads(&out, up, &want);
            assert!(check(&out, OpenOptions::new()).problems.is_empty());
        }
        // Azure: a whole MiB.
        let out = dir.path().join(format!("{size}-azure.vhd"));
        let r =
            vhdkit::convert(&raw, &out, &ConvertOptions::new(Target::Fixed).azure(true)).unwrap();
        let mib = size.div_ceil(MIB) * MIB;
        assert_eq!((r.virtual_size, r.rounded_from), (mib, Some(size)));
        let want_mib = dir.path().join(format!("want-{size}-mib.raw"));
        padded(&want_mib, &content, mib);
        qemu_reads(&out, mib, &want_mib);
        // In place, raw -> fixed.
        let work = dir.path().join(format!("inplace-{size}.raw"));
        std::fs::copy(&raw, &work).unwrap();
        vhdkit::ops::plan_in_place(&work, Format::Fixed, false, &OpenOptions::new())
            .unwrap()
            .run()
            .unwrap();
        assert_eq!(std::fs::metadata(&work).unwrap().len(), up + 512);
        qemu_reads(&work, up, &want);
        // Raw outputs keep the exact size, with no warning.
        let back = dir.path().join(format!("back-{size}.raw"));
        let r = vhdkit::convert(&raw, &back, &ConvertOptions::new(Target::Raw)).unwrap();
        assert_eq!((r.virtual_size, r.rounded_from), (size, None));
        assert!(r.warnings.is_empty());
        assert_eq!(std::fs::read(&back).unwrap(), content);
    }
    // A whole-sector input is not rounded and gets no warning.
    let raw = dir.path().join("whole.raw");
    std::fs::write(&raw, nonzero(MIB)).unwrap();
    let r = vhdkit::convert(
        &raw,
        dir.path().join("w.vhd"),
        &ConvertOptions::new(Target::Dynamic),
    )
    .unwrap();
    assert_eq!((r.rounded_from, r.warnings.len()), (None, 0));
}

#[test]
fn a_vhd_whose_size_is_not_whole_sectors_still_reads_exactly() {
    // Written by another tool: current size 1,000,000, footer right after.
    let dir = tempdir();
    let content = nonzero(1_000_000);
    let mut b = content.clone();
    b.extend_from_slice(
        &Footer::new(DiskType::Fixed, 1_000_000, Footer::NO_DATA_OFFSET).to_bytes(),
    );
    let p = dir.path().join("odd.vhd");
    std::fs::write(&p, &b).unwrap();
    let img = Image::open(&p).unwrap();
    assert_eq!(
        (img.disk_type(), img.virtual_size()),
        (Format::Fixed, 1_000_000)
    );
    let mut got = vec![0u8; 1_000_000];
    img.read_exact_at(&mut got, 0).unwrap();
    assert!(got == content);
    let r = check(&p, OpenOptions::new());
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!(codes(&r), ["size-not-whole-sectors"]);
}

// ---------------------------------------------------------------- fixed footer place

/// A fixed VHD of `size` bytes of data, `pad` bytes of zeros, a footer.
fn fixed_with_padding(dir: &Path, name: &str, size: u64, pad: usize) -> PathBuf {
    let mut b = nonzero(size);
    b.resize(b.len() + pad, 0);
    b.extend_from_slice(&Footer::new(DiskType::Fixed, size, Footer::NO_DATA_OFFSET).to_bytes());
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn a_fixed_footer_off_a_sector_boundary_is_an_error() {
    let dir = tempdir();
    // One byte too many in front of the footer: the data or footer shifted.
    for (name, size, pad) in [
        ("shifted-1", MIB, 1),
        ("shifted-511", MIB, 511),
        ("odd-pad-1", 1_000_000, 1),
    ] {
        let p = fixed_with_padding(dir.path(), name, size, pad);
        let r = check(&p, OpenOptions::new());
        assert!(!r.is_clean(), "{name}: {:?}", r.problems);
        let e = r
            .problems
            .iter()
            .find(|x| x.code == "fixed-footer-unaligned")
            .unwrap_or_else(|| panic!("{name}: {:?}", r.problems));
        assert_eq!(e.severity, vhdkit::Severity::Error);
        assert_eq!(e.offset, Some(size + pad as u64));
        assert!(
            !codes(&r).contains(&"fixed-padding"),
            "{name}: {:?}",
            r.problems
        );
    }
    // Whole sectors of padding before an aligned footer: a warning.
    for (name, size, pad) in [("pad-512", MIB, 512), ("pad-to-sector", 1_000_000, 448)] {
        let p = fixed_with_padding(dir.path(), name, size, pad);
        let r = check(&p, OpenOptions::new());
        assert!(r.is_clean(), "{name}: {:?}", r.problems);
        assert!(
            codes(&r).contains(&"fixed-padding"),
            "{name}: {:?}",
            r.problems
        );
    }
    // The 511-byte footer of Virtual PC before 2004 stays accepted.
    let legacy = make_testdata::fixed_legacy_footer();
    let p = dir.path().join(&legacy.name);
    std::fs::write(&p, &legacy.bytes).unwrap();
    let r = check(&p, OpenOptions::new());
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!(codes(&r), ["footer-legacy-511"]);
}

// ---------------------------------------------------------------- clear bitmaps

#[test]
fn data_under_clear_bitmap_bits_is_a_warning_in_dynamic_disks() {
    let dir = tempdir();
    let fx = make_testdata::dynamic_partial_bitmaps();
    let p = dir.path().join(&fx.name);
    std::fs::write(&p, &fx.bytes).unwrap();
    let r = check(&p, OpenOptions::new());
    assert!(r.is_clean(), "warnings only: {:?}", r.problems);
    let w: Vec<_> = r
        .problems
        .iter()
        .filter(|x| x.code == "data-under-clear-bitmap")
        .collect();
    // Block 0: bits set for 0..4, 9, 16..24, 1000..2000, 4095; block 1: all
    // but 2047; block 3: none. Every clear sector holds stale bytes.
    let img = Image::open(&p).unwrap();
    let bat = img.bat().unwrap().entries.clone();
    let want = [
        (0u64, "4..9, 10..16, 24..1000, 2000..4095"),
        (1, "(2047)"),
        (3, "(0..4096)"),
    ];
    assert_eq!(w.len(), want.len(), "{w:?}");
    for (p, (block, ranges)) in w.iter().zip(want) {
        assert_eq!(p.severity, vhdkit::Severity::Warning);
        assert_eq!(
            p.structure.as_deref(),
            Some(format!("block {block}").as_str())
        );
        assert_eq!(p.offset, Some(u64::from(bat[block as usize]) * 512));
        assert!(p.message.contains(ranges), "{}", p.message);
        assert!(p.message.contains("qemu-img"), "{}", p.message);
        assert!(p.message.contains("other readers"), "{}", p.message);
    }

    // Clear bits over zeros are no problem: zero block 1's sector 2047.
    let data1 = u64::from(bat[1]) * 512 + 512;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0u8; 512], data1 + 2047 * 512).unwrap();
    // Block 0's bitmap alternating (0xAA: even sectors set): 2048 ranges,
    // of which a few are listed.
    let bm0 = u64::from(bat[0]) * 512;
    f.write_all_at(&[0xAAu8; 512], bm0).unwrap();
    drop(f);
    let r = check(&p, OpenOptions::new());
    let w: Vec<_> = r
        .problems
        .iter()
        .filter(|x| x.code == "data-under-clear-bitmap")
        .collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!(w[0].structure.as_deref(), Some("block 0"));
    assert!(
        w[0].message
            .contains("1, 3, 5, 7, 9, 11, 13, 15, and 2040 more ranges"),
        "{}",
        w[0].message
    );
    assert!(w[0].message.len() < 1000, "{}", w[0].message);
    assert_eq!(w[1].structure.as_deref(), Some("block 3"));

    // A differencing disk's clear bits defer to its parent: not reported.
    let base = make_testdata::chain_base();
    let child = make_testdata::chain_child(&base);
    std::fs::write(dir.path().join(&base.name), &base.bytes).unwrap();
    std::fs::write(dir.path().join(&child.name), &child.bytes).unwrap();
    let r = check(&dir.path().join(&child.name), OpenOptions::new());
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    // The base itself, a dynamic disk with stale bytes, is.
    let r = check(&dir.path().join(&base.name), OpenOptions::new());
    assert_eq!(codes(&r), ["data-under-clear-bitmap"], "{:?}", r.problems);
}

/// BAT entries that all name one block with a clear bitmap over data: the
/// search reads at most the file's length, not entries x block size (here
/// 65,536 x 2 MiB = 128 GiB), and says it stopped.
#[test]
fn data_under_clear_bitmap_search_is_bounded_by_the_file() {
    use vhdkit::ondisk::DynamicHeader;
    let n: u32 = 1 << 16;
    let bs: u32 = 2 << 20;
    let table = 1536u64;
    let block_at = (table + 4 * u64::from(n)).div_ceil(512) * 512;
    let mut v = vec![0u8; block_at as usize];
    let f = Footer::new(DiskType::Dynamic, u64::from(n) * u64::from(bs), 512);
    v[..512].copy_from_slice(&f.to_bytes());
    v[512..1536].copy_from_slice(&DynamicHeader::new(table, n, bs).to_bytes());
    let sector = (block_at / 512) as u32;
    for i in 0..n as usize {
        let at = table as usize + 4 * i;
        v[at..at + 4].copy_from_slice(&sector.to_be_bytes());
    }
    v.extend_from_slice(&[0u8; 512]); // bitmap: all clear
    v.extend_from_slice(&nonzero(u64::from(bs)));
    v.extend_from_slice(&f.to_bytes());
    let dir = tempdir();
    let p = dir.path().join("same-block.vhd");
    std::fs::write(&p, &v).unwrap();
    let t = std::time::Instant::now();
    let r = check(&p, OpenOptions::new());
    assert!(t.elapsed().as_secs() < 20, "{:?}", t.elapsed());
    assert!(codes(&r).contains(&"bat-overlap"));
    let w: Vec<_> = r
        .problems
        .iter()
        .filter(|x| x.code == "data-under-clear-bitmap")
        .collect();
    assert!(
        w.iter().any(|x| x.structure.as_deref() == Some("block 0")),
        "{w:?}"
    );
    assert!(w.iter().any(|x| x.message.contains("stopped")), "{w:?}");
}

// ---------------------------------------------------------------- codes

/// Every problem `check` finds in the regression inputs, the testdata, the
/// foreign files and a set of damaged images has a code from README's list,
/// and the codes for known damage are the documented ones.
#[test]
fn every_check_problem_has_a_documented_code() {
    let dir = tempdir();
    let mut files: Vec<PathBuf> = Vec::new();
    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/regressions");
    for e in std::fs::read_dir(&regressions).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "vhd") {
            files.push(p);
        }
    }
    assert!(files.len() >= 10, "{files:?}");
    for f in make_testdata::all() {
        let p = dir.path().join(&f.name);
        std::fs::write(&p, &f.bytes).unwrap();
        files.push(p);
    }
    files.extend(make_foreign(dir.path()).into_iter().map(|x| x.0));
    let mut seen = BTreeSet::new();
    let run = |p: &Path, azure: bool, open: OpenOptions, seen: &mut BTreeSet<&'static str>| {
        let r = vhdkit::check(p, &CheckOptions { open, azure })
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_documented(&r);
        seen.extend(codes(&r));
        r
    };
    for p in &files {
        for azure in [false, true] {
            for open in [
                OpenOptions::new(),
                OpenOptions::new().ignore_checksums(true),
            ] {
                run(p, azure, open, &mut seen);
            }
        }
    }

    // Known damage, known codes.
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, nonzero(3 * MIB + 512)).unwrap();
    let dynv = dir.path().join("d.vhd");
    vhdkit::convert(
        &raw,
        &dynv,
        &ConvertOptions::new(Target::Dynamic).block_size(512 * 1024),
    )
    .unwrap();
    let img = Image::open(&dynv).unwrap();
    let (hdr, table, foot) = (
        img.header_offset(),
        img.header().unwrap().table_offset,
        img.data_end(),
    );
    let entries = img.bat().unwrap().entries.clone();
    drop(img);
    let damaged = |name: &str, pokes: &[(u64, &[u8])]| {
        let p = dir.path().join(name);
        std::fs::copy(&dynv, &p).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        for (at, b) in pokes {
            f.write_all_at(b, *at).unwrap();
        }
        p
    };
    let has = |p: &Path, azure: bool, code: &str, seen: &mut BTreeSet<&'static str>| {
        let r = run(p, azure, OpenOptions::new(), seen);
        assert!(
            codes(&r).contains(&code),
            "{}: no {code} in {:?}",
            p.display(),
            r.problems
        );
    };
    let past = 0x00ff_0000u32.to_be_bytes();
    let first = entries[0].to_be_bytes();
    has(
        &damaged("bat-past-end", &[(table + 4, &past)]),
        false,
        "bat-entry-out-of-file",
        &mut seen,
    );
    has(
        &damaged("bat-overlap", &[(table + 4, &first)]),
        false,
        "bat-overlap",
        &mut seen,
    );
    has(
        &damaged("header-sum", &[(hdr + 36, &[0; 4])]),
        false,
        "header-checksum",
        &mut seen,
    );
    has(
        &damaged("footer-sum", &[(foot + 64, &[0; 4])]),
        false,
        "footer-checksum",
        &mut seen,
    );
    has(
        &damaged("copy-sum", &[(64, &[0; 4])]),
        false,
        "footer-copy-checksum",
        &mut seen,
    );
    // Warnings the open itself gives have their codes too.
    let p = dir.path().join("footer-sum");
    has(&p, false, "footer-copy-used", &mut seen);
    let p = dir.path().join("header-sum");
    let r = run(
        &p,
        false,
        OpenOptions::new().ignore_checksums(true),
        &mut seen,
    );
    assert!(codes(&r).contains(&"checksum-ignored"), "{:?}", r.problems);
    let base = make_testdata::chain_base();
    let child = make_testdata::chain_child(&base);
    let alone = tempdir();
    std::fs::write(alone.path().join(&child.name), &child.bytes).unwrap();
    has(
        &alone.path().join(&child.name),
        false,
        "parent-not-found",
        &mut seen,
    );
    has(&dynv, true, "azure-not-fixed", &mut seen);
    has(&dynv, true, "azure-size-not-whole-mib", &mut seen);
    let fixed = dir.path().join("f.vhd");
    vhdkit::convert(&raw, &fixed, &ConvertOptions::new(Target::Fixed)).unwrap();
    has(&fixed, true, "azure-size-not-whole-mib", &mut seen);
    has(&raw, false, "no-vhd-footer", &mut seen);
    has(
        &dir.path().join("cloud.qcow2"),
        false,
        "foreign-format",
        &mut seen,
    );
    // Azure problems name their rule by code, not only in prose.
    let r = run(&dynv, true, OpenOptions::new(), &mut seen);
    assert!(r.problems.iter().all(|p| !p.code.is_empty()));
    for code in [
        "bat-entry-out-of-file",
        "bat-overlap",
        "header-checksum",
        "footer-checksum",
        "footer-copy-checksum",
        "azure-not-fixed",
        "azure-size-not-whole-mib",
        "no-vhd-footer",
        "foreign-format",
        "data-under-clear-bitmap",
        "footer-legacy-511",
    ] {
        assert!(seen.contains(code), "{code} never produced: {seen:?}");
    }
}

// ---------------------------------------------------------------- the command line

#[cfg(feature = "cli")]
mod cli {
    use super::*;

    struct Run {
        code: i32,
        stdout: String,
        stderr: String,
    }

    fn vhdkit(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_vhdkit"))
            .args(args.iter().map(|a| a.as_ref()))
            .output()
            .expect("run vhdkit");
        let r = Run {
            code: out.status.code().expect("exit status"),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        r
    }

    #[track_caller]
    fn expect(code: i32, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Run {
        let r = vhdkit(args);
        assert_eq!(
            r.code, code,
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            r.code, r.stdout, r.stderr
        );
        r
    }

    #[test]
    fn cli_refuses_foreign_formats_and_format_raw_reads_them() {
        let dir = tempdir();
        let q = dir.path().join("cloud.qcow2");
        qemu(&[&"create", &"-q", &"-f", &"qcow2", &q, &"4M"]);
        let out = dir.path().join("out.vhd");
        let r = expect(2, &[&"convert", &q, &out, &"--to", &"dynamic"]);
        assert!(
            r.stderr.contains(&format!(
                "{} is a qcow2 (version 3) image; vhdkit reads VHD, VHDX and raw disks",
                q.display()
            )),
            "{}",
            r.stderr
        );
        assert!(r.stderr.contains("--format raw"), "{}", r.stderr);
        assert!(!out.exists());
        for cmd in ["info", "map", "checksum"] {
            let r = expect(2, &[&cmd, &q]);
            assert!(
                r.stderr.contains("qcow2 (version 3)"),
                "{cmd}: {}",
                r.stderr
            );
        }
        // check: a problem found (exit 1), with its code.
        let r = expect(1, &[&"check", &q]);
        assert!(
            r.stdout.contains("is a qcow2 (version 3) image"),
            "{}",
            r.stdout
        );
        let r = expect(1, &[&"check", &"--json", &q]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["problems"][0]["code"], "foreign-format");
        assert_eq!(v["clean"], false);

        // --format raw, for every command that opens an image.
        expect(0, &[&"check", &"--format", &"raw", &q]);
        expect(0, &[&"info", &"--format", &"raw", &q]);
        expect(0, &[&"map", &"--format", &"raw", &q]);
        expect(0, &[&"checksum", &"--format", &"raw", &q]);
        expect(0, &[&"compare", &"--format", &"raw", &q, &q]);
        expect(
            0,
            &[
                &"convert",
                &"--format",
                &"raw",
                &q,
                &out,
                &"--to",
                &"dynamic",
                &"-q",
            ],
        );
        // Its bytes, rounded up to whole sectors with zeros.
        let img = Image::open(&out).unwrap();
        let mut bytes = std::fs::read(&q).unwrap();
        bytes.resize((bytes.len() as u64).div_ceil(512) as usize * 512, 0);
        assert_eq!(img.virtual_size(), bytes.len() as u64);
        let mut got = vec![0u8; bytes.len()];
        img.read_exact_at(&mut got, 0).unwrap();
        assert!(got == bytes);
        let work = dir.path().join("work.qcow2");
        std::fs::copy(&q, &work).unwrap();
        expect(2, &[&"sparsify", &work]);
        expect(0, &[&"sparsify", &"--format", &"raw", &work]);
        expect(2, &[&"resize", &work, &"--size", &"8M"]);
        expect(
            0,
            &[&"resize", &"--format", &"raw", &work, &"--size", &"8M"],
        );
        assert_eq!(std::fs::metadata(&work).unwrap().len(), 8 * MIB);
        // Only raw can be stated.
        expect(2, &[&"info", &"--format", &"qcow2", &q]);
    }

    #[test]
    fn cli_check_of_a_file_without_footer_exits_1_and_says_so() {
        let dir = tempdir();
        let p = dir.path().join("passwd");
        std::fs::write(&p, "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        let r = expect(1, &[&"check", &p]);
        assert!(
            r.stdout
                .contains("no VHD footer at the end or at offset 0; it reads as a raw disk"),
            "{}",
            r.stdout
        );
        assert!(r.stdout.contains("--format raw"), "{}", r.stdout);
        let r = expect(1, &[&"check", &"--json", &p]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["problems"][0]["code"], "no-vhd-footer");
        let r = expect(0, &[&"check", &"--format", &"raw", &p]);
        assert!(r.stdout.contains("clean"), "{}", r.stdout);
    }

    #[test]
    fn cli_convert_says_when_it_rounds_the_size_up() {
        let dir = tempdir();
        let raw = dir.path().join("odd.raw");
        std::fs::write(&raw, nonzero(1_000_000)).unwrap();
        let out = dir.path().join("o.vhd");
        let r = expect(0, &[&"convert", &raw, &out, &"--to", &"fixed"]);
        assert!(
            r.stderr.contains("warning") && r.stderr.contains("1000448"),
            "{}",
            r.stderr
        );
        let r = expect(
            0,
            &[
                &"convert", &raw, &out, &"--to", &"dynamic", &"--force", &"--json",
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["rounded_from"], 1_000_000);
        assert_eq!(v["virtual_size"], 1_000_448);
        assert!(
            v["warnings"][0].as_str().unwrap().contains("sectors"),
            "{v}"
        );
        // A whole-sector input: nothing said.
        let raw = dir.path().join("even.raw");
        std::fs::write(&raw, nonzero(MIB)).unwrap();
        let r = expect(
            0,
            &[
                &"convert", &raw, &out, &"--to", &"fixed", &"--force", &"--json",
            ],
        );
        assert!(r.stderr.is_empty(), "{}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["rounded_from"], serde_json::Value::Null);
        assert_eq!(v["warnings"], serde_json::json!([]));
    }

    #[test]
    fn cli_check_json_gives_every_problem_a_code() {
        let dir = tempdir();
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, nonzero(3 * MIB + 512)).unwrap();
        let d = dir.path().join("d.vhd");
        vhdkit::convert(&raw, &d, &ConvertOptions::new(Target::Dynamic)).unwrap();
        let r = expect(1, &[&"check", &"--azure", &"--json", &d]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let got: Vec<&str> = v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["code"].as_str().expect("a code"))
            .collect();
        assert!(got.contains(&"azure-not-fixed"), "{got:?}");
        assert!(got.contains(&"azure-size-not-whole-mib"), "{got:?}");
        for c in got {
            assert!(documented_codes().contains(c), "{c}");
        }
    }
}
