"""Userspace swap: keep managed processes under a memory limit, cold pages in a store.

Python sets policy, C moves pages.  The per-page state (resident, in transit, evicted,
resident with a valid store copy) lives in a C page table per process (csrc/swap.c,
8 bytes per page; the memory store adds 8 bytes per stored page).  Faults on evicted
pages are served by the engine's C thread: the store is read (LZ4 decompression, or a
read of the swap file through io_uring), the page installed with UFFDIO_COPY, and
sequential faults read ahead.  Python only chooses victims and runs eviction batches:

1. ``uf_pt_begin`` marks the victims TRANSIT: from now on any fault on them (a read of a
   page already moved out, a write to one not yet moved) waits in the engine.
2. The agent moves the pages into its scratch area with UFFDIO_MOVE (one request, many
   ranges; the kernel refuses pages shared after fork or pinned: they stay).
3. One vectored process_vm_readv reads the moved pages that have no valid store copy
   (pages brought back by a read fault are installed write-protected; if they were not
   written since, the store still has them and they are not read again).
4. ``uf_pt_commit`` stores them (all-zero pages are not stored: they come back with
   UFFDIO_ZEROPAGE), marks them EVICTED and lets waiting faults go on.  A page the store
   refuses (full, I/O error) is installed back: the eviction of that page is aborted,
   nothing is lost, and the error is reported.
5. The scratch pages are freed (MADV_DONTNEED in the target).  Batches alternate between
   the two halves of the scratch area: the agent empties the half of batch N (read and
   committed) right after it answered the MOVE of batch N+1 into the other half, so the
   zap runs while we read and compress; the next MOVE into that half waits for it
   (the agent handles requests in order).  The last half is emptied before ``evict``
   returns (a zap that fails is tried again before anything else moves; a page left in
   the scratch area is never lost: MOVE refuses a populated destination, and only pages
   both present there and moved by this batch are read).

The limit: the engine counts pages it brings in; when the count reaches the limit a
fault that would add a page waits until eviction has made room (the policy is woken at
once).  Pages the program populates without faulting to us (the first write to a page
first read as zeros) are found by the policy's rescan of the page map, so the resident
set can pass the limit by what the program touches in one policy interval
(``interval``, 20 ms by default) - the documented slack.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import math
import mmap
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from . import _constants as C
from ._agentproto import MAXWORDS
from ._errors import UffdError, UffdProcessGone, UffdUnsupportedError, check, error_for
from ._lib import ffi, lib

if TYPE_CHECKING:
    from ._lib import CData
    from .manage import ManagedProcess, Manager

log = logging.getLogger("uffdio")
PAGE = 4096
CLEAN = 1  # page states (csrc/uffdio.h UF_PG_*)
EVICTED = 3
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_size(text: str) -> int:
    """'32M', '1.5G', '4096', '64MiB' -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512K, 32M, 2G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


# ---- stores ------------------------------------------------------------------------------


class Store:
    """A page store implemented in C (the engine reads it without Python).

    Built-in: :class:`MemoryStore` and :class:`FileStore`; :func:`open_store` parses the
    ``--store`` specification.  Stores are shared by every process of a :class:`Swap`."""

    kind = "?"

    def __init__(self, handle: CData) -> None:
        self._h = handle

    def statistics(self) -> dict[str, int]:
        st = ffi.new("struct uf_store_stats *")
        lib.uf_store_get_stats(self._h, st)
        return {
            "pages": st.slots_used,
            "bytes": st.bytes_stored,
            "bytes_in": st.bytes_in,
            "puts": st.puts,
            "gets": st.gets,
            "get_errors": st.get_errors,
            "put_errors": st.put_errors,
            "discards": st.discards,
            "meta_bytes": st.meta_bytes,
            "reserved_bytes": st.reserved_bytes,
        }

    def close(self) -> None:
        if self._h is not None:
            lib.uf_store_free(self._h)
            self._h = None

    def describe(self) -> str:
        return self.kind


class MemoryStore(Store):
    """Pages compressed with LZ4 in the manager's memory (the default).  ``acceleration``
    trades ratio for speed (LZ4_compress_fast)."""

    kind = "memory"

    def __init__(self, acceleration: int = 1) -> None:
        err = ffi.new("int *")
        h = lib.uf_store_memory(acceleration, err)
        if h == ffi.NULL:
            check(err[0], "store", "creating the memory store")
        super().__init__(h)

    @classmethod
    def adopt(cls, fd: int) -> MemoryStore:
        """The memory store of a manager that was killed: its memfd, kept by an agent
        (the store owns ``fd`` once this returns)."""
        err = ffi.new("int *")
        h = lib.uf_store_memory_adopt(fd, 1, err)
        if h == ffi.NULL:
            check(err[0], "takeover", "the killed manager's memory store")
        self = cls.__new__(cls)
        Store.__init__(self, h)
        return self


class FileStore(Store):
    """A swap file written and read through io_uring.  ``path`` is a file (created,
    mode 0600, removed on close) or a directory (a fresh file in it).  ``max_bytes``
    caps its size; a full disk (ENOSPC) or an I/O error makes eviction keep the pages
    resident and is reported.  O_DIRECT is used where the filesystem supports it."""

    kind = "file"

    def __init__(self, path: str, max_bytes: int = 0) -> None:
        if os.path.isdir(path):
            path = os.path.join(path, f"uffdio-swap-{os.getpid()}-{id(self):x}")
        self.path = path
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o600)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise UffdError(
                    errno.EEXIST, "store", f"{path} exists", "name a new file or a directory"
                ) from None
            if exc.errno != errno.EINVAL:
                raise error_for(exc.errno or errno.EIO, "store", f"cannot create {path}") from None
            fd = os.open(path, flags, 0o600)  # no O_DIRECT here (tmpfs): page cache
        err = ffi.new("int *")
        h = lib.uf_store_file(fd, max_bytes, err)  # owns fd from here
        if h == ffi.NULL:
            os.close(fd)
            os.unlink(path)
            check(err[0], "store", "setting up the swap file's ring")
        super().__init__(h)
        self._unlinked = False

    @classmethod
    def adopt(cls, fd: int, meta_fd: int) -> FileStore:
        """The swap file of a manager that was killed (``fd``) and its slots' reference
        counts (``meta_fd``, a memfd), both kept by an agent; the store owns them once
        this returns, and removes the file when closed, as its creator would have."""
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        err = ffi.new("int *")
        h = lib.uf_store_file_adopt(fd, meta_fd, err)
        if h == ffi.NULL:
            check(err[0], "takeover", "the killed manager's swap file")
        self = cls.__new__(cls)
        Store.__init__(self, h)
        self.path = path
        # a path that is gone (" (deleted)") or was never known is not ours to remove
        self._unlinked = not path.startswith("/") or path.endswith(" (deleted)")
        return self

    def close(self) -> None:
        # the C store closes the file when the last page table lets go of it
        super().close()
        if not self._unlinked:
            self._unlinked = True
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def describe(self) -> str:
        return f"file:{self.path}"


