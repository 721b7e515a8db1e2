"""Bad input raises the documented exception, names the operation and says how to fix it,
and never hangs.  Real uffds, real target processes; nothing is mocked."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys

import pytest
from conftest import PAGE, fd_count, managed, pattern

import uffdio
from uffdio import Feature, Mode
from uffdio._lib import ffi, lib

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.timeout(60)


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaves(e)]
    return [exc]


def assert_clear(exc: BaseException, cls: type, op: str) -> None:
    assert isinstance(exc, cls), f"{type(exc).__name__} is not {cls.__name__}: {exc}"
    msg = str(exc)
    assert op in msg, f"{op!r} not named in: {msg}"
    assert "Fix" in msg, f"no 'Fix' in: {msg}"
    assert exc.op.startswith(op.split(" ")[0]) and exc.fix


@pytest.fixture
def own():
    """A uffd of this process and a mapped, registered 4-page range (never touched)."""
    u = uffdio.Userfaultfd.open(optional=Feature.MOVE | Feature.POISON)
    m = lib.uf_mmap_anon(8 * PAGE)
    assert m
    u.register(m, 4 * PAGE)
    try:
        yield u, m
    finally:
        u.close()
        lib.uf_munmap(m, 8 * PAGE)


# ---- ranges ------------------------------------------------------------------------------------

# (operation, expected op name, call(u, start, length))
OPS = [
    ("register", "UFFDIO_REGISTER", lambda u, s, n: u.register(s, n)),
    ("unregister", "UFFDIO_UNREGISTER", lambda u, s, n: u.unregister(s, n)),
    ("copy", "UFFDIO_COPY", lambda u, s, n: u.copy_nowait(s, bytes(PAGE * 2), n)),
    ("zeropage", "UFFDIO_ZEROPAGE", lambda u, s, n: u.zeropage_nowait(s, n)),
    ("writeprotect", "UFFDIO_WRITEPROTECT", lambda u, s, n: u.writeprotect_nowait([(s, n)])),
    ("continue", "UFFDIO_CONTINUE", lambda u, s, n: u.continue_nowait(s, n)),
    ("move", "UFFDIO_MOVE", lambda u, s, n: u.move_nowait(s, s + 4 * PAGE, n)),
    ("poison", "UFFDIO_POISON", lambda u, s, n: u.poison_nowait(s, n)),
    ("wake", "UFFDIO_WAKE", lambda u, s, n: u.wake(s, n)),
    ("resolver.zero", "resolver.zero", lambda u, s, n: u.resolver.zero(s, n)),
    ("resolver.remove", "resolver.remove", lambda u, s, n: u.resolver.remove(s, n)),
]
BAD = [
    ("unaligned-start", 1, PAGE),
    ("unaligned-length", 0, PAGE + 8),
    ("zero-length", 0, 0),
    ("negative-length", 0, -PAGE),
]


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("op", OPS, ids=[o[0] for o in OPS])
def test_bad_range(own, op, bad):
    u, m = own
    _, name, call = op
    _, delta, length = bad
    with pytest.raises(uffdio.UffdRangeError) as ei:
        call(u, m + delta, length)
    assert_clear(ei.value, uffdio.UffdRangeError, name)
    assert ei.value.errno == errno.EINVAL


@pytest.mark.asyncio
async def test_bad_range_async_methods_fail_at_once(own):
    """The async forms retry only EAGAIN: a bad range raises, it is not retried."""
    u, m = own
    for coro, name in [
        (u.copy(m + 1, bytes(PAGE)), "UFFDIO_COPY"),
        (u.zeropage(m, 0), "UFFDIO_ZEROPAGE"),
        (u.writeprotect([(m, -PAGE)]), "UFFDIO_WRITEPROTECT"),
        (u.continue_(m + 8), "UFFDIO_CONTINUE"),
        (u.poison(m, PAGE + 1), "UFFDIO_POISON"),
    ]:
        with pytest.raises(uffdio.UffdRangeError) as ei:
            await asyncio.wait_for(coro, 5)
        assert_clear(ei.value, uffdio.UffdRangeError, name)
    assert u.statistics()["eagain_retries"] == 0


def test_copy_source_shorter_than_range(own):
    u, m = own
    with pytest.raises(uffdio.UffdRangeError) as ei:
        u.copy_nowait(m, bytes(100), PAGE)
    assert_clear(ei.value, uffdio.UffdRangeError, "UFFDIO_COPY")


def test_kernel_rejections_are_named(target):
    """Errors that only the kernel can see, on a target's uffd: each names the ioctl."""
    addr, u = managed(target, 2)  # MISSING only
    [plain] = target.cmd("map", PAGE)  # mapped, not registered
    with u:
        with pytest.raises(uffdio.UffdMappingChanged) as ei:
            u.copy_nowait(plain, bytes(PAGE))
        assert_clear(ei.value, uffdio.UffdMappingChanged, "UFFDIO_COPY")
        with pytest.raises(uffdio.UffdError) as ei:
            u.writeprotect_nowait([(addr, PAGE)])  # not registered for WP
        assert_clear(ei.value, uffdio.UffdError, "UFFDIO_WRITEPROTECT")
        with pytest.raises(uffdio.UffdRangeError) as ei:
            u.continue_nowait(addr)  # not registered MINOR
        assert_clear(ei.value, uffdio.UffdRangeError, "UFFDIO_CONTINUE")
        with pytest.raises(uffdio.UffdRangeError) as ei:
            u.register(plain, PAGE, Mode.MINOR)  # MINOR on private anonymous memory
        assert_clear(ei.value, uffdio.UffdRangeError, "UFFDIO_REGISTER")
        with pytest.raises(uffdio.UffdUnsupportedError) as ei:
            u.poison_nowait(addr)  # POISON not negotiated
        assert_clear(ei.value, uffdio.UffdUnsupportedError, "UFFDIO_POISON")
        assert u.read_nowait() == []
    # nothing above wrote to the target
    target.cmd("fill", plain, PAGE, 1)
    assert target.cmd("check", plain, PAGE, 1) == [0]


