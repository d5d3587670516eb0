//! The `vhdkit` command line as a user runs it: exit statuses (0 ok, 1 a
//! problem found or images differ, 2 cannot run or bad usage), what is
//! printed, and that the JSON outputs parse and hold the documented fields
//! (issues 2 and 4). Expectations come from the library and from bytes the
//! tests wrote or damaged themselves.

use crate::make_testdata;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use vhdkit::{ConvertOptions, Format, Image, Target};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- helpers

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn vhdkit<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out: Output = Command::new(env!("CARGO_BIN_EXE_vhdkit"))
        .args(&args)
        .output()
        .expect("run vhdkit");
    let run = Run {
        code: out
            .status
            .code()
            .unwrap_or_else(|| panic!("vhdkit {args:?} was killed: {}", out.status)),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "vhdkit {args:?} panicked: {}",
        run.stderr
    );
    run
}

/// Runs and requires exit status `code`.
fn expect(code: i32, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Run {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let r = vhdkit(&args);
    assert_eq!(
        r.code, code,
        "vhdkit {args:?}: exit {}\nstdout:\n{}\nstderr:\n{}",
        r.code, r.stdout, r.stderr
    );
    r
}

fn json(r: &Run) -> Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", r.stdout))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary folder")
}

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

/// A testdata image unpacked into `dir` (gunzipped when stored so).
fn unpack(dir: &Path, stored: &str) -> PathBuf {
    let bytes = std::fs::read(testdata(stored)).unwrap_or_else(|e| panic!("{stored}: {e}"));
    let (name, bytes) = match stored.strip_suffix(".gz") {
        Some(n) => {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out)
                .unwrap();
            (n, out)
        }
        None => (stored, bytes),
    };
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The hand-made chain (base, child, grandchild) side by side in `dir`.
fn write_chain(dir: &Path) -> Vec<make_testdata::Fixture> {
    let base = make_testdata::chain_base();
    let child = make_testdata::chain_child(&base);
    let grandchild = make_testdata::chain_grandchild(&child);
    let all = vec![base, child, grandchild];
    for f in &all {
        std::fs::write(dir.join(&f.name), &f.bytes).unwrap();
    }
    all
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1)
        .collect()
}

/// A sparse raw disk of `size` bytes with a few runs of data.
fn sample_raw(path: &Path, size: u64) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut content = vec![0u8; size as usize];
    for (at, len, seed) in [
        (0u64, 4096usize, 1u8),
        (MIB + 100, 3000, 2),
        (size - 512, 512, 3),
    ] {
        if at + len as u64 > size {
            continue;
        }
        let b = pattern(len, seed);
        f.write_all_at(&b, at).unwrap();
        content[at as usize..at as usize + len].copy_from_slice(&b);
    }
    content
}

fn convert(input: &Path, output: &Path, opts: &ConvertOptions) {
    vhdkit::convert(input, output, opts)
        .unwrap_or_else(|e| panic!("convert {}: {e}", input.display()));
}

fn to(target: Target) -> ConvertOptions {
    ConvertOptions::new(target).sync(false)
}

/// Asserts that a failed run said so in one line on stderr, naming `path`.
fn one_line_naming(r: &Run, path: &Path) {
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got: {:?}", r.stderr);
    assert!(
        lines[0].contains(&path.display().to_string()),
        "{:?} does not name {}",
        lines[0],
        path.display()
    );
}

// ---------------------------------------------------------------- compare

#[test]
fn compare_exit_status_and_first_offset() {
    let dir = tempdir();
    let raw = dir.path().join("a.raw");
    let content = sample_raw(&raw, 3 * MIB);
    let dynv = dir.path().join("a.vhd");
    convert(&raw, &dynv, &to(Target::Dynamic));
    let r = expect(0, &[&"compare", &raw, &dynv]);
    assert!(r.stdout.contains("identical"), "{}", r.stdout);

    // One byte changed, in a hole of the other side.
    let at = 2 * MIB + 12_345;
    let mut other = content.clone();
    other[at as usize] = 0x42;
    let b = dir.path().join("b.raw");
    std::fs::write(&b, &other).unwrap();
    let r = expect(1, &[&"compare", &dynv, &b]);
    assert!(r.stdout.contains(&format!("offset {at}")), "{}", r.stdout);
    let v = json(&expect(1, &[&"compare", &"--json", &b, &dynv]));
    assert_eq!(v["equal"], false);
    assert_eq!(v["first_difference"], at);
    assert_eq!(
        (v["size_a"].as_u64(), v["size_b"].as_u64()),
        (Some(3 * MIB), Some(3 * MIB))
    );

    // Sizes: a zero tail is equal unless --strict-size.
    let big = dir.path().join("big.raw");
    let mut longer = content.clone();
    longer.resize(4 * MIB as usize, 0);
    std::fs::write(&big, &longer).unwrap();
    let r = expect(0, &[&"compare", &raw, &big]);
    assert!(r.stdout.contains("identical"), "{}", r.stdout);
    let r = expect(1, &[&"compare", &"--strict-size", &raw, &big]);
    assert!(r.stdout.contains("sizes differ"), "{}", r.stdout);
    let v = json(&expect(
        1,
        &[&"compare", &"--strict-size", &"--json", &big, &raw],
    ));
    assert_eq!(v["first_difference"], 3 * MIB);
    // A non-zero tail differs at its first non-zero byte.
    longer[3 * MIB as usize + 777] = 1;
    std::fs::write(&big, &longer).unwrap();
    let r = expect(1, &[&"compare", &dynv, &big]);
    assert!(
        r.stdout.contains(&format!("offset {}", 3 * MIB + 777)),
        "{}",
        r.stdout
    );

    // Cannot run: a missing file, a missing argument.
    let missing = dir.path().join("missing.vhd");
    let r = expect(2, &[&"compare", &raw, &missing]);
    one_line_naming(&r, &missing);
    expect(2, &[&"compare", &raw]);
}

// ---------------------------------------------------------------- map

