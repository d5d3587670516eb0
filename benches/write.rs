//! Writes into a new dynamic VHD (2 MiB blocks) through
//! [`vhdkit::writer::VhdWriter`]: sequential and random, in 4 KiB and
//! 1 MiB pieces, 32 MiB in all per iteration, then one `flush()` (which
//! syncs: the figures include making the writes durable). Every iteration
//! writes into a fresh disk made outside the timing, so blocks are
//! allocated as they would be in use. Random offsets are aligned to the
//! write size, drawn from a fixed sequence (the same in every run) over a
//! 256 MiB disk. Criterion prints bytes written per second.
//!
//! ```text
//! cargo bench --bench write
//! ```
//!
//! Under `cargo test --benches` each case runs once, writing 1 MiB.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::path::PathBuf;
use std::time::Duration;
use vhdkit::create::{create, CreateOptions, DiskKind};
use vhdkit::writer::VhdWriter;
use vhdkit::OpenOptions;

const MIB: u64 = 1 << 20;
const DISK: u64 = 256 * MIB;

/// Bytes written per iteration: 32 MiB when benchmarking, 1 MiB when
/// `cargo test` runs the bench once to see that it works.
fn total() -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        32 * MIB
    } else {
        MIB
    }
}

/// The offsets of one iteration: `total / piece` of them.
fn offsets(piece: u64, random: bool) -> Vec<u64> {
    let n = total() / piece;
    let slots = DISK / piece;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|i| {
            if random {
                // xorshift: a fixed sequence, the same in every run.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % slots) * piece
            } else {
                i * piece
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("write");
    g.throughput(Throughput::Bytes(total()));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    let mut n = 0u64;
    for (name, piece, random) in [
        ("seq_4k", 4096, false),
        ("rand_4k", 4096, true),
        ("seq_1m", MIB, false),
        ("rand_1m", MIB, true),
    ] {
        let offs = offsets(piece, random);
        let data = vec![0xabu8; piece as usize];
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    n += 1;
                    let p: PathBuf = dir.path().join(format!("w{n}.vhd"));
                    let opts = CreateOptions::new(DiskKind::Dynamic, DISK).sync(false);
                    create(&p, &opts).unwrap();
                    let w = VhdWriter::open(&p, &OpenOptions::new()).unwrap();
                    // The previous iteration's file is gone before this one runs.
                    let _ = std::fs::remove_file(dir.path().join(format!("w{}.vhd", n - 1)));
                    w
                },
                |w| {
                    for &o in &offs {
                        w.write_all_at(&data, o).unwrap();
                    }
                    w.close().unwrap();
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
