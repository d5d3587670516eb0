//! The corpus of real images written by other tools (`../shared/corpus`, or
//! the folder named by `VHDKIT_CORPUS`): every image the manifest lists opens
//! as the manifest describes it, and its virtual content has the SHA-256 the
//! manifest's reference reader computed. The footers of `footers/` parse to
//! the values `MANIFEST.md` decodes. Without the corpus these tests fail.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use vhdkit::error::Structure;
use vhdkit::ondisk::{DiskType, Footer, FOOTER_SIZE};
use vhdkit::{Error, ExtentKind, Format, Image, OpenOptions};

const MIB: usize = 1 << 20;

/// Images above this size are checked through their map, not hashed.
const HASH_LIMIT: u64 = 4 << 30;

/// Images up to this size are also hashed through `reader()`.
const STREAM_LIMIT: u64 = 64 << 20;

/// Differencing images whose parent is in the corpus under another name.
const PARENTS: &[(&str, &str)] = &[("dfvfs__image-differential.vhd", "dfvfs-2016__image.vhd")];

use crate::common::corpus;

// ---------------------------------------------------------------------------
// A small JSON reader for manifest.json (the tests run without serde_json).

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    /// Kept as written; converted on use.
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Json {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value();
        p.ws();
        assert_eq!(p.i, p.s.len(), "manifest.json: trailing bytes at {}", p.i);
        v
    }

    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(fields) => fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("manifest.json: no field {key:?}")),
            _ => panic!("manifest.json: {key:?} asked of a non-object"),
        }
    }

    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("manifest.json: expected a string, found {other:?}"),
        }
    }

    fn opt_str(&self) -> Option<&str> {
        match self {
            Json::Null => None,
            _ => Some(self.str()),
        }
    }

    fn u64(&self) -> u64 {
        match self {
            Json::Num(n) => n
                .parse()
                .unwrap_or_else(|_| panic!("manifest.json: {n} is not a u64")),
            other => panic!("manifest.json: expected a number, found {other:?}"),
        }
    }

    fn opt_u64(&self) -> Option<u64> {
        match self {
            Json::Null => None,
            _ => Some(self.u64()),
        }
    }

    fn opt_bool(&self) -> Option<bool> {
        match self {
            Json::Null => None,
            Json::Bool(b) => Some(*b),
            other => panic!("manifest.json: expected a bool, found {other:?}"),
        }
    }

    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(v) => v,
            other => panic!("manifest.json: expected an array, found {other:?}"),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) {
        self.ws();
        assert_eq!(
            self.s.get(self.i),
            Some(&c),
            "manifest.json: expected {:?} at {}",
            c as char,
            self.i
        );
        self.i += 1;
    }

    fn value(&mut self) -> Json {
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.s[self.i] == b'}' {
                    self.i += 1;
                    return Json::Obj(fields);
                }
                loop {
                    self.ws();
                    let k = self.string();
                    self.eat(b':');
                    fields.push((k, self.value()));
                    self.ws();
                    self.i += 1;
                    match self.s[self.i - 1] {
                        b',' => continue,
                        b'}' => return Json::Obj(fields),
                        c => panic!(
                            "manifest.json: {:?} at {} in an object",
                            c as char,
                            self.i - 1
                        ),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s[self.i] == b']' {
                    self.i += 1;
                    return Json::Arr(items);
                }
                loop {
                    items.push(self.value());
                    self.ws();
                    self.i += 1;
                    match self.s[self.i - 1] {
                        b',' => continue,
                        b']' => return Json::Arr(items),
                        c => panic!(
                            "manifest.json: {:?} at {} in an array",
                            c as char,
                            self.i - 1
                        ),
                    }
                }
            }
            Some(b'"') => Json::Str(self.string()),
            Some(b't') => self.word("true", Json::Bool(true)),
            Some(b'f') => self.word("false", Json::Bool(false)),
            Some(b'n') => self.word("null", Json::Null),
            Some(c) if c.is_ascii_digit() || *c == b'-' => {
                let start = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'
                    )
                {
                    self.i += 1;
                }
                Json::Num(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
            }
            other => panic!("manifest.json: unexpected {other:?} at {}", self.i),
        }
    }

    fn word(&mut self, w: &str, v: Json) -> Json {
        assert!(
            self.s[self.i..].starts_with(w.as_bytes()),
            "manifest.json: bad literal at {}",
            self.i
        );
        self.i += w.len();
        v
    }

    fn string(&mut self) -> String {
        self.eat(b'"');
        let mut units: Vec<u16> = Vec::new();
        let mut out = String::new();
        let flush = |units: &mut Vec<u16>, out: &mut String| {
            out.push_str(&String::from_utf16_lossy(units));
            units.clear();
        };
        loop {
            let c = self.s[self.i];
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.s[self.i];
                    self.i += 1;
                    if e == b'u' {
                        let hex = std::str::from_utf8(&self.s[self.i..self.i + 4]).unwrap();
                        units.push(u16::from_str_radix(hex, 16).expect("\\u escape"));
                        self.i += 4;
                        continue;
                    }
                    flush(&mut units, &mut out);
                    out.push(match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        other => other as char, // \" \\ \/
                    });
                }
                _ => {
                    flush(&mut units, &mut out);
                    // Copy one UTF-8 character.
                    let start = self.i - 1;
                    let mut end = self.i;
                    while end < self.s.len() && (self.s[end] & 0xc0) == 0x80 {
                        end += 1;
                    }
                    out.push_str(std::str::from_utf8(&self.s[start..end]).expect("UTF-8"));
                    self.i = end;
                }
            }
        }
        flush(&mut units, &mut out);
        out
    }
}

