"""Managing other processes: the manager side of the agent, spawn, eviction.

A :class:`Manager` listens on a UNIX socket.  Every process that runs the agent (started
with :meth:`Manager.spawn`, ``uffdio run``, or a program that starts the agent itself)
connects, hands over its userfaultfd and becomes a :class:`ManagedProcess`: its anonymous
memory is registered, its faults are served by the C engine (first touches get zero pages
in C, evicted pages are copied back in C), and :meth:`ManagedProcess.evict` takes pages
away from it.

Eviction, and why no page is ever lost (see also csrc/agent.c):

1. HOLD rules go in first: a fault on a page being evicted waits in the engine.
2. A recovery snapshot is written (the runs and where they will sit in the scratch area).
3. The agent moves the pages out of the application's mappings into its scratch area
   (UFFDIO_MOVE: the page leaves the application's page table atomically; from then on an
   access faults and waits).  The kernel refuses shared (after fork) and pinned pages: they
   stay resident, their HOLD rules are dropped.
4. The manager reads the scratch area (process_vm_readv) into its store.
5. The HOLD rules become BUFFER rules (the waiting faults are served from the store), and
   a snapshot is written again.
6. The agent empties the scratch area.

Events change the rules in C in message order (csrc/engine.c): the application's
madvise(DONTNEED) voids the saved copy (zeros, as the kernel promises), munmap drops it,
mremap moves it, fork gives the child a snapshot of the parent's rules.

The store is a memfd that every agent keeps a duplicate of, and each process's rules are
snapshotted into a memfd its agent keeps: a manager killed with SIGKILL leaves the faulting
threads waiting (the agent's uffd keeps the registrations alive), and a manager restarted
on the same socket gets the store and the snapshots back and continues.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import mmap
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from . import _agentproto as P
from . import _constants as C
from ._constants import Feature
from ._errors import (
    UffdError,
    UffdProcessGone,
    UffdUnsupportedError,
    check,
    error_for,
)
from ._lib import CData, ffi, lib
from ._process import _flat
from ._uffd import Userfaultfd, _sole

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup
from .agent import library_path

if TYPE_CHECKING:
    from .swap import Swap

log = logging.getLogger("uffdio")

PAGE = C.PAGE_SIZE
TAG_STORE = 1
TAG_STATE = 2
TAG_SWAP_TABLE = 3  # userspace swap: the process's page table (a memfd)
TAG_SWAP_STORE = 4  # userspace swap: the store its table refers to (a memfd)
TAG_SWAP_FILE = 5  # userspace swap: the swap file of a file store
TAG_STATE_B = 6  # the second of the two recovery snapshot memfds (see _write_snapshot)
#: a fork child's uffd, page table, store and swap file (TAG_ORPHAN + 4 * n + 0..3), kept by
#: an agent up its fork chain until the child's own agent has them (Manager._keep_orphan)
TAG_ORPHAN = 1 << 32
SNAP_MAGIC = 0x55464644494F5331  # "UFFDIOS1": a snapshot sent as a memfd of its own
SNAP_MAGIC2 = 0x55464644494F5332  # "UFFDIOS2": written in place, with a sequence number
SNAP_SCRATCH = 100  # snapshot entry kind: pages that sit in the scratch area


#: the address range UFFDIO_WAKE is given to wake every thread of a process (from the
#: lowest address a mapping can have to the top of the x86-64/arm64 user address space)
WAKE_START = 1 << 16
WAKE_END = (1 << 47) - PAGE

#: the plain eviction path's batch size (bytes of the scratch area used per batch)
PLAIN_BATCH = 4 << 20


class Arena:
    """Page store in manager memory, backed by a memfd so that it outlives the manager.

    Allocation is in whole pages; freed extents are given back to the kernel with
    MADV_REMOVE and reused.  An arena adopted from a previous manager is never
    allocated from (its free space is unknown): it is read, and freed when unused.
    """

    RESERVE = 1 << 36  # 64 GiB of address space; memory is used only for stored pages

    def __init__(self, fd: int | None = None) -> None:
        self.adopted = fd is not None
        if fd is None:
            fd = os.memfd_create("uffdio-store", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.RESERVE)
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.ino = os.fstat(fd).st_ino
        self.mm = mmap.mmap(
            fd, self.size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_NORESERVE", 0)
        )
        self._c = ffi.from_buffer(self.mm)
        self.base = int(ffi.cast("uintptr_t", self._c))
        self.top = 0
        self.free: list[tuple[int, int]] = []
        self.used_bytes = 0

    def alloc(self, n: int) -> int:
        if self.adopted:
            raise RuntimeError("an adopted arena is read-only")
        for i, (off, ln) in enumerate(self.free):
            if ln >= n:
                if ln == n:
                    self.free.pop(i)
                else:
                    self.free[i] = (off + n, ln - n)
                self.used_bytes += n
                return off
        if self.top + n > self.size:
            raise error_for(
                errno.ENOSPC, "store", f"the memory store is full ({self.size >> 30} GiB reserved)"
            )
        off = self.top
        self.top += n
        self.used_bytes += n
        return off

    def release(self, off: int, n: int) -> None:
        self.mm.madvise(mmap.MADV_REMOVE, off, n)
        self.used_bytes -= n
        if not self.adopted:
            self.free.append((off, n))

    def contains(self, addr: int) -> bool:
        return self.base <= addr < self.base + self.size

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self._c = None
            self.mm.close()
        os.close(self.fd)


@dataclass
class _Extent:
    arena: Arena
    off: int
    length: int
    unused_since: float | None = None
    #: an eviction batch's extent: its pages in transit sit at the same offsets in the
    #: scratch area (of its process, and of children forked during the batch)
    batch: bool = False


@dataclass
class _Orphan:
    """The uffd of a child the kernel reported (EVENT_FORK) before its agent said hello."""

    uffd: Userfaultfd
    parent: int
    scope: anyio.CancelScope
    #: the process whose agent keeps this uffd and its page table for a manager that
    #: takes over (Manager._keep_orphan), and the tags it keeps them under
    holder: ManagedProcess | None = None
    tags: tuple[int, ...] = ()
    #: the inode of its page table's memfd (0: none): one table, one process
    table_ino: int = 0
    #: taken over from a holder's agent (its manager was killed): (table, store, swap
    #: file) descriptors for Swap._adopt.  Such a uffd is not served until its process
    #: is paired with it: the table is made true from that process (uf_pt_recover).
    kept: tuple[int, int, int] | None = None

    def close(self) -> None:
        self.uffd.close()
        kept, self.kept = self.kept, None
        for fd in kept or ():
            if fd >= 0:
                os.close(fd)


def _addr_ranges(words: Sequence[int]) -> list[tuple[int, int]]:
    return [(words[i], words[i + 1]) for i in range(0, len(words) - 1, 2)]


class ManagedProcess:
    """One process under management (see :class:`Manager`)."""

    def __init__(self, manager: Manager, pid: int, ppid: int, sock: socket.socket) -> None:
        self.manager = manager
        self.pid = pid
        self.ppid = ppid
        #: whether a MOVE runs under a hold of the engine (see _move_held); not for a
        #: process attached with ptrace: its MOVE session stops every thread, and one
        #: waiting for its unmap event to be read would never stop
        self._hold_for_move = True
        #: set once the agent was sent its WELCOME: it drops whatever comes before (the
        #: handshake), so request() waits for this
        self._welcomed = anyio.Event()
        self._replies_closed = False
        self.uffd: Userfaultfd | None = None
        self.features = Feature(0)
        self.event_fork = False
        self.scratch = 0
        self.scratch_len = 0
        #: the agent's protocol version (from its HELLO)
        self.agent_version = 0
        #: the uffd's counters when it was closed after the process exited
        self._final_uffd_stats: dict[str, int] | None = None
        #: registered regions as of the last scan: [(start, length)]
        self.regions: list[tuple[int, int]] = []
        #: why the process is not managed (no uffd), or None
        self.unmanaged_reason: str | None = None
        self.exited = False
        self.resumed = False
        #: a reconnecting agent's swap page table and store (fds), until Swap.attach
        #: takes them over
        self.swap_kept: tuple[int, int, int] | None = None
        #: the process's user (SO_PEERCRED)
        self.uid = os.geteuid()
        #: a reconnecting fork child whose swap page table never reached its agent
        self.swap_lost = False
        #: the inode of the page table memfd taken over with it (0: none)
        self.table_ino = 0
        #: the fork-event uffd it was paired with, until the holder's copies are dropped
        self._orphan: _Orphan | None = None
        #: the agent thread's tid (0 until it said so)
        self.agent_tid = 0
        self._sock = sock
        self._seq = 0
        self._replies: dict[int, tuple[anyio.Event, list[P.Msg], int]] = {}
        #: the agent answered M_DETACH: it let go of its uffd and of the page table it
        #: kept (the table's store references are nobody's once our table goes)
        self.given_back = False
        self._evict_lock = anyio.Lock()
        #: the plain eviction batch in flight: (buffer, bytes) of its HOLD rules
        self._batch_span: tuple[int, int] | None = None
        #: the two memfds that recovery snapshots are written into, in turn (the agent
        #: keeps them: TAG_STATE, TAG_STATE_B), and the last snapshot's number
        self._state_fds: list[int] = []
        self._state_seq = 0
        self._state_new = False  # made here, not yet handed to the agent
        #: why the dead manager's snapshot could not be taken over (the process is held)
        self._restore_error: UffdError | None = None
        #: the last snapshot written (a reconnect to this manager restores from it: the
        #: memfds are writable by the process)
        self._last_snapshot: bytes | None = None
        #: a reconnect superseded this connection (see Manager._supersede)
        self._superseded = False
        #: snapshots could not be made for it (no takeover protection: nothing to keep)
        self._no_snapshots = False
        #: a plain batch whose holds were left in place (see _evict_batch_held)
        self._stuck_batch: tuple[int, int, list[tuple[int, int]]] | None = None
        #: pages a dead manager left in the scratch area, (start, len, scratch address),
        #: until _recover_finish has read them
        self._recover_scratch: list[tuple[int, int, int]] = []
        #: the scratch area was not emptied when the connection started (see
        #: _inherits_batch): it is before the first batch
        self._scratch_dirty = False
        self._sweeping = False
        self._fenced = 0
        self._scope: anyio.CancelScope | None = None
        self._gone = anyio.Event()
        self.stats = {
            "evictions": 0,
            "pages_evicted": 0,
            "pages_skipped": 0,
            "pages_swapped_in_for_fork": 0,
            "scans": 0,
            "fences": 0,
            "snapshots": 0,
            "registered_pages_max": 0,
        }

    def __repr__(self) -> str:
        state = "exited" if self.exited else ("unmanaged" if self.unmanaged_reason else "managed")
        return f"<ManagedProcess pid={self.pid} {state}>"

    @property
    def managed(self) -> bool:
        return self.uffd is not None and not self.exited

    # ---- requests to the agent ----------------------------------------------------------

    async def request(
        self,
        type: int,
        words: Sequence[int] = (),
        *,
        a: int = 0,
        b: int = 0,
        c: int = 0,
        fd: int = -1,
        timeout: float | None = 60.0,  # noqa: ASYNC109
    ) -> P.Msg:
        if self.exited:
            raise UffdProcessGone(errno.ESRCH, "uffdio agent", f"pid {self.pid} exited")
        if self._replies_closed:
            # its reader is gone (it exited, or we are ending): a reply would never be read
            raise UffdProcessGone(errno.ESRCH, "uffdio agent", f"pid {self.pid} went away")
        if not self._welcomed.is_set():
            # (Manager.wait_process returns before the agent's handshake is over: a
            # request sent then would be dropped by the agent and never answered)
            with anyio.fail_after(timeout):
                await self._welcomed.wait()
            if self.exited:
                raise UffdProcessGone(errno.ESRCH, "uffdio agent", f"pid {self.pid} exited")
        self._seq += 1
        seq = self._seq
        ev = anyio.Event()
        box: list[P.Msg] = []
        self._replies[seq] = (ev, box, type)
        try:
            await P.send(
                self._sock,
                P.pack(
                    type, 0, seq, a, b, c, words if isinstance(words, array.array) else list(words)
                ),
                fd,
            )
            with anyio.fail_after(timeout):
                await ev.wait()
        except (BrokenPipeError, ConnectionError):
            raise UffdProcessGone(
                errno.ESRCH, "uffdio agent", f"pid {self.pid}: the agent's connection closed"
            ) from None
        finally:
            self._replies.pop(seq, None)
        if not box:
            raise UffdProcessGone(errno.ESRCH, "uffdio agent", f"pid {self.pid} went away")
        return box[0]

    def _on_reply(self, msg: P.Msg) -> None:
        slot = self._replies.get(msg.seq)
        if slot is None:
            return
        if slot[2] == P.M_DETACH and msg.a >= 0:
            # (noted here, as it is read: the connection's end may retire the process
            # before the task that asked resumes)
            self.given_back = True
        slot[1].append(msg)
        slot[0].set()

    def _fail_replies(self) -> None:
        self._replies_closed = True  # (nobody reads replies any more: see request)
        for ev, _box, _type in self._replies.values():
            ev.set()

    # ---- what only the process itself may do: through the agent (or, for an attached
    # ---- process, injected system calls: see attach.py) -----------------------------------

    async def _op_scan(self) -> Sequence[int]:
        r = await self.request(P.M_SCAN)
        check(r.a, "uffdio agent scan", f"pid {self.pid}")
        return r.words

    #: whether _op_move can empty a scratch range along with the move (agent version 2)
    @property
    def zap_with_move(self) -> bool:
        return self.agent_version >= 2

    async def _op_move(
        self, triples: Sequence[int], zap: tuple[int, int] | None = None
    ) -> tuple[Sequence[int], int, int]:
        """UFFDIO_MOVE (src, dst, len) runs into the scratch area: (moved pairs, skipped,
        -errno or 0).  An error answer still lists what moved before it: those pages are
        in the scratch area, and the caller must read them before it raises.
        ``zap`` (start, length): a scratch range, disjoint from the destinations, whose
        pages were read already - emptied by the agent after its reply, while we read
        this batch (only with :attr:`zap_with_move`: an older agent ignores it)."""
        zs, zl = zap if zap is not None else (0, 0)
        if zl and not self.zap_with_move:
            raise ValueError(f"pid {self.pid}: agent protocol {self.agent_version} cannot zap")
        # no timeout: a MOVE the agent runs late (a stopped program) must still be waited
        # for - its pages would otherwise be moved behind the books' back
        r = await self.request(P.M_MOVE, triples, b=zs, c=zl, timeout=None)
        return r.words, r.b, min(0, r.a)

    async def _op_dontneed(self, ranges: list[int]) -> None:
        r = await self.request(P.M_DONTNEED, ranges)
        check(r.a, "evict: emptying the scratch area", f"pid {self.pid}")

    async def scan(self) -> list[tuple[int, int]]:
        """Register new anonymous mappings; returns the registered regions."""
        self.regions = _addr_ranges(await self._op_scan())
        self.stats["scans"] += 1
        pages = sum(n for _, n in self.regions) // PAGE
        self.stats["registered_pages_max"] = max(self.stats["registered_pages_max"], pages)
        return self.regions

    # ---- eviction ---------------------------------------------------------------------

    def _engines(self) -> list[CData]:
        return self.manager._all_engines()

    def present_ranges(
        self, ranges: Sequence[tuple[int, int]] | None = None
    ) -> list[tuple[int, int]]:
        """The resident pages of ``ranges`` (default: the registered regions), from the
        kernel's page map, sorted and without overlaps."""
        from ._process import pagemap_scan

        out: list[tuple[int, int]] = []
        maxr = 4096
        for start, length in ranges if ranges is not None else self.regions:
            pos, end = start, start + length
            while pos < end:
                regs, _walk_end = pagemap_scan(
                    self.pid,
                    pos,
                    end,
                    category_mask=C.PAGE_IS_PRESENT,
                    return_mask=C.PAGE_IS_PRESENT,
                    max_regions=maxr,
                )
                out.extend((s, e - s) for s, e, _cat in regs)
                # walk_end is not trusted: Linux 6.18 can leave it at an internal flush
                # point (every 512 regions) although the walk went further.  A scan that
                # returned fewer regions than it could hold walked to the end; a full one
                # is continued after its last region.
                if len(regs) < maxr:
                    break
                pos = regs[-1][1]
        return _normalize(out)

    async def evict(self, ranges: Sequence[tuple[int, int]] | None = None) -> int:
        """Evict the resident pages of ``ranges`` (default: every registered region) into
        the store.  Returns the number of pages evicted; pages the kernel refuses to move
        (shared after fork, pinned) stay resident.  Needs UFFDIO_MOVE (Linux 6.8)."""
        if self.uffd is None or self.exited:
            raise UffdProcessGone(errno.ESRCH, "evict", f"pid {self.pid} is not managed")
        sw = self.manager.swap
        if sw is not None and self.pid in sw.procs:
            # userspace swap: the page table and its store (uffdio.swap)
            if ranges is None:
                await self.scan()
                return await sw.evict(self, 1 << 62)
            runs = await anyio.to_thread.run_sync(self.present_ranges, _normalize(list(ranges)))
            return await sw.evict(self, 1 << 62, victims=runs)
        if not self.features & Feature.MOVE:
            raise UffdUnsupportedError(
                errno.EOPNOTSUPP,
                "evict",
                "the agent's uffd has no UFFD_FEATURE_MOVE",
                "eviction zaps pages with UFFDIO_MOVE: use Linux 6.8 or newer",
            )
        total = 0
        async with self._evict_lock:
            if self._fenced or self._inherits_batch():
                # (HOLD rules outside a batch of its own: a batch of its parent's, which it
                # was forked during - settled by the parent in a moment, or read from this
                # process's scratch area, which its own batch must not overwrite meanwhile)
                return 0
            await self._empty_scratch()
            if ranges is None:
                await self.scan()
            runs = await anyio.to_thread.run_sync(
                self.present_ranges, None if ranges is None else _normalize(list(ranges))
            )
            # the last scratch page is the pairing probe; batches of at most 4 MiB (the
            # scratch area is 16 MiB for the swap path's two halves, and bigger batches made
            # this path slower: sqlite3 under --churn took 115 s instead of 62 s)
            cap = min(self.scratch_len, PLAIN_BATCH) - PAGE
            batch: list[tuple[int, int]] = []
            used = 0
            for s, n in runs:
                while n > 0:
                    take = min(n, cap - used)
                    batch.append((s, take))
                    used += take
                    s += take
                    n -= take
                    if used == cap:
                        total += await self._evict_batch_shielded(batch, used)
                        batch, used = [], 0
            if batch:
                total += await self._evict_batch_shielded(batch, used)
        self.manager._gc()
        return total

    async def _evict_batch_shielded(self, runs: list[tuple[int, int]], nbytes: int) -> int:
        # A begun batch runs to its end: cancelling the wait for the agent's MOVE reply
        # would not stop the agent, and pages it moved after we dropped the holds would
        # read as zeros.
        with anyio.CancelScope(shield=True):
            pages = await self._evict_batch(runs, nbytes)
        return pages

    async def _evict_batch(self, runs: list[tuple[int, int]], nbytes: int) -> int:
        assert self.uffd is not None
        m = self.manager
        arena = m.arena
        off = arena.alloc(nbytes)
        buf = arena.base + off
        m._extents.append(_Extent(arena, off, nbytes, batch=True))
        e = self.uffd._engine_handle()
        placed: list[tuple[int, int, int]] = []  # (src, len, offset in batch)
        pos = 0
        for s, n in runs:
            check(lib.uf_rules_add(e, s, n, C.RULE_HOLD, buf + pos, -1, 0, 1), "evict: hold")
            placed.append((s, n, pos))
            pos += n
        self._batch_span = (buf, nbytes)
        try:
            return await self._evict_batch_held(e, buf, nbytes, placed)
        finally:
            self._batch_span = None

    async def _evict_batch_held(
        self, e: CData, buf: int, nbytes: int, placed: list[tuple[int, int, int]]
    ) -> int:
        if not self._write_snapshot(scratch_runs=placed):
            # a successor would know neither the pages' rules nor where they went
            self._settle(buf, nbytes, [])
            raise error_for(
                errno.EIO, "evict", f"pid {self.pid}: the recovery snapshot could not be written"
            )
        try:
            moved_words, skipped, trips, move_err = await self._move_held(
                e, buf, nbytes, len(placed)
            )
            self.stats["pages_skipped"] += skipped
        except BaseException:
            if _dead(self.pid):
                # it died with the MOVE's answer: what moved is in the scratch areas of
                # children forked since (every piece of the batch may have)
                self._abandon_batch(buf, nbytes, sorted((o, n) for _s, n, o in placed))
            else:
                # nothing was moved, or we do not know: pages still in the scratch area
                # are found there by the recovery snapshot; drop the holds that moved
                # nothing (synchronous: cancellation cannot cut it)
                self._settle(buf, nbytes, [])
            raise
        # moved pieces, as (offset in batch, length), through the triples of the MOVE
        filled: list[tuple[int, int]] = []
        for s, n in _addr_ranges(moved_words):
            for src, dst, ln in trips:
                lo, hi = max(s, src), min(s + n, src + ln)
                if lo < hi:
                    filled.append((dst - self.scratch + (lo - src), hi - lo))
        filled.sort()
        if filled:
            err = None
            for attempt in range(3):
                err = await _read_scratch(self, self.scratch, buf, filled)
                if err is None or _dead(self.pid):
                    break
                await anyio.sleep(0.01 * (attempt + 1))
            if err is not None:
                if _dead(self.pid):
                    self._abandon_batch(buf, nbytes, filled)
                else:
                    # the holds stay (the pages are in the scratch area: their threads
                    # wait - a settle without them would give zeros) until a successor
                    # recovers them from the snapshot written with the batch, or the
                    # process is gone (Manager._retire)
                    self._stuck_batch = (buf, nbytes, filled)
                raise err
        pages = self._settle(buf, nbytes, filled)
        used = max((o + n for o, n in filled), default=0)
        if not self._write_snapshot():
            # the last whole snapshot still says the batch's pages are in the scratch
            # area: it stays full (emptied before the next batch, after a snapshot)
            self._scratch_dirty = self._scratch_dirty or bool(used)
        elif used:
            await self._op_dontneed([self.scratch, used])
        self.stats["evictions"] += 1
        self.stats["pages_evicted"] += pages
        if move_err:  # (what moved before the agent's error is evicted above)
            raise error_for(-move_err, "evict: UFFDIO_MOVE", f"pid {self.pid}")
        return pages

    async def _move_held(
        self, e: CData, buf: int, nbytes: int, nplaced: int
    ) -> tuple[Sequence[int], int, list[tuple[int, int, int]], int]:
        """The agent's MOVE of this batch's HOLD rules, under a hold of the engine
        (uf_engine_hold: no event is read meanwhile, so no mapping can be replaced under
        the MOVE).  What to move is read from the rules once the hold is taken: an
        unmap or discard before it removed its pages' rule, a remap moved it - whatever
        the program mapped at an old address since is not ours and is not touched.
        Returns (moved pairs, skipped pages, the (src, dst, len) triples moved, the
        agent's -errno or 0)."""
        from .swap import HOLD_TIMEOUT_MS, _hold_error

        if self._hold_for_move:
            rc = await anyio.to_thread.run_sync(lib.uf_engine_hold, e, 1, HOLD_TIMEOUT_MS)
            if rc < 0:
                raise _hold_error(rc, self.pid)
        try:
            cap = 4 * (nplaced + 64)
            quads = ffi.new("uint64_t[]", 4 * cap)
            n = lib.uf_rules_list(e, C.RULE_HOLD, quads, cap)
            trips = [
                (
                    int(quads[4 * i]),
                    self.scratch + int(quads[4 * i + 3]) - buf,
                    int(quads[4 * i + 1] - quads[4 * i]),
                )
                for i in range(n)
                if buf <= quads[4 * i + 3] < buf + nbytes
            ]
            if not trips:
                return [], 0, [], 0
            moved, skipped, err = await self._op_move([w for t in trips for w in t])
            return moved, skipped, trips, err
        finally:
            if self._hold_for_move:
                lib.uf_engine_hold(e, 0, 0)

    def _inherits_batch(self) -> bool:
        """Whether an eviction batch of the parent's, forked during it, is still open in
        this process's books: a HOLD rule (plain path) or its page table's batch."""
        if self.uffd is None or self.uffd.closed:
            return False
        sw = self.manager.swap._p(self) if self.manager.swap is not None else None
        if sw is not None:
            return bool(lib.uf_pt_batch_open(sw.pt))
        return _holds_into(self.uffd._engine_handle(), 0, 1 << 64)

    async def _empty_scratch(self) -> None:
        """Before a batch (evict lock held): empty the scratch area if the connection's
        start left it (see _inherits_batch), or a batch whose snapshot was not written -
        once a snapshot says it is no longer needed."""
        if self._scratch_dirty and (self.manager.swap is not None or self._write_snapshot()):
            await self._zap_present_scratch()
            self._scratch_dirty = False

    async def _zap_present_scratch(self) -> None:
        """Empty the scratch area where something is present (a pairing probe page,
        copies of a parent's batch), not the whole area: the agent unregisters each range
        it empties for a moment, and a child forked then keeps that range unregistered -
        its pairing probe needs a registered page (_missing_page)."""
        area = [(self.scratch, self.scratch_len)]
        try:
            present = await anyio.to_thread.run_sync(self.present_ranges, area)
        except OSError:  # (UffdError too)
            present = area
        if len(present) > 64:
            present = area  # (fragmented: one message, one range)
        if present:
            await self.request(P.M_DONTNEED, [x for r in present for x in r])

    async def _empty_scratch_soon(self) -> None:
        """The inherited batch closed: empty the scratch area now (Manager._sweep_scratch)
        rather than at the next eviction, which may never come."""
        try:
            async with self._evict_lock:
                if not self.exited and not self._inherits_batch():
                    await self._empty_scratch()
        except (UffdError, OSError) as exc:
            log.debug("pid %d: emptying the scratch area: %s", self.pid, exc)
        finally:
            self._sweeping = False

    def _abandon_batch(self, buf: int, nbytes: int, filled: list[tuple[int, int]]) -> None:
        """This process's memory is gone with the batch at buf unread: children forked
        during it that hold it get its pages from their own scratch areas (_rescue_batch);
        with none, the batch is settled empty (nobody is left to read it)."""
        if self._kids_hold(buf, nbytes) and self.manager._tg is not None:
            self.manager._tg.start_soon(self._rescue_batch, buf, nbytes, filled)
        else:
            self._settle(buf, nbytes, [])

    def _kids_hold(self, buf: int, nbytes: int) -> bool:
        """Whether the engine of a process other than this one (a fork child, paired or
        not) has HOLD rules of the batch at buf - or may get them: a fork snapshot of
        this process's engine that no child's engine has taken yet."""
        own = self.uffd._engine if self.uffd is not None and not self.uffd.closed else None
        if own is not None and lib.uf_engine_nforks(own):
            return True
        return any(_holds_into(e, buf, nbytes) for e in self._engines() if e != own)

    async def _rescue_batch(self, buf: int, nbytes: int, filled: list[tuple[int, int]]) -> None:
        """This process died between its batch's MOVE and the read of the moved pages.
        Children it forked meanwhile hold the batch (HOLD rules: their threads wait on its
        pages), and those forked after a page moved have it in their own copies of the
        scratch area (a page shared with a child cannot be moved).  Settling the batch
        without the pages would give them zeros.  So each child, once it is served with
        a pid, gets the pages it lacks read from its own scratch area into the batch's
        extent, and then its engine is settled (a child forked before a page moved has
        that page itself).  Until every engine holding the batch is settled, this goes
        on (a child that never says hello - no agent - waits on those pages until it
        exits)."""
        m = self.manager
        while self._kids_hold(buf, nbytes):
            progressed = False
            for q in list(m.processes.values()):
                if q is self or q.uffd is None or q.uffd.closed or q.exited:
                    continue
                e = q.uffd._engine_handle()
                holds = _hold_rules(e, buf, nbytes)
                if holds and await self._rescue_into(q, e, holds, buf, nbytes, filled):
                    progressed = True
            if not progressed:
                await anyio.sleep(0.05)

    async def _rescue_into(
        self,
        q: ManagedProcess,
        e: CData,
        holds: list[tuple[int, int, int]],
        buf: int,
        nbytes: int,
        filled: list[tuple[int, int]],
    ) -> bool:
        """One child of _rescue_batch: read the moved pages it lacks from its scratch area,
        settle its engine.  False when it could not be read (again later)."""
        need: list[tuple[int, int]] = []
        try:
            for start, end, off in holds:
                present = await anyio.to_thread.run_sync(q.present_ranges, [(start, end - start)])
                pos = start
                for a, n in [*present, (end, 0)]:
                    if a > pos:
                        need.append((off + pos - start, a - pos))
                    pos = max(pos, a + n)
        except UffdError:
            return False
        # (a page of the batch that did not move and that the child lacks was a hole)
        need = _intersect(sorted(need), filled)
        if need and await _read_scratch(q, self.scratch, buf, need) is not None:
            return False
        self._settle(buf, nbytes, filled, [e])
        self.manager.pages_rescued += sum(n for _, n in need) // PAGE
        q._write_snapshot()
        log.info(
            "pid %d exited during an eviction batch: pid %d, forked meanwhile, got its pages"
            " from its own scratch area",
            self.pid,
            q.pid,
        )
        return True

    def _settle(
        self,
        buf: int,
        nbytes: int,
        filled: list[tuple[int, int]],
        engines: list[CData] | None = None,
    ) -> int:
        """Settle the batch at buf in ``engines`` (default: every engine of the manager):
        its HOLD rules become rules for the ``filled`` pieces, the rest go.  Returns the
        pages this process's own engine settled."""
        flat = _flat(filled)
        pages = 0
        own = self.uffd._engine if self.uffd is not None else None  # (None once closed)
        for eng in self._engines() if engines is None else engines:
            rc = lib.uf_rules_settle(eng, buf, nbytes, flat, len(filled))
            if eng == own:
                pages = check(rc, "evict: settle")
        self.manager._sweep_scratch()
        return pages

    def _open_uffd(self) -> Userfaultfd:
        """The process's uffd - UffdProcessGone once the manager closed it because the
        process exited (Manager._release_uffd), like any other use of a gone process."""
        assert self.uffd is not None
        if self.uffd.closed:
            raise UffdProcessGone(errno.ESRCH, "uffdio", f"pid {self.pid} exited")
        return self.uffd

    async def swap_in_all(self) -> int:
        """Bring every evicted page of this process back (UFFDIO_COPY).  Returns pages."""
        if self.uffd is None:
            return 0
        e = self._open_uffd()._engine_handle()
        deadline = time.monotonic() + 30
        sw_all = self.manager.swap
        sw = sw_all._p(self) if sw_all is not None else None
        if sw_all is not None and sw is not None:
            while True:
                rc = await anyio.to_thread.run_sync(lib.uf_pt_fill_all, sw.pt)
                if rc != -errno.EAGAIN or time.monotonic() > deadline:
                    break
                await anyio.sleep(0.001)
            check(rc, "swap in", f"pid {self.pid}")
            await sw_all.swap_in_external(self)  # a Python store's pages
        while True:
            rc = await anyio.to_thread.run_sync(lib.uf_rules_fill_all, e)
            if rc != -errno.EAGAIN or time.monotonic() > deadline:
                break
            await anyio.sleep(0.001)  # events pending: the engine drains them
        return check(rc, "swap in", f"pid {self.pid}")

    async def release(self) -> None:
        """Give the process back: every evicted page is brought back, then the agent
        unregisters everything and closes its uffd.  The process keeps running."""
        async with self._evict_lock:
            self._fenced += 1
            await self.swap_in_all()
            with contextlib.suppress(UffdProcessGone):
                await self.request(P.M_DETACH, timeout=30)
            if self.manager.swap is not None and (self.given_back or _dead(self.pid)):
                # (an agent that never answered may still keep the table: its pages stay
                # for whoever serves it next)
                self.manager.swap.let_go(self)

    async def _fence(self, seq: int) -> None:
        """A fork without EVENT_FORK: bring everything back and hold evictions."""
        rc = 0
        async with self._evict_lock:
            self._fenced += 1
            self.stats["fences"] += 1
            try:
                self.stats["pages_swapped_in_for_fork"] += await self.swap_in_all()
            except UffdError as exc:
                rc = -(exc.errno or errno.EIO)
        await P.send(self._sock, P.pack(P.M_FENCE_ACK, 0, seq, rc))

    async def _yield_range(self, seq: int, start: int, length: int) -> None:
        """The program registers [start, start+length) with a uffd of its own (see
        agent.c, ioctl): bring its evicted pages back, forget them, let the agent yield."""
        rc = 0
        async with self._evict_lock:
            try:
                await self.swap_in_all()
                if self.uffd is not None:
                    check(lib.uf_rules_remove(self.uffd._engine_handle(), start, length), "yield")
                self.stats["yielded_pages"] = self.stats.get("yielded_pages", 0) + length // PAGE
            except UffdError as exc:
                rc = -(exc.errno or errno.EIO)
        await P.send(self._sock, P.pack(P.M_FENCE_ACK, 0, seq, rc))

    # ---- recovery snapshots ------------------------------------------------------------

    def _write_snapshot(
        self, scratch_runs: list[tuple[int, int, int]] | None = None, last: bool = False
    ) -> bool:
        """Record this process's BUFFER rules (as store offsets) and pages in transit in a
        memfd that the agent keeps; a restarted manager rebuilds the rules from it.  Written
        before and after each eviction batch and after each event that moves or drops rules
        (Manager._after_event); the pages in transit are those of scratch_runs, or else of
        the batch in flight as its HOLD rules say now (an event may have moved them).
        Returns whether it was written: a step that would make the previous snapshot wrong
        (emptying the scratch area after a batch) must not follow a failed write."""
        if self._no_snapshots:
            return True  # (nothing a snapshot would protect: see _open_state)
        if self.uffd is None or (self.exited and not last) or not self._state_fds:
            return False
        m = self.manager
        e = self.uffd._engine_handle()
        n = lib.uf_rules_count(e)
        out = ffi.new("uint64_t[]", 4 * max(1, n))
        if scratch_runs is None:
            # every HOLD rule of a batch: this process's own in flight, or one inherited
            # from its parent's (forked during it, waiting for it to settle or for a
            # rescue): each page sits at its batch offset in this process's scratch area
            nh = lib.uf_rules_list(e, C.RULE_HOLD, out, n)
            scratch_runs = []
            if nh:
                batches = [(x.arena.base + x.off, x.length) for x in m._extents if x.batch]
                for i in range(nh):
                    src = int(out[4 * i + 3])
                    for buf, nbytes in batches:
                        if buf <= src < buf + nbytes:
                            scratch_runs.append(
                                (int(out[4 * i]), int(out[4 * i + 1] - out[4 * i]), src - buf)
                            )
                            break
        n = lib.uf_rules_list(e, C.RULE_BUFFER, out, n)
        self._state_seq += 1
        words = array.array("Q", [SNAP_MAGIC2, 0, 0, self._state_seq])
        count = 0
        for i in range(n):
            start, end, _k, src = out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3]
            ar = m._arena_of(src)
            if ar is None:
                continue
            words.extend((start, end, ar.ino, src - ar.base))
            count += 1
        for s, ln, boff in scratch_runs or ():
            words.extend((s, s + ln, SNAP_SCRATCH, self.scratch + boff))
            count += 1
        # pages a dead manager left in the scratch area, not yet read by _recover_finish
        for s, ln, scr in self._recover_scratch:
            words.extend((s, s + ln, SNAP_SCRATCH, scr))
            count += 1
        words[1] = count
        words[2] = sum(words[3:]) & 0xFFFFFFFFFFFFFFFF
        # Written in place, into the older of the two memfds the agent keeps: no message
        # (none to lose on a full socket, no fd per snapshot), and a manager killed in
        # the middle of a write leaves the other one, one snapshot older, whole (the
        # successor takes the valid one with the higher number).
        data = words.tobytes()
        fd = self._state_fds[self._state_seq & 1]
        try:
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.ftruncate(fd, len(data))
        except OSError as exc:
            # (the number goes back: the next write goes into this slot again, never into
            # the other one, which holds the last whole snapshot)
            self._state_seq -= 1
            log.warning("pid %d: recovery snapshot not written: %s", self.pid, exc)
            return False
        self.stats["snapshots"] += 1
        self._last_snapshot = data
        return True

    def _open_state(self, kept: dict[int, int]) -> None:
        """The two snapshot memfds: the ones the agent kept (a takeover: they go on being
        written, so no moment passes in which the agent holds only a dead manager's
        snapshot), or new ones, which the connection's start hands to the agent."""
        a, b = kept.pop(TAG_STATE, -1), kept.pop(TAG_STATE_B, -1)
        if a >= 0 and b >= 0:
            self._state_fds = [a, b]
            return
        for fd in (a, b):
            if fd >= 0:
                os.close(fd)
        self._state_fds = [
            os.memfd_create(f"uffdio-state-{self.pid}", os.MFD_CLOEXEC) for _ in range(2)
        ]
        self._state_new = True
        # both whole before the agent has them: a successor that finds no whole snapshot
        # refuses the process (a fork child's inherited rules are in it from the start)
        for _ in range(2):
            if not self._write_snapshot():
                # served without takeover snapshots (a successor refuses it: held)
                log.warning("pid %d: no recovery snapshot could be written", self.pid)
                self._close_state()
                self._state_new = False
                self._no_snapshots = True
                return

    def _close_state(self) -> None:
        for fd in self._state_fds:
            os.close(fd)
        self._state_fds = []

    def _restore(self, snapshots: list[bytes]) -> int:
        """Rebuild the rules of a process whose previous manager died (see _write_snapshot)
        from the valid snapshot with the highest number among ``snapshots``.  Returns pages
        restored; pages that were in the scratch area are returned as runs to read."""
        assert self.uffd is not None
        best: tuple[int, array.array[int]] | None = None
        for data in snapshots:
            got = _parse_snapshot(data)
            if got is not None and (best is None or got[0] > best[0]):
                best = got
        if best is None:
            raise error_for(errno.EBADMSG, "recovery", f"pid {self.pid}: no valid snapshot")
        self._state_seq, body = best
        count = len(body) // 4
        e = self.uffd._engine_handle()
        pages = 0
        self._recover_scratch = []
        for i in range(count):
            start, end, ino, off = body[4 * i : 4 * i + 4]
            if ino == SNAP_SCRATCH:
                if (
                    (start | end | off) % PAGE
                    or end <= start
                    or not (
                        self.scratch <= off
                        and off + (end - start) <= self.scratch + self.scratch_len
                    )
                ):
                    raise error_for(
                        errno.EBADMSG, "recovery", f"pid {self.pid}: scratch entry out of bounds"
                    )
                self._recover_scratch.append((start, end - start, off))
                continue
            ar = self.manager._arena_by_ino.get(ino)
            if ar is None:
                raise error_for(errno.EBADMSG, "recovery", f"pid {self.pid}: store {ino} missing")
            if (start | end | off) % PAGE or end <= start or off + (end - start) > ar.size:
                raise error_for(
                    errno.EBADMSG, "recovery", f"pid {self.pid}: a snapshot entry is out of bounds"
                )
            check(
                lib.uf_rules_add(e, start, end - start, C.RULE_BUFFER, ar.base + off, -1, 0, 1),
                "recovery",
            )
            pages += (end - start) // PAGE
        # pages in self._recover_scratch are read into the store by _recover_finish
        return pages

    async def _recover_finish(self) -> None:
        """Pages that sat in the scratch area when the previous manager died: read them
        into the store and serve them from there."""
        runs = self._recover_scratch
        if not runs or self.uffd is None:
            return
        m = self.manager
        total = sum(n for _, n, _ in runs)
        off = m.arena.alloc(total)
        buf = m.arena.base + off
        m._extents.append(_Extent(m.arena, off, total))
        e = self.uffd._engine_handle()
        pos = 0
        local, remote, filled = [], [], []
        for start, n, scr in runs:
            check(lib.uf_rules_add(e, start, n, C.RULE_HOLD, buf + pos, -1, 0, 1), "recovery")
            local.append((buf + pos, n))
            remote.append((scr, n))
            filled.append((pos, n))
            pos += n
        await anyio.to_thread.run_sync(_readv, self.pid, local, remote)
        self._settle(buf, total, filled)
        self._recover_scratch = []  # (before the snapshot: they are store pages now)
        self._write_snapshot()

    # ---- statistics ----------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid, "ppid": self.ppid, **self.stats}
        if self.uffd is not None:
            out.update(self._final_uffd_stats or self.uffd.statistics())
        out["unmanaged_reason"] = self.unmanaged_reason
        return out


