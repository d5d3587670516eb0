//! Creating disks (fixed, dynamic, differencing), writing into them through
//! the library, and merging children: checked against vhdkit's reader and
//! qemu-img.

use crate::common::{assert_same, qemu_img};
use std::path::Path;
use std::process::Command;
use vhdkit::create::{create, create_child, ChildOptions, CreateOptions, DiskKind};
use vhdkit::ondisk::{PlatformCode, SECTOR};
use vhdkit::writer::VhdWriter;
use vhdkit::{Format, Image, OpenOptions};

const MIB: u64 = 1 << 20;

/// Runs qemu-img with `args`, panicking with its output when it fails.
fn qemu(args: &[&str]) -> String {
    let o = Command::new(qemu_img()).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The whole virtual disk as vhdkit reads it.
fn content(path: &Path) -> Vec<u8> {
    let img = Image::open(path).unwrap();
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_exact_at(&mut v, 0).unwrap();
    v
}

/// `qemu-img compare` of a VHD with a raw file holding `want`.
fn qemu_compare(vhd: &Path, want: &[u8]) {
    let raw = vhd.with_extension("want.raw");
    std::fs::write(&raw, want).unwrap();
    qemu(&[
        "compare",
        "-f",
        "vpc",
        "-F",
        "raw",
        vhd.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    std::fs::remove_file(raw).unwrap();
}

#[test]
fn create_fixed_is_sparse_at_any_size() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.vhd");
    let size = 2040 * 1024 * MIB;
    let t = std::time::Instant::now();
    let made = create(&big, &CreateOptions::new(DiskKind::Fixed, size)).unwrap();
    assert!(t.elapsed().as_secs() < 5, "took {:?}", t.elapsed());
    assert_eq!(made.virtual_size, size);
    assert_eq!(made.file_len, size + 512);
    let img = Image::open(&big).unwrap();
    assert_eq!(img.disk_type(), Format::Fixed);
    assert_eq!(img.virtual_size(), size);
    assert_eq!(&img.footer().unwrap().creator_app, b"vhdk");
    let allocated = crate::common::allocated_bytes(img.file().unwrap()).unwrap();
    assert!(allocated < MIB, "{allocated} bytes allocated");
    // A small one, read by qemu-img as zeros of the same size.
    let small = dir.path().join("small.vhd");
    create(&small, &CreateOptions::new(DiskKind::Fixed, 3 * MIB + 512)).unwrap();
    qemu_compare(&small, &vec![0u8; (3 * MIB + 512) as usize]);
    assert!(qemu(&["info", "-f", "vpc", small.to_str().unwrap()]).contains("3146240 bytes"));
}

#[test]
fn create_dynamic_every_block_size_opens_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut bs = 512 * 1024u32;
    while bs <= 256 << 20 {
        let p = dir.path().join(format!("d{bs}.vhd"));
        let size = 6 * MIB + 3 * 512;
        let made = create(
            &p,
            &CreateOptions::new(DiskKind::Dynamic, size).block_size(bs),
        )
        .unwrap();
        assert_eq!(made.block_size, u64::from(bs));
        let img = Image::open(&p).unwrap();
        assert_eq!(img.disk_type(), Format::Dynamic);
        assert_eq!(img.block_size(), u64::from(bs));
        assert_eq!(img.allocated_blocks(), 0);
        assert_eq!(img.block_count(), size.div_ceil(u64::from(bs)));
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..512], &bytes[bytes.len() - 512..], "footer copy");
        qemu_compare(&p, &vec![0u8; size as usize]);
        bs *= 2;
    }
}