# ---- registration ------------------------------------------------------------------------------


def test_register_foreign_range_on_targets_uffd(target):
    """The target's uffd registers in the target's mm: an address that is not mapped there
    (it was, and was unmapped) is refused."""
    addr, u = managed(target, 1)
    [gone] = target.cmd("map", 2 * PAGE)
    target.cmd("munmap", gone, 2 * PAGE)
    with u:
        with pytest.raises(uffdio.UffdRangeError) as ei:
            u.register(gone, 2 * PAGE)
        assert_clear(ei.value, uffdio.UffdRangeError, "UFFDIO_REGISTER")


def test_register_unmapped_range_without_dontfork():
    u = uffdio.Userfaultfd.open()
    m = lib.uf_mmap_anon(2 * PAGE)
    lib.uf_munmap(m, 2 * PAGE)  # unmapped in this process
    with u:
        u.dontfork_without_event_fork = False
        with pytest.raises(uffdio.UffdRangeError) as ei:
            u.register(m, 2 * PAGE)
        assert_clear(ei.value, uffdio.UffdRangeError, "UFFDIO_REGISTER")


def test_register_unmapped_range_on_own_uffd():
    u = uffdio.Userfaultfd.open()
    m = lib.uf_mmap_anon(2 * PAGE)
    lib.uf_munmap(m, 2 * PAGE)  # unmapped in this process
    with u:
        with pytest.raises(uffdio.UffdRangeError) as ei:
            u.register(m, 2 * PAGE)
        assert_clear(ei.value, uffdio.UffdRangeError, "UFFDIO_REGISTER")


def test_same_range_on_a_second_uffd_is_busy(target):
    addr, u1 = managed(target, 4)
    u2 = target.open_uffd()  # a second uffd of the same process
    with u1, u2:
        with pytest.raises(uffdio.UffdBusyError) as ei:
            u2.register(addr + PAGE, 2 * PAGE)  # overlaps u1's registration
        assert_clear(ei.value, uffdio.UffdBusyError, "UFFDIO_REGISTER")
        assert ei.value.errno == errno.EBUSY


