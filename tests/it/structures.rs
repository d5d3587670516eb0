//! The on-disk structures against real bytes: every footer, dynamic header,
//! parent locator, BAT and sector bitmap of the shared corpus is decoded and
//! compared with the values `MANIFEST.md` records for it, and `to_bytes`
//! must give the original bytes back wherever they are canonical (checksum
//! valid, reserved bytes zero). Property tests then check the round trips
//! `parse(to_bytes(x)) == x` and the geometry algorithm's invariants.
//!
//! The corpus lives at `../shared/corpus` beside the crate. Without it these
//! tests fail: they never pass vacuously.

use proptest::prelude::*;
use std::collections::HashMap;
use std::io::Read;
use vhdkit::error::Structure;
use vhdkit::ondisk::{
    bitmap_size, Bat, DiskType, DynamicHeader, Footer, Geometry, ParentLocator, PlatformCode,
    SectorBitmap, Timestamp, Uuid, FOOTER_SIZE, HEADER_SIZE, SECTOR, UNALLOCATED,
};

// ---------------------------------------------------------------------------
// Corpus access
// ---------------------------------------------------------------------------

use crate::common::corpus as corpus_dir;

fn corpus_file(rel: &str) -> Vec<u8> {
    let p = corpus_dir().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("corpus file {} unreadable: {e}", p.display()))
}

/// An image held in memory as its non-zero 64 KiB chunks, so that the
/// 252 MiB Disk2vhd image costs a few MiB.
struct Sparse {
    len: u64,
    chunks: HashMap<u64, Vec<u8>>,
}

const CHUNK: u64 = 64 << 10;

impl Sparse {
    fn load(rel: &str) -> Sparse {
        let p = corpus_dir().join(rel);
        let f = std::fs::File::open(&p)
            .unwrap_or_else(|e| panic!("corpus file {} unreadable: {e}", p.display()));
        let mut src: Box<dyn Read> = if rel.ends_with(".gz") {
            Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)))
        } else {
            Box::new(std::io::BufReader::new(f))
        };
        let mut chunks = HashMap::new();
        let mut len = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK as usize];
            let mut got = 0;
            while got < buf.len() {
                let n = src
                    .read(&mut buf[got..])
                    .unwrap_or_else(|e| panic!("{rel}: {e}"));
                if n == 0 {
                    break;
                }
                got += n;
            }
            buf.truncate(got);
            if buf.iter().any(|&b| b != 0) {
                chunks.insert(len / CHUNK, buf);
            }
            len += got as u64;
            if (got as u64) < CHUNK {
                break;
            }
        }
        Sparse { len, chunks }
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        assert!(
            offset + len as u64 <= self.len,
            "read {offset}+{len} past the image's {} bytes",
            self.len
        );
        let mut out = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let (idx, within) = (pos / CHUNK, (pos % CHUNK) as usize);
            let n = (CHUNK as usize - within).min(len - done);
            if let Some(c) = self.chunks.get(&idx) {
                out[done..done + n].copy_from_slice(&c[within..within + n]);
            }
            done += n;
        }
        out
    }

    fn array<const N: usize>(&self, offset: u64) -> [u8; N] {
        self.read(offset, N).try_into().unwrap()
    }
}

// ---------------------------------------------------------------------------
// MANIFEST.md, read as data
// ---------------------------------------------------------------------------

/// What the manifest says about one image.
#[derive(Debug, Default)]
struct Entry {
    file: String,
    footer: String,
    footer_copy_identical: bool,
    header: Option<String>,
    bat: Option<String>,
    locators: Option<String>,
}

fn manifest() -> Vec<Entry> {
    let text = String::from_utf8(corpus_file("MANIFEST.md")).unwrap();
    let mut out: Vec<Entry> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("### ") {
            // "### 4. `dfvfs__fat-differential.vhd`"
            if let Some(name) = rest.split('`').nth(1) {
                if rest
                    .split('.')
                    .next()
                    .is_some_and(|n| n.parse::<u32>().is_ok())
                {
                    out.push(Entry {
                        file: name.to_string(),
                        ..Entry::default()
                    });
                }
            }
            continue;
        }
        let Some(e) = out.last_mut() else { continue };
        if let Some(v) = line.strip_prefix("* **Footer:** ") {
            e.footer = v.to_string();
        } else if line.starts_with("* **Footer copy at offset 0:** identical") {
            e.footer_copy_identical = true;
        } else if let Some(v) = line.strip_prefix("* **Dynamic header @512:** ") {
            e.header = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("* **BAT:** ") {
            e.bat = Some(v.to_string());
        } else if line.contains("parent locator(s):") {
            e.locators = Some(
                line.split("parent locator(s):")
                    .nth(1)
                    .unwrap()
                    .trim()
                    .to_string(),
            );
        }
    }
    out
}

/// The value after `key ` in a comma- or semicolon-separated description,
/// up to the next space, comma, semicolon or parenthesis.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let pat = format!("{key} ");
    let start = line
        .match_indices(&pat)
        .map(|(i, _)| i)
        .find(|&i| i == 0 || line[..i].ends_with(", ") || line[..i].ends_with("; "))
        .unwrap_or_else(|| panic!("no {key:?} in manifest line {line:?}"));
    let rest = &line[start + pat.len()..];
    let end = rest.find([' ', ',', ';', '(', ')']).unwrap_or(rest.len());
    &rest[..end]
}

fn num(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => s.parse().unwrap_or_else(|_| panic!("not a number: {s:?}")),
    }
}

/// Undoes Python's string escapes as the manifest prints them (`\x00`, `\\`).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            out.push(u8::from_str_radix(&s[i + 2..i + 4], 16).unwrap());
            i += 4;
        } else if b[i] == b'\\' && b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The text between `open` (which follows `key`) and `close`.
fn quoted<'a>(line: &'a str, key: &str, open: char, close: char) -> &'a str {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"));
    let rest = &line[at + key.len()..];
    let rest = rest.trim_start().strip_prefix(open).unwrap();
    &rest[..rest.find(close).unwrap()]
}

fn chs(s: &str) -> Geometry {
    let v: Vec<u64> = s.split('/').map(num).collect();
    Geometry {
        cylinders: v[0] as u16,
        heads: v[1] as u8,
        sectors: v[2] as u8,
    }
}

