"""``uffdio doctor``: what this machine offers uffdio, what is missing, and how to fix it.

Every probe is real and cheap: throw-away userfaultfds, a registration of a small anonymous
region of this process (never touched while registered), an io_uring ring that is created and
freed, PAGEMAP_SCAN / process_madvise / pidfd_getfd on this process, and reads of /proc and
/sys.  Each probe is wrapped: on a machine that lacks something the report says what failed
and why (uffdio's exceptions name the cause and the fix), it never ends in a traceback.

Exit status: 0 when uffdio can serve faults here (a userfaultfd can be created, in full or in
user-mode-only form, and an io_uring ring can be set up), 1 otherwise; the reason is the last
line of the report (``"reason"`` in ``--json``).
"""

from __future__ import annotations

import argparse
import errno
import glob
import grp
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from . import _constants as C
from ._constants import Feature, Ioctl, Mode
from ._errors import UffdError, UffdPermissionError, error_for
from ._lib import ffi, lib
from ._process import pagemap_scan, pidfd_getfd, pidfd_open, process_madvise, read_memory
from ._uffd import Userfaultfd

Status = Literal["ok", "warn", "missing"]

# uf_open() flags (csrc/uffdio.h)
_OPEN_USER_MODE_ONLY = 1
_OPEN_SYSCALL_ONLY = 2
_OPEN_DEVNODE_ONLY = 4

_CAP_SYS_PTRACE = 19
_CAP_SYS_NICE = 23
_MADV_COLD = 20
_SCRATCH_PAGES = 4

_PRIV_FIX = (
    "run as root, or 'sysctl vm.unprivileged_userfaultfd=1', or give the user read/write access "
    "to /dev/userfaultfd (kernel 6.1+), or grant CAP_SYS_PTRACE"
)

# name -> (first kernel, meaning when available, meaning when missing)
_FEATURES: dict[str, tuple[tuple[int, int], str, str]] = {
    "PAGEFAULT_FLAG_WP": (
        (5, 7),
        "write-protect mode on anonymous memory: uffdio can learn which pages were written "
        "(dirty tracking for eviction and snapshots)",
        "no write-protect mode: writes cannot be tracked, so every evicted page must be saved "
        "again",
    ),
    "EVENT_FORK": (
        (4, 11),
        "forked children of managed processes are managed too (their uffd arrives in a ForkEvent)",
        "a fork would leave the child reading zeros for evicted pages of managed ranges; mark "
        "managed ranges MADV_DONTFORK or keep managed processes from forking",
    ),
    "EVENT_REMAP": (
        (4, 11),
        "mremap of managed memory is followed (rules move with it)",
        "mremap (glibc realloc of big blocks uses it) drops the registration at the new "
        "address: evicted pages there would read as zeros",
    ),
    "EVENT_REMOVE": (
        (4, 11),
        "madvise(DONTNEED/FREE/REMOVE) by the application is seen, so discarded data is "
        "never brought back",
        "discarded memory is not reported: the next fault could resurrect old data",
    ),
    "MISSING_HUGETLBFS": (
        (4, 11),
        "MISSING faults on hugetlbfs mappings can be served",
        "hugetlbfs mappings cannot be managed",
    ),
    "MISSING_SHMEM": (
        (4, 11),
        "MISSING faults on shmem / memfd / tmpfs mappings can be served",
        "shared memory (shmem, memfd, tmpfs) cannot be managed",
    ),
    "EVENT_UNMAP": (
        (4, 11),
        "munmap of managed memory is seen (rules and saved copies are dropped)",
        "munmap is not reported: rules and saved copies of unmapped memory linger",
    ),
    "SIGBUS": (
        (4, 14),
        "a uffd can make faults raise SIGBUS instead of waiting for a handler (not used by "
        "default)",
        "faults always wait for a handler",
    ),
    "THREAD_ID": (
        (4, 14),
        "fault messages carry the faulting thread's id (Fault.tid)",
        "Fault.tid reads 0",
    ),
    "MINOR_HUGETLBFS": (
        (5, 13),
        "MINOR faults on hugetlbfs: pages already in the page cache are mapped with "
        "UFFDIO_CONTINUE",
        "no MINOR faults on hugetlbfs",
    ),
    "MINOR_SHMEM": (
        (5, 14),
        "MINOR faults on shmem / memfd: pages already in the page cache are mapped with "
        "UFFDIO_CONTINUE",
        "no MINOR faults on shmem",
    ),
    "EXACT_ADDRESS": (
        (5, 18),
        "fault messages can carry the exact faulting address (not only the page)",
        "fault addresses are rounded down to the page",
    ),
    "WP_HUGETLBFS_SHMEM": (
        (5, 19),
        "write-protect mode also works on hugetlbfs and shmem",
        "write-protect mode only on anonymous memory",
    ),
    "WP_UNPOPULATED": (
        (6, 4),
        "write-protecting a range also covers pages never touched (no pre-faulting needed)",
        "only populated pages can be write-protected: untouched pages escape write tracking",
    ),
    "POISON": (
        (6, 6),
        "UFFDIO_POISON: a lost page can be marked so that accesses raise SIGBUS instead of "
        "reading zeros",
        "a page whose data is lost cannot be poisoned; the only options are zeros or waiting",
    ),
    "WP_ASYNC": (
        (6, 7),
        "asynchronous write-protect: the kernel unprotects written pages itself and "
        "PAGEMAP_SCAN lists them - dirty tracking of other processes without a fault per write",
        "dirty tracking needs one synchronous WP fault per first write of a page",
    ),
    "MOVE": (
        (6, 8),
        "UFFDIO_MOVE: pages can be moved instead of copied (only within the uffd's own process)",
        "pages are always copied (UFFDIO_COPY)",
    ),
}

# ioctls of a registered range: name -> (first kernel, meaning)
_IOCTLS: dict[str, tuple[tuple[int, int], str]] = {
    "WAKE": ((4, 3), "wakes threads waiting on a range (after batches done with DONTWAKE)"),
    "COPY": ((4, 3), "UFFDIO_COPY installs a page of data: how every evicted page comes back"),
    "ZEROPAGE": ((4, 3), "maps zero pages: faults on never-saved or discarded memory"),
    "WRITEPROTECT": ((5, 7), "(un)protects pages against writes: dirty tracking"),
    "MOVE": ((6, 8), "moves pages instead of copying them (the uffd's own process only)"),
    "POISON": ((6, 6), "marks lost pages: accesses raise SIGBUS instead of reading zeros"),
}