def _dead(pid: int) -> bool:
    """Whether pid has exited (a zombie counts; a pid already reused by another process
    does not: it is alive, and nothing of ours is let go for it)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        return bool(p.poll(0))  # a pidfd is readable once its process exited
    finally:
        os.close(fd)


def _wake_all(proc: ManagedProcess) -> None:
    """UFFDIO_WAKE every thread of proc waiting on a fault: one call over the whole user
    address space, or (where that range is refused: a smaller address space) one per
    mapping of /proc/PID/maps."""
    assert proc.uffd is not None
    fd = proc.uffd.fileno()
    if lib.uf_wake(fd, WAKE_START, WAKE_END - WAKE_START) == 0:
        return
    try:
        with open(f"/proc/{proc.pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return  # gone
    for line in lines:
        a, b = (int(x, 16) for x in line.split()[0].split("-"))
        lib.uf_wake(fd, a, b - a)


def _page_present(pid: int, addr: int) -> bool:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        entry = int.from_bytes(f.read(8), "little")
    return bool(entry >> 63)


def _registered(pid: int, start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) of pid's memory registered with a uffd for missing pages
    (VmFlags "um" in /proc/PID/smaps)."""
    out = []
    cur = (0, 0)
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[:1] in "0123456789abcdef":  # (a mapping's first line; the keys are capitalized)
                lo, _, hi = line.split(None, 1)[0].partition("-")
                cur = (int(lo, 16), int(hi, 16))
            elif line.startswith("VmFlags:") and cur[1] > start and cur[0] < end:
                if "um" in line.split()[1:]:
                    out.append((max(cur[0], start), min(cur[1], end)))
    return out