fn uuid(s: &str) -> Uuid {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    assert_eq!(hex.len(), 32, "{s}");
    let mut b = [0u8; 16];
    for (i, x) in b.iter_mut().enumerate() {
        *x = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    Uuid(b)
}

/// "0xffffee6f (OK)" or "0xfffff683 (MISMATCH, computed 0xffffef25)":
/// (stored, computed).
fn checksum_claim(line: &str) -> (u32, u32) {
    let stored = field(line, "checksum");
    let tail = line.split(&format!("checksum {stored} (")).nth(1).unwrap();
    let stored = num(stored) as u32;
    if tail.starts_with("OK)") {
        (stored, stored)
    } else {
        assert!(tail.starts_with("MISMATCH, computed "), "{line}");
        let computed = tail["MISMATCH, computed ".len()..]
            .split(')')
            .next()
            .unwrap();
        (stored, num(computed) as u32)
    }
}

// ---------------------------------------------------------------------------
// Every image of the corpus, field by field
// ---------------------------------------------------------------------------

fn check_footer(name: &str, line: &str, raw: &[u8; FOOTER_SIZE], at: u64) -> Footer {
    let f = Footer::parse(raw, at, Structure::Footer)
        .unwrap_or_else(|e| panic!("{name}: footer does not parse: {e}"));
    let ctx = |what: &str| format!("{name}: footer {what}");
    assert_eq!(
        f.features,
        num(field(line, "features")) as u32,
        "{}",
        ctx("features")
    );
    assert_eq!(
        f.format_version,
        num(field(line, "format version")) as u32,
        "{}",
        ctx("format version")
    );
    assert_eq!(
        f.data_offset,
        num(field(line, "data offset")),
        "{}",
        ctx("data offset")
    );
    assert_eq!(
        f.timestamp.0 as u64,
        num(field(line, "timestamp")),
        "{}",
        ctx("timestamp")
    );
    // The manifest prints the date too: our Display must agree to the second.
    let date = quoted(line, &format!("timestamp {}", f.timestamp.0), '(', ')');
    assert_eq!(
        f.timestamp.to_string(),
        date.replace("+00:00", "Z"),
        "{}",
        ctx("timestamp as a date")
    );
    let creator = unescape(quoted(line, "creator", '\'', '\''));
    assert_eq!(
        f.creator_app.to_vec(),
        creator,
        "{}",
        ctx("creator application")
    );
    let ver = line
        .split("' ver ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(
        f.creator_version_string(),
        ver,
        "{}",
        ctx("creator version")
    );
    let host = unescape(quoted(line, " host", '`', '`'));
    assert_eq!(
        f.creator_host_os.to_vec(),
        host,
        "{}",
        ctx("creator host OS")
    );
    assert_eq!(
        f.original_size,
        num(field(line, "original size")),
        "{}",
        ctx("original size")
    );
    assert_eq!(
        f.current_size,
        num(field(line, "current size")),
        "{}",
        ctx("current size")
    );
    let g = chs(field(line, "CHS"));
    assert_eq!(f.geometry, g, "{}", ctx("geometry"));
    let bytes = line.split("(= ").nth(1).unwrap().split(' ').next().unwrap();
    assert_eq!(f.geometry.size(), num(bytes), "{}", ctx("geometry size"));
    let spec = line.split("the spec algorithm gives ").nth(1).unwrap();
    let spec = chs(spec.split(')').next().unwrap());
    assert_eq!(
        Geometry::for_size(f.current_size),
        spec,
        "{}",
        ctx("spec geometry for the current size")
    );
    assert_eq!(
        f.disk_type.code() as u64,
        num(field(line, "disk type")),
        "{}",
        ctx("disk type")
    );
    let (stored, computed) = checksum_claim(line);
    assert_eq!(f.checksum, stored, "{}", ctx("stored checksum"));
    assert_eq!(
        Footer::compute_checksum(raw),
        computed,
        "{}",
        ctx("computed checksum")
    );
    assert_eq!(
        Footer::verify_checksum(raw, at, Structure::Footer).is_ok(),
        stored == computed,
        "{}",
        ctx("checksum verdict")
    );
    assert_eq!(
        f.unique_id,
        uuid(field(line, "unique id")),
        "{}",
        ctx("unique id")
    );
    assert_eq!(
        f.unique_id.to_string(),
        field(line, "unique id"),
        "{}",
        ctx("unique id text")
    );
    assert_eq!(
        f.saved_state as u64,
        num(field(line, "saved state")),
        "{}",
        ctx("saved state")
    );

    // Back to bytes: identical when canonical; otherwise identical except
    // for what to_bytes repairs (the checksum).
    assert!(!Footer::reserved_nonzero(raw), "{}", ctx("reserved bytes"));
    let out = f.to_bytes();
    if stored == computed {
        assert_eq!(out[..], raw[..], "{}", ctx("to_bytes"));
        assert_eq!(f.clone().with_checksum(), f, "{}", ctx("with_checksum"));
    } else {
        assert_eq!(
            out[..64],
            raw[..64],
            "{}",
            ctx("to_bytes before the checksum")
        );
        assert_eq!(
            out[68..],
            raw[68..],
            "{}",
            ctx("to_bytes after the checksum")
        );
        assert_eq!(
            u32::from_be_bytes(out[64..68].try_into().unwrap()),
            computed
        );
    }
    f
}

fn check_header(name: &str, line: &str, raw: &[u8; HEADER_SIZE], at: u64) -> DynamicHeader {
    let h = DynamicHeader::parse(raw, at)
        .unwrap_or_else(|e| panic!("{name}: dynamic header does not parse: {e}"));
    let ctx = |what: &str| format!("{name}: header {what}");
    assert_eq!(
        h.data_offset,
        num(field(line, "data offset")),
        "{}",
        ctx("data offset")
    );
    assert_eq!(
        h.table_offset,
        num(field(line, "table offset")),
        "{}",
        ctx("table offset")
    );
    assert_eq!(
        h.header_version as u64,
        num(field(line, "version")),
        "{}",
        ctx("version")
    );
    assert_eq!(
        h.max_table_entries as u64,
        num(field(line, "max table entries")),
        "{}",
        ctx("max table entries")
    );
    assert_eq!(
        h.block_size as u64,
        num(field(line, "block size")),
        "{}",
        ctx("block size")
    );
    let (stored, computed) = checksum_claim(line);
    assert_eq!(h.checksum, stored, "{}", ctx("stored checksum"));
    assert_eq!(
        DynamicHeader::compute_checksum(raw),
        computed,
        "{}",
        ctx("computed checksum")
    );
    assert_eq!(
        DynamicHeader::verify_checksum(raw, at).is_ok(),
        stored == computed,
        "{}",
        ctx("checksum verdict")
    );
    assert_eq!(
        h.parent_unique_id,
        uuid(field(line, "parent uuid")),
        "{}",
        ctx("parent uuid")
    );
    assert_eq!(
        h.parent_timestamp.0 as u64,
        num(field(line, "parent timestamp")),
        "{}",
        ctx("parent timestamp")
    );
    let pname = String::from_utf8(unescape(quoted(line, "parent name", '\'', '\''))).unwrap();
    assert_eq!(h.parent_name(), pname, "{}", ctx("parent name"));
    let nloc = line.rsplit(", ").next().unwrap().split(' ').next().unwrap();
    let used = h.parent_locators.iter().filter(|l| !l.is_empty()).count();
    assert_eq!(used as u64, num(nloc), "{}", ctx("locator count"));

    let out = h.to_bytes();
    assert!(
        raw[768..].iter().all(|&b| b == 0),
        "{}",
        ctx("reserved bytes")
    );
    if stored == computed {
        assert_eq!(out[..], raw[..], "{}", ctx("to_bytes"));
        assert_eq!(h.clone().with_checksum(), h, "{}", ctx("with_checksum"));
    } else {
        assert_eq!(
            out[..36],
            raw[..36],
            "{}",
            ctx("to_bytes before the checksum")
        );
        assert_eq!(
            out[40..],
            raw[40..],
            "{}",
            ctx("to_bytes after the checksum")
        );
    }
    h
}

/// "3/5 allocated, in block order: False; sector bitmaps all-ones 3,
/// partial 0, all-zero 0, end of last block 6307840"
fn check_bat(name: &str, line: &str, img: &Sparse, h: &DynamicHeader) -> usize {
    let ctx = |what: &str| format!("{name}: BAT {what}");
    let n = h.max_table_entries as usize;
    let raw = img.read(h.table_offset, Bat::disk_size(n as u64) as usize);
    let bat = Bat::parse(&raw[..4 * n]);
    assert_eq!(bat.entries.len(), n);

    let counts = line.split(' ').next().unwrap();
    let (alloc, total) = counts.split_once('/').unwrap();
    assert_eq!(bat.allocated() as u64, num(alloc), "{}", ctx("allocated"));
    assert_eq!(n as u64, num(total), "{}", ctx("entries"));

    let allocated: Vec<(usize, u32)> = bat
        .entries
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, e)| e != UNALLOCATED)
        .collect();
    let in_order = allocated.windows(2).all(|w| w[0].1 < w[1].1);
    let claimed = line
        .split("in block order: ")
        .nth(1)
        .unwrap()
        .starts_with("True");
    assert_eq!(in_order, claimed, "{}", ctx("block order"));
    for &(i, e) in &allocated {
        assert_eq!(bat.block_offset(i), Some(u64::from(e) * SECTOR));
    }

    // Sector bitmaps.
    let bs = h.block_size;
    let sectors = u64::from(bs) / SECTOR;
    let bm = bitmap_size(bs);
    let (mut ones, mut partial, mut zero) = (0u64, 0u64, 0u64);
    let mut end = 0u64;
    for &(_, e) in &allocated {
        let at = u64::from(e) * SECTOR;
        let bits = img.read(at, bm as usize);
        let sb = SectorBitmap(&bits);
        let runs = sb.runs(0, sectors);
        assert_eq!(
            runs.iter().map(|r| r.1).sum::<u64>(),
            sectors,
            "{}",
            ctx("runs cover")
        );
        let set: u64 = runs.iter().filter(|r| r.2).map(|r| r.1).sum();
        let direct = (0..sectors).filter(|&s| sb.is_set(s)).count() as u64;
        assert_eq!(set, direct, "{}", ctx("runs agree with is_set"));
        match (sb.all_set(sectors), sb.all_clear(sectors)) {
            (true, false) => ones += 1,
            (false, true) => zero += 1,
            (false, false) => partial += 1,
            (true, true) => panic!("{}", ctx("bitmap both full and empty")),
        }
        end = end.max(at + bm + u64::from(bs));
    }
    let claim = |k: &str| num(field(line, k));
    assert_eq!(
        ones,
        claim("sector bitmaps all-ones"),
        "{}",
        ctx("all-ones bitmaps")
    );
    assert_eq!(partial, claim("partial"), "{}", ctx("partial bitmaps"));
    assert_eq!(zero, claim("all-zero"), "{}", ctx("all-zero bitmaps"));
    if !allocated.is_empty() {
        assert_eq!(
            end,
            claim("end of last block"),
            "{}",
            ctx("end of last block")
        );
    }

    // Back to bytes: the entries always; the padding too when it is the
    // canonical 0xFF (Disk2vhd and pyvhd pad with zeros).
    let out = bat.to_bytes();
    assert_eq!(out.len(), raw.len());
    assert_eq!(out[..4 * n], raw[..4 * n], "{}", ctx("entries to_bytes"));
    if raw[4 * n..].iter().all(|&b| b == 0xff) {
        assert_eq!(out, raw, "{}", ctx("to_bytes"));
        1
    } else {
        assert!(raw[4 * n..].iter().all(|&b| b == 0), "{}", ctx("padding"));
        0
    }
}

