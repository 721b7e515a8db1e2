"""Taking charge of a process that did not cooperate: ptrace (``uffdio attach PID``).

What the agent does from inside, this does with system calls injected into a stopped thread
of the target (csrc/inject.c: every thread is stopped for the session, registers are
restored exactly, nothing is written into the target's code):

- ``userfaultfd(O_CLOEXEC|O_NONBLOCK)`` in the target; the manager takes a duplicate with
  pidfd_getfd and does UFFDIO_API and UFFDIO_REGISTER on it (both act on the mm the uffd
  was created in, i.e. the target's);
- ``mmap`` of a scratch area and a control page for the arguments of injected ioctls;
- eviction: ``ioctl(uffd, UFFDIO_MOVE, ...)`` batches into the scratch area (MOVE is
  same-mm only) and ``madvise(DONTNEED)`` of the scratch area afterwards;
- release: every evicted page is brought back, everything is unregistered, and the uffd and
  the scratch area are closed and unmapped in the target: it is left as it was.

Pages that are never evicted: the page(s) holding a thread's rseq area.  Between two
injected calls the injection thread passes through the kernel's exit-to-user path, which reads
and writes its rseq area (after every preemption, and each ptrace stop is one).  Had a MOVE
of the same session taken that page away, the thread would wait in a kernel-mode fault that
the engine holds until the batch is settled - after the session, which waits for the thread:
a deadlock (and once the manager gave up, a target spinning in the kernel with the session's
signal mask).  Every session asks inject.c for the threads' rseq areas (a pseudo-call that
costs no extra stop), so the list follows threads as they come and go.

Constraint on the program that embeds the manager: while a session runs, no other thread of
its process may wait for the target (``Popen.wait()``/``poll()`` on it, ``os.waitpid(pid)``
or ``waitpid(-1)``, an asyncio child watcher that owns it).  The kernel reports ptrace stops
to any thread of the tracer's process that waits for the tracee, so such a waiter takes our
stop and reads a bogus "stopped" status (``Popen`` then believes the child died of SIGTRAP).
inject.c notices a stolen stop and carries on, but the waiter's view of the child is wrong.
Start a target you mean to attach to with ``subprocess.Popen`` (not asyncio/anyio process
APIs, whose watchers wait for it) and wait for it only after ``release()``.

Needs CAP_SYS_PTRACE (or the same user under kernel.yama.ptrace_scope=0) and a kernel
with UFFDIO_MOVE (6.8) for eviction.  While attached, the target's own uffd fd keeps the
registrations alive: if the manager dies, faulting threads wait rather than read zeros.
"""

from __future__ import annotations

import bisect
import errno
import os
import struct
from collections.abc import Sequence

import anyio

from . import _constants as C
from ._constants import Feature
from ._errors import (
    UffdError,
    UffdPermissionError,
    UffdProcessGone,
    UffdUnsupportedError,
    error_for,
)
from ._lib import ffi, lib
from ._process import read_memory, write_memory
from ._uffd import Userfaultfd
from .manage import PAGE, ManagedProcess, Manager

NR_CLOSE, NR_MMAP, NR_IOCTL, NR_MUNMAP, NR_MADVISE, NR_USERFAULTFD = 3, 9, 16, 11, 28, 323
UFFDIO_MOVE = 0xC028AA05
MOVE_ALLOW_SRC_HOLES = 2
MOVE_STRUCT = struct.Struct("<QQQQq")  # dst, src, len, mode, move
SCRATCH = 16 << 20  # two halves (see swap.py)
CTL = 64 << 10
MAX_MOVES = CTL // MOVE_STRUCT.size


UF_CALL_RSEQ_AREAS = -1000  # inject.c pseudo-call: the stopped threads' rseq areas
UF_CALL_UNLESS_RSEQ = -1001  # inject.c pseudo-call: skip the next call if it touches that area
UF_CALL_IF_SAME_FILE = -1002  # inject.c pseudo-call: run the rest only if target fd == our fd


