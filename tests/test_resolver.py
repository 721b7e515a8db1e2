"""The C resolver's rules (zero, buffer, file) serving a real target process: lazy restore
from a snapshot file with read-ahead, files shorter than the range, rules next to a coroutine
handler, rules removed while serving, overlapping rules, and rules copied to a fork child.
Every byte is checked in the target or read back after it was faulted in."""

from __future__ import annotations

import os

import anyio
import pytest
from conftest import MODES, PAGE, acmd, managed, pattern, read_present, requires, until

import uffdio
from uffdio import Event

MADV_DONTNEED = 4

pytestmark = pytest.mark.timeout(90)


# ---- helpers --------------------------------------------------------------------------------


def quiet(u):
    def pred() -> bool:
        st = u.statistics()
        return st["faults"] == st["resolved"] and st["deferred_now"] == 0

    return pred


def snapshot(path, content: bytes, lead_pages: int = 0):
    """Write ``lead_pages`` pages of junk then ``content``; return the file opened for reading."""
    with open(path, "wb") as f:
        f.write(b"\xa5" * (lead_pages * PAGE))
        f.write(content)
    return open(path, "rb")


def pages(addr: int, first: int, last: int) -> list[int]:
    return [addr + i * PAGE for i in range(first, last)]


# ---- snapshot files -------------------------------------------------------------------------


@MODES
@pytest.mark.asyncio
async def test_file_restore_read_ahead(target, tmp_path, thread):
    """Two ranges of the target, each with its own uffd, lazily restored from a snapshot file
    at an offset: chunk_pages=1 reads once per page, chunk_pages=16 once per 16 pages (the
    target reads sequentially, so the counts are exact); every word is right."""
    n, seed, lead = 128, 71, 3
    a1, u1 = managed(target, n)
    a16, u16 = managed(target, n)
    f1 = snapshot(tmp_path / "one", bytes(pattern(a1, n * PAGE, seed)), lead)
    f16 = snapshot(tmp_path / "sixteen", bytes(pattern(a16, n * PAGE, seed)), lead)
    with u1, u16, f1, f16:
        u1.resolver.file(a1, n * PAGE, f1, lead * PAGE, chunk_pages=1)
        u16.resolver.file(a16, n * PAGE, f16.fileno(), lead * PAGE, chunk_pages=16)
        with anyio.fail_after(60):
            async with u1.serving(thread=thread), u16.serving(thread=thread):
                assert await acmd(target, "check", a1, n * PAGE, seed) == [0]
                assert await acmd(target, "check", a16, n * PAGE, seed) == [0]
        s1, s16 = u1.statistics(), u16.statistics()
    for st in (s1, s16):
        assert st["errors"] == 0 and st["forwarded"] == 0 and st["inflight"] == 0
        assert st["faults"] == st["resolved"]
    assert s1["file_reads"] == n and s1["faults"] == n
    assert s16["file_reads"] == n // 16 and s16["faults"] == n // 16
    assert 0 < s16["file_reads"] < s1["file_reads"]


@MODES
@pytest.mark.asyncio
async def test_file_read_ahead_with_concurrent_threads(target, tmp_path, thread):
    """16 threads fault interleaved pages of a file rule with 16-page read-ahead: chunks
    overlap with pages other threads already got (EEXIST inside a chunk copy); all correct,
    and every fault is eventually counted as resolved."""
    n, seed = 512, 73
    addr, u = managed(target, n)
    f = snapshot(tmp_path / "snap", bytes(pattern(addr, n * PAGE, seed)))
    with u, f:
        u.resolver.file(addr, n * PAGE, f, chunk_pages=16)
        with anyio.fail_after(60):
            async with u.serving(thread=thread):
                assert await acmd(target, "threads", addr, n * PAGE, seed, 16) == [0]
                # chunk reads started for faults that an overlapping chunk already resolved
                # may still be in flight: let them finish (a stop would void them uncounted)
                await until(quiet(u), "the engine to finish its chunk reads")
        st = u.statistics()
    assert st["errors"] == 0 and st["forwarded"] == 0 and st["inflight"] == 0
    assert st["faults"] == st["resolved"] and 0 < st["file_reads"] <= st["faults"] <= n