# ---- the resolver ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_overlapping_rules_need_replace(target):
    n = 6
    addr, u = managed(target, n)
    with u, open("/dev/null", "rb") as devnull:
        u.resolver.zero(addr, n * PAGE)
        for call in (
            lambda: u.resolver.zero(addr + PAGE, PAGE),
            lambda: u.resolver.buffer(addr + 5 * PAGE, bytes(2 * PAGE)),
            lambda: u.resolver.file(addr, PAGE, devnull),
        ):
            with pytest.raises(uffdio.UffdRangeError) as ei:
                call()
            assert_clear(ei.value, uffdio.UffdRangeError, "resolver.")
            assert "replace=True" in str(ei.value)
        assert len(u.resolver) == 1
        # replace=True punches the old rule: pages 1-2 from the buffer, the rest zero
        mid = pattern(addr + PAGE, 2 * PAGE, 21)
        u.resolver.buffer(addr + PAGE, mid, replace=True)
        assert len(u.resolver) == 3
        async with u.serving():
            assert await target.acmd("check", addr + PAGE, 2 * PAGE, 21) == [0]
            assert await target.acmd("touch", addr, n, 0, "-") == [mid[0] + mid[PAGE]]
        st = u.statistics()
    assert st["resolved"] == n and st["forwarded"] == 0


def test_buffer_source_inside_own_registered_range(own):
    u, m = own
    # a buffer object over registered (missing) memory: never touched, only its address used
    inside = ffi.buffer(ffi.cast("char *", m + PAGE), 2 * PAGE)
    with pytest.raises(uffdio.UffdRangeError) as ei:
        u.resolver.buffer(m + 4 * PAGE, inside)
    assert_clear(ei.value, uffdio.UffdRangeError, "resolver.buffer")
    assert "registered" in str(ei.value)
    assert len(u.resolver) == 0


def test_rule_with_bad_chunk_and_bad_file(own):
    u, m = own
    u.resolver.zero(m, PAGE)
    with pytest.raises(uffdio.UffdRangeError) as ei:
        u.resolver.buffer(m + PAGE, bytes(PAGE), chunk_pages=0)
    assert_clear(ei.value, uffdio.UffdRangeError, "resolver.buffer")
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    with pytest.raises(uffdio.UffdClosedError) as ei:
        u.resolver.file(m + 2 * PAGE, PAGE, fd)
    assert_clear(ei.value, uffdio.UffdClosedError, "resolver.file")
    with pytest.raises(uffdio.UffdRangeError) as ei:
        u.resolver.file(m + 2 * PAGE, PAGE, 0, offset=100)
    assert_clear(ei.value, uffdio.UffdRangeError, "resolver.file")
    assert len(u.resolver) == 1


# ---- closed, gone, unsupported -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_closed_userfaultfd():
    u = uffdio.Userfaultfd.open()
    m = lib.uf_mmap_anon(PAGE)
    try:
        u.close()
        u.close()  # idempotent
        assert u.closed
        calls = [
            lambda: u.fileno(),
            lambda: u.register(m, PAGE),
            lambda: u.copy_nowait(m, bytes(PAGE)),
            lambda: u.zeropage_nowait(m),
            lambda: u.writeprotect_nowait([(m, PAGE)]),
            lambda: u.wake(m),
            lambda: u.read_nowait(),
            lambda: u.resolver.zero(m, PAGE),
            lambda: u.send(0),
        ]
        for call in calls:
            with pytest.raises(uffdio.UffdClosedError) as ei:
                call()
            assert_clear(ei.value, uffdio.UffdClosedError, "userfaultfd")
            assert "closed" in str(ei.value)
        with pytest.raises(uffdio.UffdClosedError):
            await asyncio.wait_for(u.serve(), 5)
        with pytest.raises(uffdio.UffdClosedError):
            await asyncio.wait_for(u.copy(m, bytes(PAGE)), 5)
    finally:
        lib.uf_munmap(m, PAGE)


def test_from_pid_of_a_dead_process():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid names nothing
    with pytest.raises(uffdio.UffdProcessGone) as ei:
        uffdio.Userfaultfd.from_pid(p.pid, 0)
    assert_clear(ei.value, uffdio.UffdProcessGone, "pidfd_open")
    assert isinstance(ei.value, ProcessLookupError)