#[test]
fn create_azure_rounds_up_and_bad_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.vhd");
    let made = create(
        &p,
        &CreateOptions::new(DiskKind::Fixed, 10 * MIB + 512).azure(true),
    )
    .unwrap();
    assert_eq!(made.virtual_size, 11 * MIB);
    assert_eq!(made.rounded_from, Some(10 * MIB + 512));
    for (size, bs) in [
        (0, 2 << 20),
        (MIB + 1, 2 << 20),
        (2041 * 1024 * MIB, 2 << 20),
        (MIB, 3 << 20),
        (MIB, 4096),
    ] {
        let q = dir.path().join("bad.vhd");
        let e = create(
            &q,
            &CreateOptions::new(DiskKind::Dynamic, size).block_size(bs),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                vhdkit::Error::InvalidOption {
                    option: "size" | "block size",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.kind(), vhdkit::ErrorKind::InvalidOption);
        assert!(!q.exists());
    }
    let e = create(&p, &CreateOptions::new(DiskKind::Dynamic, MIB)).unwrap_err();
    assert!(matches!(e, vhdkit::Error::OutputExists(_)), "{e}");
    create(
        &p,
        &CreateOptions::new(DiskKind::Dynamic, MIB).overwrite(true),
    )
    .unwrap();
    assert_eq!(Image::open(&p).unwrap().disk_type(), Format::Dynamic);
    // Nothing but the outputs is left in the folder.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// `Image::create` and `Image::create_child` create and open in one call:
/// the new disk is empty, of the kind and size asked for, and the child
/// reads through its parent.
#[test]
fn image_create_and_create_child_open_what_they_made() {
    let dir = tempfile::tempdir().unwrap();
    let fixed = Image::create(
        dir.path().join("f.vhd"),
        &CreateOptions::new(DiskKind::Fixed, 3 << 20),
    )
    .unwrap();
    assert_eq!(fixed.disk_type(), Format::Fixed);
    assert_eq!(fixed.virtual_size(), 3 << 20);
    let base = dir.path().join("base.vhd");
    let dynamic = Image::create(&base, &CreateOptions::new(DiskKind::Dynamic, 4 << 20)).unwrap();
    assert_eq!(dynamic.disk_type(), Format::Dynamic);
    assert_eq!(dynamic.allocated_blocks(), 0);
    drop(dynamic);
    let w = VhdWriter::open(&base, &OpenOptions::new()).unwrap();
    w.write_all_at(&[0x5a; 4096], 1 << 20).unwrap();
    w.close().unwrap();
    let child = Image::create_child(dir.path().join("child.vhd"), &base).unwrap();
    assert_eq!(child.disk_type(), Format::Differencing);
    assert_eq!(child.chain().len(), 2);
    let mut b = vec![0u8; 4096];
    child.read_exact_at(&mut b, 1 << 20).unwrap();
    assert_eq!(b, vec![0x5a; 4096], "the child reads its parent's data");
}

/// The data of locator `i` of `img`, decoded from UTF-16 LE.
fn locator_text(img: &Image, i: usize) -> (PlatformCode, String, u64, u32) {
    let l = img.header().unwrap().parent_locators[i];
    let mut b = vec![0u8; l.data_length as usize];
    vhdkit::ReadAt::read_exact_at(img.file().unwrap(), &mut b, l.data_offset).unwrap();
    let u: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    (
        l.platform_code,
        String::from_utf16(&u).unwrap(),
        l.data_offset,
        l.data_space,
    )
}

#[test]
fn create_child_names_its_parent_as_windows_does() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    create(
        &base,
        &CreateOptions::new(DiskKind::Dynamic, 4 * MIB).block_size(1 << 20),
    )
    .unwrap();
    let child = dir.path().join("child.vhd");
    let made = create_child(&child, &base, &ChildOptions::default()).unwrap();
    let img = Image::open(&child).unwrap();
    let pimg = Image::open(&base).unwrap();
    assert_eq!(img.disk_type(), Format::Differencing);
    assert_eq!(img.virtual_size(), 4 * MIB);
    assert_eq!(img.block_size(), 1 << 20, "the parent's block size");
    assert_eq!(
        made.parent.as_ref().unwrap().unique_id,
        pimg.footer().unwrap().unique_id
    );
    let h = img.header().unwrap();
    assert_eq!(h.parent_unique_id, pimg.footer().unwrap().unique_id);
    assert_eq!(h.parent_timestamp, pimg.footer().unwrap().timestamp);
    assert_eq!(h.parent_name(), "base.vhd");
    assert_eq!(img.parent().unwrap().path(), base.as_path());
    let abs = std::fs::canonicalize(&base).unwrap();
    let (code, text, off, space) = locator_text(&img, 0);
    assert_eq!(code, PlatformCode::W2ku);
    assert_eq!(text, abs.to_str().unwrap().replace('/', "\\"));
    assert_eq!(off % 4096, 0);
    assert!(space >= 4096 && space % 4096 == 0);
    let (code, text, off, _) = locator_text(&img, 1);
    assert_eq!(code, PlatformCode::W2ru);
    assert_eq!(text, ".\\base.vhd");
    assert_eq!(off % 4096, 0);
    assert!(img.header().unwrap().parent_locators[2..]
        .iter()
        .all(|l| l.is_empty()));

    // A child of a child, in another folder: a relative path upward, and
    // the chain opens when that folder is allowed.
    let sub = dir.path().join("snaps");
    std::fs::create_dir(&sub).unwrap();
    let grandchild = sub.join("gc.vhd");
    create_child(&grandchild, &child, &ChildOptions::default()).unwrap();
    let g = Image::open_with(&grandchild, &OpenOptions::new().parent_dir(dir.path())).unwrap();
    assert_eq!(g.chain().len(), 3);
    assert_eq!(locator_text(&g, 1).1, "..\\child.vhd");

    // A fixed parent: 2 MiB blocks.
    let fixed = dir.path().join("fixed.vhd");
    create(&fixed, &CreateOptions::new(DiskKind::Fixed, 3 * MIB)).unwrap();
    let fc = dir.path().join("fc.vhd");
    create_child(&fc, &fixed, &ChildOptions::default()).unwrap();
    let fci = Image::open(&fc).unwrap();
    assert_eq!(fci.block_size(), 2 << 20);
    assert_eq!(fci.virtual_size(), 3 * MIB);

    // A raw file is no parent.
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; MIB as usize]).unwrap();
    let e = create_child(dir.path().join("r.vhd"), &raw, &ChildOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            vhdkit::Error::WrongImageKind {
                kind: Format::Raw,
                ..
            }
        ),
        "{e}"
    );
}

/// Bytes that differ from write to write and from place to place.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9) ^ (i >> 9)) as u8 | 1)
        .collect()
}