// ---------------------------------------------------------------------------

/// One image of manifest.json, with the fields the tests use.
#[derive(Debug)]
struct Entry {
    file: String,
    disk_type: u64,
    current_size: u64,
    original_size: u64,
    creator_app: String,
    creator_version: String,
    creator_host_os: String,
    geometry: (u64, u64, u64),
    footer_checksum_ok: bool,
    header_checksum_ok: Option<bool>,
    unique_id: String,
    block_size: Option<u64>,
    max_table_entries: Option<u64>,
    allocated_blocks: Option<u64>,
    parent_name: Option<String>,
    parent_unique_id: Option<String>,
    sha256: String,
}

impl Entry {
    fn checksums_ok(&self) -> bool {
        self.footer_checksum_ok && self.header_checksum_ok != Some(false)
    }
}

fn manifest() -> Vec<Entry> {
    let path = corpus().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let entries: Vec<Entry> = Json::parse(&text)
        .arr()
        .iter()
        .map(|e| {
            let chs = e.get("geometry_chs").arr();
            Entry {
                file: e.get("file").str().to_string(),
                disk_type: e.get("disk_type").u64(),
                current_size: e.get("current_size").u64(),
                original_size: e.get("original_size").u64(),
                creator_app: e.get("creator_app").str().to_string(),
                creator_version: e.get("creator_version").str().to_string(),
                creator_host_os: e.get("creator_host_os").str().to_string(),
                geometry: (chs[0].u64(), chs[1].u64(), chs[2].u64()),
                footer_checksum_ok: e
                    .get("footer_checksum_ok")
                    .opt_bool()
                    .expect("footer_checksum_ok"),
                header_checksum_ok: e.get("header_checksum_ok").opt_bool(),
                unique_id: e.get("unique_id").str().to_string(),
                block_size: e.get("block_size").opt_u64(),
                max_table_entries: e.get("max_table_entries").opt_u64(),
                allocated_blocks: e.get("allocated_blocks").opt_u64(),
                parent_name: e.get("parent_name").opt_str().map(str::to_string),
                parent_unique_id: e.get("parent_unique_id").opt_str().map(str::to_string),
                sha256: e
                    .get("reference_reader_sha256_over_current_size")
                    .str()
                    .to_string(),
            }
        })
        .collect();
    assert!(!entries.is_empty(), "{}: no images listed", path.display());
    entries
}

