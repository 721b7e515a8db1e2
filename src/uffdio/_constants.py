"""Kernel ABI constants (stable across kernels; the running kernel's support is probed)."""

from __future__ import annotations

import enum

PAGE_SIZE = 4096


class Feature(enum.IntFlag):
    """UFFD_FEATURE_* bits negotiated with UFFDIO_API."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


#: What a memory manager of other processes wants when the kernel has it.
EVENTS = Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP


class Mode(enum.IntFlag):
    """UFFDIO_REGISTER_MODE_*."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class Ioctl(enum.IntFlag):
    """Bits of the ioctl masks returned by UFFDIO_API and UFFDIO_REGISTER (1 << _UFFDIO_*)."""

    REGISTER = 1 << 0x00
    UNREGISTER = 1 << 0x01
    WAKE = 1 << 0x02
    COPY = 1 << 0x03
    ZEROPAGE = 1 << 0x04
    MOVE = 1 << 0x05
    WRITEPROTECT = 1 << 0x06
    CONTINUE = 1 << 0x07
    POISON = 1 << 0x08
    API = 1 << 0x3F


class FaultFlag(enum.IntFlag):
    """UFFD_PAGEFAULT_FLAG_*."""

    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class Event(enum.IntEnum):
    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16
    ERROR = 0xF0  # synthetic: emitted by uffdio's engine


COPY_MODE_DONTWAKE = 1 << 0
COPY_MODE_WP = 1 << 1
ZEROPAGE_MODE_DONTWAKE = 1 << 0
WRITEPROTECT_MODE_WP = 1 << 0
WRITEPROTECT_MODE_DONTWAKE = 1 << 1
CONTINUE_MODE_DONTWAKE = 1 << 0
CONTINUE_MODE_WP = 1 << 1
MOVE_MODE_DONTWAKE = 1 << 0
MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1
POISON_MODE_DONTWAKE = 1 << 0

# engine (csrc/uffdio.h)
RULE_ZERO = 1
RULE_BUFFER = 2
RULE_FILE = 3
RULE_HOLD = 4
ENGINE_NO_MULTISHOT = 1
ENGINE_DEFAULT_ZERO = 2
FAIL_READ = 1
FAIL_RESOLVE = 2
FAIL_FILE = 3
FAIL_STORE = 4

# PAGEMAP_SCAN
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
