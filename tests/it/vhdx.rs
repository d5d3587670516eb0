//! The VHDX reader (`vhdkit::vhdx`).
//!
//! * Images made by qemu-img and written by qemu-io (fixed and dynamic,
//!   blocks of 1 MiB to 256 MiB, logs of 1 and 3 MiB) must read as
//!   `qemu-img convert -f vhdx -O raw` reads them, byte for byte, and their
//!   map's data extents must cover every non-zero byte.
//! * Images built here byte by byte (independently of the reader) cover what
//!   qemu-img does not make: a damaged first header, a dirty log of several
//!   entries, 4096-byte logical sectors, differencing disks with partially
//!   present blocks, and the errors the reader must give.
//! * A property test opens damaged copies of the built images from memory:
//!   never a panic, a hang or an allocation out of proportion to the file.

use crate::common::{assert_same, qemu_img};
use crate::hostile::largest_allocation;
use proptest::prelude::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vhdkit::error::Structure;
use vhdkit::vhdx::{DiskType, PayloadState, Vhdx, VhdxOptions, VhdxStructure};
use vhdkit::{Error, Extent, ExtentKind};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Images made by qemu-img and qemu-io
// ---------------------------------------------------------------------------

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_io() -> &'static str {
    match Command::new("qemu-io").arg("--version").output() {
        Ok(o) if o.status.success() => "qemu-io",
        _ => panic!("QEMU-IO IS MISSING: qemu-io (qemu-utils) is required by these tests"),
    }
}

/// Creates `path` with qemu-img, writes `(pattern byte, offset, length)`
/// with qemu-io, and returns the virtual disk as qemu-img reads it.
fn qemu_vhdx(path: &Path, opts: &str, size: &str, writes: &[(u8, u64, u64)]) -> Vec<u8> {
    run(Command::new(qemu_img())
        .args(["create", "-q", "-f", "vhdx", "-o", opts])
        .arg(path)
        .arg(size));
    for &(p, off, len) in writes {
        run(Command::new(qemu_io())
            .args(["-f", "vhdx", "-c", &format!("write -P {p:#x} {off} {len}")])
            .arg(path));
    }
    let raw = path.with_extension("raw");
    run(Command::new(qemu_img())
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(path)
        .arg(&raw));
    std::fs::read(&raw).unwrap()
}

/// Extents are contiguous, cover `0..size`, and each has a length.
#[track_caller]
fn assert_tiles(extents: &[Extent], size: u64) {
    let mut pos = 0;
    for e in extents {
        assert_eq!(e.offset, pos, "extents are contiguous: {extents:?}");
        assert!(e.length > 0, "empty extent in {extents:?}");
        pos = e.end();
    }
    assert_eq!(pos, size, "extents cover the disk");
}

/// (pattern byte, offset, length) for `qemu-io -c 'write -P'`.
type Write = (u8, u64, u64);

#[test]
fn qemu_images_read_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    // (qemu-img options, size, writes, disk type)
    let cases: &[(&str, &str, &[Write], DiskType)] = &[
        (
            "subformat=dynamic,block_size=1M",
            "5M",
            &[
                (0x5a, 1000 * KIB, 300 * KIB),
                (0x11, 3 * MIB, 4096),
                (0x22, 5 * MIB - 512, 512),
            ],
            DiskType::Dynamic,
        ),
        (
            "subformat=dynamic,block_size=8M,log_size=3M",
            "30M",
            &[(0x33, 7 * MIB + 512, 2 * MIB), (0x44, 29 * MIB, MIB)],
            DiskType::Dynamic,
        ),
        (
            "subformat=dynamic,block_size=256M",
            "12M",
            &[(0x55, 0, 64 * KIB), (0x66, 12 * MIB - 4096, 4096)],
            DiskType::Dynamic,
        ),
        (
            "subformat=fixed,block_size=1M",
            "6M",
            &[(0x77, 512, 1536), (0x88, 4 * MIB, MIB + 512)],
            DiskType::Fixed,
        ),
        (
            "subformat=fixed,block_size=32M,log_size=1M",
            "40M",
            &[(0x99, 33 * MIB, 3 * MIB)],
            DiskType::Fixed,
        ),
        (
            "subformat=dynamic,block_size=2M",
            "3M",
            &[],
            DiskType::Dynamic,
        ),
    ];
    for (i, &(opts, size, writes, ty)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("q{i}.vhdx"));
        let want = qemu_vhdx(&path, opts, size, writes);
        let before = std::fs::read(&path).unwrap();
        let d = Vhdx::open(&path, &VhdxOptions::new()).unwrap_or_else(|e| panic!("{opts}: {e}"));
        let what = format!("{opts} {size}");
        assert_eq!(d.virtual_size(), want.len() as u64, "{what}");
        assert_eq!(d.disk_type(), ty, "{what}");
        let bs: u64 = opts
            .split("block_size=")
            .nth(1)
            .unwrap()
            .split(['M', ','])
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * MIB;
        assert_eq!(d.block_size(), bs, "{what}");
        assert_eq!(d.logical_sector_size(), 512, "{what}");
        assert!(matches!(d.physical_sector_size(), 512 | 4096), "{what}");
        assert!(!d.log_replayed(), "{what}: qemu leaves clean logs");
        assert!(d.warnings().is_empty(), "{what}: {:?}", d.warnings());
        assert!(!d.data_write_guid().is_zero());
        assert!(matches!(d.header_index(), 1 | 2));
        assert!(d.parent_locator().is_none());
        if ty == DiskType::Fixed {
            // qemu marks a fixed disk's blocks ZERO until they are written.
            for b in 0..d.block_count() {
                let st = d.payload_state(b).unwrap();
                assert!(
                    matches!(st, PayloadState::FullyPresent | PayloadState::Zero),
                    "{what}: block {b} {st:?}"
                );
            }
            assert!(d.allocated_blocks() > 0, "{what}");
        }

        // The whole disk at once, then in odd pieces.
        let mut got = vec![0u8; want.len()];
        d.read_exact_at(&mut got, 0).unwrap();
        assert_same(&what, &got, &want);
        let mut piece = vec![0u8; 123 * 1024 + 512];
        let mut off = 0u64;
        while off < want.len() as u64 {
            let n = piece.len().min(want.len() - off as usize);
            d.read_exact_at(&mut piece[..n], off).unwrap();
            assert_same(&what, &piece[..n], &want[off as usize..off as usize + n]);
            off += n as u64;
        }

        // Data extents cover every non-zero byte and read what they say.
        let map = d.map_all().unwrap();
        assert_tiles(&map, d.virtual_size());
        for e in &map {
            let r = e.offset as usize..e.end() as usize;
            match e.kind {
                ExtentKind::Data { layer, file_offset } => {
                    assert_eq!(layer, 0);
                    let mut b = vec![0u8; e.length as usize];
                    d.read_file_at(&mut b, file_offset).unwrap();
                    assert_same(&what, &b, &want[r]);
                }
                ExtentKind::Zero => assert!(
                    want[r].iter().all(|&x| x == 0),
                    "{what}: zero extent {e:?} holds data"
                ),
                _ => panic!("{what}: parent extent in a disk without parent"),
            }
        }
        if !writes.is_empty() {
            assert!(map.iter().any(|e| e.is_data()), "{what}");
        }
        if d.allocated_blocks() < d.block_count() {
            assert!(map.iter().any(|e| !e.is_data()), "{what}");
        }
        // A range straddling the end is refused; the file is untouched.
        let mut two = [0u8; 2];
        assert!(d.read_exact_at(&mut two, d.virtual_size() - 1).is_err());
        assert!(d.map(d.virtual_size(), 1).is_err());
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "{what}: input modified"
        );
    }
}

// ---------------------------------------------------------------------------
// Images built byte by byte
// ---------------------------------------------------------------------------

fn put(b: &mut [u8], at: u64, v: &[u8]) {
    b[at as usize..at as usize + v.len()].copy_from_slice(v);
}
fn put16(b: &mut [u8], at: u64, v: u16) {
    put(b, at, &v.to_le_bytes())
}
fn put32(b: &mut [u8], at: u64, v: u32) {
    put(b, at, &v.to_le_bytes())
}
fn put64(b: &mut [u8], at: u64, v: u64) {
    put(b, at, &v.to_le_bytes())
}

/// CRC-32C of `b` with bytes 4..8 taken as zero, stored there.
fn seal(b: &mut [u8]) {
    b[4..8].fill(0);
    let c = crc32c::crc32c(b);
    b[4..8].copy_from_slice(&c.to_le_bytes());
}

/// A GUID from its text form, stored as VHDX stores it.
fn guid(s: &str) -> [u8; 16] {
    let h: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let x: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut g = [0u8; 16];
    g[..4].copy_from_slice(&[x[3], x[2], x[1], x[0]]);
    g[4..6].copy_from_slice(&[x[5], x[4]]);
    g[6..8].copy_from_slice(&[x[7], x[6]]);
    g[8..].copy_from_slice(&x[8..]);
    g
}

const BAT_GUID: &str = "2DC27766-F623-4200-9D64-115E9BFD4A08";
const META_GUID: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
const LOG_GUID: &str = "0A0B0C0D-1111-2222-3333-444455556666";
const DATA_WRITE_GUID: &str = "DEADBEEF-0000-4000-8000-000000000001";

const LOG_AT: u64 = MIB;
const BAT_AT: u64 = 2 * MIB;
const META_AT: u64 = 3 * MIB;
/// Payload and bitmap blocks start here.
const DATA_AT: u64 = 4 * MIB;

#[derive(Clone)]
struct Disk {
    virtual_size: u64,
    block_size: u32,
    lss: u32,
    has_parent: bool,
    leave_allocated: bool,
    /// (payload block, state, file offset in MiB)
    payload: Vec<(u64, u8, u64)>,
    /// (chunk, file offset in MiB) of present sector bitmap blocks.
    bitmaps: Vec<(u64, u64)>,
    locator: Vec<(&'static str, &'static str)>,
    /// Sequence numbers of headers 1 and 2.
    seqs: (u64, u64),
    log_guid: [u8; 16],
    data_write_guid: [u8; 16],
    file_len: u64,
}

impl Disk {
    fn new(virtual_size: u64, block_size: u32, lss: u32) -> Disk {
        Disk {
            virtual_size,
            block_size,
            lss,
            has_parent: false,
            leave_allocated: false,
            payload: vec![],
            bitmaps: vec![],
            locator: vec![],
            seqs: (1, 2),
            log_guid: [0; 16],
            data_write_guid: guid(DATA_WRITE_GUID),
            file_len: DATA_AT,
        }
    }

    fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * u64::from(self.lss) / u64::from(self.block_size)
    }

    fn build(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.file_len as usize];
        put(&mut b, 0, b"vhdxfile");
        put(
            &mut b,
            8,
            &"vhdkit test"
                .encode_utf16()
                .flat_map(u16::to_le_bytes)
                .collect::<Vec<_>>(),
        );
        for (at, seq) in [(64 * KIB, self.seqs.0), (128 * KIB, self.seqs.1)] {
            let h = &mut b[at as usize..at as usize + 4096];
            put(h, 0, b"head");
            put64(h, 8, seq);
            put(h, 16, &guid("11111111-2222-3333-4444-555555555555"));
            put(h, 32, &self.data_write_guid);
            put(h, 48, &self.log_guid);
            put16(h, 64, 0);
            put16(h, 66, 1);
            put32(h, 68, MIB as u32);
            put64(h, 72, LOG_AT);
            seal(h);
        }
        for at in [192 * KIB, 256 * KIB] {
            let t = &mut b[at as usize..at as usize + 65536];
            put(t, 0, b"regi");
            put32(t, 8, 2);
            put(t, 16, &guid(BAT_GUID));
            put64(t, 32, BAT_AT);
            put32(t, 40, MIB as u32);
            put32(t, 44, 1);
            put(t, 48, &guid(META_GUID));
            put64(t, 64, META_AT);
            put32(t, 72, MIB as u32);
            put32(t, 76, 1);
            seal(t);
        }
        // Metadata: the table, then the items from 64 KiB.
        let m = META_AT;
        put(&mut b, m, b"metadata");
        let mut items: Vec<(&str, Vec<u8>, u32)> = vec![
            (
                "CAA16737-FA36-4D43-B3B6-33F0AA44E76B",
                [
                    self.block_size.to_le_bytes(),
                    (u32::from(self.leave_allocated) | u32::from(self.has_parent) << 1)
                        .to_le_bytes(),
                ]
                .concat(),
                4,
            ),
            (
                "2FA54224-CD1B-4876-B211-5DBED83BF4B8",
                self.virtual_size.to_le_bytes().to_vec(),
                6,
            ),
            (
                "BECA12AB-B2E6-4523-93EF-C309E000C746",
                guid("C0FFEE00-1234-5678-9ABC-DEF012345678").to_vec(),
                6,
            ),
            (
                "8141BF1D-A96F-4709-BA47-F233A8FAAB5F",
                self.lss.to_le_bytes().to_vec(),
                6,
            ),
            (
                "CDA348C7-445D-4471-9CC9-E9885251C556",
                4096u32.to_le_bytes().to_vec(),
                6,
            ),
        ];
        if self.has_parent {
            let mut pl = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913").to_vec();
            pl.extend_from_slice(&[0, 0]);
            pl.extend_from_slice(&(self.locator.len() as u16).to_le_bytes());
            let mut strings = Vec::new();
            let mut at = 20 + 12 * self.locator.len();
            for (k, v) in &self.locator {
                let k: Vec<u8> = k.encode_utf16().flat_map(u16::to_le_bytes).collect();
                let v: Vec<u8> = v.encode_utf16().flat_map(u16::to_le_bytes).collect();
                pl.extend_from_slice(&(at as u32).to_le_bytes());
                pl.extend_from_slice(&((at + k.len()) as u32).to_le_bytes());
                pl.extend_from_slice(&(k.len() as u16).to_le_bytes());
                pl.extend_from_slice(&(v.len() as u16).to_le_bytes());
                at += k.len() + v.len();
                strings.extend_from_slice(&k);
                strings.extend_from_slice(&v);
            }
            pl.extend_from_slice(&strings);
            items.push(("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C", pl, 4));
        }
        put16(&mut b, m + 10, items.len() as u16);
        let mut off = 64 * KIB;
        for (i, (id, data, flags)) in items.iter().enumerate() {
            let e = m + 32 + 32 * i as u64;
            put(&mut b, e, &guid(id));
            put32(&mut b, e + 16, off as u32);
            put32(&mut b, e + 20, data.len() as u32);
            put32(&mut b, e + 24, *flags);
            put(&mut b, m + off, data);
            off += 4096;
        }
        // BAT.
        let cr = self.chunk_ratio();
        for &(block, state, mb) in &self.payload {
            put64(
                &mut b,
                BAT_AT + 8 * (block + block / cr),
                mb << 20 | u64::from(state),
            );
        }
        for &(chunk, mb) in &self.bitmaps {
            put64(&mut b, BAT_AT + 8 * (chunk * (cr + 1) + cr), mb << 20 | 6);
        }
        b
    }
}

/// A recognisable non-zero byte for each file offset.
fn pattern(seed: u8, off: u64) -> u8 {
    ((off / 512) as u8).wrapping_mul(31) ^ (off as u8) ^ seed | 1
}

fn fill_pattern(b: &mut [u8], at: u64, len: u64, seed: u8) {
    for o in at..at + len {
        b[o as usize] = pattern(seed, o);
    }
}

fn open_mem(bytes: &[u8]) -> vhdkit::Result<Vhdx> {
    Vhdx::from_source(Box::new(bytes.to_vec()), &VhdxOptions::new())
}

fn read_all(d: &Vhdx) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read_exact_at(&mut v, 0).unwrap();
    v
}

#[track_caller]
fn assert_corrupt(r: vhdkit::Result<Vhdx>, s: VhdxStructure, field: &str, offset: u64) {
    match r {
        Err(Error::Corrupt(c)) => {
            assert_eq!(c.structure, Structure::Vhdx(s), "{c}");
            assert_eq!(c.field, field, "{c}");
            assert_eq!(c.offset, offset, "{c}");
        }
        Err(e) => panic!("expected a corrupt {s}.{field}, got {e}"),
        Ok(_) => panic!("expected a corrupt {s}.{field}, the file opened"),
    }
}

/// A dynamic disk of 3 MiB in 1 MiB blocks, block 1 fully present at 4 MiB.
fn small_dynamic() -> (Disk, Vec<u8>) {
    let mut d = Disk::new(3 * MIB, MIB as u32, 512);
    d.payload = vec![(1, 6, 4)];
    d.file_len = 5 * MIB;
    let mut b = d.build();
    fill_pattern(&mut b, 4 * MIB, MIB, 0x40);
    (d, b)
}

#[test]
fn built_dynamic_disk_reads_its_block() {
    let (_, b) = small_dynamic();
    let d = open_mem(&b).unwrap();
    assert_eq!(d.disk_type(), DiskType::Dynamic);
    assert_eq!(d.virtual_size(), 3 * MIB);
    assert_eq!(d.physical_sector_size(), 4096);
    assert_eq!(d.header_index(), 2);
    assert_eq!(d.header_sequence(), 2);
    assert_eq!(d.data_write_guid().to_string(), DATA_WRITE_GUID);
    assert_eq!(
        d.page83_id().to_string(),
        "C0FFEE00-1234-5678-9ABC-DEF012345678"
    );
    assert_eq!(d.chunk_ratio(), 4096);
    assert_eq!(d.payload_state(0), Some(PayloadState::NotPresent));
    assert_eq!(d.payload_state(1), Some(PayloadState::FullyPresent));
    let map = d.map_all().unwrap();
    assert_eq!(
        map,
        vec![
            Extent {
                offset: 0,
                length: MIB,
                kind: ExtentKind::Zero
            },
            Extent {
                offset: MIB,
                length: MIB,
                kind: ExtentKind::Data {
                    layer: 0,
                    file_offset: 4 * MIB
                }
            },
            Extent {
                offset: 2 * MIB,
                length: MIB,
                kind: ExtentKind::Zero
            },
        ]
    );
    let v = read_all(&d);
    assert_same(
        "block 1",
        &v[MIB as usize..2 * MIB as usize],
        &b[4 * MIB as usize..],
    );
    assert!(v[..MIB as usize].iter().all(|&x| x == 0));
}

#[test]
fn the_valid_header_with_the_larger_sequence_number_is_used() {
    let (mut d, _) = small_dynamic();
    d.seqs = (11, 10);
    let b = d.build();
    let v = open_mem(&b).unwrap();
    assert_eq!((v.header_index(), v.header_sequence()), (1, 11));
    assert!(v.warnings().is_empty());

    // Header 1 is newer but damaged: header 2 is used, and that is said.
    let mut bad = b.clone();
    bad[64 * KIB as usize + 200] ^= 0x01;
    let v = open_mem(&bad).unwrap();
    assert_eq!((v.header_index(), v.header_sequence()), (2, 10));
    assert!(
        v.warnings()
            .iter()
            .any(|w| w.contains("header 1 is damaged") && w.contains("header 2")),
        "{:?}",
        v.warnings()
    );
    assert_eq!(read_all(&v), read_all(&open_mem(&b).unwrap()));

    // Header 1's signature gone, header 2 damaged too: the file is refused,
    // naming header 1.
    bad[64 * KIB as usize] = b'x';
    let mut both = bad.clone();
    both[128 * KIB as usize + 300] ^= 0x80;
    assert_corrupt(
        open_mem(&both),
        VhdxStructure::Header(1),
        "signature",
        64 * KIB,
    );
    bad[64 * KIB as usize] = b'h';
    both[64 * KIB as usize] = b'h';
    assert_corrupt(
        open_mem(&both),
        VhdxStructure::Header(1),
        "checksum",
        64 * KIB + 4,
    );

    // Equal sequence numbers with different contents: neither can be trusted.
    d.seqs = (7, 7);
    let mut b = d.build();
    put(&mut b, 128 * KIB + 16, &[9u8; 16]);
    seal(&mut b[128 * KIB as usize..128 * KIB as usize + 4096]);
    assert_corrupt(
        open_mem(&b),
        VhdxStructure::Header(2),
        "sequence number",
        128 * KIB + 8,
    );
}

#[test]
fn a_damaged_first_region_table_gives_way_to_the_second() {
    let (_, mut b) = small_dynamic();
    b[192 * KIB as usize + 40] ^= 0xff;
    let v = open_mem(&b).unwrap();
    assert_eq!(v.region_table_index(), 2);
    assert!(v.warnings().iter().any(|w| w.contains("region table 1")));
    b[256 * KIB as usize + 40] ^= 0xff;
    assert_corrupt(
        open_mem(&b),
        VhdxStructure::RegionTable(1),
        "checksum",
        192 * KIB + 4,
    );
}

#[test]
fn rules_broken_are_named_with_structure_field_and_offset() {
    let (d, b) = small_dynamic();
    let mut x = b.clone();
    x[3] = b'X';
    assert_corrupt(open_mem(&x), VhdxStructure::FileIdentifier, "signature", 0);
    // Opened by name, the error names the file.
    let dir = tempfile::tempdir().unwrap();
    let named = dir.path().join("x.vhdx");
    std::fs::write(&named, &x).unwrap();
    match Vhdx::open(&named, &VhdxOptions::new()) {
        Err(Error::Corrupt(c)) => assert_eq!(c.path.as_deref(), Some(named.as_path())),
        other => panic!("expected a corrupt file identifier, got {other:?}"),
    }
    let f = std::fs::File::open(&named).unwrap();
    match Vhdx::from_file(f, &named, &VhdxOptions::new()) {
        Err(Error::Corrupt(c)) => assert_eq!(c.path.as_deref(), Some(named.as_path())),
        other => panic!("expected a corrupt file identifier, got {other:?}"),
    }
    assert_corrupt(
        open_mem(&b[..100]),
        VhdxStructure::Header(1),
        "signature",
        64 * KIB,
    );

    // A payload block past the end of the file.
    let mut e = d.clone();
    e.payload = vec![(1, 6, 5)];
    assert_corrupt(
        open_mem(&e.build()),
        VhdxStructure::BatEntry(1),
        "file offset",
        BAT_AT + 8,
    );
    // A block inside the first MiB (the headers).
    e.payload = vec![(2, 6, 0)];
    assert_corrupt(
        open_mem(&e.build()),
        VhdxStructure::BatEntry(2),
        "file offset",
        BAT_AT + 16,
    );
    // Partially present without a parent; a reserved state.
    e.payload = vec![(0, 7, 4)];
    assert_corrupt(
        open_mem(&e.build()),
        VhdxStructure::BatEntry(0),
        "state",
        BAT_AT,
    );
    e.payload = vec![(2, 5, 4)];
    assert_corrupt(
        open_mem(&e.build()),
        VhdxStructure::BatEntry(2),
        "state",
        BAT_AT + 16,
    );

    // Block sizes and sector sizes outside the rules.
    for (bs, lss) in [
        (MIB as u32 / 2, 512),
        (3 * MIB as u32, 512),
        (512 << 20, 512),
    ] {
        let e = Disk {
            block_size: bs,
            lss,
            ..d.clone()
        };
        assert_corrupt(
            open_mem(&e.build()),
            VhdxStructure::Metadata,
            "block size",
            META_AT + 64 * KIB,
        );
    }
    let e = Disk {
        lss: 1024,
        ..d.clone()
    };
    assert_corrupt(
        open_mem(&e.build()),
        VhdxStructure::Metadata,
        "logical sector size",
        META_AT + 64 * KIB + 3 * 4096,
    );
    let e = Disk {
        virtual_size: 3 * MIB + 100,
        ..d.clone()
    };
    assert_corrupt(
        open_mem(&e.build()),
        VhdxStructure::Metadata,
        "virtual disk size",
        META_AT + 64 * KIB + 4096,
    );

    // A region vhdkit does not know, marked required: unsupported.
    let mut u = b.clone();
    for at in [192 * KIB, 256 * KIB] {
        let t = &mut u[at as usize..at as usize + 65536];
        put32(t, 8, 3);
        put(t, 80, &guid("01234567-89AB-CDEF-0123-456789ABCDEF"));
        put64(t, 96, 4 * MIB);
        put32(t, 104, MIB as u32);
        put32(t, 108, 1);
        seal(t);
    }
    match open_mem(&u) {
        Err(Error::Unsupported { what, .. }) => {
            assert!(
                what.contains("01234567-89AB-CDEF-0123-456789ABCDEF"),
                "{what}"
            )
        }
        other => panic!("expected unsupported, got {other:?}"),
    }
    // The same region, optional: ignored with a warning.
    for at in [192 * KIB, 256 * KIB] {
        let t = &mut u[at as usize..at as usize + 65536];
        put32(t, 108, 0);
        seal(t);
    }
    let v = open_mem(&u).unwrap();
    assert!(v.warnings().iter().any(|w| w.contains("optional region")));

    // A BAT region too small for the disk.
    let big = Disk {
        virtual_size: 1 << 40,
        ..d.clone()
    };
    let r = Vhdx::from_source(
        Box::new(big.build()),
        &VhdxOptions::new().max_bat_entries(100),
    );
    assert!(matches!(r, Err(Error::Limit { .. })), "{r:?}");
    assert_corrupt(
        open_mem(&big.build()),
        VhdxStructure::RegionTable(1),
        "length",
        192 * KIB,
    );
}