#[test]
fn every_corpus_image_decodes_as_the_manifest_says() {
    let entries = manifest();
    assert_eq!(entries.len(), 20, "the manifest describes 20 images");
    let (mut headers, mut bats, mut canonical_bats, mut locators) = (0, 0, 0, 0);
    for e in &entries {
        let img = Sparse::load(&e.file);
        let at = img.len - FOOTER_SIZE as u64;
        let raw: [u8; FOOTER_SIZE] = img.array(at);
        let footer = check_footer(&e.file, &e.footer, &raw, at);
        if e.footer_copy_identical {
            let copy: [u8; FOOTER_SIZE] = img.array(0);
            assert_eq!(copy, raw, "{}: footer copy", e.file);
            let c = Footer::parse(&copy, 0, Structure::FooterCopy).unwrap();
            assert_eq!(c, footer);
        }
        match footer.disk_type {
            DiskType::Fixed => {
                assert!(e.header.is_none(), "{}", e.file);
                assert_eq!(footer.data_offset, Footer::NO_DATA_OFFSET);
            }
            DiskType::Dynamic | DiskType::Differencing => {
                let line = e
                    .header
                    .as_deref()
                    .expect("dynamic image with a header line");
                let hraw: [u8; HEADER_SIZE] = img.array(footer.data_offset);
                let h = check_header(&e.file, line, &hraw, footer.data_offset);
                headers += 1;
                if let Some(b) = &e.bat {
                    canonical_bats += check_bat(&e.file, b, &img, &h);
                    bats += 1;
                }
                if let Some(l) = &e.locators {
                    locators += check_locators(&e.file, l, &img, &h);
                }
            }
            other => panic!("{}: disk type {other:?}", e.file),
        }
    }
    assert_eq!(headers, 15);
    assert_eq!(bats, 15);
    assert_eq!(canonical_bats, 13);
    assert_eq!(locators, 2);
}