/// `map --json`: a list of {offset, length, data} (plus file and
/// file_offset on data) covering the disk, the same as the library's map.
#[test]
fn map_json_parses_and_matches_the_library() {
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw, 5 * MIB + 512);
    let dynv = dir.path().join("disk.vhd");
    convert(
        &raw,
        &dynv,
        &to(Target::Dynamic).block_size(512 * KIB as u32),
    );
    write_chain(dir.path());
    let chain = dir.path().join("hand-chain-grandchild.vhd");
    for path in [&raw, &dynv, &chain] {
        for scan in [true, false] {
            let r = if scan {
                expect(0, &[&"map", &"--json", path])
            } else {
                expect(0, &[&"map", &"--json", &"--no-scan", path])
            };
            let v = json(&r);
            assert_eq!(v["schema"], 1, "{v}");
            assert_eq!(v["path"].as_str(), path.to_str());
            let list = v["extents"].as_array().expect("a JSON list of extents");
            // One document, one extent per line.
            assert_eq!(r.stdout.lines().count(), list.len() + 7, "{}", r.stdout);
            let img = Image::open(path).unwrap();
            assert_eq!(v["virtual_size"].as_u64(), Some(img.virtual_size()));
            let want = vhdkit::ops::map(&img, scan).unwrap();
            assert_eq!(list.len(), want.len(), "{}", path.display());
            let mut pos = 0;
            for (e, w) in list.iter().zip(&want) {
                let o = e.as_object().expect("an object per extent");
                assert_eq!(o["offset"].as_u64(), Some(pos));
                assert_eq!(o["offset"].as_u64(), Some(w.offset));
                assert_eq!(o["length"].as_u64(), Some(w.length));
                assert_eq!(o["data"].as_bool(), Some(w.data));
                if w.data {
                    let file = o["file"].as_str().expect("data names its file");
                    assert_eq!(Path::new(file), w.file.as_deref().unwrap());
                    assert!(Path::new(file).exists(), "{file}");
                    assert_eq!(o["file_offset"].as_u64(), w.file_offset);
                } else {
                    assert!(
                        !o.contains_key("file") && !o.contains_key("file_offset"),
                        "{o:?}"
                    );
                }
                pos += w.length;
            }
            assert_eq!(pos, img.virtual_size());
        }
        // The table: a header, one line per extent, a summary.
        let r = expect(0, &[&"map", path]);
        assert!(r.stdout.lines().next().unwrap().contains("offset"));
        assert!(
            r.stdout.lines().last().unwrap().contains("extents"),
            "{}",
            r.stdout
        );
    }
    // The chain's data comes from all three files.
    let v = json(&expect(0, &[&"map", &"--json", &"--no-scan", &chain]));
    let files: std::collections::BTreeSet<String> = v["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["file"].as_str())
        .map(|f| {
            Path::new(f)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
}

// ---------------------------------------------------------------- checksum

#[test]
fn checksum_prints_crc_and_size() {
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    let content = sample_raw(&raw, 3 * MIB);
    let mut h = crc32fast::Hasher::new();
    h.update(&content);
    let want = format!("{:08x}", h.finalize());
    let fixed = dir.path().join("disk.vhd");
    convert(&raw, &fixed, &to(Target::Fixed));
    for p in [&raw, &fixed] {
        let r = expect(0, &[&"checksum", p]);
        let words: Vec<&str> = r.stdout.split_whitespace().collect();
        assert_eq!(
            words[..2],
            [want.as_str(), &(3 * MIB).to_string()],
            "{}",
            r.stdout
        );
        let v = json(&expect(0, &[&"checksum", &"--json", p]));
        assert_eq!(v["crc32"], want.as_str());
        assert_eq!(v["size"], 3 * MIB);
    }
}

// ---------------------------------------------------------------- sizes

/// `--size` takes bytes or a binary K/M/G/T suffix, and only whole bytes.
#[test]
fn sizes_accept_binary_units_and_refuse_the_rest() {
    let dir = tempdir();
    for (arg, bytes) in [
        ("1048576", MIB),
        ("512K", 512 * KIB),
        ("10M", 10 * MIB),
        ("1G", 1 << 30),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("0.5K", 512),
    ] {
        // Raw images take any size, sparse: a 2 TiB file costs nothing.
        let p = dir.path().join(format!("{arg}.raw"));
        std::fs::write(&p, pattern(512, 1)).unwrap();
        let r = expect(0, &[&"resize", &p, &"--size", &arg]);
        assert!(r.stdout.contains(&bytes.to_string()), "{arg}: {}", r.stdout);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), bytes, "--size {arg}");
        std::fs::remove_file(&p).unwrap();
    }
    // A fixed image: sizes are the virtual disk's.
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw, MIB);
    let fixed = dir.path().join("disk.vhd");
    convert(&raw, &fixed, &to(Target::Fixed));
    expect(0, &[&"resize", &fixed, &"--size", &"3M"]);
    assert_eq!(Image::open(&fixed).unwrap().virtual_size(), 3 * MIB);

    let p = dir.path().join("keep.raw");
    std::fs::write(&p, pattern(4096, 2)).unwrap();
    for bad in [
        "12X", "-5", "1.3K", "1.5", "", "M", "ten", "1e3", "2e1M", "1..5K",
    ] {
        for form in [
            vec!["--size".to_string(), bad.to_string()],
            vec![format!("--size={bad}")],
        ] {
            let mut args: Vec<&std::ffi::OsStr> = vec!["resize".as_ref(), p.as_os_str()];
            args.extend(form.iter().map(std::ffi::OsStr::new));
            let r = vhdkit(&args);
            assert_eq!(
                r.code, 2,
                "--size {bad:?} accepted: {}{}",
                r.stdout, r.stderr
            );
            assert!(!r.stderr.is_empty());
            if !bad.is_empty() && form.len() == 1 {
                assert!(r.stderr.contains(bad), "{bad}: {}", r.stderr);
            }
        }
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            4096,
            "{bad} changed the file"
        );
    }
    // The same parser serves --block-size.
    let out = dir.path().join("b.vhd");
    expect(
        0,
        &[
            &"convert",
            &raw,
            &out,
            &"--to",
            &"dynamic",
            &"--block-size",
            &"512K",
            &"-q",
        ],
    );
    assert_eq!(Image::open(&out).unwrap().block_size(), 512 * KIB);
    expect(
        2,
        &[
            &"convert",
            &raw,
            &out,
            &"--to",
            &"dynamic",
            &"--block-size",
            &"1.3K",
            &"--force",
        ],
    );
}

// ---------------------------------------------------------------- check

fn problems(v: &Value) -> &Vec<Value> {
    v["problems"].as_array().expect("problems is a list")
}

/// Every problem of `check --json` has the documented fields.
fn assert_problem_fields(v: &Value) {
    for p in problems(v) {
        let o = p.as_object().expect("a problem is an object");
        for k in ["severity", "structure", "field", "offset", "message"] {
            assert!(o.contains_key(k), "{k} missing from {o:?}");
        }
        assert!(
            matches!(o["severity"].as_str(), Some("error" | "warning")),
            "{o:?}"
        );
        assert!(!o["message"].as_str().unwrap().is_empty());
    }
}