// ---------------------------------------------------------------------------
// The log
// ---------------------------------------------------------------------------

enum Desc {
    Zero(u64, u64),
    Data(u64, Vec<u8>),
}

/// One log entry, its checksum computed.
/// Its flushed file offset is 5 MiB (the built files' length), its last
/// file offset `last`.
fn log_entry(seq: u64, tail: u32, log_guid: [u8; 16], last: u64, descs: &[Desc]) -> Vec<u8> {
    let n = descs.len() as u64;
    let dsec = (n + 2).div_ceil(128);
    let data: Vec<&Vec<u8>> = descs
        .iter()
        .filter_map(|d| match d {
            Desc::Data(_, s) => Some(s),
            Desc::Zero(..) => None,
        })
        .collect();
    let len = (dsec + data.len() as u64) * 4096;
    let mut e = vec![0u8; len as usize];
    put(&mut e, 0, b"loge");
    put32(&mut e, 8, len as u32);
    put32(&mut e, 12, tail);
    put64(&mut e, 16, seq);
    put32(&mut e, 24, n as u32);
    put(&mut e, 32, &log_guid);
    put64(&mut e, 48, 5 * MIB);
    put64(&mut e, 56, last);
    for (i, d) in descs.iter().enumerate() {
        let at = 64 + 32 * i as u64;
        match d {
            Desc::Zero(off, l) => {
                put(&mut e, at, b"zero");
                put64(&mut e, at + 8, *l);
                put64(&mut e, at + 16, *off);
            }
            Desc::Data(off, s) => {
                put(&mut e, at, b"desc");
                put(&mut e, at + 4, &s[4092..]);
                put(&mut e, at + 8, &s[..8]);
                put64(&mut e, at + 16, *off);
            }
        }
        put64(&mut e, at + 24, seq);
    }
    for (k, s) in data.iter().enumerate() {
        let at = (dsec + k as u64) * 4096;
        put(&mut e, at, b"data");
        put32(&mut e, at + 4, (seq >> 32) as u32);
        put(&mut e, at + 8, &s[8..4092]);
        put32(&mut e, at + 4092, seq as u32);
    }
    seal(&mut e);
    e
}

/// A 4 MiB dynamic disk whose BAT says nothing is allocated, with a dirty
/// log of three entries (sequence 20, 21, 22) that allocates blocks 0 (at
/// 4 MiB, in the file) and 1 (at 5 MiB, past the file's end: the log's last
/// file offset grows the file), writes block 1's first sector and zeroes
/// 8 KiB of block 0. After them, a stale entry of another sequence that
/// would allocate block 3 if it were wrongly replayed. The first entry
/// starts at log offset `start` (entries wrap around the end of the log);
/// the head names entry `tail` (0, 1 or 2) as its tail. Returns the file,
/// the virtual disk after replay (when the tail is entry 0) and the log
/// offsets of the three entries.
/// The last file offset of the dirty log's entries: past the file's 5 MiB
/// (block 1 lies beyond the file), and not a whole MiB (qemu grows the file
/// only then).
const LAST: u64 = 6 * MIB + 4096;

fn dirty_log(start: u64, tail: usize) -> (Vec<u8>, Vec<u8>, [u64; 3]) {
    let lg = guid(LOG_GUID);
    let mut d = Disk::new(4 * MIB, MIB as u32, 512);
    d.log_guid = lg;
    d.file_len = 5 * MIB;
    let mut b = d.build();
    fill_pattern(&mut b, 4 * MIB, MIB, 0x10);
    // The BAT's first sector as it should become.
    let mut bat = b[BAT_AT as usize..BAT_AT as usize + 4096].to_vec();
    put64(&mut bat, 0, 4 << 20 | 6);
    put64(&mut bat, 8, 5 << 20 | 6);
    let mut sector = vec![0x77u8; 4096];
    sector[..8].copy_from_slice(b"leading!");
    sector[4092..].copy_from_slice(b"tail");
    // Two data descriptors, one data sector each: 2 sectors per entry but
    // the third (zero descriptors only: 1 sector).
    let at = [start, (start + 2 * 4096) % MIB, (start + 4 * 4096) % MIB];
    let first = at[0] as u32;
    let e1 = log_entry(20, first, lg, LAST, &[Desc::Data(BAT_AT, bat)]);
    let e2 = log_entry(21, first, lg, LAST, &[Desc::Data(5 * MIB, sector.clone())]);
    let e3 = log_entry(
        22,
        at[tail] as u32,
        lg,
        LAST,
        &[
            Desc::Zero(4 * MIB + 8192, 8192),
            Desc::Zero(5 * MIB + 8192, 4096),
        ],
    );
    let mut stale_bat = vec![0u8; 4096];
    put64(&mut stale_bat, 24, 4 << 20 | 6);
    let stale = log_entry(5, 0, lg, 5 * MIB, &[Desc::Data(BAT_AT, stale_bat)]);
    let mut pos = start;
    for e in [&e1, &e2, &e3, &stale] {
        for s in e.chunks(4096) {
            put(&mut b, LOG_AT + pos, s);
            pos = (pos + 4096) % MIB;
        }
    }
    let mut want = vec![0u8; 4 * MIB as usize];
    want[..MIB as usize].copy_from_slice(&b[4 * MIB as usize..]);
    want[8192..16384].fill(0);
    want[MIB as usize..MIB as usize + 4096].copy_from_slice(&sector);
    (b, want, at)
}

#[test]
fn a_dirty_log_is_replayed_in_memory() {
    let (b, want, _) = dirty_log(0, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty.vhdx");
    std::fs::write(&path, &b).unwrap();
    let d = Vhdx::open(&path, &VhdxOptions::new()).unwrap();
    let r = d.log_replay().expect("the log was replayed").clone();
    assert_eq!(r.entries, 3);
    assert_eq!((r.first_sequence, r.last_sequence), (20, 22));
    assert_eq!(r.data_sectors, 2);
    assert_eq!(r.zeroed_bytes, 12288);
    assert_eq!(r.tail_offset, 0);
    assert_eq!(r.file_length, LAST);
    assert_eq!(d.payload_state(0), Some(PayloadState::FullyPresent));
    assert_eq!(d.payload_state(1), Some(PayloadState::FullyPresent));
    assert_eq!(
        d.payload_state(3),
        Some(PayloadState::NotPresent),
        "stale entry replayed"
    );
    assert_same("replayed disk", &read_all(&d), &want);
    // What reads as on disk, and what the replay changed or added.
    assert!(d.is_plain(4 * MIB, 8192));
    assert!(!d.is_plain(4 * MIB + 8192, 1), "zeroed by the log");
    assert!(!d.is_plain(BAT_AT, 8), "written by the log");
    assert!(!d.is_plain(5 * MIB - 4096, 8192), "past the file's end");
    // The file was not written.
    assert_eq!(std::fs::read(&path).unwrap(), b);

    // The same log with a clean header (log GUID zero): nothing replayed.
    let mut clean = b.clone();
    for at in [64 * KIB, 128 * KIB] {
        let h = &mut clean[at as usize..at as usize + 4096];
        h[48..64].fill(0);
        seal(h);
    }
    let d = open_mem(&clean).unwrap();
    assert!(!d.log_replayed());
    assert!(read_all(&d).iter().all(|&x| x == 0));
}

/// qemu replays a log only when it may write the file: it does so on a
/// copy (`qemu-img check -r all`), and then reads what vhdkit reads from
/// the untouched original. (qemu ignores the head's tail field and, for a
/// sequence that wraps round the end of the log, keeps the part after the
/// wrap: the other variants of `dirty_log` are where it and the
/// specification part ways, and are checked against the specification
/// only, below.)
#[test]
fn qemu_replays_the_dirty_logs_as_vhdkit_does() {
    let dir = tempfile::tempdir().unwrap();
    for (start, tail) in [(0, 0), (40 * 4096, 0)] {
        let (b, _, _) = dirty_log(start, tail);
        let ours = read_all(&open_mem(&b).unwrap());
        let copy = dir.path().join("copy.vhdx");
        std::fs::write(&copy, &b).unwrap();
        let out = Command::new(qemu_img())
            .args(["check", "-r", "all", "-f", "vhdx"])
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let raw = dir.path().join("copy.raw");
        run(Command::new(qemu_img())
            .args(["convert", "-f", "vhdx", "-O", "raw"])
            .arg(&copy)
            .arg(&raw));
        let theirs = std::fs::read(&raw).unwrap();
        assert_same(&format!("log from {start}, tail {tail}"), &ours, &theirs);
        assert!(ours.iter().any(|&x| x != 0));
    }
}

#[test]
fn log_entries_wrap_around_the_end_of_the_log() {
    // The first entry's data sector is the log's first sector; the second
    // entry starts there too.
    for start in [MIB - 4096, MIB - 8192] {
        let (b, want, at) = dirty_log(start, 0);
        let d = open_mem(&b).unwrap();
        let r = d.log_replay().expect("replayed");
        assert_eq!((r.entries, r.tail_offset), (3, start), "start {start}");
        assert_eq!(at[1], (start + 8192) % MIB);
        assert_same("wrapped log", &read_all(&d), &want);
    }
}

#[test]
fn only_the_entries_from_the_heads_tail_are_replayed() {
    let (b, _, [_, e2_at, _]) = dirty_log(0, 0);
    let (b2, _, _) = dirty_log(0, 1);
    assert_ne!(b, b2);
    let d = open_mem(&b2).unwrap();
    let r = d.log_replay().unwrap();
    assert_eq!((r.entries, r.first_sequence, r.tail_offset), (2, 21, e2_at));
    // The BAT update (entry 20) was not replayed: nothing is allocated, but
    // the sector entry 21 wrote is in the replayed file.
    assert_eq!(d.payload_state(0), Some(PayloadState::NotPresent));
    assert!(read_all(&d).iter().all(|&x| x == 0));
    let mut s = vec![0u8; 4096];
    d.read_file_at(&mut s, 5 * MIB).unwrap();
    assert_eq!(&s[..8], b"leading!");
    assert_eq!(&s[4092..], b"tail");
    assert!(s[8..4092].iter().all(|&x| x == 0x77));
}

#[test]
fn a_log_that_cannot_be_replayed_is_an_error_that_says_why() {
    let (mut b, _, [_, _, e3_at]) = dirty_log(0, 0);
    // The head says 6 MiB were flushed to the file, which has 5: it was cut.
    let at = LOG_AT + e3_at;
    put64(&mut b, at + 48, 6 * MIB);
    let len = u32::from_le_bytes(b[at as usize + 8..at as usize + 12].try_into().unwrap());
    seal(&mut b[at as usize..(at + u64::from(len)) as usize]);
    let e = open_mem(&b).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("cannot be replayed"), "{text}");
    assert_corrupt(
        Err(e),
        VhdxStructure::LogEntry(e3_at),
        "flushed file offset",
        at + 48,
    );

    // A log GUID that no entry carries: a warning, nothing replayed.
    let (mut b, _, _) = dirty_log(0, 0);
    for at in [64 * KIB, 128 * KIB] {
        let h = &mut b[at as usize..at as usize + 4096];
        h[48] ^= 0xff;
        seal(h);
    }
    let d = open_mem(&b).unwrap();
    assert!(!d.log_replayed());
    assert!(d.warnings().iter().any(|w| w.contains("no valid sequence")));
}