/// Writes through the writer and into the model.
fn put(w: &VhdWriter, model: &mut [u8], data: &[u8], off: u64) {
    w.write_all_at(data, off).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// Reads the whole disk through the writer.
fn writer_content(w: &VhdWriter) -> Vec<u8> {
    let mut v = vec![0u8; w.virtual_size() as usize];
    w.read_exact_at(&mut v, 0).unwrap();
    v
}

/// Writes of every shape: aligned, unaligned, one byte, across blocks.
fn shapes(size: u64, bs: u64) -> Vec<(u64, usize)> {
    let mut v = vec![
        (0, 512),
        (1000, 1),
        (bs - 700, 1500),
        (bs + 4096, 65536),
        (size - 513, 513),
        (3 * 512 + 17, 10_000),
        (bs / 2 + 3, 2 * bs as usize),
    ];
    v.retain(|&(o, l)| o + l as u64 <= size);
    v
}

#[test]
fn writes_into_dynamic_disks_of_every_block_size_read_the_same_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut bs = 512 * 1024u32;
    while bs <= 256 << 20 {
        let p = dir.path().join(format!("w{bs}.vhd"));
        let size = 6 * MIB + 3 * 512;
        create(
            &p,
            &CreateOptions::new(DiskKind::Dynamic, size).block_size(bs),
        )
        .unwrap();
        let mut model = vec![0u8; size as usize];
        let w = VhdWriter::open(&p, &OpenOptions::new()).unwrap();
        for (i, (off, len)) in shapes(size, u64::from(bs)).into_iter().enumerate() {
            put(&w, &mut model, &pattern(i as u64, len), off);
        }
        assert_same("through the writer", &writer_content(&w), &model);
        w.close().unwrap();
        assert_same(&format!("block size {bs}"), &content(&p), &model);
        qemu_compare(&p, &model);
        let report = vhdkit::check(&p, &vhdkit::CheckOptions::default()).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
        // Every block of the file starts its data on 4 KiB.
        let img = Image::open(&p).unwrap();
        for e in img
            .bat()
            .unwrap()
            .entries
            .iter()
            .filter(|&&e| e != u32::MAX)
        {
            assert_eq!((u64::from(*e) * SECTOR + img.bitmap_size()) % 4096, 0);
        }
        bs *= 2;
    }
}

#[test]
fn zeros_into_unallocated_blocks_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("z.vhd");
    create(&p, &CreateOptions::new(DiskKind::Dynamic, 8 * MIB)).unwrap();
    let len0 = std::fs::metadata(&p).unwrap().len();
    {
        let w = VhdWriter::open(&p, &OpenOptions::new()).unwrap();
        w.write_all_at(&vec![0u8; 3 * MIB as usize], 100).unwrap();
        w.close().unwrap();
    }
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len0);
    assert_eq!(Image::open(&p).unwrap().allocated_blocks(), 0);

    // In a child, zeros over the parent's zeros allocate nothing; zeros
    // over the parent's data do, and read as zeros.
    let mut model = vec![0u8; 8 * MIB as usize];
    {
        let w = VhdWriter::open(&p, &OpenOptions::new()).unwrap();
        put(&w, &mut model, &pattern(1, 4096), 2 * MIB);
        w.close().unwrap();
    }
    let c = dir.path().join("c.vhd");
    create_child(&c, &p, &ChildOptions::default()).unwrap();
    let w = VhdWriter::open(&c, &OpenOptions::new()).unwrap();
    put(&w, &mut model, &[0u8; 4096], 0);
    w.flush().unwrap();
    assert_eq!(Image::open(&c).unwrap().allocated_blocks(), 0);
    put(&w, &mut model, &[0u8; 1000], 2 * MIB + 10);
    w.close().unwrap();
    assert_eq!(Image::open(&c).unwrap().allocated_blocks(), 1);
    assert_same("child", &content(&c), &model);
}

#[test]
fn writes_into_fixed_disks_read_the_same_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.vhd");
    let size = 5 * MIB;
    create(&p, &CreateOptions::new(DiskKind::Fixed, size)).unwrap();
    let mut model = vec![0u8; size as usize];
    let w = VhdWriter::open(&p, &OpenOptions::new()).unwrap();
    for (i, (off, len)) in shapes(size, 2 * MIB).into_iter().enumerate() {
        put(&w, &mut model, &pattern(i as u64 + 50, len), off);
    }
    let e = w.write_all_at(&[1], size).unwrap_err();
    assert!(
        matches!(e, vhdkit::Error::OutOfRange { offset, len: 1, size: s, .. } if offset == size && s == size),
        "{e}"
    );
    w.close().unwrap();
    assert_same("fixed", &content(&p), &model);
    qemu_compare(&p, &model);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), size + 512);
}

#[test]
fn writes_into_differencing_disks_keep_the_parent_and_read_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let size = 5 * MIB + 512;
    create(
        &base,
        &CreateOptions::new(DiskKind::Dynamic, size).block_size(1 << 20),
    )
    .unwrap();
    let mut model = vec![0u8; size as usize];
    {
        let w = VhdWriter::open(&base, &OpenOptions::new()).unwrap();
        for b in 0..5u64 {
            put(&w, &mut model, &pattern(b + 100, 600_000), b * MIB + 7);
        }
        w.close().unwrap();
    }
    let base_bytes = std::fs::read(&base).unwrap();
    let parent_model = model.clone();
    let child = dir.path().join("child.vhd");
    create_child(&child, &base, &ChildOptions::default()).unwrap();
    let w = VhdWriter::open(&child, &OpenOptions::new()).unwrap();
    assert_same("child before writes", &writer_content(&w), &model);
    for (i, (off, len)) in shapes(size, 1 << 20).into_iter().enumerate() {
        put(&w, &mut model, &pattern(i as u64 + 7, len), off);
    }
    assert_same("through the writer", &writer_content(&w), &model);
    w.close().unwrap();
    assert_same("child", &content(&child), &model);
    assert_same("parent", &content(&base), &parent_model);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_bytes,
        "parent file untouched"
    );
    // qemu-img has no VHD differencing support: it reads a child without
    // its parent, ignoring the bitmaps. It must still read every sector
    // the child holds as vhdkit does, and zeros elsewhere (the child's data
    // areas are zero wherever it holds nothing).
    let mut own = vec![0u8; size as usize];
    for e in Image::open(&child).unwrap().map_shallow(0, size).unwrap() {
        if e.is_data() {
            let r = e.offset as usize..e.end() as usize;
            own[r.clone()].copy_from_slice(&model[r]);
        }
    }
    qemu_compare(&child, &own);
    // Sectors written in part hold the parent's bytes around the write.
    let img = Image::open(&child).unwrap();
    let mut sector = [0u8; 512];
    img.read_exact_at(&mut sector, 512).unwrap(); // the sector holding byte 1000
    assert_eq!(sector, model[512..1024]);
}

