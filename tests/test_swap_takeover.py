"""A manager killed with SIGKILL while its processes have pages in its swap store.

The store's memfd and every process's page table (a memfd too) are kept by the agents;
`uffdio serve` on the same socket takes them over and the programs finish with every
byte right (swaptest checks every page on every access and all of them at the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import requires

import uffdio
import uffdio.agent

UFFDIO = [sys.executable, "-m", "uffdio"]
pytestmark = requires(uffdio.Feature.MOVE, root=True, kernel=(6, 8))


def _serve(sock: str, *opts: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        UFFDIO + ["serve", "--socket", sock, *opts],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **(env or {})),
    )
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        assert time.monotonic() < deadline, "the manager did not start"
        time.sleep(0.05)
    return p


def _target(swaptest: str, sock: str, *args: str, min_ms: int) -> subprocess.Popen[str]:
    """swaptest under the manager at sock, running at least min_ms (SWAPTEST_MIN_MS): the
    kills below must find it running on a fast host too (30,000 accesses per thread took
    1.8 s on a quick evening here, and 2.5 s was the kill's delay)."""
    env = dict(
        os.environ,
        SWAPTEST_MIN_MS=str(min_ms),
        UFFDIO_AGENT_SOCK=sock,
        LD_PRELOAD=uffdio.agent.library_path(),
        UFFDIO_AGENT_WP="1",  # as a manager with userspace swap starts its programs
    )
    return subprocess.Popen(
        [swaptest, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _threads_waiting(pid: int) -> bool:
    wchan = set()
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            wchan.add(Path(f"/proc/{pid}/task/{t}/wchan").read_text())
        except OSError:
            pass
    return "handle_userfault" in wchan


def _state(p: subprocess.Popen[str]) -> str:
    """What the target's threads (and its children's) are doing, for a failure message."""
    out = []
    pids = [p.pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
    for pid in pids:
        pids += [c for c in _children(pid) if c not in pids]
        with contextlib.suppress(OSError):
            for t in os.listdir(f"/proc/{pid}/task"):
                out.append(f"{pid}/{t}: {Path(f'/proc/{pid}/task/{t}/wchan').read_text()}")
    return ", ".join(out)


def _kill(p: subprocess.Popen[str]) -> None:
    p.kill()
    p.wait()


def _successor(
    sock: str, stats: Path, target: subprocess.Popen[str], opts: Sequence[str] = ("--limit", "8M")
) -> str:
    """`uffdio serve OPTS --exit-when-idle` on sock, taking over from a manager that is
    gone, until its programs ended; returns its stderr."""
    m2 = subprocess.Popen(
        UFFDIO
        + ["serve", "--socket", sock, *opts, "--exit-when-idle"]
        + ["--stats-json", str(stats)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, m2err = m2.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        m2.kill()
        _, m2err = m2.communicate()
        msg = f"the new manager did not finish: {_state(target)}\n{m2err}"
        raise AssertionError(msg) from None
    assert m2.returncode == 0, m2err
    return m2err


@pytest.mark.parametrize(
    "first, second, events",
    [
        # batches in flight all the time: the kill lands in one more often than not
        (["--limit", "8M", "--churn", "0.01"], ["--limit", "8M"], ""),
        # fork (the child is taken over too when it is alive), munmap, mremap, madvise
        (["--limit", "8M", "--churn", "0.03"], ["--limit", "8M"], "fmrd"),
        # a manager started without swap serves the pages it takes over, without a limit
        (["--limit", "8M"], [], ""),
        # a swap file: its slots' reference counts are a memfd the agent keeps too
        (["--limit", "8M", "--store", "file:{tmp}"], ["--limit", "8M"], "mrd"),
    ],
    ids=["churn", "fork-events", "no-limit-after", "file"],
)
def test_killed_swap_manager_is_taken_over(
    swaptest: str, tmp_path: Path, first: list[str], second: list[str], events: str
) -> None:
    sock = str(tmp_path / "m.sock")
    m1 = _serve(sock, *(a.replace("{tmp}", str(tmp_path)) for a in first))
    target = _target(swaptest, sock, "32", "rand", "30000", "2", "30", events, min_ms=4500)
    try:
        time.sleep(2.5)  # filled and evicting
        _kill(m1)
        time.sleep(0.5)
        assert target.poll() is None, target.communicate()
        if not events:  # (with events, the threads may be stopped for one)
            assert _threads_waiting(target.pid)  # waiting, not reading zeros
        stats = tmp_path / "s.json"
        _successor(sock, stats, target, second)
        out, err = target.communicate(timeout=60)
        assert target.returncode == 0, out + err
        assert "ok checked=" in out
        s = json.loads(stats.read_text())
        rec = s["recovered"]
        assert rec["processes"] >= 1  # (2 when the kill found a fork child alive)
        assert rec["pages_evicted"] + rec["pages_from_scratch"] > 1000  # most of 32 MiB
        assert rec["pages_waiting"] == 0
        assert s["pages_swapped_in"] > 0
        assert not list(tmp_path.glob("uffdio-swap-*"))  # the taken-over swap file is gone
    finally:
        _kill(target)
        _kill(m1)


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for t in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    return out


@pytest.mark.parametrize(
    "delay",
    ["UFFDIO_TEST_PAIR_DELAY_MS", "UFFDIO_TEST_WELCOME_DELAY_MS"],
    ids=["unpaired", "paired"],
)
def test_fork_child_of_a_killed_manager_reads_its_parents_evicted_pages(
    swaptest: str, tmp_path: Path, delay: str
) -> None:
    """The manager is killed after the kernel gave it a fork child's uffd (the FORK
    event) and before the child's agent had that uffd and its page table.  The parent's
    agent keeps them for the next manager, which pairs the child with them: the child
    reads every page its parent had evicted (it read zeros before: the kernel
    unregisters the child's memory with the last descriptor of its uffd, and the
    manager's was the only one).  The first manager waits 60 s before it pairs a fork
    child, or after it gave the child its uffd and before its table, so the kill finds
    the child in its handshake, without its uffd or with it."""
    sock = str(tmp_path / "m.sock")
    m1 = _serve(sock, "--limit", "8M", env={delay: "60000"})
    target = _target(swaptest, sock, "32", "rand", "20000", "2", "30", "f", min_ms=0)
    try:
        deadline = time.monotonic() + 60
        while not _children(target.pid):
            assert target.poll() is None, target.communicate()
            assert time.monotonic() < deadline, "no fork child"
            time.sleep(0.05)
        time.sleep(0.5)  # (the parent's agent has the child's uffd by now)
        _kill(m1)
        time.sleep(0.5)
        assert target.poll() is None, target.communicate()
        stats = tmp_path / "s.json"
        m2err = _successor(sock, stats, target)
        out, err = target.communicate(timeout=60)
        assert target.returncode == 0, out + err + m2err
        assert "ok checked=" in out
        s = json.loads(stats.read_text())
        assert s["recovered"]["fork_children"] == 1, m2err
        assert s["recovered"]["processes"] == 2  # the parent and the child
        assert not s["unmanaged"], s["unmanaged"]
    finally:
        _kill(target)
        _kill(m1)


def test_takeover_twice(swaptest: str, tmp_path: Path) -> None:
    """The manager that took over is killed too: a third one takes over the store it
    adopted (and what it evicted into a store of its own) and the program finishes."""
    sock = str(tmp_path / "m.sock")
    target = None
    managers = []
    try:
        managers.append(_serve(sock, "--limit", "8M", "--churn", "0.02"))
        target = _target(swaptest, sock, "32", "rand", "60000", "2", "30", min_ms=7000)
        for _ in range(2):
            time.sleep(2.0)
            _kill(managers[-1])
            time.sleep(0.3)
            assert target.poll() is None, target.communicate()
            managers.append(_serve(sock, "--limit", "8M", "--churn", "0.02"))
        out, err = target.communicate(timeout=180)
        assert target.returncode == 0, out + err
        assert "ok checked=" in out
    finally:
        for m in managers:
            _kill(m)
        if target is not None:
            _kill(target)


PYSTORE_MANAGER = """
import sys

import anyio

from uffdio import Manager
from uffdio.swap import PyStore, Swap


class DictStore(PyStore):
    def __init__(self):
        super().__init__()
        self.pages, self.next = {}, 1

    async def put(self, pages):
        keys = []
        for i in range(len(pages) // 4096):
            self.pages[self.next] = bytes(pages[i * 4096 : (i + 1) * 4096])
            keys.append(self.next)
            self.next += 1
        return keys

    async def get(self, key):
        return self.pages[key]

    async def discard(self, keys):
        for k in keys:
            self.pages.pop(k, None)


async def main():
    async with Manager(sys.argv[1], swap=Swap(store=DictStore(), limit=8 << 20)):
        await anyio.sleep_forever()


anyio.run(main)
"""


def test_python_store_is_not_taken_over(swaptest: str, tmp_path: Path) -> None:
    """A Python store's pages died with its manager: the new manager says so and leaves
    the program waiting - it must never serve those pages as zeros."""
    sock = str(tmp_path / "m.sock")
    m1 = subprocess.Popen([sys.executable, "-c", PYSTORE_MANAGER, sock], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert m1.poll() is None and time.monotonic() < deadline, "the manager did not start"
        time.sleep(0.05)
    target = _target(swaptest, sock, "32", "rand", "40000", "2", "30", min_ms=5000)
    m2 = None
    try:
        time.sleep(3.0)
        _kill(m1)
        m2 = _serve(sock, "--limit", "8M")
        time.sleep(2.0)
        assert target.poll() is None, target.communicate()
        assert _threads_waiting(target.pid)
        m2.terminate()
        _, err = m2.communicate(timeout=60)
        assert "cannot be taken over" in err
    finally:
        _kill(target)
        _kill(m1)
        if m2 is not None:
            _kill(m2)


FAILING_MANAGER = """
import sys, anyio
from uffdio import Manager
from uffdio.manage import ManagedProcess
from uffdio.swap import Swap

async def cannot_give_back(self):
    raise OSError(5, "the store cannot be read (as if)")

ManagedProcess.release = cannot_give_back  # giving the pages back fails

async def main():
    async with Manager(sys.argv[1], swap=Swap(limit=8 << 20)):
        await anyio.sleep(float(sys.argv[2]))
        raise RuntimeError("the embedding program fails")

anyio.run(main)
"""


def test_manager_ending_without_giving_back_leaves_the_pages(swaptest: str, tmp_path: Path) -> None:
    """A manager that ends on an error (not a kill) and cannot give its process back
    runs its cleanup: letting go of a page table must not free the pages in the store
    while the process lives and its agent keeps the table (uf_pt_keep) - a successor
    takes them over.  (It used to drop every reference: the store freed the pages and
    the successor refused the table, EBADMSG, the program left waiting.)"""
    sock = str(tmp_path / "m.sock")
    m1 = subprocess.Popen(
        [sys.executable, "-c", FAILING_MANAGER, sock, "2.0"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert m1.poll() is None and time.monotonic() < deadline, "the manager did not start"
        time.sleep(0.05)
    target = _target(swaptest, sock, "32", "rand", "100000", "2", "30", min_ms=4000)
    try:
        _, m1err = m1.communicate(timeout=60)
        assert "the embedding program fails" in m1err
        assert target.poll() is None, target.communicate()
        stats = tmp_path / "s.json"
        _successor(sock, stats, target)
        out, err = target.communicate(timeout=60)
        assert target.returncode == 0, out + err
        rec = json.loads(stats.read_text())["recovered"]
        assert rec["processes"] == 1 and rec["pages_evicted"] > 1000
    finally:
        _kill(target)
        _kill(m1)
