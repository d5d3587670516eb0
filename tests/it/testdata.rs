//! The images of `testdata/`: each opens as the right format and size, and
//! reads — through `Image::read_exact_at`, through `reader()`, and through
//! the map — exactly as `qemu-img convert -f vpc -O raw` reads it, and as its
//! construction says.
//!
//! qemu-img must be installed (Debian: `qemu-utils`; another binary can be
//! named with `VHDKIT_QEMU_IMG`). Without it these tests fail: they exist to
//! compare vhdkit with an independent reader.
//!
//! qemu ignores sector bitmaps and reads a differencing disk without its
//! parent. For the hand-made images, whose bitmaps have clear bits over
//! non-zero bytes, the expectation comes from the construction in
//! `examples/make_testdata.rs` (included below), and qemu is held to what a
//! bitmap-blind, parent-blind reader sees, which checks the construction.

use crate::common::{assert_same, qemu_img};
use crate::make_testdata;

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use make_testdata::{Fixture, SECTOR};
use vhdkit::error::Structure;
use vhdkit::image::FooterSource;
use vhdkit::ondisk::{PlatformCode, UNALLOCATED};
use vhdkit::{Error, Extent, ExtentKind, Format, Image, OpenOptions};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// An image of testdata/ not made by `make_testdata`: made by qemu-img, or
/// copied from the corpus. All are read by qemu-img.
struct Known {
    /// Name in testdata/.
    stored: &'static str,
    format: Format,
    size: u64,
    /// A differencing disk whose parent is not here: opened with
    /// `missing_parent_as_zero`, which is how qemu reads it.
    parent_absent: bool,
}

const KNOWN: &[Known] = &[
    Known {
        stored: "example-dynamic.vhd",
        format: Format::Dynamic,
        size: 4_212_736,
        parent_absent: false,
    },
    Known {
        stored: "dfvfs__fat-differential.vhd.gz",
        format: Format::Differencing,
        size: 4_194_304,
        parent_absent: true,
    },
    Known {
        stored: "freebsd-mkimg__img-1x1-4096-gpt.vhd.gz",
        format: Format::Dynamic,
        size: 4_352_000,
        parent_absent: false,
    },
    Known {
        stored: "freebsd-mkimg__img-1x1-4096-gpt.vhdf.vhd.gz",
        format: Format::Fixed,
        size: 5_242_880,
        parent_absent: false,
    },
    Known {
        stored: "generated__pyvhd001-tap-dynamic-5M.vhd.gz",
        format: Format::Dynamic,
        size: 5_242_880,
        parent_absent: false,
    },
    Known {
        stored: "qemu-fixed-3M.vhd.gz",
        format: Format::Fixed,
        size: 3_168_256,
        parent_absent: false,
    },
    Known {
        stored: "qemu-fixed-force-1000448.vhd.gz",
        format: Format::Fixed,
        size: 1_000_448,
        parent_absent: false,
    },
    Known {
        stored: "qemu-dynamic-5M.vhd.gz",
        format: Format::Dynamic,
        size: 5_257_216,
        parent_absent: false,
    },
    Known {
        stored: "qemu-dynamic-force-3000320.vhd.gz",
        format: Format::Dynamic,
        size: 3_000_320,
        parent_absent: false,
    },
];

/// Files of testdata/ that are not images.
const NOT_IMAGES: &[&str] = &["README.md", "handmade.json"];

/// testdata/ images unpacked (gunzipped or copied) into a temporary folder,
/// so that a chain's files sit side by side and tests may move them.
struct Unpacked {
    dir: tempfile::TempDir,
}

