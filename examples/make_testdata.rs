//! Writes the hand-made images of `testdata/`, the same bytes on every run.
//!
//! ```text
//! cargo run --example make_testdata --no-default-features -- testdata/
//! ```
//!
//! Every image is assembled from vhdkit's on-disk types (`Footer`,
//! `DynamicHeader`, `ParentLocator`, `Bat`, each serialised with
//! `to_bytes`), with fixed timestamps and unique ids. Sector bitmaps and data
//! are laid out here, independently of vhdkit's reader. Files over 256 KiB
//! are written gzip-compressed (`NAME.gz`).
//!
//! Each image comes with the model it was built from: for every virtual
//! sector, whether this file defines it and at which file offset, what it
//! reads as, and what a reader that ignores sector bitmaps and parents (as
//! qemu does) reads instead. `tests/testdata.rs` includes this file as a
//! module and takes its expectations from these models. The models' SHA-256
//! sums also go to `testdata/handmade.json`, for other tools.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use vhdkit::ondisk::{
    bitmap_size, Bat, DiskType, DynamicHeader, Footer, Geometry, ParentLocator, PlatformCode,
    Timestamp, Uuid, UNALLOCATED,
};
use vhdkit::Format;

/// Bytes in a sector.
pub const SECTOR: u64 = 512;
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// Images larger than this are stored gzip-compressed.
pub const COMPRESS_OVER: usize = 256 * 1024;

/// The creation time of every hand-made image: 2024-01-01T00:00:00Z.
pub const TIMESTAMP: Timestamp = Timestamp(757_382_400);

/// Byte written in every gap between structures of the Hyper-V style image.
const GAP_JUNK: u8 = 0xa7;
/// Tag of the bytes a clear bitmap bit covers: stale data that must not be read.
const STALE: u8 = 0xde;
/// Tag of the bytes of the last block that lie past the virtual size.
const PAST_END: u8 = 0xee;

/// A deterministic unique id: `7668646b-0000-4000-8000-0000000000NN`.
pub fn uuid(n: u8) -> Uuid {
    Uuid([
        0x76, 0x68, 0x64, 0x6b, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, n,
    ])
}

/// Fills one sector with a recognisable pattern: its virtual sector number
/// (u64, big-endian), then `tag` repeated. No pattern sector is all zeros.
pub fn pattern(tag: u8, vsector: u64, out: &mut [u8]) {
    out.fill(tag);
    out[..8].copy_from_slice(&vsector.to_be_bytes());
    out[8] = tag | 1;
}

/// What one file says about each sector of the virtual disk.
#[derive(Clone, Debug)]
pub struct Model {
    /// Virtual size in bytes (a multiple of 512 in every fixture).
    pub size: u64,
    /// Per virtual sector: the absolute file offset where this file stores
    /// it, when this file defines it (fixed: every sector; dynamic and
    /// differencing: sectors whose bitmap bit is set).
    pub present: Vec<Option<u64>>,
    /// The virtual disk as this file defines it, zeros elsewhere.
    pub data: Vec<u8>,
    /// What a reader that ignores sector bitmaps and parents reads from this
    /// file alone (qemu-img 10 does both).
    pub bitmap_blind: Vec<u8>,
}

impl Model {
    fn new(size: u64) -> Model {
        Model {
            size,
            present: vec![None; (size / SECTOR) as usize],
            data: vec![0; size as usize],
            bitmap_blind: vec![0; size as usize],
        }
    }
}

/// One hand-made image.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// File name (without `.gz`).
    pub name: String,
    /// The file's bytes.
    pub bytes: Vec<u8>,
    /// What the footer says it is.
    pub format: Format,
    /// Sector by sector, what this file defines.
    pub model: Model,
    /// The footer's unique id.
    pub unique_id: Uuid,
    /// The fixture that is this one's parent.
    pub parent: Option<String>,
    /// Whether qemu-img 10 reads it (as `model.bitmap_blind`).
    pub qemu_reads: bool,
    /// One line for `testdata/README.md`.
    pub recipe: String,
}

impl Fixture {
    /// The name the file is stored under in `testdata/`.
    pub fn stored_name(&self) -> String {
        if self.bytes.len() > COMPRESS_OVER {
            format!("{}.gz", self.name)
        } else {
            self.name.clone()
        }
    }
}