# (first kernel, what it brings, status when the kernel is older)
_KERNEL_STEPS: list[tuple[tuple[int, int], str, Status]] = [
    (
        (5, 11),
        "the baseline: userfaultfd with UFFD_USER_MODE_ONLY, pidfd_getfd, "
        "process_madvise, io_uring reads of the uffd",
        "missing",
    ),
    ((6, 1), "/dev/userfaultfd: full uffds for users given access to the device", "warn"),
    ((6, 6), "UFFDIO_POISON; the kernel.io_uring_disabled sysctl", "warn"),
    (
        (6, 7),
        "IORING_OP_READ_MULTISHOT (up to 64 fault messages per completion, no re-arming), "
        "PAGEMAP_SCAN, WP_ASYNC",
        "warn",
    ),
    ((6, 8), "UFFDIO_MOVE", "warn"),
]


# ---------------------------------------------------------------------------------------------
# report structure


@dataclass
class Item:
    """One line of the report."""

    name: str
    status: Status
    value: str
    meaning: str = ""
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        d = {"name": self.name, "status": self.status, "value": self.value, "meaning": self.meaning}
        if self.fix:
            d["fix"] = self.fix
        return d


@dataclass
class Section:
    key: str
    title: str
    items: list[Item] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, status: Status, value: str, meaning: str = "", fix: str = "") -> Item:
        item = Item(name, status, value, meaning, fix)
        self.items.append(item)
        return item

    @contextmanager
    def probe(self, name: str) -> Iterator[None]:
        """Run a probe; an unexpected exception becomes a report line, never a traceback."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - the doctor must survive any machine
            what, fix = _why(exc)
            self.add(name, "warn", "probe failed", what, fix)
            self.data.setdefault("errors", {})[name] = what

    def to_json(self) -> dict[str, Any]:
        return {**self.data, "checks": [i.to_json() for i in self.items]}


@dataclass
class Facts:
    """What later probes need from earlier ones."""

    release: str = ""
    machine: str = ""
    version: tuple[int, int, int] | None = None
    uid: int = 0
    euid: int = 0
    cap_eff: int | None = None
    uffd_mode: str = "unavailable"  # "full" | "user_mode_only" | "unavailable"
    uffd_problem: str = ""
    uffd_fix: str = ""
    features: int | None = None
    ring_ok: bool = False
    ring_problem: str = ""
    ring_fix: str = ""

    @property
    def umo(self) -> bool:
        return self.uffd_mode == "user_mode_only"

    def has_cap(self, bit: int) -> bool | None:
        return None if self.cap_eff is None else bool(self.cap_eff >> bit & 1)

    def at_least(self, v: tuple[int, int]) -> bool | None:
        return None if self.version is None else self.version[:2] >= v


# ---------------------------------------------------------------------------------------------
# helpers


def _why(exc: BaseException) -> tuple[str, str]:
    """(what failed, fix) of an exception."""
    if isinstance(exc, UffdError):
        msg, fix = str(exc), exc.fix
        tail = f". Fix: {fix}"
        if fix and msg.endswith(tail):
            msg = msg[: -len(tail)]
        return msg, fix
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{name}: {exc.strerror}{where}", ""
    return f"{type(exc).__name__}: {exc}", ""


def _errname(rc: int) -> str:
    """'EPERM (Operation not permitted)' for a -errno return."""
    e = -rc
    return f"{errno.errorcode.get(e, str(e))} ({os.strerror(e)})"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _sysctl(name: str) -> int | None:
    text = _read("/proc/sys/" + name.replace(".", "/"))
    try:
        return None if text is None else int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _vstr(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def _size(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024:
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"


def _open_rc(flags: int) -> tuple[int, bool]:
    """Try uf_open(flags): (fd >= 0 or -errno, via /dev/userfaultfd); the fd is closed."""
    via = ffi.new("int *")
    fd = lib.uf_open(flags, via)
    if fd >= 0:
        os.close(fd)
    return fd, bool(via[0])


@contextmanager
def _scratch(npages: int) -> Iterator[int]:
    """A private anonymous region of this process (MADV_NOHUGEPAGE), unmapped on exit."""
    length = npages * C.PAGE_SIZE
    addr = lib.uf_mmap_anon(length)
    if not addr:
        raise OSError(errno.ENOMEM, "mmap of a scratch region failed")
    try:
        yield addr
    finally:
        lib.uf_munmap(addr, length)


# ---------------------------------------------------------------------------------------------
# sections


def _kernel(f: Facts) -> Section:
    s = Section("kernel", "Kernel")
    u = os.uname()
    f.release, f.machine = u.release, u.machine
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", u.release)
    if m:
        f.version = (int(m[1]), int(m[2]), int(m[3] or 0))
    vtxt = ".".join(map(str, f.version)) if f.version else None
    s.data.update(release=u.release, machine=u.machine, version=vtxt)
    if f.machine == "x86_64":
        s.add("release", "ok", f"{u.release} ({u.machine})", f"Linux {vtxt or '?'}")
    else:
        s.add(
            "release",
            "warn",
            f"{u.release} ({u.machine})",
            "uffdio is built and tested on x86_64 only; the constants it defines for old "
            "headers are x86_64 values",
            "use an x86_64 machine",
        )
    steps = []
    for v, what, below in _KERNEL_STEPS:
        ok = f.at_least(v)
        steps.append({"min": _vstr(v), "brings": what, "met": ok})
        if ok is None:
            s.add(f"Linux {_vstr(v)}+", "warn", "unknown", f"could not parse the release; {what}")
        elif ok:
            s.add(f"Linux {_vstr(v)}+", "ok", "yes", what)
        else:
            s.add(f"Linux {_vstr(v)}+", below, f"no ({vtxt})", what, f"use a kernel >= {_vstr(v)}")
    s.data["minimums"] = steps
    return s


def _privileges(f: Facts) -> Section:
    s = Section("privileges", "Privileges")
    f.uid, f.euid = os.getuid(), os.geteuid()
    try:
        user = pwd.getpwuid(f.euid).pw_name
    except KeyError:
        user = str(f.euid)
    s.data.update(uid=f.uid, euid=f.euid, user=user, root=f.euid == 0)
    if f.euid == 0:
        s.add("user", "ok", "root (euid 0)", "every operation uffdio uses is permitted")
    else:
        s.add(
            "user",
            "warn",
            f"{user} (uid {f.uid}, euid {f.euid}), not root",
            "some operations need privileges (below)",
            "run as root for full use",
        )

    with s.probe("CapEff"):
        status = _read("/proc/self/status") or ""
        m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", status, re.M)
        if m:
            f.cap_eff = int(m[1], 16)
        s.data["cap_eff"] = None if f.cap_eff is None else f"{f.cap_eff:#x}"
    ptrace = f.has_cap(_CAP_SYS_PTRACE)
    nice = f.has_cap(_CAP_SYS_NICE)
    s.data.update(cap_sys_ptrace=ptrace, cap_sys_nice=nice)
    if ptrace:
        s.add(
            "CAP_SYS_PTRACE",
            "ok",
            "held",
            "EVENT_FORK can be enabled; full uffds without vm.unprivileged_userfaultfd; "
            "pidfd_getfd and ptrace attach work on other users' processes",
        )
    else:
        s.add(
            "CAP_SYS_PTRACE",
            "warn",
            "not held" if ptrace is False else "unknown",
            "EVENT_FORK cannot be enabled (forks of managed processes are not followed); "
            "pidfd_getfd (Userfaultfd.from_pid) and attaching work only on this user's own "
            "dumpable processes, as Yama permits",
            "run as root or grant the capability (setcap cap_sys_ptrace+ep, or systemd "
            "AmbientCapabilities=CAP_SYS_PTRACE)",
        )
    if nice:
        s.add(
            "CAP_SYS_NICE",
            "ok",
            "held",
            "process_madvise(COLD/PAGEOUT/WILLNEED/COLLAPSE) on other processes is allowed",
        )
    else:
        s.add(
            "CAP_SYS_NICE",
            "warn",
            "not held" if nice is False else "unknown",
            "process_madvise on other processes fails with EPERM (on this process it works)",
            "run as root or grant CAP_SYS_NICE",
        )

    scope = _sysctl("kernel.yama.ptrace_scope")
    s.data["ptrace_scope"] = scope
    meanings: dict[int, tuple[Status, str]] = {
        0: (
            "ok",
            "classic ptrace rules: a process of the same user (or CAP_SYS_PTRACE) may "
            "attach and pidfd_getfd",
        ),
        1: (
            "warn" if not ptrace else "ok",
            "restricted: without CAP_SYS_PTRACE only descendants (or processes that named "
            "this one with PR_SET_PTRACER) can be attached or have fds taken",
        ),
        2: (
            "warn" if not ptrace else "ok",
            "admin-only: attach and pidfd_getfd need CAP_SYS_PTRACE",
        ),
        3: (
            "missing",
            "no attach at all: ptrace injection and pidfd_getfd of other processes "
            "are impossible; targets must hand over their uffd over a socket",
        ),
    }
    if scope is None:
        s.add(
            "kernel.yama.ptrace_scope",
            "ok",
            "not present",
            "Yama is not active: classic ptrace rules (same user and dumpable, or CAP_SYS_PTRACE)",
        )
    else:
        st, meaning = meanings.get(scope, ("warn", f"unknown value {scope}"))
        s.add(
            "kernel.yama.ptrace_scope",
            st,
            str(scope),
            meaning,
            ""
            if st == "ok"
            else "start targets as children of the manager, run as root, "
            "or 'sysctl kernel.yama.ptrace_scope=0'",
        )
    return s


def _userfaultfd(f: Facts) -> Section:
    s = Section("userfaultfd", "userfaultfd")
    sys_full, _ = _open_rc(_OPEN_SYSCALL_ONLY)
    sys_umo, _ = _open_rc(_OPEN_SYSCALL_ONLY | _OPEN_USER_MODE_ONLY)
    dev = "/dev/userfaultfd"
    dev_info: dict[str, Any] = {"path": dev, "exists": False, "usable": False}
    dev_full = -errno.ENOENT
    try:
        st = os.stat(dev)
    except OSError as exc:
        dev_info["error"] = _why(exc)[0]
        st = None
    if st is not None:
        dev_full, _ = _open_rc(_OPEN_DEVNODE_ONLY)
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        dev_info.update(
            exists=True,
            mode=f"{stat.S_IMODE(st.st_mode):04o}",
            owner=f"{owner}:{group}",
            usable=dev_full >= 0,
            error=None if dev_full >= 0 else _errname(dev_full),
        )
    full = sys_full >= 0 or dev_full >= 0
    umo = sys_umo >= 0
    f.uffd_mode = "full" if full else "user_mode_only" if umo else "unavailable"
    s.data.update(
        mode=f.uffd_mode,
        user_mode_only=f.uffd_mode == "user_mode_only",
        syscall=sys_full >= 0,
        syscall_error=None if sys_full >= 0 else _errname(sys_full),
        user_mode_only_works=umo,
        user_mode_only_error=None if umo else _errname(sys_umo),
        devnode=dev_info,
    )

    # the syscall
    if sys_full >= 0:
        s.add(
            "userfaultfd()",
            "ok",
            f"works for uid {f.euid}",
            "full uffds: faults raised by kernel-mode accesses (read() into a managed range, "
            "process_vm_readv) are served too",
        )
    elif sys_full in (-errno.EPERM, -errno.EACCES):
        s.add(
            "userfaultfd()",
            "warn" if (umo or full) else "missing",
            _errname(sys_full),
            "the kernel refuses full uffds to this user (vm.unprivileged_userfaultfd=0 and "
            "no CAP_SYS_PTRACE)",
            "" if full else _PRIV_FIX,
        )
    elif sys_full == -errno.ENOSYS:
        s.add(
            "userfaultfd()",
            "missing",
            _errname(sys_full),
            "the kernel has no userfaultfd (CONFIG_USERFAULTFD off, or a seccomp filter "
            "blocks the syscall)",
            "use a kernel built with CONFIG_USERFAULTFD=y; in a "
            "container, allow the userfaultfd syscall in the seccomp profile",
        )
    else:
        what, fix = _why(error_for(-sys_full, "userfaultfd"))
        s.add("userfaultfd()", "missing", _errname(sys_full), what, fix)

    # the device node
    if not dev_info["exists"]:
        s.add(
            dev,
            "ok" if full else "warn",
            "absent",
            "not needed: the syscall gives full uffds"
            if full
            else "kernel < 6.1 or no device node: no way to full uffds without privileges",
            "" if full else "use kernel >= 6.1 and give the user access to /dev/userfaultfd",
        )
    elif dev_full >= 0:
        s.add(
            dev,
            "ok",
            f"usable ({dev_info['mode']} {dev_info['owner']})",
            "full uffds for this user through the device node (USERFAULTFD_IOC_NEW)",
        )
    else:
        s.add(
            dev,
            "ok" if full else "warn",
            f"not accessible ({dev_info['mode']} {dev_info['owner']}: {_errname(dev_full)})",
            "not needed: the syscall gives full uffds"
            if full
            else "this user cannot open it, so it gives no full uffds",
            ""
            if full
            else "give the user read/write access: e.g. a group with 'chgrp "
            "GROUP /dev/userfaultfd; chmod 0660 /dev/userfaultfd' (a udev rule keeps it), or "
            "'setfacl -m u:USER:rw /dev/userfaultfd'",
        )

    # the sysctl
    unpriv = _sysctl("vm.unprivileged_userfaultfd")
    s.data["unprivileged_userfaultfd"] = unpriv
    if unpriv is None:
        s.add(
            "vm.unprivileged_userfaultfd",
            "ok",
            "not present",
            "kernel < 5.2: every user may create uffds",
        )
    elif unpriv == 1:
        s.add("vm.unprivileged_userfaultfd", "ok", "1", "every user may create full uffds")
    else:
        s.add(
            "vm.unprivileged_userfaultfd",
            "ok" if full else "warn",
            str(unpriv),
            "users without CAP_SYS_PTRACE get only UFFD_USER_MODE_ONLY uffds"
            + ("; this user is privileged, so it does not matter here" if full else ""),
            ""
            if full
            else "'sysctl vm.unprivileged_userfaultfd=1' (or access to "
            "/dev/userfaultfd, or CAP_SYS_PTRACE)",
        )

    # UFFD_USER_MODE_ONLY
    if umo:
        s.add(
            "UFFD_USER_MODE_ONLY",
            "ok",
            "works",
            "uffds that handle only faults raised by user-space accesses (5.11+)",
        )
    else:
        s.add(
            "UFFD_USER_MODE_ONLY",
            "missing" if not full else "warn",
            _errname(sys_umo),
            "kernel < 5.11 or userfaultfd unavailable"
            if sys_umo == -errno.EINVAL
            else "the user-mode-only fallback is unavailable",
            "use a kernel >= 5.11" if sys_umo == -errno.EINVAL else "",
        )

    # what it adds up to
    if full:
        s.add(
            "mode",
            "ok",
            "full",
            "uffdio can serve every fault, including those raised by kernel-mode accesses",
        )
    elif umo:
        f.uffd_problem = (
            "only UFFD_USER_MODE_ONLY uffds: kernel-mode accesses to missing pages fail with EFAULT"
        )
        f.uffd_fix = _PRIV_FIX
        s.add(
            "mode",
            "warn",
            "user-mode only",
            "faults raised by the target's own code are served, but kernel-mode accesses to "
            "missing pages fail with EFAULT instead of faulting: process_vm_readv of a "
            "missing page, and read()/write()/recv() system calls of the target into a "
            "managed range",
            _PRIV_FIX,
        )
    else:
        what, fix = _why(error_for(-sys_full if sys_full < 0 else errno.EPERM, "userfaultfd"))
        f.uffd_problem = f"no userfaultfd for this user: {what}"
        f.uffd_fix = fix
        s.add("mode", "missing", "unavailable", "uffdio cannot serve faults here: " + what, fix)
    return s


def _features(f: Facts) -> Section:
    s = Section("features", "UFFD_FEATURE bits (UFFDIO_API on a throw-away uffd)")
    if f.uffd_mode == "unavailable":
        s.add("UFFDIO_API", "missing", "not probed", "no userfaultfd for this user", f.uffd_fix)
        s.data.update(mask=None, available=[], unavailable=[m.name for m in Feature])
        return s
    with s.probe("UFFDIO_API"):
        avail, _ = Userfaultfd.probe(user_mode_only=f.umo)
        f.features = int(avail)
        names: list[str] = []
        missing: list[str] = []
        since: dict[str, str] = {}
        for feat in Feature:
            name = feat.name or str(int(feat))
            minv, yes, no = _FEATURES.get(name, ((0, 0), "", ""))
            since[name] = _vstr(minv)
            if avail & feat:
                names.append(name)
                s.add(name, "ok", "available", yes)
            else:
                missing.append(name)
                s.add(
                    name,
                    "missing",
                    "not offered",
                    no,
                    f"needs Linux {_vstr(minv)}+"
                    if f.at_least(minv) is False
                    else f"Linux {_vstr(minv)}+ offers it when built with the option for it "
                    "(and the architecture supports it)",
                )
        known = 0
        for feat in Feature:
            known |= int(feat)
        unknown = int(avail) & ~known
        if unknown:
            s.add(
                "unknown bits",
                "ok",
                f"{unknown:#x}",
                "offered by the kernel but unknown to this version of uffdio",
            )
        s.data.update(
            mask=int(avail),
            hex=f"{int(avail):#x}",
            available=names,
            unavailable=missing,
            unknown=unknown,
            since=since,
        )

        if avail & Feature.EVENT_FORK:
            item = next(i for i in s.items if i.name == "EVENT_FORK")
            try:
                Userfaultfd.open(Feature.EVENT_FORK, user_mode_only=f.umo).close()
                s.data["event_fork_enabled"] = True
            except UffdPermissionError as exc:
                s.data["event_fork_enabled"] = False
                item.status = "warn"
                item.value = "offered, but this user cannot enable it (EPERM)"
                item.meaning = "it needs CAP_SYS_PTRACE: " + _FEATURES["EVENT_FORK"][2]
                item.fix = exc.fix
    return s


def _ioctls(f: Facts) -> Section:
    s = Section("ioctls", "ioctls of a registered range")
    s.data.update(api=[], available=[], mode=None, shmem_minor=[])
    if f.uffd_mode == "unavailable":
        s.add(
            "UFFDIO_REGISTER", "missing", "not probed", "no userfaultfd for this user", f.uffd_fix
        )
        return s
    feats = f.features or 0
    wp = bool(feats & Feature.PAGEFAULT_FLAG_WP)
    mode = Mode.MISSING | Mode.WP if wp else Mode.MISSING
    mode_name = "MISSING|WP" if wp else "MISSING"
    s.data["mode"] = mode_name
    with s.probe(f"anonymous {mode_name}"):
        got: Ioctl | None = None
        length = _SCRATCH_PAGES * C.PAGE_SIZE
        with (
            Userfaultfd.open(Feature.PAGEFAULT_FLAG_WP if wp else 0, user_mode_only=f.umo) as u,
            _scratch(_SCRATCH_PAGES) as addr,
        ):
            s.data["api"] = [i.name for i in Ioctl if u.ioctls & i]
            got = u.register(addr, length, mode)
            u.unregister(addr, length)
        s.data["mask"] = int(got)
        s.data["available"] = [i.name for i in Ioctl if got & i]
        for name, (minv, meaning) in _IOCTLS.items():
            if got & Ioctl[name]:
                s.add(name, "ok", "available", meaning)
            elif name == "WRITEPROTECT" and not wp:
                s.add(
                    name,
                    "missing",
                    "not offered",
                    meaning + " - needs PAGEFAULT_FLAG_WP",
                    "needs Linux 5.7+",
                )
            else:
                s.add(name, "missing", "not offered", meaning, f"needs Linux {_vstr(minv)}+")

    with s.probe("CONTINUE"):
        length = _SCRATCH_PAGES * C.PAGE_SIZE
        if not feats & Feature.MINOR_SHMEM:
            s.add(
                "CONTINUE",
                "missing",
                "not offered",
                "MINOR faults on shmem are not offered (MINOR_SHMEM)",
                "needs Linux 5.14+",
            )
            return s
        alias = ffi.new("uint64_t *")
        addr = lib.uf_mmap_shared_pair(length, alias)
        if not addr:
            raise OSError(errno.ENOMEM, "memfd mapping for the MINOR probe failed")
        try:
            with Userfaultfd.open(Feature.MINOR_SHMEM, user_mode_only=f.umo) as u:
                got = u.register(addr, length, Mode.MINOR)
                u.unregister(addr, length)
        finally:
            lib.uf_munmap(addr, length)
            lib.uf_munmap(alias[0], length)
        s.data["shmem_minor"] = [i.name for i in Ioctl if got & i]
        if got & Ioctl.CONTINUE:
            s.add(
                "CONTINUE",
                "ok",
                "available (shmem, MINOR)",
                "maps pages already in the page cache: MINOR faults on shmem / memfd",
            )
        else:
            s.add(
                "CONTINUE",
                "missing",
                "not offered (shmem, MINOR)",
                "MINOR faults cannot be resolved",
                "needs Linux 5.13+",
            )
    return s


def _liburing() -> dict[str, Any]:
    info: dict[str, Any] = {"path": None, "version": None, "pkg_config": None}
    maps = _read("/proc/self/maps") or ""
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and "liburing" in parts[5]:
            path = parts[5].strip()
            info["path"] = path
            m = re.search(r"liburing\.so\.([\d.]+)$", os.path.realpath(path))
            if m:
                info["version"] = m[1]
            break
    pc = shutil.which("pkg-config")
    if pc:
        try:
            r = subprocess.run(
                [pc, "--modversion", "liburing"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            if r.returncode == 0 and r.stdout.strip():
                info["pkg_config"] = r.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _io_uring(f: Facts) -> Section:
    s = Section("io_uring", "io_uring")
    disabled = _sysctl("kernel.io_uring_disabled")
    group = _sysctl("kernel.io_uring_group")
    s.data.update(io_uring_disabled=disabled, io_uring_group=group)
    if disabled is None:
        s.add(
            "kernel.io_uring_disabled",
            "ok",
            "not present",
            "kernel < 6.6 or no such sysctl: io_uring is not switched off by a sysctl",
        )
    elif disabled == 0:
        s.add("kernel.io_uring_disabled", "ok", "0", "io_uring is enabled for every user")
    elif disabled == 1:
        s.add(
            "kernel.io_uring_disabled",
            "warn",
            "1",
            f"only members of kernel.io_uring_group ({group}) and CAP_SYS_ADMIN may create rings",
            "'sysctl kernel.io_uring_disabled=0', or add the user to the group "
            "'sysctl kernel.io_uring_group=GID'",
        )
    else:
        s.add(
            "kernel.io_uring_disabled",
            "missing",
            str(disabled),
            "io_uring is disabled for everyone",
            "'sysctl kernel.io_uring_disabled=0'",
        )

    s.data.update(ring=False, ring_error=None, buffer_ring=None)
    with s.probe("ring"):
        u: Userfaultfd | None = None
        try:
            if f.uffd_mode != "unavailable":
                u = Userfaultfd.open(user_mode_only=f.umo)
            err = ffi.new("int *")
            e = lib.uf_engine_new(u.fileno() if u is not None else -1, 8, 0, err)
            if e == ffi.NULL:
                exc = error_for(-err[0] if err[0] < 0 else errno.EIO, "io_uring", "creating a ring")
                what, fix = _why(exc)
                f.ring_problem, f.ring_fix = f"no io_uring ring: {what}", fix
                s.data["ring_error"] = what
                s.add(
                    "ring",
                    "missing",
                    _errname(err[0] if err[0] < 0 else -errno.EIO),
                    "uffdio cannot read faults: " + what,
                    fix,
                )
            else:
                try:
                    st = ffi.new("struct uf_engine_stats *")
                    lib.uf_engine_get_stats(e, st)
                    bufring = bool(st.multishot)
                finally:
                    lib.uf_engine_free(e)
                f.ring_ok = True
                s.data.update(ring=True, buffer_ring=bufring)
                s.add(
                    "ring",
                    "ok",
                    "created" + ("" if u else " (without a uffd)"),
                    "the engine's ring (8 entries) was set up and freed"
                    + (" on a throw-away uffd" if u else ""),
                )
                s.add(
                    "provided buffers",
                    "ok" if bufring else "warn",
                    "registered" if bufring else "not available",
                    "a provided-buffer ring for multishot reads was registered (5.19+)"
                    if bufring
                    else "no provided-buffer ring (kernel < 5.19): the engine re-arms single READs",
                    "" if bufring else "use a kernel >= 6.7",
                )
        finally:
            if u is not None:
                u.close()

    with s.probe("liburing"):
        info = _liburing()
        s.data["liburing"] = info
        if info["version"] or info["path"]:
            value = info["version"] or info["path"]
            extra = f"; pkg-config says {info['pkg_config']}" if info["pkg_config"] else ""
            s.add(
                "liburing",
                "ok",
                str(value),
                f"the library the extension uses, mapped from {info['path']}{extra}",
            )
        elif info["pkg_config"]:
            s.add(
                "liburing",
                "ok",
                info["pkg_config"],
                "not mapped as a shared object (linked statically?); pkg-config version",
            )
        else:
            s.add(
                "liburing",
                "warn",
                "unknown",
                "no liburing shared object is mapped and pkg-config does not know it "
                "(linked statically?)",
            )

    ms = f.at_least((6, 7))
    s.data["read_multishot_expected"] = ms
    if ms:
        s.add(
            "IORING_OP_READ_MULTISHOT",
            "ok",
            "expected (kernel >= 6.7)",
            "one request keeps delivering fault messages, up to 64 per completion",
        )
    else:
        s.add(
            "IORING_OP_READ_MULTISHOT",
            "warn",
            "not expected (kernel < 6.7)" if ms is False else "unknown",
            "the engine falls back to re-armed single READs (one more submission per batch)",
            "use a kernel >= 6.7",
        )
    return s


def _syscalls(f: Facts) -> Section:
    s = Section("syscalls", "Other processes (tried on this process)")
    s.data.update(
        pidfd_open=False,
        pidfd_getfd=False,
        process_madvise=False,
        process_vm_readv=False,
        pagemap_scan=False,
    )
    length = _SCRATCH_PAGES * C.PAGE_SIZE

    def failed(name: str, exc: OSError, since: str, meaning: str) -> None:
        what, fix = _why(exc)
        old = exc.errno in (errno.ENOSYS, errno.ENOTTY)
        s.add(
            name,
            "missing" if old else "warn",
            what,
            (f"kernel < {since}: " if old else "") + meaning,
            f"use a kernel >= {since}" if old else fix,
        )

    with s.probe("scratch region"), _scratch(_SCRATCH_PAGES) as addr:
        lib.uf_fill(addr, C.PAGE_SIZE, 1)  # the first page present, the rest not
        pidfd = -1
        try:
            pidfd = pidfd_open(os.getpid())
            s.data["pidfd_open"] = True
            s.add(
                "pidfd_open",
                "ok",
                "works",
                "processes are addressed by pidfds (no pid reuse races)",
            )
        except OSError as exc:
            failed("pidfd_open", exc, "5.3", "pidfd_getfd and process_madvise need pidfds")

        if pidfd >= 0:
            try:
                os.close(pidfd_getfd(pidfd, pidfd))
                s.data["pidfd_getfd"] = True
                s.add(
                    "pidfd_getfd",
                    "ok",
                    "works",
                    "a manager can take a target's uffd (Userfaultfd.from_pid), given "
                    "ptrace rights over it (see privileges)",
                )
            except OSError as exc:
                failed(
                    "pidfd_getfd",
                    exc,
                    "5.6",
                    "targets must send their uffd over a UNIX socket instead",
                )
            try:
                process_madvise(pidfd, [(addr, length)], _MADV_COLD)
                s.data["process_madvise"] = True
                s.add(
                    "process_madvise",
                    "ok",
                    "works",
                    "batched madvise; on other processes only COLD, PAGEOUT, WILLNEED and "
                    "COLLAPSE (with CAP_SYS_NICE): zaps must run inside the target",
                )
            except OSError as exc:
                failed(
                    "process_madvise",
                    exc,
                    "5.10",
                    "hints to other processes' memory (COLD/PAGEOUT) are unavailable",
                )
            os.close(pidfd)

        try:
            buf = bytearray(64)
            n = read_memory(os.getpid(), [(addr, 64)], buf)
            s.data["process_vm_readv"] = n == 64
            s.add(
                "process_vm_readv",
                "ok" if n == 64 else "warn",
                f"read {n} of 64 bytes",
                "present pages of other processes are read in one call (never a missing "
                "managed page: it would wait for its own resolution)",
            )
        except OSError as exc:
            failed("process_vm_readv", exc, "3.2", "other processes' memory cannot be read")

        try:
            regions, _ = pagemap_scan(
                "self",
                addr,
                addr + length,
                category_anyof_mask=C.PAGE_IS_PRESENT,
                return_mask=C.PAGE_IS_PRESENT,
            )
            pages = sum((e - b) // C.PAGE_SIZE for b, e, _ in regions)
            s.data["pagemap_scan"] = True
            s.add(
                "PAGEMAP_SCAN",
                "ok" if pages == 1 else "warn",
                f"works (found {pages} present page of {_SCRATCH_PAGES})",
                "one ioctl on /proc/PID/pagemap lists present, swapped or (with WP_ASYNC) "
                "written pages of a process",
            )
        except OSError as exc:
            if isinstance(exc, PermissionError) or exc.errno == errno.EACCES:
                s.add(
                    "PAGEMAP_SCAN",
                    "warn",
                    _why(exc)[0],
                    "/proc/self/pagemap cannot be opened: this process is not dumpable "
                    "(it changed its uid) or /proc is restricted",
                    "run the manager as a normal process of its user",
                )
            else:
                failed(
                    "PAGEMAP_SCAN",
                    exc,
                    "6.7",
                    "written pages must be found with synchronous WP faults instead",
                )
    return s


def _memory(f: Facts) -> Section:
    s = Section("memory", "Memory")

    with s.probe("THP"):
        thp = _read("/sys/kernel/mm/transparent_hugepage/enabled")
        m = re.search(r"\[(\w+)\]", thp or "")
        mode = m[1] if m else None
        s.data["thp"] = mode
        if mode is None:
            s.add("THP", "ok", "not available", "no transparent huge pages: 4 KiB pages only")
        elif mode == "always":
            s.add(
                "THP",
                "warn",
                "always",
                "large anonymous mappings get 2 MiB pages: a 4 KiB eviction inside one frees "
                "nothing until the huge page is split (uffdio's own mappings are "
                "MADV_NOHUGEPAGE; mark managed ranges so too)",
                "'echo madvise > /sys/kernel/mm/transparent_hugepage/enabled'",
            )
        else:
            s.add(
                "THP",
                "ok",
                mode,
                "huge pages only where a program asks (MADV_HUGEPAGE)"
                if mode == "madvise"
                else "no huge pages: 4 KiB evictions free memory",
            )

    with s.probe("zram"):
        devs = sorted(glob.glob("/sys/block/zram*"))
        zinfo: list[dict[str, Any]] = []
        for d in devs:
            size = _read(os.path.join(d, "disksize"))
            algo = _read(os.path.join(d, "comp_algorithm")) or ""
            m = re.search(r"\[([^\]]+)\]", algo)
            zinfo.append(
                {
                    "device": os.path.basename(d),
                    "disksize": int(size) if size and size.isdigit() else None,
                    "algorithm": m[1] if m else None,
                }
            )
        s.data["zram"] = zinfo
        if zinfo:
            desc = ", ".join(
                f"{z['device']} ({_size(z['disksize']) if z['disksize'] else 'not set up'}"
                f"{', ' + z['algorithm'] if z['algorithm'] else ''})"
                for z in zinfo
            )
            s.add(
                "zram",
                "ok",
                desc,
                "compressed RAM block devices: a fast tier for evicted "
                "pages (and kernel swap to compare with)",
            )
        elif os.path.isdir("/sys/module/zram"):
            s.add(
                "zram",
                "warn",
                "module loaded, no device",
                "no zram device exists",
                "'cat /sys/class/zram-control/hot_add' creates one",
            )
        else:
            probe = shutil.which("modprobe")
            avail = False
            if probe:
                try:
                    avail = (
                        subprocess.run(
                            [probe, "-n", "-q", "zram"], capture_output=True, timeout=5, check=False
                        ).returncode
                        == 0
                    )
                except (OSError, subprocess.SubprocessError):
                    avail = False
            s.add(
                "zram",
                "warn",
                "module available, not loaded" if avail else "absent",
                "no compressed RAM device",
                "'modprobe zram'" if avail else "use a kernel with CONFIG_ZRAM",
            )

    with s.probe("swap"):
        lines = (_read("/proc/swaps") or "").splitlines()[1:]
        swaps: list[dict[str, Any]] = []
        for line in lines:
            p = line.split()
            if len(p) >= 3 and p[2].isdigit():
                swaps.append({"path": p[0], "type": p[1], "size": int(p[2]) * 1024})
        s.data["swap"] = swaps
        s.add(
            "swap",
            "ok",
            ", ".join(f"{w['path']} ({_size(w['size'])})" for w in swaps) or "none",
            "kernel swap devices (uffdio does not need any)",
        )

    with s.probe("cgroup"):
        mounts = (_read("/proc/self/mounts") or "").splitlines()
        v1_mnt = v2_mnt = None
        for line in mounts:
            p = line.split()
            if len(p) < 4:
                continue
            if p[2] == "cgroup" and "memory" in p[3].split(",") and v1_mnt is None:
                v1_mnt = p[1]
            elif p[2] == "cgroup2" and v2_mnt is None:
                v2_mnt = p[1]
        v1_path = v2_path = None
        for line in (_read("/proc/self/cgroup") or "").splitlines():
            hid, _, rest = line.partition(":")
            ctrls, _, path = rest.partition(":")
            if "memory" in ctrls.split(","):
                v1_path = path
            elif hid == "0" and ctrls == "":
                v2_path = path
        cg: dict[str, Any] = {"v1": None, "v2": None}
        v1_ok = False
        if v1_mnt and v1_path is not None:
            d = os.path.join(v1_mnt, v1_path.lstrip("/"))
            lim = _read(os.path.join(d, "memory.limit_in_bytes"))
            limit = int(lim) if lim and lim.isdigit() else None
            cg["v1"] = {"mount": v1_mnt, "cgroup": v1_path, "limit": limit}
            v1_ok = True
        v2_ok = False
        if v2_mnt and v2_path is not None:
            d = os.path.join(v2_mnt, v2_path.lstrip("/"))
            ctl = (_read(os.path.join(d, "cgroup.controllers")) or "").split()
            mx = _read(os.path.join(d, "memory.max"))
            v2_ok = "memory" in ctl
            cg["v2"] = {"mount": v2_mnt, "cgroup": v2_path, "controllers": ctl, "memory_max": mx}
        s.data["cgroup"] = cg
        meaning = (
            "per-group memory limits and usage: what a managed process really holds, "
            "and kernel reclaim under a limit to compare with"
        )
        if v1_ok and cg["v1"] is not None:
            limit = cg["v1"]["limit"]
            lim_txt = "no limit" if limit is None or limit >= 1 << 62 else _size(limit)
            s.add(
                "cgroup v1 memory",
                "ok",
                f"{cg['v1']['mount']}, this process in {v1_path} ({lim_txt})",
                meaning,
            )
        if cg["v2"] is not None:
            v2 = cg["v2"]
            if v2_ok:
                s.add(
                    "cgroup v2 memory",
                    "ok",
                    f"{v2['mount']}, this process in {v2_path} (memory.max "
                    f"{v2['memory_max'] or 'not set (root cgroup)'})",
                    meaning,
                )
            else:
                s.add(
                    "cgroup v2 memory",
                    "ok" if v1_ok else "warn",
                    f"{v2['mount']}: no memory controller here "
                    f"(controllers: {' '.join(v2['controllers']) or 'none'})",
                    "the v1 memory controller is used instead" if v1_ok else meaning,
                    ""
                    if v1_ok
                    else "enable it: 'echo +memory > PARENT/cgroup.subtree_control'"
                    " (or boot with systemd.unified_cgroup_hierarchy=1)",
                )
        if not v1_ok and cg["v2"] is None:
            s.add(
                "cgroup memory",
                "warn",
                "no memory controller mounted",
                meaning,
                "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup) with the memory controller",
            )

    with s.probe("PSI"):
        psi = _read("/proc/pressure/memory")
        s.data["psi"] = psi.splitlines()[0] if psi else None
        if psi:
            s.add(
                "PSI",
                "ok",
                psi.splitlines()[0],
                "memory pressure stall information (/proc/pressure/memory): when to evict. "
                "It does not count threads blocked in userfaultfd faults: uffdio measures "
                "those itself",
            )
        else:
            s.add(
                "PSI",
                "warn",
                "unavailable",
                "no memory pressure information",
                "use a kernel with CONFIG_PSI=y and boot without psi=0 (or with psi=1)",
            )
    return s


# ---------------------------------------------------------------------------------------------
# the report


@dataclass
class Report:
    sections: list[Section]
    ok: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {s.key: s.to_json() for s in self.sections}
        out["ok"] = self.ok
        out["reason"] = self.reason
        return out


def _section(key: str, title: str, build: Callable[[], Section]) -> Section:
    """Build a section; a bug in it costs that section, not the report."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001
        s = Section(key, title)
        what, fix = _why(exc)
        s.add(title, "warn", "probe failed", what, fix)
        s.data["errors"] = {title: what}
        return s


