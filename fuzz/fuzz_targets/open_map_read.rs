//! Opens arbitrary bytes as an image (strict and lenient options), then maps
//! it, reads it (at most 4 MiB) and streams it through the `Read + Seek`
//! adapter. Nothing may panic, hang or over-allocate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{Read, Seek, SeekFrom};
use vhdkit::{Image, MemoryStorage, OpenOptions};

const READ_CAP: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    for opts in [
        OpenOptions::new(),
        OpenOptions::new()
            .ignore_checksums(true)
            .missing_parent_as_zero(true),
    ] {
        let Ok(img) = Image::from_storage(MemoryStorage::new(data.to_vec()), &opts) else {
            continue;
        };
        let size = img.virtual_size();
        let extents = img.map_all().expect("map after a good open");
        let mut pos = 0;
        for e in &extents {
            assert_eq!(e.offset, pos, "extents are contiguous");
            pos = e.end();
        }
        assert_eq!(pos, size, "extents cover the disk");
        let cap = size.min(READ_CAP);
        let mut buf = vec![0u8; 64 << 10];
        let mut off = 0;
        while off < cap {
            let n = (cap - off).min(buf.len() as u64) as usize;
            img.read_exact_at(&mut buf[..n], off)
                .expect("read after a good open");
            off += n as u64;
        }
        if size > 0 {
            let mut two = [0u8; 2];
            assert!(img.read_exact_at(&mut two, size - 1).is_err());
        }
        let mut r = img.into_reader();
        let back = size.min(4096);
        r.seek(SeekFrom::End(-(back as i64))).expect("seek");
        let mut tail = Vec::new();
        r.read_to_end(&mut tail).expect("read to the end");
        assert_eq!(tail.len() as u64, back);
    }
});