/// "W2ku 'C:\\Projects\\...' (space 4096, len 84, at 4096); W2ru '.\\fat-parent.vhd' (...)"
fn check_locators(name: &str, line: &str, img: &Sparse, h: &DynamicHeader) -> usize {
    let used: Vec<&ParentLocator> = h.parent_locators.iter().filter(|l| !l.is_empty()).collect();
    let claims: Vec<&str> = line.split("; ").collect();
    assert_eq!(used.len(), claims.len(), "{name}: locators");
    for (l, c) in used.iter().zip(&claims) {
        let code = &c[..4];
        assert_eq!(
            l.platform_code.code().to_be_bytes(),
            code.as_bytes(),
            "{name}: {c}"
        );
        let path = String::from_utf8(unescape(quoted(c, code, '\'', '\''))).unwrap();
        let nums = quoted(c, "' ", '(', ')');
        assert_eq!(
            l.data_space as u64,
            num(field(nums, "space")),
            "{name}: data space"
        );
        assert_eq!(
            l.data_length as u64,
            num(field(nums, "len")),
            "{name}: data length"
        );
        assert_eq!(l.data_offset, num(field(nums, "at")), "{name}: data offset");
        assert_eq!(l.reserved, 0);
        let data = img.read(l.data_offset, l.data_length as usize);
        let units: Vec<u16> = data
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(
            String::from_utf16(&units).unwrap(),
            path,
            "{name}: locator data"
        );
    }
    used.len()
}

// ---------------------------------------------------------------------------
// Named golden tests (the same facts, spelled out)
// ---------------------------------------------------------------------------

fn footer_file(name: &str) -> [u8; FOOTER_SIZE] {
    corpus_file(&format!("footers/vhdattach-VhdFooter_{name}.footer"))
        .try_into()
        .expect("a footer file is 512 bytes")
}

#[test]
fn vhdattach_footers_decode() {
    struct Row {
        name: &'static str,
        creator: &'static [u8; 4],
        version: u32,
        disk_type: DiskType,
        size: u64,
        chs: (u16, u8, u8),
        data_offset: u64,
        date: &'static str,
        id: &'static str,
    }
    #[rustfmt::skip]
    let table = [
        Row { name: "Parse1", creator: b"win ", version: 0x0006_0001, disk_type: DiskType::Fixed,
              size: 3_221_225_472, chs: (6241, 16, 63), data_offset: u64::MAX,
              date: "2011-08-16T05:31:12Z", id: "3ae3a95e-dd1d-a349-bd6d-3cd7905ab670" },
        Row { name: "Parse2", creator: b"win ", version: 0x0006_0001, disk_type: DiskType::Fixed,
              size: 34_359_738_368, chs: (16448, 16, 255), data_offset: u64::MAX,
              date: "2011-05-29T02:41:12Z", id: "48a5fda9-7481-234d-b389-e941d2337ef7" },
        Row { name: "Parse3", creator: b"win ", version: 0x0006_0001, disk_type: DiskType::Fixed,
              size: 107_374_182_400, chs: (51400, 16, 255), data_offset: u64::MAX,
              date: "2011-12-06T14:14:48Z", id: "bdc1afb7-e1ae-ac47-b7f2-8bc5269f0af2" },
        Row { name: "Parse4", creator: b"vbox", version: 0x0004_0001, disk_type: DiskType::Dynamic,
              size: 21_474_836_480, chs: (41610, 16, 63), data_offset: 512,
              date: "2011-12-14T17:14:30Z", id: "d1aa4285-601b-fe44-8805-147ad188b510" },
        Row { name: "Parse5", creator: b"d2v\0", version: 0x0001_0000, disk_type: DiskType::Dynamic,
              size: 160_041_885_696, chs: (65535, 16, 255), data_offset: 512,
              date: "2011-02-02T10:53:33Z", id: "521fcd53-39a4-e54b-92f2-889948b7bc27" },
        Row { name: "Parse6", creator: b"win ", version: 0x0006_0001, disk_type: DiskType::Dynamic,
              size: 1_022_999_998_464, chs: (65535, 16, 255), data_offset: 512,
              date: "2012-01-05T16:23:53Z", id: "7dd87750-fa9b-a642-9033-c39796a69ae5" },
    ];
    for row in table {
        let Row {
            name,
            creator,
            version: ver,
            disk_type: ty,
            size,
            chs: (c, h, s),
            data_offset,
            date,
            id,
        } = row;
        let raw = footer_file(name);
        let f = Footer::parse(&raw, 0, Structure::Footer).unwrap();
        assert_eq!(&f.creator_app, creator, "{name}");
        assert_eq!(f.creator_version, ver, "{name}");
        assert_eq!(&f.creator_host_os, b"Wi2k", "{name}");
        assert_eq!(f.disk_type, ty, "{name}");
        assert_eq!(f.current_size, size, "{name}");
        assert_eq!(
            f.geometry,
            Geometry {
                cylinders: c,
                heads: h,
                sectors: s
            },
            "{name}"
        );
        assert_eq!(f.data_offset, data_offset, "{name}");
        assert_eq!(f.timestamp.to_string(), date, "{name}");
        assert_eq!(f.unique_id.to_string(), id, "{name}");
        assert_eq!(f.features, Footer::FEATURES_RESERVED, "{name}");
        assert_eq!(f.format_version, Footer::VERSION, "{name}");
        assert_eq!(f.saved_state, 0, "{name}");
        Footer::verify_checksum(&raw, 0, Structure::Footer).unwrap();
        assert!(!Footer::reserved_nonzero(&raw));
        assert_eq!(f.to_bytes(), raw, "{name}: to_bytes");
        // The CHS product falls short of the current size in all of them.
        assert!(f.geometry.size() < f.current_size, "{name}");
    }
}