def collect() -> Report:
    """Probe the machine and return the report (no output)."""
    f = Facts()
    order: list[tuple[str, str, Callable[[Facts], Section]]] = [
        ("kernel", "Kernel", _kernel),
        ("privileges", "Privileges", _privileges),
        ("userfaultfd", "userfaultfd", _userfaultfd),
        ("features", "UFFD_FEATURE bits", _features),
        ("ioctls", "ioctls", _ioctls),
        ("io_uring", "io_uring", _io_uring),
        ("syscalls", "Other processes", _syscalls),
        ("memory", "Memory", _memory),
    ]
    built: dict[str, Section] = {}
    for key, title, build in order:
        built[key] = _section(key, title, lambda: build(f))  # noqa: B023 - called at once
    shown = [
        "kernel",
        "userfaultfd",
        "features",
        "ioctls",
        "privileges",
        "io_uring",
        "syscalls",
        "memory",
    ]
    sections = [built[k] for k in shown]

    problems = []
    if f.uffd_mode == "unavailable":
        problems.append(f.uffd_problem or "no userfaultfd for this user")
        if f.uffd_fix:
            problems[-1] += f" (fix: {f.uffd_fix})"
    if not f.ring_ok:
        problems.append(f.ring_problem or "no io_uring ring could be created")
        if f.ring_fix:
            problems[-1] += f" (fix: {f.ring_fix})"
    if problems:
        return Report(sections, False, "uffdio cannot serve faults here: " + "; ".join(problems))
    how = (
        "full userfaultfd"
        if f.uffd_mode == "full"
        else "userfaultfd in user-mode-only form (kernel-mode accesses to missing pages fail "
        "with EFAULT)"
    )
    return Report(sections, True, f"uffdio can serve faults here: {how} and io_uring work")