impl Unpacked {
    fn new() -> Unpacked {
        Unpacked {
            dir: tempfile::tempdir().expect("temporary folder"),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Unpacks `stored` (a name in testdata/) into the folder; returns its path.
    fn get(&self, stored: &str) -> PathBuf {
        unpack(stored, self.dir())
    }

    /// Unpacks a hand-made image and its parents; returns the image's path.
    fn chain(&self, all: &[Fixture], name: &str) -> PathBuf {
        let chain = make_testdata::chain(all, name);
        for f in &chain {
            self.get(&f.stored_name());
        }
        self.dir().join(name)
    }
}

/// Unpacks testdata/`stored` into `dir`, dropping a `.gz` suffix.
fn unpack(stored: &str, dir: &Path) -> PathBuf {
    let src = testdata().join(stored);
    let name = stored.strip_suffix(".gz").unwrap_or(stored);
    let dst = dir.join(name);
    let mut input = std::fs::File::open(&src)
        .unwrap_or_else(|e| panic!("{}: {e} (is testdata/ complete?)", src.display()));
    let mut out = std::fs::File::create(&dst).expect("create unpacked file");
    if stored.ends_with(".gz") {
        std::io::copy(&mut flate2::read::GzDecoder::new(input), &mut out)
    } else {
        std::io::copy(&mut input, &mut out)
    }
    .unwrap_or_else(|e| panic!("unpacking {}: {e}", src.display()));
    dst
}

/// `qemu-img convert -f vpc -O raw`: Ok(bytes), or Err(qemu's message) when
/// qemu refuses the image. Panics when qemu-img cannot be run at all.
fn qemu_raw(image: &Path) -> Result<Vec<u8>, String> {
    let dir = tempfile::tempdir().expect("temporary folder");
    let out = dir.path().join("out.raw");
    let run = Command::new(qemu_img())
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(image)
        .arg(&out)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "QEMU-IMG IS MISSING: cannot run `{}` ({e}). These tests compare vhdkit with \
                 qemu-img 10 and do not pass without it: install it (Debian/Ubuntu: apt-get \
                 install qemu-utils) or name the binary with VHDKIT_QEMU_IMG=/path/to/qemu-img",
                qemu_img().display()
            )
        });
    if !run.status.success() {
        return Err(String::from_utf8_lossy(&run.stderr).into_owned());
    }
    Ok(std::fs::read(&out).expect("read qemu-img output"))
}

/// Reads the whole virtual disk three ways and checks they agree: one
/// `read_exact_at`, many `read_exact_at` of odd sizes that cross sector and
/// block boundaries, and `reader()` to the end (which must stop at the
/// virtual size). Also seeks and reads from the middle and past the end.
fn read_all(img: &Image, what: &str) -> Vec<u8> {
    let size = img.virtual_size();
    let mut whole = vec![0u8; size as usize];
    img.read_exact_at(&mut whole, 0)
        .unwrap_or_else(|e| panic!("{what}: read_exact_at: {e}"));

    let mut chunked = vec![0x55u8; size as usize];
    let mut pos = 0usize;
    for step in [1usize, 511, 4093, 65_537, (1 << 20) + 3].iter().cycle() {
        if pos == chunked.len() {
            break;
        }
        let n = (*step).min(chunked.len() - pos);
        img.read_exact_at(&mut chunked[pos..pos + n], pos as u64)
            .unwrap_or_else(|e| panic!("{what}: read_exact_at({pos}, {n}): {e}"));
        pos += n;
    }
    assert_same(&format!("{what}: chunked reads"), &chunked, &whole);

    let mut streamed = Vec::new();
    img.reader()
        .read_to_end(&mut streamed)
        .unwrap_or_else(|e| panic!("{what}: reader(): {e}"));
    assert_same(&format!("{what}: reader()"), &streamed, &whole);

    let mut r = img.reader();
    let mid = size / 2 - 700;
    r.seek(SeekFrom::Start(mid)).unwrap();
    let mut piece = [0u8; 1400];
    r.read_exact(&mut piece).unwrap();
    assert_same(
        &format!("{what}: seek + read"),
        &piece,
        &whole[mid as usize..mid as usize + 1400],
    );
    r.seek(SeekFrom::End(0)).unwrap();
    assert_eq!(
        r.read(&mut piece).unwrap(),
        0,
        "{what}: reader() reads past the end"
    );

    let mut two = [0u8; 2];
    assert!(
        matches!(
            img.read_exact_at(&mut two, size - 1),
            Err(Error::OutOfRange { offset, len: 2, size: s, .. }) if offset == size - 1 && s == size
        ),
        "{what}: a read across the end of the disk must be refused"
    );
    whole
}

