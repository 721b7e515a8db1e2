"""Many faults at once: dozens of target threads faulting together, a storm of 100k faults,
several fault messages for ONE page (EEXIST), and EAGAIN while an event is pending.  Every
byte is checked in the target; the engine's counters must add up."""

from __future__ import annotations

import functools
import os
import select
import threading

import anyio
import pytest
from conftest import MODES, PAGE, acmd, managed, pattern, requires, until

import uffdio
from uffdio import Event

MADV_DONTNEED = 4

pytestmark = pytest.mark.timeout(120)


# ---- helpers --------------------------------------------------------------------------------


def wchan(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def tasks_in_userfault(pid: int) -> int:
    """Threads of ``pid`` asleep in handle_userfault (each has queued a fault message)."""
    return sum(wchan(pid, int(t)) == "handle_userfault" for t in os.listdir(f"/proc/{pid}/task"))


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def check_counters(st: dict[str, int]) -> None:
    """What must hold of a finished, error-free run."""
    assert st["errors"] == 0, st
    assert st["faults"] == st["resolved"] + st["forwarded"], st
    assert st["msgs"] == st["faults"] + st["events"], st
    assert st["faults_py"] == st["forwarded"], st
    assert st["events_py"] == st["events"], st
    assert st["inflight"] == 0 and st["deferred_now"] == 0, st
    assert 1 <= st["batches"] <= st["msgs"], st
    assert st["batches_py"] <= st["faults_py"], st


def copy_handler(u: uffdio.Userfaultfd, addr: int, data, seen: list[int] | None = None):
    view = memoryview(data)

    async def handler(batch):
        for page in batch.pages():
            if seen is not None:
                seen.append(page)
            off = page - addr
            await u.copy(page, view[off : off + PAGE])

    return handler


# ---- many threads ---------------------------------------------------------------------------


@MODES
@pytest.mark.parametrize("how", ["resolver", "coroutine"])
@pytest.mark.parametrize("nthreads", [16, 64])
@pytest.mark.asyncio
async def test_many_threads_fault_at_once(target, thread, how, nthreads):
    """``nthreads`` target threads check interleaved pages of a 2048-page range at once
    (thread k takes pages k, k+N, ...): every page faults exactly once and every word of
    every page is right."""
    n, seed = 2048, 41
    addr, u = managed(target, n)
    data = pattern(addr, n * PAGE, seed)
    seen: list[int] = []
    with u:
        if how == "resolver":
            u.resolver.buffer(addr, data)
        else:
            u.on_fault(copy_handler(u, addr, data, seen))
        with anyio.fail_after(60):
            async with u.serving(thread=thread):
                assert await acmd(target, "threads", addr, n * PAGE, seed, nthreads) == [0]
        st = u.statistics()
    check_counters(st)
    assert st["thread"] == int(thread)
    assert st["faults"] == n  # one message per page: the pages of the threads are disjoint
    if how == "resolver":
        assert st["resolved"] == n and st["forwarded"] == 0 and seen == []
    else:
        assert st["forwarded"] == n and st["resolved"] == 0
        assert sorted(seen) == [addr + i * PAGE for i in range(n)]


# ---- the storm ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "how,thread",
    [("resolver", True), ("coroutine", False)],
    ids=["resolver-thread", "coroutine-inline"],
)
@pytest.mark.asyncio
async def test_fault_storm_100k_pages(target, how, thread):
    """100k pages (400 MiB of virtual memory) faulted by 8 target threads at once, served by
    a C buffer rule on the engine thread and by a coroutine inline; every word checked."""
    n, seed, nthreads = 100_000, 43, 8
    addr, u = managed(target, n)
    data = pattern(addr, n * PAGE, seed)
    with u:
        if how == "resolver":
            u.resolver.buffer(addr, data)
        else:
            u.on_fault(copy_handler(u, addr, data))
        with anyio.fail_after(240):
            async with u.serving(thread=thread):
                assert await acmd(target, "threads", addr, n * PAGE, seed, nthreads) == [0]
        st = u.statistics()
    check_counters(st)
    assert st["faults"] == n
    assert (st["resolved"], st["forwarded"]) == ((n, 0) if how == "resolver" else (0, n))


# ---- several messages for one page: EEXIST --------------------------------------------------


