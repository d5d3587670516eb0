#!/usr/bin/env python3
"""Times two vhdkit binaries against each other on the inputs bench/compare.py
built in ./bench-work, alternating, job by job: median and minimum wall time.

Usage: python3 bench/ab.py OLD_BINARY NEW_BINARY [RUNS]
"""
import subprocess, time, statistics, sys, os
old, new = sys.argv[1], sys.argv[2]
W = "bench-work"
jobs = {
 "dyn->raw": ["convert", f"{W}/dyn.vhd", f"{W}/o.raw", "--to", "raw", "--no-sync", "--force", "-q"],
 "fixed->raw": ["convert", f"{W}/fixed.vhd", f"{W}/o.raw", "--to", "raw", "--no-sync", "--force", "-q"],
 "sparse->dyn": ["convert", f"{W}/sparse.raw", f"{W}/o.vhd", "--to", "dynamic", "--no-sync", "--force", "-q"],
 "full->dyn": ["convert", f"{W}/full.raw", f"{W}/o.vhd", "--to", "dynamic", "--no-sync", "--force", "-q"],
 "full->fixed": ["convert", f"{W}/full.raw", f"{W}/o.vhd", "--to", "fixed", "--no-sync", "--force", "-q"],
 "checksum dyn": ["checksum", f"{W}/dyn.vhd"],
 "checksum full": ["checksum", f"{W}/full.raw"],
 "map full": ["map", f"{W}/full.raw", "--json"],
 "compare dyn full": ["compare", f"{W}/dyn.vhd", f"{W}/full.raw"],
}
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 5
print("load:", os.getloadavg())
for name, args in jobs.items():
    t = {old: [], new: []}
    for i in range(runs):
        for b in ([old, new] if i % 2 == 0 else [new, old]):
            for f in (f"{W}/o.raw", f"{W}/o.vhd"):
                if os.path.exists(f): os.remove(f)
            subprocess.run(["sync"])
            s = time.perf_counter()
            r = subprocess.run([b] + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t[b].append(time.perf_counter() - s)
            assert r.returncode in (0, 1), (b, args, r.returncode)
    mo, mn = statistics.median(t[old]), statistics.median(t[new])
    print(f"{name:18s} main median {mo:.3f}s min {min(t[old]):.3f}s | new median {mn:.3f}s min {min(t[new]):.3f}s | new/main median {mn/mo:.2f}")
print("load:", os.getloadavg())