/// Extents as `Image::map` promises them: contiguous, covering
/// `offset..offset+len`, none empty, no two neighbours that could merge.
fn check_extents_shape(what: &str, ext: &[Extent], offset: u64, len: u64) {
    let mut pos = offset;
    for (i, e) in ext.iter().enumerate() {
        assert_eq!(
            e.offset, pos,
            "{what}: extent {i} does not continue the previous one"
        );
        assert!(e.length > 0, "{what}: extent {i} is empty");
        pos = e.end();
        if i > 0 {
            let p = &ext[i - 1];
            let mergeable = match (p.kind, e.kind) {
                (ExtentKind::Zero, ExtentKind::Zero) => true,
                (
                    ExtentKind::Data {
                        layer: a,
                        file_offset: fa,
                    },
                    ExtentKind::Data {
                        layer: b,
                        file_offset: fb,
                    },
                ) => a == b && fa + p.length == fb,
                _ => false,
            };
            assert!(
                !mergeable,
                "{what}: extents {} and {i} were not merged: {p:?} {e:?}",
                i - 1
            );
        }
        assert!(
            !matches!(e.kind, ExtentKind::Parent),
            "{what}: map() must resolve parents, found {e:?}"
        );
    }
    assert_eq!(pos, offset + len, "{what}: extents do not cover the range");
}

/// The map agrees with the content: zero extents are zeros, data extents
/// hold the content at their file offset in their layer; sub-ranges map to
/// the clipped whole map; unallocated blocks of a dynamic disk are one zero
/// extent.
fn check_map(img: &Image, content: &[u8], what: &str) {
    let size = img.virtual_size();
    let all = img
        .map_all()
        .unwrap_or_else(|e| panic!("{what}: map_all: {e}"));
    check_extents_shape(what, &all, 0, size);
    let chain = img.chain();
    for e in &all {
        let want = &content[e.offset as usize..e.end() as usize];
        match e.kind {
            ExtentKind::Zero => assert!(
                want.iter().all(|&b| b == 0),
                "{what}: {e:?} is Zero but the disk holds non-zero bytes there"
            ),
            ExtentKind::Data { layer, file_offset } => {
                assert!(layer < chain.len(), "{what}: {e:?}: no layer {layer}");
                let mut got = vec![0u8; e.length as usize];
                chain[layer]
                    .file()
                    .unwrap()
                    .read_exact_at(&mut got, file_offset)
                    .unwrap_or_else(|err| panic!("{what}: {e:?}: {err}"));
                assert_same(&format!("{what}: bytes of {e:?}"), &got, want);
            }
            _ => panic!("{what}: {e:?}: map() left a range to a parent"),
        }
    }
    // Sub-ranges: odd offsets and lengths, across block boundaries.
    for (o, l) in [
        (0, 1),
        (511, 2),
        (size / 3 + 17, size / 3),
        (size - 1, 1),
        (size / 2, size / 2),
    ] {
        let got = img.map(o, l).unwrap();
        check_extents_shape(&format!("{what}: map({o}, {l})"), &got, o, l);
        assert_eq!(
            got,
            clip(&all, o, l),
            "{what}: map({o}, {l}) differs from map_all clipped"
        );
    }
    assert!(
        matches!(img.map(size, 1), Err(Error::OutOfRange { offset, len: 1, .. }) if offset == size),
        "{what}: map past the end must be refused"
    );
    // Unallocated blocks of a disk with no parent to read from.
    if img.disk_type() == Format::Dynamic
        || (img.disk_type() == Format::Differencing && img.parent().is_none())
    {
        let bat = img.bat().expect("dynamic images have a BAT");
        let bs = img.block_size();
        for i in 0..img.block_count() {
            if bat.entries[i as usize] == UNALLOCATED {
                let (o, l) = (i * bs, bs.min(size - i * bs));
                let m = img.map(o, l).unwrap();
                assert_eq!(
                    m,
                    vec![Extent {
                        offset: o,
                        length: l,
                        kind: ExtentKind::Zero
                    }],
                    "{what}: unallocated block {i}"
                );
            }
        }
    }
}