/// Zero descriptors may name ranges far past the file (the entry's last
/// file offset allows it): they cost nothing, and their sum saturates.
#[test]
fn huge_zero_descriptors_cost_nothing() {
    let lg = guid(LOG_GUID);
    let (mut d, _) = small_dynamic();
    d.log_guid = lg;
    let mut b = d.build();
    fill_pattern(&mut b, 4 * MIB, MIB, 0x40);
    let last = u64::MAX - 4095;
    let e = log_entry(
        7,
        0,
        lg,
        last,
        &[
            Desc::Zero(8 * MIB, 1 << 63),
            Desc::Zero(8 * MIB, 1 << 63),
            Desc::Zero(4 * MIB + 4096, 4096),
        ],
    );
    put(&mut b, LOG_AT, &e);
    let (r, largest) =
        largest_allocation(|| open_mem(&b).map(|v| (v.log_replay().cloned(), read_all(&v))));
    let (replay, disk) = r.unwrap();
    let replay = replay.expect("replayed");
    assert_eq!(replay.zeroed_bytes, u64::MAX);
    assert_eq!(replay.file_length, last);
    assert!(largest <= 4 * b.len(), "{largest}");
    // Block 1 (file offset 4 MiB) with its second 4 KiB zeroed.
    let mut want = b[4 * MIB as usize..].to_vec();
    want[4096..8192].fill(0);
    assert_same("block 1", &disk[MIB as usize..2 * MIB as usize], &want);
}

#[test]
fn a_log_entry_with_a_bad_checksum_ends_the_sequence() {
    let (mut b, _, [_, e2_at, _]) = dirty_log(0, 0);
    // Damage entry 21: entry 20 alone names itself as tail and is replayed;
    // entry 22 begins another chain whose tail (entry 20) is not in it.
    b[(LOG_AT + e2_at + 4096 + 100) as usize] ^= 1;
    let d = open_mem(&b).unwrap();
    let r = d.log_replay().unwrap();
    assert_eq!((r.entries, r.first_sequence, r.last_sequence), (1, 20, 20));
    let v = read_all(&d);
    assert_same("block 0", &v[..MIB as usize], &b[4 * MIB as usize..]);
    assert!(v[MIB as usize..].iter().all(|&x| x == 0));
}

// ---------------------------------------------------------------------------
// Differencing disks and partially present blocks
// ---------------------------------------------------------------------------

/// A differencing disk of 3 blocks of 1 MiB: block 0 fully present (at
/// 4 MiB), block 1 partially present (at 5 MiB; sectors 0..8, 100 and the
/// last 8 set in the bitmap at 6 MiB), block 2 not present.
pub(crate) fn differencing(lss: u32) -> (Vec<u8>, Vec<Extent>) {
    let mut d = Disk::new(3 * MIB, MIB as u32, lss);
    d.has_parent = true;
    d.payload = vec![(0, 6, 4), (1, 7, 5), (2, 0, 0)];
    d.bitmaps = vec![(0, 6)];
    d.locator = vec![
        ("parent_linkage", "{DEADBEEF-0000-4000-8000-0000000000AA}"),
        ("absolute_win32_path", "C:\\vms\\base.vhdx"),
        ("relative_path", "..\\base.vhdx"),
    ];
    d.file_len = 7 * MIB;
    let mut b = d.build();
    fill_pattern(&mut b, 4 * MIB, 2 * MIB, 0x20);
    let l = u64::from(lss);
    let spb = MIB / l;
    let set = |b: &mut Vec<u8>, s: u64| {
        let bit = spb + s; // block 1 of the chunk
        b[(6 * MIB + bit / 8) as usize] |= 1 << (bit % 8);
    };
    let last = spb - 8;
    for s in (0..8).chain([100]).chain(last..spb) {
        set(&mut b, s);
    }
    let data = |v: u64, len: u64, f: u64| Extent {
        offset: v,
        length: len,
        kind: ExtentKind::Data {
            layer: 0,
            file_offset: f,
        },
    };
    let parent = |v: u64, len: u64| Extent {
        offset: v,
        length: len,
        kind: ExtentKind::Parent,
    };
    let want = vec![
        // Block 0 and block 1's first sectors continue each other in the file.
        data(0, MIB + 8 * l, 4 * MIB),
        parent(MIB + 8 * l, 92 * l),
        data(MIB + 100 * l, l, 5 * MIB + 100 * l),
        parent(MIB + 101 * l, (last - 101) * l),
        data(MIB + last * l, 8 * l, 5 * MIB + last * l),
        parent(2 * MIB, MIB),
    ];
    (b, want)
}

#[test]
fn partially_present_blocks_leave_clear_sectors_to_the_parent() {
    for lss in [512u32, 4096] {
        let (b, want) = differencing(lss);
        let d = open_mem(&b).unwrap_or_else(|e| panic!("lss {lss}: {e}"));
        assert_eq!(d.disk_type(), DiskType::Differencing);
        assert_eq!(d.logical_sector_size(), lss);
        assert_eq!(d.chunk_ratio(), (1u64 << 23) * u64::from(lss) / MIB);
        assert_eq!(d.payload_state(1), Some(PayloadState::PartiallyPresent));
        assert_eq!(d.map_all().unwrap(), want, "lss {lss}");
        // A map of a range inside the block agrees with the whole map.
        let l = u64::from(lss);
        let part = d.map(MIB + 4 * l, 100 * l).unwrap();
        assert_eq!(part[0].offset, MIB + 4 * l);
        assert!(part[0].is_data() && part[0].length == 4 * l, "{part:?}");
        assert_eq!(part[1].kind, ExtentKind::Parent);
        assert_eq!(part.last().unwrap().end(), MIB + 104 * l);
        // Reading: the file's bytes where the bits are set, zeros (no parent
        // opened) elsewhere.
        let v = read_all(&d);
        for e in &want {
            let got = &v[e.offset as usize..e.end() as usize];
            match e.kind {
                ExtentKind::Data { file_offset, .. } => assert_same(
                    "data",
                    got,
                    &b[file_offset as usize..(file_offset + e.length) as usize],
                ),
                _ => assert!(got.iter().all(|&x| x == 0)),
            }
        }
        let pl = d.parent_locator().expect("a parent locator");
        assert_eq!(
            pl.parent_linkage(),
            Some("{DEADBEEF-0000-4000-8000-0000000000AA}")
        );
        assert_eq!(
            pl.parent_linkage_guid().map(|g| g.to_string()).as_deref(),
            Some("DEADBEEF-0000-4000-8000-0000000000AA")
        );
        assert_eq!(
            pl.paths(),
            vec![
                ("relative_path", "..\\base.vhdx"),
                ("absolute_win32_path", "C:\\vms\\base.vhdx")
            ]
        );
        assert_eq!(pl.entries.len(), 3);
    }
}

/// libvhdi (`pip install libvhdi-python`), an independent reader that
/// reads differencing VHDX files, reads the differencing disks of
/// [`differencing`] over a parent as vhdkit's map says: the child's sectors
/// where the sector bitmap bit is set, the parent's elsewhere. This checks
/// the bitmap's bit order, which qemu cannot (it does not read differencing
/// VHDX). Skipped, with a note, where the module is not installed, unless
/// `VHDKIT_REQUIRE_LIBVHDI` is set.
#[test]
fn libvhdi_reads_partially_present_blocks_as_vhdkit_maps_them() {
    // Two candidate parents, told apart by their data write GUID: older
    // libvhdi releases take the child's parent identifier as zero, newer
    // ones from parent_linkage; the script uses the one that matches.
    const SCRIPT: &str = "
import sys, pyvhdi
child, out, parents = sys.argv[1], sys.argv[2], sys.argv[3:]
c = pyvhdi.file()
c.open(child)
want = str(c.get_parent_identifier()).lower()
for p in parents:
    f = pyvhdi.file()
    f.open(p)
    if str(f.get_identifier()).lower() == want:
        c.set_parent(f)
        break
else:
    sys.exit('no candidate parent has identifier ' + want)
open(out, 'wb').write(c.read_buffer_at_offset(c.get_media_size(), 0))
";
    let Some(python) =
        crate::common::pyvhdi("libvhdi_reads_partially_present_blocks_as_vhdkit_maps_them")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for lss in [512u32, 4096] {
        let (child, map) = differencing(lss);
        let mut parent = Disk::new(3 * MIB, MIB as u32, lss);
        parent.payload = vec![(0, 6, 4), (1, 6, 5), (2, 6, 6)];
        parent.file_len = 7 * MIB;
        let mut parents = Vec::new();
        for (k, id) in [[0u8; 16], guid("DEADBEEF-0000-4000-8000-0000000000AA")]
            .into_iter()
            .enumerate()
        {
            parent.data_write_guid = id;
            let mut b = parent.build();
            fill_pattern(&mut b, 4 * MIB, 3 * MIB, 0x99);
            let p = dir.path().join(format!("parent{lss}-{k}.vhdx"));
            std::fs::write(&p, &b).unwrap();
            parents.push(p);
        }
        let parent_disk = std::fs::read(&parents[0]).unwrap()[4 * MIB as usize..].to_vec();
        let c = dir.path().join(format!("child{lss}.vhdx"));
        std::fs::write(&c, &child).unwrap();
        let out = dir.path().join(format!("child{lss}.raw"));
        let o = Command::new(&python)
            .arg("-c")
            .arg(SCRIPT)
            .arg(&c)
            .arg(&out)
            .args(&parents)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "libvhdi: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let theirs = std::fs::read(&out).unwrap();
        let mut want = vec![0u8; 3 * MIB as usize];
        for e in &map {
            let r = e.offset as usize..e.end() as usize;
            match e.kind {
                ExtentKind::Data { file_offset, .. } => want[r].copy_from_slice(
                    &child[file_offset as usize..(file_offset + e.length) as usize],
                ),
                _ => want[r.clone()].copy_from_slice(&parent_disk[r]),
            }
        }
        assert_eq!(map, open_mem(&child).unwrap().map_all().unwrap());
        assert_same(&format!("libvhdi, {lss}-byte sectors"), &theirs, &want);
    }
}

#[test]
fn a_partially_present_block_needs_its_sector_bitmap() {
    let (mut b, _) = differencing(512);
    // The chunk's sector bitmap entry (index 4096) marked not present.
    put64(&mut b, BAT_AT + 8 * 4096, 0);
    assert_corrupt(
        open_mem(&b),
        VhdxStructure::BatEntry(1),
        "state",
        BAT_AT + 8,
    );
}

// ---------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------

/// Areas worth damaging: (start, length) of each structure.
const AREAS: [(u64, u64); 9] = [
    (0, 16),
    (64 * KIB, 128),
    (128 * KIB, 128),
    (192 * KIB, 96),
    (256 * KIB, 96),
    (LOG_AT, 3 * 4096),
    (BAT_AT, 48),
    (META_AT, 256),
    (META_AT + 64 * KIB, 6 * 4096),
];

#[derive(Clone, Debug)]
enum Mutation {
    /// XOR a byte of an area.
    Flip(usize, u32, u8),
    /// Set a little-endian u64 (or u32, u16) at an area offset.
    Set(usize, u32, u64, u8),
    /// Cut the file.
    Truncate(u32),
}

fn arb_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0u64, 1, 2, 5, 6, 7, 511, 512, 4096, 65536, 1 << 20, (1 << 20) + 6, 3 << 20,
            (4 << 20) | 6, (7 << 20) | 7, 1 << 28, 1 << 32, 1 << 40, u32::MAX as u64,
            u64::MAX, u64::MAX - 7,
        ]),
        1 => any::<u64>(),
    ]
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (0..AREAS.len(), any::<u32>(), 1u8..=255).prop_map(|(a, o, x)| Mutation::Flip(a, o, x)),
        4 => (0..AREAS.len(), any::<u32>(), arb_value(), prop::sample::select(vec![2u8, 4, 8]))
            .prop_map(|(a, o, v, w)| Mutation::Set(a, o, v, w)),
        1 => any::<u32>().prop_map(Mutation::Truncate),
    ]
}

/// Damages `base`; with `reseal`, recomputes the checksums of the headers,
/// region tables and the first log entries so that damage reaches past them.
fn mutate(base: &[u8], muts: &[Mutation], reseal: bool) -> Vec<u8> {
    let mut v = base.to_vec();
    for m in muts {
        match *m {
            Mutation::Flip(a, o, x) => {
                let (s, l) = AREAS[a];
                let i = (s + u64::from(o) % l) as usize;
                if i < v.len() {
                    v[i] ^= x;
                }
            }
            Mutation::Set(a, o, val, w) => {
                let (s, l) = AREAS[a];
                let i = (s + u64::from(o) % l) as usize & !(usize::from(w) - 1);
                if i + usize::from(w) <= v.len() {
                    v[i..i + usize::from(w)].copy_from_slice(&val.to_le_bytes()[..usize::from(w)]);
                }
            }
            Mutation::Truncate(x) => {
                let n = ((u64::from(x) * v.len() as u64) >> 32) as usize;
                v.truncate(n);
            }
        }
    }
    if reseal {
        for (at, len) in [
            (64 * KIB, 4096),
            (128 * KIB, 4096),
            (192 * KIB, 65536),
            (256 * KIB, 65536),
        ] {
            if ((at + len) as usize) <= v.len() {
                seal(&mut v[at as usize..(at + len) as usize]);
            }
        }
        // Log entries where the builder put them, as long as they still fit.
        let mut at = LOG_AT as usize;
        while at + 4096 <= v.len() && &v[at..at + 4] == b"loge" {
            let len = u32::from_le_bytes(v[at + 8..at + 12].try_into().unwrap()) as usize;
            if len == 0
                || len % 4096 != 0
                || at + len > (LOG_AT + MIB) as usize
                || at + len > v.len()
            {
                break;
            }
            seal(&mut v[at..at + len]);
            at += len;
        }
    }
    v
}

