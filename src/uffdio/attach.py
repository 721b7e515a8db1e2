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

Needs CAP_SYS_PTRACE (or the same user under kernel.yama.ptrace_scope=0) and a kernel
with UFFDIO_MOVE (6.8) for eviction.  While attached, the target's own uffd fd keeps the
registrations alive: if the manager dies, faulting threads wait rather than read zeros.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Sequence

import anyio

from . import _constants as C
from ._constants import Feature
from ._errors import UffdError, UffdPermissionError, UffdProcessGone, error_for
from ._lib import ffi, lib
from ._process import read_memory, write_memory
from ._uffd import Userfaultfd
from .manage import PAGE, ManagedProcess, Manager

NR_CLOSE, NR_MMAP, NR_IOCTL, NR_MUNMAP, NR_MADVISE, NR_USERFAULTFD = 3, 9, 16, 11, 28, 323
UFFDIO_MOVE = 0xC028AA05
MOVE_ALLOW_SRC_HOLES = 2
MOVE_STRUCT = struct.Struct("<QQQQq")  # dst, src, len, mode, move
SCRATCH = 4 << 20
CTL = 64 << 10
MAX_MOVES = CTL // MOVE_STRUCT.size


def inject(pid: int, calls: Sequence[Sequence[int]]) -> list[int]:
    """Run ``calls`` ((nr, args...)) in the stopped target; returns their raw results."""
    arr = ffi.new("struct uf_syscall[]", max(1, len(calls)))
    for i, (nr, *args) in enumerate(calls):
        arr[i].nr = nr
        for k, a in enumerate(args):
            arr[i].args[k] = a
    rc = lib.uf_inject(pid, arr, len(calls))
    if rc == -errno.EPERM:
        raise UffdPermissionError(
            errno.EPERM,
            "ptrace",
            f"pid {pid}: attaching is not permitted",
            "run as root (CAP_SYS_PTRACE), or as the same user with "
            "kernel.yama.ptrace_scope=0; a process traced by a debugger must be detached first",
        )
    if rc == -errno.ESRCH:
        raise UffdProcessGone(errno.ESRCH, "ptrace", f"pid {pid} exited")
    if rc < 0:
        raise error_for(-rc, "ptrace", f"pid {pid}")
    return [int(arr[i].ret) for i in range(len(calls))]