/// `ext` restricted to `offset..offset+len`.
fn clip(ext: &[Extent], offset: u64, len: u64) -> Vec<Extent> {
    let end = offset + len;
    ext.iter()
        .filter(|e| e.end() > offset && e.offset < end)
        .map(|e| {
            let a = e.offset.max(offset);
            let b = e.end().min(end);
            let kind = match e.kind {
                ExtentKind::Data { layer, file_offset } => ExtentKind::Data {
                    layer,
                    file_offset: file_offset + (a - e.offset),
                },
                k => k,
            };
            Extent {
                offset: a,
                length: b - a,
                kind,
            }
        })
        .collect()
}

/// The map the construction implies: each sector from the nearest layer
/// that defines it, zeros elsewhere, neighbours merged.
fn model_extents(all: &[Fixture], name: &str) -> Vec<Extent> {
    let chain = make_testdata::chain(all, name);
    let mut out: Vec<Extent> = Vec::new();
    for s in 0..chain[0].model.size / SECTOR {
        let kind = chain
            .iter()
            .enumerate()
            .find_map(|(layer, f)| {
                f.model.present[s as usize]
                    .map(|file_offset| ExtentKind::Data { layer, file_offset })
            })
            .unwrap_or(ExtentKind::Zero);
        let e = Extent {
            offset: s * SECTOR,
            length: SECTOR,
            kind,
        };
        match out.last_mut() {
            Some(last)
                if match (last.kind, kind) {
                    (ExtentKind::Zero, ExtentKind::Zero) => true,
                    (
                        ExtentKind::Data {
                            layer: a,
                            file_offset: fa,
                        },
                        ExtentKind::Data {
                            layer: b,
                            file_offset: fb,
                        },
                    ) => a == b && fa + last.length == fb,
                    _ => false,
                } =>
            {
                last.length += SECTOR
            }
            _ => out.push(e),
        }
    }
    out
}

#[test]
fn every_file_is_tested_and_described_in_the_readme() {
    let readme = std::fs::read_to_string(testdata().join("README.md")).expect("testdata/README.md");
    let hand: Vec<String> = make_testdata::all()
        .iter()
        .map(Fixture::stored_name)
        .collect();
    let known: Vec<String> = KNOWN.iter().map(|k| k.stored.to_string()).collect();
    let mut listed = 0;
    for entry in std::fs::read_dir(testdata()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if NOT_IMAGES.contains(&name.as_str()) {
            continue;
        }
        if name.contains(".vhdx") {
            // Built and read by tests/it/vhdx.rs.
            assert!(
                crate::vhdx::vhdx_testdata_names().contains(&name.as_str()),
                "testdata/{name} is not exercised by tests/it/vhdx.rs"
            );
            assert!(
                readme.contains(&format!("`{name}`")),
                "testdata/README.md has no line for `{name}`"
            );
            continue;
        }
        listed += 1;
        assert!(
            hand.contains(&name) || known.contains(&name),
            "testdata/{name} is not exercised by tests/testdata.rs: add it to KNOWN or to \
             examples/make_testdata.rs"
        );
        assert!(
            readme.contains(&format!("`{name}`")),
            "testdata/README.md has no line for `{name}`"
        );
    }
    assert_eq!(
        listed,
        hand.len() + known.len(),
        "a file named in the tests is missing"
    );
}

#[test]
fn handmade_files_are_what_the_generator_writes() {
    let all = make_testdata::all();
    let u = Unpacked::new();
    for f in &all {
        let path = u.get(&f.stored_name());
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes == f.bytes,
            "testdata/{} differs from what examples/make_testdata.rs builds; rerun \
             `cargo run --example make_testdata --no-default-features -- testdata/` and check \
             the change",
            f.stored_name()
        );
    }
    let sidecar = std::fs::read_to_string(testdata().join("handmade.json")).unwrap();
    assert_eq!(
        sidecar,
        make_testdata::sidecar(&all),
        "testdata/handmade.json is stale"
    );
    // The generator is deterministic: a second construction is identical.
    for (a, b) in all.iter().zip(make_testdata::all()) {
        assert!(
            a.bytes == b.bytes,
            "{}: construction is not deterministic",
            a.name
        );
    }
}

