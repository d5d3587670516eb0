//! The zero test, next to the floor it works against: reading memory.
//!
//! Every buffer is 64 MiB of real, resident memory — written once with a
//! non-zero byte, then zeroed — so that the scan reads distinct pages rather
//! than the kernel's one shared zero page (which a fresh `calloc` would give
//! and which would flatter the result). Criterion prints GB/s.
//!
//! ```text
//! cargo bench --bench scan --features bench-internals
//! ```

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Duration;
use vhdkit::internals::{is_zero, nonzero_runs, ZERO_UNIT};

/// Bytes per buffer.
const LEN: usize = 64 << 20;
/// Piece of work per rayon task in the parallel variants (the size of the
/// conversion's chunks).
const PIECE: usize = 2 << 20;

/// `LEN` zero bytes in pages of their own.
fn zeros() -> Vec<u8> {
    let mut v = vec![0xa5u8; LEN];
    black_box(&mut v);
    v.fill(0);
    black_box(&mut v);
    v
}

/// Half random, half zero, alternating every 64 KiB.
fn half_random() -> Vec<u8> {
    let mut v = zeros();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, piece) in v.chunks_mut(64 << 10).enumerate() {
        if i % 2 == 0 {
            for w in piece.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_ne_bytes());
            }
        }
    }
    v
}

/// The floor: every byte read once, summed in u64 lanes (vectorised).
fn sum_u64(buf: &[u8]) -> u64 {
    buf.chunks_exact(8)
        .map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")))
        .fold(0u64, u64::wrapping_add)
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

fn zero_test(c: &mut Criterion) {
    let z = zeros();
    let mut g = c.benchmark_group("zero test, 64 MiB of zeros");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.bench_function("baseline: sum u64 (one thread)", |b| {
        b.iter(|| sum_u64(black_box(&z)))
    });
    g.bench_function("is_zero (one thread)", |b| {
        b.iter(|| is_zero(black_box(&z)))
    });
    g.bench_function("is_zero per 4 KiB unit (one thread)", |b| {
        b.iter(|| black_box(&z).chunks(ZERO_UNIT as usize).all(is_zero))
    });
    g.bench_function("baseline: sum u64 (all cores)", |b| {
        b.iter(|| {
            black_box(&z)
                .par_chunks(PIECE)
                .map(sum_u64)
                .reduce(|| 0, u64::wrapping_add)
        })
    });
    g.bench_function("is_zero (all cores)", |b| {
        b.iter(|| black_box(&z).par_chunks(PIECE).all(is_zero))
    });
    g.finish();
}

fn runs(c: &mut Criterion) {
    let z = zeros();
    let h = half_random();
    let mut g = c.benchmark_group("nonzero_runs, 64 MiB, 4 KiB units");
    g.throughput(Throughput::Bytes(LEN as u64));
    for (name, buf) in [("all zero", &z), ("half random", &h)] {
        g.bench_function(format!("{name} (one thread)"), |b| {
            let mut out = Vec::with_capacity(LEN / ZERO_UNIT as usize);
            b.iter(|| {
                out.clear();
                nonzero_runs(black_box(buf), 0, ZERO_UNIT, &mut out);
                out.len()
            })
        });
        g.bench_function(format!("{name} (all cores)"), |b| {
            b.iter(|| {
                black_box(buf)
                    .par_chunks(PIECE)
                    .enumerate()
                    .map(|(i, piece)| {
                        let mut out = Vec::new();
                        nonzero_runs(piece, (i * PIECE) as u64, ZERO_UNIT, &mut out);
                        out.len()
                    })
                    .sum::<usize>()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = zero_test, runs
}
criterion_main!(benches);
