"""Operations on another process's memory, batched: one call into C per batch."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

from ._errors import UffdRangeError, check, error_for
from ._lib import ffi, lib

RangeList = Sequence[tuple[int, int]]


def _flat(ranges: RangeList) -> Any:
    flat = ffi.new("uint64_t[]", 2 * max(1, len(ranges)))
    for i, (s, n) in enumerate(ranges):
        if s < 0 or n < 0:
            raise UffdRangeError(
                errno.EINVAL,
                "iovec",
                f"range {s:#x}+{n:#x}",
                "pass non-negative addresses and lengths",
            )
        flat[2 * i] = s
        flat[2 * i + 1] = n
    return flat


def _local(buf: Any, ranges: RangeList) -> tuple[Any, Any]:
    """Local iovecs: consecutive slices of ``buf`` sized like ``ranges``."""
    cbuf = ffi.from_buffer(buf, require_writable=False)
    total = sum(n for _, n in ranges)
    if len(cbuf) < total:
        raise UffdRangeError(
            errno.EINVAL,
            "process_vm",
            f"local buffer has {len(cbuf)} bytes, the ranges {total}",
            "pass a larger buffer",
        )
    base = int(ffi.cast("uintptr_t", cbuf))
    pairs, off = [], 0
    for _, n in ranges:
        pairs.append((base + off, n))
        off += n
    return _flat(pairs), cbuf


def read_memory(pid: int, ranges: RangeList, into: Any) -> int:
    """process_vm_readv of many remote ranges into consecutive bytes of ``into`` in one call.

    Returns bytes read (short when a remote page is not mapped).  Never use it on a missing
    page of a range whose faults you serve: it would wait for your own resolution."""
    local, _keep = _local(into, ranges)
    return check(
        lib.uf_process_vm_readv(pid, local, len(ranges), _flat(ranges), len(ranges)),
        "process_vm_readv",
        f"pid {pid}",
    )


def write_memory(pid: int, ranges: RangeList, data: Any) -> int:
    """process_vm_writev of consecutive bytes of ``data`` into many remote ranges."""
    local, _keep = _local(data, ranges)
    return check(
        lib.uf_process_vm_writev(pid, local, len(ranges), _flat(ranges), len(ranges)),
        "process_vm_writev",
        f"pid {pid}",
    )


def pidfd_open(pid: int) -> int:
    return check(lib.uf_pidfd_open(pid, 0), "pidfd_open", f"pid {pid}")


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    return check(lib.uf_pidfd_getfd(pidfd, targetfd), "pidfd_getfd", f"fd {targetfd}")


def process_madvise(pidfd: int, ranges: RangeList, advice: int) -> int:
    """process_madvise with many ranges per call.  On another process the kernel accepts only
    COLD, PAGEOUT, WILLNEED and COLLAPSE; zaps (DONTNEED) must run inside the target."""
    rc = lib.uf_process_madvise(pidfd, _flat(ranges), len(ranges), advice)
    if rc == -errno.EINVAL:
        raise UffdRangeError(
            errno.EINVAL,
            "process_madvise",
            f"advice {advice} refused",
            "on another process the kernel accepts only MADV_COLD, MADV_PAGEOUT, MADV_WILLNEED "
            "and MADV_COLLAPSE; zaps (DONTNEED/FREE) must run inside the target; also check "
            "that the ranges are page aligned and mapped",
        )
    return check(
        rc,
        "process_madvise",
        f"advice {advice}",
    )


def pagemap_scan(
    pid: int | str,
    start: int,
    end: int,
    *,
    category_mask: int = 0,
    category_inverted: int = 0,
    category_anyof_mask: int = 0,
    return_mask: int = 0,
    flags: int = 0,
    max_pages: int = 0,
    max_regions: int = 4096,
) -> tuple[list[tuple[int, int, int]], int]:
    """PAGEMAP_SCAN (6.7+) on /proc/PID/pagemap: ([(start, end, categories)], walk_end)."""
    path = f"/proc/{pid}/pagemap"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise error_for(
            exc.errno or errno.EIO,
            "PAGEMAP_SCAN",
            f"open {path}: {exc.strerror}"
            + (
                " (ptrace rights over the process are needed; a process that "
                "changed uid is not dumpable)"
                if exc.errno in (errno.EACCES, errno.EPERM)
                else ""
            ),
        ) from None
    try:
        scan = ffi.new("struct uf_scan *")
        scan.start, scan.end, scan.flags, scan.max_pages = start, end, flags, max_pages
        scan.category_inverted = category_inverted
        scan.category_mask = category_mask
        scan.category_anyof_mask = category_anyof_mask
        scan.return_mask = return_mask
        out = ffi.new("uint64_t[]", 3 * max_regions)
        n = check(lib.uf_pagemap_scan(fd, scan, out, max_regions), "PAGEMAP_SCAN", path)
        return [(out[3 * i], out[3 * i + 1], out[3 * i + 2]) for i in range(n)], scan.walk_end
    finally:
        os.close(fd)
