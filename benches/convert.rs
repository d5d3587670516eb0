//! Each conversion on a generated disk: 256 MiB, a quarter of its 2 MiB
//! blocks random and the rest zero, built once in a temporary folder as a
//! raw file with its zeros written out, a raw file with holes, a dynamic VHD
//! and a (sparse) fixed VHD. Outputs are removed before every iteration
//! (outside the timing) and not synced, so the numbers measure vhdkit
//! against a warm page cache, not the disk. Criterion prints the virtual
//! disk's bytes per second.
//!
//! ```text
//! cargo bench --bench convert
//! ```
//!
//! Under `cargo test --benches` each conversion runs once, on a 16 MiB disk.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vhdkit::{ConvertOptions, Target};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;

/// The disk's size: 256 MiB when benchmarking, 16 MiB when `cargo test`
/// runs the bench once to see that it works.
fn disk_size() -> u64 {
    if std::env::args().any(|a| a == "--bench") {
        256 * MIB
    } else {
        16 * MIB
    }
}

/// The inputs, in a folder that lives as long as the benchmark.
struct Inputs {
    dir: tempfile::TempDir,
    size: u64,
}

impl Inputs {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn build(size: u64) -> Inputs {
        let dir = tempfile::tempdir().expect("temporary folder");
        let written = File::create(dir.path().join("written.raw")).expect("create");
        let holes = File::create(dir.path().join("sparse.raw")).expect("create");
        holes.set_len(size).expect("set length");
        let blocks = size / BLOCK;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // A quarter of the blocks, chosen at random (the same every run).
        let mut chosen = vec![false; blocks as usize];
        let mut left = blocks / 4;
        while left > 0 {
            let b = (next() % blocks) as usize;
            if !chosen[b] {
                chosen[b] = true;
                left -= 1;
            }
        }
        let zeros = vec![0u8; BLOCK as usize];
        let mut data = vec![0u8; BLOCK as usize];
        for (b, &random) in chosen.iter().enumerate() {
            let at = b as u64 * BLOCK;
            if random {
                for w in data.chunks_exact_mut(8) {
                    w.copy_from_slice(&next().to_ne_bytes());
                }
                written.write_all_at(&data, at).expect("write");
                holes.write_all_at(&data, at).expect("write");
            } else {
                written.write_all_at(&zeros, at).expect("write");
            }
        }
        let inputs = Inputs { dir, size };
        let o = |t| ConvertOptions::new(t).sync(false);
        vhdkit::convert(
            inputs.path("sparse.raw"),
            inputs.path("in.vhd"),
            &o(Target::Dynamic),
        )
        .expect("make the dynamic input");
        vhdkit::convert(
            inputs.path("sparse.raw"),
            inputs.path("in-fixed.vhd"),
            &o(Target::Fixed),
        )
        .expect("make the fixed input");
        inputs
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

fn conversions(c: &mut Criterion) {
    let inputs = Inputs::build(disk_size());
    let jobs: [(&str, &str, Target); 6] = [
        (
            "raw (zeros written) -> dynamic",
            "written.raw",
            Target::Dynamic,
        ),
        ("raw (sparse) -> dynamic", "sparse.raw", Target::Dynamic),
        ("raw (zeros written) -> fixed", "written.raw", Target::Fixed),
        ("raw (zeros written) -> raw", "written.raw", Target::Raw),
        ("dynamic -> raw", "in.vhd", Target::Raw),
        ("fixed -> raw", "in-fixed.vhd", Target::Raw),
    ];
    let mut g = c.benchmark_group(format!("convert {} MiB, 1/4 data", inputs.size / MIB));
    g.throughput(Throughput::Bytes(inputs.size));
    for (name, input, target) in jobs {
        let input: PathBuf = inputs.path(input);
        let output = inputs.path("out");
        let opts = ConvertOptions::new(target).sync(false).overwrite(true);
        // The previous output is removed outside the timing: freeing its
        // pages is not part of the conversion.
        g.bench_function(name, |b| {
            b.iter_batched(
                || remove(&output),
                |()| run(&input, &output, &opts),
                BatchSize::PerIteration,
            );
        });
    }
    g.finish();
}

fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove {}: {e}", path.display()),
    }
}

fn run(input: &Path, output: &Path, opts: &ConvertOptions) -> u64 {
    let r = vhdkit::convert(input, output, opts).expect("convert");
    r.bytes_written
}

criterion_group! {
    name = benches;
    config = config();
    targets = conversions
}
criterion_main!(benches);