class PyStore(Store):
    """A store written in Python: subclass and implement the three coroutines.

    ``put(pages)`` gets a memoryview of n x 4096 bytes and returns n keys (ints from 1 to
    2**44 - 1; fewer means the rest could not be stored: those pages stay resident) or
    raises OSError (none stored; the errno is reported).  ``get(key)`` returns the 4096
    bytes; if it raises, the faulting thread keeps waiting (it never sees zeros), the
    error is reported and the read is tried again 20 ms later.  ``discard(keys)`` is told
    of keys no page refers to any more.  Faults on its pages are served by a coroutine
    (the engine hands them to Python); everything else stays in C."""

    kind = "python"

    def __init__(self) -> None:
        err = ffi.new("int *")
        h = lib.uf_store_external(err)
        if h == ffi.NULL:
            check(err[0], "store", "creating an external store")
        super().__init__(h)
        self.get_failures = 0

    async def put(self, pages: memoryview) -> list[int]:
        raise NotImplementedError

    async def get(self, key: int) -> bytes:
        raise NotImplementedError

    async def discard(self, keys: list[int]) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return f"python:{type(self).__name__}"


def open_store(spec: str) -> Store:
    """``memory`` | ``memory:ACCEL`` | ``file:PATH`` | ``file:PATH,max=SIZE``."""
    if spec == "memory" or spec.startswith("memory:"):
        accel = 1
        if ":" in spec:
            try:
                accel = int(spec.split(":", 1)[1])
            except ValueError:
                raise ValueError(
                    f"--store {spec}: memory:N takes an LZ4 acceleration (1-65537)"
                ) from None
        return MemoryStore(accel)
    if spec.startswith("file:"):
        rest = spec[5:]
        max_bytes = 0
        if ",max=" in rest:
            rest, mx = rest.rsplit(",max=", 1)
            max_bytes = parse_size(mx)
        if not rest:
            raise ValueError("--store file:PATH needs a path")
        return FileStore(rest, max_bytes)
    raise ValueError(f"unknown store {spec!r}: use 'memory' or 'file:PATH'")


# ---- per-process state ------------------------------------------------------------------


def _pairs(seq: list[tuple[int, int]]) -> CData:
    arr = ffi.new("uint64_t[]", max(2, 2 * len(seq)))
    for i, (a, n) in enumerate(seq):
        arr[2 * i] = a
        arr[2 * i + 1] = n
    return arr


def _unpairs(arr: CData, n: int) -> list[tuple[int, int]]:
    return [(int(arr[2 * i]), int(arr[2 * i + 1])) for i in range(n)]


MAX_VICTIM_RUNS = 1 << 16
#: runs per batch: the MOVE request (3 words a run) and its reply must fit one agent
#: message (UF_AGENT_MAXWORDS = 8192 words)
MAX_BATCH_RUNS = 2048
#: how long an eviction waits for the fault engine to stop reading (it answers in
#: microseconds; a stopped engine answers at once)
HOLD_TIMEOUT_MS = 5000
#: pages in the first batch of an evict() call (the next ones double, up to half the scratch
#: area)
FIRST_BATCH = 256


def _settle_all(procs: dict[int, _Proc]) -> None:
    for p in list(procs.values()):
        lib.uf_pt_settle(p.pt)


