#!/usr/bin/env python3
"""Upload and download benchmark on the Azure Storage emulator (Azurite), one run.

Input (built in the work folder, default ./bench-work/azure): a SIZE disk
(default 1 GiB) holding DATA bytes (default 256 MiB) of random data scattered
as a filesystem would: runs of 4 KiB to 1 MiB spread over the disk, the rest
zero; kept as a sparse raw file and as a dynamic VHD (vhdkit).

Jobs, each into a fresh blob, each through a counting proxy (bytes and HTTP
requests from the client to the emulator):
  vhdkit       vhdkit convert dyn.vhd URL (one step, from the dynamic VHD)
  recipe       qemu-img convert -O vpc -o subformat=fixed,force_size raw
               -> fixed.vhd, then the Python SDK's
               upload_blob(blob_type="PageBlob", max_concurrency=8)
  vhdkit get   vhdkit convert URL out.raw --to raw (the vhdkit upload's blob
               back to a sparse raw file)
  SDK get      the Python SDK's download_blob(max_concurrency=8) of the same
               blob into a file
Every blob is read back and compared with the input's content, and every
download is compared with the input.

Prints, per job: bytes sent (uploads: request bytes; downloads: answer bytes
fetched), requests, seconds (the recipe's split into its two steps), peak RSS.

Needs: azurite (npm; target/azurite as .ci/run installs it, or
VHDKIT_AZURITE), qemu-img, `pip install azure-storage-blob`, a release build
of vhdkit (cargo build --release).

Usage: bench/azure.py [--size 1G] [--data 256M] [--work DIR] [--vhdkit PATH]
"""
import argparse
import base64
import hashlib
import hmac
import os
import random
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
# This file's own name would shadow the `azure` package of the SDK.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
ROOT = os.path.dirname(HERE)
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
MIB = 1 << 20


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = s.strip().upper()
    if s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def sign(to_sign):
    mac = hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()
    return urllib.parse.quote(base64.b64encode(mac).decode(), safe="")


def account_sas():
    ts = f"{ACCOUNT}\nrwdlac\nb\nsco\n\n2099-01-01T00:00:00Z\n\nhttps,http\n2021-08-06\n\n"
    return ("sv=2021-08-06&ss=b&srt=sco&sp=rwdlac&se=2099-01-01T00:00:00Z&spr=https,http&sig="
            + sign(ts))


def container_sas(c):
    ts = (f"racwdl\n\n2099-01-01T00:00:00Z\n/blob/{ACCOUNT}/{c}\n\n\nhttps,http\n2021-08-06\nc"
          "\n\n\n\n\n\n\n")
    return ("sv=2021-08-06&sr=c&sp=racwdl&se=2099-01-01T00:00:00Z&spr=https,http&sig="
            + sign(ts))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Proxy:
    """Forwards loopback HTTP/1.1 to the emulator, counting the client's
    requests and bytes (headers and bodies)."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.requests = 0
        self.bytes = 0
        self.answers = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def reset(self):
        with self.lock:
            self.requests = 0
            self.bytes = 0
            self.answers = 0

    def accept(self):
        while True:
            c, _ = self.sock.accept()
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        u = socket.create_connection(("127.0.0.1", self.upstream))

        def back():
            try:
                while True:
                    b = u.recv(1 << 16)
                    if not b:
                        break
                    with self.lock:
                        self.answers += len(b)
                    c.sendall(b)
            except OSError:
                pass
            finally:
                c.close()

        threading.Thread(target=back, daemon=True).start()
        f = c.makefile("rb")
        try:
            while True:
                head = b""
                while True:
                    line = f.readline()
                    if not line:
                        return
                    head += line
                    if line == b"\r\n":
                        break
                n = 0
                for line in head.split(b"\r\n"):
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        n = int(v.strip())
                body = f.read(n) if n else b""
                with self.lock:
                    self.requests += 1
                    self.bytes += len(head) + len(body)
                u.sendall(head + body)
        except OSError:
            pass
        finally:
            u.close()


def make_inputs(work, size, data, vhdkit):
    raw = os.path.join(work, "disk.raw")
    dyn = os.path.join(work, "dyn.vhd")
    if os.path.exists(dyn) and os.path.getsize(raw) == size:
        return raw, dyn
    rnd = random.Random(1)
    with open(raw, "wb") as f:
        f.truncate(size)
        # Non-overlapping runs of 4 KiB-1 MiB at random places until DATA is placed.
        taken = []
        placed = 0
        while placed < data:
            run = min(rnd.randint(1, 256) * 4096, data - placed)
            off = rnd.randrange(0, size - run) // 4096 * 4096
            if any(off < e and off + run > s for s, e in taken):
                continue
            taken.append((off, off + run))
            f.seek(off)
            f.write(rnd.randbytes(run))
            placed += run
    subprocess.run([vhdkit, "convert", raw, dyn, "--to", "dynamic", "--force", "-q"], check=True)
    return raw, dyn


def timed(cmd, **kw):
    """Runs cmd; returns (seconds, peak RSS in bytes of that child)."""
    t = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True, **kw)
    secs = time.monotonic() - t
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {p.stderr}")
    rss = int(p.stderr.strip().splitlines()[-1]) * 1024
    return secs, rss, p.stdout


SDK_UPLOAD = r"""
import sys
from azure.storage.blob import BlobClient
url, path = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    BlobClient.from_blob_url(url).upload_blob(f, blob_type="PageBlob", max_concurrency=8)
"""


SDK_DOWNLOAD = r"""
import sys
from azure.storage.blob import BlobClient
url, path = sys.argv[1], sys.argv[2]
with open(path, "wb") as f:
    BlobClient.from_blob_url(url).download_blob(max_concurrency=8).readinto(f)