def render(report: Report, width: int | None = None) -> str:
    """The report as aligned text for a terminal."""
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns
    width = max(72, min(width, 160))
    name_w = max((len(i.name) for s in report.sections for i in s.items), default=10)
    name_w = min(name_w, 28)
    status_col = 2 + name_w + 2
    indent = " " * (status_col + 7 + 2)
    kernel = report.sections[0].data
    lines = [
        f"uffdio doctor: Linux {kernel.get('release', '?')} {kernel.get('machine', '')}, "
        f"uid {os.geteuid()}"
    ]
    for s in report.sections:
        lines.append("")
        lines.append(s.title)
        for i in s.items:
            head = f"  {i.name:<{name_w}}  {i.status:<7}  "
            text = f"{i.value} - {i.meaning}" if i.meaning else i.value
            if len(head) > len(indent):  # a long name gets its own line
                lines.append(f"  {i.name}")
                head = " " * status_col + f"{i.status:<7}  "
            lines.extend(
                textwrap.wrap(
                    text,
                    width,
                    initial_indent=head,
                    subsequent_indent=indent,
                    break_on_hyphens=False,
                )
                or [head.rstrip()]
            )
            if i.fix:
                lines.extend(
                    textwrap.wrap(
                        "fix: " + i.fix,
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent + "     ",
                        break_on_hyphens=False,
                    )
                )
    counts = {
        st: sum(1 for s in report.sections for i in s.items if i.status == st)
        for st in ("ok", "warn", "missing")
    }
    lines.append("")
    lines.append(f"{counts['ok']} ok, {counts['warn']} warn, {counts['missing']} missing")
    lines.extend(
        textwrap.wrap(
            ("OK: " if report.ok else "NOT OK: ") + report.reason,
            width,
            subsequent_indent="    ",
            break_on_hyphens=False,
        )
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="report kernel support, privileges and io_uring",
        description="What this machine offers uffdio: the kernel, userfaultfd (features and "
        "ioctls), privileges, io_uring and liburing, PAGEMAP_SCAN and other cross-process "
        "calls, THP, zram, cgroups and PSI. Exit status 0 when uffdio can serve faults here.",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the report as one JSON object (nothing else on stdout)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(report))
    sys.stdout.flush()
    return 0 if report.ok else 1
