"""Non-cooperative events (fork, mremap, madvise(DONTNEED), munmap) of a real target process,
delivered to coroutines registered with ``Userfaultfd.on_event`` while uffdio keeps the C
resolver's rules truthful, with the memory content checked every time.

The uffd is opened in the target with ``uffdio.EVENTS`` (EVENT_FORK needs CAP_SYS_PTRACE:
root).  Each behaviour runs with the engine on its C thread and inline on the event loop.
"""

from __future__ import annotations

import os
import threading
import time
from errno import EFAULT

import anyio
import anyio.lowlevel
import pytest
from conftest import MODES, PAGE, acmd, pattern, read_present, requires, until

import uffdio
from uffdio import Event

MADV_DONTNEED = 4

pytestmark = [requires(uffdio.EVENTS, root=True), pytest.mark.timeout(90)]


# ---- helpers --------------------------------------------------------------------------------


def events_managed(t, npages: int, spare: int = 0) -> tuple[int, uffdio.Userfaultfd]:
    """Map ``npages + spare`` pages in the target, open a uffd there with every event, and
    register the first ``npages`` (the ``spare`` pages stay unregistered above them)."""
    [addr] = t.cmd("map", (npages + spare) * PAGE)
    u = t.open_uffd(int(uffdio.EVENTS))
    assert u.features & uffdio.EVENTS == uffdio.EVENTS
    t.cmd("register", addr, npages * PAGE, int(uffdio.Mode.MISSING))
    return addr, u


def pages(addr: int, first: int, last: int) -> list[int]:
    return [addr + i * PAGE for i in range(first, last)]


# ---- FORK -----------------------------------------------------------------------------------