"""


def same_prefix(path, raw, size):
    """The first SIZE bytes of PATH equal the raw disk."""
    with open(path, "rb") as a, open(raw, "rb") as b:
        pos = 0
        while pos < size:
            n = min(64 * MIB, size - pos)
            if a.read(n) != b.read(n):
                sys.exit(f"MISMATCH in {path} at {pos}")
            pos += n


def check(url, raw, size):
    """The blob's first SIZE bytes equal the raw disk (read back with the SDK)."""
    from azure.storage.blob import BlobClient
    b = BlobClient.from_blob_url(url)
    props = b.get_blob_properties()
    with open(raw, "rb") as f:
        pos = 0
        while pos < size:
            n = min(64 * MIB, size - pos)
            got = b.download_blob(offset=pos, length=n).readall()
            if got != f.read(n):
                sys.exit(f"MISMATCH in {url.split('?')[0]} at {pos}")
            pos += n
    return props.size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--data", default="256M")
    ap.add_argument("--work", default=os.path.join(ROOT, "bench-work", "azure"))
    ap.add_argument("--vhdkit", default=os.path.join(ROOT, "target", "release", "vhdkit"))
    a = ap.parse_args()
    size, data = parse_size(a.size), parse_size(a.data)
    os.makedirs(a.work, exist_ok=True)
    raw, dyn = make_inputs(a.work, size, data, a.vhdkit)
    azurite = os.environ.get("VHDKIT_AZURITE") or os.path.join(
        ROOT, "target", "azurite", "node_modules", ".bin", "azurite-blob")
    port = free_port()
    az = subprocess.Popen([azurite, "--skipApiVersionCheck", "--inMemoryPersistence",
                           "--disableTelemetry", "--silent", "--blobHost", "127.0.0.1",
                           "--blobPort", str(port)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        import http.client
        h = http.client.HTTPConnection("127.0.0.1", port)
        h.request("PUT", f"/{ACCOUNT}/vhds?restype=container&{account_sas()}",
                  headers={"x-ms-version": "2021-08-06", "Content-Length": "0"})
        assert h.getresponse().status == 201
        proxy = Proxy(port)
        sas = container_sas("vhds")
        base = f"http://127.0.0.1:{proxy.port}/{ACCOUNT}/vhds"
        rows = []

        proxy.reset()
        url = f"{base}/vhdkit.vhd?{sas}"
        secs, rss, _ = timed([a.vhdkit, "convert", dyn, url, "-q"])
        rows.append(("vhdkit (dynamic VHD, one step)", proxy.bytes, proxy.requests, secs, "", rss))
        check(f"http://127.0.0.1:{port}/{ACCOUNT}/vhds/vhdkit.vhd?{sas}", raw, size)

        fixed = os.path.join(a.work, "fixed.vhd")
        if os.path.exists(fixed):
            os.remove(fixed)
        qsecs, qrss, _ = timed(["qemu-img", "convert", "-O", "vpc", "-o",
                                "subformat=fixed,force_size", raw, fixed])
        proxy.reset()
        url = f"{base}/recipe.vhd?{sas}"
        usecs, urss, _ = timed([sys.executable, "-c", SDK_UPLOAD, url, fixed])
        rows.append(("qemu-img + SDK upload_blob(PageBlob, 8)", proxy.bytes, proxy.requests,
                     qsecs + usecs, f"{qsecs:.2f} + {usecs:.2f}", max(qrss, urss)))
        check(f"http://127.0.0.1:{port}/{ACCOUNT}/vhds/recipe.vhd?{sas}", raw, size)
        os.remove(fixed)

        downs = []
        out = os.path.join(a.work, "down.raw")
        for name, cmd in [
            ("vhdkit convert URL out.raw --to raw",
             [a.vhdkit, "convert", f"{base}/vhdkit.vhd?{sas}", out, "--to", "raw", "--force",
              "-q"]),
            ("SDK download_blob(max_concurrency=8)",
             [sys.executable, "-c", SDK_DOWNLOAD, f"{base}/vhdkit.vhd?{sas}", out]),
        ]:
            if os.path.exists(out):
                os.remove(out)
            proxy.reset()
            secs, rss, _ = timed(cmd)
            same_prefix(out, raw, size)
            downs.append((name, proxy.answers, proxy.requests, secs, "", rss))
            os.remove(out)

        print(f"disk {size / MIB:.0f} MiB, data {data / MIB:.0f} MiB in 4 KiB-1 MiB runs; "
              "Azurite on loopback")
        print("| job | bytes sent | vs data | requests | seconds | peak RSS |")
        print("|---|---|---|---|---|---|")
        for name, b, r, s, split, m in rows:
            sp = f" ({split})" if split else ""
            print(f"| {name} | {b:,} | {b / data:.3f}x | {r} | {s:.2f}{sp} | "
                  f"{m / MIB:.1f} MiB |")
        print(f"speed-up: {rows[1][3] / rows[0][3]:.1f}x")
        print()
        print("| download | bytes fetched | vs data | requests | seconds | peak RSS |")
        print("|---|---|---|---|---|---|")
        for name, b, r, s, _, m in downs:
            print(f"| {name} | {b:,} | {b / data:.3f}x | {r} | {s:.2f} | {m / MIB:.1f} MiB |")
        print(f"speed-up: {downs[1][3] / downs[0][3]:.1f}x")
    finally:
        az.terminate()
        az.wait()


if __name__ == "__main__":
    main()