def inject(
    pid: int, calls: Sequence[Sequence[int]], rseq_areas: list[tuple[int, int]] | None = None
) -> list[int]:
    """Run ``calls`` ((nr, args...)) in the stopped target; returns their raw results.

    With ``rseq_areas`` (a list), the same session also stores the (start, length) of every
    thread's rseq area in it (replacing its contents; left alone if the kernel cannot tell)."""
    first = 0 if rseq_areas is None else 1
    arr = ffi.new("struct uf_syscall[]", max(1, first + len(calls)))
    cap = 0
    areas = ffi.NULL
    if rseq_areas is not None:
        try:
            cap = len(os.listdir(f"/proc/{pid}/task")) + 64
        except OSError:
            cap = 64
        areas = ffi.new("uint64_t[]", 2 * cap)
        arr[0].nr = UF_CALL_RSEQ_AREAS
        arr[0].args[0] = int(ffi.cast("intptr_t", areas))
        arr[0].args[1] = cap
    for i, (nr, *args) in enumerate(calls):
        arr[first + i].nr = nr
        for k, a in enumerate(args):
            arr[first + i].args[k] = a
    rc = lib.uf_inject(pid, arr, first + len(calls))
    if rc == -errno.EPERM:
        tracer = _tracer_or_0(pid)
        if tracer:
            raise UffdPermissionError(
                errno.EBUSY,
                "ptrace",
                f"pid {pid} is already traced by pid {tracer} ({_comm(tracer)})",
                "detach the debugger or tracer first",
            )
        raise UffdPermissionError(
            errno.EPERM,
            "ptrace",
            f"pid {pid}: attaching is not permitted",
            "run as root (CAP_SYS_PTRACE), or as the same user with "
            "kernel.yama.ptrace_scope=0; a process traced by a debugger must be detached first",
        )
    if rc == -errno.ESRCH:
        raise UffdProcessGone(errno.ESRCH, "ptrace", f"pid {pid} exited")
    if rc == -errno.ENOEXEC:
        raise UffdUnsupportedError(
            errno.ENOEXEC,
            "ptrace",
            f"pid {pid}: no syscall instruction to borrow (not a 64-bit x86 process?)",
        )
    if rc < 0:
        raise error_for(-rc, "ptrace", f"pid {pid}")
    if rseq_areas is not None and arr[0].ret >= 0:
        n = min(int(arr[0].ret), cap)
        rseq_areas[:] = [(int(areas[2 * i]), int(areas[2 * i + 1])) for i in range(n)]
    return [int(arr[first + i].ret) for i in range(len(calls))]


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _tracer_or_0(pid: int) -> int:
    try:
        return _tracer(pid)
    except UffdProcessGone:
        return 0


