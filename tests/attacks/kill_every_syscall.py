#!/usr/bin/env python3
"""Interrupts and failures at every system call of vhdkit's writing operations.

For each operation (conversions to every target, in-place conversions,
sparsify, resize) on small images, this script

1. runs it once under `strace -f -c` to learn which system calls it makes and
   how often;
2. runs it again, once per chosen invocation of each of those calls, with
   strace killing the process (SIGKILL) at that invocation, then checks what
   is left:
   - the input of a conversion is unchanged, and the target is absent or a
     complete image with the input's content;
   - an in-place operation's image is the old image or the new one: its
     content (vhdkit checksum) and length are one of the two, and a VHD
     passes `vhdkit check`;
   - a later normal run succeeds and leaves no temporary file behind (stale
     ones from the killed run are cleaned up);
3. runs it once per invocation of each writing call with strace failing that
   call with ENOSPC (a full disk), then checks that vhdkit exits 2 (or 0
   with a correct result, when no thread made that many calls), that the
   input of a conversion is as before and no output or temporary file is
   left, and that an in-place image is the old one or, when the failure came
   after the plan's commit point (a footer copy, a final sync), the new one.

Usage: kill_every_syscall.py [VHDKIT_BINARY] (default target/debug/vhdkit).
Needs strace. Exits non-zero when any check fails; the last line is
"attacks: N passed, N failed".
"""

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VHDKIT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/debug/vhdkit"))
MIB = 1 << 20

# Calls worth interrupting at: what a crash between two of them could expose.
KILL_CALLS = {
    "openat", "openat2", "pread64", "pwrite64", "write", "mmap", "ftruncate",
    "fallocate", "fsync", "fdatasync", "rename", "renameat", "renameat2",
    "unlink", "unlinkat", "linkat", "close", "fchown", "fchmod", "fadvise64",
    "lseek", "copy_file_range", "statx", "newfstatat", "fstat",
}
# Calls that can fail with ENOSPC (or EIO) on a full or failing disk.
FAIL_CALLS = {"pwrite64", "pwritev", "fallocate", "ftruncate", "fsync", "fdatasync"}
# Invocations tried per call: spread over the whole run.
SAMPLES = 24

passed = 0
failed = 0


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def run(args, strace=None, cwd=None):
    cmd = [VHDKIT] + args
    if strace:
        cmd = ["strace", "-f", "-qq", "-o", "/dev/null"] + strace + ["--"] + cmd
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def checksum(path, fmt_raw=False):
    args = ["checksum", path] + (["--format", "raw"] if fmt_raw else [])
    r = run(args)
    if r.returncode != 0:
        return None
    return r.stdout.split()[0]


def same(a, b):
    """Equal virtual content (an Azure-rounded output's extra bytes are zero)."""
    return run(["compare", a, b]).returncode == 0


def format_of(path):
    """The format `vhdkit info` detects, or None when it cannot read it."""
    m = re.search(r'"format": "(\w+)"', run(["info", "--json", path]).stdout)
    return m.group(1) if m else None


def temps(folder):
    return [n for n in os.listdir(folder) if n.endswith(".vhdkit-tmp")]


def syscall_counts(args, cwd):
    out = os.path.join(cwd, "strace-counts.txt")
    cmd = ["strace", "-f", "-c", "-o", out, "--", VHDKIT] + args
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"reference run failed: {args}: {r.stderr}")
    counts = {}
    with open(out) as f:
        for line in f:
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
            if m:
                counts[m.group(2)] = int(m.group(1))
    os.unlink(out)
    return counts


def invocations(n):
    if n <= SAMPLES:
        return list(range(1, n + 1))
    step = n / SAMPLES
    return sorted({1, n} | {int(1 + i * step) for i in range(SAMPLES)})


def verdict(ok, what):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL: {what}", flush=True)