/// Opens `bytes` from memory; whatever opens must map and read. Returns
/// the outcome and the largest single allocation made.
fn exercise(bytes: Vec<u8>) -> (Result<(), String>, usize) {
    let len = bytes.len();
    let (tx, rx) = std::sync::mpsc::channel();
    let bytes2 = bytes.clone();
    let bytes3 = bytes.clone();
    let bytes4 = bytes.clone();
    let worker = std::thread::spawn(move || {
        let t = Instant::now();
        let r = largest_allocation(|| {
            // Check mode looks past problems: whatever it opens must map
            // and read without a panic (errors allowed), and it lists at
            // most its cap.
            let c = Vhdx::check_source(Box::new(bytes4), Path::new("mem"), &VhdxOptions::new());
            assert!(c.errors.len() <= vhdkit::vhdx::VhdxCheck::MAX_LISTED);
            if let Ok(d) = &c.vhdx {
                if let Ok(map) = d.map_all() {
                    assert_tiles(&map, d.virtual_size());
                }
                let mut buf = vec![0u8; d.virtual_size().min(MIB) as usize];
                let _ = d.read_exact_at(&mut buf, 0);
            }
            drop(c);
            let d = match Vhdx::from_source(Box::new(bytes), &VhdxOptions::new()) {
                Ok(d) => d,
                Err(e) => {
                    match &e {
                        Error::Corrupt(c) => {
                            assert!(c.offset < len.max(1) as u64 + 8 * MIB, "{e}")
                        }
                        Error::Unsupported { .. } | Error::Limit { .. } => {}
                        other => panic!("unexpected kind of error: {other:?}"),
                    }
                    // A check of what does not open never fails to run.
                    vhdkit::check_storage(
                        vhdkit::MemoryStorage::new(bytes3),
                        &vhdkit::CheckOptions::default(),
                    )
                    .unwrap_or_else(|e| panic!("check: {e}"));
                    return Err(e.to_string());
                }
            };
            let size = d.virtual_size();
            let map = d
                .map_all()
                .unwrap_or_else(|e| panic!("map after a good open: {e}"));
            assert_tiles(&map, size);
            let cap = size.min(8 * MIB);
            let mut buf = vec![0u8; 256 << 10];
            let mut off = 0;
            while off < cap {
                let n = (cap - off).min(buf.len() as u64) as usize;
                d.read_exact_at(&mut buf[..n], off)
                    .unwrap_or_else(|e| panic!("read at {off} after a good open: {e}"));
                off += n as u64;
            }
            let _ = format!("{d:?} {:?}", d.parent_locator());
            drop(d);
            // The same bytes as an image: map, read and check.
            if let Ok(img) = vhdkit::Image::from_bytes(bytes2) {
                let size = img.virtual_size();
                let map = img
                    .map_all()
                    .unwrap_or_else(|e| panic!("image map after a good open: {e}"));
                assert_tiles(&map, size);
                let n = size.min(MIB) as usize;
                let mut buf = vec![0u8; n];
                img.read_exact_at(&mut buf, 0)
                    .unwrap_or_else(|e| panic!("image read after a good open: {e}"));
            }
            let r = vhdkit::check_storage(
                vhdkit::MemoryStorage::new(bytes3),
                &vhdkit::CheckOptions {
                    open: vhdkit::OpenOptions::new(),
                    azure: false,
                },
            )
            .unwrap_or_else(|e| panic!("check: {e}"));
            assert!(!r.is_clean() || r.format == Some(vhdkit::Format::Vhdx));
            Ok(())
        });
        let _ = tx.send(t.elapsed());
        r
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(t) => assert!(t < Duration::from_secs(5), "slow: {t:?}"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("open + map + read hung"),
        Err(_) => {}
    }
    match worker.join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

fn bases() -> [Vec<u8>; 5] {
    [
        small_dynamic().1,
        dirty_log(0, 0).0,
        differencing(512).0,
        differencing(4096).0,
        dirty_log(MIB - 4096, 0).0,
    ]
}

#[test]
fn the_bases_of_the_property_test_open() {
    for (i, b) in bases().into_iter().enumerate() {
        let (r, largest) = exercise(b.clone());
        assert!(r.is_ok(), "base {i}: {r:?}");
        assert!(largest <= 4 * b.len() + MIB as usize, "base {i}: {largest}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("VHDKIT_HOSTILE_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn damaged_vhdx_never_panics_nor_overallocates(
        which in 0usize..5,
        muts in prop::collection::vec(arb_mutation(), 1..5),
        reseal in any::<bool>(),
    ) {
        let base = &bases()[which];
        let bytes = mutate(base, &muts, reseal);
        let len = bytes.len();
        let (_, largest) = exercise(bytes);
        let bound = 4 * len.max(1 << 20) + (1 << 20);
        prop_assert!(largest <= bound, "largest allocation {} for a {}-byte file", largest, len);
    }
}

// ---------------------------------------------------------------------------
// A VHDX as an image: Image, the CLI, check, convert (issue 11)
// ---------------------------------------------------------------------------

fn vhdkit_cli(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vhdkit"));
    for a in args {
        c.arg(a);
    }
    c.output().unwrap_or_else(|e| panic!("vhdkit: {e}"))
}

#[track_caller]
fn qemu_compare(fmt_b: &str, a: &Path, b: &Path) {
    let out = Command::new(qemu_img())
        .args(["compare", "-q", "-f", "vhdx", "-F", fmt_b])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check_report(path: &Path) -> vhdkit::CheckReport {
    vhdkit::check(
        path,
        &vhdkit::CheckOptions {
            open: vhdkit::OpenOptions::new(),
            azure: false,
        },
    )
    .unwrap()
}

fn codes(r: &vhdkit::CheckReport) -> Vec<&'static str> {
    r.problems.iter().map(|p| p.code).collect()
}

#[test]
fn qemu_vhdx_converts_to_raw_fixed_azure_and_dynamic_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let writes = [
        (0xa1, 0, 4096),
        (0xb2, MIB + 512, 3 * MIB),
        (0xc3, 20 * MIB - 4096, 8192),
        (0xd4, 40 * MIB, 64 * KIB),
    ];
    let cases = [
        ("subformat=dynamic,block_size=1M", "dyn1m"),
        ("subformat=dynamic,block_size=8M,log_size=2M", "dyn8m"),
        ("subformat=dynamic,block_size=32M", "dyn32m"),
        ("subformat=fixed", "fixed"),
    ];
    for (opts, name) in cases {
        let src = dir.path().join(format!("{name}.vhdx"));
        let want = qemu_vhdx(&src, opts, "48M", &writes);
        let img = vhdkit::Image::open(&src).unwrap();
        assert_eq!(img.disk_type(), vhdkit::Format::Vhdx, "{name}");
        assert_eq!(img.virtual_size(), 48 * MIB, "{name}");
        let mut got = vec![0u8; want.len()];
        img.read_exact_at(&mut got, 0).unwrap();
        assert_same(name, &got, &want);
        for (to, ext, qfmt, extra) in [
            ("raw", "raw.out", "raw", None),
            ("fixed", "fixed.vhd", "vpc", Some("--azure")),
            ("dynamic", "dyn.vhd", "vpc", None),
        ] {
            let out = dir.path().join(format!("{name}.{ext}"));
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
                vec![&"convert", &src, &out, &"--to", &to];
            if let Some(x) = &extra {
                args.push(x);
            }
            let o = vhdkit_cli(&args);
            assert!(
                o.status.success(),
                "{name} -> {to}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            qemu_compare(qfmt, &src, &out);
            if to == "fixed" {
                let f = vhdkit::Image::open(&out).unwrap();
                assert_eq!(f.disk_type(), vhdkit::Format::Fixed);
                assert_eq!(f.virtual_size() % MIB, 0);
            }
        }
        // checksum and compare read the same disk.
        let o = vhdkit_cli(&[
            &"compare",
            &src,
            &dir.path().join(format!("{name}.raw.out")),
        ]);
        assert!(o.status.success(), "{name}: compare: {o:?}");
        let raw_sum = vhdkit_cli(&[&"checksum", &dir.path().join(format!("{name}.raw.out"))]);
        let vhdx_sum = vhdkit_cli(&[&"checksum", &src]);
        let first = |o: &std::process::Output| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        };
        assert!(vhdx_sum.status.success(), "{vhdx_sum:?}");
        assert_eq!(first(&raw_sum), first(&vhdx_sum), "{name}: checksums");
        // The map has data exactly where qemu wrote (dynamic disks hold
        // nothing else).
        if name.starts_with("dyn") {
            let map = img.map_all().unwrap();
            assert_tiles(&map, img.virtual_size());
            for e in map.iter().filter(|e| !e.is_data()) {
                let s = &want[e.offset as usize..e.end() as usize];
                assert!(s.iter().all(|&b| b == 0), "{name}: zero extent {e:?}");
            }
        }
        assert!(
            check_report(&src).is_clean(),
            "{name}: {:?}",
            check_report(&src).problems
        );
    }
}

#[test]
fn info_json_gives_the_vhdx_fields() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vhdx");
    qemu_vhdx(
        &p,
        "subformat=dynamic,block_size=2M",
        "16M",
        &[(0x5a, 0, 3 * MIB)],
    );
    let o = vhdkit_cli(&[&"info", &"--json", &p]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "vhdx");
    assert_eq!(v["virtual_size"], 16 * MIB);
    let x = &v["vhdx"];
    assert_eq!(x["disk_type"], "dynamic");
    assert_eq!(x["block_size"], 2 * MIB);
    assert_eq!(x["logical_sector_size"], 512);
    assert_eq!(x["physical_sector_size"], 512);
    assert_eq!(x["log_replayed"], false);
    assert_eq!(x["log_entries_replayed"], 0);
    assert_eq!(x["allocated_blocks"], 2);
    let d = Vhdx::open(&p, &VhdxOptions::new()).unwrap();
    assert_eq!(x["header_sequence_number"], d.header_sequence());
    assert_eq!(x["page83_id"], d.page83_id().to_string());
    assert_eq!(x["data_write_guid"], d.data_write_guid().to_string());
    // The text form says it too.
    let o = vhdkit_cli(&[&"info", &p]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("format:         vhdx"), "{text}");
    assert!(text.contains("vhdx type:      dynamic"), "{text}");
    assert!(text.contains("log:            clean"), "{text}");
}

#[test]
fn check_names_vhdx_damage_with_codes() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let (_, good) = small_dynamic();
    let r = check_report(&write("good.vhdx", &good));
    assert!(r.is_clean() && r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.format, Some(vhdkit::Format::Vhdx));

    let mut b = good.clone();
    b[64 * KIB as usize] ^= 0xff;
    b[128 * KIB as usize] ^= 0xff;
    let r = check_report(&write("headers.vhdx", &b));
    assert!(!r.is_clean());
    // Both headers named, each at its offset.
    assert_eq!(
        codes(&r),
        ["vhdx-header", "vhdx-header"],
        "{:?}",
        r.problems
    );
    let offsets: Vec<_> = r.problems.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [Some(64 * KIB), Some(128 * KIB)]);

    let mut b = good.clone();
    b[192 * KIB as usize] ^= 0xff;
    b[256 * KIB as usize] ^= 0xff;
    let r = check_report(&write("regions.vhdx", &b));
    assert_eq!(
        codes(&r),
        ["vhdx-region-table", "vhdx-region-table"],
        "{:?}",
        r.problems
    );
    let offsets: Vec<_> = r.problems.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [Some(192 * KIB), Some(256 * KIB)]);

    // Block 1's BAT entry pointing past the file.
    let mut b = good.clone();
    put64(&mut b, BAT_AT + 8, 400 << 20 | 6);
    let r = check_report(&write("bat.vhdx", &b));
    assert_eq!(codes(&r), ["vhdx-bat-out-of-file"], "{:?}", r.problems);

    // A dirty log: a warning that says it was replayed in memory.
    let (dirty, _, _) = dirty_log(0, 0);
    let r = check_report(&write("dirty.vhdx", &dirty));
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!(codes(&r), ["vhdx-log-replayed"], "{:?}", r.problems);
    assert!(r.problems[0].message.contains("not closed cleanly"));

    // A log that cannot be replayed.
    let (mut b, _, [_, _, e3_at]) = dirty_log(0, 0);
    let at = LOG_AT + e3_at;
    put64(&mut b, at + 48, 6 * MIB);
    let len = u32::from_le_bytes(b[at as usize + 8..at as usize + 12].try_into().unwrap());
    seal(&mut b[at as usize..(at + u64::from(len)) as usize]);
    let r = check_report(&write("badlog.vhdx", &b));
    assert_eq!(codes(&r), ["vhdx-log"], "{:?}", r.problems);
}

