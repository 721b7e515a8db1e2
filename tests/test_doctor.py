"""``uffdio doctor``: run as a real command (root and an unprivileged user), checked against
what this process can observe of the same kernel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest

from uffdio import Feature, Userfaultfd

KEYS = {"kernel", "userfaultfd", "features", "ioctls", "privileges", "io_uring", "memory", "ok"}
STATUSES = {"ok", "warn", "missing"}


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert m
    return int(m[1]), int(m[2])


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uffdio", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def checks(section: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in section["checks"]}


def test_json_matches_this_kernel() -> None:
    r = doctor("--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    d = json.loads(r.stdout)  # the whole of stdout is one JSON object
    assert KEYS <= set(d)
    assert d["ok"] is True and "can serve faults" in d["reason"]
    for key in KEYS - {"ok"}:
        for c in d[key]["checks"]:
            assert c["status"] in STATUSES, c
            assert c["value"], c

    assert d["kernel"]["release"] == os.uname().release
    assert d["kernel"]["machine"] == os.uname().machine

    # the features are what UFFDIO_API tells this process
    umo = d["userfaultfd"]["mode"] == "user_mode_only"
    avail, _ = Userfaultfd.probe(user_mode_only=umo)
    assert d["features"]["mask"] == int(avail)
    assert set(d["features"]["available"]) == {f.name for f in Feature if avail & f}
    assert checks(d["features"])["PAGEFAULT_FLAG_WP"]["status"] == (
        "ok" if avail & Feature.PAGEFAULT_FLAG_WP else "missing"
    )
    v = kernel_version()
    if v >= (6, 7):
        assert "WP_ASYNC" in d["features"]["available"]
    if v >= (6, 8):
        assert "MOVE" in d["features"]["available"]

    ioctls = set(d["ioctls"]["available"])
    assert {"WAKE", "COPY", "ZEROPAGE"} <= ioctls
    if avail & Feature.PAGEFAULT_FLAG_WP:
        assert d["ioctls"]["mode"] == "MISSING|WP" and "WRITEPROTECT" in ioctls
    if v >= (6, 8):
        assert "MOVE" in ioctls
    if avail & Feature.MINOR_SHMEM:
        assert "CONTINUE" in d["ioctls"]["shmem_minor"]

    assert d["io_uring"]["ring"] is True
    lib = d["io_uring"]["liburing"]
    assert lib["version"] or lib["pkg_config"]
    if lib["version"] and lib["pkg_config"]:
        assert lib["version"] == lib["pkg_config"]
    assert d["io_uring"]["read_multishot_expected"] == (v >= (6, 7))
    if v >= (6, 7):
        assert d["syscalls"]["pagemap_scan"] is True

    priv = d["privileges"]
    assert priv["euid"] == os.geteuid() and priv["root"] == (os.geteuid() == 0)
    if os.geteuid() == 0:
        assert d["userfaultfd"]["mode"] == "full"
        assert priv["cap_sys_ptrace"] is True
        assert d["features"]["event_fork_enabled"] is True

    if os.path.exists("/proc/pressure/memory"):
        assert d["memory"]["psi"].startswith("some ")
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(thp):
        with open(thp) as f:
            assert f"[{d['memory']['thp']}]" in f.read()


def test_plain_report() -> None:
    r = doctor()
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for title in (
        "Kernel",
        "userfaultfd",
        "UFFD_FEATURE",
        "ioctls",
        "Privileges",
        "io_uring",
        "Other processes",
        "Memory",
    ):
        assert re.search(rf"^{re.escape(title)}", out, re.M), title
    for name in (
        "EVENT_FORK",
        "COPY",
        "CAP_SYS_PTRACE",
        "vm.unprivileged_userfaultfd",
        "/dev/userfaultfd",
        "liburing",
        "PAGEMAP_SCAN",
        "THP",
        "zram",
        "PSI",
    ):
        assert re.search(rf"^  {re.escape(name)} +(ok|warn|missing) ", out, re.M), name
    # the verdict comes last
    tail = out.rstrip().split("\n\n")[-1]
    assert re.match(r"\d+ ok, \d+ warn, \d+ missing\nOK: uffdio can serve faults here", tail)
    # same as python -m uffdio through the console script, when installed
    exe = shutil.which("uffdio", path=os.path.dirname(sys.executable))
    if exe:
        r2 = subprocess.run(
            [exe, "doctor", "--json"], capture_output=True, text=True, timeout=60, check=False
        )
        assert r2.returncode == 0 and json.loads(r2.stdout)["ok"] is True


# The interpreter may live under /root (mode 0700): import everything while still root, then
# drop to nobody.  A process that changed its uid is not dumpable (its /proc files belong to
# root); a real unprivileged user's process is, so that is restored unless told otherwise.
AS_NOBODY = """
import ctypes, os, sys
import uffdio.cli
uffdio.cli.build_parser()          # imports every module the CLI needs
os.setgroups([]); os.setgid(65534); os.setuid(65534)
if sys.argv[1] == "1":
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)   # PR_SET_DUMPABLE
sys.exit(uffdio.cli.main(["doctor", "--json"]))
"""


@pytest.mark.root
@pytest.mark.parametrize("dumpable", [True, False], ids=["dumpable", "not-dumpable"])
def test_unprivileged_user(dumpable: bool) -> None:
    r = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, "1" if dumpable else "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert r.stderr == "", r.stderr
    d = json.loads(r.stdout)
    assert KEYS <= set(d)
    priv = d["privileges"]
    assert priv["euid"] == 65534 and priv["root"] is False
    assert priv["cap_sys_ptrace"] is False
    assert checks(priv)["CAP_SYS_PTRACE"]["status"] == "warn"

    u = d["userfaultfd"]
    full_for_all = u["unprivileged_userfaultfd"] == 1
    if not full_for_all and not u["devnode"]["usable"]:
        # vm.unprivileged_userfaultfd=0 and a root-only /dev/userfaultfd: user mode only
        assert u["mode"] == "user_mode_only" and u["user_mode_only"] is True
        assert u["syscall"] is False and u["syscall_error"].startswith("EPERM")
        mode = checks(u)["mode"]
        assert mode["status"] == "warn" and "EFAULT" in mode["meaning"] and mode["fix"]
        assert "user-mode-only" in d["reason"]
    # EVENT_FORK is offered by the kernel but needs CAP_SYS_PTRACE
    if "EVENT_FORK" in d["features"]["available"]:
        assert d["features"]["event_fork_enabled"] is False
        fork = checks(d["features"])["EVENT_FORK"]
        assert fork["status"] == "warn" and "CAP_SYS_PTRACE" in fork["meaning"]
    # the ioctls are probed on a user-mode-only uffd just the same
    assert {"COPY", "ZEROPAGE"} <= set(d["ioctls"]["available"])
    assert d["io_uring"]["ring"] is True
    assert r.returncode == (0 if d["ok"] else 1)
    assert d["ok"] is True
    scan = checks(d["syscalls"])["PAGEMAP_SCAN"]
    if dumpable:
        assert d["syscalls"]["pagemap_scan"] is (kernel_version() >= (6, 7))
    else:
        assert scan["status"] == "warn" and "dumpable" in scan["meaning"]


IO_URING_DISABLED = "/proc/sys/kernel/io_uring_disabled"


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(IO_URING_DISABLED),
    reason="needs root and kernel.io_uring_disabled (6.6+)",
)
def test_failures_are_reported_not_raised() -> None:
    """A real failure: io_uring switched off with kernel.io_uring_disabled=2 for the length of
    one doctor run (restored in all cases).  The doctor reports it with the fix, says NOT OK
    last and exits 1, without a traceback."""
    with open(IO_URING_DISABLED) as f:
        old = f.read().strip()
    try:
        with open(IO_URING_DISABLED, "w") as f:
            f.write("2")
        r = subprocess.run(
            [sys.executable, "-m", "uffdio", "doctor", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        plain = subprocess.run(
            [sys.executable, "-m", "uffdio", "doctor"], capture_output=True, text=True, timeout=60
        )
    finally:
        with open(IO_URING_DISABLED, "w") as f:
            f.write(old)
    assert "Traceback" not in r.stderr + plain.stderr
    d = json.loads(r.stdout)
    assert r.returncode == 1 and d["ok"] is False
    ring = checks(d["io_uring"])["ring"]
    assert ring["status"] == "missing" and "io_uring_disabled" in ring["fix"]
    assert "io_uring" in d["reason"]
    assert plain.returncode == 1
    last = plain.stdout.rstrip().split("\n\n")[-1]  # the verdict paragraph comes last
    assert "NOT OK: " in last and "io_uring" in last