@MODES
@pytest.mark.parametrize("chunk", [1, 16])
@pytest.mark.asyncio
async def test_file_shorter_than_range_reads_zeros(target, tmp_path, thread, chunk):
    """The file ends 100 bytes into page 20 of a 48-page range: those 100 bytes are data,
    everything after them reads as zeros (also inside a read-ahead chunk that crosses EOF)."""
    n, seed, data_len = 48, 79, 20 * PAGE + 100
    addr, u = managed(target, n)
    content = bytes(pattern(addr, n * PAGE, seed)[:data_len])
    f = snapshot(tmp_path / "short", content)
    with u, f:
        u.resolver.file(addr, n * PAGE, f, chunk_pages=chunk)
        with anyio.fail_after(60):
            async with u.serving(thread=thread):
                assert await acmd(target, "check", addr, 20 * PAGE, seed) == [0]
                await acmd(target, "touch", addr, n, 0, "-")
                got = await read_present(target.pid, addr, n * PAGE)
        st = u.statistics()
    assert got == content + bytes(n * PAGE - data_len)
    assert st["errors"] == 0 and st["forwarded"] == 0 and st["faults"] == st["resolved"]
    assert st["file_reads"] == (n if chunk == 1 else n // chunk)


# ---- rules next to Python -------------------------------------------------------------------


@MODES
@pytest.mark.asyncio
async def test_rule_for_part_coroutine_for_rest(target, thread):
    """A buffer rule covers the middle half, a coroutine handler the two ends; 8 threads
    fault everything at once.  The handler sees exactly the pages outside the rule."""
    n, seed = 256, 83
    addr, u = managed(target, n)
    data = pattern(addr, n * PAGE, seed)
    view = memoryview(data)
    lo, hi = n // 4, 3 * n // 4
    seen: list[int] = []
    with u:
        u.resolver.buffer(addr + lo * PAGE, view[lo * PAGE : hi * PAGE])

        @u.on_fault
        async def ends(batch):
            for page in batch.pages():
                seen.append(page)
                off = page - addr
                await u.copy(page, view[off : off + PAGE])

        with anyio.fail_after(60):
            async with u.serving(thread=thread):
                assert await acmd(target, "threads", addr, n * PAGE, seed, 8) == [0]
        st = u.statistics()
    assert sorted(seen) == pages(addr, 0, lo) + pages(addr, hi, n)
    assert st["resolved"] == hi - lo and st["forwarded"] == n - (hi - lo)
    assert st["faults"] == n and st["errors"] == 0


@MODES
@pytest.mark.asyncio
async def test_remove_rule_sends_faults_to_python(target, thread):
    """One buffer rule (seed A) over 64 pages; while serving, resolver.remove() punches out
    pages 32..47, splitting the rule in two.  Faults there now reach the coroutine (which
    serves seed B), and the tail rule still copies from the right offset of its buffer."""
    n, seed_a, seed_b = 64, 89, 97
    addr, u = managed(target, n)
    data_a = pattern(addr, n * PAGE, seed_a)
    data_b = pattern(addr, n * PAGE, seed_b)
    seen: list[int] = []
    with u:
        u.resolver.buffer(addr, data_a)

        @u.on_fault
        async def python(batch):
            for page in batch.pages():
                seen.append(page)
                off = page - addr
                await u.copy(page, data_b[off : off + PAGE])

        with anyio.fail_after(60):
            async with u.serving(thread=thread):
                assert await acmd(target, "check", addr, 16 * PAGE, seed_a) == [0]
                assert len(u.resolver) == 1
                u.resolver.remove(addr + 32 * PAGE, 16 * PAGE)
                assert len(u.resolver) == 2
                assert await acmd(target, "check", addr, 32 * PAGE, seed_a) == [0]
                assert await acmd(target, "check", addr + 32 * PAGE, 16 * PAGE, seed_b) == [0]
                assert await acmd(target, "check", addr + 48 * PAGE, 16 * PAGE, seed_a) == [0]
                u.resolver.remove(addr, n * PAGE)  # everything, even across the hole
                assert len(u.resolver) == 0
        st = u.statistics()
    assert seen == pages(addr, 32, 48)
    assert st["resolved"] == 48 and st["forwarded"] == 16 and st["errors"] == 0


@MODES
@pytest.mark.asyncio
async def test_overlapping_rule_needs_replace(target, thread):
    """A rule over another raises (EEXIST) unless replace=True; the replacing rule's data is
    what the target reads, the untouched rest of the old rule stays in force."""
    n, seed_new = 32, 103
    addr, u = managed(target, n)
    with u:
        u.resolver.zero(addr, n * PAGE)
        half = addr + n // 2 * PAGE
        new = pattern(half, n // 2 * PAGE, seed_new)
        with pytest.raises(uffdio.UffdRangeError) as ei:
            u.resolver.buffer(half, new)
        assert ei.value.errno == 17 and "replace=True" in ei.value.fix
        with pytest.raises(uffdio.UffdRangeError):
            u.resolver.buffer(addr, bytes(PAGE + 1))  # not a whole number of pages
        assert len(u.resolver) == 1
        u.resolver.buffer(half, new, replace=True)
        assert len(u.resolver) == 2
        with anyio.fail_after(60):
            async with u.serving(thread=thread):
                assert await acmd(target, "check", half, n // 2 * PAGE, seed_new) == [0]
                assert await acmd(target, "touch", addr, n // 2, 0, "-") == [0]
                got = await read_present(target.pid, addr, n // 2 * PAGE)
        assert got == bytes(n // 2 * PAGE)
        st = u.statistics()
    assert st["resolved"] == n and st["forwarded"] == 0 and st["errors"] == 0


# ---- fork -----------------------------------------------------------------------------------


@requires(uffdio.EVENTS, root=True)
@MODES
@pytest.mark.asyncio
async def test_rules_copied_to_fork_child(target, tmp_path, thread):
    """A buffer rule, a file rule and a zero rule; the target forks twice and each child
    checks one range (all of its pages missing).  Each child's uffd gets a copy of the three
    rules and serves its child in C; nothing reaches Python."""
    part, seed = 32, 107
    [addr] = target.cmd("map", 3 * part * PAGE)
    u = target.open_uffd(int(uffdio.EVENTS))
    target.cmd("register", addr, 3 * part * PAGE, int(uffdio.Mode.MISSING))
    a, b, c = addr, addr + part * PAGE, addr + 2 * part * PAGE
    f = snapshot(tmp_path / "b", bytes(pattern(b, part * PAGE, seed)), 1)
    forks: list[uffdio.ForkEvent] = []
    with u, f:
        u.resolver.buffer(a, pattern(a, part * PAGE, seed))
        u.resolver.file(b, part * PAGE, f, PAGE, chunk_pages=4)
        u.resolver.zero(c, part * PAGE)

        @u.on_event(Event.FORK)
        async def on_fork(ev):
            forks.append(ev)

        with anyio.fail_after(60):
            async with u.serving(thread=thread):
                assert await acmd(target, "fork", a, part * PAGE, seed) == [0]
                assert await acmd(target, "fork", b, part * PAGE, seed) == [0]
                await until(lambda: len(forks) == 2, "two ForkEvents")
                # the parent never faulted: its own pages are still served by its rules
                assert await acmd(target, "check", a, 2 * part * PAGE, seed) == [0]
                assert await acmd(target, "touch", c, part, 0, "-") == [0]
        children = [ev.child for ev in forks]
        assert u.children == children
        sa, sb = (ch.statistics() for ch in children)
        for ch in children:
            assert len(ch.resolver) == 3
        assert sa["resolved"] == sa["faults"] == part and sa["file_reads"] == 0
        assert sb["resolved"] == sb["faults"] == part // 4 and sb["file_reads"] == part // 4
        for st in (sa, sb, u.statistics()):
            assert st["forwarded"] == 0 and st["errors"] == 0 and st["inflight"] == 0


# ---- an event while a file read is in flight ------------------------------------------------


@requires(uffdio.Feature.EVENT_REMOVE, root=True)
@MODES
@pytest.mark.asyncio
async def test_remove_during_file_read_installs_zeros(target, thread):
    """A file rule reads from a pipe.  A thread of THIS process faults the target's page
    (process_vm_readv: a remote fault), so the engine's read of the pipe is in flight; then
    the target madvise(DONTNEED)s that page.  When the pipe finally delivers, the data is
    stale: the engine must decide again (the rule is zero-fill now) and install zeros."""
    [addr] = target.cmd("map", 4 * PAGE)
    u = target.open_uffd(int(uffdio.Feature.EVENT_REMOVE))
    target.cmd("register", addr, 4 * PAGE, int(uffdio.Mode.MISSING))
    r, w = os.pipe()
    buf = bytearray(PAGE)
    got: list[int] = []
    removes: list = []
    try:
        with u:
            u.resolver.file(addr, 4 * PAGE, r)

            @u.on_event(Event.REMOVE)
            async def on_remove(ev):
                removes.append((ev.start, ev.end))

            with anyio.fail_after(30):
                async with u.serving(thread=thread), anyio.create_task_group() as tg:

                    async def remote_read():
                        got.append(
                            await anyio.to_thread.run_sync(
                                uffdio.read_memory,
                                target.pid,
                                [(addr, PAGE)],
                                buf,
                                abandon_on_cancel=True,
                            )
                        )

                    tg.start_soon(remote_read)
                    await until(lambda: u.statistics()["file_reads"] == 1, "the pipe read")
                    assert await acmd(target, "madvise", addr, PAGE, MADV_DONTNEED) == [0]
                    await until(lambda: removes, "the RemoveEvent")
                    assert got == []
                    os.write(w, b"\x5a" * PAGE)  # the stale data arrives now
                    await until(lambda: got, "the remote read")
            st = u.statistics()
    finally:
        os.close(r)
        os.close(w)
    assert got == [PAGE]
    assert buf == bytes(PAGE), "the data read before the discard was installed"
    assert removes == [(addr, addr + PAGE)]
    assert st["file_reads"] == 1 and st["resolved"] == st["faults"] == 1 and st["errors"] == 0