#[test]
fn concurrent_writers_on_different_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhd");
    let size = 16 * MIB;
    create(
        &p,
        &CreateOptions::new(DiskKind::Dynamic, size).block_size(512 << 10),
    )
    .unwrap();
    let w = VhdWriter::open(&p, &OpenOptions::new()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let w = &w;
            s.spawn(move || {
                // Thread t writes blocks t, t+4, t+8... in 4 KiB pieces.
                for b in (t..32).step_by(4) {
                    for k in 0..128u64 {
                        let off = b * (512 << 10) + k * 4096;
                        w.write_all_at(&pattern(off, 4096), off).unwrap();
                    }
                    if b % 8 == t {
                        w.flush().unwrap();
                    }
                }
            });
        }
    });
    w.close().unwrap();
    let got = content(&p);
    for off in (0..size).step_by(4096) {
        assert_eq!(
            &got[off as usize..off as usize + 4096],
            &pattern(off, 4096)[..],
            "at {off}"
        );
    }
    assert_eq!(Image::open(&p).unwrap().allocated_blocks(), 32);
}

#[test]
fn the_cursor_writes_reads_and_seeks() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.vhd");
    create(&p, &CreateOptions::new(DiskKind::Dynamic, 3 * MIB)).unwrap();
    let w = VhdWriter::open(&p, &OpenOptions::new()).unwrap();
    let data = pattern(9, 2 * MIB as usize + 333);
    let mut c = w.cursor();
    c.seek(SeekFrom::Start(MIB - 100)).unwrap();
    let e = c.write_all(&data).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WriteZero, "past the end");
    c.seek(SeekFrom::Start(100)).unwrap();
    c.write_all(&data).unwrap();
    c.flush().unwrap();
    assert_eq!(c.stream_position().unwrap(), 100 + data.len() as u64);
    let mut back = vec![0u8; data.len()];
    c.seek(SeekFrom::End(-(3 * MIB as i64) + 100)).unwrap();
    c.read_exact(&mut back).unwrap();
    assert_same("cursor", &back, &data);
    drop(w);
    let got = content(&p);
    assert_same("after drop", &got[100..100 + data.len()], &data);
}

#[test]
fn a_second_writer_is_refused_and_raw_files_are_not_vhds() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.vhd");
    create(&p, &CreateOptions::new(DiskKind::Dynamic, MIB)).unwrap();
    let w = VhdWriter::open(&p, &OpenOptions::new()).unwrap();
    let e = VhdWriter::open(&p, &OpenOptions::new()).unwrap_err();
    assert!(e.to_string().contains("lock"), "{e}");
    drop(w);
    VhdWriter::open(&p, &OpenOptions::new()).unwrap();
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, [0u8; 4096]).unwrap();
    assert!(VhdWriter::open(&raw, &OpenOptions::new()).is_err());
}

// ------------------------------------------------------------ crash safety

use vhdkit::writer::{FileOp, OpLog};

/// Epochs of writes, each followed by a flush: no two writes of one epoch
/// touch the same sector, so that after any prefix of the file operations
/// every sector holds one of the disk's states at a flush.
fn epochs(size: u64) -> Vec<Vec<(u64, usize)>> {
    (0..4u64)
        .map(|e| {
            (0..4u64)
                .map(|k| {
                    let off = (k * size / 4 + e * 70_001 + 13) % (size - 200_000);
                    let len = 1 + ((e * 7 + k * 13) * 9_973 % 150_000) as usize;
                    (off, len)
                })
                .collect()
        })
        .collect()
}

/// Writes `epochs` into `target` through a recording writer; returns the
/// file operations, the op count at which each flush returned, and the
/// disk's content at each flush (index 0: before any write).
fn record(target: &Path, start: Vec<u8>) -> (Vec<FileOp>, Vec<usize>, Vec<Vec<u8>>) {
    let log: OpLog = Default::default();
    let w = VhdWriter::open_recording(target, &OpenOptions::new(), log.clone()).unwrap();
    let size = w.virtual_size();
    let mut model = start;
    let mut states = vec![model.clone()];
    let mut flushed = vec![0usize];
    for (e, writes) in epochs(size).into_iter().enumerate() {
        for (k, (off, len)) in writes.into_iter().enumerate() {
            put(&w, &mut model, &pattern((e * 10 + k) as u64, len), off);
        }
        w.flush().unwrap();
        flushed.push(log.lock().unwrap().len());
        states.push(model.clone());
    }
    drop(w);
    let ops = log.lock().unwrap().clone();
    (ops, flushed, states)
}

