"""The userfaultfd object: kernel operations, the C resolver's rules, and the async fault loop."""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import socket
import sys
import time
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import anyio
import anyio.abc

from . import _constants as C
from ._constants import Event, FaultFlag, Feature, Ioctl, Mode
from ._errors import UffdClosedError, UffdError, UffdRangeError, UnhandledFault, check, error_for
from ._lib import CData, ffi, lib

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


def _sole(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (task groups wrap what they
    propagate); ``exc`` itself when there are several."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


Buffer = Union[bytes, bytearray, memoryview, Any]
RangeList = Sequence[tuple[int, int]]

#: records taken from the engine per call into C
TAKE_MAX = 512


def _check_range(start: int, length: int, op: str) -> None:
    if not isinstance(start, int) or not isinstance(length, int):
        raise TypeError(
            f"{op}: start and length must be int, not {type(start).__name__}, "
            f"{type(length).__name__}"
        )
    if length <= 0:
        raise UffdRangeError(
            errno.EINVAL,
            op,
            f"length {length} is not positive",
            "pass a length of at least one page (4096)",
        )
    if start < 0 or start + length > 1 << 64:
        raise UffdRangeError(
            errno.EINVAL,
            op,
            f"range {start:#x}+{length:#x} is outside the address space",
            "pass a user-space address",
        )
    if start % C.PAGE_SIZE or length % C.PAGE_SIZE:
        raise UffdRangeError(
            errno.EINVAL,
            op,
            f"range {start:#x}+{length:#x} is not page aligned",
            "round start down and length up to multiples of 4096",
        )


def _pairs(ranges: RangeList, op: str) -> CData:
    flat = ffi.new("uint64_t[]", 2 * len(ranges))
    for i, (s, n) in enumerate(ranges):
        _check_range(s, n, op)
        flat[2 * i] = s
        flat[2 * i + 1] = n
    return flat


def _address_of(src: int | Buffer, length: int, op: str) -> tuple[int, Any]:
    """The address of ``src`` (an int, or a buffer lent without copying) and a keep-alive."""
    if isinstance(src, int):
        return src, None
    cbuf = ffi.from_buffer(src)
    if len(cbuf) < length:
        raise UffdRangeError(
            errno.EINVAL,
            op,
            f"source buffer has {len(cbuf)} bytes, {length} needed",
            "pass a buffer at least as long as the range",
        )
    return int(ffi.cast("uintptr_t", cbuf)), cbuf


# ---------------------------------------------------------------------------------------------
# messages


class Fault(NamedTuple):
    """One page fault.  Made only on request (iteration of a :class:`FaultBatch`)."""

    address: int
    flags: int
    tid: int

    @property
    def is_write(self) -> bool:
        return bool(self.flags & FaultFlag.WRITE)

    @property
    def is_wp(self) -> bool:
        return bool(self.flags & FaultFlag.WP)

    @property
    def is_minor(self) -> bool:
        return bool(self.flags & FaultFlag.MINOR)

    @property
    def page(self) -> int:
        return self.address & ~(C.PAGE_SIZE - 1)


class FaultBatch:
    """Faults that reached Python together, kept as compact arrays (no object per fault).

    ``addresses``, ``flags`` and ``tids`` are ``array`` objects of equal length; the batch owns
    them, so a handler may keep the batch after it returns.
    """

    __slots__ = ("uffd", "addresses", "flags", "tids")

    def __init__(self, uffd: Userfaultfd) -> None:
        self.uffd = uffd
        self.addresses = array("Q")
        self.flags = array("Q")
        self.tids = array("Q")

    def __len__(self) -> int:
        return len(self.addresses)

    def __iter__(self) -> Iterator[Fault]:
        for a, f, t in zip(self.addresses, self.flags, self.tids, strict=True):
            yield Fault(a, f, t)

    def pages(self) -> list[int]:
        """Page-aligned fault addresses, duplicates removed, in order."""
        return list(dict.fromkeys(a & ~(C.PAGE_SIZE - 1) for a in self.addresses))

    def __repr__(self) -> str:
        return f"<FaultBatch {len(self)} faults>"


@dataclass(frozen=True)
class ForkEvent:
    """The process forked; ``child`` serves the child's copy of the registered ranges."""

    uffd: Userfaultfd
    child: Userfaultfd
    kind: Event = Event.FORK


@dataclass(frozen=True)
class RemapEvent:
    """mremap moved ``length`` bytes from ``old`` to ``new``."""

    uffd: Userfaultfd
    old: int
    new: int
    length: int
    kind: Event = Event.REMAP


@dataclass(frozen=True)
class RemoveEvent:
    """madvise(DONTNEED/FREE/REMOVE) discarded [start, end): faults there must read zeros."""

    uffd: Userfaultfd
    start: int
    end: int
    kind: Event = Event.REMOVE


@dataclass(frozen=True)
class UnmapEvent:
    """munmap (or an mmap over it) removed [start, end)."""

    uffd: Userfaultfd
    start: int
    end: int
    kind: Event = Event.UNMAP


@dataclass(frozen=True)
class ErrorEvent:
    """The engine failed at something it could not hide: ``error`` says what."""

    uffd: Userfaultfd
    error: UffdError
    address: int
    what: int
    kind: Event = Event.ERROR


AnyEvent = Union[ForkEvent, RemapEvent, RemoveEvent, UnmapEvent, ErrorEvent]
FaultHandler = Callable[[FaultBatch], Awaitable[None]]
EventHandler = Callable[[Any], Awaitable[None]]


# ---------------------------------------------------------------------------------------------
# the resolver


class Resolver:
    """Data sources for faults that the C engine resolves without entering Python.

    Each rule covers a page-aligned range of the uffd's address space.  A fault in a rule is
    served in C: zero-fill, a copy from a buffer in this process, or a read of a file at an
    offset (through the io_uring ring, into a staging buffer) followed by UFFDIO_COPY.
    ``chunk_pages`` > 1 installs that many pages from the faulting one on (read-ahead).
    Events keep rules truthful: madvise(DONTNEED) turns a range to zero-fill, munmap drops it,
    mremap moves it.  Rules never overlap: adding one over another raises unless
    ``replace=True``.
    """

    def __init__(self, uffd: Userfaultfd) -> None:
        self._uffd = uffd
        self._keep: list[Any] = []  # buffers and files that rules point into

    def _add(
        self,
        start: int,
        length: int,
        kind: int,
        src: int,
        fd: int,
        off: int,
        chunk_pages: int,
        replace: bool,
        op: str,
    ) -> None:
        _check_range(start, length, op)
        if not 1 <= chunk_pages <= 512:
            raise UffdRangeError(errno.EINVAL, op, f"chunk_pages={chunk_pages}", "use 1..512 pages")
        e = self._uffd._engine_handle()
        if not replace and lib.uf_rules_overlapping(e, start, length):
            raise UffdRangeError(
                errno.EEXIST,
                op,
                f"{start:#x}+{length:#x} overlaps a rule",
                "remove the old rule first or pass replace=True",
            )
        check(lib.uf_rules_add(e, start, length, kind, src, fd, off, chunk_pages), op)

    def zero(self, start: int, length: int, *, replace: bool = False) -> None:
        """Faults in [start, start+length) get zero pages (UFFDIO_ZEROPAGE)."""
        self._add(start, length, C.RULE_ZERO, 0, -1, 0, 1, replace, "resolver.zero")

    def buffer(
        self, start: int, data: Buffer, *, chunk_pages: int = 1, replace: bool = False
    ) -> None:
        """Faults at ``start + i`` get the page at ``data[i]``; ``data`` must stay unchanged
        while the rule lives (the resolver keeps a reference).  ``len(data)`` must be a multiple
        of the page size."""
        op = "resolver.buffer"
        view = memoryview(data)
        length = view.nbytes
        addr, keep = _address_of(data, length, op)
        self._uffd._check_source(addr, length, op)
        self._add(start, length, C.RULE_BUFFER, addr, -1, 0, chunk_pages, replace, op)
        self._keep.append(keep)

    def file(
        self,
        start: int,
        length: int,
        file: int | Any,
        offset: int = 0,
        *,
        chunk_pages: int = 1,
        replace: bool = False,
    ) -> None:
        """Faults at ``start + i`` get the bytes of ``file`` at ``offset + i`` (read through the
        ring).  Bytes past the end of the file read as zeros.  ``file`` is an fd or an object
        with ``fileno()``; it must stay open while the rule lives."""
        op = "resolver.file"
        fd = file if isinstance(file, int) else file.fileno()
        if offset < 0 or offset % C.PAGE_SIZE:
            raise UffdRangeError(
                errno.EINVAL, op, f"offset {offset}", "pass a page-aligned, non-negative offset"
            )
        try:
            os.fstat(fd)
        except OSError as exc:
            raise UffdClosedError(
                errno.EBADF, op, f"fd {fd}: {exc.strerror}", "pass an open file"
            ) from None
        self._add(start, length, C.RULE_FILE, 0, fd, offset, chunk_pages, replace, op)
        self._keep.append(file)

    def remove(self, start: int, length: int) -> None:
        """Forget the rules in [start, start+length): faults there go to Python again."""
        _check_range(start, length, "resolver.remove")
        check(lib.uf_rules_remove(self._uffd._engine_handle(), start, length), "resolver.remove")

    def __len__(self) -> int:
        e = self._uffd._engine
        return 0 if e is None else int(lib.uf_rules_count(e))


# ---------------------------------------------------------------------------------------------
# the userfaultfd


class Userfaultfd:
    """A userfaultfd, its io_uring engine and its handlers.

    Create one with :meth:`open` (for this process's memory, or to hand to a process that
    cooperates), :meth:`receive` (a uffd sent over a UNIX socket), :meth:`from_pid` (taken from
    another process with pidfd_getfd) or :meth:`from_fd`.  The ioctl methods are synchronous
    and cheap; ``copy``/``zeropage``/... are async only because EAGAIN (events pending) is
    retried after the engine has drained the events.  Faults are served by :meth:`serve`.
    """

    def __init__(
        self,
        fd: int,
        features: int = 0,
        ioctls: int = 0,
        *,
        own_mm: bool = False,
        user_mode_only: bool = False,
    ) -> None:
        self._fd = fd
        self.features = Feature(features)
        self.ioctls = Ioctl(ioctls)
        self.own_mm = own_mm
        self.user_mode_only = user_mode_only
        self._ranges: dict[int, tuple[int, Mode]] = {}
        self._engine: CData | None = None
        #: read fault messages with IORING_OP_READ_MULTISHOT when the kernel has it (6.7+);
        #: False forces the re-armed single READ used on older kernels.  Set before the
        #: engine exists (before the first rule or serve()).
        self.multishot = True
        #: see register(): keep MISSING ranges out of forked children when the uffd has no
        #: EVENT_FORK (True, the safe default), or let children inherit them (False: only
        #: for ranges whose pages are never missing when the process forks).
        self.dontfork_without_event_fork = True
        #: io_uring submission queue entries of the engine's ring
        self.ring_entries = 256
        #: extra engine flags (C.ENGINE_DEFAULT_ZERO for managed processes); set before the
        #: engine exists.  Forked children inherit them.
        self.engine_flags = 0
        #: called with the uffd of a forked child (EVENT_FORK) instead of serving it in this
        #: uffd's task group; whoever sets it serves the child (uffdio's manager does, so a
        #: child outlives its parent's server)
        self.on_fork_child: Callable[[Userfaultfd], Awaitable[None]] | None = None
        #: for a child handed to on_fork_child: the uffd whose FORK message made it (the
        #: callee takes it and sets it back to None)
        self.fork_parent: Userfaultfd | None = None
        #: seconds between looks, while a fork child's uffd is served in this uffd's task
        #: group, at whether the child's process is gone (exited or exec'd): its uffd is
        #: then closed and leaves ``children`` (its statistics stay readable); 0: children
        #: stay until this uffd is closed.  Forked children inherit it.
        self.child_check_interval = 1.0
        self._thread_mode = False
        self._thread_mode_hint: bool | None = None
        self._pending: FaultBatch | None = None
        self._serving = False
        self.resolver = Resolver(self)
        self._fault_handler: FaultHandler | None = None
        self._event_handlers: dict[Event, list[EventHandler]] = {}
        self._children: list[Userfaultfd] = []
        self._stats_py = {"batches_py": 0, "faults_py": 0, "events_py": 0, "eagain_retries": 0}
        #: the engine's counters when it was freed (statistics() of a closed uffd)
        self._final_engine_stats: dict[str, int] | None = None
        self.engine_error: UffdError | None = None

    # ---- creation ---------------------------------------------------------------------------

    @staticmethod
    def probe(*, user_mode_only: bool | None = None) -> tuple[Feature, Ioctl]:
        """Features and ioctls the running kernel offers (on a throw-away uffd)."""
        feats = ffi.new("uint64_t *")
        ioctls = ffi.new("uint64_t *")
        flags = C_OPEN_USER_MODE_ONLY if user_mode_only else 0
        rc = lib.uf_probe(flags, feats, ioctls)
        if user_mode_only is None and rc in (-errno.EPERM, -errno.EACCES):
            rc = lib.uf_probe(C_OPEN_USER_MODE_ONLY, feats, ioctls)  # as open() falls back
        check(rc, "userfaultfd")
        return Feature(feats[0]), Ioctl(ioctls[0])

    @classmethod
    def open(
        cls, features: int = 0, *, optional: int = 0, user_mode_only: bool | None = None
    ) -> Userfaultfd:
        """Open a userfaultfd (O_NONBLOCK|O_CLOEXEC) and negotiate ``features``.

        ``features`` are required: missing ones raise :class:`UffdUnsupportedError` naming them.
        ``optional`` features are added when the kernel has them.  ``user_mode_only``: None
        tries a full uffd and falls back to UFFD_USER_MODE_ONLY when only that is permitted
        (then kernel-mode accesses such as process_vm_readv of a missing page fail with
        EFAULT instead of faulting); True/False forces the choice.
        """
        via = ffi.new("int *")
        if user_mode_only is None:
            fd = lib.uf_open(0, via)
            umo = False
            if fd in (-errno.EPERM, -errno.EACCES):
                fd = lib.uf_open(C_OPEN_USER_MODE_ONLY, via)
                umo = True
        else:
            umo = user_mode_only
            fd = lib.uf_open(C_OPEN_USER_MODE_ONLY if umo else 0, via)
        check(fd, "userfaultfd")
        try:
            avail, _ = cls.probe(user_mode_only=umo)
            missing = int(features) & ~int(avail)  # also bits this code has no name for
            if missing:
                raise error_for(
                    errno.EINVAL,
                    "UFFDIO_API",
                    f"the kernel lacks feature bits {Feature(missing)!r} ({missing:#x}); "
                    f"it offers {avail!r}",
                )
            want = int(features) | (int(optional) & int(avail))
            fout = ffi.new("uint64_t *")
            iout = ffi.new("uint64_t *")
            rc = lib.uf_api(fd, want, fout, iout)
            if (
                rc == -errno.EPERM
                and want & Feature.EVENT_FORK
                and not features & Feature.EVENT_FORK
            ):
                # EVENT_FORK needs CAP_SYS_PTRACE; it was optional: retry without it.  A uffd
                # allows one UFFDIO_API, so open a fresh one.
                os.close(fd)
                fd = check(lib.uf_open(C_OPEN_USER_MODE_ONLY if umo else 0, via), "userfaultfd")
                want &= ~int(Feature.EVENT_FORK)
                rc = lib.uf_api(fd, want, fout, iout)
            check(rc, "UFFDIO_API", f"features {Feature(want)!r}")
        except BaseException:
            os.close(fd)
            raise
        # UFFDIO_API reports everything the kernel offers in .features; what is in force is
        # what was asked for.
        return cls(fd, want, iout[0], own_mm=True, user_mode_only=umo)

    @classmethod
    def from_fd(cls, fd: int, features: int = 0, *, own_mm: bool = False) -> Userfaultfd:
        """Adopt ``fd``, a userfaultfd on which UFFDIO_API was already done (the fd is owned
        and closed by the new object).  ``features`` records what was negotiated."""
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            kind = "anon_inode:[userfaultfd]"  # no /proc: let the kernel judge
        if kind != "anon_inode:[userfaultfd]":
            raise UffdRangeError(
                errno.EINVAL,
                "userfaultfd",
                f"fd {fd} is {kind}, not a userfaultfd",
                "pass the file descriptor of a userfaultfd",
            )
        try:
            os.set_blocking(fd, False)  # a blocking uffd makes io_uring reads fail with EINTR
        except OSError as exc:
            raise error_for(exc.errno or errno.EBADF, "userfaultfd", f"fd {fd}") from None
        return cls(fd, features, 0, own_mm=own_mm)

    @classmethod
    def receive(
        cls, sock: socket.socket | int, features: int = 0, maxdata: int = 256
    ) -> tuple[Userfaultfd, bytes]:
        """Receive a uffd sent with SCM_RIGHTS (see :meth:`send`) and the bytes sent with it."""
        s = sock if isinstance(sock, int) else sock.fileno()
        fdp = ffi.new("int *")
        data = ffi.new("char[]", maxdata)
        n = check(
            lib.uf_recv_fd(s, fdp, data, maxdata),
            "recvmsg(SCM_RIGHTS)",
            "the peer closed the socket without sending a uffd",
        )
        return cls.from_fd(fdp[0], features), bytes(ffi.buffer(data, n))

    @classmethod
    def from_pid(cls, pid: int, targetfd: int, features: int = 0) -> Userfaultfd:
        """Take a duplicate of fd ``targetfd`` of process ``pid`` (pidfd_getfd; needs ptrace
        rights over it)."""
        pidfd = check(lib.uf_pidfd_open(pid, 0), "pidfd_open", f"pid {pid}")
        try:
            fd = check(
                lib.uf_pidfd_getfd(pidfd, targetfd), "pidfd_getfd", f"pid {pid} fd {targetfd}"
            )
        finally:
            os.close(pidfd)
        return cls.from_fd(fd, features)

    def send(self, sock: socket.socket | int, data: bytes = b"") -> None:
        """Send this uffd over a UNIX socket (SCM_RIGHTS)."""
        s = sock if isinstance(sock, int) else sock.fileno()
        check(lib.uf_send_fd(s, self.fileno(), data, len(data)), "sendmsg(SCM_RIGHTS)")

    # ---- basics -----------------------------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise UffdClosedError(
                errno.EBADF, "userfaultfd", "this Userfaultfd is closed", "open a new one"
            )
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the uffd.  Stops the engine first (waiting for every ring completion)."""
        if self._serving:
            raise RuntimeError("close() while serve() runs: cancel the serving task first")
        for child in self._children:
            child.close()
        self._children.clear()
        if self._engine is not None:
            self._final_engine_stats = self._engine_stats()
            lib.uf_engine_free(self._engine)
            self._engine = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Userfaultfd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0 and not getattr(self, "_serving", False):
            self.close()

    def __repr__(self) -> str:
        return f"<Userfaultfd fd={self._fd} features={self.features!r}>"

    def _check_source(self, addr: int, length: int, op: str) -> None:
        """A copy source inside a managed range of this process would fault on itself."""
        if not self.own_mm:
            return
        for s, (n, _) in self._ranges.items():
            if addr < s + n and s < addr + length:
                raise UffdRangeError(
                    errno.EINVAL,
                    op,
                    f"source {addr:#x}+{length:#x} lies in the registered range {s:#x}+{n:#x}",
                    "copy from memory that is not registered",
                )

    # ---- registration -----------------------------------------------------------------------

    def register(self, start: int, length: int, mode: int = Mode.MISSING) -> Ioctl:
        """Register [start, start+length) and return the ioctls allowed on it."""
        _check_range(start, length, "UFFDIO_REGISTER")
        if mode & Mode.WP and not self.features & Feature.PAGEFAULT_FLAG_WP and self.own_mm:
            raise error_for(
                errno.EINVAL, "UFFDIO_REGISTER", "WP mode needs Feature.PAGEFAULT_FLAG_WP at open()"
            )
        out = ffi.new("uint64_t *")
        check(
            lib.uf_register(self.fileno(), start, length, int(mode), out),
            "UFFDIO_REGISTER",
            f"{start:#x}+{length:#x} mode {Mode(mode)!r}",
        )
        self._ranges[start] = (length, Mode(mode))
        if (
            self.own_mm
            and mode & Mode.MISSING
            and not self.features & Feature.EVENT_FORK
            and self.dontfork_without_event_fork
        ):
            # Without EVENT_FORK a forked child's copy of this range is unregistered, so its
            # missing pages would read as ZEROS there.  MADV_DONTFORK keeps the range out of
            # children: an access there is a SIGSEGV in the child, never wrong data.
            rc = lib.uf_madvise(start, length, MADV_DONTFORK)
            if rc < 0:
                lib.uf_unregister(self._fd, start, length)
                del self._ranges[start]
                check(rc, "madvise(MADV_DONTFORK)", f"{start:#x}+{length:#x}")
        return Ioctl(out[0])

    def unregister(self, start: int, length: int) -> None:
        _check_range(start, length, "UFFDIO_UNREGISTER")
        check(
            lib.uf_unregister(self.fileno(), start, length),
            "UFFDIO_UNREGISTER",
            f"{start:#x}+{length:#x}",
        )
        self._ranges.pop(start, None)

    # ---- resolution, non-blocking -----------------------------------------------------------

    def copy_nowait(
        self,
        dst: int,
        src: int | Buffer,
        length: int | None = None,
        *,
        dontwake: bool = False,
        wp: bool = False,
    ) -> int:
        """UFFDIO_COPY ``length`` bytes (default: all of ``src``) to ``dst``.  Pages already
        mapped (EEXIST) count as resolved and are woken.  Returns bytes done; raises
        :class:`UffdWouldBlock` on EAGAIN (events pending)."""
        if length is None:
            length = len(memoryview(src).cast("B")) if not isinstance(src, int) else C.PAGE_SIZE
        _check_range(dst, length, "UFFDIO_COPY")
        addr, _keep = _address_of(src, length, "UFFDIO_COPY")
        mode = (C.COPY_MODE_DONTWAKE if dontwake else 0) | (C.COPY_MODE_WP if wp else 0)
        done = ffi.new("uint64_t *")
        rc = lib.uf_copy_all(self.fileno(), dst, addr, length, mode, done)
        if rc == -errno.EAGAIN and done[0]:
            return int(done[0])
        check(rc, "UFFDIO_COPY", f"dst {dst:#x} len {length:#x}")
        return int(done[0])

    def zeropage_nowait(
        self, start: int, length: int = C.PAGE_SIZE, *, dontwake: bool = False
    ) -> int:
        _check_range(start, length, "UFFDIO_ZEROPAGE")
        done = ffi.new("uint64_t *")
        rc = lib.uf_zeropage_all(
            self.fileno(), start, length, C.ZEROPAGE_MODE_DONTWAKE if dontwake else 0, done
        )
        if rc == -errno.EAGAIN and done[0]:
            return int(done[0])
        check(rc, "UFFDIO_ZEROPAGE", f"{start:#x}+{length:#x}")
        return int(done[0])

    def writeprotect_nowait(
        self, ranges: RangeList, protect: bool = True, *, dontwake: bool = False
    ) -> None:
        """(Un)write-protect many ranges in one call into C."""
        flat = _pairs(ranges, "UFFDIO_WRITEPROTECT")
        mode = (C.WRITEPROTECT_MODE_WP if protect else 0) | (
            C.WRITEPROTECT_MODE_DONTWAKE if dontwake else 0
        )
        done = ffi.new("size_t *")
        rc = lib.uf_writeprotect(self.fileno(), flat, len(ranges), mode, done)
        if rc < 0:
            i = int(done[0])
            check(
                rc,
                "UFFDIO_WRITEPROTECT",
                f"range {i} of {len(ranges)} ({ranges[i][0]:#x}+{ranges[i][1]:#x})",
            )

    def continue_nowait(
        self, start: int, length: int = C.PAGE_SIZE, *, dontwake: bool = False, wp: bool = False
    ) -> int:
        _check_range(start, length, "UFFDIO_CONTINUE")
        out = ffi.new("int64_t *")
        mode = (C.CONTINUE_MODE_DONTWAKE if dontwake else 0) | (C.CONTINUE_MODE_WP if wp else 0)
        rc = lib.uf_continue(self.fileno(), start, length, mode, out)
        if rc == -errno.EAGAIN and out[0] > 0:
            return int(out[0])
        check(rc, "UFFDIO_CONTINUE", f"{start:#x}+{length:#x}")
        return length

    def move_nowait(
        self,
        dst: int,
        src: int,
        length: int = C.PAGE_SIZE,
        *,
        dontwake: bool = False,
        allow_src_holes: bool = False,
    ) -> int:
        """UFFDIO_MOVE (6.8+; only within the uffd's own process)."""
        _check_range(dst, length, "UFFDIO_MOVE")
        _check_range(src, length, "UFFDIO_MOVE")
        if not self.features & Feature.MOVE:
            raise error_for(errno.ENOTTY, "UFFDIO_MOVE", "Feature.MOVE was not negotiated")
        out = ffi.new("int64_t *")
        mode = (C.MOVE_MODE_DONTWAKE if dontwake else 0) | (
            C.MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0
        )
        rc = lib.uf_move(self.fileno(), dst, src, length, mode, out)
        if rc == -errno.EAGAIN and out[0] > 0:
            return int(out[0])
        check(
            rc,
            "UFFDIO_MOVE",
            f"{src:#x} -> {dst:#x} len {length:#x}"
            + (
                " (UFFDIO_MOVE works only on the uffd's own process)" if rc == -errno.EINVAL else ""
            ),
        )
        return length

    def poison_nowait(
        self, start: int, length: int = C.PAGE_SIZE, *, dontwake: bool = False
    ) -> int:
        """UFFDIO_POISON (6.6+): accesses raise SIGBUS in the target."""
        _check_range(start, length, "UFFDIO_POISON")
        if not self.features & Feature.POISON:
            raise error_for(errno.ENOTTY, "UFFDIO_POISON", "Feature.POISON was not negotiated")
        out = ffi.new("int64_t *")
        rc = lib.uf_poison(
            self.fileno(), start, length, C.POISON_MODE_DONTWAKE if dontwake else 0, out
        )
        if rc == -errno.EAGAIN and out[0] > 0:
            return int(out[0])
        check(rc, "UFFDIO_POISON", f"{start:#x}+{length:#x}")
        return length

    def wake(self, start: int, length: int = C.PAGE_SIZE) -> None:
        _check_range(start, length, "UFFDIO_WAKE")
        check(lib.uf_wake(self.fileno(), start, length), "UFFDIO_WAKE", f"{start:#x}+{length:#x}")

    def mm_alive(self) -> bool:
        """Whether the process this uffd serves still has its memory.  False once it
        exited or exec'd (nothing can fault on this uffd any more: close it).  The probe
        never touches the target: a UFFDIO_COPY from an unreadable page, which the kernel
        refuses with ESRCH when the mm is gone, and otherwise before installing anything."""
        rc = lib.uf_mm_alive(self.fileno())
        check(rc, "userfaultfd", "probing its process")
        return rc == 1

    def read_nowait(self, max_msgs: int = 64) -> list[tuple[int, int, int, int]]:
        """read() raw messages as (event, a, b, c) tuples, bypassing the engine (for tools that
        poll the uffd themselves).  Returns [] when none is pending."""
        buf = ffi.new("struct uf_msg[]", max_msgs)
        n = lib.uf_read_msgs(self.fileno(), buf, max_msgs)
        if n == -errno.EAGAIN:
            return []
        check(n, "read(userfaultfd)")
        return [(buf[i].event, buf[i].a, buf[i].b, buf[i].c) for i in range(n)]

    # ---- resolution, async (EAGAIN retried) -------------------------------------------------

    async def _retry(self, fn: Callable[[], int], op: str, limit_s: float = 10.0) -> int:
        from ._errors import UffdWouldBlock

        deadline = time.monotonic() + limit_s
        delay = 0.0
        while True:
            try:
                return fn()
            except UffdWouldBlock:
                self._stats_py["eagain_retries"] += 1
                if time.monotonic() > deadline:
                    raise
                # Events are pending: let the engine read them.  In inline mode the engine
                # runs in this thread, so poll it here (a handler may be awaited by the
                # dispatcher itself); in thread mode its thread is already reading.
                if self._engine is not None and self._serving and not self._thread_mode:
                    lib.uf_engine_poll(self._engine)
                await anyio.sleep(delay)
                delay = min(max(delay * 2, 50e-6), 2e-3)

    async def copy(
        self,
        dst: int,
        src: int | Buffer,
        length: int | None = None,
        *,
        dontwake: bool = False,
        wp: bool = False,
    ) -> int:
        return await self._retry(
            lambda: self.copy_nowait(dst, src, length, dontwake=dontwake, wp=wp), "UFFDIO_COPY"
        )

    async def zeropage(
        self, start: int, length: int = C.PAGE_SIZE, *, dontwake: bool = False
    ) -> int:
        return await self._retry(
            lambda: self.zeropage_nowait(start, length, dontwake=dontwake), "UFFDIO_ZEROPAGE"
        )

    async def writeprotect(
        self, ranges: RangeList, protect: bool = True, *, dontwake: bool = False
    ) -> None:
        def go() -> int:
            self.writeprotect_nowait(ranges, protect, dontwake=dontwake)
            return 0

        await self._retry(go, "UFFDIO_WRITEPROTECT")

    async def continue_(
        self, start: int, length: int = C.PAGE_SIZE, *, dontwake: bool = False, wp: bool = False
    ) -> int:
        return await self._retry(
            lambda: self.continue_nowait(start, length, dontwake=dontwake, wp=wp), "UFFDIO_CONTINUE"
        )

    async def move(
        self,
        dst: int,
        src: int,
        length: int = C.PAGE_SIZE,
        *,
        dontwake: bool = False,
        allow_src_holes: bool = False,
    ) -> int:
        return await self._retry(
            lambda: self.move_nowait(
                dst, src, length, dontwake=dontwake, allow_src_holes=allow_src_holes
            ),
            "UFFDIO_MOVE",
        )

    async def poison(self, start: int, length: int = C.PAGE_SIZE, *, dontwake: bool = False) -> int:
        return await self._retry(
            lambda: self.poison_nowait(start, length, dontwake=dontwake), "UFFDIO_POISON"
        )

    # ---- handlers ---------------------------------------------------------------------------

    def on_fault(self, handler: FaultHandler) -> FaultHandler:
        """Install the coroutine that gets every :class:`FaultBatch` no rule covers.  Usable
        as a decorator.  The dispatcher awaits it before looking at later messages (faults and
        events stay in kernel order); a slow handler should start tasks of its own."""
        self._fault_handler = handler
        return handler

    def on_event(self, kind: Event, handler: EventHandler | None = None) -> Any:
        """Add a coroutine for FORK, REMAP, REMOVE, UNMAP or ERROR events.  Without
        ``handler`` it is a decorator: ``@uffd.on_event(Event.REMOVE)``."""
        if handler is None:

            def deco(h: EventHandler) -> EventHandler:
                self._event_handlers.setdefault(Event(kind), []).append(h)
                return h

            return deco
        self._event_handlers.setdefault(Event(kind), []).append(handler)
        return handler

    async def faults(self) -> AsyncIterator[FaultBatch]:
        """Iterate over fault batches (needs :meth:`serve` running in another task)."""
        send, recv = anyio.create_memory_object_stream[FaultBatch](math.inf)

        async def sink(batch: FaultBatch) -> None:
            send.send_nowait(batch)

        prev = self._fault_handler
        self._fault_handler = sink
        try:
            async with recv:
                async for batch in recv:
                    yield batch
        finally:
            self._fault_handler = prev
            send.close()

    # ---- engine and loop --------------------------------------------------------------------

    def _engine_handle(self) -> CData:
        if self._engine is None:
            err = ffi.new("int *")
            e = lib.uf_engine_new(
                self.fileno(),
                self.ring_entries,
                (0 if self.multishot else C.ENGINE_NO_MULTISHOT) | self.engine_flags,
                err,
            )
            if e == ffi.NULL:
                check(err[0], "io_uring", "setting up the engine's ring")
            self._engine = e
        return self._engine

    def statistics(self) -> dict[str, int]:
        """Counters of the engine (C) and the dispatcher (Python)."""
        out: dict[str, int] = dict(self._stats_py)
        out.update(self._engine_stats() or self._final_engine_stats or {})
        for name in _ENGINE_STATS:
            out.setdefault(name, 0)
        return out

    def _engine_stats(self) -> dict[str, int] | None:
        if self._engine is None:
            return None
        st = ffi.new("struct uf_engine_stats *")
        lib.uf_engine_get_stats(self._engine, st)
        return {name: int(getattr(st, name)) for name in _ENGINE_STATS}

    async def serve(
        self,
        *,
        thread: bool | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read fault messages through the ring and dispatch them until cancelled.

        ``thread``: True runs the engine on a C thread: faults that resolver rules cover are
        served without waking the event loop (about the cost of a bare C handler), faults for
        Python cost one extra wake-up.  False runs the engine inline on the event loop: faults
        for Python are cheapest (about 2x a bare C handler on one CPU), rule faults pay for an
        event-loop iteration.  None (default) picks the thread when the resolver has rules.

        On exit (cancellation or error) the ring's requests are cancelled and every completion
        is waited for before this returns: nothing stays in the kernel's hands.
        """
        if self._serving:
            raise RuntimeError("serve() is already running for this uffd")
        e = self._engine_handle()
        if thread is None:
            thread = lib.uf_rules_count(e) > 0
        check(lib.uf_engine_start(e, int(thread)), "io_uring", "starting the engine")
        self._thread_mode = thread
        self._serving = True
        nfd = lib.uf_engine_notify_fd(e)
        buf = ffi.new("struct uf_msg[]", TAKE_MAX)
        raw = ffi.buffer(buf)
        inline = not thread
        try:
            try:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    task_status.started()
                    while True:
                        await anyio.wait_readable(nfd)
                        try:
                            os.read(nfd, 8)
                        except BlockingIOError:
                            pass
                        if inline:
                            lib.uf_engine_poll(e)
                        while True:
                            n = lib.uf_engine_take(e, buf, TAKE_MAX)
                            if not n:
                                break
                            await self._dispatch(memoryview(raw[: n * 32]).cast("Q"), n, tg)
                            if inline:
                                lib.uf_engine_poll(e)
            except BaseExceptionGroup as eg:
                inner = _sole(eg)
                if inner is eg or isinstance(inner, anyio.get_cancelled_exc_class()):
                    raise
                raise inner from None
        finally:
            self._serving = False
            pending, self._pending = self._pending, None
            if pending is not None:
                # A batch whose handler did not finish: wake its threads.  A woken thread
                # whose page is still missing faults again, and that message waits in the
                # uffd for the next server; a resolved page just continues.
                self._wake_batch(pending)
            # Not awaited, so cancellation cannot interrupt it: cancelling a poll-armed read
            # completes at once and file reads finish quickly, so this blocks the loop only
            # briefly; uf_engine_stop waits for every completion (the GIL is released).
            rc = lib.uf_engine_stop(e)
            if rc < 0:
                raise error_for(-rc, "io_uring", "stopping the engine")

    @contextlib.asynccontextmanager
    async def serving(self, *, thread: bool | None = None) -> AsyncIterator[Userfaultfd]:
        """``async with uffd.serving():`` serves faults for the duration of the block; on exit
        the engine is stopped and nothing is left running.  An error of the serving task
        (e.g. :class:`UnhandledFault`) propagates out of the block."""
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(functools.partial(self.serve, thread=thread))
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as eg:
            inner = _sole(eg)
            if inner is eg or isinstance(inner, anyio.get_cancelled_exc_class()):
                raise
            raise inner from None

    async def _dispatch(self, words: memoryview, n: int, tg: anyio.abc.TaskGroup) -> None:
        # copy out first: the buffer is reused by the next take
        w = words.tolist()
        rawb = words.tobytes()
        batch: FaultBatch | None = None
        done = 0  # records before this index were handed to a handler (or are in `batch`)
        try:
            for i in range(n):
                ev = w[4 * i] & 0xFF
                a, b, c = w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]
                if ev == Event.PAGEFAULT:
                    if batch is None:
                        batch = FaultBatch(self)
                    batch.addresses.append(b)
                    batch.flags.append(a)
                    batch.tids.append(c & 0xFFFFFFFF)
                    done = i + 1
                    continue
                if batch is not None:
                    pending, batch = batch, None
                    done = i
                    await self._deliver_faults(pending)
                done = i + 1
                await self._deliver_event(ev, a, b, c, tg)
            if batch is not None:
                pending, batch = batch, None
                await self._deliver_faults(pending)
        except BaseException:
            # The server is going away mid-take.  A batch whose handler started is woken by
            # serve(); a batch not yet handed over is woken here (its threads fault again);
            # records after that go back to the engine's queue for the next server, so
            # no event and no fault is dropped.
            if batch is not None:
                self._wake_batch(batch)
            if done < n and self._engine is not None:
                keep = list(range(done, n))
                if self.on_fork_child is not None:
                    # children of FORK messages are handed over now: served elsewhere, they
                    # must not wait for a next server of this uffd, which a process that
                    # is gone (a daemon's parent, exiting right after its fork) never gets
                    forks = [i for i in keep if w[4 * i] & 0xFF == Event.FORK]
                    for i in forks:
                        await self._hand_over_fork(w[4 * i + 1], tg)
                    keep = [i for i in keep if i not in forks]
                if keep:
                    rest = ffi.new("struct uf_msg[]", len(keep))
                    ffi.buffer(rest)[:] = b"".join(rawb[32 * i : 32 * i + 32] for i in keep)
                    lib.uf_engine_unshift(self._engine, rest, len(keep))
            raise

    def _wake_batch(self, batch: FaultBatch) -> None:
        """Wake the threads of faults this server will not resolve: a thread whose page is
        still missing faults again, and that message waits in the uffd for the next server."""
        for addr in batch.addresses:
            lib.uf_wake(self._fd, addr & ~(C.PAGE_SIZE - 1), C.PAGE_SIZE)

    async def _deliver_faults(self, batch: FaultBatch) -> None:
        self._stats_py["batches_py"] += 1
        self._stats_py["faults_py"] += len(batch)
        self._pending = batch
        if self._fault_handler is None:
            raise UnhandledFault(
                f"{len(batch)} fault(s) (first at {batch.addresses[0]:#x}) reached Python but no "
                "handler is installed: add a resolver rule or an on_fault handler. The faulting "
                "threads were woken to fault again and wait for the next server (no data is lost)."
            )
        await self._fault_handler(batch)
        self._pending = None

    async def _deliver_event(
        self, ev: int, a: int, b: int, c: int, tg: anyio.abc.TaskGroup
    ) -> None:
        self._stats_py["events_py"] += 1
        event: AnyEvent
        if ev == Event.FORK:
            event = ForkEvent(self, await self._hand_over_fork(a, tg))
        elif ev == Event.REMAP:
            event = RemapEvent(self, a, b, c)
        elif ev == Event.REMOVE:
            event = RemoveEvent(self, a, b)
        elif ev == Event.UNMAP:
            event = UnmapEvent(self, a, b)
        elif ev == Event.ERROR:
            err = -(a - (1 << 64) if a >= 1 << 63 else a)
            what = {
                C.FAIL_READ: "reading the uffd",
                C.FAIL_RESOLVE: "resolving a fault",
                C.FAIL_FILE: "reading the snapshot file",
                C.FAIL_STORE: "reading the swap store",
            }.get(c, "engine")
            exc = error_for(err, f"engine: {what}", f"address {b:#x}")
            event = ErrorEvent(self, exc, b, c)
            if c == C.FAIL_READ:
                self.engine_error = exc
        else:  # pragma: no cover - a kernel newer than this code
            return
        handlers = self._event_handlers.get(event.kind, [])
        for h in handlers:
            await h(event)
        if isinstance(event, ErrorEvent) and not handlers and event.what == C.FAIL_READ:
            raise event.error

    async def _hand_over_fork(self, a: int, tg: anyio.abc.TaskGroup | None) -> Userfaultfd:
        """The child of a FORK message (its uffd in ``a``), served: by whoever set
        on_fork_child, or in this uffd's serving task group ``tg``.  Shielded: a child
        whose uffd was taken from the message but not handed over would never be served
        - its threads would wait for ever."""
        with anyio.CancelScope(shield=True):
            child = self._adopt_fork(a)
            if self.on_fork_child is not None:
                child.fork_parent = self
                await self.on_fork_child(child)
            else:
                assert tg is not None
                self._children.append(child)
                await tg.start(child._serve_child, self)
        return child

    def _adopt_fork(self, a: int) -> Userfaultfd:
        """The child's Userfaultfd of a FORK message (its uffd in ``a``), with this one's
        handlers and flags and the rules (and page table) the engine kept for it."""
        child = Userfaultfd.from_fd(a & 0xFFFFFFFF, int(self.features))
        child.engine_flags = self.engine_flags  # before the engine is made
        child.multishot = self.multishot
        child._fault_handler = self._fault_handler
        child._event_handlers = {k: list(v) for k, v in self._event_handlers.items()}
        ce = child._engine_handle()
        if self._engine is not None:
            check(lib.uf_rules_adopt_fork(ce, self._engine, a & 0xFFFFFFFF), "resolver.copy")
        child.resolver._keep = self.resolver._keep
        child._thread_mode_hint = self._thread_mode
        child.child_check_interval = self.child_check_interval
        return child

    async def hand_over_forks(self) -> int:
        """Once this uffd's process is gone and it will not be served again: the FORK
        messages its engine read that no server delivered (it stopped first) still carry
        children's uffds.  With ``on_fork_child`` set, hand each child over (whoever set it
        serves them); the other messages are dropped (the engine applied the events to
        its rules as it read them; faults of a gone process are moot).  Returns how many
        children were handed over."""
        if self._engine is None or self.on_fork_child is None or self._serving:
            return 0
        buf = ffi.new("struct uf_msg[]", TAKE_MAX)
        raw = ffi.buffer(buf)
        handed = 0
        while True:
            n = lib.uf_engine_take(self._engine, buf, TAKE_MAX)
            if not n:
                return handed
            w = memoryview(raw[: n * 32]).cast("Q").tolist()
            for i in range(n):
                if w[4 * i] & 0xFF == Event.FORK:
                    await self._hand_over_fork(w[4 * i + 1], None)
                    handed += 1

    async def _serve_child(
        self, parent: Userfaultfd, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        """Serve a fork child's uffd (in the parent's serving task group) until that ends,
        or until the child's process is gone and so are the children it forked (they are
        served in this one's task group): then close it, which frees its engine and its
        copy of the rules.  Nothing can fault on the uffd of a gone process."""
        async with anyio.create_task_group() as tg:
            await tg.start(functools.partial(self.serve, thread=self._thread_mode_hint))
            task_status.started()
            while True:
                await anyio.sleep(self.child_check_interval or 3600)
                if not self.child_check_interval or self._children:
                    continue
                if self._engine is not None and lib.uf_engine_nforks(self._engine):
                    continue  # a FORK it read is not delivered yet (a child of its own)
                try:
                    if self.mm_alive():
                        continue
                except UffdError:
                    continue
                tg.cancel_scope.cancel()
                break
        with contextlib.suppress(ValueError):
            parent._children.remove(self)
        self.close()

    @property
    def children(self) -> list[Userfaultfd]:
        """uffds of forked children, served in the parent's task group."""
        return list(self._children)


#: the fields of struct uf_engine_stats (csrc/uffdio.h) that statistics() reports
_ENGINE_STATS = (
    "msgs",
    "faults",
    "resolved",
    "forwarded",
    "events",
    "eexist",
    "eagain",
    "errors",
    "file_reads",
    "batches",
    "rearms",
    "deferred_now",
    "inflight",
    "multishot",
    "thread",
    "retried",
    "held_now",
)

C_OPEN_USER_MODE_ONLY = 1
MADV_DONTFORK = 10
