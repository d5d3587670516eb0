//! The library's newer entry points: images over memory, the walk into any
//! sink, per-call progress and cancellation.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use vhdkit::{CancelToken, Control, Error, Event, Image, MemorySink, MemoryStorage, OpenOptions};

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/example-dynamic.vhd")
}

fn whole(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_exact_at(&mut v, 0).expect("read");
    v
}

#[test]
fn an_image_from_bytes_reads_as_the_file_does() {
    let bytes = std::fs::read(example()).unwrap();
    let file = Image::open(example()).unwrap();
    let mem = Image::from_bytes(bytes.clone()).unwrap();
    assert_eq!(mem.disk_type(), file.disk_type());
    assert_eq!(mem.virtual_size(), file.virtual_size());
    assert!(mem.file().is_none());
    assert_eq!(mem.map_all().unwrap(), file.map_all().unwrap());
    assert_eq!(whole(&mem), whole(&file));
    // The owning reader streams the same bytes.
    let mut r = Image::from_bytes(bytes).unwrap().into_reader();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut got).unwrap();
    assert_eq!(got, whole(&file));
    // check over memory finds the file clean too.
    let rep = vhdkit::check_storage(
        MemoryStorage::new(std::fs::read(example()).unwrap()),
        &vhdkit::CheckOptions::default(),
    )
    .unwrap();
    assert!(rep.is_clean(), "{:?}", rep.problems);
}

#[test]
fn a_differencing_child_in_memory_finds_its_parent_among_given_storages() {
    let td = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let gz = |n: &str| {
        let f = std::fs::File::open(td.join(n)).unwrap();
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(f), &mut v).unwrap();
        v
    };
    let (child, base) = (gz("hand-chain-child.vhd.gz"), gz("hand-chain-base.vhd.gz"));
    // Without the parent: not found (no folder is searched for a memory image).
    assert!(matches!(
        Image::from_bytes(child.clone()),
        Err(Error::ParentNotFound { .. })
    ));
    let opts = OpenOptions::new().parent_storage("base.vhd", MemoryStorage::new(base.clone()));
    let img = Image::from_storage(MemoryStorage::new(child.clone()), &opts).unwrap();
    assert_eq!(img.chain().len(), 2);
    // The same as the files on disk.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.vhd"), &child).unwrap();
    std::fs::write(dir.path().join("b.vhd"), &base).unwrap();
    let on_disk = Image::open_with(
        dir.path().join("c.vhd"),
        &OpenOptions::new().parent(dir.path().join("b.vhd")),
    )
    .unwrap();
    assert_eq!(whole(&img), whole(&on_disk));
}

#[test]
fn the_walk_copies_into_a_memory_sink_with_progress() {
    let img = Image::open(example()).unwrap();
    let sink = MemorySink::new(img.virtual_size()).unwrap();
    let advanced = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let progress = |e: Event| match e {
        Event::Advance(n) => {
            advanced.fetch_add(n, Ordering::Relaxed);
        }
        Event::Written(n) => {
            written.fetch_add(n, Ordering::Relaxed);
        }
        _ => {}
    };
    let ctl = Control::new().progress(&progress);
    let done = vhdkit::walk::copy(&img, &sink, true, &ctl).unwrap();
    assert_eq!(advanced.load(Ordering::Relaxed), img.virtual_size());
    assert_eq!(written.load(Ordering::Relaxed), done.written);
    assert!(done.written <= done.read);
    assert_eq!(sink.into_bytes(), whole(&img));
}

#[test]
fn a_cancelled_token_stops_every_long_operation() {
    let img = Image::open(example()).unwrap();
    let token = CancelToken::new();
    token.cancel();
    let ctl = Control::new().cancel(&token);
    let interrupted = |r: vhdkit::Result<()>| matches!(r, Err(Error::Interrupted));
    assert!(interrupted(
        vhdkit::ops::checksum_with(&img, &ctl).map(|_| ())
    ));
    assert!(interrupted(vhdkit::ops::map_each_with(
        &img,
        true,
        &ctl,
        |_| Ok(())
    )));
    assert!(interrupted(
        vhdkit::ops::compare_with(&img, &img, false, &ctl).map(|_| ())
    ));
    let sink = MemorySink::new(img.virtual_size()).unwrap();
    assert!(interrupted(
        vhdkit::walk::copy(&img, &sink, true, &ctl).map(|_| ())
    ));
    // A fresh token lets them run, and agrees with the call without one.
    let fresh = CancelToken::new();
    let c = vhdkit::ops::checksum_with(&img, &Control::new().cancel(&fresh)).unwrap();
    assert_eq!(c, vhdkit::ops::checksum(&img).unwrap());
    assert_eq!(c.size, img.virtual_size());
}

#[test]
fn errors_have_kinds_a_caller_can_match() {
    use vhdkit::ErrorKind;
    // Another format.
    let mut qcow = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    qcow.resize(4096, 0);
    let e = Image::from_bytes(qcow).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotAnImage, "{e}");
    // A damaged header field.
    let mut bytes = std::fs::read(example()).unwrap();
    // Block size in the dynamic header (at 512 + 32): not a power of two,
    // with the header's checksum left wrong too: checksums ignored.
    bytes[512 + 32..512 + 36].copy_from_slice(&3000u32.to_be_bytes());
    let e = Image::from_storage(
        MemoryStorage::new(bytes),
        &OpenOptions::new().ignore_checksums(true),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.path().is_some());
    // A missing parent, and a cancelled walk.
    let td = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hand-chain-child.vhd.gz");
    let mut child = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(td).unwrap()),
        &mut child,
    )
    .unwrap();
    assert_eq!(
        Image::from_bytes(child).unwrap_err().kind(),
        ErrorKind::ParentMissing
    );
    assert_eq!(Error::Interrupted.kind(), ErrorKind::Cancelled);
    // Into std::io::Error and back to words.
    let io: std::io::Error = Error::Interrupted.into();
    assert_eq!(io.kind(), std::io::ErrorKind::Interrupted);
}