/// Four bytes from a manifest string whose characters are all below 256.
fn fourcc(s: &str) -> [u8; 4] {
    let v: Vec<u8> = s
        .chars()
        .map(|c| u8::try_from(u32::from(c)).expect("byte"))
        .collect();
    v.try_into()
        .unwrap_or_else(|v| panic!("{v:?} is not four bytes"))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The image as a file: the corpus file itself, or a sparse decompressed
/// copy of a `.gz` in `tmp`.
fn image_file(name: &str, tmp: &Path) -> PathBuf {
    let src = corpus().join(name);
    let Some(stem) = name.strip_suffix(".gz") else {
        return src;
    };
    let dst = tmp.join(stem);
    let mut gz = flate2::read::GzDecoder::new(std::fs::File::open(&src).unwrap());
    let mut out = std::fs::File::create(&dst).unwrap();
    let mut buf = vec![0u8; MIB];
    let mut total = 0u64;
    loop {
        // Fill whole MiB chunks so that zero runs become holes.
        let mut n = 0;
        while n < buf.len() {
            match gz.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => panic!("{}: {e}", src.display()),
            }
        }
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(n as i64)).unwrap();
        } else {
            out.write_all(&buf[..n]).unwrap();
        }
        total += n as u64;
    }
    out.set_len(total).unwrap();
    dst
}

/// The options the manifest calls for.
fn options(e: &Entry) -> OpenOptions {
    let mut o = OpenOptions::new().ignore_checksums(!e.checksums_ok());
    if e.disk_type == 4 {
        match PARENTS.iter().find(|(child, _)| *child == e.file) {
            Some((_, parent)) => o = o.parent(corpus().join(parent)),
            None => o = o.missing_parent_as_zero(true),
        }
    }
    o
}

/// SHA-256 of the virtual disk, walking the map: zero extents from a static
/// buffer, data read 1 MiB at a time.
fn sha256_via_map(img: &Image) -> String {
    static ZEROS: [u8; MIB] = [0; MIB];
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB];
    for e in img.map_all().unwrap() {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = (e.end() - pos).min(MIB as u64) as usize;
            match e.kind {
                ExtentKind::Zero => h.update(&ZEROS[..n]),
                ExtentKind::Data { .. } => {
                    img.read_exact_at(&mut buf[..n], pos).unwrap();
                    h.update(&buf[..n]);
                }
                _ => panic!("map() left {e:?} to a parent"),
            }
            pos += n as u64;
        }
    }
    hex(&h.finalize())
}

