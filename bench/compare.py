#!/usr/bin/env python3
"""Run vhdkit and qemu-img on the same inputs, interleaved, and print the ratio.

Inputs (built once in the work folder, default ./bench-work):
  sparse.raw  SIZE bytes; a quarter of its 2 MiB blocks random, the rest holes
  full.raw    the same content with the zeros written out
  dyn.vhd     sparse.raw as a dynamic VHD (qemu-img, force_size)
  fixed.vhd   sparse.raw as a fixed VHD (qemu-img, force_size; sparse)

Jobs: dynamic->raw, fixed->raw, sparse raw->dynamic, written-out raw->dynamic,
written-out raw->fixed. Every output is checked with `qemu-img compare`.

qemu-img does not sync its output; vhdkit does by default (its outputs are
renamed into place only once on disk). So two pairs are timed, each in its
own interleaved loop (see time_interleaved for why they are not mixed):
  unsynced: qemu-img            vs  vhdkit --no-sync
  synced:   qemu-img + fsync    vs  vhdkit (default)
Before each timed run the page cache is flushed of dirty pages (`sync`,
untimed) and the inputs are warm. Ratio = qemu-img's median time / vhdkit's.

With --baseline PATH a second vhdkit build (an earlier commit) runs in the
same interleaved loop, so "before" and "after" ratios come from one run.

With --stat min the ratios use each command's fastest run instead of the
median (on a shared machine the fastest run is the one least disturbed).

Usage: bench/compare.py [--size 4G] [--runs 5] [--work DIR] [--vhdkit PATH]
                        [--baseline PATH] [--stat median|min]
"""
import argparse
import os
import random
import shutil
import statistics
import tempfile
import subprocess
import sys
import time

MIB = 1 << 20


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = s.strip().upper()
    if s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


GNU_TIME = "/usr/bin/time"


def run_timed(cmd):
    """Runs cmd; returns (seconds, peak RSS in KiB) of that process alone.

    The peak RSS comes from GNU time (a forked Python child would report the
    interpreter's own pages as its peak)."""
    fd, rss_file = tempfile.mkstemp()
    os.close(fd)
    t0 = time.perf_counter()
    p = subprocess.run([GNU_TIME, "-f", "%M", "-o", rss_file] + cmd,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    with open(rss_file) as f:
        lines = f.read().split()
    os.unlink(rss_file)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr.decode(errors='replace')}")
    return dt, int(lines[-1])


def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_inputs(work, size, block=2 * MIB, seed=42):
    os.makedirs(work, exist_ok=True)
    sparse = os.path.join(work, "sparse.raw")
    stamp = os.path.join(work, f"inputs-{size}")
    if os.path.exists(stamp):
        return
    print(f"building inputs of {size} bytes in {work} ...", flush=True)
    n = size // block
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(n), n // 4))
    with open(sparse, "wb") as f:
        f.truncate(size)
        for b in chosen:
            f.seek(b * block)
            f.write(os.urandom(block))
    full = os.path.join(work, "full.raw")
    subprocess.run(["cp", "--sparse=never", sparse, full], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
                    "subformat=dynamic,force_size=on", sparse,
                    os.path.join(work, "dyn.vhd")], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
                    "subformat=fixed,force_size=on", sparse,
                    os.path.join(work, "fixed.vhd")], check=True)
    open(stamp, "w").close()


def warm(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 * MIB):
                pass