def _same_file(pid: int, fd: int, local: int) -> bool | None:
    """Is fd ``fd`` of ``pid`` our open file ``local`` (kcmp)?  None if it cannot tell."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    r = libc.syscall(
        ctypes.c_long(312),
        ctypes.c_long(pid),
        ctypes.c_long(os.getpid()),
        ctypes.c_long(0),
        ctypes.c_long(fd),
        ctypes.c_long(local),
    )  # kcmp(pid, self, KCMP_FILE, fd, local)
    if r < 0:
        e = ctypes.get_errno()
        return False if e == errno.EBADF else None
    return bool(r == 0)


def _pages_of(areas: Sequence[tuple[int, int]]) -> frozenset[int]:
    """The pages that ``areas`` ((start, length) pairs) touch."""
    out: set[int] = set()
    for a, n in areas:
        out.update(range(a & ~(PAGE - 1), a + max(n, 1), PAGE))
    return frozenset(out)


def _without(
    src: int, dst: int, ln: int, pinned: frozenset[int]
) -> tuple[list[tuple[int, int, int]], int]:
    """The move (src, dst, ln) minus the pinned pages: the pieces left, and how many pages
    were taken out."""
    hits = sorted(p for p in pinned if src <= p < src + ln)
    if not hits:
        return [(src, dst, ln)], 0
    pieces = []
    pos = src
    for p in hits:
        if p > pos:
            pieces.append((pos, dst + (pos - src), p - pos))
        pos = p + PAGE
    if pos < src + ln:
        pieces.append((pos, dst + (pos - src), src + ln - pos))
    return pieces, len(hits)


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
    except FileNotFoundError:
        raise UffdProcessGone(errno.ESRCH, "attach", f"there is no process {pid}") from None


def _tracer(pid: int) -> int:
    return int(_status(pid).get("TracerPid", "0"))


def anonymous_mappings(pid: int) -> list[tuple[int, int]]:
    """Private anonymous writable mappings of ``pid`` (the heap included, [stack] not)."""
    out = []
    try:
        f = open(f"/proc/{pid}/maps")
    except FileNotFoundError:
        raise UffdProcessGone(errno.ESRCH, "attach", f"pid {pid} exited") from None
    with f:
        for line in f:
            parts = line.split(maxsplit=5)
            perms, inode = parts[1], parts[4]
            name = parts[5].strip() if len(parts) > 5 else ""
            if not perms.startswith("rw") or perms[3] != "p" or inode != "0":
                continue
            if name and name != "[heap]" and not name.startswith("[anon:"):
                continue
            s, e = (int(x, 16) for x in parts[0].split("-"))
            out.append((s, e - s))
    return out


def vma_ends(pid: int) -> list[int]:
    """The end address of every mapping of ``pid``, ascending."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return [int(line.split("-", 1)[1].split(None, 1)[0], 16) for line in f]
    except FileNotFoundError:
        raise UffdProcessGone(errno.ESRCH, "evict", f"pid {pid} exited") from None


def _split_at(src: int, dst: int, ln: int, ends: list[int]) -> list[tuple[int, int, int]]:
    """The move (src, dst, ln) cut where a mapping ends: UFFDIO_MOVE works inside one VMA
    (a run of present pages may span two adjacent ones, e.g. a heap grown after the scan)."""
    out = []
    i = bisect.bisect_right(ends, src)
    while i < len(ends) and ends[i] < src + ln:
        cut = ends[i] - src
        out.append((src, dst, cut))
        src, dst, ln = src + cut, dst + cut, ln - cut
        i += 1
    out.append((src, dst, ln))
    return out


