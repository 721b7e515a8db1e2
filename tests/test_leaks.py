"""Nothing leaks: fds, threads, mappings and memory stay flat over many create/close cycles
of a uffd and its engine, and a cancelled server leaves nothing in the kernel's hands."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PAGE, fd_count, managed, pattern, until

import uffdio
from uffdio._lib import ffi, lib

if sys.version_info < (3, 11):
    pass

MADV_DONTNEED = 4


def vm_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def counts() -> dict[str, int]:
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return {
        "fds": fd_count(),
        "threads": len(os.listdir("/proc/self/task")),
        "maps": maps,
    }


async def one_cycle(i: int, page: int, pool: ThreadPoolExecutor) -> None:
    """open; the engine (a rule creates it); every 4th cycle also register a page of this
    process and serve a real fault of it, in thread and inline mode by turns; close."""
    u = uffdio.Userfaultfd.open()
    try:
        u.resolver.zero(page, PAGE)
        if i % 4 == 0:
            u.register(page, PAGE)
            thread = i % 8 == 0
            async with u.serving(thread=thread):
                # inline mode resolves on this loop, so fault from a worker thread (one, kept
                # for the whole test: the thread count must only show the engine's threads);
                # the touch runs in C without the GIL in both modes
                touch = asyncio.get_running_loop().run_in_executor(
                    pool, lib.uf_touch, page, 1, PAGE, 0, ffi.NULL
                )
                assert await touch == 0
            st = u.statistics()
            assert st["resolved"] == 1 and st["thread"] == int(thread) and st["inflight"] == 0
    finally:
        u.close()  # closing the uffd unregisters the page
    if i % 4 == 0:
        assert lib.uf_madvise(page, PAGE, MADV_DONTNEED) == 0  # missing again


@pytest.mark.skipif(
    os.environ.get("UFFDIO_ASAN") == "1",
    reason="ASan's allocator quarantines freed memory, so RSS is no leak measure there",
)
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_thousand_open_close_cycles_leak_nothing():
    page = lib.uf_mmap_anon(PAGE)
    assert page
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        for i in range(40):  # warm up: the pool's thread, allocator arenas, imports
            await one_cycle(i, page, pool)
        before, rss0 = counts(), vm_rss_kib()
        for i in range(1000):
            await one_cycle(i, page, pool)
        after, rss1 = counts(), vm_rss_kib()
    finally:
        pool.shutdown()
        lib.uf_munmap(page, PAGE)
    assert after["fds"] == before["fds"], (before, after)
    assert after["threads"] == before["threads"], (before, after)
    # one leaked ring or buffer-ring mapping per cycle would add hundreds
    assert after["maps"] <= before["maps"] + 8, (before, after)
    assert rss1 - rss0 < 4 * 1024, f"VmRSS grew by {rss1 - rss0} KiB over 1000 cycles"


# ---- cancelling a serving task -----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("thread", [True, False], ids=["thread", "inline"])
async def test_cancel_with_python_handler_pending(target, thread):
    """The server is cancelled while a coroutine handler holds a fault: the ring's read is
    cancelled and completed, the faulting thread is woken to fault again, and the next
    server resolves it with the right data."""
    n = 4
    addr, u = managed(target, n)
    data = pattern(addr, n * PAGE, 31)
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()
    with u:

        @u.on_fault
        async def stuck(batch):
            entered.set()
            await asyncio.Event().wait()  # never resolves

        job = loop.run_in_executor(None, target.cmd, "check", addr, n * PAGE, 31)
        try:
            server = asyncio.ensure_future(u.serve(thread=thread))
            await asyncio.wait_for(entered.wait(), 20)
            assert u.statistics()["inflight"] >= 1  # the armed read
            server.cancel()
            with pytest.raises(asyncio.CancelledError):
                await server
            st = u.statistics()
            assert st["inflight"] == 0 and st["deferred_now"] == 0
            assert st["thread"] == int(thread)
            assert not job.done()

            @u.on_fault
            async def handler(batch):
                for page in batch.pages():
                    await u.copy(page, data[page - addr : page - addr + PAGE])

            async with u.serving(thread=thread):
                assert await asyncio.wait_for(job, 20) == [0]
            assert u.statistics()["inflight"] == 0
        finally:
            if not job.done():
                target.close()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("thread", [True, False], ids=["thread", "inline"])
async def test_cancel_with_file_read_in_flight(target, thread):
    """A resolver file rule reads from a pipe that never delivers: the read stays in the
    kernel's hands until the server is cancelled; cancellation must complete it before
    returning (inflight == 0) and wake the faulting thread."""
    n = 4
    addr, u = managed(target, n)
    r, w = os.pipe()
    loop = asyncio.get_running_loop()
    with u:
        u.resolver.file(addr, n * PAGE, r)
        job = loop.run_in_executor(None, target.cmd, "check", addr, n * PAGE, 32)
        try:
            server = asyncio.ensure_future(u.serve(thread=thread))
            await until(lambda: u.statistics().get("file_reads", 0) >= 1, "the file read")
            st = u.statistics()
            assert st["inflight"] >= 2 and st["resolved"] == 0  # the read of the uffd + the pipe
            server.cancel()
            with pytest.raises(asyncio.CancelledError):
                await server
            st = u.statistics()
            assert st["inflight"] == 0 and st["deferred_now"] == 0
            assert st["resolved"] == 0 and not job.done()

            u.resolver.buffer(addr, pattern(addr, n * PAGE, 32), replace=True)
            async with u.serving(thread=thread):
                assert await asyncio.wait_for(job, 20) == [0]
            st = u.statistics()
            assert st["inflight"] == 0 and st["resolved"] == n
        finally:
            if not job.done():
                target.close()
            os.close(r)
            os.close(w)


# ---- records taken with the batch that did not finish --------------------------------------------


def thread_wchan(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/wchan") as f:
        return f.read()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["cancel", "unhandled"])
async def test_serve_ending_mid_take_loses_no_record(how):
    """Faults of this process's memory raised by GIL-free C threads; the engine runs inline,
    so it only processes what the kernel delivered when the loop gets to poll it.  The loop
    is held while fault A, a REMOVE event (madvise DONTNEED) and fault B arrive, so all three
    reach Python in one take.  The server then ends inside A's batch (cancelled while A's
    handler waits, or no handler at all).  B's thread and the REMOVE event must not be lost."""
    u = uffdio.Userfaultfd.open(uffdio.Feature.EVENT_REMOVE)
    m = lib.uf_mmap_anon(4 * PAGE)
    a, b, c = m, m + PAGE, m + 2 * PAGE
    pool = ThreadPoolExecutor(max_workers=3)
    tids: dict[str, int] = {}

    def run(name, fn, *args):
        tids[name] = threading.get_native_id()
        return fn(*args)

    def wait_asleep(name: str) -> None:  # blocks the loop on purpose (bounded)
        deadline = time.monotonic() + 10
        while not (name in tids and thread_wchan(tids[name]) == "handle_userfault"):
            assert time.monotonic() < deadline, f"thread {name} never faulted"
            time.sleep(0.0005)

    removes = []
    try:
        u.register(m, 4 * PAGE)

        @u.on_event(uffdio.Event.REMOVE)
        async def on_remove(ev):
            removes.append((ev.start, ev.end))

        entered = asyncio.Event()
        if how == "cancel":

            @u.on_fault
            async def stuck(batch):
                entered.set()
                await asyncio.Event().wait()

        server = asyncio.ensure_future(u.serve(thread=False))
        await asyncio.sleep(0)  # the server is waiting for the ring now
        # from here until the next await the loop does not run: the engine cannot poll
        ja = pool.submit(run, "A", lib.uf_touch, a, 1, PAGE, 0, ffi.NULL)
        wait_asleep("A")
        jc = pool.submit(run, "C", lib.uf_madvise, c, PAGE, MADV_DONTNEED)
        assert jc.result(timeout=10) == 0  # its REMOVE event was read into the ring
        jb = pool.submit(run, "B", lib.uf_touch, b, 1, PAGE, 0, ffi.NULL)
        wait_asleep("B")
        if how == "cancel":
            await asyncio.wait_for(entered.wait(), 10)
            server.cancel()
        with pytest.raises(BaseException) as ei:
            await server
        if how == "unhandled":
            assert isinstance(ei.value, uffdio.UnhandledFault), repr(ei.value)
        assert u.statistics()["inflight"] == 0

        @u.on_fault
        async def handler(batch):
            for page in batch.pages():
                await u.zeropage(page)

        async with u.serving(thread=False):
            assert await asyncio.wait_for(asyncio.wrap_future(ja), 10) == 0
            try:
                assert await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(jb)), 3) == 0
            except asyncio.TimeoutError:
                raise AssertionError(
                    f"fault B was dropped: its thread still sleeps in {thread_wchan(tids['B'])}"
                ) from None
        assert removes == [(c, c + PAGE)], "the REMOVE event never reached its handler"
    finally:
        if not server.done():
            server.cancel()
        if not u.closed and not u._serving:
            u.close()  # releases any thread still waiting on the uffd
        pool.shutdown(wait=True)
        lib.uf_munmap(m, 4 * PAGE)
