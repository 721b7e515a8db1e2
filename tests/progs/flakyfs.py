"""flakyfs: a tiny FUSE file system (spoken straight to /dev/fuse, no libfuse) whose reads
fail with EIO while a flag file exists.  For the tests of a swap file whose reads fail.

    python flakyfs.py MOUNTPOINT FLAGFILE

Mounts a flat directory at MOUNTPOINT (root only), keeps file contents in memory, serves
until unmounted (`umount MOUNTPOINT`) or killed.  Prints "mounted" once it serves.
Supports what a swap file needs: create (O_EXCL), open, read, write, truncate, getattr,
unlink, statfs, fsync, flush, release.  Everything else answers ENOSYS.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
import time

IN_HDR = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, padding
OUT_HDR = struct.Struct("<IiQ")  # len, error, unique
# ino, size, blocks, atime, mtime, ctime, their nsecs, mode, nlink, uid, gid, rdev, blksize, flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
UNLINK, OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 10, 14, 15, 16, 17, 18, 20
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 25, 26, 27, 28, 29
ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET = 34, 35, 36, 38, 42
ROOT = 1
FATTR_SIZE = 1 << 3
MAX_WRITE = 128 << 10


class FS:
    def __init__(self, flag: str) -> None:
        self.flag = flag
        self.names: dict[bytes, int] = {}  # name -> inode
        self.data: dict[int, bytearray] = {}
        self.modes: dict[int, int] = {}
        self.next = 2

    def attr(self, ino: int) -> bytes:
        now = int(time.time())
        if ino == ROOT:
            return ATTR.pack(ROOT, 0, 0, now, now, now, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096, 0)
        size = len(self.data[ino])
        mode = 0o100000 | self.modes[ino]
        return ATTR.pack(
            ino, size, (size + 511) // 512, now, now, now, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0
        )

    def entry(self, ino: int) -> bytes:
        return struct.pack("<QQQQII", ino, 0, 0, 0, 0, 0) + self.attr(ino)

    def attr_out(self, ino: int) -> bytes:
        return struct.pack("<QII", 0, 0, 0) + self.attr(ino)

    def handle(self, op: int, node: int, body: bytes) -> tuple[int, bytes] | None:
        if op == INIT:
            major, minor, readahead, _flags = struct.unpack_from("<IIII", body)
            # major, minor, max_readahead, flags, max_background, congestion_threshold,
            # max_write, time_gran, max_pages, map_alignment, flags2, unused[7]
            out = struct.pack(
                "<IIIIHHIIHHI", 7, min(minor, 31), readahead, 0, 16, 12, MAX_WRITE, 1, 32, 0, 0
            )
            return 0, out + bytes(28)
        if op in (FORGET, BATCH_FORGET, INTERRUPT):
            return None  # no answer
        if op == DESTROY:
            return 0, b""
        if op == LOOKUP:
            ino = self.names.get(body.rstrip(b"\0"))
            return (-errno.ENOENT, b"") if ino is None else (0, self.entry(ino))
        if op == GETATTR:
            if node != ROOT and node not in self.data:
                return -errno.ENOENT, b""
            return 0, self.attr_out(node)
        if op == SETATTR:
            valid = struct.unpack_from("<I", body)[0]
            size = struct.unpack_from("<Q", body, 16)[0]
            if valid & FATTR_SIZE and node in self.data:
                d = self.data[node]
                if size < len(d):
                    del d[size:]
                else:
                    d.extend(bytes(size - len(d)))
            return 0, self.attr_out(node)
        if op == CREATE:
            _flags, mode = struct.unpack_from("<II", body)
            name = body[16:].split(b"\0", 1)[0]
            if name in self.names:
                return -errno.EEXIST, b""
            ino = self.next
            self.next += 1
            self.names[name] = ino
            self.data[ino] = bytearray()
            self.modes[ino] = mode & 0o7777
            return 0, self.entry(ino) + struct.pack("<QII", ino, 0, 0)
        if op in (OPEN, OPENDIR):
            return 0, struct.pack("<QII", node, 0, 0)
        if op == READ:
            _fh, off, size = struct.unpack_from("<QQI", body)
            if os.path.exists(self.flag):
                return -errno.EIO, b""
            d = self.data.get(node, bytearray())
            return 0, bytes(d[off : off + size])
        if op == WRITE:
            _fh, off, size = struct.unpack_from("<QQI", body)
            payload = body[40 : 40 + size]
            d = self.data[node]
            if len(d) < off:
                d.extend(bytes(off - len(d)))
            d[off : off + size] = payload
            return 0, struct.pack("<II", size, 0)
        if op == UNLINK:
            ino = self.names.pop(body.rstrip(b"\0"), None)
            if ino is None:
                return -errno.ENOENT, b""
            self.data.pop(ino, None)
            return 0, b""
        if op == STATFS:
            # blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
            return 0, struct.pack(
                "<QQQQQIIII", 1 << 20, 1 << 20, 1 << 20, 1 << 10, 1 << 10, 4096, 255, 4096, 0
            ) + bytes(24)
        if op in (RELEASE, FSYNC, FLUSH, RELEASEDIR, ACCESS):
            return 0, b""
        if op == READDIR:
            return 0, b""
        return -errno.ENOSYS, b""


def main() -> int:
    mnt, flag = sys.argv[1], sys.argv[2]
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(b"flakyfs", mnt.encode(), b"fuse", ctypes.c_ulong(6), opts) != 0:  # NOSUID|NODEV
        e = ctypes.get_errno()
        print(f"flakyfs: mount failed: {os.strerror(e)}", file=sys.stderr)
        return 2
    fs = FS(flag)
    announced = False
    while True:
        try:
            req = os.read(fd, MAX_WRITE + 4096)
        except OSError as exc:
            if exc.errno in (errno.ENODEV,):  # unmounted
                return 0
            if exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                continue
            raise
        _ln, op, unique, node, *_ = IN_HDR.unpack_from(req)
        r = fs.handle(op, node, req[IN_HDR.size :])
        if r is not None:
            err, out = r
            try:
                os.write(fd, OUT_HDR.pack(OUT_HDR.size + len(out), err, unique) + out)
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # the request was interrupted meanwhile
                    raise
        if op == INIT and not announced:
            announced = True
            print("mounted", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