class AttachedProcess(ManagedProcess):
    """A process taken over with ptrace (see the module docstring)."""

    def __init__(self, manager: Manager, pid: int) -> None:
        super().__init__(manager, pid, 0, None)  # type: ignore[arg-type]
        self.target_fd = -1
        self.ctl = 0
        self.rseq_areas: list[tuple[int, int]] = []
        self._pinned: frozenset[int] = frozenset()  # never moved (see the module docstring)
        self._zap_failed: tuple[int, int] | None = None  # a scratch zap to try again

    def _set_rseq_areas(self, areas: list[tuple[int, int]]) -> None:
        self.rseq_areas = areas
        self._pinned = _pages_of(areas)

    def _gone_by_exec(self) -> UffdProcessGone:
        """Our uffd is not in the target any more: it exited, or it exec'd."""
        self.manager._retire(self)  # nothing more is done to it
        try:
            dead = _status(self.pid).get("State", "").startswith(("Z", "X"))
        except UffdProcessGone:
            dead = True
        if dead:
            return UffdProcessGone(errno.ESRCH, "attach", f"pid {self.pid} exited")
        return UffdProcessGone(
            errno.ESRCH,
            "attach",
            f"pid {self.pid} exec'd another program (or closed its userfaultfd): "
            "it is no longer the process that was attached",
        )

    async def _inject(self, calls: Sequence[Sequence[int]]) -> list[int]:
        """One session; it also refreshes the threads' rseq areas.  It runs only if the
        target still holds our uffd: a process that exec'd is another program, whose fds
        and mappings we must not touch (UffdProcessGone then)."""
        areas = list(self.rseq_areas)
        guard = (UF_CALL_IF_SAME_FILE, self.target_fd, self._local())
        rets = await anyio.to_thread.run_sync(inject, self.pid, [guard, *calls], areas)
        self._set_rseq_areas(areas)
        if rets[0] != 0:
            raise self._gone_by_exec()
        return rets[1:]

    def _write_snapshot(self, scratch_runs: object = None, last: bool = False) -> bool:
        return True  # no agent keeps snapshots for an attached process (no takeover)

    def _local(self) -> int:
        return self._open_uffd().fileno()

    async def _op_scan(self) -> Sequence[int]:
        if _same_file(self.pid, self.target_fd, self._local()) is False:
            raise self._gone_by_exec()  # its mappings are another program's now
        words: list[int] = []
        lo, hi = self.scratch, self.scratch + self.scratch_len + CTL
        for s, n in await anyio.to_thread.run_sync(anonymous_mappings, self.pid):
            # The kernel merges the control pages (and the scratch area, before it is
            # registered) with an adjacent anonymous mapping: register what is not ours.
            pieces = [(s, n)]
            if s < hi and lo < s + n:
                pieces = [(a, b - a) for a, b in ((s, lo), (hi, s + n)) if b > a]
            for a, ln in pieces:
                rc = lib.uf_register(self._local(), a, ln, int(C.Mode.MISSING), ffi.NULL)
                if rc == 0:
                    words += [a, ln]
        return words

    @property
    def zap_with_move(self) -> bool:
        return True  # the zap is one more call in the move's injection session

    async def _op_move(
        self, triples: Sequence[int], zap: tuple[int, int] | None = None
    ) -> tuple[Sequence[int], int, int]:
        moved: list[int] = []
        skipped = 0
        todo = []
        if self._zap_failed is not None:  # an earlier zap that failed: before anything moves
            await self._op_dontneed(list(self._zap_failed))
            self._zap_failed = None
        ends = await anyio.to_thread.run_sync(vma_ends, self.pid)
        for i in range(0, len(triples), 3):
            src, dst, ln = triples[i : i + 3]
            # registered with our uffd right now (not something mapped since the scan)?
            if lib.uf_register(self._local(), src, ln, int(C.Mode.MISSING), ffi.NULL) < 0:
                skipped += ln // PAGE
                continue
            # never a thread's rseq area: the injection thread touches it between calls
            pieces, left = _without(src, dst, ln, self._pinned)
            skipped += left
            for s_, d_, n_ in pieces:
                todo += _split_at(s_, d_, n_, ends)
        # One session per batch.  After it, until the batch is settled, the engine holds
        # faults on the moved pages; a thread that takes such a fault in kernel mode (a
        # read() into a moved buffer, its rseq area) cannot reach a ptrace stop then, so
        # a second session would wait for it forever.  (A batch is at most the scratch
        # area: far fewer runs than MAX_MOVES; the rest would wait for the next round.)
        skipped += sum(n_ for _s, _d, n_ in todo[MAX_MOVES:]) // PAGE
        chunk = todo[:MAX_MOVES]
        if not chunk:
            if zap is not None and zap[1]:
                await self._op_dontneed(list(zap))
            return moved, skipped, 0
        blob = b"".join(MOVE_STRUCT.pack(d, s, n, MOVE_ALLOW_SRC_HOLES, 0) for s, d, n in chunk)
        await anyio.to_thread.run_sync(write_memory, self.pid, [(self.ctl, len(blob))], blob)
        calls: list[tuple[int, ...]] = []
        for i, (s_, _d, n_) in enumerate(chunk):
            # checked in the session itself: skipped if it holds the injection thread's
            # rseq area after all (a list from an earlier session can be stale)
            calls.append((UF_CALL_UNLESS_RSEQ, s_, n_))
            calls.append((NR_IOCTL, self.target_fd, UFFDIO_MOVE, self.ctl + i * MOVE_STRUCT.size))
        if zap is not None and zap[1]:
            calls.append((NR_MADVISE, zap[0], zap[1], 4))  # the previous batch's scratch half
        rets = await self._inject(calls)
        if zap is not None and zap[1] and rets[-1] < 0:
            # never an error here: the pages above did move; the next move retries it
            self._zap_failed = zap
        back = bytearray(len(blob))
        await anyio.to_thread.run_sync(read_memory, self.pid, [(self.ctl, len(blob))], back)
        for i, (s_, _d, n_) in enumerate(chunk):
            got = MOVE_STRUCT.unpack_from(back, i * MOVE_STRUCT.size)[4]
            ret = rets[2 * i + 1]
            done = n_ if ret == 0 else max(0, got) if ret != -errno.EDEADLK else 0
            if done:
                moved += [s_, done]
            skipped += (n_ - done) // PAGE  # refused pages stay; the next round retries
        return moved, skipped, 0

    async def _op_dontneed(self, ranges: list[int]) -> None:
        calls = [(NR_MADVISE, ranges[i], ranges[i + 1], 4) for i in range(0, len(ranges), 2)]
        rets = await self._inject(calls)
        for r in rets:
            if r < 0:
                raise error_for(-r, "evict: emptying the scratch area", f"pid {self.pid}")

    async def release(self) -> None:
        """Bring every evicted page back, unregister everything, close the uffd and unmap
        the scratch area in the target: it is left as it was."""
        async with self._evict_lock:
            self._fenced += 1
            try:
                if not self.exited and _same_file(self.pid, self.target_fd, self._local()) is False:
                    self.exited = True  # it exec'd: another program, nothing of ours is there
                if not self.exited:
                    await self.swap_in_all()
                    for s, n in await anyio.to_thread.run_sync(anonymous_mappings, self.pid):
                        lib.uf_unregister(self._local(), s, n)  # another uffd's: EINVAL, kept
                    lib.uf_unregister(self._local(), self.scratch, self.scratch_len)
                    await self._inject(
                        [(NR_CLOSE, self.target_fd), (NR_MUNMAP, self.scratch, SCRATCH + CTL)]
                    )
            except UffdProcessGone:
                pass  # exited (or exec'd) meanwhile: nothing left to give back
            # (on any other error it stays served: evicted pages may still be out)
            self.manager._retire(self)