/// Replays every prefix of `ops` onto `initial` (the file's bytes before
/// the writer opened it), opens the result with `Image::open` beside the
/// original (so that a child finds its parent) and checks: it opens; each
/// sector holds its content at the last flush that completed within the
/// prefix, or at a later one.
fn replay_every_prefix(
    dir: &Path,
    initial: &[u8],
    ops: &[FileOp],
    flushed: &[usize],
    states: &[Vec<u8>],
) {
    let replay = dir.join("replay.vhd");
    for k in 0..=ops.len() {
        let mut file = initial.to_vec();
        for op in &ops[..k] {
            if let FileOp::Write(off, data) = op {
                let end = *off as usize + data.len();
                if file.len() < end {
                    file.resize(end, 0);
                }
                file[*off as usize..end].copy_from_slice(data);
            }
        }
        std::fs::write(&replay, &file).unwrap();
        let img = Image::open(&replay)
            .unwrap_or_else(|e| panic!("after {k} of {} operations: {e}", ops.len()));
        let mut got = vec![0u8; img.virtual_size() as usize];
        img.read_exact_at(&mut got, 0).unwrap();
        let last = flushed.iter().rposition(|&f| f <= k).unwrap();
        for (s, sector) in got.chunks(SECTOR as usize).enumerate() {
            let at = s * SECTOR as usize;
            let ok = states[last..]
                .iter()
                .any(|st| &st[at..at + sector.len()] == sector);
            assert!(
                ok,
                "after {k} of {} operations (flush {last} done): sector {s} holds neither its \
                 flushed content nor a later one",
                ops.len()
            );
        }
        if k == ops.len() {
            assert_same("all operations", &got, states.last().unwrap());
        }
    }
    std::fs::remove_file(replay).unwrap();
}

#[test]
fn a_crash_at_any_point_of_dynamic_writes_loses_nothing_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vhd");
    let size = 3 * MIB + 1024;
    create(
        &p,
        &CreateOptions::new(DiskKind::Dynamic, size).block_size(512 << 10),
    )
    .unwrap();
    let initial = std::fs::read(&p).unwrap();
    let (ops, flushed, states) = record(&p, vec![0u8; size as usize]);
    assert!(ops.len() > 20, "{} operations", ops.len());
    replay_every_prefix(dir.path(), &initial, &ops, &flushed, &states);
}

#[test]
fn a_crash_at_any_point_of_differencing_writes_loses_nothing_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let size = 3 * MIB + 1024;
    create(
        &base,
        &CreateOptions::new(DiskKind::Dynamic, size).block_size(512 << 10),
    )
    .unwrap();
    let mut parent = vec![0u8; size as usize];
    {
        let w = VhdWriter::open(&base, &OpenOptions::new()).unwrap();
        put(&w, &mut parent, &pattern(77, 2 * MIB as usize), 300_000);
        w.close().unwrap();
    }
    let child = dir.path().join("child.vhd");
    create_child(&child, &base, &ChildOptions::default()).unwrap();
    let initial = std::fs::read(&child).unwrap();
    let (ops, flushed, states) = record(&child, parent);
    assert!(ops.len() > 20, "{} operations", ops.len());
    replay_every_prefix(dir.path(), &initial, &ops, &flushed, &states);
}

// ------------------------------------------------------------ properties

use proptest::prelude::*;

/// 16 cases each, or `PROPTEST_CASES`.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const PROP_SIZE: u64 = 3 * MIB + 1536;

fn writes_strategy() -> impl Strategy<Value = Vec<(u64, usize, u8)>> {
    prop::collection::vec(
        (0..PROP_SIZE, 0usize..300_000, any::<u8>()).prop_map(|(off, len, b)| {
            let len = len.min((PROP_SIZE - off) as usize);
            (off, len, b)
        }),
        1..24,
    )
}

/// Applies `writes` (half, close and reopen, the other half) and checks
/// the writer and a fresh `Image::open` against the model.
fn check_writes(path: &Path, model: &mut [u8], writes: &[(u64, usize, u8)]) {
    let (a, b) = writes.split_at(writes.len() / 2);
    for half in [a, b] {
        let w = VhdWriter::open(path, &OpenOptions::new()).unwrap();
        for &(off, len, byte) in half {
            // Zeros now and then: they must overwrite, and allocate nothing
            // where nothing is.
            let data = if byte % 5 == 0 {
                vec![0u8; len]
            } else {
                pattern(u64::from(byte), len)
            };
            put(&w, model, &data, off);
        }
        assert_same("through the writer", &writer_content(&w), model);
        w.close().unwrap();
        assert_same("after reopening", &content(path), model);
    }
}

