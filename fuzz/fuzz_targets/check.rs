//! Runs `check` (the walk that goes on past problems), with and without
//! Azure's rules, over arbitrary bytes. Nothing may panic, hang or
//! over-allocate; every problem must print.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhdkit::{check_storage, CheckOptions, MemoryStorage, OpenOptions};

fuzz_target!(|data: &[u8]| {
    for azure in [false, true] {
        let opts = CheckOptions {
            open: OpenOptions::new(),
            azure,
        };
        if let Ok(report) = check_storage(MemoryStorage::new(data.to_vec()), &opts) {
            for p in &report.problems {
                let _ = format!("{p:?} {}", p.message);
            }
        }
    }
});
