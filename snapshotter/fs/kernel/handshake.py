"""FUSE's INIT handshake, the first request of every connection: protocol version and features.

Asked for: 1 MiB requests (max_pages 256), asynchronous reads, parallel directory operations,
readdirplus, cached symlinks, ECONNABORTED after an abort, and where the kernel offers them (6.9+)
FUSE_PASSTHROUGH and FUSE_HAS_RESEND. Never the writeback cache (a read-only filesystem, and
passthrough refuses it). What was settled is returned as plain ints: a successor serving the same
connection needs exactly this, since the kernel never sends INIT twice.
"""

from __future__ import annotations

import errno
import os
import struct

import structlog

from converter.format.errors import PeerpullError
from snapshotter.fs.kernel import abi
from snapshotter.fs.kernel.abi import InitFlag, Op

log = structlog.get_logger(__name__)

MAX_WRITE = 1 << 20
MAX_PAGES = 256
MAX_BACKGROUND = 64  # async readahead requests in flight (the kernel's default is 12)
CONGESTION_THRESHOLD = 48
WANTED = (InitFlag.ASYNC_READ | InitFlag.PARALLEL_DIROPS | InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO
          | InitFlag.MAX_PAGES | InitFlag.CACHE_SYMLINKS | InitFlag.ABORT_ERROR | InitFlag.INIT_EXT
          | InitFlag.PASSTHROUGH | InitFlag.HAS_RESEND)
STATE_KEYS = ("major", "minor", "flags", "max_write", "max_pages", "max_readahead", "max_background",
              "congestion_threshold", "time_gran", "max_stack_depth")


class SessionError(PeerpullError):
    """The FUSE session cannot do what was asked (protocol too old, feature not negotiated)."""


def negotiate(fd: int) -> dict[str, int]:
    """Answer the kernel's INIT on a freshly mounted `fd` (blocking: INIT is queued at mount)."""
    buffer = bytearray(1 << 16)
    while True:
        n = os.readv(fd, [buffer])
        length, opcode, unique, *_ = abi.IN_HEADER.unpack_from(buffer)
        if opcode != Op.INIT or length != n:
            raise SessionError(f"the FUSE connection's first request is opcode {opcode}, not INIT")
        major, minor, max_readahead, low = abi.INIT_IN.unpack_from(buffer, abi.IN_HEADER.size)
        if major > abi.KERNEL_MAJOR:  # answer with our major: the kernel asks again in it
            os.write(fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size + 8, 0, unique)
                     + struct.pack("<II", abi.KERNEL_MAJOR, abi.KERNEL_MINOR))
            continue
        break
    offered = low
    if low & InitFlag.INIT_EXT and n >= abi.IN_HEADER.size + abi.INIT_IN.size + abi.INIT_IN_FLAGS2.size:
        offered |= abi.INIT_IN_FLAGS2.unpack_from(buffer, abi.IN_HEADER.size + abi.INIT_IN.size)[0] << 32
    minor = min(minor, abi.KERNEL_MINOR)
    if major != abi.KERNEL_MAJOR or minor < abi.MIN_MINOR:
        os.write(fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size, -errno.EPROTO, unique))
        raise SessionError(f"the kernel speaks FUSE {major}.{minor}; the kernel backend needs "
                           f"{abi.KERNEL_MAJOR}.{abi.MIN_MINOR} or newer (fuse_backend: pyfuse3 serves it)")
    chosen = int(WANTED & offered)
    # passthrough needs a stacking depth: backing files on a plain fs, overlayfs once above us
    depth = abi.PASSTHROUGH_STACK_DEPTH if chosen & InitFlag.PASSTHROUGH else 0
    low_out, high_out = abi.split_flags(chosen)
    reply = abi.INIT_OUT.pack(major, minor, max_readahead, low_out, MAX_BACKGROUND, CONGESTION_THRESHOLD,
                              MAX_WRITE, 1, MAX_PAGES, 0, high_out, depth)
    os.write(fd, abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(reply), 0, unique) + reply)
    log.info("fuse_session_init", protocol=f"{major}.{minor}", offered=hex(offered), flags=hex(chosen),
             passthrough=bool(chosen & InitFlag.PASSTHROUGH), resend=bool(chosen & InitFlag.HAS_RESEND),
             max_write=MAX_WRITE)
    return {"major": major, "minor": minor, "flags": chosen, "max_write": MAX_WRITE, "max_pages": MAX_PAGES,
            "max_readahead": max_readahead, "max_background": MAX_BACKGROUND,
            "congestion_threshold": CONGESTION_THRESHOLD, "time_gran": 1, "max_stack_depth": depth}
