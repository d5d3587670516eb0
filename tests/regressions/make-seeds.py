#!/usr/bin/env python3
"""Writes the hand-made seed inputs of this folder (see README.md).

Run from this folder: python3 make-seeds.py. Deterministic: the same bytes
every time.
"""
import struct


def checksum(b, at):
    s = sum(b[:at]) + sum(b[at + 4:])
    return (~s) & 0xFFFFFFFF


def footer(disk_type, current_size, data_offset, uid=b"\x5a" * 16, original_size=None):
    b = bytearray(512)
    b[0:8] = b"conectix"
    struct.pack_into(">IIQI", b, 8, 2, 0x00010000, data_offset, 0)
    b[28:32] = b"seed"
    struct.pack_into(">I", b, 32, 0x00010000)
    b[36:40] = b"Wi2k"
    if original_size is None:
        original_size = current_size
    struct.pack_into(">QQ", b, 40, original_size & (2**64 - 1), current_size & (2**64 - 1))
    b[56:60] = bytes([0, 1, 4, 17])
    struct.pack_into(">I", b, 60, disk_type)
    b[68:84] = uid
    struct.pack_into(">I", b, 64, checksum(b, 64))
    return bytes(b)


def header(table_offset, entries, block_size, parent_id=b"\0" * 16, name="", locators=()):
    b = bytearray(1024)
    b[0:8] = b"cxsparse"
    struct.pack_into(">QQIII", b, 8, 2**64 - 1, table_offset, 0x00010000, entries, block_size)
    b[40:56] = parent_id
    u = name.encode("utf-16-be")[:512]
    b[64:64 + len(u)] = u
    for i, (code, space, length, offset) in enumerate(locators):
        struct.pack_into(">4sIIIQ", b, 576 + 24 * i, code, space, length, 0, offset)
    struct.pack_into(">I", b, 36, checksum(b, 36))
    return bytes(b)


def write(name, data):
    with open(name, "wb") as f:
        f.write(data)


# A 511-byte (pre-2004) footer alone, of a dynamic disk whose header would be
# at 512: past the end of the file.
write("footer-alone-511-dynamic.vhd", footer(3, 1 << 20, 512)[:511])

# A 511-byte footer alone of a fixed disk claiming 2^64-1 bytes.
write("footer-alone-511-fixed-huge.vhd", footer(2, 2**64 - 1, 2**64 - 1)[:511])

# A dynamic footer whose data offset points at the end footer itself.
f = footer(3, 1 << 20, 1536)
write("header-offset-at-own-footer.vhd", f + header(2048, 1, 1 << 20) + f)

# max table entries 0xFFFFFFFF with a one-sector BAT.
f = footer(3, 1 << 20, 512)
write("max-table-entries-ffffffff.vhd", f + header(1536, 0xFFFFFFFF, 1 << 20) + b"\xff" * 512 + f)

# 1024 BAT entries (512-byte blocks, 512 KiB disk), every one naming sector 3,
# which is the BAT itself.
f = footer(3, 1024 * 512, 512)
bat = struct.pack(">I", 3) * 1024
write("bat-all-entries-one-sector.vhd", f + header(1536, 1024, 512) + bat + b"\0" * 1024 + f)

# Block size 2 GiB (a 512 KiB bitmap) with its one block a sector before the footer.
f = footer(3, 1 << 31, 512)
bat = struct.pack(">I", 4) + b"\xff" * 508
write("block-size-2g-block-past-end.vhd", f + header(1536, 1, 1 << 31) + bat + b"\0" * 512 + f)

# A differencing disk that is its own parent: parent id = its own id, and a
# W2ru locator naming r.vhd (the name the replay test gives every input).
uid = bytes(range(16))
loc = "r.vhd".encode("utf-16-le")
f = footer(4, 4096, 512, uid=uid)
h = header(1536, 2, 4096, parent_id=uid, name="r.vhd", locators=[(b"W2ru", 512, len(loc), 2048)])
write("differencing-its-own-parent.vhd", f + h + b"\xff" * 512 + loc + b"\0" * (512 - len(loc)) + f)

# An empty dynamic disk (current size 0, no BAT entries) whose table offset
# lies inside the header, and whose footer copy claims another disk type.
f = footer(3, 0, 512)
write("empty-dynamic-table-in-header.vhd", footer(4, 0, 512) + header(1000, 0, 4096) + f)

# A locator whose data runs from inside the file to 4 GiB past it.
f = footer(4, 4096, 512, uid=b"\x77" * 16)
h = header(1536, 1, 4096, parent_id=b"\x66" * 16, locators=[(b"W2ku", 0xFFFFFFFF, 0xFFFFFFFF, 2048)])
write("locator-length-4g.vhd", f + h + b"\xff" * 512 + b"\0" * 512 + f)