#[test]
fn check_is_clean_on_testdata_images() {
    let dir = tempdir();
    for stored in [
        "example-dynamic.vhd",
        "qemu-dynamic-5M.vhd.gz",
        "qemu-fixed-3M.vhd.gz",
        "hand-dynamic-512k-blocks.vhd.gz",
    ] {
        let p = unpack(dir.path(), stored);
        let r = expect(0, &[&"check", &p]);
        assert!(
            r.stdout
                .trim_end()
                .ends_with("clean (0 errors, 0 warnings)"),
            "{stored}: {}",
            r.stdout
        );
        let v = json(&expect(0, &[&"check", &"--json", &p]));
        assert_eq!(v["clean"], true);
        assert!(problems(&v).is_empty(), "{stored}: {v}");
    }
    // Stale bytes under clear bitmap bits: clean, with a warning per block.
    let p = unpack(dir.path(), "hand-dynamic-partial-bitmaps.vhd.gz");
    let r = expect(0, &[&"check", &p]);
    assert!(
        r.stdout
            .trim_end()
            .ends_with("clean (0 errors, 3 warnings)"),
        "{}",
        r.stdout
    );
    write_chain(dir.path());
    expect(
        0,
        &[&"check", &dir.path().join("hand-chain-grandchild.vhd")],
    );
}

/// Byte offsets of a dynamic image's structures.
struct Layout {
    header: u64,
    table: u64,
    entries: Vec<u32>,
    footer: u64,
}

fn layout(p: &Path) -> Layout {
    let img = Image::open(p).unwrap();
    Layout {
        header: img.header_offset(),
        table: img.header().unwrap().table_offset,
        entries: img.bat().unwrap().entries.clone(),
        footer: img.data_end(),
    }
}

fn poke(p: &Path, at: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

fn damaged(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!("{name}.vhd"));
    std::fs::copy(dir.join("good.vhd"), &p).unwrap();
    p
}

/// The error lines of `check`'s table that mention `what` and carry `@ offset`.
fn error_at(r: &Run, what: &str, offset: u64) -> bool {
    r.stdout
        .lines()
        .any(|l| l.starts_with("error:") && l.contains(what) && l.contains(&format!("@ {offset}:")))
}

#[test]
fn check_reports_every_problem_of_a_damaged_image_with_its_offset() {
    let dir = tempdir();
    let good = unpack(dir.path(), "qemu-dynamic-5M.vhd.gz");
    std::fs::rename(&good, dir.path().join("good.vhd")).unwrap();
    let l = layout(&dir.path().join("good.vhd"));
    // Blocks 0 and 2 allocated, block 1 not.
    assert!(
        l.entries[0] != u32::MAX && l.entries[1] == u32::MAX && l.entries[2] != u32::MAX,
        "{:?}",
        l.entries
    );

    // A BAT entry pointing past the end of the file.
    let p = damaged(dir.path(), "bat-past-end");
    poke(&p, l.table + 8, &0x00ff_0000u32.to_be_bytes());
    let r = expect(1, &[&"check", &p]);
    assert!(error_at(&r, "BAT entry 2", l.table + 8), "{}", r.stdout);
    assert!(r.stdout.contains("PROBLEMS FOUND"));

    // The dynamic header's checksum.
    let p = damaged(dir.path(), "header-sum");
    poke(&p, l.header + 36, &[0, 0, 0, 0]);
    let r = expect(1, &[&"check", &p]);
    assert!(
        error_at(&r, "dynamic header", l.header + 36),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("checksum"), "{}", r.stdout);

    // The end footer's checksum: the copy at offset 0 is intact and used,
    // but the image is damaged all the same.
    let p = damaged(dir.path(), "footer-sum");
    poke(&p, l.footer + 64, &[0, 0, 0, 0]);
    let r = expect(1, &[&"check", &p]);
    assert!(error_at(&r, "footer", l.footer + 64), "{}", r.stdout);
    expect(0, &[&"info", &p]);

    // Two BAT entries naming the same block, and a damaged footer copy, in
    // one file: both reported.
    let p = damaged(dir.path(), "overlap-and-copy");
    poke(&p, l.table + 8, &l.entries[0].to_be_bytes());
    poke(&p, 30, b"X");
    let r = expect(1, &[&"check", &p]);
    let overlap = r
        .stdout
        .lines()
        .find(|l| l.starts_with("error: BAT entry") && l.contains("overlapping"))
        .unwrap_or_else(|| panic!("no overlap reported: {}", r.stdout));
    assert!(
        overlap.contains("block 0") && overlap.contains("block 2"),
        "{overlap}"
    );
    assert!(
        overlap.contains(&format!("@ {}:", l.table))
            || overlap.contains(&format!("@ {}:", l.table + 8)),
        "{overlap}"
    );
    assert!(error_at(&r, "footer copy", 64), "{}", r.stdout);
    assert!(r.stdout.contains("(2 errors"), "{}", r.stdout);
    let v = json(&expect(1, &[&"check", &"--json", &p]));
    assert_eq!(v["clean"], false);
    assert_eq!(v["format"], "dynamic");
    assert_problem_fields(&v);
    let ps = problems(&v);
    assert!(
        ps.iter().all(|x| x["offset"].is_u64()),
        "every problem has its offset: {v}"
    );
    assert!(ps
        .iter()
        .any(|x| x["structure"] == "footer copy" && x["field"] == "checksum" && x["offset"] == 64));
    assert!(ps.iter().any(|x| x["structure"]
        .as_str()
        .is_some_and(|s| s.starts_with("BAT entry"))
        && x["field"] == "block sector offset"
        && x["message"].as_str().unwrap().contains("overlapping")));

    // A BAT entry over the BAT itself.
    let p = damaged(dir.path(), "over-metadata");
    poke(&p, l.table, &((l.table / 512) as u32).to_be_bytes());
    let r = expect(1, &[&"check", &p]);
    assert!(error_at(&r, "BAT entry 0", l.table), "{}", r.stdout);
}

#[test]
fn check_azure_explains_in_plain_words() {
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw, 3 * MIB + 512);
    let dynv = dir.path().join("d.vhd");
    convert(&raw, &dynv, &to(Target::Dynamic));
    let r = expect(1, &[&"check", &"--azure", &dynv]);
    assert!(
        r.stdout.contains("Azure") && r.stdout.contains("fixed"),
        "{}",
        r.stdout
    );
    // Plain words: what is wrong and what to do.
    assert!(r.stdout.contains("--to fixed --azure"), "{}", r.stdout);
    expect(0, &[&"check", &dynv]);

    let fixed = dir.path().join("f.vhd");
    convert(&raw, &fixed, &to(Target::Fixed));
    let r = expect(1, &[&"check", &"--azure", &fixed]);
    assert!(
        r.stdout.contains("MiB") && r.stdout.contains(&(3 * MIB + 512).to_string()),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(&(4 * MIB).to_string()),
        "the next whole MiB: {}",
        r.stdout
    );
    let v = json(&expect(1, &[&"check", &"--azure", &"--json", &fixed]));
    assert_problem_fields(&v);
    assert!(problems(&v)
        .iter()
        .any(|p| p["severity"] == "error" && p["message"].as_str().unwrap().contains("MiB")));

    // Made for Azure: clean.
    let azure = dir.path().join("a.vhd");
    expect(
        0,
        &[
            &"convert", &raw, &azure, &"--to", &"fixed", &"--azure", &"-q",
        ],
    );
    expect(0, &[&"check", &"--azure", &azure]);
    // In place: the same.
    expect(
        0,
        &[
            &"convert",
            &"--in-place",
            &fixed,
            &"--to",
            &"fixed",
            &"--azure",
            &"-q",
        ],
    );
    expect(0, &[&"check", &"--azure", &fixed]);
    let v = json(&expect(0, &[&"info", &"--json", &fixed]));
    assert_eq!(v["virtual_size"], 4 * MIB);
}