/// The virtual disk of fixture `name` read through its whole chain: each
/// sector from the nearest file that defines it, zeros where none does.
pub fn content(all: &[Fixture], name: &str) -> Vec<u8> {
    let chain = chain(all, name);
    let mut out = vec![0u8; chain[0].model.size as usize];
    for s in 0..out.len() / SECTOR as usize {
        let r = s * SECTOR as usize..(s + 1) * SECTOR as usize;
        if let Some(f) = chain
            .iter()
            .find(|f| f.model.present.get(s).copied().flatten().is_some())
        {
            out[r.clone()].copy_from_slice(&f.model.data[r]);
        }
    }
    out
}

/// Fixture `name` followed by its parents.
pub fn chain<'a>(all: &'a [Fixture], name: &str) -> Vec<&'a Fixture> {
    let mut v = Vec::new();
    let mut next = Some(name.to_string());
    while let Some(n) = next {
        let f = all
            .iter()
            .find(|f| f.name == n)
            .unwrap_or_else(|| panic!("no fixture {n}"));
        next = f.parent.clone();
        v.push(f);
    }
    v
}

/// Sets of sectors, as half-open ranges.
fn bits(sectors: u64, set: &[(u64, u64)]) -> Vec<bool> {
    let mut v = vec![false; sectors as usize];
    for &(a, b) in set {
        v[a as usize..b as usize].fill(true);
    }
    v
}

/// One allocated block of a dynamic or differencing image.
struct BlockSpec {
    /// Block index (BAT entry).
    index: u64,
    /// Absolute file offset of the sector bitmap (a multiple of 512).
    at: u64,
    /// Per sector of the block: bitmap bit.
    bits: Vec<bool>,
    /// Pattern tag of the sectors whose bit is set.
    tag: u8,
    /// Fill the bitmap's padding (past the block's sectors) with ones.
    pad_ones: bool,
}

/// A dynamic or differencing image under construction.
struct Dyn {
    footer: Footer,
    header: DynamicHeader,
    blocks: Vec<BlockSpec>,
    /// Locator entries and their path strings, written at `data_offset`.
    locators: Vec<(ParentLocator, String)>,
    /// Byte that fills every byte no structure covers.
    gap: u8,
    /// Zero bytes between the end of the last structure and the footer.
    tail_padding: u64,
}

