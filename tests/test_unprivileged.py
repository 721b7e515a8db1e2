"""uffdio as an unprivileged user (uid/gid 65534, no capabilities).

The test runs a child Python process, started as root, that drops to nobody before it imports
uffdio (the interpreter may live under /root, mode 0700, so the standard-library modules
uffdio needs are imported while still root).  What the child may do follows the machine's
settings: vm.unprivileged_userfaultfd and the mode of /dev/userfaultfd.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

NOBODY = 65534

CHILD = r"""
import array, asyncio, collections.abc, contextlib, dataclasses, enum, errno, functools, json
import math, os, socket, sys, time, typing, concurrent.futures
import anyio, anyio.abc, anyio.to_thread, anyio._backends._asyncio, cffi, _cffi_backend

os.setgroups([]); os.setgid(65534); os.setuid(65534)

import uffdio
from uffdio import Feature
from uffdio._lib import ffi, lib

PAGE = uffdio.PAGE_SIZE
res = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith(("CapEff:", "CapPrm:")):
            res[line.split(":")[0]] = int(line.split()[1], 16)


def err(exc):
    return {"cls": type(exc).__name__, "errno": getattr(exc, "errno", None), "msg": str(exc)}


def addr_of(buf):
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


n = 16
u = uffdio.Userfaultfd.open()  # user_mode_only=None: fall back to user mode only if needed
res["user_mode_only"] = u.user_mode_only
mem = lib.uf_mmap_anon(3 * n * PAGE)
a, b, c = mem, mem + n * PAGE, mem + 2 * n * PAGE
u.register(mem, 3 * n * PAGE)
src = bytearray(n * PAGE)
lib.uf_pattern(addr_of(src), n * PAGE, 41, a)  # a's content, built outside the range
u.resolver.buffer(a, src)
data_b = bytearray(n * PAGE)
lib.uf_pattern(addr_of(data_b), n * PAGE, 42, b)


async def main():
    # a: C resolver rule, engine on its C thread; the faulting thread runs lib.uf_check in C
    # without the GIL (cffi releases it), so this process serves its own faults
    async with u.serving():
        res["bad_a"] = await anyio.to_thread.run_sync(lib.uf_check, a, n * PAGE, 41)
    res["stats_a"] = u.statistics()

    # b: a coroutine handler, engine inline on the loop; again the faulting thread is in C
    @u.on_fault
    async def handler(batch):
        for page in batch.pages():
            await u.copy(page, data_b[page - b : page - b + PAGE])

    async with u.serving(thread=False):
        res["bad_b"] = await anyio.to_thread.run_sync(lib.uf_check, b, n * PAGE, 42)
    res["stats_b"] = u.statistics()


anyio.run(main)

if u.user_mode_only:
    # c is registered and missing, nobody serves it: a kernel-mode access must fail with
    # EFAULT instead of faulting (with a full uffd this read would wait forever)
    buf = bytearray(PAGE)
    try:
        res["kernel_access"] = uffdio.read_memory(os.getpid(), [(c, PAGE)], buf)
    except OSError as exc:
        res["kernel_access"] = err(exc)
u.close()

try:
    with uffdio.Userfaultfd.open(user_mode_only=False) as full:
        res["full"] = {"user_mode_only": full.user_mode_only}
except Exception as exc:
    res["full"] = err(exc)

try:
    with uffdio.Userfaultfd.open(Feature.EVENT_FORK) as f:
        res["event_fork_required"] = int(f.features)
except Exception as exc:
    res["event_fork_required"] = err(exc)
with uffdio.Userfaultfd.open(optional=Feature.EVENT_FORK | Feature.THREAD_ID) as f:
    res["event_fork_optional"] = int(f.features)

print(json.dumps(res))
"""


def sysctl_unprivileged_userfaultfd() -> int | None:
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            return int(f.read())
    except FileNotFoundError:
        return None


def devnode_usable_by_nobody() -> bool:
    try:
        st = os.stat("/dev/userfaultfd")
    except FileNotFoundError:
        return False
    if st.st_uid == NOBODY:
        return bool(st.st_mode & stat.S_IRUSR and st.st_mode & stat.S_IWUSR)
    return bool(st.st_mode & stat.S_IROTH and st.st_mode & stat.S_IWOTH)


@pytest.fixture(scope="module")
def child() -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return json.loads(r.stdout)


pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]


def test_child_has_no_privileges(child):
    assert (child["uid"], child["gid"], child["groups"]) == (NOBODY, NOBODY, [])
    assert child["CapEff"] == 0 and child["CapPrm"] == 0


def test_open_picks_the_mode_the_settings_allow(child):
    full_allowed = sysctl_unprivileged_userfaultfd() == 1 or devnode_usable_by_nobody()
    assert child["user_mode_only"] is (not full_allowed)


def test_own_faults_served_by_c_rule_and_by_coroutine(child):
    n = 16
    assert child["bad_a"] == 0
    a = child["stats_a"]
    assert a["resolved"] == n and a["forwarded"] == 0 and a["thread"] == 1
    assert a["inflight"] == 0 and a["errors"] == 0
    assert child["bad_b"] == 0
    b = child["stats_b"]
    assert b["forwarded"] == n and b["thread"] == 0 and b["inflight"] == 0


def test_kernel_mode_access_fails_with_efault_in_user_mode_only(child):
    if not child["user_mode_only"]:
        pytest.skip("this machine lets nobody open a full uffd")
    ka = child["kernel_access"]
    assert isinstance(ka, dict), f"read a missing page of a user-mode-only range: {ka}"
    assert ka["errno"] == 14  # EFAULT
    assert "process_vm_readv" in ka["msg"]


def test_full_uffd_refused_with_a_clear_message(child):
    full = child["full"]
    full_allowed = sysctl_unprivileged_userfaultfd() == 1 or devnode_usable_by_nobody()
    if full_allowed:
        assert full == {"user_mode_only": False}
        return
    assert full["cls"] == "UffdPermissionError", full
    msg = full["msg"]
    assert msg.startswith("userfaultfd:")
    assert "vm.unprivileged_userfaultfd" in msg and "/dev/userfaultfd" in msg and "Fix" in msg


def test_event_fork_needs_cap_sys_ptrace(child):
    req = child["event_fork_required"]
    assert isinstance(req, dict) and req["cls"] == "UffdPermissionError", req
    assert "CAP_SYS_PTRACE" in req["msg"] and "UFFDIO_API" in req["msg"]
    # optional: left out, the rest negotiated
    opt = child["event_fork_optional"]
    assert not opt & (1 << 1) and opt & (1 << 8)  # no EVENT_FORK, THREAD_ID kept