proptest! {
    #![proptest_config(config())]

    /// Random writes into a dynamic disk read back as the same writes into
    /// a byte vector, through the writer and after close and reopen.
    #[test]
    fn random_writes_into_a_dynamic_disk(writes in writes_strategy(), bs_pick in 0usize..3) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vhd");
        let bs = [512u32 << 10, 1 << 20, 2 << 20][bs_pick];
        create(&p, &CreateOptions::new(DiskKind::Dynamic, PROP_SIZE).block_size(bs)).unwrap();
        let mut model = vec![0u8; PROP_SIZE as usize];
        check_writes(&p, &mut model, &writes);
    }

    /// The same into a differencing disk over a parent with data: the
    /// parent is unchanged, and after a merge holds the child's content.
    #[test]
    fn random_writes_into_a_differencing_disk(writes in writes_strategy(), parent_writes in writes_strategy()) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhd");
        create(&base, &CreateOptions::new(DiskKind::Dynamic, PROP_SIZE).block_size(512 << 10)).unwrap();
        let mut model = vec![0u8; PROP_SIZE as usize];
        check_writes(&base, &mut model, &parent_writes);
        let parent_model = model.clone();
        let child = dir.path().join("child.vhd");
        create_child(&child, &base, &ChildOptions::default()).unwrap();
        check_writes(&child, &mut model, &writes);
        assert_same("parent", &content(&base), &parent_model);
        // Merged, the parent holds what the child showed.
        merge(&child, &MergeOptions::default()).unwrap();
        assert_same("parent after the merge", &content(&base), &model);
    }
}

// ------------------------------------------------------------ merge

use vhdkit::merge::{merge, merge_recording, MergeOptions};

/// A base with data and a child with other data, in `dir`; returns their
/// paths and the child's content.
fn base_and_child(
    dir: &Path,
    size: u64,
    bs: u32,
) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let base = dir.join("base.vhd");
    create(
        &base,
        &CreateOptions::new(DiskKind::Dynamic, size).block_size(bs),
    )
    .unwrap();
    let mut model = vec![0u8; size as usize];
    {
        let w = VhdWriter::open(&base, &OpenOptions::new()).unwrap();
        put(&w, &mut model, &pattern(1, (size / 2) as usize), size / 8);
        w.close().unwrap();
    }
    let child = dir.join("child.vhd");
    create_child(&child, &base, &ChildOptions::default()).unwrap();
    let w = VhdWriter::open(&child, &OpenOptions::new()).unwrap();
    for (i, (off, len)) in shapes(size, u64::from(bs)).into_iter().enumerate() {
        put(&w, &mut model, &pattern(i as u64 + 3, len), off);
    }
    put(&w, &mut model, &vec![0u8; 70_000], size / 4);
    w.close().unwrap();
    (base, child, model)
}

/// Bytes of the sectors `path` itself holds.
fn held_bytes(path: &Path) -> u64 {
    let img = Image::open(path).unwrap();
    img.map_shallow(0, img.virtual_size())
        .unwrap()
        .iter()
        .filter(|e| e.is_data())
        .map(|e| e.length)
        .sum()
}

#[test]
fn merge_folds_the_child_into_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let size = 5 * MIB;
    let (base, child, model) = base_and_child(dir.path(), size, 1 << 20);
    let child_bytes = std::fs::read(&child).unwrap();
    let held = held_bytes(&child);
    let r = merge(&child, &MergeOptions::default()).unwrap();
    assert_eq!(r.target, base);
    assert_eq!(r.merged, vec![child.clone()]);
    assert_eq!(r.bytes_copied, held, "only the child's sectors");
    assert!(r.bytes_copied < size / 2);
    assert_same("the parent after the merge", &content(&base), &model);
    qemu_compare(&base, &model);
    assert_same("the child, still", &content(&child), &model);
    assert_eq!(
        std::fs::read(&child).unwrap(),
        child_bytes,
        "child untouched"
    );
}