#[test]
fn images_made_by_other_tools_read_as_qemu_reads_them() {
    let u = Unpacked::new();
    for k in KNOWN {
        let path = u.get(k.stored);
        let what = k.stored;
        let opts = OpenOptions::new().missing_parent_as_zero(k.parent_absent);
        let img = Image::open_with(&path, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(img.disk_type(), k.format, "{what}: format");
        assert_eq!(img.virtual_size(), k.size, "{what}: virtual size");
        assert_eq!(
            img.parent_missing(),
            k.parent_absent,
            "{what}: parent_missing"
        );
        let ours = read_all(&img, what);
        let qemu = qemu_raw(&path).unwrap_or_else(|e| panic!("{what}: qemu-img refused it: {e}"));
        assert_same(&format!("{what}: vhdkit against qemu-img"), &ours, &qemu);
        check_map(&img, &ours, what);
    }
}

#[test]
fn handmade_images_read_as_constructed() {
    let all = make_testdata::all();
    let u = Unpacked::new();
    for f in &all {
        let what = f.name.as_str();
        let path = u.chain(&all, &f.name);
        let img = Image::open(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(img.disk_type(), f.format, "{what}: format");
        assert_eq!(img.virtual_size(), f.model.size, "{what}: virtual size");
        assert_eq!(
            img.chain().len(),
            make_testdata::chain(&all, &f.name).len(),
            "{what}: chain length"
        );
        let want = make_testdata::content(&all, &f.name);
        let ours = read_all(&img, what);
        assert_same(
            &format!("{what}: vhdkit against the construction"),
            &ours,
            &want,
        );
        check_map(&img, &ours, what);
        let model_map = model_extents(&all, &f.name);
        assert_eq!(
            img.map_all().unwrap(),
            model_map,
            "{what}: map against the construction"
        );

        // qemu reads the file alone and ignores bitmaps: it must see the
        // construction's bitmap-blind view, which checks the construction.
        if f.qemu_reads {
            let qemu =
                qemu_raw(&path).unwrap_or_else(|e| panic!("{what}: qemu-img refused it: {e}"));
            assert_same(
                &format!("{what}: qemu-img against the bitmap-blind model"),
                &qemu,
                &f.model.bitmap_blind,
            );
            if f.parent.is_none() && want == f.model.bitmap_blind {
                assert_same(&format!("{what}: vhdkit against qemu-img"), &ours, &qemu);
            }
        }
    }
}

#[test]
fn clear_bitmap_bits_read_as_zero_not_as_the_stale_bytes() {
    let all = make_testdata::all();
    let u = Unpacked::new();
    let f = all
        .iter()
        .find(|f| f.name == "hand-dynamic-partial-bitmaps.vhd")
        .unwrap();
    let path = u.chain(&all, &f.name);
    let img = Image::open(&path).unwrap();
    let ours = read_all(&img, &f.name);
    let qemu = qemu_raw(&path).expect("qemu-img reads it");
    // The fixture tells a bitmap-honouring reader from one that ignores bitmaps.
    assert_ne!(
        ours, qemu,
        "the fixture must make qemu (bitmaps ignored) and vhdkit differ"
    );
    let mib = 1 << 20;
    let m = img.map(0, 2 * mib).unwrap();
    let kinds: Vec<(u64, u64, bool)> = m
        .iter()
        .map(|e| (e.offset / 512, e.length / 512, e.is_data()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, 4, true),
            (4, 5, false),
            (9, 1, true),
            (10, 6, false),
            (16, 8, true),
            (24, 976, false),
            (1000, 1000, true),
            (2000, 2095, false),
            (4095, 1, true),
        ]
    );
    // Block 3 is allocated with an all-clear bitmap: one zero extent.
    assert_eq!(
        img.map(6 * mib, 2 * mib).unwrap(),
        vec![Extent {
            offset: 6 * mib,
            length: 2 * mib,
            kind: ExtentKind::Zero
        }]
    );
    // Blocks 2 (unallocated) and 3 (all clear) merge into one zero extent.
    let tail = img.map(4 * mib, 4 * mib).unwrap();
    assert_eq!(
        tail,
        vec![Extent {
            offset: 4 * mib,
            length: 4 * mib,
            kind: ExtentKind::Zero
        }]
    );
}

#[test]
fn current_size_is_the_disk_size_not_original_size() {
    let all = make_testdata::all();
    let u = Unpacked::new();
    let path = u.chain(&all, "hand-dynamic-original-4M-current-6M.vhd");
    let img = Image::open(&path).unwrap();
    let footer = img.footer().unwrap();
    assert_eq!(footer.original_size, 4 << 20);
    assert_eq!(footer.current_size, 6 << 20);
    assert_eq!(img.virtual_size(), 6 << 20);
    let mut last = [0u8; 512];
    img.read_exact_at(&mut last, (6 << 20) - 512).unwrap();
    assert_eq!(
        &last[..8],
        &((6u64 << 20) / 512 - 1).to_be_bytes(),
        "last sector's pattern"
    );
}

#[test]
fn legacy_511_byte_footer_is_found() {
    let all = make_testdata::all();
    let u = Unpacked::new();
    let path = u.chain(&all, "hand-fixed-legacy-footer.vhd");
    assert_eq!(std::fs::metadata(&path).unwrap().len() % 512, 511);
    let img = Image::open(&path).unwrap();
    assert_eq!(img.footer_source(), Some(FooterSource::EndLegacy));
    assert_eq!(img.disk_type(), Format::Fixed);
    assert_eq!(&img.footer().unwrap().creator_app, b"vpc ");
}

/// `map(offset, len)` as (first sector, end sector, layer or None for zeros).
fn layers(img: &Image, offset: u64, len: u64) -> Vec<(u64, u64, Option<usize>)> {
    img.map(offset, len)
        .unwrap()
        .iter()
        .map(|e| {
            let layer = match e.kind {
                ExtentKind::Data { layer, .. } => Some(layer),
                _ => None,
            };
            (e.offset / 512, e.end() / 512, layer)
        })
        .collect()
}

#[test]
fn the_chain_resolves_through_w2ru_and_w2ku_locators() {
    let all = make_testdata::all();
    let u = Unpacked::new();
    let path = u.chain(&all, "hand-chain-grandchild.vhd");
    let img = Image::open(&path).unwrap();
    let names: Vec<String> = img
        .chain()
        .iter()
        .map(|i| i.path().file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "hand-chain-grandchild.vhd",
            "hand-chain-child.vhd",
            "hand-chain-base.vhd"
        ]
    );
    let header = img.header().unwrap();
    let codes: Vec<PlatformCode> = header
        .parent_locators
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.platform_code)
        .collect();
    assert_eq!(codes, [PlatformCode::W2ru, PlatformCode::W2ku]);
    assert_eq!(
        header.parent_name(),
        "C:\\vhdkit\\testdata\\hand-chain-child.vhd"
    );
    // The first 300 sectors, layer by layer (0 grandchild, 1 child, 2 base),
    // as the bitmaps in testdata/README.md say; block 1 holds only the
    // child's sectors 10..20 (the base has no block 1).
    let mib = 1 << 20;
    assert_eq!(
        layers(&img, 0, 300 * 512),
        [
            (0, 4, Some(1)),
            (4, 12, Some(0)),
            (12, 100, Some(2)),
            (100, 150, Some(1)),
            (150, 160, Some(0)),
            (160, 200, Some(1)),
            (200, 300, Some(2)),
        ]
    );
    assert_eq!(
        layers(&img, 2 * mib, 2 * mib),
        [
            (4096, 4106, None),
            (4106, 4116, Some(1)),
            (4116, 8192, None)
        ]
    );
    // Each route alone is enough: the W2ru path, the W2ku path (reduced to
    // its file name in the child's folder), the parent's unicode name.
    let base = all
        .iter()
        .find(|f| f.name == "hand-chain-base.vhd")
        .unwrap();
    // (child's file name, parent unicode name, locators)
    type Route<'a> = (&'a str, &'a str, &'a [(PlatformCode, &'a str)]);
    let routes: [Route; 3] = [
        (
            "w2ru-only.vhd",
            "",
            &[(PlatformCode::W2ru, ".\\hand-chain-base.vhd")],
        ),
        (
            "w2ku-only.vhd",
            "",
            &[(PlatformCode::W2ku, "D:\\Virtual Disks\\hand-chain-base.vhd")],
        ),
        ("name-only.vhd", "hand-chain-base.vhd", &[]),
    ];
    for (name, parent_name, locators) in routes {
        let child = make_testdata::chain_child_with(name, base, parent_name, locators);
        std::fs::write(u.dir().join(name), &child.bytes).unwrap();
        let img = Image::open(u.dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            img.parent().unwrap().footer().unwrap().unique_id,
            base.unique_id,
            "{name}"
        );
    }
    // With no route at all, the parent is not found even in the same folder.
    let lost = make_testdata::chain_child_with("no-route.vhd", base, "", &[]);
    std::fs::write(u.dir().join("no-route.vhd"), &lost.bytes).unwrap();
    expect_parent_not_found(
        Image::open(u.dir().join("no-route.vhd")),
        "no locator, no name",
    );
}

fn expect_parent_not_found(r: vhdkit::Result<Image>, what: &str) -> String {
    match r {
        Err(e @ Error::ParentNotFound { .. }) => e.to_string(),
        Err(e) => panic!("{what}: expected ParentNotFound, got {e:?}"),
        Ok(_) => panic!("{what}: expected ParentNotFound, but the image opened"),
    }
}

#[test]
fn a_parent_moved_out_of_the_folder_is_not_opened_unless_allowed() {
    let all = make_testdata::all();
    let u = Unpacked::new();
    let kids = u.dir().join("kids");
    let elsewhere = u.dir().join("elsewhere");
    std::fs::create_dir_all(&kids).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let child = unpack("hand-chain-child.vhd.gz", &kids);
    let base = unpack("hand-chain-base.vhd.gz", &elsewhere);
    let want = make_testdata::content(&all, "hand-chain-child.vhd");

    let msg = expect_parent_not_found(Image::open(&child), "default options");
    assert!(
        msg.contains("tried:") && msg.contains("hand-chain-base.vhd") && !msg.contains("--"),
        "the error says what was tried, in the library's words (the CLI adds its flags): {msg}"
    );

    let img = Image::open_with(&child, &OpenOptions::new().parent(&base)).unwrap();
    assert_same(
        "parent named with OpenOptions::parent",
        &read_all(&img, "child"),
        &want,
    );

    let img = Image::open_with(&child, &OpenOptions::new().parent_dir(&elsewhere)).unwrap();
    assert_eq!(img.parent().unwrap().path().file_name(), base.file_name());
    assert_same(
        "parent allowed with OpenOptions::parent_dir",
        &read_all(&img, "child"),
        &want,
    );

    let img = Image::open_with(&child, &OpenOptions::new().missing_parent_as_zero(true)).unwrap();
    assert!(img.parent_missing() && img.parent().is_none());
    assert!(
        !img.warnings().is_empty(),
        "a missing parent is worth a warning"
    );
}

#[test]
fn a_relative_locator_leaving_the_folder_needs_parent_dir() {
    let all = make_testdata::all();
    let u = Unpacked::new();
    let kids = u.dir().join("vms").join("kids");
    let parents = u.dir().join("vms").join("parents");
    std::fs::create_dir_all(&kids).unwrap();
    std::fs::create_dir_all(&parents).unwrap();
    unpack("hand-chain-base.vhd.gz", &parents);
    let base = all
        .iter()
        .find(|f| f.name == "hand-chain-base.vhd")
        .unwrap();
    let child = make_testdata::chain_child_with(
        "rel-child.vhd",
        base,
        "",
        &[(PlatformCode::W2ru, "..\\parents\\hand-chain-base.vhd")],
    );
    let path = kids.join("rel-child.vhd");
    std::fs::write(&path, &child.bytes).unwrap();

    let msg = expect_parent_not_found(Image::open(&path), "relative locator outside the folder");
    assert!(
        msg.contains("refused"),
        "the error says the candidate was refused: {msg}"
    );

    let img = Image::open_with(&path, &OpenOptions::new().parent_dir(&parents)).unwrap();
    let mut everything = all.clone();
    everything.push(child);
    let want = make_testdata::content(&everything, "rel-child.vhd");
    assert_same(
        "relative locator allowed by parent_dir",
        &read_all(&img, "rel-child"),
        &want,
    );
}

#[test]
fn a_parent_with_another_unique_id_is_refused() {
    let all = make_testdata::all();
    let u = Unpacked::new();
    let base_path = u.get("hand-chain-base.vhd.gz");
    let mut impostor = all
        .iter()
        .find(|f| f.name == "hand-chain-base.vhd")
        .unwrap()
        .clone();
    impostor.unique_id = make_testdata::uuid(0x99);
    let child = make_testdata::chain_child_with(
        "mismatch.vhd",
        &impostor,
        "hand-chain-base.vhd",
        &make_testdata::CHILD_LOCATORS,
    );
    let path = u.dir().join("mismatch.vhd");
    std::fs::write(&path, &child.bytes).unwrap();

    let msg = expect_parent_not_found(Image::open(&path), "id mismatch");
    assert!(
        msg.contains("unique id"),
        "the error names the id mismatch: {msg}"
    );
    let msg = expect_parent_not_found(
        Image::open_with(&path, &OpenOptions::new().parent(&base_path)),
        "id mismatch, parent named",
    );
    assert!(msg.contains("unique id"), "{msg}");

    // Read without it, on request: the child's own sectors, zeros elsewhere.
    let img = Image::open_with(&path, &OpenOptions::new().missing_parent_as_zero(true)).unwrap();
    assert!(img.parent_missing());
    assert_same(
        "mismatched parent read as zeros",
        &read_all(&img, "mismatch"),
        &child.model.data,
    );
}

/// Opens `path` on another thread, failing if it takes more than 30 s.
fn open_with_deadline(path: PathBuf, opts: OpenOptions) -> vhdkit::Result<Image> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Image::open_with(&path, &opts));
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("opening a parent loop hangs")
}