def start_faulters(tg, target, addr: int, nreaders: int, results: list):
    """Fault one page from the target's own thread (touch) and from ``nreaders`` threads of
    this process reading it with process_vm_readv (remote faults): 1 + nreaders messages
    for the same page."""
    bufs = [bytearray(PAGE) for _ in range(nreaders)]
    tids: list[int] = []

    def remote_read(buf) -> int:
        tids.append(threading.get_native_id())
        return uffdio.read_memory(target.pid, [(addr, PAGE)], buf)

    async def touch():
        results.append(("touch", await acmd(target, "touch", addr, 1, 0, "-")))

    async def read(buf):
        n = await anyio.to_thread.run_sync(remote_read, buf, abandon_on_cancel=True)
        results.append(("read", n))

    tg.start_soon(touch)
    for b in bufs:
        tg.start_soon(read, b)
    return bufs, tids


async def wait_all_faulted(target, tids: list[int], nreaders: int) -> None:
    def asleep() -> bool:
        if tasks_in_userfault(target.pid) != 1 or len(tids) != nreaders:
            return False
        return all(wchan(os.getpid(), t) == "handle_userfault" for t in tids)

    await until(asleep, "all faulting threads asleep in handle_userfault")


@requires(root=True)
@pytest.mark.asyncio
async def test_eexist_duplicate_messages_by_hand(target):
    """Not served: four threads fault on one page; all four messages are read by hand (all
    for the same page).  The first UFFDIO_COPY maps the page; the next three hit EEXIST,
    which copy_nowait counts as done (and wakes) instead of raising."""
    nreaders = 3
    addr, u = managed(target, 1)
    data = pattern(addr, PAGE, 47)
    results: list = []
    with u, anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            bufs, tids = start_faulters(tg, target, addr, nreaders, results)
            await wait_all_faulted(target, tids, nreaders)
            msgs: list = []
            await until(lambda: msgs.extend(u.read_nowait()) or len(msgs) >= 4, "4 messages")
            assert len(msgs) == 4
            assert all(ev == Event.PAGEFAULT and b & ~(PAGE - 1) == addr for ev, _, b, _ in msgs)
            for _ in msgs:
                assert u.copy_nowait(addr, data) == PAGE
        assert u.read_nowait() == []
    assert sorted(results) == [("read", PAGE)] * nreaders + [("touch", [data[0]])]
    assert all(b == data for b in bufs)


@requires(root=True)
@MODES
@pytest.mark.parametrize("how", ["resolver", "coroutine"])
@pytest.mark.asyncio
async def test_eexist_duplicate_messages_served(target, thread, how):
    """Four fault messages for one page are queued before serving starts; the engine (C rule)
    or a coroutine that copies once per MESSAGE resolves the first and meets EEXIST for the
    other three: no error, every faulting thread continues with the right data."""
    nreaders = 3
    addr, u = managed(target, 1)
    data = pattern(addr, PAGE, 53)
    results: list = []
    copies: list[int] = []
    with u:
        if how == "resolver":
            u.resolver.buffer(addr, data)
        else:

            @u.on_fault
            async def per_message(batch):
                for f in batch:  # no de-duplication on purpose
                    copies.append(await u.copy(f.page, data))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                bufs, tids = start_faulters(tg, target, addr, nreaders, results)
                await wait_all_faulted(target, tids, nreaders)
                async with u.serving(thread=thread):
                    await until(lambda: len(results) == 1 + nreaders, "every faulter")
        st = u.statistics()
    assert sorted(results) == [("read", PAGE)] * nreaders + [("touch", [data[0]])]
    assert all(b == data for b in bufs)
    check_counters(st)
    assert st["faults"] == 4
    if how == "resolver":
        assert st["resolved"] == 4
    else:
        assert st["forwarded"] == 4 and copies == [PAGE] * 4


@requires(root=True)
@pytest.mark.asyncio
async def test_eexist_is_counted(target):
    nreaders = 3
    addr, u = managed(target, 1)
    data = pattern(addr, PAGE, 59)
    results: list = []
    with u:
        u.resolver.buffer(addr, data)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                bufs, tids = start_faulters(tg, target, addr, nreaders, results)
                await wait_all_faulted(target, tids, nreaders)
                async with u.serving(thread=True):
                    await until(lambda: len(results) == 1 + nreaders, "every faulter")
        st = u.statistics()
    assert all(b == data for b in bufs)
    assert st["faults"] == 4 and st["resolved"] == 4
    assert st["eexist"] == 3, st


# ---- EAGAIN: an event is pending ------------------------------------------------------------


