#!/usr/bin/env python3
"""Time VHDX -> raw and VHDX -> Azure fixed VHD, vhdkit against qemu-img.

Inputs (built once in the work folder, default ./bench-work-vhdx): the
inputs of compare.py at SIZE (default 1G: a quarter of its 2 MiB blocks
random, so 256 MiB of data), plus dyn.vhdx, sparse.raw as a dynamic VHDX
(qemu-img). Jobs: vhdx->raw, vhdx->fixed --azure, and dynamic VHD->raw
for reference (the ratio VHDX is measured against). Every output is
checked with `qemu-img compare`. Timed as compare.py times: qemu-img vs
vhdkit --no-sync (unsynced), qemu-img + fsync vs vhdkit (synced); ratio =
qemu-img's median / vhdkit's. No assertion: figures for the record.

Usage: bench/vhdx.py [--size 1G] [--runs 3] [--work DIR] [--vhdkit PATH]
"""
import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import build_inputs, parse_size, time_interleaved, warm  # noqa: E402

MIB = 1 << 20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="bench-work-vhdx")
    ap.add_argument("--vhdkit", default=None, help="binary (default: build target/release/vhdkit)")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vk = a.vhdkit
    if vk is None:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=root, check=True)
        vk = os.path.join(root, "target", "release", "vhdkit")
    size = parse_size(a.size)
    w = os.path.abspath(a.work)
    build_inputs(w, size)
    P = lambda n: os.path.join(w, n)
    if not os.path.exists(P("dyn.vhdx")):
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o",
                        "subformat=dynamic", P("sparse.raw"), P("dyn.vhdx")], check=True)
    out_raw, out_vhd = P("out.raw"), P("out.vhd")
    jobs = [
        ("dynamic vhd->raw", P("dyn.vhd"), "vpc", out_raw, "raw",
         [vk, "convert", "-q", P("dyn.vhd"), out_raw, "--to", "raw", "--force"],
         ["qemu-img", "convert", "-f", "vpc", "-O", "raw", P("dyn.vhd"), out_raw]),
        ("vhdx->raw", P("dyn.vhdx"), "vhdx", out_raw, "raw",
         [vk, "convert", "-q", P("dyn.vhdx"), out_raw, "--to", "raw", "--force"],
         ["qemu-img", "convert", "-f", "vhdx", "-O", "raw", P("dyn.vhdx"), out_raw]),
        ("vhdx->fixed --azure", P("dyn.vhdx"), "vhdx", out_vhd, "vpc",
         [vk, "convert", "-q", P("dyn.vhdx"), out_vhd, "--to", "fixed", "--azure", "--force"],
         ["qemu-img", "convert", "-f", "vhdx", "-O", "vpc", "-o", "subformat=fixed,force_size=on",
          P("dyn.vhdx"), out_vhd]),
    ]
    warm([P("dyn.vhd"), P("dyn.vhdx")])
    print(f"vhdkit: {vk}\nqemu-img: {subprocess.run(['qemu-img', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}")
    print(f"inputs: {size} bytes, {size // 4 // MIB} MiB of random data; {a.runs} runs each, interleaved\n")
    print(f"{'job':24} {'qemu':>8} {'vk-nosync':>10} {'ratio':>6} {'qemu+fsync':>11} {'vk':>8} {'ratio':>6} {'rss q/v MiB':>12}")
    for name, inp, ifmt, out, ofmt, vcmd, qcmd in jobs:
        def check(who, name=name, inp=inp, ifmt=ifmt, out=out, ofmt=ofmt):
            c = subprocess.run(["qemu-img", "compare", "-q", "-f", ifmt, "-F", ofmt, inp, out])
            if c.returncode != 0:
                sys.exit(f"{name}: output differs from the input")

        t, rss = time_interleaved(vcmd, qcmd, out, a.runs, after=check)
        m = {k: statistics.median(v) for k, v in t.items()}
        print(f"{name:24} {m['q']:8.3f} {m['vn']:10.3f} {m['q'] / m['vn']:6.2f} {m['qs']:11.3f} {m['v']:8.3f} "
              f"{m['qs'] / m['v']:6.2f} {rss['q'] // 1024:>5}/{rss['v'] // 1024:<5}")
    for p in (out_raw, out_vhd):
        if os.path.exists(p):
            os.unlink(p)


if __name__ == "__main__":
    main()