// ---------------------------------------------------------------- info

#[test]
fn info_json_has_the_documented_fields() {
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw, 3 * MIB);
    let fixed = dir.path().join("f.vhd");
    convert(&raw, &fixed, &to(Target::Fixed));
    let dynv = dir.path().join("d.vhd");
    convert(
        &raw,
        &dynv,
        &to(Target::Dynamic).block_size(512 * KIB as u32),
    );
    write_chain(dir.path());
    let child = dir.path().join("hand-chain-grandchild.vhd");
    let is_date = |s: &str| {
        let b = s.as_bytes();
        s.len() == 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && s.ends_with('Z')
    };
    let is_uuid = |s: &str| {
        s.len() == 36 && s.split('-').map(str::len).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
    };
    for (path, format) in [
        (&raw, Format::Raw),
        (&fixed, Format::Fixed),
        (&dynv, Format::Dynamic),
        (&child, Format::Differencing),
    ] {
        let v = json(&expect(0, &[&"info", &"--json", path]));
        let img = Image::open(path).unwrap();
        assert_eq!(img.disk_type(), format);
        assert_eq!(v["format"], format.name());
        assert!(
            ["raw", "fixed", "dynamic", "differencing"].contains(&v["format"].as_str().unwrap())
        );
        assert_eq!(v["virtual_size"], img.virtual_size());
        assert_eq!(v["file_size"], img.file_len());
        if format == Format::Raw {
            assert!(
                v.get("geometry").is_none() && v.get("unique_id").is_none(),
                "{v}"
            );
            continue;
        }
        let f = img.footer().unwrap();
        assert_eq!(v["original_size"], f.original_size);
        let g = &v["geometry"];
        assert_eq!(g["cylinders"], f.geometry.cylinders);
        assert_eq!(g["heads"], f.geometry.heads);
        assert_eq!(g["sectors_per_track"], f.geometry.sectors);
        assert_eq!(
            g["size"].as_u64(),
            Some(
                u64::from(f.geometry.cylinders)
                    * u64::from(f.geometry.heads)
                    * u64::from(f.geometry.sectors)
                    * 512
            )
        );
        assert_eq!(v["creator"]["application"].as_str().unwrap().len(), 4);
        assert!(
            v["creator"]["version"].is_string() && v["creator"]["host_os"].is_string(),
            "{v}"
        );
        assert!(is_date(v["timestamp"].as_str().unwrap()), "{v}");
        assert!(is_uuid(v["unique_id"].as_str().unwrap()), "{v}");
        assert_eq!(v["unique_id"], f.unique_id.to_string());
        if format == Format::Fixed {
            assert!(v.get("block_size").is_none());
            continue;
        }
        assert_eq!(v["block_size"], img.block_size());
        assert_eq!(v["allocated_blocks"], img.allocated_blocks());
        assert_eq!(
            v["allocated_bytes"],
            img.allocated_blocks() * img.block_size()
        );
        assert_eq!(
            v["bat_entries"],
            u64::from(img.header().unwrap().max_table_entries)
        );
        if format == Format::Differencing {
            assert_eq!(v["parent"]["found"], true);
            assert!(is_uuid(v["parent"]["unique_id"].as_str().unwrap()));
            assert!(is_date(v["parent"]["timestamp"].as_str().unwrap()));
            let chain = v["chain"].as_array().unwrap();
            let names: Vec<String> = chain
                .iter()
                .map(|c| {
                    Path::new(c["path"].as_str().unwrap())
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            assert_eq!(names, ["hand-chain-child.vhd", "hand-chain-base.vhd"]);
            assert_eq!(chain[1]["format"], "dynamic");
            assert_eq!(chain[0]["unique_id"], v["parent"]["unique_id"]);
        }
    }
    // The human form says the same things.
    let r = expect(0, &[&"info", &child]);
    for word in [
        "differencing",
        "virtual size",
        "geometry",
        "creator",
        "unique id",
        "block size",
        "parent",
    ] {
        assert!(r.stdout.contains(word), "{word}: {}", r.stdout);
    }
    // A child whose parent is missing is still described, and says so.
    std::fs::remove_file(dir.path().join("hand-chain-base.vhd")).unwrap();
    let v = json(&expect(
        0,
        &[&"info", &"--json", &dir.path().join("hand-chain-child.vhd")],
    ));
    assert_eq!(v["parent"]["found"], false);
}

// ---------------------------------------------------------------- cannot run

/// A path that cannot be read: exit 2, one line on stderr naming it, for
/// every command.
#[test]
fn unreadable_paths_exit_2_with_one_line_naming_the_file() {
    let dir = tempdir();
    let missing = dir.path().join("no-such-image.vhd");
    let folder = dir.path().join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    let good = dir.path().join("good.raw");
    sample_raw(&good, MIB);
    let out = dir.path().join("out.vhd");
    for bad in [&missing, &folder] {
        let runs: Vec<Vec<&dyn AsRef<std::ffi::OsStr>>> = vec![
            vec![&"info", bad],
            vec![&"info", &"--json", bad],
            vec![&"check", bad],
            vec![&"check", &"--json", bad],
            vec![&"map", bad],
            vec![&"checksum", bad],
            vec![&"compare", bad, &good],
            vec![&"compare", &good, bad],
            vec![&"sparsify", bad],
            vec![&"resize", bad, &"--size", &"2M"],
            vec![&"convert", bad, &out, &"--to", &"fixed"],
            vec![&"convert", &"--in-place", bad, &"--to", &"fixed"],
        ];
        for args in runs {
            let r = expect(2, &args);
            one_line_naming(&r, bad);
            assert!(r.stdout.is_empty(), "{:?}", r.stdout);
        }
    }
    assert!(!out.exists());
    // Usage errors exit 2 too; --help and --version exit 0.
    expect(2, &[&"frobnicate"]);
    expect(2, &[&"info"]);
    expect(2, &[&"convert", &good, &out]);
    expect(0, &[&"--help"]);
    expect(0, &[&"--version"]);
}

// ---------------------------------------------------------------- the rest

#[test]
fn in_place_sparsify_and_resize_from_the_command_line() {
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    let content = sample_raw(&raw, 3 * MIB);
    let r = expect(0, &[&"convert", &"--in-place", &raw, &"--to", &"fixed"]);
    assert!(r.stdout.contains("fixed"), "{}", r.stdout);
    let img = Image::open(&raw).unwrap();
    assert_eq!(
        (img.disk_type(), img.virtual_size()),
        (Format::Fixed, 3 * MIB)
    );
    drop(img);
    expect(
        0,
        &[&"convert", &"--in-place", &raw, &"--to", &"raw", &"-q"],
    );
    assert!(std::fs::read(&raw).unwrap() == content);
    // Dynamic in place: refused, nothing changed. (Made from the raw
    // written whole, so that its all-zero blocks are allocated.)
    std::fs::write(&raw, &content).unwrap();
    let dynv = dir.path().join("d.vhd");
    convert(
        &raw,
        &dynv,
        &to(Target::Dynamic)
            .block_size(512 * KIB as u32)
            .sparse(false),
    );
    let before = std::fs::read(&dynv).unwrap();
    let r = expect(2, &[&"convert", &"--in-place", &dynv, &"--to", &"fixed"]);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(std::fs::read(&dynv).unwrap() == before);

    let v = json(&expect(0, &[&"sparsify", &"--json", &dynv]));
    assert!(v["zero_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(
        v["allocated_after"].as_u64() < v["allocated_before"].as_u64(),
        "{v}"
    );
    let a = expect(0, &[&"checksum", &raw]).stdout;
    let b = expect(0, &[&"checksum", &dynv]).stdout;
    assert_eq!(
        a.split_whitespace().take(2).collect::<Vec<_>>(),
        b.split_whitespace().take(2).collect::<Vec<_>>()
    );

    // Resize: grow, refuse to cut data (naming the offset), refuse a child.
    expect(0, &[&"resize", &dynv, &"--size", &"4M"]);
    assert_eq!(Image::open(&dynv).unwrap().virtual_size(), 4 * MIB);
    let r = expect(2, &[&"resize", &dynv, &"--size", &"2M", &"--shrink"]);
    assert!(
        r.stderr.contains(&(3 * MIB - 512).to_string()),
        "{}",
        r.stderr
    );
    expect(0, &[&"resize", &dynv, &"--size", &"3M", &"--shrink"]);
    write_chain(dir.path());
    let child = dir.path().join("hand-chain-grandchild.vhd");
    let r = expect(2, &[&"resize", &child, &"--size", &"8M"]);
    assert!(r.stderr.contains("differencing"), "{}", r.stderr);
    let r = expect(2, &[&"sparsify", &child]);
    assert!(r.stderr.contains("differencing"), "{}", r.stderr);
}

/// Output into a pipe whose reader has gone (`vhdkit map X | head -1`)
/// ends the command quietly instead of panicking.
#[test]
fn a_closed_pipe_ends_output_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let dir = tempdir();
    // A raw image whose map has many extents: one data page in every 8 KiB.
    let raw = dir.path().join("striped.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(8 << 20).unwrap();
    for i in 0..1024u64 {
        f.write_all_at(&[1u8; 4096], i * 8192).unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_vhdkit"))
        .arg("map")
        .arg(&raw)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one byte, then hang up.
    let mut one = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut one).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// qemu-img reads the geometry's size, not the current size, from images
/// whose creator is `qemu` or `vpc `: a resize names vhdkit as creator, so
/// qemu-img and vhdkit agree on the new size.
#[test]
fn resized_qemu_images_read_at_their_new_size_in_qemu() {
    let qemu = std::env::var_os("VHDKIT_QEMU_IMG").unwrap_or_else(|| "qemu-img".into());
    let dir = tempdir();
    for (stored, new) in [
        ("qemu-dynamic-5M.vhd.gz", 8u64 << 20),
        ("qemu-fixed-3M.vhd.gz", 5 << 20),
    ] {
        let img = unpack(dir.path(), stored);
        expect(0, &[&"resize", &img, &"--size", &new.to_string()]);
        let out = Command::new(&qemu)
            .args(["info", "-f", "vpc", "--output=json"])
            .arg(&img)
            .output()
            .unwrap_or_else(|e| panic!("QEMU-IMG IS MISSING ({e}): install qemu-utils"));
        let v: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
        assert_eq!(v["virtual-size"].as_u64(), Some(new), "{stored}");
        let info = json(&expect(0, &[&"info", &"--json", &img]));
        assert_eq!(info["virtual_size"].as_u64(), Some(new));
        assert_eq!(info["creator"]["application"], "vhdk");
    }
}

// ---------------------------------------------------------------- messages and hints

/// Asserts that nothing the CLI printed names a library item.
fn names_no_library_item(r: &Run) {
    for out in [&r.stdout, &r.stderr] {
        for item in ["Options::", "Error::", "ConvertOptions", "OpenOptions"] {
            assert!(!out.contains(item), "names {item}: {out}");
        }
    }
}

/// The CLI adds the flag that can help after an error, and only then: a bad
/// checksum advises --ignore-checksums (not when it was given), a missing
/// parent --parent (not when the file found has another unique id), an
/// existing output --force.
#[test]
fn hints_fit_the_command_that_ran() {
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw, 2 * MIB);
    let fixed = dir.path().join("f.vhd");
    convert(&raw, &fixed, &to(Target::Fixed));
    // The creator application, covered by the footer checksum only.
    poke(&fixed, 2 * MIB + 28, b"XXXX");
    let r = expect(2, &[&"info", &fixed]);
    assert!(r.stderr.contains("add --ignore-checksums"), "{}", r.stderr);
    names_no_library_item(&r);
    // Asked for already: not advised again, anywhere in the output.
    let r = vhdkit([
        "check".as_ref(),
        "--ignore-checksums".as_ref(),
        fixed.as_os_str(),
    ]);
    assert!(r.code == 0 || r.code == 1, "{}", r.stderr);
    assert!(r.stdout.contains("checksum"), "{}", r.stdout);
    assert!(
        !r.stdout.contains("--ignore") && !r.stderr.contains("--ignore"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    names_no_library_item(&r);
    let r = expect(0, &[&"info", &"--ignore-checksums", &fixed]);
    assert!(!r.stdout.contains("--ignore"), "{}", r.stdout);

    // A parent that is missing: name it.
    let chain = dir.path().join("chain");
    std::fs::create_dir(&chain).unwrap();
    write_chain(&chain);
    let child = chain.join("hand-chain-child.vhd");
    let base = chain.join("hand-chain-base.vhd");
    let kept = dir.path().join("kept-base.vhd");
    std::fs::rename(&base, &kept).unwrap();
    let r = expect(2, &[&"checksum", &child]);
    assert!(r.stderr.contains("--parent FILE"), "{}", r.stderr);
    names_no_library_item(&r);
    let r = expect(0, &[&"info", &child]);
    assert!(r.stdout.contains("NOT FOUND (use --parent"), "{}", r.stdout);
    expect(0, &[&"checksum", &child, &"--parent", &kept]);
    // A file of the parent's name with another unique id: naming a file
    // cannot help, so it is not advised.
    convert(&raw, &base, &to(Target::Dynamic));
    let r = expect(2, &[&"checksum", &child]);
    assert!(r.stderr.contains("unique id"), "{}", r.stderr);
    assert!(!r.stderr.contains("--parent"), "{}", r.stderr);
    names_no_library_item(&r);
    let r = expect(2, &[&"checksum", &child, &"--parent", &base]);
    assert!(!r.stderr.contains("--parent"), "{}", r.stderr);
    let r = expect(0, &[&"info", &child]);
    assert!(r.stdout.contains("NOT FOUND"), "{}", r.stdout);
    assert!(!r.stdout.contains("use --parent"), "{}", r.stdout);

    // An existing output: --force, in the CLI's words only.
    let out = dir.path().join("out.vhd");
    std::fs::write(&out, b"keep").unwrap();
    let r = expect(2, &[&"convert", &raw, &out, &"--to", &"dynamic", &"-q"]);
    assert!(r.stderr.contains("add --force"), "{}", r.stderr);
    names_no_library_item(&r);
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");

    // Azure advice comes from the CLI, naming its own command.
    let dynv = dir.path().join("d.vhd");
    convert(&raw, &dynv, &to(Target::Dynamic));
    let r = expect(1, &[&"check", &"--azure", &dynv]);
    assert!(r.stdout.contains("--to fixed --azure"), "{}", r.stdout);
    names_no_library_item(&r);
    let r = expect(0, &[&"check", &dynv]);
    assert!(!r.stdout.contains("--"), "{}", r.stdout);
}

/// Flags that do not fit the output type are errors, not ignored.
#[test]
fn flags_that_do_not_apply_are_refused() {
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw, 2 * MIB);
    let out = dir.path().join("out");
    for to in ["raw", "fixed"] {
        let r = expect(
            2,
            &[&"convert", &raw, &out, &"--to", &to, &"--block-size", &"1M"],
        );
        assert!(r.stderr.contains("--block-size"), "{}", r.stderr);
        assert!(!out.exists());
    }
    let r = expect(
        2,
        &[
            &"convert",
            &"--in-place",
            &raw,
            &"--to",
            &"fixed",
            &"--block-size",
            &"1M",
        ],
    );
    assert!(r.stderr.contains("--block-size"), "{}", r.stderr);
    let r = expect(
        2,
        &[&"convert", &raw, &out, &"--to", &"dynamic", &"--azure"],
    );
    assert!(
        r.stderr.contains("--azure goes with --to fixed"),
        "{}",
        r.stderr
    );
    assert!(!out.exists());
    // Flags an in-place conversion cannot honour, and a new disk's
    // --parent-dir without a parent, are refused; the image is untouched.
    let before = std::fs::read(&raw).unwrap();
    for flag in ["--force", "--no-sync", "--no-sparse"] {
        let r = expect(
            2,
            &[&"convert", &"--in-place", &raw, &"--to", &"fixed", &flag],
        );
        assert!(
            r.stderr.contains("do not go with --in-place"),
            "{flag}: {}",
            r.stderr
        );
    }
    assert!(std::fs::read(&raw).unwrap() == before);
    let new = dir.path().join("new.vhd");
    let r = expect(
        2,
        &[
            &"create",
            &new,
            &"--size",
            &"1M",
            &"--parent-dir",
            &dir.path(),
        ],
    );
    assert!(
        r.stderr.contains("--parent-dir goes with --parent"),
        "{}",
        r.stderr
    );
    assert!(!new.exists());
    // Standard input is read only by an upload.
    let r = expect(2, &[&"convert", &"-", &out, &"--to", &"raw"]);
    assert!(r.stderr.contains("blob URL"), "{}", r.stderr);
    assert!(!out.exists());
    expect(
        0,
        &[
            &"convert",
            &raw,
            &out,
            &"--to",
            &"dynamic",
            &"--block-size",
            &"1M",
            &"-q",
        ],
    );
    assert_eq!(Image::open(&out).unwrap().block_size(), MIB);
}

/// `--threads` is capped; above the cap it is an error before any work, in
/// the library and on the command line (exit 2).
#[test]
fn threads_above_the_cap_are_refused() {
    let cap = vhdkit::convert::max_threads();
    assert!(cap >= 256, "{cap}");
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw, MIB);
    let out = dir.path().join("out.vhd");
    match vhdkit::convert(&raw, &out, &to(Target::Fixed).threads(cap + 1)) {
        Err(vhdkit::Error::InvalidOption {
            option: "threads",
            value,
            message,
            ..
        }) => {
            assert_eq!(value, (cap + 1).to_string());
            assert!(message.contains(&cap.to_string()), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!out.exists());
    for n in [cap + 1, 100_000] {
        let started = std::time::Instant::now();
        let r = expect(
            2,
            &[
                &"convert",
                &raw,
                &out,
                &"--to",
                &"fixed",
                &"--threads",
                &n.to_string(),
            ],
        );
        assert!(
            r.stderr.contains("threads") && r.stderr.contains(&cap.to_string()),
            "{}",
            r.stderr
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(!out.exists());
    }
    expect(
        0,
        &[
            &"convert",
            &raw,
            &out,
            &"--to",
            &"fixed",
            &"--threads",
            &"256",
            &"-q",
        ],
    );
}

// ---------------------------------------------------------------- JSON documents

/// Every command's JSON is one document in one style: an object, `schema`
/// 1 on its second line, one field per line. Each names the files it is
/// about.
#[test]
fn every_json_document_has_the_schema_and_the_shared_style() {
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw, 3 * MIB);
    let dynv = dir.path().join("d.vhd");
    let fixed = dir.path().join("f.vhd");
    let conv = dir.path().join("c.vhd");
    convert(&raw, &fixed, &to(Target::Fixed));
    convert(&raw, &dynv, &to(Target::Dynamic));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let runs: Vec<(Run, Vec<(&str, String)>)> = vec![
        (
            expect(0, &[&"info", &"--json", &dynv]),
            vec![("path", s(&dynv))],
        ),
        (
            expect(0, &[&"check", &"--json", &dynv]),
            vec![("path", s(&dynv))],
        ),
        (
            expect(0, &[&"map", &"--json", &dynv]),
            vec![("path", s(&dynv))],
        ),
        (
            expect(0, &[&"checksum", &"--json", &dynv]),
            vec![("path", s(&dynv))],
        ),
        (
            expect(0, &[&"compare", &"--json", &raw, &dynv]),
            vec![("a", s(&raw)), ("b", s(&dynv))],
        ),
        (
            expect(
                0,
                &[&"convert", &"--json", &raw, &conv, &"--to", &"dynamic"],
            ),
            vec![("input", s(&raw)), ("output", s(&conv))],
        ),
        (
            expect(
                0,
                &[
                    &"convert",
                    &"--json",
                    &"--in-place",
                    &fixed,
                    &"--to",
                    &"raw",
                ],
            ),
            vec![("image", s(&fixed))],
        ),
        (
            expect(0, &[&"sparsify", &"--json", &dynv]),
            vec![("path", s(&dynv))],
        ),
        (
            expect(0, &[&"resize", &"--json", &dynv, &"--size", &"4M"]),
            vec![("image", s(&dynv))],
        ),
    ];
    for (r, paths) in &runs {
        let v = json(r);
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(lines[0], "{", "{}", r.stdout);
        assert_eq!(lines[1], "  \"schema\": 1,", "{}", r.stdout);
        assert_eq!(*lines.last().unwrap(), "}", "{}", r.stdout);
        assert_eq!(v["schema"], 1);
        // One field per line: as many lines at two spaces as fields.
        let fields = lines
            .iter()
            .filter(|l| l.starts_with("  \"") && !l.starts_with("   "))
            .count();
        assert_eq!(fields, v.as_object().unwrap().len(), "{}", r.stdout);
        for (k, want) in paths {
            assert_eq!(v[*k].as_str(), Some(want.as_str()), "{k}: {}", r.stdout);
            assert!(v.get(format!("{k}_bytes")).is_none(), "{}", r.stdout);
        }
    }
    let checksum = json(&runs[3].0);
    assert!(checksum["crc32"].is_string() && checksum["size"] == 3 * MIB);
}

/// A file name that is not UTF-8 comes out in JSON as a string with U+FFFD
/// and, beside it, its exact bytes (`path_bytes`, `file_bytes`...), which
/// open the file.
#[test]
fn names_that_are_not_utf8_are_carried_as_bytes() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = tempdir();
    let name = |b: &[u8]| dir.path().join(OsStr::from_bytes(b));
    let raw = name(b"disk-\xff\xfe.raw");
    sample_raw(&raw, 2 * MIB);
    let vhd = name(b"out-\x80.vhd");
    let bytes_of = |v: &Value, key: &str| -> Vec<u8> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} in {v}"))
            .iter()
            .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
            .collect()
    };
    let check_path = |v: &Value, key: &str, want: &Path| {
        let got = bytes_of(v, &format!("{key}_bytes"));
        assert_eq!(got, want.as_os_str().as_bytes(), "{key}");
        assert!(Path::new(OsStr::from_bytes(&got)).exists());
        assert_eq!(
            v[key].as_str().unwrap(),
            want.to_string_lossy(),
            "{key}: the string stays, lossy"
        );
    };
    let v = json(&expect(
        0,
        &[&"convert", &"--json", &raw, &vhd, &"--to", &"dynamic"],
    ));
    check_path(&v, "input", &raw);
    check_path(&v, "output", &vhd);
    for args in [
        vec!["info", "--json"],
        vec!["check", "--json"],
        vec!["checksum", "--json"],
        vec!["map", "--json"],
        vec!["sparsify", "--json"],
    ] {
        let mut a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        a.push(vhd.as_os_str());
        let r = vhdkit(&a);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        let v = json(&r);
        check_path(&v, "path", &vhd);
        if args[0] == "map" {
            let extents = v["extents"].as_array().unwrap();
            let data: Vec<&Value> = extents.iter().filter(|e| e["data"] == true).collect();
            assert!(!data.is_empty());
            for e in data {
                check_path(e, "file", &vhd);
            }
        }
    }
    let v = json(&expect(0, &[&"compare", &"--json", &raw, &vhd]));
    check_path(&v, "a", &raw);
    check_path(&v, "b", &vhd);
    // A chain whose parent's name is not UTF-8.
    write_chain(dir.path());
    let child = dir.path().join("hand-chain-child.vhd");
    let base = name(b"base-\xff.vhd");
    std::fs::rename(dir.path().join("hand-chain-base.vhd"), &base).unwrap();
    let v = json(&expect(
        0,
        &[&"info", &"--json", &child, &"--parent", &base],
    ));
    check_path(&v["chain"][0], "path", &base);
    let v = json(&expect(
        0,
        &[&"map", &"--json", &"--no-scan", &child, &"--parent", &base],
    ));
    assert!(v["extents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e.get("file_bytes").is_some()));
    let v = json(&expect(
        0,
        &[
            &"convert",
            &"--json",
            &"--in-place",
            &raw,
            &"--to",
            &"fixed",
        ],
    ));
    check_path(&v, "image", &raw);
}

// ---------------------------------------------------------------- map streams

/// A dynamic image (made by converting non-zero data) whose sector bitmaps
/// are rewritten to alternate set and clear: one extent per sector.
pub(crate) fn alternating_bitmaps(path: &Path, size: u64) {
    let raw = path.with_extension("raw");
    std::fs::write(&raw, pattern(size as usize, 9)).unwrap();
    convert(
        &raw,
        path,
        &to(Target::Dynamic).block_size(512 * KIB as u32),
    );
    std::fs::remove_file(&raw).unwrap();
    let img = Image::open(path).unwrap();
    let (bm, entries) = (img.bitmap_size(), img.bat().unwrap().entries.clone());
    drop(img);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for e in entries.into_iter().filter(|&e| e != u32::MAX) {
        f.write_all_at(&vec![0xaa; bm as usize], u64::from(e) * 512)
            .unwrap();
    }
}

/// `ops::map_each` hands over the same extents as `ops::map`, in order,
/// with and without the zero scan, and stops at the callback's error.
#[test]
fn map_each_streams_the_same_extents_as_map() {
    let dir = tempdir();
    let vhd = dir.path().join("alt.vhd");
    alternating_bitmaps(&vhd, 4 * MIB);
    let img = Image::open(&vhd).unwrap();
    for scan in [true, false] {
        let all = vhdkit::ops::map(&img, scan).unwrap();
        // One sector of data, one of zero, throughout.
        assert_eq!(all.len() as u64, 4 * MIB / 512, "scan {scan}");
        assert!(all.iter().all(|e| e.length == 512));
        assert!(all.iter().step_by(2).all(|e| e.data));
        let mut streamed = Vec::new();
        vhdkit::ops::map_each(&img, scan, |e| {
            streamed.push(e);
            Ok(())
        })
        .unwrap();
        assert_eq!(streamed, all);
        let mut n = 0;
        let r = vhdkit::ops::map_each(&img, scan, |_| {
            n += 1;
            if n == 10 {
                Err(vhdkit::Error::invalid_option("test", "", "enough"))
            } else {
                Ok(())
            }
        });
        assert!(matches!(
            r,
            Err(vhdkit::Error::InvalidOption { option: "test", .. })
        ));
        assert_eq!(n, 10);
    }
    // Across windows, adjacent extents of one kind are merged: a sparse
    // raw disk larger than a window maps to few extents.
    let raw = dir.path().join("big.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(200 * MIB).unwrap();
    f.write_all_at(&[1u8; 4096], 100 * MIB).unwrap();
    let img = Image::open(&raw).unwrap();
    let mut v = Vec::new();
    vhdkit::ops::map_each(&img, true, |e| {
        v.push((e.offset, e.length, e.data));
        Ok(())
    })
    .unwrap();
    assert_eq!(
        v,
        vec![
            (0, 100 * MIB, false),
            (100 * MIB, 4096, true),
            (100 * MIB + 4096, 100 * MIB - 4096, false)
        ]
    );
    // The CLI's document holds every extent, one per line.
    let r = expect(0, &[&"map", &"--json", &vhd]);
    let doc = json(&r);
    assert_eq!(
        doc["extents"].as_array().unwrap().len() as u64,
        4 * MIB / 512
    );
}

// ---------------------------------------------------------------- progress

#[derive(Default)]
struct Recorder {
    starts: std::sync::Mutex<Vec<u64>>,
    advanced: std::sync::atomic::AtomicU64,
    written: std::sync::atomic::AtomicU64,
}

impl vhdkit::Progress for Recorder {
    fn start(&self, total: u64) {
        self.starts.lock().unwrap().push(total);
    }
    fn advance(&self, bytes: u64) {
        self.advanced
            .fetch_add(bytes, std::sync::atomic::Ordering::SeqCst);
    }
    fn written(&self, bytes: u64) {
        self.written
            .fetch_add(bytes, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The advances of a conversion add up to the virtual size exactly (so the
/// bar reaches 100 %), for raw, fixed, dynamic and sparse inputs into every
/// target; `written` adds up to the data written.
#[test]
fn progress_reaches_the_virtual_size_and_counts_what_was_written() {
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;
    let dir = tempdir();
    // Not a whole number of blocks or windows: a tail region too.
    let size = 9 * MIB + 4096;
    let sparse = dir.path().join("sparse.raw");
    let content = sample_raw(&sparse, size);
    // The same content written out whole: zeros the map calls data.
    let whole = dir.path().join("whole.raw");
    std::fs::write(&whole, &content).unwrap();
    let fixed = dir.path().join("f.vhd");
    convert(&whole, &fixed, &to(Target::Fixed));
    let dynv = dir.path().join("d.vhd");
    convert(&sparse, &dynv, &to(Target::Dynamic));
    let alt = dir.path().join("alt.vhd");
    alternating_bitmaps(&alt, 2 * MIB);
    let nonzero = content.iter().filter(|&&b| b != 0).count() as u64;
    for input in [&sparse, &whole, &fixed, &dynv, &alt] {
        let vsize = Image::open(input).unwrap().virtual_size();
        for target in [Target::Raw, Target::Fixed, Target::Dynamic] {
            for sparse_out in [true, false] {
                let rec = Arc::new(Recorder::default());
                let out = dir.path().join("out");
                let r = vhdkit::convert(
                    input,
                    &out,
                    &to(target)
                        .sparse(sparse_out)
                        .overwrite(true)
                        .progress(rec.clone()),
                )
                .unwrap();
                let what = format!("{} -> {target:?} sparse {sparse_out}", input.display());
                assert_eq!(*rec.starts.lock().unwrap(), vec![vsize], "{what}");
                assert_eq!(rec.advanced.load(SeqCst), vsize, "{what}");
                let written = rec.written.load(SeqCst);
                assert_eq!(written, r.virtual_size - r.bytes_skipped, "{what}");
                assert!(written <= vsize, "{what}");
                if input != &alt {
                    assert!(written >= nonzero, "{what}: {written} < {nonzero}");
                    if sparse_out {
                        assert!(written < vsize / 4, "{what}: {written}");
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- ranges

/// A dynamic footer whose data offset points into a file too short for any
/// header: the expected value is not an empty range ("between 512 and 0").
#[test]
fn errors_state_real_ranges() {
    let dir = tempdir();
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw, 2 * MIB);
    let dynv = dir.path().join("d.vhd");
    convert(&raw, &dynv, &to(Target::Dynamic));
    let full = std::fs::read(&dynv).unwrap();
    // Header offset past the end, in files of several lengths: the footer
    // alone (the copy in front cut off), one sector, three sectors.
    let mut f = Image::open(&dynv).unwrap().footer().unwrap().clone();
    f.data_offset = 1 << 20;
    let bad = f.to_bytes();
    for before in [0usize, 512, 1536] {
        let mut v = vec![0u8; before];
        v.extend_from_slice(&bad);
        let p = dir.path().join(format!("short-{before}.vhd"));
        std::fs::write(&p, &v).unwrap();
        let e = match Image::open(&p) {
            Err(vhdkit::Error::Corrupt(c)) => c,
            other => panic!("{before}: {other:?}"),
        };
        assert_eq!(e.field, "data offset", "{e}");
        check_ranges(&e.expected);
        if before < 1536 {
            assert!(!e.expected.contains("between"), "{before}: {e}");
        } else {
            assert!(e.expected.contains("between 512 and 512"), "{e}");
        }
    }
    // A BAT that fits nowhere: the table offset's expectation is no range
    // either.
    let img = Image::open(&dynv).unwrap();
    let mut h = img.header().unwrap().clone();
    drop(img);
    h.max_table_entries = 1 << 20;
    let mut v = full.clone();
    v[512..1536].copy_from_slice(&h.to_bytes());
    let p = dir.path().join("big-bat.vhd");
    std::fs::write(&p, &v).unwrap();
    let r = vhdkit(["info".as_ref(), p.as_os_str()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("table offset"), "{}", r.stderr);
    assert!(r.stderr.contains("4194304 bytes of BAT"), "{}", r.stderr);
    check_ranges(&r.stderr);
    assert!(!r.stderr.contains("between"), "{}", r.stderr);
}

/// Every "between A and B" in `msg` has A <= B.
fn check_ranges(msg: &str) {
    let mut rest = msg;
    while let Some(i) = rest.find("between ") {
        rest = &rest[i + 8..];
        let words: Vec<&str> = rest.split_whitespace().take(3).collect();
        if let (Some(a), Some("and"), Some(b)) = (
            words.first().and_then(|w| w.parse::<u64>().ok()),
            words.get(1).copied(),
            words.get(2).and_then(|w| {
                w.trim_matches(|c: char| !c.is_ascii_digit())
                    .parse::<u64>()
                    .ok()
            }),
        ) {
            assert!(a <= b, "an empty range in {msg:?}");
        }
    }
}