/// SHA-256 of the virtual disk read through `reader()` in 1 MiB reads.
fn sha256_via_reader(img: &Image) -> String {
    let mut h = Sha256::new();
    let mut r = img.reader();
    let mut buf = vec![0u8; MIB];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Checks one image against its manifest entry.
fn check_image(e: &Entry, tmp: &Path) {
    let what = e.file.as_str();
    let path = image_file(&e.file, tmp);
    let img = Image::open_with(&path, &options(e)).unwrap_or_else(|err| panic!("{what}: {err}"));

    let format = match e.disk_type {
        2 => Format::Fixed,
        3 => Format::Dynamic,
        4 => Format::Differencing,
        t => panic!("{what}: disk type {t} in the manifest"),
    };
    assert_eq!(img.disk_type(), format, "{what}: format");
    assert_eq!(
        img.virtual_size(),
        e.current_size,
        "{what}: virtual size is the current size"
    );
    let f = img.footer().expect("a VHD has a footer");
    assert_eq!(f.current_size, e.current_size, "{what}: current size");
    assert_eq!(f.original_size, e.original_size, "{what}: original size");
    assert_eq!(
        f.creator_app,
        fourcc(&e.creator_app),
        "{what}: creator application"
    );
    assert_eq!(
        f.creator_version_string(),
        e.creator_version,
        "{what}: creator version"
    );
    assert_eq!(
        f.creator_host_os,
        fourcc(&e.creator_host_os),
        "{what}: creator host OS"
    );
    let g = f.geometry;
    assert_eq!(
        (
            u64::from(g.cylinders),
            u64::from(g.heads),
            u64::from(g.sectors)
        ),
        e.geometry,
        "{what}: geometry"
    );
    assert_eq!(f.unique_id.to_string(), e.unique_id, "{what}: unique id");
    if !e.checksums_ok() {
        assert!(
            !img.warnings().is_empty(),
            "{what}: an ignored checksum is worth a warning"
        );
    }

    if format != Format::Fixed {
        let h = img.header().expect("a dynamic header");
        assert_eq!(
            Some(u64::from(h.block_size)),
            e.block_size,
            "{what}: block size"
        );
        assert_eq!(
            Some(u64::from(h.max_table_entries)),
            e.max_table_entries,
            "{what}: BAT entries"
        );
        let bat = img.bat().expect("a BAT");
        assert_eq!(
            Some(bat.allocated() as u64),
            e.allocated_blocks,
            "{what}: allocated blocks"
        );
        assert_eq!(
            Some(img.allocated_blocks()),
            e.allocated_blocks,
            "{what}: allocated blocks in the disk"
        );
    }
    if format == Format::Differencing {
        let h = img.header().unwrap();
        assert_eq!(Some(h.parent_name()), e.parent_name, "{what}: parent name");
        assert_eq!(
            Some(h.parent_unique_id.to_string()),
            e.parent_unique_id,
            "{what}: parent unique id"
        );
        match img.parent() {
            Some(p) => {
                assert_eq!(
                    Some(p.footer().unwrap().unique_id.to_string()),
                    e.parent_unique_id
                );
                assert!(!img.parent_missing());
                assert_eq!(img.chain().len(), 2, "{what}: chain");
            }
            None => assert!(
                img.parent_missing(),
                "{what}: no parent, yet not marked missing"
            ),
        }
    }

    if e.current_size > HASH_LIMIT {
        let extents = img.map_all().unwrap();
        assert!(
            extents.iter().all(|x| x.kind == ExtentKind::Zero),
            "{what}: an image with no allocated block maps to zeros only, found {extents:?}"
        );
        assert_eq!(
            e.allocated_blocks,
            Some(0),
            "{what}: the manifest says blocks are allocated"
        );
        println!(
            "{what}: {} bytes, not hashed: checked instead that map_all() has no data extent \
             ({} extent(s)) and that the manifest lists 0 allocated blocks",
            e.current_size,
            extents.len()
        );
        return;
    }
    assert_eq!(
        sha256_via_map(&img),
        e.sha256,
        "{what}: SHA-256 of the virtual disk (via map)"
    );
    if e.current_size <= STREAM_LIMIT {
        assert_eq!(
            sha256_via_reader(&img),
            e.sha256,
            "{what}: SHA-256 of the virtual disk (via reader())"
        );
    }
    println!(
        "{what}: {} bytes, SHA-256 {} as the manifest says",
        e.current_size, e.sha256
    );
}

#[test]
fn every_image_opens_and_reads_as_the_manifest_says() {
    let tmp = tempfile::tempdir().unwrap();
    let mut failed = Vec::new();
    for e in manifest() {
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_image(&e, tmp.path())));
        if r.is_err() {
            failed.push(e.file.clone());
        }
        // Free the decompressed copy before the next image.
        if let Some(stem) = e.file.strip_suffix(".gz") {
            let _ = std::fs::remove_file(tmp.path().join(stem));
        }
    }
    assert!(
        failed.is_empty(),
        "images that did not read as the manifest says: {failed:?}"
    );
}