def _tracer(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        raise UffdProcessGone(errno.ESRCH, "attach", f"there is no process {pid}") from None
    return 0


def anonymous_mappings(pid: int) -> list[tuple[int, int]]:
    """Private anonymous writable mappings of ``pid`` (the heap included, [stack] not)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
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


class AttachedProcess(ManagedProcess):
    """A process taken over with ptrace (see the module docstring)."""

    def __init__(self, manager: Manager, pid: int) -> None:
        super().__init__(manager, pid, 0, None)  # type: ignore[arg-type]
        self.target_fd = -1
        self.ctl = 0

    def _write_snapshot(self, scratch_runs: object = None) -> None:
        pass  # no agent keeps snapshots for an attached process (no takeover)

    def _local(self) -> int:
        assert self.uffd is not None
        return self.uffd.fileno()

    async def _op_scan(self) -> Sequence[int]:
        words: list[int] = []
        lo, hi = self.scratch, self.scratch + self.scratch_len + CTL
        for s, n in await anyio.to_thread.run_sync(anonymous_mappings, self.pid):
            if s < hi and lo < s + n:
                continue
            rc = lib.uf_register(self._local(), s, n, int(C.Mode.MISSING), ffi.NULL)
            if rc == 0:
                words += [s, n]
        return words

    async def _op_move(self, triples: list[int]) -> tuple[Sequence[int], int]:
        moved: list[int] = []
        skipped = 0
        todo = []
        for i in range(0, len(triples), 3):
            src, dst, ln = triples[i : i + 3]
            # registered with our uffd right now (not something mapped since the scan)?
            if lib.uf_register(self._local(), src, ln, int(C.Mode.MISSING), ffi.NULL) < 0:
                skipped += ln // PAGE
                continue
            todo.append((src, dst, ln))
        for k in range(0, len(todo), MAX_MOVES):
            chunk = todo[k : k + MAX_MOVES]
            blob = b"".join(MOVE_STRUCT.pack(d, s, n, MOVE_ALLOW_SRC_HOLES, 0) for s, d, n in chunk)
            await anyio.to_thread.run_sync(write_memory, self.pid, [(self.ctl, len(blob))], blob)
            calls = [
                (NR_IOCTL, self.target_fd, UFFDIO_MOVE, self.ctl + i * MOVE_STRUCT.size)
                for i in range(len(chunk))
            ]
            rets = await anyio.to_thread.run_sync(inject, self.pid, calls)
            back = bytearray(len(blob))
            await anyio.to_thread.run_sync(read_memory, self.pid, [(self.ctl, len(blob))], back)
            for i, (s, _d, n) in enumerate(chunk):
                got = MOVE_STRUCT.unpack_from(back, i * MOVE_STRUCT.size)[4]
                done = n if rets[i] == 0 else max(0, got)
                if done:
                    moved += [s, done]
                skipped += (n - done) // PAGE  # refused pages stay; the next round retries
        return moved, skipped

    async def _op_dontneed(self, ranges: list[int]) -> None:
        calls = [(NR_MADVISE, ranges[i], ranges[i + 1], 4) for i in range(0, len(ranges), 2)]
        rets = await anyio.to_thread.run_sync(inject, self.pid, calls)
        for r in rets:
            if r < 0:
                raise error_for(-r, "evict: emptying the scratch area", f"pid {self.pid}")

    async def release(self) -> None:
        """Bring every evicted page back, unregister everything, close the uffd and unmap
        the scratch area in the target: it is left as it was."""
        async with self._evict_lock:
            self._fenced += 1
            if not self.exited:
                await self.swap_in_all()
                for s, n in await anyio.to_thread.run_sync(anonymous_mappings, self.pid):
                    lib.uf_unregister(self._local(), s, n)  # another uffd's: EINVAL, kept
                lib.uf_unregister(self._local(), self.scratch, self.scratch_len)
                try:
                    await anyio.to_thread.run_sync(
                        inject,
                        self.pid,
                        [(NR_CLOSE, self.target_fd), (NR_MUNMAP, self.scratch, SCRATCH + CTL)],
                    )
                except UffdProcessGone:
                    pass
        self.manager._retire(self)


async def attach(manager: Manager, pid: int) -> AttachedProcess:
    """Take charge of the running process ``pid`` (see the module docstring)."""
    if pid == os.getpid():
        raise error_for(errno.EINVAL, "attach", "a manager cannot attach to itself")
    tracer = _tracer(pid)
    if tracer:
        raise UffdPermissionError(
            errno.EBUSY,
            "attach",
            f"pid {pid} is already traced by pid {tracer}",
            "detach the debugger or tracer first",
        )
    if pid in manager.processes:
        raise error_for(errno.EEXIST, "attach", f"pid {pid} is already managed here")
    fd_t, base = await anyio.to_thread.run_sync(
        inject,
        pid,
        [
            (NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK),
            (NR_MMAP, 0, SCRATCH + CTL, 3, 0x22, -1, 0),
        ],
    )
    cleanup: list[tuple[int, ...]] = []
    if fd_t >= 0:
        cleanup.append((NR_CLOSE, fd_t))
    if base >= 0:
        cleanup.append((NR_MUNMAP, base, SCRATCH + CTL))
    try:
        if fd_t < 0:
            raise error_for(
                -fd_t,
                "attach: userfaultfd() in the target",
                f"pid {pid} may not create a userfaultfd (it needs CAP_SYS_PTRACE, "
                "vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd)",
            )
        if base < 0:
            raise error_for(-base, "attach: mmap in the target", f"pid {pid}")
        pidfd = os.pidfd_open(pid)
        try:
            local = lib.uf_pidfd_getfd(pidfd, fd_t)
        finally:
            os.close(pidfd)
        if local < 0:
            raise error_for(-local, "attach: pidfd_getfd", f"pid {pid}")
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
            os.close(local)
            raise error_for(-rc, "attach: UFFDIO_API", f"features {Feature(want)!r}")
        u = Userfaultfd(local, want, iout[0])
        manager._setup_uffd(u)
        proc = AttachedProcess(manager, pid)
        proc.uffd = u
        proc.features = Feature(want)
        proc.event_fork = bool(want & Feature.EVENT_FORK)
        proc.target_fd = fd_t
        proc.scratch, proc.scratch_len, proc.ctl = base, SCRATCH, base + SCRATCH
        rc = lib.uf_register(local, base, SCRATCH, int(C.Mode.MISSING), ffi.NULL)
        if rc < 0:
            u.close()
            raise error_for(-rc, "attach: registering the scratch area", f"pid {pid}")
    except BaseException:
        if cleanup:
            try:
                await anyio.to_thread.run_sync(inject, pid, cleanup)
            except UffdError:
                pass
        raise
    await manager._start_attached(proc)
    await proc.scan()
    return proc