#[test]
fn a_dirty_log_reads_replayed_through_image_and_converts() {
    let (b, want, _) = dirty_log(0, 0);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dirty.vhdx");
    std::fs::write(&p, &b).unwrap();
    let img = vhdkit::Image::open(&p).unwrap();
    assert_eq!(img.disk_type(), vhdkit::Format::Vhdx);
    assert!(img
        .warnings()
        .iter()
        .any(|w| w.code == "vhdx-log-replayed" && w.message.contains("replayed in memory")));
    let mut got = vec![0u8; want.len()];
    img.read_exact_at(&mut got, 0).unwrap();
    assert_same("replayed through Image", &got, &want);
    for (target, name) in [
        (vhdkit::Target::Raw, "out.raw"),
        (vhdkit::Target::Fixed, "out.vhd"),
        (vhdkit::Target::Dynamic, "dyn.vhd"),
    ] {
        let out = dir.path().join(name);
        vhdkit::convert(&p, &out, &vhdkit::ConvertOptions::new(target)).unwrap();
        let o = vhdkit::Image::open(&out).unwrap();
        let mut got = vec![0u8; want.len()];
        o.read_exact_at(&mut got, 0).unwrap();
        assert_same(name, &got, &want);
    }
    // The input was not written.
    assert_eq!(std::fs::read(&p).unwrap(), b);
}

pub(crate) const PARENT_GUID: &str = "DEADBEEF-0000-4000-8000-0000000000AA";

/// The parent `differencing()`'s locator names: 3 MiB, block 1 present.
pub(crate) fn diff_parent(data_write_guid: &str) -> (Vec<u8>, Vec<u8>) {
    let mut d = Disk::new(3 * MIB, MIB as u32, 512);
    d.payload = vec![(1, 6, 4)];
    d.file_len = 5 * MIB;
    d.data_write_guid = guid(data_write_guid);
    let mut b = d.build();
    fill_pattern(&mut b, 4 * MIB, MIB, 0x40);
    let mut disk = vec![0u8; 3 * MIB as usize];
    disk[MIB as usize..2 * MIB as usize].copy_from_slice(&b[4 * MIB as usize..5 * MIB as usize]);
    (b, disk)
}