#[test]
fn the_manifest_and_the_folder_agree() {
    let dir = corpus();
    let listed: Vec<String> = manifest().into_iter().map(|e| e.file).collect();
    for name in &listed {
        assert!(
            dir.join(name).is_file(),
            "manifest.json lists {name}, which is not in {}",
            dir.display()
        );
    }
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".vhd") || name.ends_with(".vhd.gz") {
            assert!(
                listed.contains(&name),
                "{name} is in the corpus but not in manifest.json"
            );
        }
    }
}

#[test]
fn images_with_bad_checksums_are_refused_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let bad: Vec<Entry> = manifest()
        .into_iter()
        .filter(|e| !e.checksums_ok())
        .collect();
    assert!(
        !bad.is_empty(),
        "the corpus has images with bad checksums; the manifest lists none"
    );
    for e in &bad {
        let path = image_file(&e.file, tmp.path());
        match Image::open(&path) {
            Err(err @ Error::Checksum { .. }) => {
                let msg = err.to_string();
                assert!(
                    msg.contains("checksums ignored") && !msg.contains("--"),
                    "{}: the error says how to go on: {msg}",
                    e.file
                );
                if let Error::Checksum { structure, .. } = err {
                    let want = if e.footer_checksum_ok {
                        Structure::DynamicHeader
                    } else {
                        Structure::Footer
                    };
                    assert_eq!(structure, want, "{}: which checksum is reported", e.file);
                }
            }
            Err(err) => panic!("{}: expected Error::Checksum, got {err:?}", e.file),
            Ok(_) => panic!("{}: opened despite a bad checksum", e.file),
        }
    }
}

/// One row of MANIFEST.md's table of footers.
struct FooterRow {
    file: String,
    creator: String,
    version: String,
    host: String,
    disk_type: String,
    current_size: u64,
    chs: (u16, u8, u8),
    data_offset: u64,
    timestamp: String,
    unique_id: String,
    notes: String,
}

/// Turns `\xNN` escapes back into characters.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("\\x") {
        out.push_str(&rest[..i]);
        let code = u8::from_str_radix(&rest[i + 2..i + 4], 16).expect("\\xNN");
        out.push(char::from(code));
        rest = &rest[i + 4..];
    }
    out.push_str(rest);
    out
}

fn footer_rows() -> Vec<FooterRow> {
    let md = std::fs::read_to_string(corpus().join("MANIFEST.md")).expect("MANIFEST.md");
    md.lines()
        .filter(|l| l.starts_with("| `") && l.contains(".footer`"))
        .map(|l| {
            let c: Vec<&str> = l.split('|').map(str::trim).collect();
            // c[0] is empty (the line starts with '|').
            let creator_col = c[2];
            let close = creator_col[1..].find("' ").expect("quoted creator") + 1;
            let creator = unescape(&creator_col[1..close]);
            let (version, host) = creator_col[close + 2..]
                .split_once(" / ")
                .expect("ver / host");
            let chs: Vec<u64> = c[5].split('/').map(|x| x.parse().unwrap()).collect();
            FooterRow {
                file: c[1].trim_matches('`').to_string(),
                creator,
                version: version.to_string(),
                host: host.to_string(),
                disk_type: c[3].to_string(),
                current_size: c[4].parse().unwrap(),
                chs: (chs[0] as u16, chs[1] as u8, chs[2] as u8),
                data_offset: if c[6] == "all-ones" {
                    u64::MAX
                } else {
                    c[6].parse().unwrap()
                },
                timestamp: c[7].to_string(),
                unique_id: c[8].to_string(),
                notes: c[9].to_string(),
            }
        })
        .collect()
}

/// The number after `key` in `text`, decimal or 0x-hex.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let word: String = text[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    match word.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => word.parse().ok(),
    }
}