def _hold_error(rc: int, pid: int) -> UffdError:
    if rc == -errno.EINVAL:
        return UffdError(
            errno.EINVAL,
            "evict",
            f"pid {pid}: its fault engine runs inline on the event loop",
            "eviction holds the engine, which needs its own thread: serve(thread=True)",
        )
    return error_for(-rc, "evict: holding the fault engine", f"pid {pid}")


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether (start, length) ranges a and b share a byte."""
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def _dead(pid: int) -> bool:
    from .manage import _dead as dead

    return dead(pid)


@dataclass
class _Proc:
    proc: ManagedProcess
    pt: CData
    pagemap: int = -1  # /proc/PID/pagemap, for PAGEMAP_SCAN
    staging: Any = None  # while evicting: where moved pages are read to (see Swap._stagings)
    zap: tuple[int, int] | None = None  # a scratch range read and committed, not yet emptied
    resident: int = 0  # pages, at the last scan
    shared: int = 0  # resident pages shared with another process (after fork)
    events: int = 0  # the engine's event count when the regions were last asked for
    scanned: float = 0.0
    #: the agent has been handed the page table (see kept_fds): from then on a manager
    #: that takes over after a kill finds every page evicted - nothing is evicted before
    kept: bool = False
    #: the agent was asked for the batch's MOVE (its answer may be lost: see _batch_finish)
    move_asked: bool = False
    #: Swap.detach came while an eviction was in flight: it closes the page map
    detached: bool = False

    def close(self) -> None:
        if self.pagemap >= 0:
            os.close(self.pagemap)
            self.pagemap = -1


class Swap:
    """Userspace swap for the processes of a :class:`~uffdio.Manager`.

    ``Manager(swap=Swap(limit=32 << 20))``: every managed process gets a page table;
    the policy (default :class:`LimitPolicy`) keeps the resident managed memory of all of
    them together under ``limit`` bytes.  ``limit=None`` evicts only when asked
    (:meth:`evict`)."""

    def __init__(
        self,
        store: Store | str = "memory",
        limit: int | None = None,
        policy: Policy | str | None = None,
        interval: float = 0.02,
    ) -> None:
        self.store = open_store(store) if isinstance(store, str) else store
        self.limit = limit
        self.interval = interval
        self.policy: Policy = (
            make_policy(policy) if isinstance(policy, str) or policy is None else policy
        )
        self._notify_r, self._notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        lim = -1 if limit is None else max(1, limit // PAGE)
        self._budget = lib.uf_budget_new(lim, self._notify_w)
        self.procs: dict[int, _Proc] = {}
        self.manager: Manager | None = None
        self.peak_resident = 0
        self.last_resident = 0
        self.last_shared = 0
        self.samples: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._retired_stats: dict[str, int] = {}
        self._retired_hist = [0] * C_LAT_BUCKETS
        self.started = time.monotonic()
        self.rounds = 0
        #: the highest metadata bytes per managed page seen (tables + store index)
        self.metadata_per_page = 0.0
        self.managed_pages_max = 0
        #: seconds spent per eviction phase (scan for victims, the agent's MOVE, read +
        #: store put + commit, the agent's zap of the scratch area)
        self.evict_seconds = {"scan": 0.0, "move": 0.0, "collect": 0.0, "zap": 0.0}
        #: times the policy raised and was started again (see run())
        self.policy_failures = 0
        #: the most the store held (bytes) and its compression then: after the programs
        #: exited the store is empty, and a summary still wants to say what it held
        self.store_peak_bytes = 0
        self._ratio_at_peak: float | None = None
        #: staging buffers (one per eviction in progress, kept for the next: a fresh one
        #: would cost a page fault per page)
        self._stagings: list[mmap.mmap] = []
        #: tables of fork children whose parent died with a batch between its MOVE and
        #: its read (by address): each gets the batch's pages from its own process's
        #: scratch area (_rescue_kids); value: (table, when it was last seen served)
        self._rescues: dict[int, tuple[CData, float]] = {}
        #: pages of such batches read from a child's scratch area
        self.pages_rescued = 0
        #: stores of a killed manager whose processes were taken over (by inode)
        self.adopted_stores: dict[int, Store] = {}
        #: what taking over from a killed manager found (see _adopt)
        self.recovered = dict.fromkeys(
            (
                "processes",
                "pages_evicted",
                "pages_from_scratch",
                "pages_resident",
                "pages_dropped",
                "pages_waiting",
                "pages_clean",
            ),
            0,
        )

    # -- wiring (called by Manager) --
    def attach(self, proc: ManagedProcess) -> None:
        """Give proc's engine a page table (a fork child's engine has its parent's copy)."""
        assert proc.uffd is not None
        e = proc.uffd._engine_handle()
        try:
            pm = os.open(f"/proc/{proc.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pm = -1  # exited already
        pt = lib.uf_engine_pt(e)
        forked = pt != ffi.NULL
        if pt == ffi.NULL:
            try:
                adopted = proc.swap_kept is not None
                if adopted:
                    pt = self._adopt(proc, pm)
                else:
                    err = ffi.new("int *")
                    pt = lib.uf_pt_new(self.store._h, err)
                    if pt == ffi.NULL:
                        check(err[0], "swap", "page table")
                rc = lib.uf_engine_set_pt(e, pt, 1, self._budget)
                if rc < 0:
                    # (an adopted table's references are the memfd's: let go, drop none)
                    (lib.uf_pt_abandon if adopted else lib.uf_pt_unref)(pt)
                    check(rc, "swap", "engine")
            except BaseException:
                if pm >= 0:
                    os.close(pm)
                raise
        self.procs[proc.pid] = _Proc(proc, ffi.gc(pt, lib.uf_pt_unref), pm)
        self.exempt(proc)
        if self._on_engine_error not in proc.uffd._event_handlers.get(C.Event.ERROR, []):
            # (a fork child's uffd may have its parent's handlers already)
            proc.uffd.on_event(C.Event.ERROR, self._on_engine_error)
        if isinstance(self.store, PyStore):
            proc.uffd.on_fault(self._on_fault)
        if forked:
            # a fork child's copy of its parent's batch: pages whose put failed and that
            # were kept for it until it had a uffd (the rest: _settle_kept, every round)
            lib.uf_pt_settle(pt)

    async def _settle_kept(self) -> None:
        """Pages whose store put failed go back to the process; those that could not be
        copied in at once (events pending that nobody read yet - the engine held, or a
        fork child's before it had a uffd) are kept in C, TRANSIT (their threads wait),
        and tried here every interval, whatever the policy does."""
        while True:
            await anyio.sleep(max(self.interval, 0.01))
            # (in a function of its own: no name stays bound to a table while this
            # sleeps - a table goes with its process's last reference, and its store
            # pages with it)
            _settle_all(self.procs)
            if self._rescues:
                await self._rescue_kids()
            if self.manager is not None:
                self.manager._sweep_scratch()

    def _abandon_batch(self, p: _Proc, buf: int, res: CData, empty: CData) -> None:
        """p's process died between its batch's MOVE and the read of the moved pages.
        Children it forked meanwhile have those pages - in their own copies of the
        scratch area, since a page shared with a child cannot be moved - and their
        tables have the batch open (their threads wait on its pages).  Committing it
        empty would turn those pages into zeros in every child.  Instead each child's
        table (and each table forked from those during the batch) decides the batch from
        its own process once that is served (uf_pt_rescue, from _settle_kept); the
        parent's batch is never committed.  With no such child the batch is closed:
        nobody is left to read it."""
        if not self._rescue_kids_of(p):
            lib.uf_pt_commit(p.pt, empty, 0, empty, 0, buf, res)

    def _rescue_kids_of(self, p: _Proc) -> int:
        """Put the tables forked from p's during its open batch into _rescues (see
        _abandon_batch).  Returns how many, or -1 when they could not be listed (no
        memory): then the batch must stay open - its children wait, never read zeros."""
        n = int(lib.uf_pt_kid_list(p.pt, ffi.NULL, 0))
        if n < 0:
            self._error(f"pid {p.proc.pid}: its children's tables: {os.strerror(-n)}")
            return -1
        while n > 0:
            arr = ffi.new("uf_pt *[]", n)
            got = int(lib.uf_pt_kid_list(p.pt, arr, n))
            if got < 0:
                self._error(f"pid {p.proc.pid}: its children's tables: {os.strerror(-got)}")
                return -1
            if got > n:  # (more were forked meanwhile: the references taken go back)
                for i in range(n):
                    lib.uf_pt_unref(arr[i])
                n = got
                continue
            for i in range(got):
                self._rescue_later(arr[i])
            log.info(
                "pid %d exited during an eviction batch: %d processes forked meanwhile read"
                " its pages from their own scratch areas",
                p.proc.pid,
                got,
            )
            return got
        return 0

    def _rescue_later(self, pt: CData) -> None:
        """Take one reference of a child table (see _abandon_batch) into _rescues."""
        key = int(ffi.cast("uintptr_t", pt))
        if key in self._rescues:
            lib.uf_pt_unref(pt)
        else:
            self._rescues[key] = (ffi.gc(pt, lib.uf_pt_unref), time.monotonic())

    async def _rescue_kids(self) -> None:
        """Each child table of an abandoned batch (see _abandon_batch) whose process is
        served, with a pid and a page map: decide the batch's pages from that process.
        The tables forked from it during the batch are rescued on their own, in turn.  A
        table stays here as long as a uffd serves it (a child that never says hello -
        no agent - waits on the batch's pages until it exits); one unbound for 30 s is
        let go (its process is gone)."""
        served = {int(ffi.cast("uintptr_t", q.pt)): q for q in self.procs.values()}
        out = ffi.new("uint64_t[6]")
        nk = ffi.new("size_t *")
        now = time.monotonic()
        for key, (pt, seen) in list(self._rescues.items()):
            if not lib.uf_pt_batch_open(pt):
                del self._rescues[key]  # closed (by a commit or a rescue of its own)
                continue
            q = served.get(key)
            if q is None or q.pagemap < 0 or q.proc.exited:
                if lib.uf_pt_bound(pt):
                    self._rescues[key] = (pt, now)
                elif now - seen > 30:
                    del self._rescues[key]
                continue
            self._rescues[key] = (pt, now)
            cap = 8
            while True:
                kids = ffi.new("uf_pt *[]", cap)
                pm = os.dup(q.pagemap)  # (detach may close q's while the thread runs)
                try:
                    rc = await anyio.to_thread.run_sync(
                        lib.uf_pt_rescue, pt, q.proc.pid, pm, out, kids, cap, nk
                    )
                finally:
                    os.close(pm)
                if rc != -errno.ENOSPC:
                    break
                cap = int(nk[0]) + 8
            self.pages_rescued += int(out[1])
            if rc == -errno.EAGAIN:
                continue  # pages it could not read or store yet wait: again next round
            del self._rescues[key]
            if rc == 0:
                for i in range(int(nk[0])):
                    self._rescue_later(kids[i])
            elif rc != -errno.ESRCH:
                self._error(f"pid {q.proc.pid}: rescuing its parent's batch: {os.strerror(-rc)}")

    def _adopt(self, proc: ManagedProcess, pagemap: int) -> CData:
        """Take over the page table of a process whose manager was killed, and its store
        (shared by the processes of that manager), from the memfds its agent kept; then
        make the table true again (uf_pt_recover: pages of the batch the dead manager had
        in flight are read from the scratch area into the store, pages installed just
        before it died are resident).  A table whose store cannot be taken over (a file or
        Python store) is refused: the process's threads keep waiting - serving it without
        its pages would give it zeros."""
        assert proc.swap_kept is not None
        table, sfd, ffd = proc.swap_kept
        proc.swap_kept = None
        try:
            if proc.uid != os.geteuid():
                # a store holds every process's pages: it was never handed to this
                # process, and memfds it offers are not ours to trust
                raise error_for(
                    errno.EPERM,
                    "takeover",
                    f"pid {proc.pid} belongs to uid {proc.uid}: a store is taken over only from"
                    " processes of the manager's own user",
                )
            if sfd < 0:
                raise error_for(
                    errno.EBADMSG,
                    "takeover",
                    f"pid {proc.pid}: its pages are in a store that cannot be taken over (a"
                    " Python store, or one not shared with another user's process); it keeps"
                    " waiting",
                )
            if pagemap < 0:
                raise UffdProcessGone(errno.ESRCH, f"takeover: pid {proc.pid} exited")
            ino = os.fstat(sfd).st_ino
            store = self.adopted_stores.get(ino)
            own = lib.uf_store_fd(self.store._h) if not isinstance(self.store, PyStore) else -1
            if store is None and own >= 0 and os.fstat(own).st_ino == ino:
                # an agent that called again while we still run (its connection broke): the
                # store is our own - never a second allocator over the same memory
                store = self.store
                os.close(sfd)
                if ffd >= 0:
                    os.close(ffd)
                    ffd = -1
            elif store is None:
                if ffd >= 0:
                    store = FileStore.adopt(ffd, sfd)
                    ffd = -1
                else:
                    store = MemoryStore.adopt(sfd)
                self.adopted_stores[ino] = store
            else:
                os.close(sfd)
            sfd = -1
            err = ffi.new("int *")
            pt = lib.uf_pt_adopt(store._h, table, err)
            if pt == ffi.NULL:
                check(err[0], "takeover", f"pid {proc.pid}: its page table")
            table = -1  # the table owns it
            out = ffi.new("uint64_t[6]")
            rc = lib.uf_pt_recover(pt, proc.pid, pagemap, out)
            if rc < 0:
                lib.uf_pt_abandon(pt)  # its references stay the memfd's (see uf_pt_abandon)
                check(rc, "takeover", f"pid {proc.pid}")
        except UffdError as exc:
            self._error(str(exc))
            raise
        finally:
            for fd in (table, sfd, ffd):
                if fd >= 0:
                    os.close(fd)
        keys = list(self.recovered)[1:]
        for i, k in enumerate(keys):
            self.recovered[k] += int(out[i])
        self.recovered["processes"] += 1
        if out[4]:
            self._error(
                f"pid {proc.pid}: {out[4]} pages that the killed manager was evicting were"
                " found nowhere; their threads wait"
            )
        if self.manager is not None:
            self.manager.recovered_pages += int(out[0]) + int(out[1])
        log.info(
            "pid %d taken over: %d pages evicted (%d read from the scratch area), %d resident",
            proc.pid,
            out[0] + out[1],
            out[1],
            out[2],
        )
        return pt

    def kept_fds(self, proc: ManagedProcess) -> list[tuple[int, int]]:
        """(tag, fd) for proc's agent to keep: the page table, and its store when a
        manager that takes over can read it (the memory store's memfd; a file store's
        reference counts and swap file).  A store holds every process's pages: it is
        never handed to a process of another user (its pages then cannot be taken over)."""
        from .manage import TAG_SWAP_FILE, TAG_SWAP_STORE, TAG_SWAP_TABLE

        p = self._p(proc)
        if p is None:
            return []
        out = []
        if proc.uid == os.geteuid():
            sfd, ffd = lib.uf_pt_store_fd(p.pt), lib.uf_pt_store_file_fd(p.pt)
            if sfd >= 0:
                out.append((TAG_SWAP_STORE, sfd))
            if ffd >= 0:
                out.append((TAG_SWAP_FILE, ffd))
        # last: a manager taking over needs the store before it can use the table
        out.append((TAG_SWAP_TABLE, lib.uf_pt_fd(p.pt)))
        return out

    def kept(self, proc: ManagedProcess) -> None:
        """proc's agent has what kept_fds gave: its pages may be evicted from now on."""
        p = self._p(proc)
        if p is not None:
            p.kept = True
            # its pages outlive this manager: never freed when the table is let go while
            # the process lives (uf_pt_keep; let_go says when they may be)
            lib.uf_pt_keep(p.pt, 1)

    def let_go(self, proc: ManagedProcess) -> None:
        """proc exited, exec'd or was given back: its table's store references are no
        longer anybody's once the table goes."""
        p = self._p(proc)
        if p is not None:
            lib.uf_pt_keep(p.pt, 0)

    async def _on_fault(self, batch: Any) -> None:
        """Faults on pages of a Python store (the engine forwards them): read, install."""
        assert isinstance(self.store, PyStore)
        e = batch.uffd._engine_handle()
        pt = lib.uf_engine_pt(e)
        if pt == ffi.NULL:
            for f in batch:
                lib.uf_wake(batch.uffd.fileno(), f.address & ~(PAGE - 1), PAGE)
            return
        pt = ffi.gc(pt, lib.uf_pt_unref)
        slot = ffi.new("uint64_t *")
        for f in batch:
            addr = f.address & ~(PAGE - 1)
            reported = False
            while True:
                # (CLEAN too: a CLEAN page found missing comes back from its store copy)
                if lib.uf_pt_state(pt, addr, slot) not in (EVICTED, CLEAN):
                    lib.uf_wake(batch.uffd.fileno(), addr, PAGE)  # decided meanwhile
                    break
                key = int(slot[0]) >> 4
                try:
                    data = await self.store.get(key)
                    if len(data) != PAGE:
                        raise OSError(errno.EIO, f"get({key}) returned {len(data)} bytes")
                except Exception as exc:  # the thread waits; never zeros
                    self.store.get_failures += 1
                    if not reported:
                        reported = True
                        self._error(f"store read of page {addr:#x} failed ({exc!r}): retrying")
                    await anyio.sleep(0.02)
                    continue
                rc = lib.uf_pt_install(pt, addr, key, ffi.from_buffer(data), int(f.is_write))
                if rc == -errno.EAGAIN:  # events pending: the engine drains them first
                    await anyio.sleep(0.001)
                    continue
                if rc < 0:  # the thread must not sleep forever: it faults again
                    lib.uf_wake(batch.uffd.fileno(), addr, PAGE)
                break

    def _ratio(self, st: dict[str, int]) -> float | None:
        if self.store.kind != "memory" or not st["bytes"]:
            return None
        return round(st["pages"] * PAGE / st["bytes"], 2)

    def _store_stats(self) -> dict[str, int]:
        """The store's counters, with those of stores taken over from a killed manager."""
        st = self.store.statistics()
        for other in self.adopted_stores.values():
            for k, v in other.statistics().items():
                st[k] = st.get(k, 0) + v
        return st

    def _note_store(self) -> None:
        st = self._store_stats()
        if st["bytes"] >= self.store_peak_bytes:
            self.store_peak_bytes = st["bytes"]
            self._ratio_at_peak = self._ratio(st) or self._ratio_at_peak

    async def _on_engine_error(self, ev: Any) -> None:
        """A store read the engine could not do (the page's thread waits; the read is
        tried again every policy round): say so (repeats are folded).  Other engine errors keep
        their usual course (a failed read of the uffd itself ends serving)."""
        if ev.what == C.FAIL_READ:
            raise ev.error
        if ev.what == C.FAIL_STORE:
            self._error(
                f"{ev.error}: the thread that needs page {ev.address & ~(PAGE - 1):#x} waits; "
                "the read is tried again every round"
            )

    def _error(self, msg: str) -> None:
        if msg not in self.errors[-5:]:
            self.errors.append(msg)
            del self.errors[:-20]

    async def _discard(self) -> None:
        if not isinstance(self.store, PyStore):
            return
        out = ffi.new("uint64_t[]", 4096)
        while True:
            n = lib.uf_store_take_discarded(self.store._h, out, 4096)
            if n <= 0:
                return
            keys = [int(out[i]) for i in range(n)]
            try:
                await self.store.discard(keys)
            except Exception as exc:
                self._error(f"store discard failed ({exc!r})")

    async def swap_in_external(self, proc: ManagedProcess) -> int:
        """Bring back the pages of proc that a Python store holds (release)."""
        p = self._p(proc)
        if p is None or not isinstance(self.store, PyStore):
            return 0
        out = ffi.new("uint64_t[]", 2 * 65536)
        total = 0
        while True:
            n = lib.uf_pt_list(p.pt, EVICTED, out, 65536)
            if n <= 0:
                return total
            for i in range(n):
                addr, key = int(out[2 * i]), int(out[2 * i + 1])
                data = await self.store.get(key)
                if check(lib.uf_pt_install(p.pt, addr, key, ffi.from_buffer(data), 1), "swap in"):
                    total += 1

    def exempt(self, proc: ManagedProcess) -> None:
        """The agent thread's faults are never held at the limit (it must stay free to
        move pages out); it reads its TLS vector and the loader's link maps, which live
        in the managed heap.  Until the agent thread says which it is, the process's
        first thread is: it runs the agent's start (in a fork child, inside fork()) -
        making the agent thread writes to the heap, and held at the limit it would never
        make it, nor answer the manager."""
        p = self._p(proc)
        if p is not None:
            lib.uf_pt_exempt(p.pt, proc.agent_tid or proc.pid)
            self._kick_all()

    def _p(self, proc: ManagedProcess) -> _Proc | None:
        """proc's entry - never that of another ManagedProcess with its pid (an exec, or a
        reconnect of the same process, retires the old one while the new one is served)."""
        p = self.procs.get(proc.pid)
        return p if p is not None and p.proc is proc else None

    def detach(self, proc: ManagedProcess, gone: bool = False) -> None:
        """proc is no longer served; ``gone``: its memory is gone (it exited or exec'd)."""
        p = self._p(proc)
        if p is None:
            return
        del self.procs[proc.pid]
        if p.staging is None and (gone or _dead(proc.pid)) and lib.uf_pt_batch_open(p.pt):
            # a batch left open (its MOVE's answer was lost, or its read failed, while
            # the process lived) and now the process is gone: its children forked
            # meanwhile read the batch from their own scratch areas
            self._rescue_kids_of(p)
        if p.staging is None:
            p.close()
        else:
            p.detached = True  # an eviction in flight still reads its page map: it closes
        st = self._pt_stats(p.pt)
        for k, v in st.items():
            if isinstance(v, int) and k not in _NOT_SUMMED:
                self._retired_stats[k] = self._retired_stats.get(k, 0) + v
        for i, v in enumerate(st["lat_hist"]):
            self._retired_hist[i] += v

    def close(self) -> None:
        if self._budget is not None:
            lib.uf_budget_free(self._budget)
            self._budget = None
        for fd in (self._notify_r, self._notify_w):
            os.close(fd)
        self._notify_r = self._notify_w = -1
        for p in self.procs.values():
            p.close()
        self.procs.clear()
        self.store.close()
        for st in self.adopted_stores.values():
            st.close()

    # -- measurements --
    def _scan(self, p: _Proc, want: int = 0, out: CData = ffi.NULL, nout: CData = ffi.NULL) -> int:
        """Resident pages of p's registered regions (PAGEMAP_SCAN in C); with ``want``,
        also the victims (pairs in ``out``, their number in ``nout[0]``)."""
        if p.proc.exited or p.proc.uffd is None or p.pagemap < 0:
            p.resident = 0
            return 0
        regs = p.proc.regions
        arr = _pairs(regs)
        shared = ffi.new("uint64_t *")
        n = lib.uf_pt_scan(
            p.pt, p.pagemap, arr, len(regs), want, out, MAX_VICTIM_RUNS, nout, shared
        )
        p.resident = max(0, n)
        p.shared = int(shared[0])
        return p.resident

    async def measure(self) -> int:
        """Resident managed pages of every process, from the kernel's page map; also
        resynchronises the engine's count that the limit is enforced with."""
        await self._discard()
        total = 0
        now = time.monotonic()
        for p in list(self.procs.values()):
            # the registered regions change with the program's mmap/munmap/mremap: ask
            # the agent again when the engine saw events, and at least every 0.25 s
            ev = p.proc.uffd.statistics().get("events", 0) if p.proc.uffd is not None else 0
            if (ev != p.events or now - p.scanned > 0.25) and not p.proc.exited:
                p.events, p.scanned = ev, now
                with contextlib.suppress(UffdError, OSError):
                    await p.proc.scan()
            total += await anyio.to_thread.run_sync(self._scan, p)
        lib.uf_budget_set(self._budget, -1, total)
        shared = sum(p.shared for p in self.procs.values())
        # reported like RSS: pages shared after fork count in each process that maps them
        self.last_resident = (total + shared) * PAGE
        self.last_shared = shared * PAGE
        self.peak_resident = max(self.peak_resident, self.last_resident)
        managed = sum(sum(n for _, n in p.proc.regions) for p in self.procs.values()) // PAGE
        if managed:
            meta = self.store.statistics()["meta_bytes"] + sum(
                self._pt_stats(p.pt)["table_bytes"] for p in self.procs.values()
            )
            self.metadata_per_page = max(self.metadata_per_page, meta / managed)
            self.managed_pages_max = max(self.managed_pages_max, managed)
        return total

    def set_limit(self, limit: int | None) -> None:
        self.limit = limit
        lib.uf_budget_set(self._budget, -1 if limit is None else max(1, limit // PAGE), -1)
        self._kick_all()

    def _kick_all(self) -> None:
        """Let faults parked at the limit look again (every engine of the manager: a fork
        child is served before its agent has said hello)."""
        if self.manager is None:
            return
        for e in self.manager._all_engines():
            lib.uf_engine_kick(e)

    # -- eviction --
    async def evict(
        self, proc: ManagedProcess, want: int, victims: list[tuple[int, int]] | None = None
    ) -> int:
        """Evict up to ``want`` pages of proc: the least recently faulted resident pages,
        or the resident pages of ``victims`` ((start, length) list) when given.  Returns
        the number of pages evicted (pages the kernel refuses to move - shared after
        fork, pinned - stay resident)."""
        p = self._p(proc)
        if p is None or not p.kept or proc.exited or proc.uffd is None or want <= 0:
            return 0
        if not proc.features & C.Feature.MOVE:
            raise UffdUnsupportedError(
                errno.EOPNOTSUPP,
                "evict",
                "the agent's uffd has no UFFD_FEATURE_MOVE",
                "eviction zaps pages with UFFDIO_MOVE: use Linux 6.8 or newer",
            )
        cand = ffi.new("uint64_t[]", 2 * MAX_VICTIM_RUNS)
        if victims is None:
            nout = ffi.new("int64_t *")
            t0 = time.perf_counter()
            await anyio.to_thread.run_sync(self._scan, p, want, cand, nout)
            self.evict_seconds["scan"] += time.perf_counter() - t0
            ncand = int(nout[0])
        else:
            victims = victims[:MAX_VICTIM_RUNS]
            for i, (a, n) in enumerate(victims):
                cand[2 * i], cand[2 * i + 1] = a, n
            ncand = len(victims)
        total = 0
        async with proc._evict_lock:
            if proc._fenced or lib.uf_pt_batch_open(p.pt):
                # (open: its parent's batch, forked during it - committed by the parent
                # in a moment, or being rescued from this process's scratch area)
                return 0
            await proc._empty_scratch()
            cap = proc.scratch_len // PAGE - 1  # the last scratch page is the pairing probe
            halves = proc.zap_with_move and cap >= 64
            if halves:
                cap //= 2
            side = 0
            off = 0  # candidates before off were offered to an earlier batch
            if p.zap is not None:  # left by an earlier call whose last zap failed
                await self._zap(p)
            size = cap * PAGE
            p.staging = next((b for b in self._stagings if len(b) >= size), None)
            if p.staging is None:
                p.staging = mmap.mmap(-1, size)
            else:
                self._stagings.remove(p.staging)
            # The first batch is small and each next one twice as big, up to the half: a
            # fault on a page of a batch waits for the whole batch, so a policy's small
            # evictions (a few MiB) keep those waits short, and a big eviction still gets
            # big batches (fewer round trips to the agent).
            step = min(cap, FIRST_BATCH)
            try:
                while off < ncand and total < want and not proc.exited:
                    base = proc.scratch + side * cap * PAGE
                    n, off = await self._batch(p, cand, ncand, off, min(step, want - total), base)
                    total += n
                    side ^= halves
                    step = min(cap, 2 * step)
            finally:
                self._stagings.append(p.staging)
                del self._stagings[:-4]
                p.staging = None
                if p.detached:
                    p.close()
                if p.zap is not None and not proc.exited:
                    # the last batch's half: the scratch area is left empty (when this
                    # fails, the next call tries again before it moves anything)
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await self._zap(p)
        return total

    async def _zap(self, p: _Proc) -> None:
        """Empty p.zap's scratch range now, with a request of its own (timed as "zap"; the
        zaps that ride along with a MOVE cost no time of ours)."""
        assert p.zap is not None
        t = time.perf_counter()
        await p.proc._op_dontneed(list(p.zap))
        p.zap = None
        self.evict_seconds["zap"] += time.perf_counter() - t

    async def _batch(
        self, p: _Proc, cand: CData, ncand: int, first: int, maxpages: int, scratch: int
    ) -> tuple[int, int]:
        """One batch from cand[first:]: returns (pages evicted, next candidate index)."""
        proc = p.proc
        assert proc.uffd is not None
        runs = ffi.new("uint64_t[]", 2 * MAX_BATCH_RUNS)
        nr = check(
            lib.uf_pt_begin(p.pt, cand + 2 * first, ncand - first, maxpages, runs, MAX_BATCH_RUNS),
            "evict: begin",
        )
        if nr == 0:
            return 0, ncand
        # where the next batch starts: the first candidate not wholly before the last run
        last_end = int(runs[2 * (nr - 1)] + runs[2 * (nr - 1) + 1])
        nxt = first
        while nxt < ncand and int(cand[2 * nxt] + cand[2 * nxt + 1]) <= last_end:
            nxt += 1
        if nxt < ncand and int(cand[2 * nxt]) < last_end:
            shift = last_end - int(cand[2 * nxt])
            cand[2 * nxt] = last_end
            cand[2 * nxt + 1] -= shift
        buf = int(ffi.cast("uintptr_t", ffi.from_buffer(p.staging)))
        res = ffi.new("struct uf_commit *")
        empty = ffi.new("uint64_t[2]")
        # Once begun, a batch runs to its end: a cancelled wait for the agent's MOVE
        # reply would not stop the agent from moving the pages, and pages moved out
        # behind the table's back would read as zeros.
        with anyio.CancelScope(shield=True):
            done = await self._batch_finish(p, buf, res, empty, nxt, scratch)
        return done

    async def _batch_finish(
        self,
        p: _Proc,
        buf: int,
        res: CData,
        empty: CData,
        nxt: int,
        scratch: int,
    ) -> tuple[int, int]:
        proc = p.proc
        ph = self.evict_seconds
        try:
            # the previous batch's pages are emptied along with this move - unless they
            # sit where this batch moves to (no halves) or the agent cannot (protocol 1):
            # then first, on their own
            zap = p.zap
            span = len(p.staging) if p.staging is not None else 0
            if zap is not None and (not proc.zap_with_move or _overlap(zap, (scratch, span))):
                await self._zap(p)
                zap = None
            t0 = time.perf_counter()
            p.move_asked = False
            moved_words, skipped, move_err = await self._move_held(p, scratch, zap)
            if not move_err:
                p.zap = None  # (after an error answer it may not be: zapped again, harmless)
        except BaseException:
            if not p.move_asked:
                # nothing was moved: every page goes back to its state
                lib.uf_pt_commit(p.pt, empty, 0, empty, 0, buf, res)
            elif _dead(proc.pid):
                self._abandon_batch(p, buf, res, empty)
            # else the MOVE was asked for and its answer is lost (the agent's connection
            # went, or we are ending): pages may sit in the scratch area.  The batch stays
            # open - their faults wait, nothing reads zeros - and is repaired from the
            # table's memfd by whoever serves the process next (uf_pt_recover: the agent
            # calls again, this manager or a successor)
            raise
        moved = array.array("Q", moved_words)
        used = ffi.new("uint64_t *")
        t1 = time.perf_counter()
        ph["move"] += t1 - t0
        for attempt in range(3):
            rc = await anyio.to_thread.run_sync(
                lib.uf_pt_collect,
                p.pt,
                proc.pid,
                p.pagemap,
                scratch,
                ffi.from_buffer("uint64_t[]", moved),
                len(moved) // 2,
                buf,
                res,
                used,
            )
            if rc >= 0 or _dead(proc.pid):
                break
            await anyio.sleep(0.01 * (attempt + 1))
        if rc == 1:  # a Python store: it puts the pages, then we commit
            await self._put_external(p, buf, res)
        elif rc < 0:
            # The moved pages sit in the scratch area and cannot be read.  Committing now
            # would let their faults through to zero pages; the batch stays open instead
            # (those threads wait, nothing reads zeros) and the error is reported.
            # (proc.exited is not enough: it also means that we stopped serving it - the
            # agent's connection went, or we are ending - while it lives, and its pages
            # are in the scratch area: the batch stays open for whoever serves it next)
            if _dead(proc.pid):
                self._abandon_batch(p, buf, res, empty)
            raise error_for(-rc, "evict: reading the moved pages", f"pid {proc.pid}")
        ph["collect"] += time.perf_counter() - t1
        if used[0]:
            p.zap = (scratch, int(used[0]))  # emptied with the next move, or at the end
        proc.stats["pages_skipped"] += skipped
        proc.stats["evictions"] += 1
        proc.stats["pages_evicted"] += int(res.evicted)
        self._note_store()
        if res.put_error:
            msg = (
                f"pid {proc.pid}: the store refused {res.failed} pages "
                f"({os.strerror(-res.put_error)}): they stay resident"
            )
            self._error(msg)
            raise StoreFull(res.put_error, int(res.evicted))
        if move_err:  # an answer, not a lost one: what moved before it is committed above
            raise error_for(-move_err, "evict: UFFDIO_MOVE", f"pid {proc.pid}")
        return int(res.evicted), nxt

    async def _move_held(
        self, p: _Proc, scratch: int, zap: tuple[int, int] | None
    ) -> tuple[Sequence[int], int, int]:
        """The agent's MOVE of the batch, under a hold of the process's engine: no
        event is read meanwhile, so no mapping can be replaced under the MOVE (see
        uf_engine_hold, uf_pt_batch_triples); what to move is decided once the hold is
        taken, from a table with every earlier event applied."""
        proc = p.proc
        assert proc.uffd is not None
        e = proc.uffd._engine_handle()
        cap = min(proc.scratch_len // PAGE, MAXWORDS // 3)  # what one MOVE message holds
        out = array.array("Q", bytes(24 * cap))
        rc = await anyio.to_thread.run_sync(lib.uf_engine_hold, e, 1, HOLD_TIMEOUT_MS)
        if rc < 0:
            raise _hold_error(rc, proc.pid)
        try:
            n = check(
                lib.uf_pt_batch_triples(p.pt, scratch, ffi.from_buffer("uint64_t[]", out), cap),
                "evict: what to move",
            )
            if n == 0:
                if zap is not None:
                    await self._zap(p)
                return [], 0, 0
            p.move_asked = True
            return await proc._op_move(out[: 3 * n], zap)
        finally:
            lib.uf_engine_hold(e, 0, 0)

    async def _put_external(self, p: _Proc, buf: int, res: CData) -> None:
        assert isinstance(self.store, PyStore)
        cap = p.proc.scratch_len // PAGE
        offs = ffi.new("uint64_t[]", cap)
        n = check(lib.uf_pt_pending_put(p.pt, buf, offs, cap), "evict: pending put")
        keys: list[int] = []
        err = 0
        try:
            if n:
                pages = bytearray(n * PAGE)
                view = memoryview(p.staging)
                for i in range(n):
                    o = int(offs[i])
                    pages[i * PAGE : (i + 1) * PAGE] = view[o : o + PAGE]
                keys = list(await self.store.put(memoryview(pages)))[:n]
        except OSError as exc:
            keys, err = [], -(exc.errno or errno.EIO)
        except Exception:
            keys, err = [], -errno.EIO
        except BaseException:  # cancelled: every page goes back, nothing is lost
            lib.uf_pt_commit_external(p.pt, buf, offs, offs, n, 0, -errno.ECANCELED, res)
            raise
        if len(keys) < n and not err:
            err = -errno.ENOSPC
        kc = ffi.new("uint64_t[]", max(1, len(keys)))
        for i, k in enumerate(keys):
            kc[i] = k
        check(
            lib.uf_pt_commit_external(p.pt, buf, offs, kc, n, len(keys), err, res),
            "evict: commit",
        )

    # -- statistics --
    @staticmethod
    def _pt_stats(pt: CData) -> dict[str, Any]:
        st = ffi.new("struct uf_pt_stats *")
        lib.uf_pt_get_stats(pt, st)
        out: dict[str, Any] = {
            k: int(getattr(st, k))
            for k in (
                "swapins",
                "readahead",
                "first_touch",
                "wp_faults",
                "dirtied",
                "pages_out",
                "pages_out_clean",
                "pages_out_zero",
                "put_failures",
                "pages_clean",
                "pages_transit",
                "pages_evicted",
                "pages_zero",
                "table_bytes",
                "epoch",
                "readahead_window",
                "fault_around",
                "clean_missing",
                "ns_find",
                "ns_read",
                "ns_put",
                "ns_commit",
            )
        }
        out["lat_hist"] = [int(st.lat_hist[i]) for i in range(C_LAT_BUCKETS)]
        return out

    def statistics(self) -> dict[str, Any]:
        tot: dict[str, int] = dict(self._retired_stats)
        hist = list(self._retired_hist)
        for p in list(self.procs.values()):
            st = self._pt_stats(p.pt)
            for k, v in st.items():
                if isinstance(v, int):
                    tot[k] = tot.get(k, 0) + v
            for i, v in enumerate(st["lat_hist"]):
                hist[i] += v
        live_tables = sum(self._pt_stats(p.pt)["table_bytes"] for p in self.procs.values())
        store = self._store_stats()
        managed_pages = max(
            1,
            sum(sum(n for _, n in p.proc.regions) // PAGE for p in self.procs.values()),
        )
        return {
            "limit_bytes": self.limit,
            "store": self.store.describe(),
            "policy": self.policy.name,
            "resident_bytes": self.last_resident,
            "peak_resident_bytes": self.peak_resident,
            "shared_resident_bytes": self.last_shared,
            "pages_evicted": tot.get("pages_out", 0),
            "pages_evicted_clean": tot.get("pages_out_clean", 0),
            "pages_evicted_zero": tot.get("pages_out_zero", 0),
            "pages_swapped_in": tot.get("swapins", 0),
            "pages_read_ahead": tot.get("readahead", 0),
            "pages_fault_around": tot.get("fault_around", 0),
            # CLEAN pages found missing (should not happen; brought back from the store)
            "pages_clean_missing": tot.get("clean_missing", 0),
            "pages_in_store": tot.get("pages_evicted", 0),
            "faults": {
                "swap_in": tot.get("swapins", 0) - tot.get("readahead", 0),
                "first_touch": tot.get("first_touch", 0),
                "write_protect": tot.get("wp_faults", 0),
                "parked_at_limit": int(lib.uf_budget_parked(self._budget)) if self._budget else 0,
            },
            "store_bytes": store["bytes"],
            "store_bytes_peak": max(self.store_peak_bytes, store["bytes"]),
            "store_bytes_in": store["bytes_in"],
            "store_bytes_out": store["gets"] * PAGE,
            "store_errors": {"put": store["put_errors"], "get": store["get_errors"]},
            # of what the store holds (or held at its peak, once it is empty)
            "compression_ratio": self._ratio(store) or self._ratio_at_peak,
            "fault_latency_us": latency_percentiles(hist),
            "metadata_bytes_per_page": round(
                self.metadata_per_page
                if self.managed_pages_max
                else (live_tables + store["meta_bytes"]) / managed_pages,
                2,
            ),
            "managed_pages_max": self.managed_pages_max,
            "errors": list(self.errors),
            "rounds": self.rounds,
            "policy_failures": self.policy_failures,
            "recovered": dict(self.recovered),
            # pages of a batch whose process died before reading them, read by children
            # forked during it from their own scratch areas (see _abandon_batch)
            "pages_rescued": self.pages_rescued,
            "evict_seconds": {
                **{k: round(v, 4) for k, v in self.evict_seconds.items()},
                # the C side of "collect": finding the moved pages in the scratch area,
                # reading them, storing them (compression included), deciding them
                **{
                    f"collect_{k}": round(tot.get(f"ns_{k}", 0) / 1e9, 4)
                    for k in ("find", "read", "put", "commit")
                },
            },
        }

    async def run(self) -> None:
        """Run the policy until cancelled.  A policy that raises (a bug in a user's policy,
        or in ours) must not take the manager down - its programs would wait on their
        faults forever: the error is reported, the limit lifted (faults waiting at it go
        on), and the policy started again, with the limit, a second later."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._settle_kept)
            await self._run_policy()
            tg.cancel_scope.cancel()

    async def _run_policy(self) -> None:
        while True:
            try:
                await self.policy.run(self)
                return
            except Exception as exc:
                msg = f"policy {self.policy.name!r} failed: {exc!r}; restarted in 1 s"
                log.error("%s", msg, exc_info=True)
                self._error(msg)
                self.policy_failures += 1
                limit = self.limit
                if self._budget is not None:
                    lib.uf_budget_set(self._budget, -1, -1)
                    self._kick_all()
                await anyio.sleep(1.0)
                if self._budget is not None and self.limit == limit:  # not changed meanwhile
                    self.set_limit(limit)

    async def wait_pressure(self, timeout: float) -> None:  # noqa: ASYNC109
        """Sleep until a fault waits at the limit, or ``timeout``."""
        with anyio.move_on_after(timeout):
            await anyio.wait_readable(self._notify_r)
        try:
            while os.read(self._notify_r, 4096):
                pass
        except BlockingIOError:
            pass


_NOT_SUMMED = {
    "epoch",
    "readahead_window",
    "pages_clean",
    "pages_transit",
    "pages_evicted",
    "pages_zero",
    "table_bytes",
}
C_LAT_BUCKETS = 64


class StoreFull(UffdError):
    """The store refused pages (ENOSPC, EIO...): those pages stayed resident."""

    def __init__(self, err: int, evicted: int) -> None:
        super().__init__(
            -err,
            "store",
            f"the store refused pages: {os.strerror(-err)}",
            "give the store more room (file:PATH,max=SIZE) or use --store memory",
        )
        self.evicted = evicted


def bucket_low(b: int) -> float:
    p, f = divmod(b, 4)
    return float(2**p) * (1 + f / 4) - 1


def latency_percentiles(hist: list[int]) -> dict[str, float | None]:
    total = sum(hist)
    out: dict[str, float | None] = {"count": float(total)}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        if not total:
            out[name] = None
            continue
        want, acc = q * total, 0
        for b, c in enumerate(hist):
            acc += c
            if acc >= want:
                lo, hi = bucket_low(b), bucket_low(b + 1)
                out[name] = round(math.sqrt(max(lo, 0.5) * hi), 1)  # bucket's geometric middle
                break
    return out


# ---- policies ------------------------------------------------------------------------------


class Policy:
    """A policy is a coroutine that decides what to evict and when.  Subclass and
    override :meth:`run`; the helpers on :class:`Swap` do the work: ``measure()``
    (resident pages, from the kernel), ``choose(p, n)`` (victims by recency),
    ``evict(proc, n, victims)``, ``set_limit()``, ``wait_pressure(t)``."""

    name = "custom"

    async def run(self, swap: Swap) -> None:
        raise NotImplementedError


class LimitPolicy(Policy):
    """Keep the resident managed memory of all processes under ``swap.limit``: when it
    passes ``high`` x limit, evict the least recently faulted pages down to ``low`` x
    limit, spread over processes in proportion to their resident size."""

    name = "limit"

    def __init__(self, high: float = 0.95, low: float = 0.85) -> None:
        self.high, self.low = high, low

    async def step(self, swap: Swap) -> int:
        resident = await swap.measure()
        swap.samples.append((time.monotonic(), resident * PAGE))
        del swap.samples[:-10000]
        if swap.limit is None:
            return 0
        lim = swap.limit // PAGE
        if resident <= lim * self.high:
            swap._kick_all()
            return 0
        excess = resident - int(lim * self.low)
        done = 0
        for p in sorted(swap.procs.values(), key=lambda q: -q.resident):
            if excess <= 0:
                break
            share = math.ceil(excess * p.resident / max(1, resident))
            try:
                done += await swap.evict(p.proc, share)
            except UffdProcessGone:
                continue
            except StoreFull as exc:
                done += exc.evicted
            except (UffdError, OSError) as exc:
                if not p.proc.exited:
                    swap.errors.append(f"pid {p.proc.pid}: eviction failed: {exc}")
                    del swap.errors[:-20]
        for p in swap.procs.values():
            lib.uf_pt_tick(p.pt)
        swap.rounds += 1
        if done == 0 and resident >= lim:
            # nothing could be evicted (pages shared after fork, pinned, locked, or a
            # failing store): let waiting faults through rather than stop the program
            lib.uf_budget_set(swap._budget, -1, max(0, lim - 64))
        swap._kick_all()
        return done

    async def run(self, swap: Swap) -> None:
        while True:
            await self.step(swap)
            await swap.wait_pressure(swap.interval)


class PressurePolicy(LimitPolicy):
    """Senpai-like: find the smallest limit the program tolerates.  Every ``period``
    seconds the stall time uffdio measured on its own faults (PSI does not see uffd
    waits) is compared with ``target`` (fraction of wall time): below it the limit
    shrinks by ``step``, above it the limit grows by ``step`` x (stall / target), within
    [``min_bytes``, the user's --limit or the current resident size]."""

    name = "pressure"

    def __init__(
        self,
        target: float = 0.01,
        step: float = 0.02,
        period: float = 0.5,
        min_bytes: int = 4 << 20,
    ) -> None:
        super().__init__()
        self.target, self.stepf, self.period, self.min_bytes = target, step, period, min_bytes
        self.history: list[dict[str, float]] = []

    @staticmethod
    def _stall_us(swap: Swap) -> float:
        st = swap.statistics()
        _ = st
        hist = list(swap._retired_hist)
        for p in swap.procs.values():
            h = Swap._pt_stats(p.pt)["lat_hist"]
            for i, v in enumerate(h):
                hist[i] += v
        return sum(c * (bucket_low(b) + bucket_low(b + 1)) / 2 for b, c in enumerate(hist))

    async def run(self, swap: Swap) -> None:
        ceiling = swap.limit  # --limit: never above it
        # start from what the program uses once it runs (like senpai, from current usage)
        while not swap.procs:  # noqa: ASYNC110 - the manager adds processes
            await anyio.sleep(0.05)
        await anyio.sleep(self.period)
        used = await swap.measure() * PAGE
        swap.set_limit(max(self.min_bytes, used if ceiling is None else min(ceiling, used)))
        last_t, last_stall = time.monotonic(), self._stall_us(swap)
        while True:
            await self.step(swap)
            await swap.wait_pressure(swap.interval)
            now = time.monotonic()
            if now - last_t < self.period:
                continue
            stall = self._stall_us(swap)
            pressure = (stall - last_stall) / 1e6 / (now - last_t)
            last_t, last_stall = now, stall
            lim = swap.limit or 0
            if pressure < self.target:
                lim = int(lim * (1 - self.stepf))
            else:
                lim = int(lim * (1 + self.stepf * min(10.0, pressure / self.target)))
            top = ceiling if ceiling is not None else max(lim, swap.peak_resident)
            lim = max(self.min_bytes, min(lim, top))
            swap.set_limit(lim)
            self.history.append({"t": now - swap.started, "pressure": pressure, "limit": lim})
            del self.history[:-1000]


class NoPolicy(Policy):
    """Evict only when asked (Swap.evict); faults are still served from the store."""

    name = "none"

    async def run(self, swap: Swap) -> None:
        # nothing here evicts on its own, so nothing may wait at the limit
        lib.uf_budget_set(swap._budget, 0, -1)
        swap._kick_all()
        while True:
            await swap.measure()
            await anyio.sleep(0.5)


POLICIES: dict[str, type[Policy]] = {
    "limit": LimitPolicy,
    "pressure": PressurePolicy,
    "none": NoPolicy,
}


def make_policy(name: str | None) -> Policy:
    if name is None:
        return LimitPolicy()
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}") from None