def test_from_pid_of_a_zombie():
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-c", "import os; os.close(1)"], stdout=w)
    os.close(w)
    os.read(r, 1)  # EOF: the child closed its stdout; wait until it has exited, unreaped
    os.close(r)
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    try:
        n = fd_count()
        with pytest.raises(uffdio.UffdProcessGone) as ei:
            uffdio.Userfaultfd.from_pid(p.pid, 0)
        assert_clear(ei.value, uffdio.UffdProcessGone, "pidfd_getfd")
        assert fd_count() == n  # the pidfd was closed
    finally:
        p.wait()


def test_from_pid_of_a_closed_fd(target):
    with pytest.raises(uffdio.UffdClosedError) as ei:
        uffdio.Userfaultfd.from_pid(target.pid, 987)
    assert_clear(ei.value, uffdio.UffdClosedError, "pidfd_getfd")


def test_from_pid_of_a_fd_that_is_not_a_uffd(target):
    [addr] = target.cmd("map", PAGE)
    try:
        u = uffdio.Userfaultfd.from_pid(target.pid, 0)  # the target's stdin: a pipe
    except uffdio.UffdError as exc:
        assert "userfaultfd" in str(exc)
        return
    with u:
        with pytest.raises(uffdio.UffdError) as ei:
            u.register(addr, PAGE)
        assert "not a userfaultfd" in str(ei.value), str(ei.value)


def test_feature_the_kernel_lacks():
    n = fd_count()
    with pytest.raises(uffdio.UffdUnsupportedError) as ei:
        uffdio.Userfaultfd.open(1 << 40)
    assert_clear(ei.value, uffdio.UffdUnsupportedError, "UFFDIO_API")
    assert fd_count() == n  # the uffd opened for the attempt was closed
    # an optional feature the kernel lacks is just left out
    with uffdio.Userfaultfd.open(optional=1 << 40) as u:
        assert not int(u.features) & (1 << 40)


# ---- a fault with no handler -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_unhandled_fault_raises_and_loses_nothing(target):
    n = 4
    addr, u = managed(target, n)
    data = pattern(addr, n * PAGE, 22)
    loop = asyncio.get_running_loop()
    with u:
        # the target's check runs in a plain executor thread, outside any task group
        job = loop.run_in_executor(None, target.cmd, "check", addr, n * PAGE, 22)
        try:
            with pytest.raises(BaseException) as ei:
                await asyncio.wait_for(u.serve(), 20)
            [exc] = leaves(ei.value)
            assert isinstance(exc, uffdio.UnhandledFault), repr(ei.value)
            assert "handler" in str(exc) and f"{addr:#x}" in str(exc)
            assert u.statistics()["inflight"] == 0
            assert not job.done()  # the target waits; it did not read anything wrong

            with pytest.raises(BaseException) as ei:  # serving() reports it the same way
                async with u.serving():
                    await asyncio.wait_for(asyncio.shield(job), 20)
            assert [type(e) for e in leaves(ei.value)] == [uffdio.UnhandledFault]

            @u.on_fault
            async def handler(batch):
                for page in batch.pages():
                    await u.copy(page, data[page - addr : page - addr + PAGE])

            async with u.serving():
                assert await asyncio.wait_for(job, 20) == [0]
        finally:
            if not job.done():
                target.close()


@pytest.mark.asyncio
async def test_serve_raises_unhandled_fault_itself(target):
    addr, u = managed(target, 1)
    loop = asyncio.get_running_loop()
    with u:
        job = loop.run_in_executor(None, target.cmd, "touch", addr, 1, 0, "-")
        try:
            with pytest.raises(uffdio.UnhandledFault):
                await asyncio.wait_for(u.serve(), 20)
        finally:
            # a handler, not a rule: a record already queued for Python is not re-checked
            # against rules added later
            @u.on_fault
            async def handler(batch):
                for page in batch.pages():
                    await u.zeropage(page)

            try:
                async with u.serving():
                    assert await asyncio.wait_for(asyncio.shield(job), 20) == [0]
            finally:
                if not job.done():
                    target.close()