def _missing_page(proc: ManagedProcess) -> int | None:
    """A page of proc's scratch area that is not present in proc (pagemap) and that is
    registered (the agent unregisters a range of it for a moment to empty it; a child
    forked then keeps that range unregistered, and a probe there could never succeed)."""
    n = proc.scratch_len // PAGE
    with open(f"/proc/{proc.pid}/pagemap", "rb") as f:
        f.seek(proc.scratch // PAGE * 8)
        data = f.read(8 * n)
    reg = _registered(proc.pid, proc.scratch, proc.scratch + proc.scratch_len)
    first = None
    for k in range(n - 1, -1, -1):  # from the top: eviction batches fill from the bottom
        a = proc.scratch + k * PAGE
        if not int.from_bytes(data[8 * k : 8 * k + 8], "little") >> 63:
            if any(lo <= a < hi for lo, hi in reg):
                return a
            if first is None:
                first = a
    # (none registered as far as smaps said a moment ago: the top missing one, as before)
    return first


def _normalize(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, page-aligned, non-overlapping runs (overlapping or touching ones merged):
    eviction must never hold or move a page twice."""
    out: list[tuple[int, int]] = []
    for s, n in sorted(runs):
        e = s + n
        s &= ~(PAGE - 1)
        e = (e + PAGE - 1) & ~(PAGE - 1)
        if out and s <= out[-1][0] + out[-1][1]:
            ps, pn = out[-1]
            out[-1] = (ps, max(ps + pn, e) - ps)
        elif e > s:
            out.append((s, e - s))
    return out


def _parse_snapshot(data: bytes) -> tuple[int, array.array[int]] | None:
    """(number, entries) of a snapshot written by _write_snapshot, or by a manager of
    before 2026-11-27 (a memfd per snapshot: number 0); None if it is not whole."""
    words = array.array("Q")
    words.frombytes(data[: len(data) // 8 * 8])
    if len(words) >= 4 and words[0] == SNAP_MAGIC2:
        seq, body = words[3], words[4 : 4 + 4 * words[1]]
        if len(body) == 4 * words[1] and (seq + sum(body)) & 0xFFFFFFFFFFFFFFFF == words[2]:
            return seq, body
    elif len(words) >= 3 and words[0] == SNAP_MAGIC:
        body = words[3 : 3 + 4 * words[1]]
        if len(body) == 4 * words[1] and sum(body) & 0xFFFFFFFFFFFFFFFF == words[2]:
            return 0, body
    return None


def _hold_rules(e: CData, buf: int, nbytes: int) -> list[tuple[int, int, int]]:
    """Engine e's HOLD rules whose data goes to [buf, buf + nbytes), as (start, end,
    offset in the batch)."""
    cap = 256
    while True:
        quads = ffi.new("uint64_t[]", 4 * cap)
        n = lib.uf_rules_list(e, C.RULE_HOLD, quads, cap)
        if n < cap:
            return [
                (int(quads[4 * i]), int(quads[4 * i + 1]), int(quads[4 * i + 3]) - buf)
                for i in range(n)
                if buf <= quads[4 * i + 3] < buf + nbytes
            ]
        cap *= 4


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The common parts of two lists of (start, length) ranges, each sorted and without
    overlaps."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if lo < hi:
            out.append((lo, hi - lo))
        if a[i][0] + a[i][1] < b[j][0] + b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _mm_gone(proc: ManagedProcess) -> bool:
    """Whether the memory proc's uffd serves is gone (the process exited or exec'd)."""
    u = proc.uffd
    if u is None or u.closed:
        return False
    try:
        return not u.mm_alive()
    except UffdError:
        return False


def _holds_into(e: CData, buf: int, nbytes: int) -> bool:
    """Whether engine e has a HOLD rule whose data would go to [buf, buf + nbytes)."""
    return bool(_hold_rules(e, buf, nbytes))


async def _read_scratch(
    proc: ManagedProcess, scratch: int, buf: int, filled: list[tuple[int, int]]
) -> UffdError | None:
    """Read the moved pieces ``filled`` ((offset, length) in the batch) from proc's
    scratch area into the batch's store extent at buf.  Only the pages that are present:
    a hole there was a hole in the source (never touched: zeros, which the fresh extent
    already holds), and reading it would fault - a wait on our own engine, forever if the
    process died meanwhile.  Returns the error, or None."""
    try:
        present = await anyio.to_thread.run_sync(
            proc.present_ranges, [(scratch + o, n) for o, n in filled]
        )
        local = [(buf + (a - scratch), n) for a, n in present]
        got = await anyio.to_thread.run_sync(_readv, proc.pid, local, present) if present else 0
    except UffdError as exc:
        return exc
    want = sum(n for _, n in present)
    if got != want:
        return error_for(errno.EIO, "evict: process_vm_readv", f"read {got} of {want} bytes")
    return None


def _readv(pid: int, local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> int:
    """process_vm_readv between manager addresses and remote ranges, both as (addr, len)."""
    return check(
        lib.uf_process_vm_readv(pid, _flat(local), len(local), _flat(remote), len(remote)),
        "process_vm_readv",
        f"pid {pid}",
    )


class Spawned:
    """A program started by :meth:`Manager.spawn`."""

    def __init__(self, manager: Manager, popen: subprocess.Popen[bytes]) -> None:
        self.manager = manager
        self.popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None
        self.rusage: Any = None
        self._pidfd = os.pidfd_open(self.pid)

    async def process(self, timeout: float = 30.0) -> ManagedProcess:  # noqa: ASYNC109
        """The ManagedProcess of this program, once its agent has connected."""
        return await self.manager.wait_process(self.pid, timeout=timeout)

    async def wait(self) -> int:
        """Wait for exit; returns the exit code (negative signal number if killed, as
        subprocess does).  ``rusage`` holds the kernel's accounting (ru_maxrss...)."""
        if self.returncode is None:
            await anyio.wait_readable(self._pidfd)
            _pid, status, ru = os.wait4(self.pid, 0)  # noqa: ASYNC222 - it has exited
            self.rusage = ru
            self.returncode = os.waitstatus_to_exitcode(status)
            self.popen.returncode = self.returncode
            os.close(self._pidfd)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, sig)