#[test]
fn vhdattach_parse1_checksum_and_guid_byte_order() {
    let raw = footer_file("Parse1");
    let f = Footer::parse(&raw, 0, Structure::Footer).unwrap();
    // Upstream asserts checksum FF-FF-E5-66 and the timestamp.
    assert_eq!(f.checksum, 0xffff_e566);
    assert_eq!(f.timestamp, Timestamp(366_787_872));
    // Upstream's Guid("5ea9e33a-1ddd-49a3-bd6d-3cd7905ab670") is the Windows
    // mixed-endian rendering of the on-disk bytes we print as they are.
    assert_eq!(&f.unique_id.0[..4], &[0x3a, 0xe3, 0xa9, 0x5e]);
    let u = f.unique_id.0;
    let windows = format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
        u[3],
        u[2],
        u[1],
        u[0],
        u[5],
        u[4],
        u[7],
        u[6],
        u[8],
        u[9],
        u[10..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    assert_eq!(windows, "5ea9e33a-1ddd-49a3-bd6d-3cd7905ab670");
}

#[test]
fn vhdattach_invalid_footer_is_parse6_with_one_reserved_byte_changed() {
    let bad = footer_file("ParseInvalid1");
    let good = footer_file("Parse6");
    let f = Footer::parse(&bad, 1000, Structure::Footer).unwrap();
    assert!(Footer::reserved_nonzero(&bad));
    assert_eq!(f.checksum, 0xffff_e844);
    assert_eq!(Footer::compute_checksum(&bad), 0xffff_e843);
    match Footer::verify_checksum(&bad, 1000, Structure::Footer) {
        Err(vhdkit::Error::Checksum {
            structure: Structure::Footer,
            offset: 1064,
            found: 0xffff_e844,
            computed: 0xffff_e843,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // The fields are Parse6's; to_bytes drops the reserved byte and gives Parse6 back.
    assert_eq!(f, Footer::parse(&good, 0, Structure::Footer).unwrap());
    assert_eq!(f.to_bytes(), good);
}

#[test]
fn hyperv_2012r2_header_and_empty_bat() {
    let img = corpus_file("qemu-iotests__hyperv2012r2-dynamic.vhd");
    assert_eq!(img.len(), 266_240);
    let foot: [u8; FOOTER_SIZE] = img[265_728..].try_into().unwrap();
    let f = Footer::parse(&foot, 265_728, Structure::Footer).unwrap();
    assert_eq!(&f.creator_app, b"win ");
    assert_eq!(f.creator_version_string(), "6.3");
    assert_eq!(f.current_size, 136_365_211_648);
    assert_eq!(
        f.geometry,
        Geometry {
            cylinders: 65278,
            heads: 16,
            sectors: 255
        }
    );
    assert_eq!(f.geometry.size(), 136_363_130_880);
    assert_eq!(f.checksum, 0xffff_e9db);
    assert_eq!(
        f.unique_id.to_string(),
        "6d2d5fc8-eeba-de4c-8cee-de3a12db7c98"
    );
    assert_eq!(f.to_bytes(), foot);
    assert_eq!(&img[..512], &foot[..]);

    let raw: [u8; HEADER_SIZE] = img[512..1536].try_into().unwrap();
    let h = DynamicHeader::parse(&raw, 512).unwrap();
    DynamicHeader::verify_checksum(&raw, 512).unwrap();
    assert_eq!(h.data_offset, u64::MAX);
    assert_eq!(h.table_offset, 1536);
    assert_eq!(h.header_version, DynamicHeader::VERSION);
    assert_eq!(h.max_table_entries, 65_024);
    assert_eq!(h.block_size, 2 << 20);
    assert_eq!(h.checksum, 0xffff_f379);
    assert!(h.parent_unique_id.is_nil());
    assert_eq!(h.parent_timestamp, Timestamp(0));
    assert_eq!(h.parent_name(), "");
    assert!(h.parent_locators.iter().all(|l| *l == ParentLocator::EMPTY));
    assert_eq!(h.to_bytes(), raw);

    // 65,024 entries, all unallocated, exactly 508 sectors; then one sector
    // of 0xFF and zeros up to the footer.
    let bat = Bat::parse(&img[1536..1536 + 65_024 * 4]);
    assert_eq!(bat.entries.len(), 65_024);
    assert_eq!(bat.allocated(), 0);
    assert_eq!(Bat::disk_size(65_024), 260_096);
    assert_eq!(bat.to_bytes(), &img[1536..261_632]);
    assert!(img[261_632..262_144].iter().all(|&b| b == 0xff));
    assert!(img[262_144..265_728].iter().all(|&b| b == 0));
    assert_eq!(bat, Bat::new(65_024));
}

#[test]
fn virtual_pc_footer_reads_current_size_not_original_size_offset() {
    let img = corpus_file("qemu-iotests__virtualpc-dynamic.vhd");
    let at = img.len() - 512;
    let foot: [u8; FOOTER_SIZE] = img[at..].try_into().unwrap();
    let f = Footer::parse(&foot, at as u64, Structure::Footer).unwrap();
    assert_eq!(&f.creator_app, b"vpc ");
    assert_eq!(
        f.current_size,
        u64::from_be_bytes(foot[48..56].try_into().unwrap())
    );
    assert_eq!(
        f.original_size,
        u64::from_be_bytes(foot[40..48].try_into().unwrap())
    );
    assert_eq!(f.current_size, 136_365_211_648);
    assert_eq!(Geometry::for_size(f.current_size), f.geometry);
    assert_eq!(f.to_bytes(), foot);
}

#[test]
fn fat_differential_header_locators_bat_and_bitmap() {
    let img = corpus_file("dfvfs__fat-differential.vhd");
    assert_eq!(img.len(), 2_183_168);
    let at = 2_182_656;
    let foot: [u8; FOOTER_SIZE] = img[at..].try_into().unwrap();
    let f = Footer::parse(&foot, at as u64, Structure::Footer).unwrap();
    assert_eq!(f.disk_type, DiskType::Differencing);
    assert_eq!(
        f.unique_id.to_string(),
        "f84f1636-cd9e-9041-a69e-dcc2380e416a"
    );
    assert_eq!(f.to_bytes(), foot);

    let raw: [u8; HEADER_SIZE] = img[512..1536].try_into().unwrap();
    let h = DynamicHeader::parse(&raw, 512).unwrap();
    assert_eq!(h.table_offset, 8192);
    assert_eq!(h.max_table_entries, 2);
    assert_eq!(h.block_size, 2 << 20);
    assert_eq!(h.checksum, 0xffff_d951);
    assert_eq!(
        h.parent_unique_id.to_string(),
        "5fa21a55-f394-aa4d-9958-1951a67d5540"
    );
    assert_eq!(h.parent_timestamp, Timestamp(0));
    assert_eq!(
        h.parent_name(),
        r"C:\Projects\dfvfs\test_data\fat-parent.vhd"
    );
    assert_eq!(h.to_bytes(), raw);

    let l = &h.parent_locators;
    assert_eq!(l[0].platform_code, PlatformCode::W2ku);
    assert_eq!(l[0].platform_code.code(), 0x5732_6B75);
    assert_eq!(
        (l[0].data_space, l[0].data_length, l[0].data_offset),
        (4096, 84, 4096)
    );
    assert_eq!(l[1].platform_code, PlatformCode::W2ru);
    assert_eq!(l[1].platform_code.code(), 0x5732_7275);
    assert_eq!(
        (l[1].data_space, l[1].data_length, l[1].data_offset),
        (65_536, 32, 12_288)
    );
    assert!(l[2..]
        .iter()
        .all(|x| x.is_empty() && *x == ParentLocator::EMPTY));
    let utf16le = |b: &[u8]| {
        let u: Vec<u16> = b
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&u).unwrap()
    };
    assert_eq!(
        utf16le(&img[4096..4096 + 84]),
        r"C:\Projects\dfvfs\test_data\fat-parent.vhd"
    );
    assert_eq!(utf16le(&img[12_288..12_288 + 32]), r".\fat-parent.vhd");

    let bat = Bat::parse(&img[8192..8200]);
    assert_eq!(bat.entries, vec![159, UNALLOCATED]);
    assert_eq!(bat.to_bytes(), &img[8192..8704]);
    let bm_at = bat.block_offset(0).unwrap() as usize;
    assert_eq!(bm_at, 81_408);
    assert_eq!(bitmap_size(h.block_size), 512);
    let bits = SectorBitmap(&img[bm_at..bm_at + 512]);
    let set = (0..4096).filter(|&s| bits.is_set(s)).count();
    assert_eq!(set, 18, "18 of the block's 4096 sectors are in the child");
    assert!(!bits.all_set(4096) && !bits.all_clear(4096));
    let runs = bits.runs(0, 4096);
    assert_eq!(runs.iter().filter(|r| r.2).map(|r| r.1).sum::<u64>(), 18);
    for w in runs.windows(2) {
        assert_eq!(w[0].0 + w[0].1, w[1].0, "runs are contiguous");
        assert_ne!(w[0].2, w[1].2, "runs alternate");
    }
    // Block 0's data ends where the manifest says, 3584 bytes before the footer.
    assert_eq!(bm_at + 512 + (2 << 20), 2_179_072);
}

#[test]
fn out_of_order_bat_of_windows_dynamic_disk() {
    let img = Sparse::load("dissect__dynamic.vhd.gz");
    let raw = img.read(1536, 512);
    let bat = Bat::parse(&raw[..20]);
    // Block 0 at sector 15, block 3 at 4119, block 1 at 8223.
    assert_eq!(bat.entries, vec![15, 8223, UNALLOCATED, 4119, UNALLOCATED]);
    assert_eq!(bat.to_bytes(), raw);
    assert_eq!(bat.allocated(), 3);
    assert_eq!(bat.block_offset(3), Some(4119 * 512));
    assert_eq!(bat.block_offset(2), None);
    assert_eq!(bat.block_offset(5), None);
    // Windows puts the bitmap 512 bytes before a 4 KiB boundary.
    for i in [0, 1, 3] {
        assert_eq!((bat.block_offset(i).unwrap() + 512) % 4096, 0);
    }
}

#[test]
fn corpus_is_required() {
    // A guard against a vacuous pass: the corpus must be where the tests look.
    let dir = corpus_dir();
    let n = std::fs::read_dir(dir.join("footers")).unwrap().count();
    assert_eq!(n, 7);
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

fn arb_uuid() -> impl Strategy<Value = Uuid> {
    any::<[u8; 16]>().prop_map(Uuid)
}

fn arb_geometry() -> impl Strategy<Value = Geometry> {
    any::<[u8; 4]>().prop_map(Geometry::from_bytes)
}

prop_compose! {
    fn arb_footer()(
        features in any::<u32>(),
        format_version in any::<u32>(),
        data_offset in any::<u64>(),
        timestamp in any::<u32>(),
        creator_app in any::<[u8; 4]>(),
        creator_version in any::<u32>(),
        creator_host_os in any::<[u8; 4]>(),
        original_size in any::<u64>(),
        current_size in any::<u64>(),
        geometry in arb_geometry(),
        disk_type in prop_oneof![Just(0u32), Just(2), Just(3), Just(4), any::<u32>()],
        unique_id in arb_uuid(),
        saved_state in any::<u8>(),
    ) -> Footer {
        Footer {
            features, format_version, data_offset, timestamp: Timestamp(timestamp),
            creator_app, creator_version, creator_host_os, original_size, current_size,
            geometry, disk_type: DiskType::from_code(disk_type), checksum: 0, unique_id,
            saved_state,
        }.with_checksum()
    }
}

fn arb_locator() -> impl Strategy<Value = ParentLocator> {
    let code = prop_oneof![
        Just(0u32),
        Just(u32::from_be_bytes(*b"W2ru")),
        Just(u32::from_be_bytes(*b"W2ku")),
        Just(u32::from_be_bytes(*b"Wi2r")),
        Just(u32::from_be_bytes(*b"Wi2k")),
        Just(u32::from_be_bytes(*b"Mac ")),
        Just(u32::from_be_bytes(*b"MacX")),
        any::<u32>(),
    ];
    (code, any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
        |(c, data_space, data_length, reserved, data_offset)| ParentLocator {
            platform_code: PlatformCode::from_code(c),
            data_space,
            data_length,
            reserved,
            data_offset,
        },
    )
}

prop_compose! {
    fn arb_header()(
        data_offset in any::<u64>(),
        table_offset in any::<u64>(),
        header_version in any::<u32>(),
        max_table_entries in any::<u32>(),
        block_size in any::<u32>(),
        parent_unique_id in arb_uuid(),
        parent_timestamp in any::<u32>(),
        reserved1 in any::<u32>(),
        name in proptest::collection::vec(any::<u16>(), 256),
        locators in proptest::collection::vec(arb_locator(), 8),
    ) -> DynamicHeader {
        DynamicHeader {
            data_offset, table_offset, header_version, max_table_entries, block_size,
            checksum: 0, parent_unique_id, parent_timestamp: Timestamp(parent_timestamp),
            reserved1, parent_unicode_name: name.try_into().unwrap(),
            parent_locators: locators.try_into().unwrap(),
        }.with_checksum()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn footer_round_trips(f in arb_footer(), base in 0u64..(1 << 50)) {
        let b = f.to_bytes();
        prop_assert!(Footer::has_cookie(&b));
        prop_assert!(Footer::verify_checksum(&b, base, Structure::Footer).is_ok());
        prop_assert_eq!(Footer::compute_checksum(&b), f.checksum);
        prop_assert!(!Footer::reserved_nonzero(&b));
        prop_assert_eq!(Footer::parse(&b, base, Structure::Footer).unwrap(), f.clone());
        // The stored checksum field of `self` never leaks into the bytes.
        let mut g = f.clone();
        g.checksum = !f.checksum;
        prop_assert_eq!(g.to_bytes(), b);
    }

    #[test]
    fn footer_checksum_catches_any_single_byte_change(
        f in arb_footer(), at in 0usize..512, x in 1u8..=255,
    ) {
        let mut b = f.to_bytes();
        b[at] ^= x;
        // A byte sum changes with every byte, so one changed byte always
        // shows, the checksum's own bytes included.
        prop_assert!(Footer::verify_checksum(&b, 0, Structure::Footer).is_err());
    }

    #[test]
    fn footer_parse_rejects_wrong_cookies(mut b in proptest::collection::vec(any::<u8>(), 512)) {
        if &b[..8] == b"conectix" { b[0] = b'C'; }
        let arr: [u8; FOOTER_SIZE] = b.try_into().unwrap();
        match Footer::parse(&arr, 77, Structure::FooterCopy) {
            Err(vhdkit::Error::Corrupt(c)) => {
                prop_assert_eq!(c.structure, Structure::FooterCopy);
                prop_assert_eq!(c.field, "cookie");
                prop_assert_eq!(c.offset, 77);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn header_round_trips(h in arb_header(), base in 0u64..(1 << 50)) {
        let b = h.to_bytes();
        prop_assert_eq!(&b[..8], b"cxsparse");
        prop_assert!(DynamicHeader::verify_checksum(&b, base).is_ok());
        prop_assert_eq!(DynamicHeader::compute_checksum(&b), h.checksum);
        prop_assert!(b[768..].iter().all(|&x| x == 0));
        prop_assert_eq!(DynamicHeader::parse(&b, base).unwrap(), h.clone());
        let mut g = h.clone();
        g.checksum = !h.checksum;
        prop_assert_eq!(g.to_bytes(), b);
    }

    #[test]
    fn header_parent_names_round_trip(name in "\\PC{0,200}") {
        let mut h = DynamicHeader::new(1536, 1, 2 << 20);
        h.set_parent_name(&name);
        let units: Vec<u16> = name.encode_utf16().collect();
        if units.len() <= 256 && !units.contains(&0) {
            prop_assert_eq!(h.parent_name(), name);
        }
        let back = DynamicHeader::parse(&h.to_bytes(), 0).unwrap();
        prop_assert_eq!(back.parent_name(), h.parent_name());
    }

    #[test]
    fn bat_round_trips(entries in proptest::collection::vec(
        prop_oneof![Just(UNALLOCATED), any::<u32>()], 0..1500)
    ) {
        let bat = Bat { entries: entries.clone() };
        let b = bat.to_bytes();
        let n = entries.len();
        prop_assert_eq!(b.len() as u64, Bat::disk_size(n as u64));
        prop_assert_eq!(b.len() % 512, 0);
        prop_assert!(b.len() >= 4 * n && b.len() < 4 * n + 512);
        prop_assert!(b[4 * n..].iter().all(|&x| x == 0xff), "padding is 0xFF");
        prop_assert_eq!(Bat::parse(&b[..4 * n]), bat.clone());
        // Parsing the padded table yields only unallocated extra entries.
        let padded = Bat::parse(&b);
        prop_assert_eq!(&padded.entries[..n], &entries[..]);
        prop_assert!(padded.entries[n..].iter().all(|&e| e == UNALLOCATED));
        prop_assert_eq!(padded.allocated(), bat.allocated());
        for (i, &e) in entries.iter().enumerate() {
            let want = (e != UNALLOCATED).then(|| u64::from(e) * 512);
            prop_assert_eq!(bat.block_offset(i), want);
        }
        prop_assert_eq!(bat.block_offset(n), None);
    }

    #[test]
    fn bitmap_runs_match_bits(
        bits in proptest::collection::vec(any::<u8>(), 0..64),
        a in 0u64..600, len in 0u64..600,
    ) {
        let sb = SectorBitmap(&bits);
        let runs = sb.runs(a, a + len);
        let mut pos = a;
        for (s, n, set) in &runs {
            prop_assert_eq!(*s, pos);
            prop_assert!(*n > 0);
            for x in *s..*s + *n {
                prop_assert_eq!(sb.is_set(x), *set);
            }
            pos += n;
        }
        prop_assert_eq!(pos, a + len);
        for w in runs.windows(2) {
            prop_assert_ne!(w[0].2, w[1].2);
        }
        let total = (bits.len() * 8) as u64;
        let upto = len.min(total);
        prop_assert_eq!(sb.all_set(upto), (0..upto).all(|s| sb.is_set(s)));
        prop_assert_eq!(sb.all_clear(len), (0..len).all(|s| !sb.is_set(s)));
        // Bits past the end of the bitmap read as clear, never panic.
        prop_assert!(!sb.is_set(total + a));
        let mut m = bits.clone();
        SectorBitmap::set_range(&mut m, a, a + len);
        for s in 0..total {
            let want = sb.is_set(s) || (a..a + len).contains(&s);
            prop_assert_eq!(SectorBitmap(&m).is_set(s), want);
        }
    }

    #[test]
    fn geometry_bytes_round_trip(b in any::<[u8; 4]>()) {
        prop_assert_eq!(Geometry::from_bytes(b).to_bytes(), b);
    }

    #[test]
    fn geometry_for_size_keeps_the_spec_invariants(size in prop_oneof![
        0u64..(1 << 24),
        0u64..(128u64 << 30),
        any::<u64>(),
        // Around the thresholds of the algorithm, in sectors.
        (0u64..4096).prop_map(|d| (65535 * 16 * 63 - 2048 + d) * 512),
        (0u64..4096).prop_map(|d| (65535 * 16 * 255 - 2048 + d) * 512),
        (0u64..4096).prop_map(|d| (1024 * 16 * 17 - 2048 + d) * 512),
        (0u64..4096).prop_map(|d| (1024 * 16 * 31 - 2048 + d) * 512),
    ]) {
        let g = Geometry::for_size(size);
        prop_assert!(g.size() <= size, "{} > {}", g.size(), size);
        prop_assert!(g.heads <= 16 && g.heads >= 4, "{}", g);
        prop_assert!(matches!(g.sectors, 17 | 31 | 63 | 255), "{}", g);
        prop_assert!(g.size() <= Geometry::MAX.size());
        let total = (size / 512).min(65535 * 16 * 255);
        // Rounding down loses less than one cylinder's worth of sectors
        // (below the maximum, where the size is clamped).
        let lost = total - g.size() / 512;
        prop_assert!(
            lost < u64::from(g.heads) * u64::from(g.sectors) + u64::from(g.sectors)
                || (total >= 65535 * 16 * 63 && g.cylinders == 65535),
            "{} sectors lost for {} ({})", lost, size, g
        );
        if total >= 65535 * 16 * 63 {
            prop_assert_eq!((g.heads, g.sectors), (16, 255));
        }
        if size / 512 >= 65535 * 16 * 255 {
            prop_assert_eq!(g, Geometry::MAX);
        }
        // The whole number of sectors is what counts: padding below a sector changes nothing.
        prop_assert_eq!(Geometry::for_size(size / 512 * 512), g);
    }
}

#[test]
fn geometry_of_zero_and_tiny_sizes() {
    assert_eq!(
        Geometry::for_size(0),
        Geometry {
            cylinders: 0,
            heads: 4,
            sectors: 17
        }
    );
    assert_eq!(Geometry::for_size(511), Geometry::for_size(0));
    assert_eq!(Geometry::for_size(u64::MAX), Geometry::MAX);
    assert_eq!(Geometry::MAX.size(), 136_899_993_600);
}

#[test]
fn arithmetic_at_the_edges_does_not_overflow() {
    assert_eq!(Bat::disk_size(0), 0);
    assert_eq!(Bat::disk_size(1), 512);
    assert_eq!(Bat::disk_size(128), 512);
    assert_eq!(Bat::disk_size(129), 1024);
    assert_eq!(Bat::disk_size(u64::from(u32::MAX)), 4 * (1u64 << 32));
    assert_eq!(Bat::disk_size(u64::MAX), u64::MAX);
    assert_eq!(Bat::disk_size(u64::MAX / 4), u64::MAX);
    // Runs at the very end of the sector numbers.
    let bits = SectorBitmap(&[0xff; 4]);
    let runs = bits.runs(u64::MAX - 20, u64::MAX);
    assert_eq!(runs, vec![(u64::MAX - 20, 20, false)]);
    assert!(!bits.is_set(u64::MAX));
    assert!(bits.all_clear(0) && bits.all_set(0));
    // Checksum errors at the largest offsets.
    let mut f = Footer::new(DiskType::Fixed, 0, u64::MAX).to_bytes();
    f[100] = 1;
    match Footer::verify_checksum(&f, u64::MAX, Structure::Footer) {
        Err(vhdkit::Error::Checksum { offset, .. }) => assert_eq!(offset, u64::MAX),
        other => panic!("{other:?}"),
    }
    let mut h = DynamicHeader::new(0, 0, 0).to_bytes();
    h[900] = 1;
    assert!(DynamicHeader::verify_checksum(&h, u64::MAX - 3).is_err());
    // Geometry of the largest values.
    assert_eq!(Geometry::MAX.size(), 65535 * 16 * 255 * 512);
    let g = Geometry {
        cylinders: u16::MAX,
        heads: u8::MAX,
        sectors: u8::MAX,
    };
    assert_eq!(g.size(), 65535 * 255 * 255 * 512);
    assert_eq!(
        Timestamp(u32::MAX).unix(),
        946_684_800 + u64::from(u32::MAX)
    );
    assert_eq!(Timestamp(u32::MAX).to_string(), "2136-02-07T06:28:15Z");
}