#[test]
fn merge_into_an_ancestor_folds_every_layer_between() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let (base, mid, mut model) = base_and_child(dir.path(), size, 512 << 10);
    let top = dir.path().join("top.vhd");
    create_child(&top, &mid, &ChildOptions::default()).unwrap();
    {
        let w = VhdWriter::open(&top, &OpenOptions::new()).unwrap();
        put(&w, &mut model, &pattern(99, 300_000), MIB + 5);
        w.close().unwrap();
    }
    let mid_bytes = std::fs::read(&mid).unwrap();
    let e = merge(
        &top,
        &MergeOptions {
            into: Some(top.clone()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("is not an ancestor"), "{e}");
    let r = merge(
        &top,
        &MergeOptions {
            into: Some(base.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.merged, vec![top.clone(), mid.clone()]);
    assert_same("base", &content(&base), &model);
    qemu_compare(&base, &model);
    assert_same("top", &content(&top), &model);
    assert_eq!(std::fs::read(&mid).unwrap(), mid_bytes);
}

#[test]
fn merge_refuses_a_read_only_parent_a_shared_parent_and_a_changed_parent() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * MIB;
    let (base, child, model) = base_and_child(dir.path(), size, 512 << 10);
    let base_bytes = std::fs::read(&base).unwrap();

    // Read-only.
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o444)).unwrap();
    let e = merge(&child, &MergeOptions::default()).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    assert!(
        matches!(&e, vhdkit::Error::OutputRefused { path, .. } if path == &base),
        "{e:?}"
    );
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o644)).unwrap();

    // Shared: a sibling names the same parent.
    let sibling = dir.path().join("sibling.vhd");
    create_child(&sibling, &base, &ChildOptions::default()).unwrap();
    let e = merge(&child, &MergeOptions::default()).unwrap_err();
    assert!(e.to_string().contains("sibling.vhd"), "{e}");
    assert!(
        matches!(
            e,
            vhdkit::Error::InvalidOption {
                option: "force",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_bytes,
        "refused: nothing written"
    );

    // The parent's time stamp changed since the child was made.
    let img = Image::open(&child).unwrap();
    let mut h = img.header().unwrap().clone();
    h.parent_timestamp.0 += 1;
    let other = dir.path().join("stale.vhd");
    std::fs::copy(&child, &other).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(&other)
            .unwrap(),
        &h.to_bytes(),
        img.header_offset(),
    )
    .unwrap();
    let e = merge(
        &other,
        &MergeOptions {
            force: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("time stamp"), "{e}");
    assert!(
        matches!(
            &e,
            vhdkit::Error::ParentMismatch { path, field: "time stamp", .. } if path == &other
        ),
        "{e:?}"
    );
    assert_eq!(e.kind(), vhdkit::ErrorKind::ParentMismatch);
    std::fs::remove_file(&other).unwrap();

    // A disk that is not differencing is not merged.
    let e = merge(&base, &MergeOptions::default()).unwrap_err();
    assert!(e.to_string().contains("only a differencing disk"), "{e}");
    assert!(
        matches!(
            e,
            vhdkit::Error::WrongImageKind {
                operation: "merge",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes);

    // With force, the sibling is reported.
    let r = merge(
        &child,
        &MergeOptions {
            force: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.other_children, vec![sibling]);
    assert_same("base", &content(&base), &model);
}

#[test]
fn a_merge_cut_at_any_point_leaves_the_parent_valid_and_the_chain_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * MIB;
    let (base, child, model) = base_and_child(dir.path(), size, 512 << 10);
    let initial = std::fs::read(&base).unwrap();
    let log: OpLog = Default::default();
    merge_recording(&child, &MergeOptions::default(), log.clone()).unwrap();
    let ops = log.lock().unwrap().clone();
    assert!(ops.len() > 10, "{} operations", ops.len());
    for k in 0..=ops.len() {
        let mut file = initial.clone();
        for op in &ops[..k] {
            if let FileOp::Write(off, data) = op {
                let end = *off as usize + data.len();
                if file.len() < end {
                    file.resize(end, 0);
                }
                file[*off as usize..end].copy_from_slice(data);
            }
        }
        std::fs::write(&base, &file).unwrap();
        Image::open(&base).unwrap_or_else(|e| panic!("after {k} of {} operations: {e}", ops.len()));
        assert_same(
            &format!("the chain after {k} operations"),
            &content(&child),
            &model,
        );
    }
    assert_same("the parent after all", &content(&base), &model);
}

// ------------------------------------------------------------ the CLI

/// Runs the vhdkit binary; returns exit status, stdout, stderr.
#[cfg(feature = "cli")]
fn cli(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_vhdkit"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    (
        o.status.code().unwrap(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        err,
    )
}

#[cfg(feature = "cli")]
#[test]
fn cli_create_and_merge() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let (code, out, err) = cli(&[
        os("create"),
        p("d.vhd").as_os_str(),
        os("--size"),
        os("6M"),
        os("--block-size"),
        os("1M"),
        os("--json"),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schema"], 1);
    assert_eq!(v["type"], "dynamic");
    assert_eq!(v["virtual_size"], 6 * MIB);
    assert_eq!(v["block_size"], MIB);
    let img = Image::open(p("d.vhd")).unwrap();
    assert_eq!(v["unique_id"], img.footer().unwrap().unique_id.to_string());

    let (code, _, err) = cli(&[os("create"), p("d.vhd").as_os_str(), os("--size"), os("1M")]);
    assert_eq!(code, 2);
    assert!(err.contains("--force"), "{err}");
    let (code, _, err) = cli(&[
        os("create"),
        p("f.vhd").as_os_str(),
        os("--size"),
        os("1000"),
        os("--type"),
        os("fixed"),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("multiple of 512"), "{err}");
    let (code, out, err) = cli(&[
        os("create"),
        p("a.vhd").as_os_str(),
        os("--size"),
        os("1000K"),
        os("--type"),
        os("fixed"),
        os("--azure"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("fixed VHD"), "{out}");
    assert_eq!(Image::open(p("a.vhd")).unwrap().virtual_size(), MIB);

    let (code, out, err) = cli(&[
        os("create"),
        p("c.vhd").as_os_str(),
        os("--parent"),
        p("d.vhd").as_os_str(),
        os("--json"),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["type"], "differencing");
    assert_eq!(
        v["parent_unique_id"],
        img.footer().unwrap().unique_id.to_string()
    );
    let mut model = vec![0u8; 6 * MIB as usize];
    {
        let w = VhdWriter::open(p("c.vhd"), &OpenOptions::new()).unwrap();
        put(&w, &mut model, &pattern(5, 100_000), 12_345);
        w.close().unwrap();
    }
    // A second child shares the parent: refused without --force.
    cli(&[
        os("create"),
        p("c2.vhd").as_os_str(),
        os("--parent"),
        p("d.vhd").as_os_str(),
    ]);
    let (code, _, err) = cli(&[os("merge"), p("c.vhd").as_os_str()]);
    assert_eq!(code, 2);
    assert!(err.contains("c2.vhd") && err.contains("--force"), "{err}");
    let (code, out, err) = cli(&[
        os("merge"),
        p("c.vhd").as_os_str(),
        os("--force"),
        os("--json"),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["target"], p("d.vhd").to_str().unwrap());
    assert_eq!(v["merged"][0]["path"], p("c.vhd").to_str().unwrap());
    assert_eq!(
        v["other_children"][0]["path"],
        p("c2.vhd").to_str().unwrap()
    );
    assert!(v["bytes_copied"].as_u64().unwrap() >= 100_000);
    assert_same("merged", &content(&p("d.vhd")), &model);
}

#[test]
fn a_child_larger_than_its_parent_reads_zeros_past_the_parent() {
    // Both 2 MiB blocks cover the child too.
    const PSIZE: u64 = 2 * MIB + 512 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    create(&base, &CreateOptions::new(DiskKind::Dynamic, PSIZE)).unwrap();
    let mut model = vec![0u8; 3 * MIB as usize];
    {
        let w = VhdWriter::open(&base, &OpenOptions::new()).unwrap();
        put(&w, &mut model, &pattern(3, PSIZE as usize), 0);
        w.close().unwrap();
    }
    let child = dir.path().join("child.vhd");
    create_child(&child, &base, &ChildOptions::default()).unwrap();
    // Grow the child's footer (both copies) to 3 MiB: a parent smaller
    // than its child, as resizing a child makes.
    let img = Image::open(&child).unwrap();
    let f = img.footer().unwrap().resized(3 * MIB).to_bytes();
    let len = img.file_len();
    drop(img);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&child)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &f, 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &f, len - 512).unwrap();
    drop(file);
    let w = VhdWriter::open(&child, &OpenOptions::new()).unwrap();
    assert_eq!(w.virtual_size(), 3 * MIB);
    // Partial sectors past the parent's end are completed with zeros.
    put(&w, &mut model, &[7u8; 100], PSIZE - 50);
    put(&w, &mut model, &[0u8; 10], PSIZE + 600);
    assert_same("through the writer", &writer_content(&w), &model);
    w.close().unwrap();
    assert_same("reopened", &content(&child), &model);
}

#[test]
fn a_writer_refuses_blocks_that_overlap_metadata_or_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.vhd");
    create(
        &p,
        &CreateOptions::new(DiskKind::Dynamic, 4 * MIB).block_size(512 << 10),
    )
    .unwrap();
    {
        let w = VhdWriter::open(&p, &OpenOptions::new()).unwrap();
        w.write_all_at(&[1u8; 512], 0).unwrap();
        w.write_all_at(&[2u8; 512], 512 << 10).unwrap();
        w.close().unwrap();
    }
    let img = Image::open(&p).unwrap();
    let table = img.header().unwrap().table_offset;
    let first = img.bat().unwrap().entries[0];
    drop(img);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    // Entry 1 names entry 0's block: two blocks in the same bytes.
    std::os::unix::fs::FileExt::write_all_at(&f, &first.to_be_bytes(), table + 4).unwrap();
    drop(f);
    let before = std::fs::read(&p).unwrap();
    match VhdWriter::open(&p, &OpenOptions::new()) {
        Ok(_) => panic!("a writer opened an image whose blocks overlap"),
        Err(e) => assert!(e.to_string().contains("BAT entry"), "{e}"),
    }
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn writes_into_a_real_dynamic_disk_with_partial_bitmaps() {
    // hst-imager__1gb.vhd (corpus): made by another tool ('dutl'), two
    // blocks allocated with partial sector bitmaps, whose clear sectors
    // read as zeros whatever the file holds there.
    let gz = crate::common::corpus().join("hst-imager__1gb.vhd.gz");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap()),
        &mut bytes,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("hst.vhd");
    std::fs::write(&p, &bytes).unwrap();
    let img = Image::open(&p).unwrap();
    let bs = img.block_size();
    let allocated: Vec<u64> = img
        .bat()
        .unwrap()
        .entries
        .iter()
        .enumerate()
        .filter(|(_, &e)| e != u32::MAX)
        .map(|(i, _)| i as u64)
        .collect();
    assert_eq!(allocated.len(), 2);
    // The model: the allocated blocks and the block after each.
    let ranges: Vec<(u64, u64)> = allocated.iter().map(|&b| (b * bs, 2 * bs)).collect();
    let mut models: Vec<Vec<u8>> = ranges
        .iter()
        .map(|&(o, l)| {
            let mut v = vec![0u8; l as usize];
            img.read_exact_at(&mut v, o).unwrap();
            v
        })
        .collect();
    drop(img);
    let w = VhdWriter::open(&p, &OpenOptions::new()).unwrap();
    for (k, &(o, _)) in ranges.iter().enumerate() {
        // Unaligned writes over set and clear sectors alike, and one into
        // the next (unallocated) block.
        for (i, (at, len)) in [
            (100u64, 3000usize),
            (70_001, 1),
            (bs - 300, 900),
            (bs / 2, 4096),
        ]
        .into_iter()
        .enumerate()
        {
            let data = pattern((k * 10 + i) as u64, len);
            w.write_all_at(&data, o + at).unwrap();
            models[k][at as usize..at as usize + len].copy_from_slice(&data);
        }
    }
    let check = |what: &str, read: &dyn Fn(&mut [u8], u64)| {
        for (k, &(o, l)) in ranges.iter().enumerate() {
            let mut v = vec![0u8; l as usize];
            read(&mut v, o);
            assert_same(what, &v, &models[k]);
        }
    };
    check("through the writer", &|b, o| w.read_exact_at(b, o).unwrap());
    w.close().unwrap();
    let img = Image::open(&p).unwrap();
    check("reopened", &|b, o| img.read_exact_at(b, o).unwrap());
    let report = vhdkit::check(&p, &vhdkit::CheckOptions::default()).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}
