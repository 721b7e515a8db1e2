"""Taking charge of a running process that has no agent: ``Manager.attach(pid)`` (ptrace,
injected system calls).  The targets are started with subprocess.Popen, never through
Manager.spawn; every byte is checked, and the target must be left exactly as it was.

Every test is bounded twice: anyio.fail_after inside (target commands abandon their thread
on cancellation) and a pytest-timeout mark (an injection session runs in a worker thread
that cannot be cancelled: the mark is the last line of defence against a hung session)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from conftest import line_cmd, requires

import uffdio
from uffdio import attach as A
from uffdio.manage import Manager

pytestmark = [pytest.mark.anyio, requires(uffdio.Feature.MOVE, root=True, kernel=(6, 8))]

PROGS = Path(__file__).parent / "progs"
PAGE = 4096


# ---- helpers ---------------------------------------------------------------------------------


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def fds(pid: int) -> dict[str, str]:
    d = f"/proc/{pid}/fd"
    out = {}
    for x in os.listdir(d):
        try:
            out[x] = os.readlink(f"{d}/{x}")
        except FileNotFoundError:
            pass
    return out


def uffd_flags(pid: int) -> list[str]:
    """VmFlags lines that name a userfaultfd registration (um: missing, uw: wp, ui: minor)."""
    smaps = Path(f"/proc/{pid}/smaps").read_text()
    return [
        ln
        for ln in smaps.splitlines()
        if ln.startswith("VmFlags") and {"um", "uw", "ui"} & set(ln.split()[1:])
    ]


class Target:
    """A tests/progs/pytarget.py process started with subprocess (no agent)."""

    def __init__(self, size: int = 16 << 20) -> None:
        self.size = size
        self.popen = subprocess.Popen(
            [sys.executable, str(PROGS / "pytarget.py"), str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.pid = self.popen.pid
        self.model = bytearray(size)  # what the region must hold

    async def cmd(self, *args: object, timeout: float = 30) -> str:
        return await line_cmd(self.popen, *args, timeout=timeout)

    async def fill(self, seed: int) -> str:
        addr, digest = (await self.cmd("fill", seed)).split()
        self.model[:] = random.Random(seed).randbytes(self.size)
        assert hashlib.sha256(self.model).hexdigest() == digest
        self.addr = int(addr)
        return digest

    async def write(self, off: int, n: int, v: int) -> None:
        assert await self.cmd("write", off, n, v) == "ok"
        for p in range(off, off + n, PAGE):
            self.model[p] = v

    async def zero(self, off: int, n: int) -> None:
        assert await self.cmd("zero", off, n) == "0"
        self.model[off : off + n] = bytes(n)

    def digest(self, off: int = 0, n: int | None = None) -> str:
        n = self.size - off if n is None else n
        return hashlib.sha256(self.model[off : off + n]).hexdigest()

    def snapshot(self) -> dict[str, object]:
        """What must be the same before attach and after release."""
        st = status(self.pid)
        return {
            "fds": fds(self.pid),
            "sigblk": st["SigBlk"],
            "sigign": st["SigIgn"],
            "sigcgt": st["SigCgt"],
            "threads": st["Threads"],
        }

    def assert_clean(self, before: dict[str, object] | None = None) -> None:
        st = status(self.pid)
        assert st["TracerPid"] == "0", st["TracerPid"]
        assert st["State"][0] in "SR", st["State"]
        assert not [t for t in fds(self.pid).values() if "userfaultfd" in t]
        assert uffd_flags(self.pid) == []
        if before is not None:
            assert self.snapshot() == before

    async def close(self) -> int:
        assert await self.cmd("exit") == "bye"
        with anyio.fail_after(30):
            rc = await anyio.to_thread.run_sync(self.popen.wait, abandon_on_cancel=True)
        self.popen.stdin.close()
        self.popen.stdout.close()
        return rc

    def kill(self) -> None:
        if self.popen.returncode is None:
            self.popen.kill()
            self.popen.wait(timeout=10)
        for f in (self.popen.stdin, self.popen.stdout):
            if f:
                f.close()


async def rss_kib(t: Target) -> int:
    return int(await t.cmd("rss"))


# ---- the whole round trip --------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_attach_evict_release_leaves_target_as_it_was() -> None:
    t = Target(16 << 20)
    try:
        with anyio.fail_after(90):
            digest = await t.fill(3)
            before = t.snapshot()
            rss0 = await rss_kib(t)
            async with Manager() as m:
                proc = await m.attach(t.pid)
                assert isinstance(proc, A.AttachedProcess) and m.processes[t.pid] is proc
                # between sessions nobody traces it, and its mask is its own
                st = status(t.pid)
                assert st["TracerPid"] == "0" and st["SigBlk"] == before["sigblk"]
                # the region is registered, and so is the page of the leader's rseq area:
                # the page that used to hang the first evict() (kept resident, never moved)
                assert any(s <= t.addr < s + n for s, n in proc.regions)
                # (glibc >= 2.35 registers one per thread unless a tunable turns it off)
                for rseq, _len in proc.rseq_areas[:1]:
                    assert any(s <= rseq < s + n for s, n in proc.regions)

                n1 = await proc.evict()
                assert n1 >= (16 << 20) // PAGE
                assert proc.stats["pages_skipped"] >= len(proc.rseq_areas[:1])  # its page
                assert await rss_kib(t) < rss0 - (14 << 10)
                assert await t.cmd("digest") == digest

                await t.write(0, 4 << 20, 0x5A)
                await t.zero(8 << 20, 1 << 20)  # the program's own MADV_DONTNEED
                n2 = await proc.evict()
                assert n2 >= (4 << 20) // PAGE
                assert await t.cmd("digest") == t.digest()
                assert await t.cmd("iszero", 8 << 20, 1 << 20) == "1"
                await proc.release()
                assert t.pid not in m.processes
            t.assert_clean(before)
            assert await t.cmd("digest") == t.digest()
            assert await t.cmd("unknown-command") == "unknown unknown-command"
            assert await t.close() == 0
    finally:
        t.kill()


@pytest.mark.timeout(120)
async def test_stale_rseq_list_is_caught_in_the_session() -> None:
    """The in-session guard alone keeps the injection thread's rseq page from being moved
    (here the list from earlier sessions is wiped on purpose, as when a process that just
    exec'd registers its rseq area after the attach session).  Without it, this hangs."""
    t = Target(4 << 20)
    try:
        with anyio.fail_after(90):
            digest = await t.fill(13)
            async with Manager() as m:
                proc = await m.attach(t.pid)
                if not proc.rseq_areas:
                    pytest.skip("glibc registered no rseq area")
                # every session still reports the areas, but nothing is pinned from them
                proc._set_rseq_areas = lambda areas: setattr(proc, "rseq_areas", areas)  # type: ignore[method-assign]
                proc._pinned = frozenset()
                rseq = proc.rseq_areas[0][0]
                for _ in range(3):
                    skipped = proc.stats["pages_skipped"]
                    assert await proc.evict() > 0
                    assert proc.stats["pages_skipped"] > skipped  # the run holding it stays
                    assert await t.cmd("digest") == digest
                    assert any(s <= rseq < s + n for s, n in proc.present_ranges())
                await proc.release()
            t.assert_clean()
            assert await t.close() == 0
    finally:
        t.kill()


@pytest.mark.timeout(120)
async def test_manager_exit_releases_an_attached_process() -> None:
    """No explicit release(): leaving ``async with Manager()`` gives the target back."""
    t = Target(8 << 20)
    try:
        with anyio.fail_after(90):
            digest = await t.fill(4)
            before = t.snapshot()
            async with Manager() as m:
                proc = await m.attach(t.pid)
                assert await proc.evict() >= (8 << 20) // PAGE
            t.assert_clean(before)
            assert await t.cmd("digest") == digest
            assert await t.close() == 0
    finally:
        t.kill()


@pytest.mark.timeout(240)
async def test_twenty_attach_cycles_on_one_target() -> None:
    t = Target(8 << 20)
    try:
        with anyio.fail_after(200):
            await t.fill(5)
            before = t.snapshot()
            async with Manager() as m:
                for i in range(20):
                    with anyio.fail_after(30):
                        proc = await m.attach(t.pid)
                        assert await proc.evict() > 0
                        await t.write((i * 37 % 2048) * PAGE, 64 * PAGE, i + 1)
                        assert await t.cmd("digest") == t.digest()
                        await proc.evict()
                        await proc.release()
                    t.assert_clean(before)
                    assert await t.cmd("digest") == t.digest()
            t.assert_clean(before)
            assert await t.close() == 0
    finally:
        t.kill()


@pytest.mark.timeout(240)
async def test_churn_thirty_evictions_with_writes_and_reads_between() -> None:
    t = Target(16 << 20)
    rng = random.Random(1234)
    try:
        with anyio.fail_after(200):
            await t.fill(6)
            before = t.snapshot()
            async with Manager() as m:
                proc = await m.attach(t.pid)
                total = 0
                for i in range(30):
                    with anyio.fail_after(30):
                        for _ in range(rng.randrange(1, 4)):
                            off = rng.randrange(0, t.size // PAGE) * PAGE
                            n = min(t.size - off, rng.randrange(1, 512) * PAGE)
                            await t.write(off, n, rng.randrange(256))
                        if i % 7 == 3:
                            off = rng.randrange(0, t.size // PAGE - 64) * PAGE
                            await t.zero(off, 64 * PAGE)
                        off = rng.randrange(0, t.size // PAGE - 256) * PAGE
                        assert await t.cmd("digest", off, 256 * PAGE) == t.digest(off, 256 * PAGE)
                        total += await proc.evict()
                        assert await t.cmd("digest") == t.digest(), f"round {i}"
                assert total >= 30 * 64
                await proc.release()
            t.assert_clean(before)
            assert await t.cmd("digest") == t.digest()
            assert await t.close() == 0
    finally:
        t.kill()


@pytest.mark.timeout(180)
async def test_two_targets_evicted_concurrently() -> None:
    """Sessions on two targets at once, from whatever worker threads anyio picks (each
    session is self-contained: seized, run and detached inside one call)."""
    ts = [Target(8 << 20), Target(8 << 20)]
    try:
        with anyio.fail_after(150):
            for i, t in enumerate(ts):
                await t.fill(20 + i)
            befores = [t.snapshot() for t in ts]
            async with Manager() as m:
                procs = [await m.attach(t.pid) for t in ts]

                async def churn(t: Target, proc: A.AttachedProcess, seed: int) -> None:
                    rng = random.Random(seed)
                    for _ in range(10):
                        await t.write(rng.randrange(0, 1024) * PAGE, 256 * PAGE, rng.randrange(256))
                        assert await proc.evict() > 0
                        assert await t.cmd("digest") == t.digest()

                async with anyio.create_task_group() as tg:
                    for i, (t, proc) in enumerate(zip(ts, procs, strict=True)):
                        tg.start_soon(churn, t, proc, i)
                for proc in procs:
                    await proc.release()
            for t, before in zip(ts, befores, strict=True):
                t.assert_clean(before)
                assert await t.cmd("digest") == t.digest()
                assert await t.close() == 0
    finally:
        for t in ts:
            t.kill()


# ---- threads, and a leader that is gone ------------------------------------------------------

#: A Python program with threads that keep running (one CPU-bound, one sleeping, one
#: blocked on a lock) while it answers commands; "leader-exit" ends the main thread with
#: pthread_exit, so that the injected calls run in another thread.
THREADED = r"""
import ctypes, hashlib, random, sys, threading, time
n = int(sys.argv[1])
buf = bytearray(random.Random(7).randbytes(n))
lock = threading.Lock(); lock.acquire()
def spin():
    x = 0
    while True:
        x = (x * 31 + 7) % 1000003
def nap():
    while True:
        time.sleep(0.003)
def blocked():
    lock.acquire()
for f in (spin, nap, blocked):
    threading.Thread(target=f, daemon=True).start()
def serve():
    for line in sys.stdin:
        cmd, *a = line.split()
        if cmd == "digest":
            r = hashlib.sha256(buf).hexdigest()
        elif cmd == "write":
            for p in range(int(a[0]), int(a[0]) + int(a[1]), 4096):
                buf[p] = int(a[2])
            r = "ok"
        elif cmd == "exit":
            sys.stdout.write("bye\n"); sys.stdout.flush()
            import os; os._exit(0)
        else:
            r = "?"
        sys.stdout.write(r + "\n"); sys.stdout.flush()
if sys.argv[2] == "leader-exit":
    threading.Thread(target=serve).start()
    ctypes.CDLL(None).pthread_exit(None)
serve()
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["leader", "leader-exit"])
async def test_threaded_target(mode: str) -> None:
    """Every thread's rseq area stays resident while its threads run on.  A process whose
    main thread has exited is refused clearly (the manager addresses memory by PID, which
    reaches nothing then) and left as it was."""
    size = 8 << 20
    p = subprocess.Popen(
        [sys.executable, "-c", THREADED, str(size), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    t = Target.__new__(Target)
    t.popen, t.pid, t.size = p, p.pid, size
    model = bytearray(random.Random(7).randbytes(size))
    try:
        with anyio.fail_after(150):
            assert await t.cmd("digest") == hashlib.sha256(model).hexdigest()
            if mode == "leader-exit":
                deadline = time.monotonic() + 10
                while status(t.pid)["State"][0] != "Z":  # the leader's state: gone
                    assert time.monotonic() < deadline, "the leader did not exit"
                    await anyio.sleep(0.01)
            before = t.snapshot()
            if mode == "leader-exit":
                async with Manager() as m:
                    with pytest.raises(uffdio.UffdUnsupportedError, match="main thread"):
                        await m.attach(t.pid)
                assert t.snapshot() == before and status(t.pid)["TracerPid"] == "0"
                assert await t.cmd("digest") == hashlib.sha256(model).hexdigest()
                assert await t.close() == 0
                return
            async with Manager() as m:
                proc = await m.attach(t.pid)
                threads = int(before["threads"])  # type: ignore[call-overload]
                assert len(proc.rseq_areas) in (0, threads)
                for i in range(8):
                    assert await proc.evict() > 0
                    off = (i * 97 % 1024) * PAGE
                    assert await t.cmd("write", off, 128 * PAGE, i + 1) == "ok"
                    for q in range(off, off + 128 * PAGE, PAGE):
                        model[q] = i + 1
                    assert await t.cmd("digest") == hashlib.sha256(model).hexdigest()
                await proc.release()
            assert status(t.pid)["TracerPid"] == "0"
            assert not [x for x in fds(t.pid).values() if "userfaultfd" in x]
            assert uffd_flags(t.pid) == []
            assert t.snapshot() == before
            assert await t.cmd("digest") == hashlib.sha256(model).hexdigest()
            assert await t.close() == 0
    finally:
        t.kill()


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_attach_to_a_pid_that_does_not_exist() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    with anyio.fail_after(30):
        async with Manager() as m:
            with pytest.raises(uffdio.UffdProcessGone, match=f"no process {gone.pid}"):
                await m.attach(gone.pid)
            assert m.processes == {}


@pytest.mark.timeout(60)
async def test_attach_to_a_zombie() -> None:
    """Exited but not reaped yet (our own child): gone, clearly, and its status stays ours."""
    z = subprocess.Popen(["sh", "-c", "exit 3"])
    deadline = time.monotonic() + 10
    while status(z.pid)["State"][0] != "Z":
        assert time.monotonic() < deadline
        await anyio.sleep(0.01)
    with anyio.fail_after(30):
        async with Manager() as m:
            with pytest.raises(uffdio.UffdProcessGone, match=str(z.pid)):
                await m.attach(z.pid)
    assert z.wait(timeout=10) == 3


@pytest.mark.timeout(60)
async def test_attach_to_self_and_twice() -> None:
    t = Target(4 << 20)
    try:
        with anyio.fail_after(45):
            await t.fill(8)
            async with Manager() as m:
                with pytest.raises(uffdio.UffdError, match="itself"):
                    await m.attach(os.getpid())
                proc = await m.attach(t.pid)
                with pytest.raises(uffdio.UffdError, match="already managed"):
                    await m.attach(t.pid)
                await proc.release()
            t.assert_clean()
            assert await t.close() == 0
    finally:
        t.kill()


def _tracer_process(pid: int) -> subprocess.Popen[bytes]:
    """Something else that traces ``pid``: strace if installed, else a small Python process
    that holds it with PTRACE_SEIZE."""
    if shutil.which("strace"):
        return subprocess.Popen(
            ["strace", "-qq", "-o", "/dev/null", "-p", str(pid)], stderr=subprocess.DEVNULL
        )
    code = (
        "import ctypes, sys, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]\n"
        f"assert libc.ptrace(0x4206, {pid}, None, None) == 0, ctypes.get_errno()\n"
        "time.sleep(3600)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


@pytest.mark.timeout(90)
async def test_attach_to_a_process_traced_by_another_tracer() -> None:
    t = Target(4 << 20)
    tracer = None
    try:
        with anyio.fail_after(75):
            digest = await t.fill(9)
            before = t.snapshot()
            tracer = _tracer_process(t.pid)
            deadline = time.monotonic() + 20
            while status(t.pid)["TracerPid"] != str(tracer.pid):
                assert time.monotonic() < deadline, "the tracer did not attach"
                await anyio.sleep(0.02)
            name = Path(f"/proc/{tracer.pid}/comm").read_text().strip()
            async with Manager() as m:
                with pytest.raises(uffdio.UffdPermissionError) as ei:
                    await m.attach(t.pid)
                msg = str(ei.value)
                assert f"traced by pid {tracer.pid}" in msg and name in msg, msg
                assert m.processes == {}
                # the same from the session itself (a tracer that came in after the check)
                with pytest.raises(uffdio.UffdPermissionError, match=f"pid {tracer.pid}"):
                    await anyio.to_thread.run_sync(A.inject, t.pid, [(39,)])
            # left running and intact, still the other tracer's
            assert status(t.pid)["TracerPid"] == str(tracer.pid)
            assert await t.cmd("digest") == digest
            tracer.terminate()
            tracer.wait(timeout=20)
            deadline = time.monotonic() + 20
            while status(t.pid)["TracerPid"] != "0":
                assert time.monotonic() < deadline
                await anyio.sleep(0.02)
            t.assert_clean(before)
            # and once it is gone, attaching works
            async with Manager() as m:
                proc = await m.attach(t.pid)
                assert await proc.evict() > 0
                await proc.release()
            t.assert_clean(before)
            assert await t.cmd("digest") == digest
            assert await t.close() == 0
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.wait(timeout=10)
        t.kill()


@pytest.mark.timeout(180)
async def test_process_exiting_during_attach() -> None:
    """Targets that exit on their own, or are killed, at random points of attach/evict:
    a clear UffdProcessGone or success, never a hang; the manager stays usable."""
    outcomes: dict[str, int] = {}
    rng = random.Random(42)
    with anyio.fail_after(150):
        async with Manager() as m:
            for i in range(24):
                if i % 2:
                    p = subprocess.Popen(["sleep", f"{rng.uniform(0.0, 0.03):.4f}"])
                    killer = None
                else:
                    p = subprocess.Popen(["sleep", "30"])
                    delay = rng.uniform(0.0, 0.004)
                    killer = threading.Timer(delay, os.kill, (p.pid, signal.SIGKILL))
                    killer.start()
                try:
                    with anyio.fail_after(20):
                        proc = await m.attach(p.pid)
                        await proc.evict()
                        await proc.release()
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                except uffdio.UffdProcessGone as exc:
                    assert str(p.pid) in str(exc) or "exited" in str(exc), exc
                    outcomes["gone"] = outcomes.get("gone", 0) + 1
                finally:
                    if killer is not None:
                        killer.join()
                    p.kill()
                    p.wait(timeout=10)  # only after the sessions: never during one
                deadline = time.monotonic() + 10
                while p.pid in m.processes and not m.processes[p.pid].exited:
                    assert time.monotonic() < deadline, "an exited target stays managed"
                    await anyio.sleep(0.01)
            assert outcomes.get("gone", 0) > 0, outcomes
            # still usable
            t = Target(4 << 20)
            try:
                digest = await t.fill(10)
                proc = await m.attach(t.pid)
                assert await proc.evict() > 0
                assert await t.cmd("digest") == digest
                await proc.release()
                t.assert_clean()
                assert await t.close() == 0
            finally:
                t.kill()


@pytest.mark.timeout(120)
async def test_target_that_execs_while_attached() -> None:
    """After exec the process is another program: its fds and mappings are not ours, so
    nothing may be closed or unmapped there.  The next session says so (UffdProcessGone),
    release() is a no-op, and the new program runs untouched."""
    script = f'read x; exec "{sys.executable}" "{PROGS / "pytarget.py"}" {4 << 20}'
    p = subprocess.Popen(
        ["/bin/sh", "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    t = Target.__new__(Target)
    t.popen, t.pid, t.size, t.model = p, p.pid, 4 << 20, bytearray(4 << 20)
    try:
        with anyio.fail_after(90):
            async with Manager() as m:
                proc = await m.attach(t.pid)
                await proc.evict()
                assert p.stdin is not None
                p.stdin.write("go\n")  # sh execs pytarget, which then answers on the same pipes
                p.stdin.flush()
                digest = await t.fill(12)
                with pytest.raises(uffdio.UffdProcessGone, match="exec"):
                    await proc.evict()
                assert t.pid not in m.processes
                await proc.release()  # nothing to do, nothing done
            t.assert_clean()
            assert await t.cmd("digest") == digest
            assert await t.close() == 0
    finally:
        t.kill()


# ---- another thread of the manager's process waits for the target ----------------------------


@pytest.mark.timeout(120)
async def test_a_thread_waiting_for_the_target_does_not_hang_attach() -> None:
    """The kernel hands a tracee's ptrace stops to any thread of the tracer's process that
    waits for it (here: a blocking waitpid, as Popen.wait() or asyncio's child watcher would
    do).  The injector must notice the stolen stops and carry on."""
    t = Target(8 << 20)
    seen: list[int] = []

    def waiter() -> None:
        while True:
            try:
                _, st = os.waitpid(t.pid, 0)
            except ChildProcessError:
                return
            seen.append(st)
            if not os.WIFSTOPPED(st):
                return

    try:
        with anyio.fail_after(90):
            digest = await t.fill(11)
            th = threading.Thread(target=waiter, daemon=True)
            th.start()
            async with Manager() as m:
                proc = await m.attach(t.pid)
                for _ in range(3):
                    assert await proc.evict() > 0
                    assert await t.cmd("digest") == digest
                await proc.release()
            assert any(os.WIFSTOPPED(s) for s in seen), "no stop was stolen: test is moot"
            t.assert_clean()
            assert await t.cmd("exit") == "bye"
            await anyio.to_thread.run_sync(th.join, 20)
            assert seen and os.WIFEXITED(seen[-1]) and os.WEXITSTATUS(seen[-1]) == 0
    finally:
        reaped = bool(seen) and not os.WIFSTOPPED(seen[-1])
        if reaped:
            t.popen.returncode = os.waitstatus_to_exitcode(seen[-1])  # the waiter took it
        else:
            try:
                os.kill(t.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await anyio.to_thread.run_sync(th.join, 20)
        t.kill()


# ---- the pieces -----------------------------------------------------------------------------


def test_without_and_split_at() -> None:
    pinned = frozenset({0x5000, 0x9000})
    pieces, left = A._without(0x4000, 0x100000, 0x8000, pinned)
    assert left == 2
    assert pieces == [
        (0x4000, 0x100000, 0x1000),
        (0x6000, 0x102000, 0x3000),
        (0xA000, 0x106000, 0x2000),
    ]
    assert A._without(0x1000, 0x2000, 0x1000, pinned) == ([(0x1000, 0x2000, 0x1000)], 0)
    assert A._without(0x5000, 0x2000, 0x1000, pinned) == ([], 1)
    assert A._split_at(0x1000, 0x80000, 0x5000, [0x1000, 0x3000, 0x4000, 0x9000]) == [
        (0x1000, 0x80000, 0x2000),
        (0x3000, 0x82000, 0x1000),
        (0x4000, 0x83000, 0x2000),
    ]
    assert A._pages_of([(0x1FF0, 32)]) == {0x1000, 0x2000}


def test_rseq_query_matches_the_target() -> None:
    """The pseudo-call reports the leader's rseq area: glibc keeps it at
    thread pointer + __rseq_offset, which the target can tell us itself."""
    code = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None)\n"
        "try:\n"
        "    off = ctypes.c_ssize_t.in_dll(libc, '__rseq_offset').value\n"
        "    size = ctypes.c_uint.in_dll(libc, '__rseq_size').value\n"
        "except ValueError:\n"
        "    print(-1, flush=True); sys.stdin.read(); sys.exit()\n"
        "libc.syscall.restype = ctypes.c_long\n"
        "fs = ctypes.c_ulong()\n"
        "assert libc.syscall(158, 0x1003, ctypes.byref(fs)) == 0\n"  # arch_prctl(ARCH_GET_FS)
        "print(fs.value + off if size else 0, flush=True)\n"
        "sys.stdin.read()\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None
        want = int(p.stdout.readline())
        if want < 0:
            pytest.skip("this glibc does not export __rseq_offset (older than 2.35)")
        areas: list[tuple[int, int]] = []
        assert A.inject(p.pid, [(39,)], areas) == [p.pid]  # getpid
        if want:
            assert areas[0][0] == want and areas[0][1] >= 20
        else:
            assert areas == []
        assert status(p.pid)["TracerPid"] == "0"
    finally:
        p.kill()
        p.wait(timeout=10)
