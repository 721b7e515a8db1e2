"""Shared fixtures: real target processes, real uffds, real rings.  No kernel mocks."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import uffdio
from uffdio._target import Target

PROGS = Path(__file__).parent / "progs"

PAGE = uffdio.PAGE_SIZE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_root = pytest.mark.skip(reason="needs root")
    skip_slow = pytest.mark.skip(reason="UFFDIO_SKIP_SLOW=1")
    for item in items:
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(skip_root)
        if "slow" in item.keywords and os.environ.get("UFFDIO_SKIP_SLOW") == "1":
            item.add_marker(skip_slow)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def target() -> Iterator[Target]:
    """A separate process (python -m uffdio._target) whose memory the test serves."""
    t = Target()
    try:
        yield t
    finally:
        t.close()


@pytest.fixture(scope="session")
def swaptest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/progs/swaptest.c, compiled: a target that checks every page it reads."""
    out = tmp_path_factory.mktemp("bin") / "swaptest"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-pthread", "-o", str(out), str(PROGS / "swaptest.c"), "-lm"],
        check=True,
    )
    return str(out)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def managed(
    t: Target, npages: int, features: int = 0, mode: int = uffdio.Mode.MISSING, optional: int = 0
) -> tuple[int, uffdio.Userfaultfd]:
    """Map ``npages`` in the target, create a uffd there, register the region, receive the uffd."""
    [addr] = t.cmd("map", npages * PAGE)
    u = t.open_uffd(features, optional)
    t.cmd("register", addr, npages * PAGE, int(mode))
    return addr, u


def pattern(as_addr: int, length: int, seed: int) -> bytearray:
    """The bytes that target memory at ``as_addr`` holds after ``fill as_addr length seed``."""
    from uffdio._lib import ffi, lib

    buf = bytearray(length)
    lib.uf_pattern(int(ffi.cast("uintptr_t", ffi.from_buffer(buf))), length, seed, as_addr)
    return buf


def _kernel() -> tuple[int, int]:
    rel = os.uname().release.split("-")[0].split(".")
    return int(rel[0]), int(rel[1])


def requires(
    features: int = 0, *, root: bool = False, kernel: tuple[int, int] | None = None
) -> pytest.MarkDecorator:
    """Feature gate in the manner of the kernel's uffd-unit-tests: a test declares the
    userfaultfd features, privileges and kernel it needs, and is skipped with the reason
    when this machine lacks them."""
    reasons = []
    try:
        avail, _ = uffdio.Userfaultfd.probe()
    except uffdio.UffdError as exc:
        avail = uffdio.Feature(0)
        reasons.append(f"no userfaultfd: {exc}")
    missing = uffdio.Feature(features) & ~avail
    if missing:
        reasons.append(f"kernel lacks {missing!r}")
    if root and os.geteuid() != 0:
        reasons.append("needs root")
    if kernel and _kernel() < kernel:
        reasons.append(f"needs Linux {kernel[0]}.{kernel[1]}+")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "ok")


# ---- helpers shared by the test modules -------------------------------------------------

#: run a test in both engine modes: a C thread waits on the ring, or the event loop does
MODES = pytest.mark.parametrize("thread", [True, False], ids=["thread", "inline"])


async def until(pred, what: str, timeout: float = 10.0, step: float = 0.002):  # noqa: ASYNC109
    """Poll ``pred()`` until it returns something truthy (bounded: no test hangs here)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(step)


async def acmd(target, *args):
    """A target command off the event loop (``Target.acmd`` abandons on cancellation, so a
    command stuck in a fault nobody serves cannot hang a test; teardown kills the target)."""
    return await target.acmd(*args)


async def read_present(pid: int, addr: int, length: int) -> bytes:
    """process_vm_readv, off the event loop and bounded.  Only for pages the target already
    faulted in: a missing managed page would wait for the very resolution we provide."""
    buf = bytearray(length)

    def go() -> int:
        return uffdio.read_memory(pid, [(addr, length)], buf)

    with anyio.fail_after(10):
        n = await anyio.to_thread.run_sync(go, abandon_on_cancel=True)
    assert n == length
    return bytes(buf)


async def line_cmd(popen, *args: object, timeout: float = 30) -> str:  # noqa: ASYNC109
    """One command line to a tests/progs/pytarget.py process, its one-line reply (bounded:
    a target stuck in a fault cannot hang the test)."""
    assert popen.stdin and popen.stdout
    popen.stdin.write(" ".join(map(str, args)) + "\n")
    popen.stdin.flush()
    with anyio.fail_after(timeout):
        line = await anyio.to_thread.run_sync(popen.stdout.readline, abandon_on_cancel=True)
    assert line, f"the target exited (rc={popen.poll()})"
    return line.strip()
