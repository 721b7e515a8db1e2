"""Every kernel operation of uffdio against real faults of a real, separate target process
(or, for UFFDIO_MOVE, of this process), with the content checked in the target or read back.

The target is ``python -m uffdio._target`` (tests/conftest.py ``target`` fixture).  Commands
that make it fault run through ``target.acmd`` while the uffd is served, or in a thread while
the test resolves the faults itself.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from conftest import PAGE, managed, pattern, requires, until

import uffdio
from uffdio import FaultFlag, Feature, Mode
from uffdio import _constants as C
from uffdio._lib import ffi, lib
from uffdio._target import TargetError

MADV_COLD = 20
MADV_DONTNEED = 4
SIGBUS = 7

pytestmark = pytest.mark.timeout(60)


# ---- helpers --------------------------------------------------------------------------------


def wchan(pid: int) -> str:
    with open(f"/proc/{pid}/wchan") as f:
        return f.read()


def read_target(pid: int, addr: int, length: int) -> bytes:
    """process_vm_readv of PRESENT pages only (a missing managed page would wait for us)."""
    buf = bytearray(length)
    assert uffdio.read_memory(pid, [(addr, length)], buf) == length
    return bytes(buf)


def zeros(n: int) -> bytes:
    return bytes(n)


# ---- UFFDIO_COPY ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_copy_single_page(target):
    addr, u = managed(target, 1)
    data = pattern(addr, PAGE, 11)
    faults = []
    with u:

        @u.on_fault
        async def handler(batch):
            for f in batch:
                faults.append((f.page, f.is_write, f.is_wp, f.is_minor))
                assert await u.copy(f.page, data) == PAGE

        async with u.serving():
            assert await target.acmd("check", addr, PAGE, 11) == [0]
    assert faults == [(addr, False, False, False)]


@pytest.mark.asyncio
async def test_copy_multi_page_resolves_every_page_in_one_call(target):
    n = 32
    addr, u = managed(target, n)
    data = pattern(addr, n * PAGE, 12)
    calls = []
    with u:

        @u.on_fault
        async def handler(batch):
            calls.append(batch.pages())
            assert await u.copy(addr, data) == n * PAGE  # the whole range, from the first fault

        async with u.serving():
            assert await target.acmd("check", addr, n * PAGE, 12) == [0]
        st = u.statistics()
    # one fault: the single copy mapped all n pages
    assert calls == [[addr]]
    assert st["forwarded"] == 1


@pytest.mark.asyncio
async def test_copy_dontwake_then_wake(target):
    n = 4
    addr, u = managed(target, n)
    data = pattern(addr, n * PAGE, 13)
    seen = []
    with u:

        @u.on_fault
        async def handler(batch):
            seen.append(batch.pages())
            assert await u.copy(addr, data, dontwake=True) == n * PAGE
            # The pages are in place (readable without faulting) ...
            assert read_target(target.pid, addr, n * PAGE) == bytes(data)
            # ... but the faulting thread was NOT woken: it sleeps in the uffd.  (Polled: the
            # message can be read just before the thread calls schedule().)
            await until(lambda: wchan(target.pid) == "handle_userfault", "the thread asleep")
            u.wake(addr, n * PAGE)

        async with u.serving():
            assert await target.acmd("check", addr, n * PAGE, 13) == [0]
    assert seen == [[addr]]


@pytest.mark.asyncio
@requires(Feature.PAGEFAULT_FLAG_WP)
async def test_copy_wp_then_wp_fault_resolved_by_unprotect(target):
    addr, u = managed(target, 1, Feature.PAGEFAULT_FLAG_WP, Mode.MISSING | Mode.WP)
    data = pattern(addr, PAGE, 14)
    seen = []
    with u:

        @u.on_fault
        async def handler(batch):
            for f in batch:
                seen.append((f.page, f.is_write, f.is_wp))
                if f.is_wp:
                    u.writeprotect_nowait([(f.page, PAGE)], protect=False)
                else:
                    await u.copy(f.page, data, wp=True)

        async with u.serving():
            await target.acmd("touch", addr, 1, 1, "-")  # read then write the first byte
    # touch reads before it writes: a missing read fault, then (the copy installed the page
    # write-protected) the write-protect fault of the write
    assert seen == [(addr, False, False), (addr, True, True)]
    expect = bytearray(data)
    expect[0] = (expect[0] + 1) & 0xFF
    assert read_target(target.pid, addr, PAGE) == bytes(expect)


@pytest.mark.asyncio
async def test_copy_eexist_keeps_existing_content(target):
    """COPY onto pages that are already mapped: no error, the old content stays; the
    missing pages of the same call get the new content."""
    n = 4
    [addr] = target.cmd("map", n * PAGE)
    target.cmd("fill", addr, PAGE, 1)  # pages 0 and 2 present, seed 1
    target.cmd("fill", addr + 2 * PAGE, PAGE, 1)
    u = target.open_uffd()
    target.cmd("register", addr, n * PAGE, int(Mode.MISSING))
    with u:
        new = pattern(addr, n * PAGE, 2)
        assert u.copy_nowait(addr, new) == n * PAGE
        assert u.copy_nowait(addr, new) == n * PAGE  # all EEXIST now: still no error
        assert u.zeropage_nowait(addr, n * PAGE) == n * PAGE  # EEXIST for zeropage too
        # every page is present now, so these commands do not fault
        assert target.cmd("check", addr, PAGE, 1) == [0]
        assert target.cmd("check", addr + PAGE, PAGE, 2) == [0]
        assert target.cmd("check", addr + 2 * PAGE, PAGE, 1) == [0]
        assert target.cmd("check", addr + 3 * PAGE, PAGE, 2) == [0]
        assert u.read_nowait() == []


# ---- UFFDIO_ZEROPAGE --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_zeropage(target):
    n = 8
    addr, u = managed(target, n)
    with u:

        @u.on_fault
        async def handler(batch):
            for page in batch.pages():
                assert await u.zeropage(page) == PAGE

        async with u.serving():
            # sum of the first byte of every page: zeros
            assert await target.acmd("touch", addr, n, 0, "-") == [0]
            # and every word differs from a pattern: the pages are all zeros
            assert await target.acmd("check", addr, n * PAGE, 3) == [n * PAGE // 8]
        st = u.statistics()
    assert read_target(target.pid, addr, n * PAGE) == zeros(n * PAGE)
    assert st["forwarded"] == n


# ---- UFFDIO_WRITEPROTECT ------------------------------------------------------------------


@pytest.mark.asyncio
@requires(Feature.PAGEFAULT_FLAG_WP)
async def test_writeprotect_many_ranges_in_one_call(target):
    n = 64
    addr, u = managed(target, n, Feature.PAGEFAULT_FLAG_WP, Mode.WP)
    target.cmd("fill", addr, n * PAGE, 4)  # WP-only registration: populating does not fault
    # every other page, plus a two-page range at the end, in ONE call
    ranges = [(addr + i * PAGE, PAGE) for i in range(0, n - 4, 2)]
    ranges.append((addr + (n - 2) * PAGE, 2 * PAGE))
    protected = {addr + i * PAGE for i in range(0, n - 4, 2)} | {
        addr + (n - 2) * PAGE,
        addr + (n - 1) * PAGE,
    }
    wp_faults = []
    with u:
        u.writeprotect_nowait(ranges, protect=True)

        @u.on_fault
        async def handler(batch):
            for f in batch:
                assert f.is_wp and f.is_write
                wp_faults.append(f.page)
                await u.writeprotect([(f.page, PAGE)], protect=False)

        async with u.serving():
            await target.acmd("touch", addr, n, 1, "-")  # write the first byte of every page
    assert sorted(wp_faults) == sorted(protected)
    # every write landed: exactly one changed word (the first) per page
    assert target.cmd("check", addr, n * PAGE, 4) == [n]


# ---- UFFDIO_CONTINUE ------------------------------------------------------------------------


@pytest.mark.asyncio
@requires(Feature.MINOR_SHMEM)
async def test_continue_on_minor_faults(target):
    n = 16
    [addr, alias] = target.cmd("shm", n * PAGE)
    u = target.open_uffd(Feature.MINOR_SHMEM)
    ioctls = target.cmd("register", addr, n * PAGE, int(Mode.MINOR))[0]
    assert ioctls & uffdio.Ioctl.CONTINUE
    # populate the page cache through the unregistered alias (no faults there)
    target.cmd("fill", alias, n * PAGE, 5)
    minor = []
    with u:

        @u.on_fault
        async def handler(batch):
            for f in batch:
                assert f.is_minor and not f.is_wp
                minor.append(f.page)
                assert await u.continue_(f.page) == PAGE

        async with u.serving():
            await target.acmd("touch", addr, n, 0, "-")
    assert sorted(minor) == [addr + i * PAGE for i in range(n)]
    # addr now maps the page cache written through the alias
    assert read_target(target.pid, addr, n * PAGE) == bytes(pattern(alias, n * PAGE, 5))
    assert target.cmd("check", alias, n * PAGE, 5) == [0]


# ---- UFFDIO_MOVE ------------------------------------------------------------------------------


@pytest.mark.asyncio
@requires(Feature.MOVE)
async def test_move_within_own_process():
    n = 4
    u = uffdio.Userfaultfd.open(Feature.MOVE)
    dst = lib.uf_mmap_anon(n * PAGE)
    src = lib.uf_mmap_anon(n * PAGE)
    assert dst and src
    try:
        with u:
            assert u.own_mm
            u.register(dst, n * PAGE)
            lib.uf_fill(src, n * PAGE, 6)  # populate the source (not registered)
            assert u.move_nowait(dst, src, n * PAGE) == n * PAGE
            # dst is present (no fault needed), src is now a hole
            [(s, e, cat)] = uffdio.pagemap_scan(
                "self",
                dst,
                dst + n * PAGE,
                category_mask=C.PAGE_IS_PRESENT,
                return_mask=C.PAGE_IS_PRESENT,
            )[0]
            assert (s, e, cat) == (dst, dst + n * PAGE, C.PAGE_IS_PRESENT)
            assert (
                uffdio.pagemap_scan("self", src, src + n * PAGE, category_mask=C.PAGE_IS_PRESENT)[0]
                == []
            )
            # Read back while a zero rule is served as a safety net: had the move not
            # installed the pages, the read would fault and get zeros instead of hanging.
            u.resolver.zero(dst, n * PAGE)
            async with u.serving(thread=True):
                # the engine's C thread would resolve a fault without needing the GIL
                got = bytes(ffi.buffer(ffi.cast("char *", dst), n * PAGE))
            assert u.statistics()["faults"] == 0
            assert got == bytes(pattern(src, n * PAGE, 6))  # the moved bytes (src's pattern)
    finally:
        lib.uf_munmap(dst, n * PAGE)
        lib.uf_munmap(src, n * PAGE)


@requires(Feature.MOVE)
def test_move_across_processes_is_a_clear_error(target):
    addr, u = managed(target, 1, Feature.MOVE)
    [src] = target.cmd("map", PAGE)
    target.cmd("fill", src, PAGE, 7)
    with u:
        with pytest.raises(uffdio.UffdError) as ei:
            u.move_nowait(addr, src, PAGE)
    assert isinstance(ei.value, uffdio.UffdRangeError)
    msg = str(ei.value)
    assert "UFFDIO_MOVE" in msg and "own process" in msg and "Fix" in msg
    # nothing moved: the source is intact (addr would fault: not checked)
    assert target.cmd("check", src, PAGE, 7) == [0]


@requires(Feature.MOVE)
def test_move_without_feature_negotiated_is_refused(target):
    addr, u = managed(target, 1)  # no Feature.MOVE
    with u:
        with pytest.raises(uffdio.UffdUnsupportedError, match="UFFDIO_MOVE.*Fix"):
            u.move_nowait(addr, addr + PAGE, PAGE)


# ---- UFFDIO_POISON ----------------------------------------------------------------------------


@pytest.mark.asyncio
@requires(Feature.POISON)
async def test_poison_kills_target_with_sigbus(target):
    addr, u = managed(target, 2, Feature.POISON)
    poisoned = []
    with u:

        @u.on_fault
        async def handler(batch):
            for page in batch.pages():
                poisoned.append(page)
                assert await u.poison(page) == PAGE

        async with u.serving():
            with pytest.raises(TargetError, match="exited"):
                await target.acmd("touch", addr, 1, 0, "-")
    assert poisoned == [addr]
    assert target.proc.wait() == -SIGBUS


# ---- UFFDIO_WAKE and raw messages --------------------------------------------------------------


@pytest.mark.asyncio
async def test_read_nowait_raw_messages_and_wake(target):
    """No engine: read the raw uffd_msg, resolve it with DONTWAKE, wake by hand."""
    addr, u = managed(target, 2)
    data = pattern(addr, PAGE, 8)
    with u:
        assert u.read_nowait() == []  # nothing pending: [] rather than an error
        # a read fault (touch reads the first byte, then writes it)
        job = asyncio.ensure_future(asyncio.to_thread(target.cmd, "touch", addr, 1, 1, "-"))
        try:
            msgs = await until(u.read_nowait, "the read fault message")
            assert len(msgs) == 1
            ev, flags, address, _tid = msgs[0]
            assert (ev, flags, address) == (uffdio.Event.PAGEFAULT, 0, addr)
            assert u.copy_nowait(addr, data, dontwake=True) == PAGE
            # resolved but still asleep (polled: see test_copy_dontwake_then_wake)
            await until(lambda: wchan(target.pid) == "handle_userfault", "the thread asleep")
            assert not job.done()
            u.wake(addr, PAGE)
            await asyncio.wait_for(job, 20)

            # a write fault (fill writes without reading first)
            job = asyncio.ensure_future(
                asyncio.to_thread(target.cmd, "fill", addr + PAGE, PAGE, 19)
            )
            msgs = await until(u.read_nowait, "the write fault message")
            ev, flags, address, _tid = msgs[0]
            assert (ev, flags, address) == (uffdio.Event.PAGEFAULT, FaultFlag.WRITE, addr + PAGE)
            assert u.zeropage_nowait(addr + PAGE) == PAGE  # wakes by default
            await asyncio.wait_for(job, 20)
        finally:
            if not job.done():
                target.close()  # unblock the worker thread: the test has failed anyway
        assert u.read_nowait() == []
    expect = bytearray(data)
    expect[0] = (expect[0] + 1) & 0xFF
    assert read_target(target.pid, addr, PAGE) == bytes(expect)
    assert target.cmd("check", addr + PAGE, PAGE, 19) == [0]


# ---- process_vm_readv / writev ------------------------------------------------------------------


def test_read_write_memory_more_than_iov_max_ranges(target):
    n = 1500  # > IOV_MAX (1024): the C side splits the batch
    [addr] = target.cmd("map", n * PAGE)
    target.cmd("fill", addr, n * PAGE, 9)
    ref = pattern(addr, n * PAGE, 9)
    # 64 bytes from each page, at an offset that varies from page to page
    ranges = [(addr + i * PAGE + 64 * (i % 60), 64) for i in range(n)]
    buf = bytearray(64 * n)
    assert uffdio.read_memory(target.pid, ranges, buf) == 64 * n
    for i, (a, ln) in enumerate(ranges):
        off = a - addr
        assert buf[64 * i : 64 * i + ln] == ref[off : off + ln], f"range {i}"
    # write a new pattern page by page: n ranges of one page
    new = pattern(addr, n * PAGE, 10)
    pages = [(addr + i * PAGE, PAGE) for i in range(n)]
    assert uffdio.write_memory(target.pid, pages, new) == n * PAGE
    assert target.cmd("check", addr, n * PAGE, 10) == [0]


# ---- process_madvise ----------------------------------------------------------------------------


def test_process_madvise_cold_on_another_process(target):
    n = 16
    [addr] = target.cmd("map", n * PAGE)
    target.cmd("fill", addr, n * PAGE, 15)
    pidfd = uffdio.pidfd_open(target.pid)
    try:
        ranges = [(addr + i * PAGE, PAGE) for i in range(0, n, 2)]
        assert uffdio.process_madvise(pidfd, ranges, MADV_COLD) == (n // 2) * PAGE
    finally:
        os.close(pidfd)
    assert target.cmd("check", addr, n * PAGE, 15) == [0]  # COLD keeps the data


def test_process_madvise_dontneed_on_another_process_is_refused(target):
    [addr] = target.cmd("map", PAGE)
    target.cmd("fill", addr, PAGE, 16)
    pidfd = uffdio.pidfd_open(target.pid)
    try:
        with pytest.raises(uffdio.UffdRangeError) as ei:
            uffdio.process_madvise(pidfd, [(addr, PAGE)], MADV_DONTNEED)
    finally:
        os.close(pidfd)
    assert "process_madvise" in str(ei.value) and "Fix" in str(ei.value)
    assert target.cmd("check", addr, PAGE, 16) == [0]  # nothing was zapped


def test_process_madvise_dontneed_error_says_why(target):
    [addr] = target.cmd("map", PAGE)
    pidfd = uffdio.pidfd_open(target.pid)
    try:
        with pytest.raises(uffdio.UffdError) as ei:
            uffdio.process_madvise(pidfd, [(addr, PAGE)], MADV_DONTNEED)
    finally:
        os.close(pidfd)
    msg = str(ei.value)
    assert "COLD" in msg or "another process" in msg, msg


# ---- pidfd_open / pidfd_getfd / SCM_RIGHTS -------------------------------------------------------


def uffd_fds(pid: int) -> list[int]:
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "userfaultfd" in os.readlink(f"/proc/{pid}/fd/{name}"):
                out.append(int(name))
        except FileNotFoundError:
            pass
    return sorted(out)


@pytest.mark.asyncio
async def test_from_pid_takes_the_targets_uffd(target):
    n = 8
    [addr] = target.cmd("map", n * PAGE)
    target.cmd("uffd", 0)  # the target opens a uffd (and sends it, unread, to the socket)
    [fd] = uffd_fds(target.pid)
    target.cmd("register", addr, n * PAGE, int(Mode.MISSING))
    # the low-level calls first
    pidfd = uffdio.pidfd_open(target.pid)
    try:
        dup = uffdio.pidfd_getfd(pidfd, fd)
        assert "userfaultfd" in os.readlink(f"/proc/self/fd/{dup}")
        os.close(dup)
    finally:
        os.close(pidfd)
    data = pattern(addr, n * PAGE, 17)
    with uffdio.Userfaultfd.from_pid(target.pid, fd) as u:
        assert not u.own_mm

        @u.on_fault
        async def handler(batch):
            for page in batch.pages():
                await u.copy(page, data[page - addr : page - addr + PAGE])

        async with u.serving():
            assert await target.acmd("check", addr, n * PAGE, 17) == [0]
        assert u.statistics()["forwarded"] == n


@pytest.mark.asyncio
async def test_receive_over_unix_socket(target):
    n = 4
    [addr] = target.cmd("map", n * PAGE)
    [feats] = target.cmd("uffd", int(Feature.THREAD_ID))
    assert feats & Feature.THREAD_ID
    u, data = uffdio.Userfaultfd.receive(target._sock, int(Feature.THREAD_ID))
    target.cmd("register", addr, n * PAGE, int(Mode.MISSING))
    assert data == feats.to_bytes(8, "little")  # the bytes sent with the fd arrive with it
    with u:
        u.resolver.buffer(addr, pattern(addr, n * PAGE, 18))

        async with u.serving():
            assert await target.acmd("check", addr, n * PAGE, 18) == [0]
        assert u.statistics()["resolved"] == n
    # and send works from this side too: a socketpair round trip keeps the fd usable
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, uffdio.Userfaultfd.open() as mine:
        mine.send(a, b"hello")
        got, payload = uffdio.Userfaultfd.receive(b)
        with got:
            assert payload == b"hello"
            assert "userfaultfd" in os.readlink(f"/proc/self/fd/{got.fileno()}")
            m = lib.uf_mmap_anon(PAGE)
            try:
                got.register(m, PAGE)  # the received fd is the same uffd (this process's mm)
                got.unregister(m, PAGE)
            finally:
                lib.uf_munmap(m, PAGE)


# ---- PAGEMAP_SCAN with WP_ASYNC ------------------------------------------------------------


@requires(Feature.WP_ASYNC | Feature.PAGEFAULT_FLAG_WP | Feature.WP_UNPOPULATED, kernel=(6, 7))
def test_pagemap_scan_reports_exactly_the_written_pages(target):
    n = 64
    feats = Feature.WP_ASYNC | Feature.PAGEFAULT_FLAG_WP | Feature.WP_UNPOPULATED
    addr, u = managed(target, n, feats, Mode.WP)
    end = addr + n * PAGE
    with u:
        u.writeprotect_nowait([(addr, n * PAGE)], protect=True)
        written = [0, 1, 2, 17, 40, 63]
        for i in written:
            target.cmd("touch", addr + i * PAGE, 1, 1, "-")  # no fault reaches anybody
        regions, walk_end = uffdio.pagemap_scan(
            target.pid,
            addr,
            end,
            category_mask=C.PAGE_IS_WRITTEN,
            return_mask=C.PAGE_IS_WRITTEN,
        )
        assert walk_end == end
        assert regions == [
            (addr, addr + 3 * PAGE, C.PAGE_IS_WRITTEN),
            (addr + 17 * PAGE, addr + 18 * PAGE, C.PAGE_IS_WRITTEN),
            (addr + 40 * PAGE, addr + 41 * PAGE, C.PAGE_IS_WRITTEN),
            (addr + 63 * PAGE, addr + 64 * PAGE, C.PAGE_IS_WRITTEN),
        ]
        # scan again and re-protect in the same call; then only new writes show
        uffdio.pagemap_scan(
            target.pid,
            addr,
            end,
            category_mask=C.PAGE_IS_WRITTEN,
            return_mask=C.PAGE_IS_WRITTEN,
            flags=C.PM_SCAN_WP_MATCHING | C.PM_SCAN_CHECK_WPASYNC,
        )
        assert uffdio.pagemap_scan(target.pid, addr, end, category_mask=C.PAGE_IS_WRITTEN)[0] == []
        target.cmd("touch", addr + 5 * PAGE, 1, 1, "-")
        regions, _ = uffdio.pagemap_scan(
            target.pid, addr, end, category_mask=C.PAGE_IS_WRITTEN, return_mask=C.PAGE_IS_WRITTEN
        )
        assert regions == [(addr + 5 * PAGE, addr + 6 * PAGE, C.PAGE_IS_WRITTEN)]
        assert u.read_nowait() == []  # WP_ASYNC: the kernel resolved every WP fault itself
    # content: the written bytes are there (first byte of each written page is 1)
    assert target.cmd("touch", addr, n, 0, "-") == [len(written) + 1]