fn footer(disk_type: DiskType, size: u64, id: u8) -> Footer {
    let data_offset = if disk_type == DiskType::Fixed {
        Footer::NO_DATA_OFFSET
    } else {
        512
    };
    let mut f = Footer::new(disk_type, size, data_offset);
    f.timestamp = TIMESTAMP;
    f.unique_id = uuid(id);
    f
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

impl Dyn {
    fn new(disk_type: DiskType, size: u64, block_size: u32, id: u8) -> Dyn {
        let entries = size.div_ceil(u64::from(block_size)) as u32;
        Dyn {
            footer: footer(disk_type, size, id),
            header: DynamicHeader::new(1536, entries, block_size),
            blocks: Vec::new(),
            locators: Vec::new(),
            gap: 0,
            tail_padding: 0,
        }
    }

    fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    /// First sector-aligned offset after the BAT and locator data.
    fn metadata_end(&self) -> u64 {
        let bat_end =
            self.header.table_offset + Bat::disk_size(u64::from(self.header.max_table_entries));
        self.locators
            .iter()
            .map(|(l, _)| l.data_offset + 512)
            .fold(bat_end, u64::max)
    }

    /// Offset for a block placed right after everything placed so far.
    fn next_free(&self) -> u64 {
        let bm = bitmap_size(self.header.block_size);
        self.blocks
            .iter()
            .map(|b| b.at + bm + self.block_size())
            .fold(self.metadata_end(), u64::max)
    }

    /// Appends block `index` after everything placed so far.
    fn push_block(&mut self, index: u64, set: &[(u64, u64)], tag: u8) {
        let at = self.next_free();
        self.place_block(index, at, set, tag);
    }

    fn place_block(&mut self, index: u64, at: u64, set: &[(u64, u64)], tag: u8) {
        let spb = self.block_size() / SECTOR;
        self.blocks.push(BlockSpec {
            index,
            at,
            bits: bits(spb, set),
            tag,
            pad_ones: false,
        });
    }

    /// Names the parent: its id and timestamp, its name, and locators
    /// (written one sector each, after the BAT).
    fn parent(&mut self, parent_id: Uuid, name: &str, locators: &[(PlatformCode, &str)]) {
        self.header.parent_unique_id = parent_id;
        self.header.parent_timestamp = TIMESTAMP;
        self.header.set_parent_name(name);
        let mut at =
            self.header.table_offset + Bat::disk_size(u64::from(self.header.max_table_entries));
        for (i, (code, path)) in locators.iter().enumerate() {
            let data = utf16le(path);
            assert!(data.len() <= 512);
            // Windows writes the space in bytes; the specification says sectors.
            // Both are used, so readers must not depend on it.
            let data_space = if i % 2 == 0 { 512 } else { 1 };
            self.locators.push((
                ParentLocator {
                    platform_code: *code,
                    data_space,
                    data_length: data.len() as u32,
                    reserved: 0,
                    data_offset: at,
                },
                path.to_string(),
            ));
            at += 512;
        }
    }

    /// The file and its model.
    fn build(mut self) -> (Vec<u8>, Model) {
        let size = self.footer.current_size;
        let bs = self.block_size();
        let bm = bitmap_size(self.header.block_size);
        let spb = bs / SECTOR;
        let end = self.next_free() + self.tail_padding;
        let mut file = vec![self.gap; end as usize];
        file[(end - self.tail_padding) as usize..].fill(0);

        let mut bat = Bat::new(self.header.max_table_entries as usize);
        for b in &self.blocks {
            assert_eq!(b.at % SECTOR, 0);
            assert_eq!(
                bat.entries[b.index as usize], UNALLOCATED,
                "block placed twice"
            );
            bat.entries[b.index as usize] = (b.at / SECTOR) as u32;
        }
        for (i, (l, path)) in self.locators.iter().enumerate() {
            self.header.parent_locators[i] = *l;
            let data = utf16le(path);
            let at = l.data_offset as usize;
            file[at..at + 512].fill(0);
            file[at..at + data.len()].copy_from_slice(&data);
        }
        let foot = self.footer.to_bytes();
        file[..512].copy_from_slice(&foot);
        let hdr_at = self.footer.data_offset as usize;
        file[hdr_at..hdr_at + 1024].copy_from_slice(&self.header.to_bytes());
        let bat_bytes = bat.to_bytes();
        let t = self.header.table_offset as usize;
        file[t..t + bat_bytes.len()].copy_from_slice(&bat_bytes);

        let mut model = Model::new(size);
        let total = size / SECTOR;
        for b in &self.blocks {
            // The bitmap, most significant bit first.
            let bitmap = &mut file[b.at as usize..(b.at + bm) as usize];
            bitmap.fill(if b.pad_ones { 0xff } else { 0 });
            bitmap[..(spb / 8) as usize].fill(0);
            for (s, &set) in b.bits.iter().enumerate() {
                if set {
                    bitmap[s / 8] |= 0x80 >> (s % 8);
                }
            }
            for s in 0..spb {
                let v = b.index * spb + s;
                let off = b.at + bm + s * SECTOR;
                let sector = &mut file[off as usize..(off + SECTOR) as usize];
                let set = b.bits[s as usize];
                let tag = if v >= total {
                    PAST_END
                } else if set {
                    b.tag
                } else {
                    STALE
                };
                pattern(tag, v, sector);
                if v >= total {
                    continue;
                }
                let r = (v * SECTOR) as usize..((v + 1) * SECTOR) as usize;
                model.bitmap_blind[r.clone()].copy_from_slice(sector);
                if set {
                    model.present[v as usize] = Some(off);
                    model.data[r].copy_from_slice(sector);
                }
            }
        }
        file.extend_from_slice(&foot);
        (file, model)
    }
}

fn fixture(name: &str, d: Dyn, parent: Option<&str>, recipe: &str) -> Fixture {
    let format = if d.footer.disk_type == DiskType::Differencing {
        Format::Differencing
    } else {
        Format::Dynamic
    };
    let unique_id = d.footer.unique_id;
    let (bytes, model) = d.build();
    Fixture {
        name: name.to_string(),
        bytes,
        format,
        model,
        unique_id,
        parent: parent.map(str::to_string),
        qemu_reads: true,
        recipe: recipe.to_string(),
    }
}

/// A fixed image of Virtual PC before 2004: the footer is 511 bytes long.
pub fn fixed_legacy_footer() -> Fixture {
    let geometry = Geometry {
        cylinders: 5,
        heads: 4,
        sectors: 17,
    };
    let size = geometry.size();
    let mut f = footer(DiskType::Fixed, size, 1);
    f.creator_app = *b"vpc ";
    f.creator_version = 0x0005_0000;
    assert_eq!(f.geometry, geometry);
    let mut model = Model::new(size);
    for s in 0..size / SECTOR {
        let r = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
        // Sectors 100..150 are zeros; a fixed disk still stores them.
        if !(100..150).contains(&s) {
            pattern(0x51, s, &mut model.data[r.clone()]);
        }
        model.present[s as usize] = Some(s * SECTOR);
    }
    model.bitmap_blind = model.data.clone();
    let mut bytes = model.data.clone();
    bytes.extend_from_slice(&f.to_bytes()[..511]);
    Fixture {
        name: "hand-fixed-legacy-footer.vhd".into(),
        bytes,
        format: Format::Fixed,
        model,
        unique_id: f.unique_id,
        parent: None,
        qemu_reads: true,
        recipe: format!(
            "fixed, creator 'vpc ' 5.0, CHS 5/4/17 = {size} bytes, every sector patterned except \
             100..150 (zeros), then the footer's first 511 bytes (no final reserved byte), as \
             Virtual PC before 2004 wrote it. qemu-img reads it too: its block layer rounds the \
             file up to a whole sector, so the footer sits at the rounded end minus 512"
        ),
    }
}

/// 512 KiB blocks; bitmaps padded with ones, as some writers do.
pub fn dynamic_512k_blocks() -> Fixture {
    let mut d = Dyn::new(DiskType::Dynamic, 3 * MIB, 512 * KIB as u32, 2);
    let spb = 512 * KIB / SECTOR;
    for (i, tag) in [(0, 0x20), (2, 0x22), (5, 0x25)] {
        d.push_block(i, &[(0, spb)], tag);
    }
    for b in &mut d.blocks {
        b.pad_ones = true;
    }
    fixture(
        "hand-dynamic-512k-blocks.vhd",
        d,
        None,
        "dynamic, 3 MiB, 512 KiB blocks (6 BAT entries), blocks 0, 2 and 5 allocated with full \
         bitmaps (the 384 padding bytes of each 512-byte bitmap are 0xFF), the others unallocated",
    )
}

/// The last block covers only part of its 2 MiB.
pub fn dynamic_partial_last_block() -> Fixture {
    let size = 2 * MIB + 300 * KIB;
    let mut d = Dyn::new(DiskType::Dynamic, size, 2 * MIB as u32, 3);
    let spb = 2 * MIB / SECTOR;
    d.push_block(0, &[(0, spb)], 0x30);
    d.push_block(1, &[(0, spb)], 0x31);
    fixture(
        "hand-dynamic-partial-last-block.vhd",
        d,
        None,
        &format!(
            "dynamic, {size} bytes (2 MiB + 300 KiB: not a whole number of blocks, not CHS-exact), \
             2 BAT entries, both blocks allocated and full; block 1's bytes past the virtual size \
             hold 0xEE and must not be read"
        ),
    )
}

/// Original size 4 MiB, current size 6 MiB: the disk was grown.
pub fn dynamic_grown() -> Fixture {
    let mut d = Dyn::new(DiskType::Dynamic, 6 * MIB, 2 * MIB as u32, 4);
    d.footer.original_size = 4 * MIB;
    let spb = 2 * MIB / SECTOR;
    d.push_block(0, &[(0, spb)], 0x40);
    d.push_block(2, &[(0, spb)], 0x42);
    fixture(
        "hand-dynamic-original-4M-current-6M.vhd",
        d,
        None,
        "dynamic, original size 4 MiB (bytes 40..48) but current size 6 MiB (bytes 48..56), \
         geometry for 6 MiB, 3 BAT entries, blocks 0 and 2 allocated: block 2 lies wholly past \
         the original size, so a reader that takes the original size as the disk size fails",
    )
}

/// Hyper-V's layout: blocks out of order, with gaps, data 4 KiB aligned,
/// zero padding before the end footer.
pub fn dynamic_hyperv_layout() -> Fixture {
    let mut d = Dyn::new(DiskType::Dynamic, 10 * MIB, 2 * MIB as u32, 5);
    d.footer.creator_app = *b"win ";
    d.footer.creator_version = 0x000a_0000;
    d.gap = GAP_JUNK;
    d.tail_padding = 3584;
    let spb = 2 * MIB / SECTOR;
    let mut data_at = 8 * KIB;
    for (i, tag, gap_after) in [(3, 0x53, 64 * KIB), (0, 0x50, 12 * KIB), (4, 0x54, 0)] {
        d.place_block(i, data_at - 512, &[(0, spb)], tag);
        data_at += 2 * MIB + gap_after;
    }
    fixture(
        "hand-dynamic-hyperv-layout.vhd",
        d,
        None,
        "dynamic, 10 MiB, creator 'win ' 10.0 (CHS 301/4/17 short of the size), 5 BAT entries; \
         blocks stored in the order 3, 0, 4 with each bitmap in the sector before a 4 KiB \
         boundary so data is 4 KiB aligned, gaps of 0xA7 junk (5.5 KiB, 64 KiB, 12 KiB) between \
         the structures, blocks 1 and 2 unallocated, 3584 zero bytes before the end footer",
    )
}

/// Sector bitmaps with clear bits over non-zero bytes.
pub fn dynamic_partial_bitmaps() -> Fixture {
    let mut d = Dyn::new(DiskType::Dynamic, 8 * MIB, 2 * MIB as u32, 6);
    let spb = 2 * MIB / SECTOR;
    d.push_block(
        0,
        &[(0, 4), (9, 10), (16, 24), (1000, 2000), (spb - 1, spb)],
        0x60,
    );
    d.push_block(1, &[(0, 2047), (2048, spb)], 0x61);
    d.push_block(3, &[], 0x63);
    fixture(
        "hand-dynamic-partial-bitmaps.vhd",
        d,
        None,
        "dynamic, 8 MiB, 4 BAT entries. Block 0: bitmap bits set for sectors 0..4, 9, 16..24, \
         1000..2000 and 4095; block 1: all set but sector 2047; block 2 unallocated; block 3 \
         allocated with an all-clear bitmap. Every sector whose bit is clear holds non-zero \
         stale bytes (0xDE pattern) and reads as zeros; qemu-img, which ignores bitmaps, reads \
         the stale bytes instead",
    )
}

/// The base of the differencing chain.
pub fn chain_base() -> Fixture {
    let mut d = Dyn::new(DiskType::Dynamic, 5 * MIB, 2 * MIB as u32, 7);
    let spb = 2 * MIB / SECTOR;
    d.push_block(0, &[(0, spb)], 0xb0);
    // Block 2 is the last, half inside the disk; 1000..1200 are clear.
    d.push_block(2, &[(0, 1000), (1200, spb)], 0xb2);
    fixture(
        "hand-chain-base.vhd",
        d,
        None,
        "dynamic, 5 MiB (3 BAT entries, the last block half used), base of the chain. Block 0 \
         full; block 1 unallocated; block 2 with sectors 1000..1200 clear (stale bytes there)",
    )
}

/// Paths of the child's locators in testdata/.
pub const CHILD_LOCATORS: [(PlatformCode, &str); 2] = [
    (
        PlatformCode::W2ku,
        "C:\\vhdkit\\testdata\\hand-chain-base.vhd",
    ),
    (PlatformCode::W2ru, ".\\hand-chain-base.vhd"),
];

/// The middle of the chain: a differencing disk over `parent` (normally
/// [`chain_base`]), with parent name `parent_name` and locators `locators`.
pub fn chain_child_with(
    name: &str,
    parent: &Fixture,
    parent_name: &str,
    locators: &[(PlatformCode, &str)],
) -> Fixture {
    let mut d = Dyn::new(DiskType::Differencing, 5 * MIB, 2 * MIB as u32, 8);
    d.parent(parent.unique_id, parent_name, locators);
    d.push_block(0, &[(0, 8), (100, 200), (2043, 2061)], 0xc0);
    d.push_block(1, &[(10, 20)], 0xc1);
    fixture(
        name,
        d,
        Some(&parent.name),
        "differencing over hand-chain-base.vhd, parent locators W2ku \
         'C:\\vhdkit\\testdata\\hand-chain-base.vhd' and W2ru '.\\hand-chain-base.vhd' (UTF-16LE), \
         parent name 'hand-chain-base.vhd' (UTF-16BE). Block 0: bits set for 0..8, 100..200, \
         2043..2061; block 1: bits 10..20; block 2 unallocated (reads from the base). Clear bits \
         cover stale non-zero bytes and read from the base",
    )
}

/// The middle of the chain as stored in testdata/.
pub fn chain_child(base: &Fixture) -> Fixture {
    chain_child_with(
        "hand-chain-child.vhd",
        base,
        "hand-chain-base.vhd",
        &CHILD_LOCATORS,
    )
}

/// The top of the chain.
pub fn chain_grandchild(child: &Fixture) -> Fixture {
    let mut d = Dyn::new(DiskType::Differencing, 5 * MIB, 2 * MIB as u32, 9);
    d.parent(
        child.unique_id,
        "C:\\vhdkit\\testdata\\hand-chain-child.vhd",
        &[
            (PlatformCode::W2ru, ".\\hand-chain-child.vhd"),
            (
                PlatformCode::W2ku,
                "C:\\vhdkit\\testdata\\hand-chain-child.vhd",
            ),
        ],
    );
    d.push_block(2, &[(900, 1100)], 0xd2);
    d.push_block(0, &[(4, 12), (150, 160), (4000, 4096)], 0xd0);
    fixture(
        "hand-chain-grandchild.vhd",
        d,
        Some(&child.name),
        "differencing over hand-chain-child.vhd, locators W2ru '.\\hand-chain-child.vhd' and \
         W2ku 'C:\\vhdkit\\testdata\\hand-chain-child.vhd', parent name the absolute path. Blocks \
         stored out of order (2, then 0). Block 0: bits 4..12, 150..160, 4000..4096; block 1 \
         unallocated (reads from the child, then the base: zeros where neither has data); block \
         2: bits 900..1100 (the base's clear sectors 1100..1200 read as zeros)",
    )
}

/// A small differencing disk for tests that build files at run time:
/// `parent_id` names the parent, `locator` is a W2ru path.
pub fn differencing_stub(name: &str, id: u8, parent_id: Uuid, locator: &str) -> Fixture {
    let mut d = Dyn::new(DiskType::Differencing, MIB, 2 * MIB as u32, id);
    d.parent(parent_id, locator, &[(PlatformCode::W2ru, locator)]);
    d.push_block(0, &[(0, 1)], id);
    fixture(name, d, None, "built at test time")
}

/// Every hand-made image of testdata/.
pub fn all() -> Vec<Fixture> {
    let base = chain_base();
    let child = chain_child(&base);
    let grandchild = chain_grandchild(&child);
    vec![
        fixed_legacy_footer(),
        dynamic_512k_blocks(),
        dynamic_partial_last_block(),
        dynamic_grown(),
        dynamic_hyperv_layout(),
        dynamic_partial_bitmaps(),
        base,
        child,
        grandchild,
    ]
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(b).iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// `testdata/handmade.json`: per image, the format, sizes and the SHA-256
/// of its virtual content (chain resolved) and of what qemu reads.
pub fn sidecar(all: &[Fixture]) -> String {
    let mut s = String::from("[\n");
    for (i, f) in all.iter().enumerate() {
        let _ = writeln!(
            s,
            "  {{\"file\": \"{}\", \"format\": \"{}\", \"virtual_size\": {}, \"parent\": {}, \
             \"content_sha256\": \"{}\", \"bitmap_blind_sha256\": \"{}\", \"qemu_reads\": {}}}{}",
            f.stored_name(),
            f.format,
            f.model.size,
            f.parent
                .as_ref()
                .map_or("null".to_string(), |p| format!("\"{p}\"")),
            sha256_hex(&content(all, &f.name)),
            sha256_hex(&f.model.bitmap_blind),
            f.qemu_reads,
            if i + 1 < all.len() { "," } else { "" }
        );
    }
    s.push_str("]\n");
    s
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "testdata".to_string());
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    let all = all();
    for f in &all {
        let path = dir.join(f.stored_name());
        if f.bytes.len() > COMPRESS_OVER {
            let mut gz = flate2::GzBuilder::new()
                .mtime(0)
                .write(std::fs::File::create(&path)?, flate2::Compression::best());
            gz.write_all(&f.bytes)?;
            gz.finish()?.sync_all()?;
        } else {
            std::fs::write(&path, &f.bytes)?;
        }
        println!("{}: {}", path.display(), f.recipe);
    }
    std::fs::write(dir.join("handmade.json"), sidecar(&all))?;
    Ok(())
}