@MODES
@pytest.mark.parametrize("how", ["rule", "coroutine"])
@pytest.mark.asyncio
async def test_fork_child_is_served(target, thread, how):
    """The target forks while 3/4 of a registered range is still missing.  The child's faults
    arrive on the child's uffd, which uffdio serves by itself (rules copied, or the parent's
    coroutine handler); the child's check of every byte passes; the ForkEvent handler runs
    with the child's Userfaultfd; the parent's own missing pages are still served."""
    n = 64
    seed = 11
    addr, u = events_managed(target, n)
    data = pattern(addr, n * PAGE, seed)
    forks: list[uffdio.ForkEvent] = []
    served: list[tuple[uffdio.Userfaultfd, int]] = []
    with u:
        u.child_check_interval = 0  # the child stays in u.children after it exited
        if how == "rule":
            u.resolver.buffer(addr, data)
        else:

            @u.on_fault
            async def handler(batch):
                for page in batch.pages():
                    served.append((batch.uffd, page))
                    off = page - addr
                    await batch.uffd.copy(page, data[off : off + PAGE])

        @u.on_event(Event.FORK)
        async def on_fork(ev):
            forks.append(ev)

        with anyio.fail_after(45):
            async with u.serving(thread=thread):
                assert await acmd(target, "check", addr, n // 4 * PAGE, seed) == [0]
                # the child checks all n pages: n/4 present (inherited), 3n/4 missing
                assert await acmd(target, "fork", addr, n * PAGE, seed) == [0]
                await until(lambda: forks, "the ForkEvent handler")
                # the parent's missing pages are its own business: still served
                assert await acmd(target, "check", addr, n * PAGE, seed) == [0]
        assert len(forks) == 1
        ev = forks[0]
        assert isinstance(ev, uffdio.ForkEvent) and ev.kind == Event.FORK
        assert ev.uffd is u
        child = ev.child
        assert isinstance(child, uffdio.Userfaultfd) and child is not u
        assert u.children == [child] and not child.closed
        assert child.fileno() != u.fileno()
        cst, pst = child.statistics(), u.statistics()
        assert cst["thread"] == int(thread) and cst["inflight"] == 0
        assert cst["errors"] == 0 and pst["errors"] == 0
        assert pst["events"] == 1 and pst["events_py"] == 1
        child_pages = sorted(p for uf, p in served if uf is child)
        parent_pages = sorted(p for uf, p in served if uf is u)
        if how == "rule":
            assert len(child.resolver) == len(u.resolver) == 1
            assert cst["resolved"] == cst["faults"] == 3 * n // 4 and cst["forwarded"] == 0
            assert pst["resolved"] == pst["faults"] == n and pst["forwarded"] == 0
        else:
            assert len(child.resolver) == 0
            assert child_pages == pages(addr, n // 4, n)
            assert parent_pages == pages(addr, 0, n)
            assert cst["forwarded"] == cst["faults"] == 3 * n // 4
    assert child.closed  # closing the parent closes the uffds of its children


@pytest.mark.asyncio
async def test_fork_child_uffd_is_closed_once_the_child_is_gone(target):
    """child_check_interval: the child sleeps, then checks every byte through its uffd,
    which is served whatever the looks at its process (about 25) said meanwhile.  Once it
    exited, its uffd is closed and leaves u.children; its counters stay readable; the
    parent is still served."""
    n = 64
    seed = 12
    addr, u = events_managed(target, n)
    data = pattern(addr, n * PAGE, seed)
    forks: list[uffdio.ForkEvent] = []
    with u:
        u.child_check_interval = 0.02
        u.resolver.buffer(addr, data)

        @u.on_event(Event.FORK)
        async def on_fork(ev):
            forks.append(ev)

        with anyio.fail_after(45):
            async with u.serving(thread=True):
                assert await acmd(target, "fork", addr, n * PAGE, seed, 500) == [0]
                await until(lambda: forks, "the ForkEvent handler")
                child = forks[0].child
                await until(lambda: child.closed, "the exited child's uffd closed")
                assert u.children == []
                assert child.statistics()["resolved"] == n
                assert await acmd(target, "check", addr, n * PAGE, seed) == [0]
        assert u.statistics()["resolved"] == n


@pytest.mark.asyncio
async def test_fork_child_gets_rules_as_of_the_fork(target):
    """Inline engine, loop held: the target forks (the child checks an unregistered page
    and exits at once), then madvise(DONTNEED)s the middle of its buffer rule.  Both events
    are read by the ring before the engine processes either.  The child's memory was forked
    before the discard, so its uffd must get the rule as it was at the fork (one buffer
    rule), not the parent's later zero-fill middle."""
    n, seed = 16, 41
    addr, u = events_managed(target, n)
    [other] = target.cmd("map", PAGE)
    target.cmd("fill", other, PAGE, seed)
    forks: list[uffdio.ForkEvent] = []
    removes: list[uffdio.RemoveEvent] = []
    with u:
        u.resolver.buffer(addr, pattern(addr, n * PAGE, seed))

        @u.on_event(Event.FORK)
        async def on_fork(ev):
            forks.append(ev)

        @u.on_event(Event.REMOVE)
        async def on_remove(ev):
            removes.append(ev)

        with anyio.fail_after(30):
            async with u.serving(thread=False):
                await anyio.lowlevel.checkpoint()
                # the loop is held from here to the next await: the engine cannot run
                assert target.cmd("fork", other, PAGE, seed) == [0]
                mid = addr + n // 4 * PAGE
                assert target.cmd("madvise", mid, n // 2 * PAGE, MADV_DONTNEED) == [0]
                await until(lambda: forks and removes, "the ForkEvent and RemoveEvent")
        assert len(u.resolver) == 3  # the parent: buffer, zero-fill, buffer
        assert len(forks[0].child.resolver) == 1


# ---- REMAP ----------------------------------------------------------------------------------


@MODES
@pytest.mark.asyncio
async def test_remap_moves_rules(target, thread):
    """mremap of a half-faulted registered range to a bigger size (forced to move: an
    unregistered page sits right above it).  The RemapEvent says old/new/length; the buffer
    rule (built for the OLD address) moves with the pages, so every page at the new address
    holds the old-address pattern - the present half moved by the kernel, the missing half
    copied by the moved rule - and the grown tail has no rule (it reaches Python).  The
    kernel follows the REMAP with an UNMAP of the old range; that must not drop the moved
    rule."""
    n, extra, seed = 32, 16, 13
    addr, u = events_managed(target, n, spare=1)
    old_data = pattern(addr, n * PAGE, seed)
    remaps: list[uffdio.RemapEvent] = []
    unmaps: list[uffdio.UnmapEvent] = []
    tail: list[int] = []
    with u:
        u.resolver.buffer(addr, old_data)

        @u.on_fault
        async def tail_handler(batch):
            for page in batch.pages():
                tail.append(page)
                await u.zeropage(page)

        @u.on_event(Event.REMAP)
        async def on_remap(ev):
            remaps.append(ev)

        @u.on_event(Event.UNMAP)
        async def on_unmap(ev):
            unmaps.append(ev)

        with anyio.fail_after(45):
            async with u.serving(thread=thread):
                assert await acmd(target, "check", addr, n // 2 * PAGE, seed) == [0]
                [new] = await acmd(target, "mremap", addr, n * PAGE, (n + extra) * PAGE)
                assert new != 0 and new != addr
                await until(lambda: remaps and unmaps, "the RemapEvent and UnmapEvent")
                assert len(u.resolver) == 1
                # fault in every page at the new address (reads), then read them back
                await acmd(target, "touch", new, n + extra, 0, "-")
                got = await read_present(target.pid, new, (n + extra) * PAGE)
        ev = remaps[0]
        assert len(remaps) == 1 and isinstance(ev, uffdio.RemapEvent)
        assert (ev.old, ev.new, ev.length) == (addr, new, n * PAGE)
        assert [(e.start, e.end) for e in unmaps] == [(addr, addr + n * PAGE)]
        assert got[: n * PAGE] == old_data
        assert got[n * PAGE :] == bytes(extra * PAGE)
        assert sorted(set(tail)) == pages(new, n, n + extra)
        st = u.statistics()
        assert st["resolved"] == n  # n/2 before the move at addr, n/2 after it at new
        assert st["errors"] == 0 and st["events"] == 2


# ---- REMOVE ---------------------------------------------------------------------------------


@MODES
@pytest.mark.asyncio
async def test_remove_discards_rule_data(target, thread):
    """The data-resurrection pitfall: the target reads half a range served by a buffer rule,
    then madvise(MADV_DONTNEED)s the middle half (pages it read and pages it never read).
    A RemoveEvent arrives, and every page of the discarded range reads ZEROS afterwards -
    not the rule's data - while the rest of the range keeps its content."""
    n, seed = 32, 17
    addr, u = events_managed(target, n)
    data = pattern(addr, n * PAGE, seed)
    lo, hi = addr + n // 4 * PAGE, addr + 3 * n // 4 * PAGE
    removes: list[uffdio.RemoveEvent] = []
    with u:
        u.resolver.buffer(addr, data)

        @u.on_event(Event.REMOVE)
        async def on_remove(ev):
            removes.append(ev)

        with anyio.fail_after(45):
            async with u.serving(thread=thread):
                assert await acmd(target, "check", addr, n // 2 * PAGE, seed) == [0]
                assert await acmd(target, "madvise", lo, hi - lo, MADV_DONTNEED) == [0]
                await until(lambda: removes, "the RemoveEvent handler")
                # a full check now must find exactly the discarded words wrong (zeros)...
                bad = await acmd(target, "check", addr, n * PAGE, seed)
                got = await read_present(target.pid, addr, n * PAGE)
        expected = bytearray(data)
        expected[lo - addr : hi - addr] = bytes(hi - lo)
        assert got == bytes(expected)  # ...which the bytes read back show exactly
        assert bad == [(hi - lo) // 8]
        assert [(e.start, e.end, e.kind) for e in removes] == [(lo, hi, Event.REMOVE)]
        assert removes[0].uffd is u
        st = u.statistics()
        assert st["errors"] == 0 and st["events"] == 1 and st["forwarded"] == 0
        assert st["faults"] == st["resolved"]


@MODES
@pytest.mark.asyncio
async def test_remove_and_faults_in_kernel_order(target, thread):
    """No rules: a coroutine serves faults and learns of discards from RemoveEvents.  Faults
    and events reach Python in the kernel's order, so the handler knows which pages were
    discarded when their next fault arrives and fills those with zeros (never resurrecting
    the old data), while never-discarded pages still get their data."""
    n, seed = 32, 19
    addr, u = events_managed(target, n)
    data = pattern(addr, n * PAGE, seed)
    quarter = n // 4 * PAGE
    log: list[tuple] = []
    discarded: set[int] = set()
    with u:

        @u.on_fault
        async def handler(batch):
            for page in batch.pages():
                log.append(("fault", page))
                if page in discarded:
                    await u.zeropage(page)
                else:
                    off = page - addr
                    await u.copy(page, data[off : off + PAGE])

        @u.on_event(Event.REMOVE)
        async def on_remove(ev):
            log.append(("remove", ev.start, ev.end))
            discarded.update(range(ev.start, ev.end, PAGE))

        with anyio.fail_after(45):
            async with u.serving(thread=thread):
                assert await acmd(target, "check", addr, n // 2 * PAGE, seed) == [0]
                assert await acmd(target, "madvise", addr, quarter, MADV_DONTNEED) == [0]
                await acmd(target, "touch", addr, n, 0, "-")
                got = await read_present(target.pid, addr, n * PAGE)
        expected = [("fault", p) for p in pages(addr, 0, n // 2)]
        expected.append(("remove", addr, addr + quarter))
        expected += [("fault", p) for p in pages(addr, 0, n // 4) + pages(addr, n // 2, n)]
        assert log == expected
        assert got == bytes(quarter) + bytes(data[quarter:])
        st = u.statistics()
        assert st["events"] == 1 and st["forwarded"] == st["faults"] == len(expected) - 1
        assert st["errors"] == 0


# ---- UNMAP ----------------------------------------------------------------------------------


@MODES
@pytest.mark.asyncio
async def test_unmap_drops_rules(target, thread):
    """Three buffer rules; the target munmaps the middle one's range.  An UnmapEvent arrives,
    the rule is gone (len(resolver) 3 -> 2, already when the handler runs), and the two
    other ranges are still served with the right content."""
    part, seed = 16, 23
    n = 3 * part
    addr, u = events_managed(target, n)
    starts = [addr + i * part * PAGE for i in range(3)]
    unmaps: list[tuple[uffdio.UnmapEvent, int]] = []
    with u:
        for s in starts:
            u.resolver.buffer(s, pattern(s, part * PAGE, seed))
        assert len(u.resolver) == 3

        @u.on_event(Event.UNMAP)
        async def on_unmap(ev):
            unmaps.append((ev, len(u.resolver)))

        with anyio.fail_after(45):
            async with u.serving(thread=thread):
                assert await acmd(target, "check", starts[0], part // 2 * PAGE, seed) == [0]
                assert await acmd(target, "check", starts[1], part // 2 * PAGE, seed) == [0]
                assert await acmd(target, "munmap", starts[1], part * PAGE) == [0]
                await until(lambda: unmaps, "the UnmapEvent handler")
                assert len(u.resolver) == 2
                assert await acmd(target, "check", starts[0], part * PAGE, seed) == [0]
                assert await acmd(target, "check", starts[2], part * PAGE, seed) == [0]
        [(ev, count_in_handler)] = unmaps
        assert isinstance(ev, uffdio.UnmapEvent) and ev.kind == Event.UNMAP
        assert (ev.start, ev.end) == (starts[1], starts[1] + part * PAGE)
        assert count_in_handler == 2
        st = u.statistics()
        assert st["resolved"] == part // 2 * 2 + part // 2 + part
        assert st["errors"] == 0 and st["events"] == 1


@MODES
@pytest.mark.asyncio
async def test_remove_over_rule_and_python_pages(target, thread):
    """madvise(DONTNEED) over a range half covered by a buffer rule, half served by a
    coroutine.  Where a rule existed the engine now zero-fills; where Python served, the
    faults still reach Python (which learnt of the discard from the RemoveEvent)."""
    n, seed = 32, 29
    addr, u = events_managed(target, n)
    data = pattern(addr, n * PAGE, seed)
    half = n // 2 * PAGE
    discarded: set[int] = set()
    seen: list[int] = []
    with u:
        u.resolver.buffer(addr, data[:half])

        @u.on_fault
        async def upper(batch):
            for page in batch.pages():
                seen.append(page)
                if page in discarded:
                    await u.zeropage(page)
                else:
                    await u.copy(page, data[page - addr : page - addr + PAGE])

        @u.on_event(Event.REMOVE)
        async def on_remove(ev):
            discarded.update(range(ev.start, ev.end, PAGE))

        with anyio.fail_after(45):
            async with u.serving(thread=thread):
                assert await acmd(target, "check", addr, n * PAGE, seed) == [0]
                assert await acmd(target, "madvise", addr, n * PAGE, MADV_DONTNEED) == [0]
                await acmd(target, "touch", addr, n, 0, "-")
                got = await read_present(target.pid, addr, n * PAGE)
        assert got == bytes(n * PAGE)
        assert seen == pages(addr, n // 2, n) * 2
        st = u.statistics()
        assert st["resolved"] == n and st["forwarded"] == n and st["errors"] == 0


@MODES
@pytest.mark.asyncio
async def test_remap_of_part_of_a_rule(target, thread):
    """mremap of pages 8..15 out of the middle of a 32-page buffer rule, grown to 12 pages:
    the rule is cut in three and its middle moves with an adjusted source offset, so each
    page - moved or not - still gets the data its old address had."""
    n, seed = 32, 31
    addr, u = events_managed(target, n)
    data = pattern(addr, n * PAGE, seed)
    mid, mlen = addr + 8 * PAGE, 8 * PAGE
    remaps: list[uffdio.RemapEvent] = []
    with u:
        u.resolver.buffer(addr, data)

        @u.on_fault
        async def grown(batch):
            for page in batch.pages():
                await u.zeropage(page)

        @u.on_event(Event.REMAP)
        async def on_remap(ev):
            remaps.append(ev)

        with anyio.fail_after(45):
            async with u.serving(thread=thread):
                assert await acmd(target, "check", mid, 2 * PAGE, seed) == [0]  # 2 present
                [new] = await acmd(target, "mremap", mid, mlen, mlen + 4 * PAGE)
                assert new not in (0, mid)
                await until(lambda: remaps, "the RemapEvent")
                assert len(u.resolver) == 3
                assert await acmd(target, "check", addr, 8 * PAGE, seed) == [0]
                assert await acmd(target, "check", addr + 16 * PAGE, 16 * PAGE, seed) == [0]
                await acmd(target, "touch", new, 12, 0, "-")
                got = await read_present(target.pid, new, 12 * PAGE)
        assert [(e.old, e.new, e.length) for e in remaps] == [(mid, new, mlen)]
        assert got == bytes(data[8 * PAGE : 16 * PAGE]) + bytes(4 * PAGE)
        st = u.statistics()
        assert st["resolved"] == n and st["errors"] == 0


# ---- munmap while a fault is pending --------------------------------------------------------
#
# A thread asleep in a userfault is not woken by munmap of its page: only UFFDIO_WAKE (or a
# fill that wakes) or closing the uffd releases it; it then faults again on the vanished
# mapping and gets SIGSEGV/EFAULT.  A fault that meets ENOENT must therefore be woken, not
# dropped.  The faulting thread here is a thread of THIS process reading the target's page
# with process_vm_readv (a remote fault), so the target's command loop stays free to munmap.


def remote_reader(pid: int, addr: int) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        out.append(threading.get_native_id())
        try:
            out.append(uffdio.read_memory(pid, [(addr, PAGE)], bytearray(PAGE)))
        except uffdio.UffdError as exc:
            out.append(exc)

    th = threading.Thread(target=run, daemon=True)  # released at teardown if it hangs
    th.start()
    return th, out


def asleep_in_userfault(out: list) -> bool:
    if not out:
        return False
    with open(f"/proc/self/task/{out[0]}/wchan") as f:
        return f.read() == "handle_userfault"


def released_with_efault(out: list) -> bool:
    return len(out) == 2 and isinstance(out[1], uffdio.UffdError) and out[1].errno == EFAULT


@pytest.mark.asyncio
async def test_engine_wakes_fault_on_unmapped_page(target):
    """Inline engine, buffer rule.  While the event loop is held (so the engine cannot
    process anything) a remote fault is queued and the target munmaps the page; both
    messages are read by the ring.  The engine then copies into a vanished mapping (ENOENT):
    the faulting thread must be woken (it then gets EFAULT), not left asleep."""
    addr, u = events_managed(target, 4)
    unmaps: list = []
    with u:
        u.resolver.buffer(addr, pattern(addr, 4 * PAGE, 37))

        @u.on_event(Event.UNMAP)
        async def on_unmap(ev):
            unmaps.append(ev)

        with anyio.fail_after(30):
            async with u.serving(thread=False):
                await anyio.lowlevel.checkpoint()
                # the loop is held from here to the next await
                th, out = remote_reader(target.pid, addr)
                deadline = time.monotonic() + 10
                while not asleep_in_userfault(out):
                    assert time.monotonic() < deadline, "the remote read never faulted"
                    time.sleep(0.001)  # noqa: ASYNC251 - holding the loop is the point
                assert target.cmd("munmap", addr, 4 * PAGE) == [0]  # its event was read
                await until(lambda: unmaps, "the UnmapEvent")
                await until(lambda: len(out) == 2, "the faulting thread to be released", 3)
        assert released_with_efault(out), out
        assert u.statistics()["errors"] == 0


@MODES
@pytest.mark.asyncio
async def test_unmap_during_file_read_is_not_a_python_fault(target, thread):
    """Rules only (a file rule reading from a pipe).  A remote fault starts the pipe read;
    the target munmaps the range; then the stale data arrives.  Nothing is left to resolve:
    serving must go on, and the faulting thread must be released (EFAULT)."""
    addr, u = events_managed(target, 4)
    r, w = os.pipe()
    unmaps: list = []
    try:
        with u:
            u.resolver.file(addr, 4 * PAGE, r)

            @u.on_event(Event.UNMAP)
            async def on_unmap(ev):
                unmaps.append(ev)

            with anyio.fail_after(30):
                async with u.serving(thread=thread):
                    th, out = remote_reader(target.pid, addr)
                    await until(lambda: u.statistics()["file_reads"] == 1, "the pipe read")
                    assert await acmd(target, "munmap", addr, 4 * PAGE) == [0]
                    await until(lambda: unmaps, "the UnmapEvent")
                    os.write(w, b"\x5a" * PAGE)
                    await until(lambda: len(out) == 2, "the faulting thread to be released", 3)
            assert released_with_efault(out), out
    finally:
        os.close(r)
        os.close(w)


@MODES
@pytest.mark.asyncio
async def test_handler_following_enoent_fix_releases_thread(target, thread):
    """A coroutine holds a fault while the target munmaps the page, then copies: ENOENT
    (UffdMappingChanged).  It does what the error's Fix says - drops the work.  The faulting
    thread must not stay asleep forever."""
    addr, u = events_managed(target, 4)
    unmapped = anyio.Event()
    outcome: list = []
    with u:

        @u.on_fault
        async def late(batch):
            await unmapped.wait()
            for page in batch.pages():
                try:
                    await u.copy(page, bytes(PAGE))
                except uffdio.UffdMappingChanged as exc:
                    outcome.append(exc.fix)  # "drop the work for it"

        with anyio.fail_after(30):
            async with u.serving(thread=thread):
                th, out = remote_reader(target.pid, addr)
                await until(lambda: u.statistics().get("faults_py", 0) == 1, "the fault")
                assert await acmd(target, "munmap", addr, 4 * PAGE) == [0]
                unmapped.set()
                await until(lambda: outcome, "the handler's ENOENT")
                await until(lambda: len(out) == 2, "the faulting thread to be released", 3)
        assert released_with_efault(out), out