def write_raw(path, size, seed):
    """A raw disk with data in a few places and holes elsewhere."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(6):
            at = rnd.randrange(0, size // 4096) * 4096
            f.seek(at)
            f.write(rnd.randbytes(min(4096 * rnd.randint(1, 64), size - at)))



def attack_new_output(name, args, counts, outdir, dst, is_right, unchanged=lambda: True):
    """Kills and full disks at every chosen call of an operation that writes
    the new file `dst` in `outdir`: after a kill, `dst` is absent or right
    (`is_right`), and a rerun succeeds leaving no temporary file; after an
    ENOSPC, vhdkit exits 2 leaving no output and no new temporary file (or
    exits 0 with a right output, when no thread made that many calls). The
    input stays as it was (`unchanged`) throughout."""

    def settle(label):
        verdict(unchanged(), f"{name} {label}: input changed")
        if os.path.exists(dst):
            verdict(is_right(), f"{name} {label}: target exists but is not the right image")
            os.unlink(dst)
        # A later run succeeds and leaves no temporary file behind.
        r = run(args)
        verdict(r.returncode == 0, f"{name} {label}: rerun failed: {r.stderr.strip()}")
        verdict(not temps(outdir), f"{name} {label}: temporary files left after a rerun: {temps(outdir)}")
        if os.path.exists(dst):
            os.unlink(dst)

    for call, n in sorted(counts.items()):
        if call in KILL_CALLS:
            for k in invocations(n):
                run(args, ["-e", f"inject={call}:signal=KILL:when={k}"])
                settle(f"killed at {call} #{k}")
        if call in FAIL_CALLS:
            for k in invocations(n):
                had = set(temps(outdir))
                r = run(args, ["-e", f"inject={call}:error=ENOSPC:when={k}"])
                if r.returncode == 0:
                    # Counts are per thread: no thread made the k-th call,
                    # or the call was one vhdkit may ignore (advice). The
                    # output must then be complete.
                    verdict(is_right(), f"{name}: ENOSPC at {call} #{k} exited 0 with a wrong output")
                    os.unlink(dst)
                    continue
                verdict(r.returncode == 2, f"{name}: ENOSPC at {call} #{k} exited {r.returncode}, not 2")
                verdict(not os.path.exists(dst), f"{name}: ENOSPC at {call} #{k} left an output")
                left = set(temps(outdir)) - had
                verdict(not left, f"{name}: ENOSPC at {call} #{k} left {left}")
                verdict(unchanged(), f"{name}: ENOSPC at {call} #{k} changed the input")
                if os.path.exists(dst):
                    os.unlink(dst)


class Conversion:
    """vhdkit convert INPUT OUTPUT ...: a new file beside the input."""

    def __init__(self, name, make_input, args):
        self.name, self.make_input, self.args = name, make_input, args

    def attack(self, base):
        src = os.path.join(base, "in")
        self.make_input(src, base)
        want_in = sha(src)
        outdir = os.path.join(base, "out")
        os.mkdir(outdir)
        dst = os.path.join(outdir, "disk.out")
        args = ["convert", src, dst, "--threads", "1", "-q"] + self.args
        counts = syscall_counts(args, base)
        os.unlink(dst)
        attack_new_output(self.name, args, counts, outdir, dst,
                          is_right=lambda: same(src, dst),
                          unchanged=lambda: sha(src) == want_in)


class InPlace:
    """An operation that changes the image itself: old or new, never between."""

    def __init__(self, name, make_image, args, new_is_raw=False, old_is_raw=False):
        self.name, self.make_image, self.args = name, make_image, args
        self.new_is_raw, self.old_is_raw = new_is_raw, old_is_raw

    def state(self, img, raw):
        # The detected format, and the virtual content and size (a checksum
        # covers both). The file's length may differ between equal images
        # (padding before a footer).
        return (format_of(img), checksum(img, fmt_raw=raw))

    def attack(self, base):
        pristine = os.path.join(base, "pristine")
        self.make_image(pristine, base)
        img = os.path.join(base, "disk")
        shutil.copyfile(pristine, img)
        args = [a.replace("IMAGE", img) for a in self.args]
        old = self.state(img, self.old_is_raw)
        counts = syscall_counts(args, base)
        new = self.state(img, self.new_is_raw)
        if None in old or None in new:
            raise SystemExit(f"{self.name}: vhdkit cannot read the image before or after the operation")
        if old == new and "sparsify" not in self.args:
            raise SystemExit(f"{self.name}: the operation changed nothing; the attack would prove nothing")

        def settle(label):
            got_old = self.state(img, self.old_is_raw)
            got_new = self.state(img, self.new_is_raw)
            ok = got_old == old or got_new == new
            verdict(ok, f"{self.name} {label}: image is neither the old nor the new one: "
                        f"{got_old} / {got_new}, want {old} or {new}")
            if not self.new_is_raw and got_new == new:
                c = run(["check", img])
                verdict(c.returncode == 0, f"{self.name} {label}: new image fails check: {c.stdout.strip()}")
            verdict(not temps(base), f"{self.name} {label}: temporary files left: {temps(base)}")
            shutil.copyfile(pristine, img)

        for call, n in sorted(counts.items()):
            if call in KILL_CALLS:
                for k in invocations(n):
                    run(args, ["-e", f"inject={call}:signal=KILL:when={k}"])
                    # A killed rewrite leaves its temporary file; the next run
                    # of the same operation clears it (checked there).
                    for t in temps(base):
                        r = run(args)
                        verdict(r.returncode == 0, f"{self.name}: run after a kill failed: {r.stderr.strip()}")
                        verdict(not temps(base), f"{self.name}: stale temporary file not cleaned by the next run")
                        break
                    else:
                        settle(f"killed at {call} #{k}")
                        continue
                    shutil.copyfile(pristine, img)
            if call in FAIL_CALLS:
                for k in invocations(n):
                    r = run(args, ["-e", f"inject={call}:error=ENOSPC:when={k}"])
                    if r.returncode == 0:
                        # The call failed where vhdkit may ignore it (advice, a
                        # folder sync): the result must then be the new image.
                        verdict(self.state(img, self.new_is_raw) == new,
                                f"{self.name}: ENOSPC at {call} #{k} exited 0 with a wrong image")
                        shutil.copyfile(pristine, img)
                        continue
                    verdict(r.returncode == 2, f"{self.name}: ENOSPC at {call} #{k} exited {r.returncode}")
                    # A failure before the plan's commit point (the write
                    # that makes the image the new one) leaves the old image;
                    # after it (a footer copy, a final sync), the new one.
                    settle(f"ENOSPC at {call} #{k}")



class NewDisk:
    """vhdkit create ...: a new file, all or nothing."""

    def __init__(self, name, args, with_parent=False):
        self.name, self.args, self.with_parent = name, args, with_parent

    def attack(self, base):
        outdir = os.path.join(base, "out")
        os.mkdir(outdir)
        dst = os.path.join(outdir, "new.vhd")
        if self.with_parent:
            dynamic_input(os.path.join(outdir, "base.vhd"), base)
        args = ["create", dst] + [a.replace("PARENT", os.path.join(outdir, "base.vhd")) for a in self.args]
        parent = os.path.join(outdir, "base.vhd")
        want_parent = sha(parent) if self.with_parent else None
        counts = syscall_counts(args, base)
        want = (format_of(dst), checksum(dst))
        os.unlink(dst)
        attack_new_output(self.name, args, counts, outdir, dst,
                          is_right=lambda: (format_of(dst), checksum(dst)) == want,
                          unchanged=lambda: not self.with_parent or sha(parent) == want_parent)


class Merge:
    """vhdkit merge CHILD: at every cut the parent is a valid image and the
    child still reads its old content; the same merge run again completes."""

    name = "merge child into parent"

    def attack(self, base):
        import gzip
        names = {}
        # The pristine copies live in a folder of their own: a copy of the
        # child beside the base would be another child depending on it.
        keep = os.path.join(base, "pristine")
        os.mkdir(keep)
        for part in ("base", "child"):
            name = f"hand-chain-{part}.vhd"
            with gzip.open(os.path.join(ROOT, "testdata", name + ".gz")) as f:
                data = f.read()
            for where in (os.path.join(base, name), os.path.join(keep, name)):
                with open(where, "wb") as out:
                    out.write(data)
            names[part] = os.path.join(base, name)
        parent, child = names["base"], names["child"]
        args = ["merge", child]
        want_child = checksum(child)
        old_parent = checksum(parent)
        counts = syscall_counts(args, base)
        want_parent = checksum(parent)
        if want_parent != want_child or want_parent == old_parent:
            raise SystemExit(f"{self.name}: the reference merge did not fold the child in")

        def restore():
            for p in (parent, child):
                shutil.copyfile(os.path.join(keep, os.path.basename(p)), p)

        def settle(label):
            c = run(["check", parent])
            verdict(c.returncode == 0, f"{self.name} {label}: parent fails check: {c.stdout.strip()}")
            verdict(checksum(child) == want_child, f"{self.name} {label}: the child reads other content")
            r = run(args)
            verdict(r.returncode == 0, f"{self.name} {label}: rerun failed: {r.stderr.strip()}")
            verdict(checksum(parent) == want_parent, f"{self.name} {label}: rerun did not complete the merge")
            restore()

        restore()
        for call, n in sorted(counts.items()):
            if call in KILL_CALLS:
                for k in invocations(n):
                    run(args, ["-e", f"inject={call}:signal=KILL:when={k}"])
                    settle(f"killed at {call} #{k}")
            if call in FAIL_CALLS:
                for k in invocations(n):
                    r = run(args, ["-e", f"inject={call}:error=ENOSPC:when={k}"])
                    verdict(r.returncode in (0, 2), f"{self.name}: ENOSPC at {call} #{k} exited {r.returncode}")
                    settle(f"ENOSPC at {call} #{k}")


def raw_input(path, base):
    write_raw(path, 4 * MIB + 512 * 3, seed=1)


def dynamic_input(path, base):
    raw = path + ".raw"
    write_raw(raw, 6 * MIB, seed=2)
    r = run(["convert", raw, path, "--to", "dynamic", "--block-size", "512K", "-q"])
    assert r.returncode == 0, r.stderr
    os.unlink(raw)


def fixed_input(path, base):
    raw = path + ".raw"
    write_raw(raw, 5 * MIB, seed=3)
    r = run(["convert", raw, path, "--to", "fixed", "-q"])
    assert r.returncode == 0, r.stderr
    os.unlink(raw)


def raw_disk(path, base):
    write_raw(path, 3 * MIB + 4096, seed=4)


OPERATIONS = [
    Conversion("raw -> dynamic", raw_input, ["--to", "dynamic"]),
    Conversion("raw -> fixed --azure", raw_input, ["--to", "fixed", "--azure"]),
    Conversion("dynamic -> raw", dynamic_input, ["--to", "raw"]),
    Conversion("dynamic -> fixed", dynamic_input, ["--to", "fixed"]),
    InPlace("in place raw -> fixed", raw_disk,
            ["convert", "--in-place", "IMAGE", "--to", "fixed"], old_is_raw=True),
    InPlace("in place raw -> fixed --azure", raw_disk,
            ["convert", "--in-place", "IMAGE", "--to", "fixed", "--azure"], old_is_raw=True),
    InPlace("in place fixed -> raw", fixed_input,
            ["convert", "--in-place", "IMAGE", "--to", "raw"], new_is_raw=True),
    InPlace("resize fixed 5M -> 9M", fixed_input, ["resize", "IMAGE", "--size", "9M"]),
    InPlace("resize dynamic 6M -> 8M", dynamic_input, ["resize", "IMAGE", "--size", "8M"]),
    InPlace("resize dynamic 6M -> 4G (BAT rewrite)", dynamic_input, ["resize", "IMAGE", "--size", "4G"]),
    InPlace("sparsify dynamic", dynamic_input, ["sparsify", "IMAGE"]),
    InPlace("sparsify raw", raw_disk, ["sparsify", "IMAGE", "--format", "raw"], old_is_raw=True, new_is_raw=True),
    NewDisk("create fixed 9M", ["--size", "9M", "--type", "fixed"]),
    NewDisk("create dynamic 9M", ["--size", "9M", "--type", "dynamic"]),
    NewDisk("create child", ["--parent", "PARENT"], with_parent=True),
    Merge(),
]


def main():
    if shutil.which("strace") is None:
        print("STRACE IS MISSING: install strace (apt-get install strace); the attacks cannot run")
        sys.exit(2)
    if not os.access(VHDKIT, os.X_OK):
        print(f"no vhdkit binary at {VHDKIT}: build it first (cargo build)")
        sys.exit(2)
    only = os.environ.get("VHDKIT_ATTACK_ONLY")
    for op in OPERATIONS:
        if only and only not in op.name:
            continue
        before = (passed, failed)
        with tempfile.TemporaryDirectory(prefix="vhdkit-attack-") as base:
            op.attack(base)
        print(f"{op.name}: {passed - before[0]} checks passed, {failed - before[1]} failed", flush=True)
    print(f"attacks: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