#[test]
fn a_differencing_vhdx_reads_through_its_vhdx_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (child, extents) = differencing(512);
    let (parent, parent_disk) = diff_parent(PARENT_GUID);
    let cp = dir.path().join("child.vhdx");
    std::fs::write(&cp, &child).unwrap();
    // No parent yet: not found, and check says so.
    match vhdkit::Image::open(&cp) {
        Err(Error::ParentNotFound { parent_id, .. }) => assert_eq!(parent_id, PARENT_GUID),
        other => panic!("{other:?}"),
    }
    assert!(codes(&check_report(&cp)).contains(&"parent-not-found"));
    let info = |p: &Path| -> serde_json::Value {
        let o = vhdkit_cli(&[&"info", &"--json", &p]);
        assert!(o.status.success(), "{o:?}");
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let v = info(&cp);
    assert_eq!(v["vhdx"]["disk_type"], "differencing");
    assert_eq!(v["vhdx"]["parent"]["found"], false);
    assert_eq!(
        v["vhdx"]["parent"]["parent_linkage"],
        format!("{{{PARENT_GUID}}}")
    );
    assert_eq!(
        v["vhdx"]["parent"]["paths"]["relative_path"],
        "..\\base.vhdx"
    );
    // The locator's paths reduce to base.vhdx in the child's folder.
    std::fs::write(dir.path().join("base.vhdx"), &parent).unwrap();
    let img = vhdkit::Image::open(&cp).unwrap();
    assert!(img.is_differencing());
    assert_eq!(img.chain().len(), 2);
    let v = info(&cp);
    assert_eq!(v["vhdx"]["parent"]["found"], true);
    assert_eq!(
        v["vhdx"]["parent"]["path"],
        dir.path().join("base.vhdx").display().to_string()
    );
    let mut want = vec![0u8; 3 * MIB as usize];
    for e in &extents {
        let r = e.offset as usize..e.end() as usize;
        match e.kind {
            ExtentKind::Data { file_offset, .. } => want[r]
                .copy_from_slice(&child[file_offset as usize..(file_offset + e.length) as usize]),
            _ => want[r.clone()].copy_from_slice(&parent_disk[r]),
        }
    }
    let mut got = vec![0u8; want.len()];
    img.read_exact_at(&mut got, 0).unwrap();
    assert_same("child over parent", &got, &want);
    let out = dir.path().join("flat.raw");
    vhdkit::convert(&cp, &out, &vhdkit::ConvertOptions::new(vhdkit::Target::Raw)).unwrap();
    assert_same("converted chain", &std::fs::read(&out).unwrap(), &want);
    assert!(
        check_report(&cp).is_clean(),
        "{:?}",
        check_report(&cp).problems
    );

    // A parent with another data write GUID is not the parent.
    let (other, _) = diff_parent("DEADBEEF-0000-4000-8000-0000000000BB");
    std::fs::write(dir.path().join("base.vhdx"), &other).unwrap();
    match vhdkit::Image::open(&cp) {
        Err(Error::ParentNotFound { wrong_id, .. }) => {
            assert_eq!(wrong_id, [dir.path().join("base.vhdx")])
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// check: every problem, not the first
// ---------------------------------------------------------------------------

/// (severity is error, code, structure, field, offset) of each problem.
fn places(r: &vhdkit::CheckReport) -> Vec<(bool, &'static str, Option<Structure>, String, u64)> {
    r.problems
        .iter()
        .map(|p| {
            (
                p.severity == vhdkit::Severity::Error,
                p.code,
                p.place,
                p.field.clone().unwrap_or_default(),
                p.offset.unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// An 8 MiB dynamic disk in 1 MiB blocks with damage in every structure
/// the reader can look past: header 1's checksum (header 2 is used, and
/// its log offset is wrong), region table 1's checksum, the physical
/// sector size, and six BAT entries (past the file, two overlaps, a
/// reserved state, reserved bits).
fn many_damages() -> Vec<u8> {
    let mut d = Disk::new(8 * MIB, MIB as u32, 512);
    d.payload = vec![
        (0, 6, 4),
        (1, 6, 400),
        (2, 6, 4),
        (3, 6, 2),
        (4, 4, 0),
        (5, 6, 5),
    ];
    d.file_len = 6 * MIB;
    let mut b = d.build();
    fill_pattern(&mut b, 4 * MIB, 2 * MIB, 0x21);
    // Header 1: a byte changed under its checksum.
    b[(64 * KIB + 100) as usize] ^= 1;
    // Header 2 (used): the log at an offset that is not a whole MiB.
    put64(&mut b, 128 * KIB + 72, MIB + 4096);
    seal(&mut b[(128 * KIB) as usize..(128 * KIB + 4096) as usize]);
    // Region table 1: a byte changed under its checksum.
    b[(192 * KIB + 1000) as usize] ^= 1;
    // The physical sector size item (the fifth) says 1000.
    put32(&mut b, META_AT + 64 * KIB + 4 * 4096, 1000);
    // Block 5's entry has a reserved bit set.
    put64(&mut b, BAT_AT + 40, 5 << 20 | 1 << 3 | 6);
    b
}

#[test]
fn check_reports_every_vhdx_problem_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("many.vhdx");
    std::fs::write(&p, many_damages()).unwrap();
    // An open still stops at the first problem.
    assert_corrupt(
        Vhdx::open(&p, &VhdxOptions::new()),
        VhdxStructure::Header(2),
        "log offset",
        128 * KIB + 72,
    );
    let r = check_report(&p);
    assert!(!r.is_clean());
    assert_eq!(r.format, Some(vhdkit::Format::Vhdx));
    assert_eq!(r.virtual_size, Some(8 * MIB));
    let v = |s| Some(Structure::Vhdx(s));
    let e = |i: u64| BAT_AT + 8 * i;
    let mut got = places(&r);
    got.sort_by_key(|x| x.4);
    let want = vec![
        (
            false,
            "vhdx-header-damaged",
            v(VhdxStructure::Header(1)),
            "checksum".to_string(),
            64 * KIB + 4,
        ),
        (
            true,
            "vhdx-header",
            v(VhdxStructure::Header(2)),
            "log offset".into(),
            128 * KIB + 72,
        ),
        (
            false,
            "vhdx-region-table-damaged",
            v(VhdxStructure::RegionTable(1)),
            "checksum".into(),
            192 * KIB + 4,
        ),
        (
            true,
            "vhdx-bat-out-of-file",
            v(VhdxStructure::BatEntry(1)),
            "file offset".into(),
            e(1),
        ),
        (
            true,
            "vhdx-bat-overlap",
            v(VhdxStructure::BatEntry(2)),
            "file offset".into(),
            e(2),
        ),
        (
            true,
            "vhdx-bat-overlap",
            v(VhdxStructure::BatEntry(3)),
            "file offset".into(),
            e(3),
        ),
        (
            true,
            "vhdx-bat",
            v(VhdxStructure::BatEntry(4)),
            "state".into(),
            e(4),
        ),
        (
            false,
            "vhdx-bat-reserved",
            v(VhdxStructure::BatEntry(5)),
            "reserved".into(),
            e(5),
        ),
        (
            true,
            "vhdx-metadata",
            v(VhdxStructure::Metadata),
            "physical sector size".into(),
            META_AT + 64 * KIB + 4 * 4096,
        ),
    ];
    assert_eq!(got, want, "{:#?}", r.problems);
    // The overlaps name what they overlap.
    let msg = |i: u64| {
        r.problems
            .iter()
            .find(|p| p.place == v(VhdxStructure::BatEntry(i)))
            .unwrap()
            .message
            .clone()
    };
    assert!(msg(2).contains("the block of BAT entry 0"), "{}", msg(2));
    assert!(msg(3).contains("the BAT region"), "{}", msg(3));
    // The CLI says the same, exit 1, every code in the JSON.
    let o = vhdkit_cli(&[&"check", &"--json", &p]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let text = j.to_string();
    for (_, code, _, _, _) in &want {
        assert!(text.contains(code), "{code} in {text}");
    }
}

#[test]
fn check_reports_the_damaged_table_2_though_table_1_is_used() {
    let (_, mut b) = small_dynamic();
    b[(256 * KIB + 5000) as usize] ^= 1;
    b[(128 * KIB + 300) as usize] ^= 1;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t2.vhdx");
    std::fs::write(&p, &b).unwrap();
    // It opens (table 1 and header 1 are fine)...
    let d = Vhdx::open(&p, &VhdxOptions::new()).unwrap();
    assert_eq!((d.header_index(), d.region_table_index()), (1, 1));
    // ...and the check warns of both unused copies.
    let r = check_report(&p);
    assert!(r.is_clean(), "{:?}", r.problems);
    let got = places(&r);
    assert_eq!(
        got,
        [
            (
                false,
                "vhdx-header-damaged",
                Some(Structure::Vhdx(VhdxStructure::Header(2))),
                "checksum".into(),
                128 * KIB + 4
            ),
            (
                false,
                "vhdx-region-table-damaged",
                Some(Structure::Vhdx(VhdxStructure::RegionTable(2))),
                "checksum".into(),
                256 * KIB + 4
            ),
        ],
        "{:?}",
        r.problems
    );
}

#[test]
fn check_goes_on_past_a_log_that_cannot_be_replayed() {
    // The dirty log's third entry needs the file longer than it is; the
    // BAT entry of block 1 points past the file too.
    let (mut b, _, [_, _, e3_at]) = dirty_log(0, 0);
    let at = LOG_AT + e3_at;
    put64(&mut b, at + 48, 64 * MIB);
    let len = u32::from_le_bytes(b[at as usize + 8..at as usize + 12].try_into().unwrap());
    seal(&mut b[at as usize..(at + u64::from(len)) as usize]);
    let bat1 = BAT_AT + 8;
    put64(&mut b, bat1, 900 << 20 | 6);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("log.vhdx");
    std::fs::write(&p, &b).unwrap();
    let r = check_report(&p);
    let got: Vec<_> = places(&r).into_iter().map(|x| (x.1, x.4)).collect();
    assert!(
        got.contains(&("vhdx-bat-out-of-file", bat1)),
        "{:?}",
        r.problems
    );
    assert!(got.iter().any(|g| g.0 == "vhdx-log"), "{:?}", r.problems);
    assert!(
        !got.iter().any(|g| g.0 == "vhdx-log-replayed"),
        "{:?}",
        r.problems
    );
}

#[test]
fn check_lists_a_thousand_bat_problems_and_counts_the_rest() {
    // 3000 blocks of 1 MiB, every entry pointing past the file.
    let mut d = Disk::new(3000 * MIB, MIB as u32, 512);
    d.payload = (0..3000).map(|i| (i, 6, 100_000)).collect();
    d.file_len = 4 * MIB;
    let b = d.build();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("thousands.vhdx");
    std::fs::write(&p, &b).unwrap();
    let start = Instant::now();
    let r = check_report(&p);
    assert!(start.elapsed() < Duration::from_secs(20));
    let n = r
        .problems
        .iter()
        .filter(|p| p.code == "vhdx-bat-out-of-file")
        .count();
    assert_eq!(n, 1000, "listed");
    let more = r
        .problems
        .iter()
        .find(|p| p.code == "too-many-problems")
        .unwrap_or_else(|| panic!("{:?}", &r.problems[..3]));
    assert!(more.message.contains("3000"), "{}", more.message);
}

// ---------------------------------------------------------------------------
// testdata/: the hand-made VHDX fixtures, built here
// ---------------------------------------------------------------------------
//
// `VHDKIT_WRITE_VHDX_TESTDATA=1 cargo test --test it vhdx::testdata_` writes
// them (gzip level 9, no name, no time: the same bytes on every run);
// otherwise the test checks the committed files are exactly what is built
// here, then reads each one as the construction says it reads.

/// A hand-made VHDX of testdata/.
struct VxFixture {
    /// The file in testdata/ (gzip'ed).
    stored: &'static str,
    bytes: Vec<u8>,
    /// The virtual disk as it must read (through its parents; a missing
    /// parent as zeros); `None` for a file that is only checked.
    content: Option<Vec<u8>>,
    /// Its parent in testdata/, by stored name.
    parent: Option<&'static str>,
    /// qemu-img reads it (`convert -f vhdx`, after `check -r all` for a
    /// dirty log) as `content`.
    qemu: bool,
}

const CHAIN_BASE_GUID: &str = "7668646B-0000-4000-8000-0000000000B0";
const CHAIN_CHILD_GUID: &str = "7668646B-0000-4000-8000-0000000000B1";
const CHAIN_GRANDCHILD_GUID: &str = "7668646B-0000-4000-8000-0000000000B2";

/// A disk of 3 MiB in 1 MiB blocks with `lss`-byte sectors over `parent`
/// (its content) — differencing when `linkage` names the parent's data
/// write GUID, dynamic otherwise. `full` blocks are fully present; each of
/// `partial` is partially present with the sector ranges given set in the
/// chunk's sector bitmap. Blocks are stored from 4 MiB in the order given
/// (full, then partial), each filled with a pattern of `seed` (the sectors
/// whose bit is clear too: stale bytes that must not be read); the sector
/// bitmap block follows. Returns the file and the disk it reads as.
#[allow(clippy::too_many_arguments)]
fn layer(
    lss: u32,
    own: &str,
    linkage: Option<(&'static str, &'static str)>,
    seed: u8,
    full: &[u64],
    partial: &[(u64, &[std::ops::Range<u64>])],
    parent: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let mut d = Disk::new(3 * MIB, MIB as u32, lss);
    d.data_write_guid = guid(own);
    let mut mb = 4;
    let mut placed = Vec::new();
    for &b in full {
        d.payload.push((b, 6, mb));
        placed.push((b, mb, None));
        mb += 1;
    }
    for (b, ranges) in partial {
        d.payload.push((*b, 7, mb));
        placed.push((*b, mb, Some(*ranges)));
        mb += 1;
    }
    let bitmap_mb = mb;
    if let Some((link, rel)) = linkage {
        d.has_parent = true;
        d.bitmaps = vec![(0, bitmap_mb)];
        d.locator = vec![("parent_linkage", link), ("relative_path", rel)];
        mb += 1;
    }
    d.file_len = mb * MIB;
    let mut b = d.build();
    let l = u64::from(lss);
    let spb = MIB / l;
    let mut content = parent.to_vec();
    for (block, at, ranges) in placed {
        fill_pattern(&mut b, at * MIB, MIB, seed);
        let (v, f) = ((block * MIB) as usize, (at * MIB) as usize);
        match ranges {
            None => content[v..v + MIB as usize].copy_from_slice(&b[f..f + MIB as usize]),
            Some(ranges) => {
                for r in ranges {
                    for s in r.clone() {
                        let bit = block * spb + s;
                        b[(bitmap_mb * MIB + bit / 8) as usize] |= 1 << (bit % 8);
                        let o = (s * l) as usize;
                        content[v + o..v + o + l as usize]
                            .copy_from_slice(&b[f + o..f + o + l as usize]);
                    }
                }
            }
        }
    }
    (b, content)
}

fn vhdx_fixtures() -> Vec<VxFixture> {
    let zeros = vec![0u8; 3 * MIB as usize];
    let (base, base_disk) = layer(512, CHAIN_BASE_GUID, None, 0x10, &[0, 2], &[], &zeros);
    let (child, child_disk) = layer(
        512,
        CHAIN_CHILD_GUID,
        Some((
            "{7668646B-0000-4000-8000-0000000000B0}",
            ".\\hand-vhdx-chain-base.vhdx",
        )),
        0x20,
        &[1],
        &[(0, &[0..8, 1000..1100, 2047..2048]), (2, &[])],
        &base_disk,
    );
    let (grandchild, grandchild_disk) = layer(
        512,
        CHAIN_GRANDCHILD_GUID,
        Some((
            "{7668646B-0000-4000-8000-0000000000B1}",
            ".\\hand-vhdx-chain-child.vhdx",
        )),
        0x30,
        &[],
        &[(2, &[100..300, 2040..2048]), (0, &[4..12, 1050..1060])],
        &child_disk,
    );
    // 4096-byte sectors (256 a block, bits of block 1 from 256 on); its
    // parent is not in testdata/ and reads as zeros.
    let (p4k, p4k_disk) = layer(
        4096,
        "7668646B-0000-4000-8000-0000000000C1",
        Some((
            "{7668646B-0000-4000-8000-0000000000C0}",
            ".\\absent-parent.vhdx",
        )),
        0x40,
        &[2],
        &[(1, &[0..3, 100..101, 255..256]), (0, &[17..18, 200..202])],
        &zeros,
    );
    let (dirty, dirty_disk, _) = dirty_log(0, 0);
    let (_, good) = small_dynamic();
    let mut good_disk = vec![0u8; 3 * MIB as usize];
    good_disk[MIB as usize..2 * MIB as usize]
        .copy_from_slice(&good[4 * MIB as usize..5 * MIB as usize]);
    let mut h1 = good.clone();
    h1[(64 * KIB + 200) as usize] ^= 0x40;
    let mut r1 = good.clone();
    r1[(192 * KIB + 200) as usize] ^= 0x40;
    vec![
        VxFixture {
            stored: "hand-vhdx-chain-base.vhdx.gz",
            bytes: base,
            content: Some(base_disk),
            parent: None,
            qemu: true,
        },
        VxFixture {
            stored: "hand-vhdx-chain-child.vhdx.gz",
            bytes: child,
            content: Some(child_disk),
            parent: Some("hand-vhdx-chain-base.vhdx.gz"),
            qemu: false,
        },
        VxFixture {
            stored: "hand-vhdx-chain-grandchild.vhdx.gz",
            bytes: grandchild,
            content: Some(grandchild_disk),
            parent: Some("hand-vhdx-chain-child.vhdx.gz"),
            qemu: false,
        },
        VxFixture {
            stored: "hand-vhdx-partial-4096.vhdx.gz",
            bytes: p4k,
            content: Some(p4k_disk),
            parent: None,
            qemu: false,
        },
        VxFixture {
            stored: "hand-vhdx-dirty-log.vhdx.gz",
            bytes: dirty,
            content: Some(dirty_disk),
            parent: None,
            qemu: true,
        },
        VxFixture {
            stored: "hand-vhdx-header1-damaged.vhdx.gz",
            bytes: h1,
            content: Some(good_disk.clone()),
            parent: None,
            qemu: true,
        },
        VxFixture {
            stored: "hand-vhdx-region-table1-damaged.vhdx.gz",
            bytes: r1,
            content: Some(good_disk),
            parent: None,
            // qemu (10.0) reads region table 1 only, and refuses the file.
            qemu: false,
        },
        VxFixture {
            stored: "hand-vhdx-many-damages.vhdx.gz",
            bytes: many_damages(),
            content: None,
            parent: None,
            qemu: false,
        },
    ]
}

fn testdata_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// The VHDX files of testdata/ these tests know (stored names).
pub fn vhdx_testdata_names() -> Vec<&'static str> {
    vhdx_fixtures().iter().map(|f| f.stored).collect()
}

fn gunzip(stored: &str) -> Vec<u8> {
    use std::io::Read;
    let f = std::fs::File::open(testdata_dir().join(stored))
        .unwrap_or_else(|e| panic!("testdata/{stored}: {e}"));
    let mut v = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut v)
        .unwrap_or_else(|e| panic!("testdata/{stored}: {e}"));
    v
}

/// Unpacks the fixtures into `dir` (without `.gz`) and returns their paths.
fn unpack_vhdx_fixtures(dir: &Path) -> Vec<std::path::PathBuf> {
    vhdx_fixtures()
        .iter()
        .map(|f| {
            let p = dir.join(f.stored.strip_suffix(".gz").unwrap());
            std::fs::write(&p, gunzip(f.stored)).unwrap();
            p
        })
        .collect()
}

#[test]
fn testdata_vhdx_files_are_what_the_builders_make() {
    let write = std::env::var_os("VHDKIT_WRITE_VHDX_TESTDATA").is_some();
    for f in vhdx_fixtures() {
        let path = testdata_dir().join(f.stored);
        if write {
            use std::io::Write;
            let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            z.write_all(&f.bytes).unwrap();
            std::fs::write(&path, z.finish().unwrap()).unwrap();
        }
        let stored = gunzip(f.stored);
        assert!(
            stored == f.bytes,
            "testdata/{} differs from what tests/it/vhdx.rs builds (rebuild with \
             VHDKIT_WRITE_VHDX_TESTDATA=1)",
            f.stored
        );
        let gz = std::fs::metadata(&path).unwrap().len();
        assert!(gz < 256 * KIB, "{}: {gz} bytes compressed", f.stored);
    }
}

#[test]
fn testdata_vhdx_files_read_as_constructed_and_as_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let paths = unpack_vhdx_fixtures(dir.path());
    for (f, p) in vhdx_fixtures().iter().zip(&paths) {
        let Some(want) = &f.content else { continue };
        let opts = vhdkit::OpenOptions::new().missing_parent_as_zero(true);
        let img =
            vhdkit::Image::open_with(p, &opts).unwrap_or_else(|e| panic!("{}: {e}", f.stored));
        assert_eq!(img.disk_type(), vhdkit::Format::Vhdx, "{}", f.stored);
        // Chains resolve through the relative paths to the files here.
        let depth = match f.parent {
            None => 1,
            Some("hand-vhdx-chain-base.vhdx.gz") => 2,
            Some(_) => 3,
        };
        assert_eq!(img.chain().len(), depth, "{}", f.stored);
        assert_eq!(
            img.parent_missing(),
            f.stored.contains("partial"),
            "{}",
            f.stored
        );
        let mut got = vec![0u8; img.virtual_size() as usize];
        img.read_exact_at(&mut got, 0).unwrap();
        assert_same(f.stored, &got, want);
        // The check finds nothing but what the fixture is about.
        let r = check_report(p);
        let expect: &[&str] = match f.stored {
            "hand-vhdx-dirty-log.vhdx.gz" => &["vhdx-log-replayed"],
            "hand-vhdx-header1-damaged.vhdx.gz" => &["vhdx-header-damaged"],
            "hand-vhdx-region-table1-damaged.vhdx.gz" => &["vhdx-region-table-damaged"],
            // Its parent is not in testdata/.
            "hand-vhdx-partial-4096.vhdx.gz" => &["parent-not-found"],
            _ => &[],
        };
        assert_eq!(codes(&r), expect, "{}: {:?}", f.stored, r.problems);
        // The conversion to raw reads the same.
        let raw = dir.path().join("out.raw");
        let o = vhdkit_cli(&[&"convert", &p, &raw, &"--to", &"raw", &"--force"]);
        if f.parent.is_some() || !f.stored.contains("partial") {
            assert!(o.status.success(), "{}: {o:?}", f.stored);
            assert_same(f.stored, &std::fs::read(&raw).unwrap(), want);
        }
        if f.qemu {
            // On a copy: qemu replays a dirty log into the file.
            let copy = dir.path().join("copy.vhdx");
            std::fs::copy(p, &copy).unwrap();
            run(Command::new(qemu_img())
                .args(["check", "-q", "-r", "all", "-f", "vhdx"])
                .arg(&copy));
            let qraw = dir.path().join("qemu.raw");
            run(Command::new(qemu_img())
                .args(["convert", "-f", "vhdx", "-O", "raw"])
                .arg(&copy)
                .arg(&qraw));
            assert_same(
                &format!("qemu {}", f.stored),
                &std::fs::read(&qraw).unwrap(),
                want,
            );
        }
    }
}

#[test]
fn testdata_chain_reads_through_libvhdi_as_constructed() {
    // Parents set from the base up, each checked by libvhdi against the
    // child's parent identifier.
    const SCRIPT: &str = "
import sys, pyvhdi
out, files = sys.argv[1], sys.argv[2:]
prev = None
for p in reversed(files):
    f = pyvhdi.file()
    f.open(p)
    if prev is not None:
        f.set_parent(prev)
    prev = f
open(out, 'wb').write(prev.read_buffer_at_offset(prev.get_media_size(), 0))
";
    let Some(python) = crate::common::pyvhdi("testdata_chain_reads_through_libvhdi_as_constructed")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut paths = unpack_vhdx_fixtures(dir.path());
    let all = vhdx_fixtures();
    let at = |name: &str| all.iter().position(|f| f.stored == name).unwrap();
    // libvhdi (20260901 included) takes a VHDX child's parent identifier
    // as zero, and refuses a parent whose data write GUID is not: it is
    // then given copies of the parents with that GUID zeroed (headers
    // resealed). The data it reads through them is what is checked.
    let o = Command::new(&python)
        .arg("-c")
        .arg("import sys, pyvhdi\nf = pyvhdi.file()\nf.open(sys.argv[1])\nprint(f.get_parent_identifier())")
        .arg(&paths[at("hand-vhdx-chain-child.vhdx.gz")])
        .output()
        .unwrap();
    if String::from_utf8_lossy(&o.stdout).trim() == "00000000-0000-0000-0000-000000000000" {
        for name in [
            "hand-vhdx-chain-base.vhdx.gz",
            "hand-vhdx-chain-child.vhdx.gz",
        ] {
            let mut b = all[at(name)].bytes.clone();
            for h in [64 * KIB, 128 * KIB] {
                b[(h + 32) as usize..(h + 48) as usize].fill(0);
                seal(&mut b[h as usize..(h + 4096) as usize]);
            }
            let p = dir
                .path()
                .join(format!("zeroed-{}", name.trim_end_matches(".gz")));
            std::fs::write(&p, b).unwrap();
            paths[at(name)] = p;
        }
    }
    let chain = [
        "hand-vhdx-chain-grandchild.vhdx.gz",
        "hand-vhdx-chain-child.vhdx.gz",
        "hand-vhdx-chain-base.vhdx.gz",
    ];
    for k in 0..chain.len() {
        let out = dir.path().join("libvhdi.raw");
        let o = Command::new(&python)
            .arg("-c")
            .arg(SCRIPT)
            .arg(&out)
            .args(chain[k..].iter().map(|n| &paths[at(n)]))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "libvhdi: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let want = all[at(chain[k])].content.as_ref().unwrap();
        assert_same(
            &format!("libvhdi {}", chain[k]),
            &std::fs::read(&out).unwrap(),
            want,
        );
    }
}

#[test]
fn testdata_many_damages_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let paths = unpack_vhdx_fixtures(dir.path());
    let i = vhdx_fixtures()
        .iter()
        .position(|f| f.stored == "hand-vhdx-many-damages.vhdx.gz")
        .unwrap();
    let r = check_report(&paths[i]);
    let mut got: Vec<_> = places(&r).into_iter().map(|x| (x.1, x.4)).collect();
    got.sort_by_key(|x| x.1);
    assert_eq!(
        got,
        [
            ("vhdx-header-damaged", 64 * KIB + 4),
            ("vhdx-header", 128 * KIB + 72),
            ("vhdx-region-table-damaged", 192 * KIB + 4),
            ("vhdx-bat-out-of-file", BAT_AT + 8),
            ("vhdx-bat-overlap", BAT_AT + 16),
            ("vhdx-bat-overlap", BAT_AT + 24),
            ("vhdx-bat", BAT_AT + 32),
            ("vhdx-bat-reserved", BAT_AT + 40),
            ("vhdx-metadata", META_AT + 64 * KIB + 4 * 4096),
        ],
        "{:#?}",
        r.problems
    );
}

/// A replayed log leaves the file's other ranges to be mapped or read as
/// they are on disk (`Storage::file_at`), the overlaid ones read through
/// the overlay; a conversion gets both right.
#[test]
fn a_replayed_log_leaves_the_plain_payload_to_the_file() {
    let lg = guid(LOG_GUID);
    let mut d = Disk::new(16 * MIB, MIB as u32, 512);
    d.log_guid = lg;
    d.payload = (0..8).map(|i| (i, 6, 4 + i)).collect();
    d.file_len = 12 * MIB;
    let mut b = d.build();
    fill_pattern(&mut b, 4 * MIB, 8 * MIB, 0x5c);
    let sector = vec![0xabu8; 4096];
    let e = log_entry(
        1,
        0,
        lg,
        12 * MIB,
        &[Desc::Data(9 * MIB + 4096, sector.clone())],
    );
    put(&mut b, LOG_AT, &e);
    let mut want = vec![0u8; 16 * MIB as usize];
    want[..8 * MIB as usize].copy_from_slice(&b[4 * MIB as usize..12 * MIB as usize]);
    want[(5 * MIB + 4096) as usize..(5 * MIB + 8192) as usize].copy_from_slice(&sector);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dirty.vhdx");
    std::fs::write(&p, &b).unwrap();
    let img = vhdkit::Image::open(&p).unwrap();
    assert!(img.vhdx().unwrap().log_replayed());
    let s = img.storage();
    // The file as a whole is not offered (a reader of it would miss the
    // log's sector), its plain ranges are.
    assert!(s.file().is_none());
    assert!(s.file_at(4 * MIB, 4 * MIB).is_some());
    assert!(s.file_at(10 * MIB, 2 * MIB).is_some());
    assert!(s.file_at(9 * MIB, 2 * MIB).is_none());
    assert!(s.file_at(9 * MIB + 8191, 1).is_none());
    assert!(s.file_at(9 * MIB + 8192, 1).is_some());
    // Past the file (as replayed, longer than on disk): not plain.
    assert!(s.file_at(12 * MIB - 1, 2).is_none());
    for (target, name) in [
        (vhdkit::Target::Raw, "out.raw"),
        (vhdkit::Target::Fixed, "out.vhd"),
    ] {
        let out = dir.path().join(name);
        vhdkit::convert(&p, &out, &vhdkit::ConvertOptions::new(target)).unwrap();
        let o = vhdkit::Image::open(&out).unwrap();
        let mut got = vec![0u8; want.len()];
        o.read_exact_at(&mut got, 0).unwrap();
        assert_same(name, &got, &want);
    }
    assert_eq!(std::fs::read(&p).unwrap(), b, "the input was not written");
}

/// qemu-img leaves the unwritten parts of a VHDX's payload blocks as file
/// holes: the image's map calls them zero (the walk neither reads nor
/// scans them), where the VHDX's own map says data; the content is the same.
#[test]
fn holes_in_payload_blocks_map_as_zero() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("holes.vhdx");
    let want = qemu_vhdx(
        &p,
        "subformat=dynamic,block_size=8M",
        "16M",
        &[(0x5a, MIB, 64 * KIB), (0x6b, 12 * MIB, 4096)],
    );
    let img = vhdkit::Image::open(&p).unwrap();
    let ours = img.map_all().unwrap();
    assert_tiles(&ours, 16 * MIB);
    let theirs = img.vhdx().unwrap().map_all().unwrap();
    let data = |m: &[Extent]| -> u64 { m.iter().filter(|e| e.is_data()).map(|e| e.length).sum() };
    assert_eq!(
        data(&theirs),
        16 * MIB,
        "both blocks are present: {theirs:?}"
    );
    let f = std::fs::File::open(&p).unwrap();
    let holes = vhdkit::Storage::data_ranges(
        &vhdkit::FileStorage::new(f),
        0,
        std::fs::metadata(&p).unwrap().len(),
    )
    .unwrap();
    for e in &ours {
        if let ExtentKind::Data { file_offset, .. } = e.kind {
            assert!(
                holes
                    .iter()
                    .any(|r| r.start <= file_offset && file_offset + e.length <= r.end),
                "{e:?} is not in the file's data {holes:?}"
            );
        }
    }
    if holes.iter().map(|r| r.end - r.start).sum::<u64>() < 8 * MIB {
        // The filesystem keeps holes: most of each block maps as zero.
        assert!(data(&ours) < 2 * MIB, "{ours:?}");
    }
    let mut got = vec![0u8; 16 * MIB as usize];
    img.read_exact_at(&mut got, 0).unwrap();
    assert_same("through the image", &got, &want);
    let out = dir.path().join("out.raw");
    vhdkit::convert(&p, &out, &vhdkit::ConvertOptions::new(vhdkit::Target::Raw)).unwrap();
    assert_same("converted", &std::fs::read(&out).unwrap(), &want);
}

#[test]
fn check_reports_metadata_entry_locator_and_bat_problems_together() {
    // A differencing disk whose parent locator has no parent_linkage, one
    // of whose metadata entries (page 83) lies inside the table, and one of
    // whose BAT entries (block 2) points past the file.
    let mut d = Disk::new(3 * MIB, MIB as u32, 512);
    d.has_parent = true;
    d.payload = vec![(0, 6, 4), (2, 6, 300)];
    d.locator = vec![("relative_path", "..\\base.vhdx")];
    d.file_len = 6 * MIB;
    let mut b = d.build();
    fill_pattern(&mut b, 4 * MIB, MIB, 0x11);
    // Entry 2 (page 83 data): offset 4096, inside the 64 KiB table.
    let e2 = META_AT + 32 + 2 * 32;
    put32(&mut b, e2 + 16, 4096);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vhdx");
    std::fs::write(&p, &b).unwrap();
    let r = check_report(&p);
    let got: Vec<_> = places(&r)
        .into_iter()
        .map(|x| (x.0, x.1, x.2, x.3, x.4))
        .collect();
    let v = |s| Some(Structure::Vhdx(s));
    let pl_at = META_AT + 64 * KIB + 5 * 4096;
    for want in [
        (
            true,
            "vhdx-metadata",
            v(VhdxStructure::Metadata),
            "offset".to_string(),
            e2 + 16,
        ),
        (
            true,
            "vhdx-parent-locator",
            v(VhdxStructure::ParentLocator),
            "parent_linkage".into(),
            pl_at,
        ),
        (
            true,
            "vhdx-bat-out-of-file",
            v(VhdxStructure::BatEntry(2)),
            "file offset".into(),
            BAT_AT + 16,
        ),
    ] {
        assert!(got.contains(&want), "{want:?} not in {:#?}", r.problems);
    }
    // Each once: no echo of the entry left out ("no page 83 item") nor of
    // the locator from the parent search.
    assert_eq!(got.len(), 3, "{:#?}", r.problems);
    // An open stops at the first.
    assert_corrupt(
        Vhdx::open(&p, &VhdxOptions::new()),
        VhdxStructure::Metadata,
        "offset",
        e2 + 16,
    );
}
