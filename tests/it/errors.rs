//! Errors a caller can match: each class of failure comes back as its own
//! variant, with typed fields (structure, field and offset of damage; the
//! numbers of a range that leaves the disk; the operation and image kind
//! refused; the file and offset of an I/O error), its `ErrorKind`, and the
//! `std::io::ErrorKind` it becomes.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use vhdkit::create::{create, CreateOptions, DiskKind};
use vhdkit::error::Structure;
use vhdkit::writer::VhdWriter;
use vhdkit::ReadAt;
use vhdkit::{
    ConvertOptions, Error, ErrorKind, Format, Image, MemorySink, OpenOptions, Sink, Storage, Target,
};

const MIB: u64 = 1 << 20;

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/example-dynamic.vhd")
}

fn io_kind(e: Error) -> io::ErrorKind {
    io::Error::from(e).kind()
}

/// The example dynamic disk copied into `dir`, with `edit` applied.
fn edited_example(dir: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(example()).unwrap();
    edit(&mut bytes);
    let p = dir.join("edited.vhd");
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn a_damaged_field_is_corrupt_with_its_structure_field_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let img = Image::open(example()).unwrap();
    let hdr = img.header_offset();
    // The dynamic header's block size (at +32): not a power of two. The
    // header's checksum is left wrong too, and ignored on request.
    let p = edited_example(dir.path(), |b| {
        b[hdr as usize + 32..hdr as usize + 36].copy_from_slice(&3000u32.to_be_bytes())
    });
    let e = Image::open_with(&p, &OpenOptions::new().ignore_checksums(true)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(e.path(), Some(p.as_path()));
    match &e {
        Error::Corrupt(c) => {
            assert_eq!(c.structure, Structure::DynamicHeader);
            assert_eq!(c.field, "block size");
            assert_eq!(c.offset, hdr + 32);
            assert_eq!(c.found, "3000");
            assert!(c.expected.contains("power of two"), "{}", c.expected);
            assert_eq!(c.rule, vhdkit::Rule::Value);
            assert_eq!(c.path.as_deref(), Some(p.as_path()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(io_kind(e), io::ErrorKind::InvalidData);

    // The same file with checksums checked: the header's checksum.
    let e = Image::open(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Checksum, "{e}");
    match &e {
        Error::Checksum {
            structure, offset, ..
        } => {
            assert_eq!(*structure, Structure::DynamicHeader);
            assert_eq!(*offset, hdr + 36, "the header's checksum field");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(io_kind(e), io::ErrorKind::InvalidData);
}

#[test]
fn a_range_past_the_end_is_out_of_range_with_its_numbers() {
    let img = Image::open(example()).unwrap();
    let size = img.virtual_size();
    let mut buf = [0u8; 10];
    let e = img.read_exact_at(&mut buf, size - 4).unwrap_err();
    match &e {
        Error::OutOfRange {
            path,
            offset,
            len,
            size: s,
        } => {
            assert_eq!(path.as_deref(), Some(example().as_path()));
            assert_eq!((*offset, *len, *s), (size - 4, 10, size));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
    assert!(e.to_string().contains(&size.to_string()), "{e}");
    assert_eq!(io_kind(e), io::ErrorKind::InvalidInput);
    // An offset + length that overflows is out of range too, not a panic.
    let e = img.map(u64::MAX, 2).unwrap_err();
    assert!(
        matches!(
            e,
            Error::OutOfRange {
                offset: u64::MAX,
                len: 2,
                ..
            }
        ),
        "{e:?}"
    );
    // A sink refuses bytes past its end the same way.
    let sink = MemorySink::new(4096).unwrap();
    let e = sink.write(4000, &[1u8; 200]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::OutOfRange {
                path: None,
                offset: 4000,
                len: 200,
                size: 4096
            }
        ),
        "{e:?}"
    );
}

#[test]
fn an_operation_on_the_wrong_kind_of_image_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![7u8; 64 << 10]).unwrap();
    // Writing into a raw file through the VHD writer.
    let e = VhdWriter::open(&raw, &OpenOptions::new()).unwrap_err();
    match &e {
        Error::WrongImageKind {
            path,
            operation,
            kind,
            ..
        } => {
            assert_eq!(path, &raw);
            assert_eq!(*operation, "write");
            assert_eq!(*kind, Format::Raw);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.kind(), ErrorKind::WrongImageKind);
    assert_eq!(io_kind(e), io::ErrorKind::InvalidInput);
    // A dynamic image converted in place.
    let e = vhdkit::ops::plan_in_place(example(), Format::Fixed, false, &OpenOptions::new())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::WrongImageKind {
                operation: "in-place conversion",
                kind: Format::Dynamic,
                ..
            }
        ),
        "{e:?}"
    );
    // A format forced by the caller that the file is not.
    let e = Image::open_with(example(), &OpenOptions::new().format(Format::Fixed)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::FormatMismatch {
                asked: Format::Fixed,
                found: Some(Format::Dynamic),
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.kind(), ErrorKind::WrongImageKind);
    let e = Image::open_with(example(), &OpenOptions::new().format(Format::Vhdx)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::FormatMismatch {
                asked: Format::Vhdx,
                found: None,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("not vhdx"), "{e}");
}

#[test]
fn a_failed_read_names_the_file_and_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed disk, cut short after it was opened: reads past the cut fail.
    let p = dir.path().join("fixed.vhd");
    create(&p, &CreateOptions::new(DiskKind::Fixed, MIB)).unwrap();
    let img = Image::open(&p).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut buf = [0u8; 512];
    let e = img.read_exact_at(&mut buf, 100 * 512).unwrap_err();
    match &e {
        Error::Io {
            path,
            op,
            offset,
            source,
        } => {
            assert_eq!(path.as_deref(), Some(p.as_path()));
            assert_eq!(*op, "read");
            assert_eq!(*offset, Some(100 * 512));
            assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("at offset 51200"), "{e}");
    assert_eq!(io_kind(e), io::ErrorKind::UnexpectedEof);

    // A dynamic disk cut at its first data block: the read names the
    // block's offset in the file, not the virtual one.
    let q = dir.path().join("dynamic.vhd");
    std::fs::copy(example(), &q).unwrap();
    let img = Image::open(&q).unwrap();
    let (virt, file_offset) = img
        .map_all()
        .unwrap()
        .iter()
        .find_map(|e| match e.kind {
            vhdkit::ExtentKind::Data { file_offset, .. } => Some((e.offset, file_offset)),
            _ => None,
        })
        .expect("the example has data");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&q)
        .unwrap()
        .set_len(file_offset)
        .unwrap();
    let e = img.read_exact_at(&mut buf[..1], virt).unwrap_err();
    assert!(
        matches!(&e, Error::Io { path: Some(path), offset: Some(o), .. } if path == &q && *o == file_offset),
        "{e:?}"
    );
}

/// A storage over bytes whose reads touching `bad` fail.
#[derive(Debug)]
struct Failing {
    bytes: Vec<u8>,
    bad: std::ops::Range<u64>,
}

impl ReadAt for Failing {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && self.bad.start < end {
            return Err(io::Error::other("medium error"));
        }
        let s = offset as usize;
        buf.copy_from_slice(&self.bytes[s..s + buf.len()]);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }
}

impl Storage for Failing {}

#[test]
fn a_failing_storage_gives_the_offset_of_the_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fixed.vhd");
    create(&p, &CreateOptions::new(DiskKind::Fixed, MIB)).unwrap();
    let bad = 300 * 1024..300 * 1024 + 512;
    let img = Image::from_storage(
        Failing {
            bytes: std::fs::read(&p).unwrap(),
            bad: bad.clone(),
        },
        &OpenOptions::new(),
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let e = img.read_exact_at(&mut buf, bad.start).unwrap_err();
    assert!(
        matches!(&e, Error::Io { path: Some(_), op: "read", offset: Some(o), .. } if *o == bad.start),
        "{e:?}"
    );
    assert_eq!(e.path(), Some(img.path()));
    // The walk under checksum reads in chunks: the failed chunk starts at or
    // before the bad sector.
    let e = vhdkit::ops::checksum(&img).unwrap_err();
    match &e {
        Error::Io {
            offset: Some(o),
            source,
            ..
        } => {
            assert!(*o <= bad.start, "{e}");
            assert_eq!(source.to_string(), "medium error");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(io_kind(e), io::ErrorKind::Other);
}

#[test]
fn each_class_becomes_its_io_error_kind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.vhd");
    // A caller's option.
    let e = vhdkit::convert(
        example(),
        &out,
        &ConvertOptions::new(Target::Dynamic).block_size(1000),
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidOption { option: "block size", value, .. } if value == "1000"),
        "{e:?}"
    );
    assert_eq!(e.kind(), ErrorKind::InvalidOption);
    assert_eq!(io_kind(e), io::ErrorKind::InvalidInput);
    // An output that is a folder.
    let e = vhdkit::convert(
        example(),
        dir.path(),
        &ConvertOptions::new(Target::Fixed).overwrite(true),
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::OutputRefused { path, .. } if path == dir.path()),
        "{e:?}"
    );
    assert_eq!(e.kind(), ErrorKind::OutputRefused);
    assert_eq!(io_kind(e), io::ErrorKind::InvalidInput);
    // An output that exists.
    std::fs::write(&out, b"keep").unwrap();
    let e = vhdkit::convert(example(), &out, &ConvertOptions::new(Target::Fixed)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutputExists);
    assert_eq!(io_kind(e), io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    // A missing parent.
    let td = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hand-chain-child.vhd.gz");
    let mut child = Vec::new();
    io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(td).unwrap()),
        &mut child,
    )
    .unwrap();
    let e = Image::from_bytes(child).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ParentMissing);
    assert_eq!(io_kind(e), io::ErrorKind::NotFound);
    // A missing file: the operating system's own kind, with the path.
    let missing = dir.path().join("missing.vhd");
    let e = Image::open(&missing).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert_eq!(e.path(), Some(missing.as_path()));
    assert_eq!(io_kind(e), io::ErrorKind::NotFound);
    // Not an image vhdkit reads.
    let mut qcow = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    qcow.resize(4096, 0);
    let e = Image::from_bytes(qcow).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAnImage);
    assert_eq!(io_kind(e), io::ErrorKind::InvalidData);
    // Cancelled.
    assert_eq!(io_kind(Error::Interrupted), io::ErrorKind::Interrupted);
    // Unsupported.
    let e = Error::Unsupported {
        path: PathBuf::from("x.vhd"),
        what: "something".into(),
    };
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_eq!(io_kind(e), io::ErrorKind::Unsupported);
    // A bare io::Error (a caller's callback) keeps its kind.
    let e = Error::from(io::Error::new(io::ErrorKind::TimedOut, "slow"));
    assert!(matches!(
        e,
        Error::Io {
            path: None,
            offset: None,
            ..
        }
    ));
    let e = e.with_path(Path::new("named.vhd"));
    assert_eq!(e.path(), Some(Path::new("named.vhd")));
    assert_eq!(io_kind(e), io::ErrorKind::TimedOut);
}

/// The command line's hints follow the variants, not the words.
#[test]
fn the_cli_hints_by_variant() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vhd");
    create(&p, &CreateOptions::new(DiskKind::Dynamic, 4 * MIB)).unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(env!("CARGO_BIN_EXE_vhdkit"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[
        "resize".as_ref(),
        p.as_os_str(),
        "--size".as_ref(),
        "2M".as_ref(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("shrinking was not asked for"), "{err}");
    assert!(err.contains("--shrink"), "{err}");
    // The library's own words name no flag.
    let e = vhdkit::ops::resize(&p, 2 * MIB, false, false, &OpenOptions::new()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                option: "shrink",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.to_string().contains("--"), "{e}");
    // A flag the command line refuses itself: exit 2, no library hint.
    let (code, err) = run(&[
        "convert".as_ref(),
        p.as_os_str(),
        dir.path().join("o.vhd").as_os_str(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--to"), "{err}");
}
