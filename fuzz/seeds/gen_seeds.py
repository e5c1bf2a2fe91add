#!/usr/bin/env python3
"""Writes the committed seed corpora (fuzz/seeds/<target>/*). Run from anywhere:
   python3 fuzz/seeds/gen_seeds.py
Each seed follows the input layout documented at the top of its fuzz target."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(data))


# ---- translate --------------------------------------------------------------------------
CD, CC, SLI, SKP, PCI, IDA, SUSP, MIDA = 0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01
F1, H, T, MIDAW, SUSPEND = 1 << 23, 1 << 17, 1 << 16, 1 << 6, 1 << 27


def ccw1(cmd, flags, count, cda):
    return struct.pack(">BBHI", cmd, flags, count, cda)


def ccw0(cmd, flags, count, cda):
    return struct.pack(">B", cmd) + struct.pack(">I", cda)[1:] + struct.pack(">BBH", flags, 0, count)


def midaw(flags, count, data):
    return bytes(5) + struct.pack(">BHQ", flags, count, data)


def translate_seed(maps, ctl, cpa, patches, key=0, dev=(0, 0, 0, 0, 0), keys=(), hdr_extra=0):
    b = bytearray([(len(maps) - 1) | hdr_extra])
    for m in maps:
        b += bytes(m)
    b += struct.pack(">III", 1, ctl | (key << 28), cpa)
    b += struct.pack(">BHBBB", *dev)
    b += bytes([len(keys)])
    for k in keys:
        b += bytes(k)
    for (m, off, data) in patches:
        while data:
            chunk, data = data[:255], data[255:]
            b += struct.pack(">BHB", m, off, len(chunk)) + chunk
            off += len(chunk)
    return b


M0 = (0, 1, 7, 0)  # base 0x1000, 8 pages
put("translate", "write_read_cc", translate_seed(
    [M0], F1, 0x1000, [(0, 0, ccw1(0x01, CC, 100, 0x2000) + ccw1(0x02, SLI, 200, 0x3000))]))
put("translate", "ida_fmt2", translate_seed(
    [M0], F1 | H, 0x1000, [(0, 0, ccw1(0x02, IDA, 6000, 0x1800)),
                          (0, 0x800, struct.pack(">QQ", 0x2100, 0x3000))], hdr_extra=4))
put("translate", "ida_fmt1_2k", translate_seed(
    [M0], F1, 0x1000, [(0, 0, ccw1(0x0C, IDA, 3000, 0x1800)),
                      (0, 0x800, struct.pack(">II", 0x47ff, 0x37ff))], hdr_extra=4))
put("translate", "midaw", translate_seed(
    [M0], F1 | H | MIDAW, 0x1000,
    [(0, 0, ccw1(0x01, MIDA | CC, 300, 0x1800) + ccw1(0x02, MIDA, 200, 0x1840)),
     (0, 0x800, midaw(0, 100, 0x2f80) + midaw(0x40, 100, 0x4000) + midaw(0x80, 100, 0x5000)),
     (0, 0x840, midaw(0, 50, 0x6000) + midaw(0x80, 150, 0x3000))], hdr_extra=4))
put("translate", "fmt0_tic", translate_seed(
    [M0], 0, 0x1000,
    [(0, 0, ccw0(0x03, CC, 1, 0) + ccw0(0x08, 0, 0, 0x1100)),
     (0, 0x100, ccw0(0x02, CD, 50, 0x2000) + ccw0(0x02, SLI, 50, 0x2800))]))
put("translate", "two_maps_readonly_keys", translate_seed(
    [M0, (0, 32, 3, 1)], F1, 0x1000,
    [(0, 0, ccw1(0x01, CC, 4096, 0x20000) + ccw1(0x02, CC | SLI, 64, 0x2000) + ccw1(0xE4, SLI, 7, 0x3000))],
    key=3, keys=[(0, 1, 0x30), (0, 2, 0x38), (1, 0, 0x38)], hdr_extra=4, dev=(1, 40, 0, 0, 0)))
put("translate", "status_modifier_skip", translate_seed(
    [M0], F1 | SUSPEND, 0x1000,
    [(0, 0, ccw1(0x31, CC, 5, 0x2000) + ccw1(0x08, 0, 0, 0x1000) + ccw1(0x06, SUSP, 80, 0x3000))],
    dev=(0, 0, 0, 0, 0x31)))
put("translate", "high_mapping", translate_seed(
    [(2, 63, 3, 0), (4, 0, 1, 0)], F1 | H, 0x7ffff000 + 0,
    [(0, 0, ccw1(0x02, IDA, 8192, 0x7ffff800)),
     (0, 0x800, struct.pack(">QQ", 0x80001000, 0x100000000))]))

# ---- vfio_user_server --------------------------------------------------------------------
def msg(mid, cmd, payload=b"", flags=0):
    return struct.pack("<HHIII", mid, cmd, 16 + len(payload), flags, 0) + payload


VERSION, DMA_MAP, DMA_UNMAP, DEV_INFO, REGION_INFO, IRQ_INFO, SET_IRQS, REGION_READ, REGION_WRITE, RESET, WRITE_MULTI = 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 17
session = b"".join([
    msg(1, DEV_INFO, struct.pack("<IIII", 16, 0, 0, 0)),
    msg(2, REGION_INFO, struct.pack("<IIIIQQ", 32, 0, 1, 0, 0, 0)),
    msg(3, IRQ_INFO, struct.pack("<IIII", 16, 0, 0, 0)),
    msg(4, REGION_WRITE, struct.pack("<QII", 0, 0, 4) + b"\x01\x00\x00\x00"),
    msg(5, REGION_READ, struct.pack("<QII", 0, 0, 8)),
    msg(6, DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0x10000, 0x4000)),
    msg(7, DMA_UNMAP, struct.pack("<IIQQ", 24, 0, 0x10000, 0x4000)),
    msg(8, SET_IRQS, struct.pack("<IIIII", 20, 0x21, 0, 0, 1)),
    msg(9, RESET),
    msg(10, REGION_WRITE, struct.pack("<QII", 60, 0, 8) + bytes(8), flags=0x10),
])
put("vfio_user_server", "session", bytes([1]) + session)
put("vfio_user_server", "session_split", bytes([3, 6]) + session)
ver = struct.pack("<HH", 0, 1) + b'{"capabilities":{"max_msg_fds":8,"write_multiple":true}}\x00'
put("vfio_user_server", "raw_version", bytes([0]) + msg(0, VERSION, ver) + msg(1, DEV_INFO, struct.pack("<IIII", 16, 0, 0, 0)))

# ---- ckd_image ---------------------------------------------------------------------------
def ckd(heads, ts, cyls, devtype=0x90, records=lambda c, h: []):
    hdr = bytearray(512)
    hdr[0:8] = b"CKD_P370"
    hdr[8:12] = struct.pack("<I", heads)
    hdr[12:16] = struct.pack("<I", ts)
    hdr[16] = devtype
    out = bytearray(hdr)
    for c in range(cyls):
        for h in range(heads):
            t = bytearray(struct.pack(">BHH", 0, c, h))
            t += struct.pack(">HHBBH", c, h, 0, 0, 8) + bytes(8)
            for (r, key, data) in records(c, h):
                t += struct.pack(">HHBBH", c, h, r, len(key), len(data)) + key + data
            t += b"\xff" * 8
            assert len(t) <= ts
            out += t + bytes(ts - len(t))
    return out


put("ckd_image", "tiny", bytes([0, 0]) + ckd(1, 64, 1))
put("ckd_image", "two_heads_records", bytes([0, 1]) + ckd(2, 128, 2, records=lambda c, h: [(1, b"KEY1", b"DATA" * 4)]))

# ---- awstape -----------------------------------------------------------------------------
def aws(records):
    out, prev = bytearray(), 0
    for r in records:
        if r is None:
            out += struct.pack("<HHBB", 0, prev, 0x40, 0)
            prev = 0
            continue
        segs = [r[i:i + 100] for i in range(0, len(r), 100)]
        for i, s in enumerate(segs):
            fl = (0x80 if i == 0 else 0) | (0x20 if i == len(segs) - 1 else 0)
            out += struct.pack("<HHBB", len(s), prev, fl, 0) + s
            prev = len(s)
    return out


put("awstape", "blocks_and_marks", bytes([2]) + aws([b"A" * 80, b"B" * 250, None, b"C" * 10, None, None]))
put("awstape", "empty", bytes([0]))

# ---- device commands: code, flags, count, dlen, data -------------------------------------
def cmd(code, count, data=b"", flags=0):
    return struct.pack(">BBHH", code, flags, count, len(data)) + data


NEW = 1
dx = bytes([0xC0, 0, 0, 0]) + bytes(4) + struct.pack(">HHHH", 0, 0, 0, 14)  # mask allow all, extent cyl 0 heads 0-14
lr_read = bytes([0x06, 0, 1, 0]) + struct.pack(">HH", 0, 0) + struct.pack(">HHB", 0, 0, 1) + bytes([0, 0, 0])
lr_write = bytes([0x01, 0, 1, 0]) + struct.pack(">HH", 0, 1) + struct.pack(">HHB", 0, 1, 0) + bytes([0, 0, 0])
put("dasd_commands", "sense_rdc", bytes([1]) + cmd(0xE4, 7) + cmd(0x64, 64) + cmd(0x04, 32, flags=NEW) + cmd(0xFA, 96, flags=NEW))
put("dasd_commands", "dx_lr_read", bytes([1]) + cmd(0x63, 16, dx) + cmd(0x47, 16, lr_read) + cmd(0x86, 80))
put("dasd_commands", "seek_search_read", bytes([1]) + cmd(0x07, 6, bytes(6)) + cmd(0x31, 5, bytes([0, 0, 0, 0, 3])) + cmd(0x08 ^ 0x08 | 0x0E, 0) + cmd(0x1E, 200) + cmd(0x12, 8, flags=NEW))
put("dasd_commands", "dx_lr_write", bytes([1]) + cmd(0x63, 16, dx) + cmd(0x47, 16, lr_write) + cmd(0x85, 8, b"NEWDATA!") + cmd(0x04, 32))
put("dasd_commands", "not_ready", bytes([0]) + cmd(0x06, 80) + cmd(0x04, 32))

put("tape_commands", "read_space", bytes([0]) + cmd(0x02, 100) + cmd(0x02, 8000) + cmd(0x3F, 0) + cmd(0x27, 0) + cmd(0x22, 8) + cmd(0x0C, 100) + cmd(0x04, 32))
put("tape_commands", "write_mark_rewind", bytes([1]) + cmd(0x3F, 0) + cmd(0x01, 300, b"X" * 300) + cmd(0x1F, 0) + cmd(0x07, 0) + cmd(0x02, 80) + cmd(0x4F, 4, struct.pack(">I", 3)))
put("tape_commands", "unloaded", bytes([2]) + cmd(0x02, 80) + cmd(0x04, 32) + cmd(0xE4, 7))
put("tape_commands", "limited_writes", bytes([5]) + b"".join(cmd(0x01, 9000, bytes([i]) * 64) for i in range(8)) + cmd(0x04, 32))
