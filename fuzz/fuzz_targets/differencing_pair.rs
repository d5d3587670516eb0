//! A child and a candidate parent, both from the input (split at a point the
//! input's first two bytes choose): opened, mapped and read through the
//! chain, then checked. Nothing may panic, hang or over-allocate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhdkit::{check_storage, CheckOptions, Image, MemoryStorage, OpenOptions};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = usize::from(u16::from_le_bytes([data[0], data[1]])) * 512;
    let rest = &data[2..];
    let (child, parent) = rest.split_at(split.min(rest.len()));
    let opts = OpenOptions::new().parent_storage("parent.vhd", MemoryStorage::new(parent.to_vec()));
    if let Ok(img) = Image::from_storage(MemoryStorage::new(child.to_vec()), &opts) {
        let size = img.virtual_size();
        img.map_all().expect("map after a good open");
        let mut buf = vec![0u8; size.min(1 << 20) as usize];
        img.read_exact_at(&mut buf, 0).expect("read after a good open");
    }
    let _ = check_storage(
        MemoryStorage::new(child.to_vec()),
        &CheckOptions {
            open: opts,
            azure: false,
        },
    );
});
