"""errno -> exception, in one place.

Every C function of the core returns -errno.  :func:`check` turns a negative
return into an exception that names the operation that failed and how to fix
it (the pattern of psutil's ``wrap_exceptions`` and pyca's ``ensure``).
"""

from __future__ import annotations

import errno as _errno
import os


class UffdError(OSError):
    """Base class of uffdio's errors.  ``.op`` names the failed operation, ``.fix`` the remedy."""

    op: str
    fix: str

    def __init__(self, err: int, op: str, detail: str = "", fix: str = "") -> None:
        msg = f"{op}: {_errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
        if detail:
            msg += f" - {detail}"
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(err, msg)
        self.op = op
        self.fix = fix

    def __str__(self) -> str:
        return str(self.strerror)


class UffdPermissionError(UffdError, PermissionError):
    """The caller lacks a privilege the operation needs."""


class UffdUnsupportedError(UffdError):
    """The running kernel lacks a feature or ioctl that was asked for."""


class UffdRangeError(UffdError, ValueError):
    """An address range is unaligned, empty, overlapping, or not registered."""


class UffdBusyError(UffdError):
    """The range is already registered with another userfaultfd."""


class UffdProcessGone(UffdError, ProcessLookupError):
    """The target process exited (ESRCH)."""


class UffdMappingChanged(UffdError):
    """The target's mapping changed under the operation (ENOENT): unmapped or unregistered."""


class UffdWouldBlock(UffdError, BlockingIOError):
    """EAGAIN: events are pending on the uffd; drain them and retry (the async methods do)."""


class UffdClosedError(UffdError):
    """The userfaultfd was closed."""


class RingError(UffdError):
    """io_uring could not be set up."""


class UnhandledFault(RuntimeError):
    """A fault reached Python with no handler; its threads were woken to fault again."""


_PRIV_FIX = (
    "run as root, or set 'sysctl vm.unprivileged_userfaultfd=1', or give the user access "
    "to /dev/userfaultfd (kernel 6.1+), or open with user_mode_only=True"
)

# (op prefix, errno) -> (class, fix); op prefix "" matches every operation.
_TABLE: dict[tuple[str, int], tuple[type[UffdError], str]] = {
    ("userfaultfd", _errno.EPERM): (UffdPermissionError, _PRIV_FIX),
    ("userfaultfd", _errno.EACCES): (UffdPermissionError, _PRIV_FIX),
    ("userfaultfd", _errno.ENOSYS): (
        UffdUnsupportedError,
        "this kernel was built without CONFIG_USERFAULTFD; use a kernel that has it",
    ),
    ("UFFDIO_API", _errno.EINVAL): (
        UffdUnsupportedError,
        "ask only for features the kernel offers (see 'uffdio doctor'); UFFDIO_API may also "
        "be called only once per uffd",
    ),
    ("UFFDIO_API", _errno.EPERM): (
        UffdPermissionError,
        "EVENT_FORK needs CAP_SYS_PTRACE: run as root or drop Feature.EVENT_FORK",
    ),
    ("UFFDIO_REGISTER", _errno.EBUSY): (
        UffdBusyError,
        "the range is already registered with another userfaultfd; unregister it there first",
    ),
    ("UFFDIO_REGISTER", _errno.EINVAL): (
        UffdRangeError,
        "the range must be page aligned, non-empty and lie inside mappings that support the "
        "mode (anonymous, shmem or hugetlbfs; WP and MINOR need their features)",
    ),
    ("UFFDIO_REGISTER", _errno.ENOMEM): (
        UffdRangeError,
        "part of the range is not mapped in the uffd's process",
    ),
    ("UFFDIO_REGISTER", _errno.EPERM): (
        UffdPermissionError,
        "the mapping is not writable by the uffd's owner (or WP on a mapping that forbids it)",
    ),
    ("io_uring", _errno.EPERM): (
        RingError,
        "io_uring is disabled: set 'sysctl kernel.io_uring_disabled=0' (or add the user to "
        "kernel.io_uring_group)",
    ),
    ("io_uring", _errno.ENOSYS): (RingError, "this kernel has no io_uring (5.1+ needed)"),
    ("io_uring", _errno.ENOMEM): (
        RingError,
        "raise RLIMIT_MEMLOCK ('ulimit -l') or use a kernel >= 5.12 that accounts ring memory "
        "to the cgroup",
    ),
    ("pidfd_getfd", _errno.EPERM): (
        UffdPermissionError,
        "taking a file descriptor from another process needs ptrace rights over it "
        "(CAP_SYS_PTRACE or the same user with kernel.yama.ptrace_scope=0)",
    ),
    ("spawn", _errno.ENOENT): (
        UffdError,
        "check the command's name and PATH (or give its full path)",
    ),
    ("", _errno.EBADF): (UffdClosedError, "the file descriptor is closed or not a userfaultfd"),
    ("", _errno.ESRCH): (UffdProcessGone, "the process exited; nothing is left to serve"),
    ("", _errno.ENOENT): (
        UffdMappingChanged,
        "the target unmapped or unregistered the range; drop the work for it",
    ),
    ("", _errno.EAGAIN): (
        UffdWouldBlock,
        "events are pending on the uffd: read them (the engine does) and retry",
    ),
    ("", _errno.EEXIST): (UffdError, "the page is already mapped"),
    ("", _errno.EINVAL): (
        UffdRangeError,
        "check that addresses and lengths are page aligned, non-zero, and inside a range "
        "registered with a mode that allows this ioctl",
    ),
    ("", _errno.EPERM): (UffdPermissionError, "this needs more privileges (try as root)"),
    ("", _errno.ENOTTY): (
        UffdUnsupportedError,
        "this kernel lacks the ioctl; see 'uffdio doctor' for what it offers",
    ),
}


def error_for(err: int, op: str, detail: str = "") -> UffdError:
    """The exception for ``err`` (a positive errno) raised by ``op``."""
    for key in ((op, err), (op.split(" ")[0], err), ("", err)):
        if key in _TABLE:
            cls, fix = _TABLE[key]
            return cls(err, op, detail, fix)
    return UffdError(err, op, detail)


def check(rc: int, op: str, detail: str = "") -> int:
    """Return ``rc`` if it is >= 0; otherwise raise the exception for ``-rc``."""
    if rc < 0:
        raise error_for(-rc, op, detail)
    return rc