@requires(uffdio.Feature.EVENT_REMOVE)
@pytest.mark.asyncio
async def test_eagain_while_event_pending(target):
    """Not served.  The target madvise(DONTNEED)s half of a registered range in the
    background; the REMOVE event stays unread, so UFFDIO_COPY answers EAGAIN: copy_nowait
    raises UffdWouldBlock, zeropage_nowait too, and ``await copy()`` keeps retrying.  Once
    the event is read by hand (read_nowait) the madvise returns and the retrying copy
    succeeds; the page holds the data."""
    n = 8
    [addr] = target.cmd("map", n * PAGE)
    u = target.open_uffd(int(uffdio.Feature.EVENT_REMOVE))
    target.cmd("register", addr, n * PAGE, int(uffdio.Mode.MISSING))
    data = pattern(addr, PAGE, 61)
    half = addr + n // 2 * PAGE
    madv: list = []
    copied: list[int] = []
    with u, anyio.fail_after(30):
        async with anyio.create_task_group() as tg:

            async def madvise():
                madv.append(await acmd(target, "madvise", half, n // 2 * PAGE, MADV_DONTNEED))

            async def retrying_copy():
                copied.append(await u.copy(addr, data))

            tg.start_soon(madvise)
            await until(lambda: readable(u.fileno()), "the REMOVE event")
            with pytest.raises(uffdio.UffdWouldBlock) as ei:
                u.copy_nowait(addr, data)
            assert ei.value.errno == 11 and isinstance(ei.value, BlockingIOError)
            with pytest.raises(uffdio.UffdWouldBlock):
                u.zeropage_nowait(addr + PAGE)
            tg.start_soon(retrying_copy)
            await until(lambda: u.statistics()["eagain_retries"] >= 2, "copy() retrying")
            assert copied == [] and madv == []
            assert u.read_nowait() == [(Event.REMOVE, half, addr + n * PAGE, 0)]
        assert madv == [[0]] and copied == [PAGE]
        assert u.read_nowait() == []
        buf = bytearray(PAGE)
        assert uffdio.read_memory(target.pid, [(addr, PAGE)], buf) == PAGE  # present now
        assert buf == data


# ---- faults racing with events: EAGAIN inside the engine ------------------------------------


@requires(uffdio.Feature.EVENT_REMOVE, root=True)
@MODES
@pytest.mark.asyncio
async def test_faults_while_events_stream(target, thread):
    """Four threads of this process fault the target's pages (remote reads, page by page)
    while the target keeps discarding another part of the range (200 x madvise DONTNEED:
    a REMOVE event each).  Fills that meet a pending event get EAGAIN and are deferred and
    retried by the engine; none is lost and every page read holds its data."""
    n, nreaders, seed = 512, 4, 67
    busy = 16
    addr, u = managed(target, n + busy, int(uffdio.Feature.EVENT_REMOVE))
    data = pattern(addr, n * PAGE, seed)
    zone = addr + n * PAGE
    bufs = [bytearray(n // nreaders * PAGE) for _ in range(nreaders)]
    removes: list = []
    with u:
        u.resolver.buffer(addr, data)
        u.resolver.zero(zone, busy * PAGE)

        @u.on_event(Event.REMOVE)
        async def on_remove(ev):
            removes.append(ev.start)

        def reader(k: int) -> None:
            buf = memoryview(bufs[k])
            for i in range(k, n, nreaders):  # interleaved, like the target's threads
                j = i // nreaders
                got = uffdio.read_memory(
                    target.pid, [(addr + i * PAGE, PAGE)], buf[j * PAGE : (j + 1) * PAGE]
                )
                assert got == PAGE

        async def discard() -> None:
            for _ in range(200):
                assert await acmd(target, "madvise", zone, busy * PAGE, MADV_DONTNEED) == [0]

        with anyio.fail_after(60):
            async with u.serving(thread=thread):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(discard)
                    for k in range(nreaders):
                        tg.start_soon(
                            functools.partial(anyio.to_thread.run_sync, abandon_on_cancel=True),
                            reader,
                            k,
                        )
                await until(lambda: len(removes) == 200, "200 RemoveEvents")
        st = u.statistics()
    for k, buf in enumerate(bufs):
        for j in range(n // nreaders):
            i = k + j * nreaders
            assert buf[j * PAGE : (j + 1) * PAGE] == data[i * PAGE : (i + 1) * PAGE], (k, i)
    assert removes == [zone] * 200
    check_counters(st)
    assert st["events"] == 200 and st["faults"] == st["resolved"] == n
    print(f"EAGAIN deferrals in the engine: {st['eagain']}")