fn expect_loop(r: vhdkit::Result<Image>, what: &str) {
    match r {
        Err(Error::Corrupt(c)) if c.structure == Structure::ParentChain => {}
        Err(e) => panic!("{what}: expected a parent-chain loop error, got {e:?}"),
        Ok(_) => panic!("{what}: a parent loop opened"),
    }
}

#[test]
fn parent_loops_are_refused_without_hanging() {
    let u = Unpacked::new();
    let (ida, idb, idc) = (0x41, 0x42, 0x43);
    let a = make_testdata::differencing_stub(
        "loop-a.vhd",
        ida,
        make_testdata::uuid(idb),
        ".\\loop-b.vhd",
    );
    let b = make_testdata::differencing_stub(
        "loop-b.vhd",
        idb,
        make_testdata::uuid(ida),
        ".\\loop-a.vhd",
    );
    let me = make_testdata::differencing_stub(
        "loop-self.vhd",
        idc,
        make_testdata::uuid(idc),
        ".\\loop-self.vhd",
    );
    for f in [&a, &b, &me] {
        std::fs::write(u.dir().join(&f.name), &f.bytes).unwrap();
    }
    for name in ["loop-a.vhd", "loop-b.vhd", "loop-self.vhd"] {
        let path = u.dir().join(name);
        expect_loop(open_with_deadline(path.clone(), OpenOptions::new()), name);
        // A loop is damage, not a missing parent: refused even so.
        expect_loop(
            open_with_deadline(
                path.clone(),
                OpenOptions::new().missing_parent_as_zero(true),
            ),
            name,
        );
        expect_loop(
            open_with_deadline(
                path.clone(),
                OpenOptions::new().parent(u.dir().join("loop-a.vhd")),
            ),
            name,
        );
    }
}

#[test]
fn chain_depth_is_limited() {
    let all = make_testdata::all();
    let u = Unpacked::new();
    let path = u.chain(&all, "hand-chain-grandchild.vhd");
    match Image::open_with(&path, &OpenOptions::new().max_chain_depth(1)) {
        Err(Error::Limit { .. }) => {}
        other => panic!("a chain of 3 with a depth limit of 1: {other:?}"),
    }
    let img = Image::open_with(&path, &OpenOptions::new().max_chain_depth(2)).unwrap();
    assert_eq!(img.chain().len(), 3);
}