class Manager:
    """Serve every agent that connects to ``socket_path`` (a fresh private path by default).

    Use as ``async with Manager() as m:``; on exit, processes still managed are given back
    (evicted pages brought back first) and the socket is removed.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        allow_other_users: bool | None = None,
        scan_interval: float = 1.0,
        swap: Swap | None = None,
    ) -> None:
        self._own_dir: str | None = None
        if socket_path is None:
            self._own_dir = tempfile.mkdtemp(prefix="uffdio-")
            socket_path = os.path.join(self._own_dir, "agent.sock")
        self.socket_path = os.fspath(socket_path)
        #: accept agents of other users (root only; default: only root may)
        self.allow_other_users = (
            os.geteuid() == 0 if allow_other_users is None else allow_other_users
        )
        #: seconds between scans that register mappings the program made without the
        #: interposed mmap (glibc's malloc arenas, thread stacks, brk growth); 0: never
        self.scan_interval = scan_interval
        #: userspace swap (page tables, a store, a policy) for every process; None: the
        #: plain eviction store of ManagedProcess.evict
        self.swap = swap
        self.processes: dict[int, ManagedProcess] = {}
        #: every process seen, exited ones included (for statistics)
        self.history: list[ManagedProcess] = []
        self.refused: list[tuple[int, str]] = []
        self.arena = Arena()
        self._arenas: list[Arena] = [self.arena]
        self._arena_by_ino: dict[int, Arena] = {self.arena.ino: self.arena}
        self._extents: list[_Extent] = []
        self._orphans: list[_Orphan] = []
        #: the served process of each uffd (by id(), while it is in self.processes)
        self._owner: dict[int, ManagedProcess] = {}
        #: orphans whose process is gone, being stopped and closed (_reap_orphans)
        self._reaping: list[_Orphan] = []
        #: how many _pair calls run (no orphan is closed under one)
        self._pairing = 0
        #: seconds between looks for orphans whose process is gone
        self.orphan_interval = 1.0
        #: fork-event uffds closed because their process was gone before its hello
        self.orphans_reaped = 0
        self._orphan_serial = 0
        #: fork children told to call again (their kept uffd not found yet), by pid
        self._pair_misses: dict[int, int] = {}
        #: fork children whose uffd a killed manager's agent kept, paired with it here
        self.orphans_taken_over = 0
        #: delays before pairing a fork child, and before welcoming a paired one (fault
        #: injection for the tests: they keep the child in its handshake - without, then
        #: with its uffd - while a test kills the manager)
        self._pair_delay = float(os.environ.get("UFFDIO_TEST_PAIR_DELAY_MS", "0") or 0) / 1000
        self._welcome_delay = float(os.environ.get("UFFDIO_TEST_WELCOME_DELAY_MS", "0") or 0) / 1000
        #: pages of a batch whose process died before reading them, read from a child
        #: forked during it (plain path; see ManagedProcess._rescue_batch)
        self.pages_rescued = 0
        self._new_process = anyio.Event()
        self._lsock: socket.socket | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.recovered_pages = 0
        #: a Swap made here to take over a dead manager's swapped-out processes (this
        #: manager was started without one)
        self._own_swap = False

    # ---- lifecycle ------------------------------------------------------------------------

    def _listen(self) -> socket.socket:
        path = self.socket_path
        if os.path.lexists(path):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise error_for(
                    errno.EEXIST,
                    "manager socket",
                    f"{path} exists and is not a socket; choose another path (--socket)",
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # stale: its manager is gone; we take over its agents
            else:
                raise error_for(
                    errno.EADDRINUSE,
                    "manager socket",
                    f"another manager is listening on {path}; stop it or choose another "
                    "path (--socket)",
                )
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            s.bind(path)
        except OSError as exc:
            s.close()
            raise error_for(
                exc.errno or errno.EIO, "manager socket", f"bind {path}: {exc.strerror}"
            ) from None
        finally:
            os.umask(old)
        if self.allow_other_users:
            os.chmod(path, 0o777)  # the agent of any user may connect; SO_PEERCRED decides
        s.listen(64)
        s.setblocking(False)
        return s

    async def __aenter__(self) -> Manager:
        self._lsock = self._listen()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._accept_loop)
        self._tg.start_soon(self._reap_orphans)
        if self.swap is not None:
            self.swap.manager = self
            self._tg.start_soon(self.swap.run)
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        assert self._tg is not None
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                for p in list(self.processes.values()):
                    if p.managed:
                        with contextlib.suppress(Exception):
                            await p.release()
        finally:
            self._tg.cancel_scope.cancel()
            try:
                res = await self._tg.__aexit__(*exc)  # type: ignore[arg-type]
            except BaseExceptionGroup as eg:
                inner = _sole(eg)  # the body's own error, not wrapped in a group
                if inner is eg:
                    raise
                raise inner from None
            finally:
                self._close()
        return res

    def _close(self) -> None:
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
            if self._own_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(self._own_dir)
        for o in self._orphans + self._reaping:
            o.close()
        for p in self.history:
            p._close_state()
            if p.uffd is not None:
                p.uffd.close()
        for ar in self._arenas:
            ar.close()
        self._arenas = []
        if self._own_swap and self.swap is not None:
            self.swap.close()

    # ---- starting programs -------------------------------------------------------------------

    def agent_environment(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """``env`` (default: os.environ) plus what loads the agent and points it here."""
        out = dict(os.environ if env is None else env)
        out[P.ENV_SOCK] = self.socket_path
        pre = out.get("LD_PRELOAD", "")
        out["LD_PRELOAD"] = library_path() + (" " + pre if pre else "")
        # write-protect registration only where clean pages are tracked (userspace swap)
        if self.swap is not None:
            out["UFFDIO_AGENT_WP"] = "1"
        else:
            out.pop("UFFDIO_AGENT_WP", None)
        return out

    def spawn(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, **popen: Any
    ) -> Spawned:
        """Start ``argv`` with the agent; returns at once (see :meth:`Spawned.process`)."""
        try:
            proc = subprocess.Popen(list(argv), env=self.agent_environment(env), **popen)
        except FileNotFoundError as exc:
            raise error_for(errno.ENOENT, "spawn", f"{argv[0]}: command not found") from exc
        return Spawned(self, proc)

    async def attach(self, pid: int) -> ManagedProcess:
        """Take charge of the running process ``pid`` with ptrace (see uffdio.attach)."""
        from .attach import attach

        return await attach(self, pid)

    async def _start_attached(self, proc: ManagedProcess) -> None:
        assert self._tg is not None and proc.uffd is not None
        pidfd = os.pidfd_open(proc.pid)
        proc._scope = anyio.CancelScope()
        self._add(proc)
        await self._tg.start(self._serve_uffd, proc.uffd, proc._scope)

        async def watch() -> None:
            try:
                await anyio.wait_readable(pidfd)
                proc.exited = True
            finally:
                os.close(pidfd)
                self._retire(proc)

        self._tg.start_soon(watch)

    async def wait_process(self, pid: int, timeout: float = 30.0) -> ManagedProcess:  # noqa: ASYNC109
        with anyio.fail_after(timeout):
            while pid not in self.processes:
                ev = self._new_process
                await ev.wait()
        return self.processes[pid]

    # ---- agents ----------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        assert self._lsock is not None and self._tg is not None
        while True:
            await anyio.wait_readable(self._lsock)
            try:
                conn, _ = self._lsock.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            self._tg.start_soon(self._connection, conn)

    async def _connection(self, conn: socket.socket) -> None:
        proc: ManagedProcess | None = None
        try:
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", cred)
            hello = await P.recv(conn)
            if hello is None or hello.type != P.A_HELLO:
                return
            if uid != os.geteuid() and not self.allow_other_users:
                reason = (
                    f"pid {pid} belongs to uid {uid}: a manager manages only its own user's "
                    "processes unless it runs as root"
                )
                self.refused.append((pid, reason))
                log.warning("refused: %s", reason)
                if hello.fd >= 0:
                    os.close(hello.fd)
                await P.send(conn, P.pack(P.M_WELCOME, a=-errno.EPERM))
                return
            proc = await self._hello(conn, hello, uid)
            if proc is None:
                return
            await self._run(proc)
        except (anyio.get_cancelled_exc_class(), KeyboardInterrupt):
            raise
        except Exception as exc:  # one bad agent must not take the manager down
            log.warning("agent connection failed: %s", exc, exc_info=True)
        finally:
            conn.close()
            if proc is not None:
                self._retire(proc)

    async def _hello(self, conn: socket.socket, h: P.Msg, uid: int) -> ManagedProcess | None:
        kept: dict[int, int] = {}
        nkept = h.words[5] if len(h.words) > 5 else 0
        for _ in range(nkept):
            k = await P.recv(conn)
            if k is None or k.type != P.A_KEPT:
                break
            if k.fd >= 0:
                kept[k.a] = k.fd
        # fork children's uffds that its agent keeps for us (see _keep_orphan)
        orphan_fds = {t: kept.pop(t) for t in [t for t in kept if t >= TAG_ORPHAN]}
        try:
            proc = await self._hello_kept(conn, h, uid, kept)
            if proc is not None and h.flags & P.AF_RECONNECT:
                self._take_kept_orphans(proc, orphan_fds)
            return proc
        finally:
            for fd in orphan_fds.values():
                os.close(fd)

    async def _hello_kept(
        self, conn: socket.socket, h: P.Msg, uid: int, kept: dict[int, int]
    ) -> ManagedProcess | None:
        pid, ppid = h.a, h.b
        words = h.words
        old = self.processes.get(pid)
        superseded: ManagedProcess | None = None
        if old is not None and h.flags & P.AF_RECONNECT:
            superseded = old
            # the same process, whose connection to us broke, calling again before we
            # saw that connection end: stop serving it the old way first
            await self._supersede(old)
        elif old is not None:  # exec: the old image and its mm are gone
            self._retire(old, execed=True)
        proc = ManagedProcess(self, pid, ppid, conn)
        proc.uid = uid
        if len(words) >= 3:
            proc.agent_version, proc.scratch, proc.scratch_len = words[0], words[1], words[2]
        proc.event_fork = bool(h.flags & P.AF_EVENT_FORK)
        uffd_fd = h.fd
        if h.c < 0:
            proc.unmanaged_reason = _unmanaged_reason(-h.c)
            log.warning("pid %d runs unmanaged: %s", pid, proc.unmanaged_reason)
            await P.send(conn, P.pack(P.M_WELCOME))
            proc._welcomed.set()
            self._add(proc)
            return None
        proc.features = Feature(h.c)
        if uffd_fd < 0 and h.flags & P.AF_FORKED:
            if self._pair_delay:
                await anyio.sleep(self._pair_delay)
            orphan = await self._pair(proc)
            if orphan is None and h.flags & P.AF_RECONNECT:
                misses = self._pair_misses[pid] = self._pair_misses.get(pid, 0) + 1
                log.info(
                    "pid %d (forked, calling again): no uffd of the %d kept ones is its own yet",
                    pid,
                    sum(o.kept is not None for o in self._orphans),
                )
                if misses == 6:  # (a minute)
                    reason = (
                        f"pid {pid}, forked just before its manager was killed, cannot be"
                        " paired with a uffd kept for it (none was kept, or its scratch area"
                        " was unregistered for a zap at the fork: the probe cannot reach"
                        " it); it waits, never served zeros - end it"
                    )
                    log.error("%s", reason)
                    if self.swap is not None:
                        self.swap._error(reason)
                # a fork child whose manager was killed before its agent had its uffd:
                # the agent keeping that uffd for it may call us later - call again (it
                # waits in fork() meanwhile, as long as its memory is registered)
                await P.send(conn, P.pack(P.M_WELCOME, a=-errno.EAGAIN))
                return None
            if orphan is None:
                proc.unmanaged_reason = "its uffd from the fork event could not be matched"
                await P.send(conn, P.pack(P.M_WELCOME, a=-errno.ESRCH))
                proc._welcomed.set()
                self._add(proc)
                return None
            proc.uffd = orphan.uffd
            self._pair_misses.pop(pid, None)
            if orphan.kept is not None:
                # served from now on (not before: see _Orphan.kept)
                self._take_kept_table(proc, orphan)
            else:
                proc._orphan = orphan
                proc.table_ino = orphan.table_ino
                proc._scope = orphan.scope
            # the child keeps a duplicate, so that it survives us like any other
            await P.send(conn, P.pack(P.M_GIVE_UFFD), os.dup(orphan.uffd.fileno()))
        elif uffd_fd >= 0:
            u = Userfaultfd.from_fd(uffd_fd, int(proc.features))
            self._setup_uffd(u)
            proc.uffd = u
        else:
            proc.unmanaged_reason = "the agent sent no uffd"
            await P.send(conn, P.pack(P.M_WELCOME, a=-errno.EBADF))
            proc._welcomed.set()
            self._add(proc)
            return None
        if h.flags & P.AF_RECONNECT:
            store = kept.get(TAG_STORE)
            states = [fd for fd in (kept.get(TAG_STATE, -1), kept.get(TAG_STATE_B, -1)) if fd >= 0]
            table = kept.pop(TAG_SWAP_TABLE, -1)
            sstore, sfile = kept.pop(TAG_SWAP_STORE, -1), kept.pop(TAG_SWAP_FILE, -1)
            if table >= 0:
                # pages of its are in a dead manager's swap store: Swap.attach takes the
                # table and the store over (see Swap._adopt)
                proc.swap_kept = (table, sstore, sfile)
                proc.table_ino = os.fstat(table).st_ino
                self._drop_kept_twins(proc.table_ino)
                self._need_swap()
            elif proc.swap_kept is None and h.flags & P.AF_TABLE_LOST:
                # a fork child given its uffd but not its table before its manager was
                # killed: the agent up its fork chain that kept both may have brought
                # them (the kept uffd is the child's own: the probe finds it)
                o = await self._pair(proc, kept_only=True)
                if o is not None:
                    self._take_kept_table(proc, o)
                    o.uffd.close()  # (a second descriptor of proc.uffd's)
                else:
                    proc.swap_lost = True
            if table < 0:
                for fd in (sstore, sfile):
                    if fd >= 0:
                        os.close(fd)
            if store is not None:
                ino = os.fstat(store).st_ino
                if ino not in self._arena_by_ino:
                    ar = Arena(store)
                    self._arenas.append(ar)
                    self._arena_by_ino[ino] = ar
                else:
                    os.close(store)
            try:
                snaps = [os.pread(fd, 1 << 30, 0) for fd in states]
                if uid != os.geteuid():
                    # its memfds are writable by it (rules that could point anywhere in a
                    # store): a connection of its to this manager is restored from what
                    # this manager wrote last; a snapshot of a dead manager's only if empty
                    if superseded is not None and superseded._last_snapshot is not None:
                        snaps = [superseded._last_snapshot]
                    elif any(len((_parse_snapshot(d) or (0, ()))[1]) for d in snaps):
                        raise error_for(
                            errno.EPERM,
                            "takeover",
                            f"pid {pid} belongs to uid {uid}: the recovery snapshot of a dead"
                            " manager is taken over only from processes of its own user",
                        )
                if snaps:
                    self.recovered_pages += proc._restore(snaps)
            except UffdError as exc:
                # not served (its threads keep waiting; see _hold), and its agent keeps
                # the snapshot it had
                proc._restore_error = exc
                for t in (TAG_STATE, TAG_STATE_B):
                    fd = kept.pop(t, -1)
                    if fd >= 0:
                        os.close(fd)
            else:
                proc._open_state(kept)  # (takes the two state memfds over, or makes new)
            proc.resumed = True
        else:
            proc._open_state({})
            for fd in kept.values():
                os.close(fd)
        self._add(proc)
        return proc

    def _sweep_scratch(self) -> None:
        """Processes whose scratch area was left full at their connection's start (a
        batch of their parent's was open, see ManagedProcess._inherits_batch) have it
        emptied once that batch is closed (after each settle; every interval with swap)."""
        if self._tg is None:
            return
        for q in list(self.processes.values()):
            if q._scratch_dirty and not q._sweeping and not q.exited and not q._inherits_batch():
                q._sweeping = True
                self._tg.start_soon(q._empty_scratch_soon)

    def _need_swap(self) -> None:
        """A process whose pages are in a dead manager's swap store reconnected to a manager
        started without userspace swap: serve them anyway (no limit, policy "none")."""
        if self.swap is not None:
            return
        from .swap import Swap

        self.swap = Swap(limit=None, policy="none")
        self._own_swap = True
        self.swap.manager = self
        assert self._tg is not None
        self._tg.start_soon(self.swap.run)
        log.warning(
            "a process had pages in a killed manager's swap store: serving them without a"
            " limit (start with --limit to keep one)"
        )

    def _add(self, proc: ManagedProcess) -> None:
        self.processes[proc.pid] = proc
        if proc.uffd is not None:
            self._owner[id(proc.uffd)] = proc
        self.history.append(proc)
        ev, self._new_process = self._new_process, anyio.Event()
        ev.set()

    def _setup_uffd(self, u: Userfaultfd) -> None:
        u.engine_flags = C.ENGINE_DEFAULT_ZERO
        u.on_fork_child = self._on_fork_child
        # (a fork child's uffd gets these handlers too: they look its process up)
        for kind in (C.Event.REMAP, C.Event.UNMAP, C.Event.REMOVE):
            u.on_event(kind, self._after_event)

    async def _after_event(self, ev: Any) -> None:
        """An event moved or dropped rules (the engine applied it in C): the recovery
        snapshot says so at once.  A manager killed after a program's mremap of evicted
        pages would otherwise leave its successor the rules at their old addresses - the
        pages at the new ones would read as zeros, and memory mapped anew at the old ones
        would get their contents.  (What stays open: the moment between the engine's read
        of the event and this write.)"""
        proc = self._owner.get(id(ev.uffd))
        if proc is not None and proc.uffd is ev.uffd and not proc.exited:
            if proc._batch_span is not None or lib.uf_rules_count(proc.uffd._engine_handle()):
                proc._write_snapshot()

    async def _on_fork_child(self, child: Userfaultfd) -> None:
        """EVENT_FORK: serve the child's uffd at once (its threads fault as soon as fork()
        returns); its agent says hello soon and is matched to it by _pair."""
        assert self._tg is not None
        parent_uffd, child.fork_parent = child.fork_parent, None
        child.on_fork_child = self._on_fork_child
        scope = anyio.CancelScope()
        o = _Orphan(child, 0, scope)
        self._orphans.append(o)
        # (not start(): a cancellation of the parent's server - its process exiting right
        # after the fork - while it waited for the child's to start would cancel that too)
        self._tg.start_soon(self._serve_uffd, child, scope)
        self._keep_orphan(o, parent_uffd)

    def _keep_orphan(self, o: _Orphan, parent_uffd: Userfaultfd | None) -> None:
        """Have the agent of the nearest process up o's fork chain (from parent_uffd, the
        uffd whose FORK message made o's) keep o's uffd and page
        table (with its store) until the child's own agent has them (_release_orphan).
        Until then they are only ours: were we killed, the kernel would unregister the
        child's memory with our last descriptor of its uffd, and every page its parent
        had evicted would read as zeros in it.  Kept, they reach the next manager with
        the holder's other kept descriptors; the child's threads wait on their faults
        meanwhile, and its agent (calling again, FORKED) is paired with them there
        (_take_kept_orphans).  Only under userspace swap: a page table is the whole
        record of a child's evicted pages (the plain path's rules are not kept)."""
        # (no await in here: this runs in the parent's shielded fork hand-over, and the
        # orphan can be neither paired nor reaped before its holder is recorded)
        if self.swap is None or o.uffd._engine is None:
            return
        pt = lib.uf_engine_pt(o.uffd._engine)  # (a reference of ours)
        if pt == ffi.NULL:
            return
        try:
            table, sfd = lib.uf_pt_fd(pt), lib.uf_pt_store_fd(pt)
            if table < 0 or sfd < 0:
                return  # (a Python store: never taken over)
            o.table_ino = os.fstat(table).st_ino
            holder = self._holder_of(parent_uffd)
            if holder is None:
                return
            fds = (o.uffd.fileno(), table, sfd, lib.uf_pt_store_file_fd(pt))
            n = self._orphan_serial
            self._orphan_serial += 1
            tags = []
            for k, fd in enumerate(fds):
                if fd < 0:
                    continue
                tag = TAG_ORPHAN + 4 * n + k
                try:
                    # never waits: a holder whose agent does not read its socket must
                    # not stall the parent's events (the child is then not covered)
                    P.send_now(holder._sock, P.pack(P.M_KEEP_FD, 0, 0, tag), fd)
                except OSError as exc:
                    log.debug("pid %d: keeping a fork child's uffd: %s", holder.pid, exc)
                    break
                tags.append(tag)
            o.holder, o.tags = holder, tuple(tags)
        finally:
            lib.uf_pt_unref(pt)

    def _holder_of(self, u: Userfaultfd | None) -> ManagedProcess | None:
        """The process, up the fork chain from uffd u, whose agent can keep descriptors:
        u's own, or the nearest ancestor's when u is itself a child not paired yet."""
        if u is None:
            return None
        proc = self._owner.get(id(u))
        if proc is not None and proc.uffd is u:
            ok = (
                proc._welcomed.is_set()
                and not proc._gone.is_set()
                and not proc.exited
                and proc.unmanaged_reason is None
                and proc.uid == os.geteuid()  # (a store is never another user's)
            )
            return proc if ok else None
        # a child not paired yet: its holder keeps this one too
        return next((x.holder for x in self._orphans if x.uffd is u), None)

    async def _release_orphan(self, o: _Orphan) -> None:
        """The holder's agent drops what it kept of o (see _keep_orphan): o's process has
        them itself now, or is gone."""
        holder, tags = o.holder, o.tags
        o.holder, o.tags = None, ()
        if holder is not None and tags:
            await self._drop_kept(holder, tags)

    async def _drop_kept(self, holder: ManagedProcess, tags: tuple[int, ...]) -> None:
        with anyio.move_on_after(30):
            await holder._welcomed.wait()
        if holder._gone.is_set():
            # its agent may have called again (the same process, a new connection)
            cur = self.processes.get(holder.pid)
            if cur is None or cur is holder or cur._gone.is_set():
                return
            holder = cur
            with anyio.move_on_after(30):
                await holder._welcomed.wait()
        try:
            for tag in tags:
                await P.send(holder._sock, P.pack(P.M_KEEP_FD, 0, 0, tag))
        except OSError as exc:
            log.debug("pid %d: dropping a fork child's uffd: %s", holder.pid, exc)

    def _take_kept_orphans(self, holder: ManagedProcess, fds: dict[int, int]) -> None:
        """A process calling again (its manager was killed) brought the uffds and page
        tables of fork children that were not paired with theirs yet (_keep_orphan):
        each becomes an orphan here - not served until its child is paired with it (its
        table must first be made true from that process: Swap._adopt).  A group we do
        not take is dropped by the holder too: a uffd nobody serves would keep its
        child waiting for ever."""
        groups: dict[int, dict[int, int]] = {}
        for t in list(fds):
            n, k = divmod(t - TAG_ORPHAN, 4)
            groups.setdefault(n, {})[k] = fds.pop(t)
        if groups:
            # (our serials must not reuse a tag the holder keeps: a drop of ours would
            # then take another child's copies)
            self._orphan_serial = max(self._orphan_serial, max(groups) + 1)
        for n, g in sorted(groups.items()):
            tags = tuple(TAG_ORPHAN + 4 * n + k for k in sorted(g))
            try:
                taken = self._take_kept_orphan(holder, g, tags)
            except (OSError, UffdError) as exc:
                log.warning("pid %d: a fork child's uffd it kept: %s", holder.pid, exc)
                taken = False
            for fd in g.values():  # (what was not taken)
                os.close(fd)
            if not taken and self._tg is not None:
                self._tg.start_soon(self._drop_kept, holder, tags)

    def _take_kept_orphan(
        self, holder: ManagedProcess, g: dict[int, int], tags: tuple[int, ...]
    ) -> bool:
        """One group of _take_kept_orphans: whether it became an orphan (its descriptors
        then leave g; those left in g are the caller's to close)."""
        if holder.uid != os.geteuid() or any(k not in g for k in (0, 1, 2)):
            return False  # (another user's: a store is never taken from one; incomplete)
        st = os.fstat(g[1])
        ino = st.st_ino
        twin = next((o for o in self._orphans if o.table_ino == ino), None)
        if twin is not None:
            # one we have already: from an earlier connection of this holder (the same
            # copies, under the same tags)
            twin.holder, twin.tags = holder, tags
            return True
        if any(q.table_ino == ino for q in self.processes.values()):
            return False  # its process has its own copies already
        if (
            not stat.S_ISREG(st.st_mode)
            or os.readlink(f"/proc/self/fd/{g[0]}") != "anon_inode:[userfaultfd]"
        ):
            return False
        u = Userfaultfd.from_fd(g.pop(0), int(holder.features))
        self._setup_uffd(u)
        kept = (g.pop(1), g.pop(2), g.pop(3, -1))
        self._orphans.append(
            _Orphan(
                u,
                holder.pid,
                anyio.CancelScope(),
                holder=holder,
                tags=tags,
                table_ino=ino,
                kept=kept,
            )
        )
        log.info("pid %d kept the uffd of a fork child of its for us", holder.pid)
        return True

    def _take_kept_table(self, proc: ManagedProcess, o: _Orphan) -> None:
        """proc was paired with o, an orphan a killed manager's agent kept (_Orphan.kept):
        its page table and store are taken over like those of any process that calls
        again (Swap._adopt); the holder drops its copies once proc's agent has them."""
        assert o.kept is not None
        proc.swap_kept, o.kept = o.kept, None
        proc.table_ino = o.table_ino
        proc._orphan = o
        proc.resumed = True
        self.orphans_taken_over += 1
        self._need_swap()

    def _drop_kept_twins(self, ino: int) -> None:
        """A process calling again brought its own page table (inode ino): an orphan taken
        over with the same table is its uffd too (kept by a holder that was not told to
        drop it before the manager died) - closed, and the holder drops it."""
        for o in [o for o in self._orphans if o.kept is not None and o.table_ino == ino]:
            self._orphans.remove(o)
            o.close()
            if self._tg is not None:
                self._tg.start_soon(self._release_orphan, o)

    async def _serve_uffd(
        self,
        u: Userfaultfd,
        scope: anyio.CancelScope,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            await u.serve(thread=True, task_status=task_status)

    async def _reap_orphans(self) -> None:
        """Close the fork-event uffds of children that are gone before their agent said
        hello: a grandchild that exits at once, a child that exec'd (its new image says
        hello with a uffd of its own).  Their engine threads and the page tables they hold,
        and with those the store pages of memory evicted before the fork, would otherwise
        stay until the manager ends.  Only a uffd whose memory the kernel says is gone
        (Userfaultfd.mm_alive) is closed: nothing can fault on it any more.  A child that
        lives keeps its uffd, however long its hello takes."""
        while True:
            await anyio.sleep(self.orphan_interval)
            if self._pairing or not self._orphans:
                continue
            # (no await from here to the cancels: a _pair that starts later does not see them)
            dead = []
            for o in self._orphans:
                if o.uffd._engine is not None and lib.uf_engine_nforks(o.uffd._engine):
                    continue  # a FORK it read is not delivered yet: its child's uffd with it
                try:
                    if not o.uffd.mm_alive():
                        dead.append(o)
                except UffdError as exc:
                    log.debug("fork-event uffd: %s", exc)
            for o in dead:
                self._orphans.remove(o)
                self._reaping.append(o)
                o.scope.cancel()
            for o in dead:
                for _ in range(500):
                    if not o.uffd._serving:
                        break
                    await anyio.sleep(0.01)
                if o.uffd._serving:
                    log.warning("a fork-event uffd's engine did not stop; it is closed at exit")
                    continue
                await o.uffd.hand_over_forks()  # (a FORK read after the look above)
                o.close()
                self.orphans_reaped += 1
                self._reaping.remove(o)
                await self._release_orphan(o)

    async def _pair(self, proc: ManagedProcess, kept_only: bool = False) -> _Orphan | None:
        """Find which fork-event uffd belongs to ``proc``.  For each candidate: pick a page
        of proc's scratch area that is missing in proc, write a fresh token page there
        through the candidate uffd, and look at proc's page: only the uffd of proc's own mm
        puts it where proc sees it.  proc's page is read only when the page map says it is
        present, so a wrong candidate never faults a page in (which would make the right
        one's copy fail with EEXIST later)."""
        self._pairing += 1
        try:
            return await self._pair_once(proc, kept_only)
        finally:
            self._pairing -= 1

    async def _pair_once(self, proc: ManagedProcess, kept_only: bool) -> _Orphan | None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for o in list(self._orphans):
                if kept_only and o.kept is None:
                    continue
                try:
                    probe = await anyio.to_thread.run_sync(_missing_page, proc)
                except OSError:
                    return None  # it exited
                if probe is None:
                    log.info("pid %d: no missing page in its scratch area", proc.pid)
                    return None
                token = os.urandom(16) * (PAGE // 16)
                try:
                    if o.kept is not None:
                        # nobody reads it: an event pending on it (its process blocked in
                        # a fork or a munmap) would fail this with EAGAIN until its hello
                        o.uffd.copy_nowait(probe, token, PAGE)
                    else:
                        await o.uffd.copy(probe, token, PAGE)
                except UffdError:
                    continue  # EEXIST: present in the candidate's process, so not proc's
                if not await anyio.to_thread.run_sync(_page_present, proc.pid, probe):
                    continue
                got = bytearray(PAGE)
                try:
                    await anyio.to_thread.run_sync(
                        _readv,
                        proc.pid,
                        [(int(ffi.cast("uintptr_t", ffi.from_buffer(got))), PAGE)],
                        [(probe, PAGE)],
                    )
                except UffdError:
                    return None
                if bytes(got) == token:
                    self._orphans.remove(o)
                    return o
            await anyio.sleep(0.005)  # the fork event may not have been read yet
        log.info("pid %d: no candidate uffd put a probe page in its scratch area", proc.pid)
        return None

    async def _run(self, proc: ManagedProcess) -> None:
        """Serve one managed process until it exits or its agent disconnects."""
        assert proc.uffd is not None
        conn = proc._sock
        pidfd = -1
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(proc.pid)
        try:
            try:
                if proc.swap_lost:
                    raise error_for(
                        errno.EBADMSG,
                        "takeover",
                        f"pid {proc.pid} was forked just before its manager was killed, and its"
                        " page table (the only record of which of its pages were evicted) never"
                        " reached it",
                    )
                if proc._restore_error is not None:
                    raise proc._restore_error
                if self.swap is not None:
                    self.swap.attach(proc)
            except UffdError as exc:
                if not proc.resumed:
                    raise
                await self._hold(proc, str(exc))
                return
            async with anyio.create_task_group() as tg:
                if proc._scope is None:  # not already served (a fork child is)
                    proc._scope = anyio.CancelScope()
                    await tg.start(self._serve_uffd, proc.uffd, proc._scope)
                if proc.resumed:
                    # Faults the dead manager had read but not resolved are lost with it;
                    # their threads still wait - the agent's own thread among them, maybe,
                    # and nothing below gets done without it.  Wake the whole address
                    # space now that we serve: a thread whose page is still missing faults
                    # again, to us.
                    _wake_all(proc)
                tg.start_soon(self._reader, proc, tg)
                if pidfd >= 0:
                    tg.start_soon(self._watch_exit, proc, pidfd, tg)
                try:
                    if proc._orphan is not None and self._welcome_delay:
                        await anyio.sleep(self._welcome_delay)
                    await P.send(conn, P.pack(P.M_WELCOME, a=1 if proc.resumed else 0))
                    proc._welcomed.set()
                    if proc._state_new:
                        # the recovery snapshots' memfds (written in place from now on)
                        for tag, fd in zip((TAG_STATE, TAG_STATE_B), proc._state_fds, strict=True):
                            await P.send(conn, P.pack(P.M_KEEP_FD, 0, 0, tag), fd)
                        proc._state_new = False
                    if proc.uid == os.geteuid():
                        # (a store holds every process's pages: never in another user's)
                        await P.send(conn, P.pack(P.M_KEEP_FD, 0, 0, TAG_STORE), self.arena.fd)
                    if self.swap is not None:
                        # the page table and its store outlive us in the agent
                        for tag, fd in self.swap.kept_fds(proc):
                            await P.send(conn, P.pack(P.M_KEEP_FD, 0, 0, tag), fd)
                    if proc.resumed:
                        await proc._recover_finish()
                    # empty the scratch area: a paired child's probe page, or a copy of
                    # pages its parent was evicting when it forked - unless that batch is
                    # still open: should the parent die before reading it, this copy is
                    # the only one (see _rescue_batch); then before its first batch
                    async with proc._evict_lock:  # never under a MOVE in flight
                        if proc._inherits_batch():
                            proc._scratch_dirty = True
                        else:
                            await proc._zap_present_scratch()
                    if self.swap is not None:
                        # only now may the policy evict it: before, its evict lock was
                        # held for the zap, which its agent answers only once its thread
                        # runs - a policy waiting on the lock evicted nothing meanwhile,
                        # and a thread of its waiting at the limit never got room
                        self.swap.kept(proc)
                    if proc._orphan is not None:
                        # its agent has its uffd and table (the messages above): the
                        # holder's copies can go
                        o, proc._orphan = proc._orphan, None
                        await self._release_orphan(o)
                    await proc.scan()
                    proc._write_snapshot()
                    if proc.resumed:
                        # Faults the dead manager had read but not resolved are lost with
                        # it; their threads still wait.  Wake every registered range: a
                        # thread whose page is still missing faults again, to us.
                        for s, n in proc.regions:
                            lib.uf_wake(proc.uffd.fileno(), s, n)
                except (UffdProcessGone, BrokenPipeError, ConnectionError):
                    pass  # it exited or exec'd already
                if self.scan_interval > 0:
                    tg.start_soon(self._rescan, proc)
                await proc._gone.wait()
                tg.cancel_scope.cancel()
        finally:
            proc._welcomed.set()  # (whatever happened: nobody waits for it forever)
            if pidfd >= 0:
                os.close(pidfd)
            if proc._orphan is not None and self._tg is not None:
                # (it exited, or its connection ended, before its agent had its uffd)
                o, proc._orphan = proc._orphan, None
                self._tg.start_soon(self._release_orphan, o)

    async def _hold(self, proc: ManagedProcess, reason: str) -> None:
        """A process whose manager was killed and whose pages cannot be taken over: serving
        it would give it zeros where its evicted pages were.  It is not served - its
        threads keep waiting on their faults (the agent's uffd keeps the registrations) -
        and it is reported; the connection stays open until it ends, so that its agent
        does not call again and again."""
        reason += ": it is not served (its threads wait; no page is given as zeros) - end it"
        proc.unmanaged_reason = reason
        log.error("pid %d: %s", proc.pid, reason)
        if self.swap is not None:
            self.swap._error(reason)
        if proc.uffd is not None:
            self._owner.pop(id(proc.uffd), None)
            proc.uffd.close()  # ours: the agent's duplicate keeps the registrations
            proc.uffd = None
        conn = proc._sock
        with contextlib.suppress(OSError):
            await P.send(conn, P.pack(P.M_WELCOME))
            proc._welcomed.set()
            while (msg := await P.recv(conn)) is not None:
                if msg.fd >= 0:
                    os.close(msg.fd)

    async def _rescan(self, proc: ManagedProcess) -> None:
        while True:
            await anyio.sleep(self.scan_interval)
            try:
                async with proc._evict_lock:  # not in the middle of an eviction
                    await proc.scan()
            except (UffdProcessGone, BrokenPipeError, ConnectionError):
                return

    async def _reader(self, proc: ManagedProcess, tg: anyio.abc.TaskGroup) -> None:
        try:
            while True:
                msg = await P.recv(proc._sock)
                if msg is None:
                    break
                if msg.type == P.A_REPLY:
                    proc._on_reply(msg)
                elif msg.type == P.A_FENCE:
                    tg.start_soon(proc._fence, msg.seq)
                elif msg.type == P.A_FENCE_END:
                    proc._fenced = max(0, proc._fenced - 1)
                elif msg.type == P.A_YIELD:
                    tg.start_soon(proc._yield_range, msg.seq, msg.a, msg.b)
                elif msg.type == P.A_RELEASE:
                    tg.start_soon(proc.release)
                elif msg.type == P.A_THREAD:
                    proc.agent_tid = msg.a
                    if self.swap is not None:
                        self.swap.exempt(proc)
                elif msg.fd >= 0:
                    os.close(msg.fd)
        except OSError:
            pass
        finally:
            # (cancelled too - the manager ending: a shielded eviction waiting for the
            # agent's answer must not wait forever)
            proc._fail_replies()
            proc._gone.set()

    async def _watch_exit(self, proc: ManagedProcess, pidfd: int, tg: anyio.abc.TaskGroup) -> None:
        await anyio.wait_readable(pidfd)
        proc.exited = True
        proc._fail_replies()
        proc._gone.set()

    def _retire(self, proc: ManagedProcess, execed: bool = False) -> None:
        if proc._scope is not None:
            proc._scope.cancel()
        proc.exited = True
        if not proc._superseded:
            proc._close_state()  # (superseded: _release_uffd writes the last one first)
        # (an exec is often seen only as the end of the old connection - the agent's socket
        # closes on exec - before the new image says hello: its old memory is gone)
        gone = execed or _dead(proc.pid) or _mm_gone(proc)
        if proc._stuck_batch is not None and gone:
            # a plain batch whose pages could not be read, its holds left in place while
            # the process lived; now its old memory is gone: children forked during it
            # have the pages (see _rescue_batch), or nobody needs them
            stuck, proc._stuck_batch = proc._stuck_batch, None
            proc._abandon_batch(*stuck)
        if self.swap is not None:
            if gone or proc.given_back:
                # (alive - its agent lost us - its pages wait in the store for whoever
                # takes it over: see uf_pt_keep)
                self.swap.let_go(proc)
            self.swap.detach(proc, gone=gone)
        if proc.swap_kept is not None:
            for fd in proc.swap_kept:
                if fd >= 0:
                    os.close(fd)
            proc.swap_kept = None
        if self.processes.get(proc.pid) is proc:
            del self.processes[proc.pid]
        if proc.uffd is not None and self._owner.get(id(proc.uffd)) is proc:
            del self._owner[id(proc.uffd)]
        if self._tg is not None and proc.uffd is not None and _dead(proc.pid):
            self._tg.start_soon(self._release_uffd, proc)

    async def _supersede(self, old: ManagedProcess) -> None:
        """old's agent reconnected (AF_RECONNECT: the same mm, the same uffd) while old is
        still served.  Its engine and its page table must be stopped before the new ones
        start: two engines would split the uffd's messages, and the new page table is
        taken over from the memfd the old one writes (Swap._adopt) - two tables on one
        memfd, under two locks, would lose pages.  The old table keeps its store
        references (uf_pt_keep): from now on they are the new table's."""
        old._superseded = True
        self._retire(old)
        if not await self._release_uffd(old, wait=30.0, last_snapshot=True):
            raise error_for(
                errno.EBUSY,
                "reconnect",
                f"pid {old.pid}: its old connection's fault engine did not stop in 30 s",
            )

    async def _release_uffd(
        self, proc: ManagedProcess, wait: float = 5.0, last_snapshot: bool = False
    ) -> bool:
        """Close the uffd of a process that exited (or whose old connection a reconnect
        superseded): its engine, its page table and the store pages it held go with it (a
        long-running manager must not keep them until it stops).  Its counters are kept
        for statistics().  Not while the uffd still carries fork-event uffds of children
        (closing it would close theirs).  A page table that outlives the engine (a
        parent's list of children forked during a batch) is unbound from its fds in C.
        Returns False when its engine was still serving after ``wait`` seconds.
        ``last_snapshot`` (a superseded connection, whose successor takes the same
        snapshot memfds over): once the engine stopped, its rules - with every event it
        applied until then - are written a last time."""
        u = proc.uffd
        if u is None or u.closed:
            proc._close_state()
            return True
        # no eviction may hold its engine or page table now, nor start later
        async with proc._evict_lock:
            proc._fenced += 1
            for _ in range(int(wait * 100)):  # its serving task was cancelled: it stops soon
                if not u._serving:
                    break
                await anyio.sleep(0.01)
            if last_snapshot:
                if u._serving or not proc._write_snapshot(last=True):
                    log.warning("pid %d: last snapshot of the old connection not written", proc.pid)
                proc._close_state()
            if u._serving:
                return False
            if u.children or u.closed:
                return True  # left for the manager's own close
            # FORK messages its engine read that no server delivered: their children
            # must still be served
            await u.hand_over_forks()
            proc._final_uffd_stats = u.statistics()
            u.close()
            return True

    # ---- the store ------------------------------------------------------------------------

    def _all_engines(self) -> list[CData]:
        out = []
        for p in self.processes.values():
            if p.uffd is not None and p.uffd._engine is not None:
                out.append(p.uffd._engine)
        for o in self._orphans:
            if o.uffd._engine is not None:
                out.append(o.uffd._engine)
        return out

    def _arena_of(self, addr: int) -> Arena | None:
        for ar in self._arenas:
            if ar.contains(addr):
                return ar
        return None

    def _gc(self, grace: float = 1.0) -> None:
        """Free store extents that no rule of any live engine points into any more (after
        ``grace`` seconds, so that a copy the engine started just before cannot read freed
        memory)."""
        if not self._extents:
            return
        import bisect

        exts = sorted(self._extents, key=lambda x: x.arena.base + x.off)
        starts = [x.arena.base + x.off for x in exts]
        used = [False] * len(exts)
        for eng in self._all_engines():
            n = lib.uf_rules_count(eng)
            if not n:
                continue
            out = ffi.new("uint64_t[]", 4 * n)
            n = lib.uf_rules_list(eng, 0, out, n)
            for i in range(n):
                if out[4 * i + 2] in (C.RULE_BUFFER, C.RULE_HOLD):
                    src = out[4 * i + 3]
                    k = bisect.bisect_right(starts, src) - 1
                    if k >= 0 and src < starts[k] + exts[k].length:
                        used[k] = True
        now = time.monotonic()
        keep = []
        for x, u in zip(exts, used, strict=True):
            if u:
                x.unused_since = None
                keep.append(x)
            elif x.unused_since is None:
                x.unused_since = now
                keep.append(x)
            elif now - x.unused_since < grace:
                keep.append(x)
            else:
                x.arena.release(x.off, x.length)
        self._extents = keep

    def statistics(self) -> dict[str, Any]:
        procs = [p.statistics() for p in self.history]
        total: dict[str, Any] = {}
        for key in (
            "faults",
            "resolved",
            "forwarded",
            "events",
            "pages_evicted",
            "evictions",
            "pages_skipped",
            "fences",
            "retried",
        ):
            total[key] = sum(int(p.get(key, 0) or 0) for p in procs)
        total["registered_pages_max"] = sum(p["registered_pages_max"] for p in procs)
        total["processes"] = len(procs)
        total["unmanaged"] = [
            {"pid": p["pid"], "reason": p["unmanaged_reason"]}
            for p in procs
            if p["unmanaged_reason"]
        ]
        total["refused"] = [{"pid": pid, "reason": r} for pid, r in self.refused]
        total["store_bytes"] = sum(a.used_bytes for a in self._arenas)
        total["recovered_pages"] = self.recovered_pages
        total["orphans_reaped"] = self.orphans_reaped
        total["orphans_taken_over"] = self.orphans_taken_over
        total["orphans"] = len(self._orphans) + len(self._reaping)  # (uffds still open)
        total["pages_rescued"] = self.pages_rescued
        total["per_process"] = procs
        return total


def _unmanaged_reason(err: int) -> str:
    if err in (errno.EPERM, errno.EACCES):
        return (
            "userfaultfd() is not permitted for it (vm.unprivileged_userfaultfd=0 and no "
            "CAP_SYS_PTRACE); a user-mode-only uffd would make its own system calls fail with "
            "EFAULT, so it is left alone. Fix: run as root, or 'sysctl "
            "vm.unprivileged_userfaultfd=1', or give its user access to /dev/userfaultfd"
        )
    return f"its userfaultfd could not be set up: {os.strerror(err)}"


@contextlib.asynccontextmanager
async def manage(
    argv: Sequence[str], *, socket_path: str | None = None, **popen: Any
) -> AsyncIterator[Spawned]:
    """``async with uffdio.manage(argv) as prog:`` starts ``argv`` under a new
    :class:`Manager`; ``await prog.process()`` gives its :class:`ManagedProcess`,
    ``await prog.wait()`` its exit code."""
    async with Manager(socket_path) as m:
        prog = m.spawn(argv, **popen)
        try:
            yield prog
        except BaseException:
            if prog.returncode is None:
                prog.send_signal(signal.SIGKILL)
            raise
        finally:
            if prog.returncode is None:
                with anyio.CancelScope(shield=True):
                    await prog.wait()