#[test]
fn footers_parse_as_the_manifest_decodes_them() {
    let dir = corpus().join("footers");
    let rows = footer_rows();
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        rows.len(),
        files.len(),
        "MANIFEST.md's table of footers against {}",
        dir.display()
    );
    for r in &rows {
        let what = r.file.as_str();
        let bytes = std::fs::read(dir.join(&r.file)).unwrap_or_else(|e| panic!("{what}: {e}"));
        let b: [u8; FOOTER_SIZE] = bytes.as_slice().try_into().expect("512 bytes");
        let f = Footer::parse(&b, 0, Structure::Footer).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(f.creator_app, fourcc(&r.creator), "{what}: creator");
        assert_eq!(
            f.creator_version_string(),
            r.version,
            "{what}: creator version"
        );
        assert_eq!(f.creator_host_os, fourcc(&r.host), "{what}: host OS");
        let want_type = match r.disk_type.as_str() {
            "fixed" => DiskType::Fixed,
            "dynamic" => DiskType::Dynamic,
            t => panic!("{what}: type {t}"),
        };
        assert_eq!(f.disk_type, want_type, "{what}: disk type");
        assert_eq!(f.current_size, r.current_size, "{what}: current size");
        assert_eq!(
            (f.geometry.cylinders, f.geometry.heads, f.geometry.sectors),
            r.chs,
            "{what}: CHS"
        );
        if let Some(product) = number_after(&r.notes, "CHS product") {
            assert_eq!(f.geometry.size(), product, "{what}: CHS product");
        }
        assert_eq!(f.data_offset, r.data_offset, "{what}: data offset");
        assert_eq!(
            f.timestamp.to_string().trim_end_matches('Z'),
            r.timestamp,
            "{what}: timestamp"
        );
        assert_eq!(
            f.unique_id.to_string(),
            r.unique_id,
            "{what}: unique id (on-disk byte order)"
        );
        let sum = Footer::verify_checksum(&b, 0, Structure::Footer);
        if r.notes.contains("checksum MISMATCH") {
            match sum {
                Err(Error::Checksum {
                    found,
                    computed,
                    offset,
                    ..
                }) => {
                    assert_eq!(
                        Some(u64::from(found)),
                        number_after(&r.notes, "stored"),
                        "{what}"
                    );
                    assert_eq!(
                        Some(u64::from(computed)),
                        number_after(&r.notes, "computed"),
                        "{what}"
                    );
                    assert_eq!(offset, 64, "{what}: checksum field offset");
                }
                other => panic!("{what}: the manifest says the checksum is bad, got {other:?}"),
            }
            assert!(
                Footer::reserved_nonzero(&b),
                "{what}: its reserved bytes are not zero"
            );
        } else {
            sum.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(f.checksum, Footer::compute_checksum(&b), "{what}");
        }
    }
    // The upstream VhdAttach test's own assertions for Parse1: checksum
    // FF-FF-E5-66 and the Windows (mixed-endian) GUID 5ea9e33a-1ddd-49a3-...
    let p1 = std::fs::read(dir.join("vhdattach-VhdFooter_Parse1.footer")).unwrap();
    let f = Footer::parse(&p1[..].try_into().unwrap(), 0, Structure::Footer).unwrap();
    assert_eq!(f.checksum, 0xffff_e566);
    assert_eq!(f.timestamp.to_string(), "2011-08-16T05:31:12Z");
    let u = f.unique_id.0;
    let windows = format!(
        "{:08x}-{:04x}-{:04x}-{}-{}",
        u32::from_le_bytes([u[0], u[1], u[2], u[3]]),
        u16::from_le_bytes([u[4], u[5]]),
        u16::from_le_bytes([u[6], u[7]]),
        hex(&u[8..10]),
        hex(&u[10..16])
    );
    assert_eq!(windows, "5ea9e33a-1ddd-49a3-bd6d-3cd7905ab670");
}