async def _undo_attach(pid: int, fd_t: int, local: int, cleanup: list[tuple[int, ...]]) -> str:
    """Closes and unmaps what the first session made in the target, but only in the image
    it was made in (checked against our duplicate of its uffd: without one, nothing is
    touched).  Returns why the target is not there any more ("exited", "exec'd"), or ""."""
    if not cleanup or local < 0:
        try:
            st = _status(pid)
        except UffdProcessGone:
            return "exited"
        return "exited" if st.get("State", "").startswith(("Z", "X")) else ""
    try:
        rets = await anyio.to_thread.run_sync(
            inject, pid, [(UF_CALL_IF_SAME_FILE, fd_t, local), *cleanup]
        )
    except UffdProcessGone:
        return "exited"
    except UffdError:
        return ""
    return "exec'd" if rets[0] != 0 else ""


async def attach(manager: Manager, pid: int) -> AttachedProcess:
    """Take charge of the running process ``pid`` (see the module docstring)."""
    if pid == os.getpid():
        raise error_for(errno.EINVAL, "attach", "a manager cannot attach to itself")
    st = _status(pid)
    if st.get("Tgid") != str(pid):
        raise error_for(errno.EINVAL, "attach", f"{pid} is a thread of process {st.get('Tgid')}")
    if st.get("State", "").startswith(("Z", "X")) and int(st.get("Threads", "1")) > 1:
        # its memory is reachable only through the other threads then (/proc/PID/maps is
        # empty, process_vm_readv(PID) fails), and the manager addresses it by PID
        raise UffdUnsupportedError(
            errno.EOPNOTSUPP,
            "attach",
            f"the main thread of pid {pid} has exited (its other threads run on)",
            "attach before the main thread exits",
        )
    tracer = int(st.get("TracerPid", "0"))
    if tracer:
        raise UffdPermissionError(
            errno.EBUSY,
            "attach",
            f"pid {pid} is already traced by pid {tracer} ({_comm(tracer)})",
            "detach the debugger or tracer first",
        )
    if pid in manager.processes:
        raise error_for(errno.EEXIST, "attach", f"pid {pid} is already managed here")
    areas: list[tuple[int, int]] = []
    fd_t, base = await anyio.to_thread.run_sync(
        inject,
        pid,
        [
            (NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK),
            (NR_MMAP, 0, SCRATCH + CTL, 3, 0x22, -1, 0),
        ],
        areas,
    )
    cleanup: list[tuple[int, ...]] = []
    if fd_t >= 0:
        cleanup.append((NR_CLOSE, fd_t))
    if base >= 0:
        cleanup.append((NR_MUNMAP, base, SCRATCH + CTL))
    local = -1
    u: Userfaultfd | None = None
    try:
        if fd_t < 0:
            raise error_for(
                -fd_t,
                "attach: userfaultfd() in the target",
                f"pid {pid} may not create a userfaultfd (it needs CAP_SYS_PTRACE, "
                "vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd)",
            )
        # our duplicate first: it is what proves, later, that the target is still the
        # image we made things in (see _undo_attach)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise UffdProcessGone(errno.ESRCH, "attach", f"pid {pid} exited") from None
        try:
            got = lib.uf_pidfd_getfd(pidfd, fd_t)
        finally:
            os.close(pidfd)
        if got < 0:
            raise error_for(-got, "attach: pidfd_getfd", f"pid {pid}")
        if not os.readlink(f"/proc/self/fd/{got}").endswith("[userfaultfd]"):
            os.close(got)  # the fd number is another program's file now: touch nothing
            raise UffdProcessGone(errno.ESRCH, "attach", f"pid {pid} exec'd during attach")
        local = got
        if base < 0:
            raise error_for(-base, "attach: mmap in the target", f"pid {pid}")
        avail, _ = Userfaultfd.probe()
        want = int(avail) & int(
            Feature.EVENT_FORK
            | Feature.EVENT_REMAP
            | Feature.EVENT_REMOVE
            | Feature.EVENT_UNMAP
            | Feature.MOVE
        )
        fout = ffi.new("uint64_t *")
        iout = ffi.new("uint64_t *")
        rc = lib.uf_api(local, want, fout, iout)
        if rc < 0:
            raise error_for(-rc, "attach: UFFDIO_API", f"features {Feature(want)!r}")
        u = Userfaultfd(local, want, iout[0])
        manager._setup_uffd(u)
        proc = AttachedProcess(manager, pid)
        proc._hold_for_move = False
        proc._welcomed.set()  # (no agent: nothing to wait for)
        proc.uffd = u
        proc.features = Feature(want)
        proc.event_fork = bool(want & Feature.EVENT_FORK)
        proc.target_fd = fd_t
        proc.scratch, proc.scratch_len, proc.ctl = base, SCRATCH, base + SCRATCH
        proc._set_rseq_areas(areas)
        rc = lib.uf_register(local, base, SCRATCH, int(C.Mode.MISSING), ffi.NULL)
        if rc < 0:
            raise error_for(-rc, "attach: registering the scratch area", f"pid {pid}")
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            gone = await _undo_attach(pid, fd_t, local, cleanup)
        if u is not None:
            u.close()
        elif local >= 0:
            os.close(local)
        if gone and isinstance(exc, UffdError) and not isinstance(exc, UffdProcessGone):
            raise UffdProcessGone(errno.ESRCH, "attach", f"pid {pid} {gone} during attach") from exc
        raise
    try:
        await manager._start_attached(proc)
        await proc.scan()
    except BaseException:
        with anyio.CancelScope(shield=True):
            try:
                await proc.release()  # unregisters, closes the uffd and unmaps in the target
            except UffdError:
                manager._retire(proc)
        raise
    return proc