def time_interleaved(vcmd, qcmd, out, runs, after=None, bcmd=None):
    """Times qemu-img and vhdkit (and, with `bcmd`, a baseline vhdkit build:
    "b"/"bn") `runs` times each, interleaved, with `out` removed and dirty
    pages flushed (`sync`, untimed) before each run. `after(who)` is called
    after each vhdkit run (to check its output).

    Unsynced runs ("q" qemu-img, "vn"/"bn" vhdkit --no-sync) and synced runs
    ("qs" qemu-img then an fsync of its output, "v"/"b" vhdkit's default)
    are timed in two separate loops. On a file system mounted with
    `discard` (as this project's build machine is), removing a 1 GiB output
    that reached the disk makes the next write of 1 GiB slower (measured:
    0.25 s after an unsynced run, 0.43-1.13 s after a synced one). An
    unsynced output is removed before it reaches the disk, a synced one
    after, so mixing the two in one loop charged whoever came after a synced
    run; in separate loops every run of a loop follows the same kind.

    Returns the times {"q", "qs", "v", "vn"[, "b", "bn"]} and peak RSS
    {"q", "v"[, "b"]} (KiB)."""
    t = {"q": [], "qs": [], "v": [], "vn": []}
    rss = {"q": 0, "v": 0}
    unsynced, synced = ["q", "vn"], ["qs", "v"]
    if bcmd:
        t.update({"b": [], "bn": []})
        rss["b"] = 0
        unsynced.append("bn")
        synced.append("b")
    for base in (unsynced, synced):
        for r in range(runs):
            order = base if r % 2 == 0 else base[::-1]
            for who in order:
                if os.path.exists(out):
                    os.unlink(out)
                subprocess.run(["sync"])
                if who[0] == "q":
                    dt, m = run_timed(qcmd)
                    if who == "qs":
                        t0 = time.perf_counter()
                        fsync_file(out)
                        dt += time.perf_counter() - t0
                    t[who].append(dt)
                    rss["q"] = max(rss["q"], m)
                else:
                    cmd = bcmd if who[0] == "b" else vcmd
                    dt, m = run_timed(cmd if len(who) == 1 else cmd + ["--no-sync"])
                    t[who].append(dt)
                    rss[who[0]] = max(rss[who[0]], m)
                    if after:
                        after(who)
    return t, rss

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default="bench-work")
    ap.add_argument("--vhdkit", default=None, help="binary (default: build target/release/vhdkit)")
    ap.add_argument("--jobs", default=None, help="comma-separated subset of job names")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="which time of the runs a ratio uses: the median, or the minimum "
                         "(the run least disturbed by other work on a shared machine)")
    ap.add_argument("--baseline", default=None,
                    help="a second vhdkit binary (an earlier build) timed in the same runs; "
                         "its ratios are printed beside the current ones")
    a = ap.parse_args()
    if shutil.which("qemu-img") is None:
        sys.exit("qemu-img is not installed (apt-get install qemu-utils)")
    if not os.path.exists(GNU_TIME):
        sys.exit("GNU time is needed for peak memory (apt-get install time)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vk = a.vhdkit
    if vk is None:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=root, check=True)
        vk = os.path.join(root, "target", "release", "vhdkit")
    size = parse_size(a.size)
    w = os.path.abspath(a.work)
    build_inputs(w, size)
    P = lambda n: os.path.join(w, n)
    out_raw, out_vhd = P("out.raw"), P("out.vhd")
    jobs = [
        ("dynamic->raw", P("dyn.vhd"), "vpc", out_raw, "raw",
         [vk, "convert", "-q", P("dyn.vhd"), out_raw, "--to", "raw", "--force"],
         ["qemu-img", "convert", "-f", "vpc", "-O", "raw", P("dyn.vhd"), out_raw]),
        ("fixed->raw", P("fixed.vhd"), "vpc", out_raw, "raw",
         [vk, "convert", "-q", P("fixed.vhd"), out_raw, "--to", "raw", "--force"],
         ["qemu-img", "convert", "-f", "vpc", "-O", "raw", P("fixed.vhd"), out_raw]),
        ("sparse raw->dynamic", P("sparse.raw"), "raw", out_vhd, "vpc",
         [vk, "convert", "-q", P("sparse.raw"), out_vhd, "--to", "dynamic", "--force"],
         ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", P("sparse.raw"), out_vhd]),
        ("written-out raw->dynamic", P("full.raw"), "raw", out_vhd, "vpc",
         [vk, "convert", "-q", P("full.raw"), out_vhd, "--to", "dynamic", "--force"],
         ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", P("full.raw"), out_vhd]),
        ("written-out raw->fixed", P("full.raw"), "raw", out_vhd, "vpc",
         [vk, "convert", "-q", P("full.raw"), out_vhd, "--to", "fixed", "--force"],
         ["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", P("full.raw"), out_vhd]),
    ]
    if a.jobs:
        keep = set(a.jobs.split(","))
        jobs = [j for j in jobs if j[0] in keep]
    warm([P("sparse.raw"), P("full.raw"), P("dyn.vhd"), P("fixed.vhd")])
    print(f"vhdkit: {vk}\nqemu-img: {subprocess.run(['qemu-img', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")
    print(f"inputs: {size} bytes, {size // 4 // MIB} MiB of random data in 2 MiB blocks; {a.runs} runs each, interleaved; "
          f"times are the {a.stat} of the runs\n")
    rows = []
    for name, inp, ifmt, out, ofmt, vcmd, qcmd in jobs:
        bcmd = [a.baseline] + vcmd[1:] if a.baseline else None
        t, rss = time_interleaved(vcmd, qcmd, out, a.runs, bcmd=bcmd)
        cmp = subprocess.run(["qemu-img", "compare", "-f", ifmt, "-F", ofmt, inp, out], capture_output=True, text=True)
        ok = "identical" if cmp.returncode == 0 else f"DIFFER ({cmp.stdout.strip()} {cmp.stderr.strip()})"
        alloc = os.stat(out).st_blocks * 512
        pick = statistics.median if a.stat == "median" else min
        med = {k: pick(v) for k, v in t.items()}
        rows.append((name, med, rss, ok, alloc))
        print(f"{name:26} qemu {med['q']:.3f}s  vhdkit --no-sync {med['vn']:.3f}s  ratio {med['q'] / med['vn']:.2f} | "
              f"qemu+fsync {med['qs']:.3f}s  vhdkit {med['v']:.3f}s  ratio {med['qs'] / med['v']:.2f} | "
              f"peak RSS qemu {rss['q'] / 1024:.1f} MiB vhdkit {rss['v'] / 1024:.1f} MiB | "
              f"output {alloc / MIB:.0f} MiB allocated, {ok}", flush=True)
        if a.baseline:
            print(f"{'':26} baseline --no-sync {med['bn']:.3f}s ratio {med['q'] / med['bn']:.2f} | "
                  f"baseline {med['b']:.3f}s ratio {med['qs'] / med['b']:.2f} | peak RSS {rss['b'] / 1024:.1f} MiB",
                  flush=True)
        os.unlink(out)
    print("\nsummary (ratio = qemu-img time / vhdkit time; above 1 means vhdkit is faster)")
    if a.baseline:
        print(f"baseline: {a.baseline}")
        print(f"{'job':26} {'unsynced':>9} {'base':>6} {'synced':>9} {'base':>6} {'RSS qemu':>9} {'RSS vhdkit':>11} {'base':>6}")
        for name, med, rss, ok, alloc in rows:
            print(f"{name:26} {med['q'] / med['vn']:9.2f} {med['q'] / med['bn']:6.2f} {med['qs'] / med['v']:9.2f} "
                  f"{med['qs'] / med['b']:6.2f} {rss['q'] / 1024:8.1f}M {rss['v'] / 1024:10.1f}M {rss['b'] / 1024:5.1f}M  {ok}")
        return
    print(f"{'job':26} {'unsynced':>9} {'synced':>9} {'RSS qemu':>9} {'RSS vhdkit':>11}")
    for name, med, rss, ok, alloc in rows:
        print(f"{name:26} {med['q'] / med['vn']:9.2f} {med['qs'] / med['v']:9.2f} {rss['q'] / 1024:8.1f}M {rss['v'] / 1024:10.1f}M  {ok}")


if __name__ == "__main__":
    main()
