"""Managing other processes through the agent: spawn, evict, every memory event, exit,
a killed manager, bad input.  Real programs, real uffds; every byte checked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from conftest import line_cmd, requires

import uffdio
from uffdio.manage import Manager

pytestmark = [pytest.mark.anyio, requires(uffdio.Feature.MOVE, kernel=(6, 8))]

HERE = Path(__file__).parent
PROGS = HERE / "progs"
PAGE = 4096
UFFDIO = [sys.executable, "-m", "uffdio"]
#: an interpreter another user can run (the venv's may live under /root)
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="session")
def memtest(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bin") / "memtest"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-pthread", "-o", str(out), str(PROGS / "memtest.c")], check=True
    )
    return str(out)


class Prog:
    """A tests/progs/pytarget.py process started by a Manager."""

    def __init__(
        self, m: Manager, size: int = 16 << 20, python: str = sys.executable, **kw: object
    ) -> None:
        self.spawned = m.spawn(
            [python, str(PROGS / "pytarget.py"), str(size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            **kw,
        )
        self.popen = self.spawned.popen

    async def cmd(self, *args: object, timeout: float = 30) -> str:
        return await line_cmd(self.popen, *args, timeout=timeout)

    async def close(self) -> int:
        await self.cmd("exit")
        rc = await self.spawned.wait()
        self.popen.stdin.close()
        self.popen.stdout.close()
        return rc


def region_of(proc: uffdio.ManagedProcess, addr: int) -> tuple[int, int]:
    for s, n in proc.regions:
        if s <= addr < s + n:
            return s, n
    raise AssertionError(f"{addr:#x} not registered: {proc.regions}")


def rules(proc: uffdio.ManagedProcess, kind: int) -> int:
    from uffdio._lib import ffi, lib

    e = proc.uffd._engine_handle()
    out = ffi.new("uint64_t[]", 4 * max(1, lib.uf_rules_count(e)))
    n = lib.uf_rules_list(e, kind, out, lib.uf_rules_count(e))
    return sum((out[4 * i + 1] - out[4 * i]) // PAGE for i in range(n))


# ---- the API ------------------------------------------------------------------------------


async def test_spawn_evict_and_read_back() -> None:
    """Every resident page of the region is moved out (the kernel's RSS drops), and every
    byte comes back on access."""
    async with Manager() as m:
        prog = Prog(m, 32 << 20)
        proc = await prog.spawned.process()
        addr, digest = (await prog.cmd("fill", 1)).split()
        rss_before = int(await prog.cmd("rss"))
        await proc.scan()
        region_of(proc, int(addr))
        n = await proc.evict([(int(addr), 32 << 20)])
        assert n == (32 << 20) // PAGE  # all of it: nothing shared, nothing pinned
        rss_after = int(await prog.cmd("rss"))
        assert rss_before - rss_after >= 30 << 10  # KiB: the kernel freed the pages
        assert await prog.cmd("digest") == digest
        st = proc.statistics()
        assert st["pages_evicted"] == n and st["faults"] >= n // 16
        assert await prog.close() == 0


async def test_evict_twice_and_writes_between() -> None:
    """Re-evicting pages that came back and were written stores the new contents."""
    async with Manager() as m:
        prog = Prog(m, 8 << 20)
        proc = await prog.spawned.process()
        addr, _ = (await prog.cmd("fill", 2)).split()
        await proc.evict()
        await prog.cmd("write", 0, 4 << 20, 7)
        want = await prog.cmd("digest")
        assert await proc.evict() > 0
        assert await prog.cmd("digest") == want
        await prog.close()


async def test_madvise_dontneed_of_evicted_pages_reads_zeros() -> None:
    """The application's own discard voids the saved copy: zeros, as the kernel promises."""
    async with Manager() as m:
        prog = Prog(m, 8 << 20)
        proc = await prog.spawned.process()
        await prog.cmd("fill", 3)
        rest = await prog.cmd("digest", 4 << 20, 4 << 20)
        await proc.evict()
        assert await prog.cmd("zero", 0, 4 << 20) == "0"
        assert await prog.cmd("iszero", 0, 4 << 20) == "1"
        assert await prog.cmd("digest", 4 << 20, 4 << 20) == rest
        await prog.close()


async def test_mremap_moves_evicted_pages() -> None:
    """Evicted pages moved by mremap come back at the new address."""
    async with Manager() as m:
        prog = Prog(m, 8 << 20)
        proc = await prog.spawned.process()
        addr, digest = (await prog.cmd("fill", 4)).split()
        assert await proc.evict() >= (8 << 20) // PAGE
        new = int(await prog.cmd("mremap", 64 << 20))  # grow: the kernel moves it
        assert new != int(addr)
        assert await prog.cmd("digest", 0, 8 << 20) == digest
        assert await prog.cmd("iszero", 8 << 20, 56 << 20) == "1"
        await prog.close()


async def test_munmap_drops_saved_pages() -> None:
    async with Manager() as m:
        prog = Prog(m, 8 << 20)
        proc = await prog.spawned.process()
        await prog.cmd("fill", 5)
        head = await prog.cmd("digest", 0, 4 << 20)
        await proc.evict()
        held = rules(proc, 2)
        assert await prog.cmd("munmap", 4 << 20, 4 << 20) == "0"
        await anyio.sleep(0.05)
        assert rules(proc, 2) <= held - 1024  # the unmapped half's copies are gone
        assert await prog.cmd("digest", 0, 4 << 20) == head
        await prog.close()


async def test_fork_child_reads_evicted_pages() -> None:
    """A child forked while pages are evicted reads the parent's data; its own writes stay
    in the child; it is managed too (its own uffd, matched to its pid)."""
    async with Manager() as m:
        prog = Prog(m, 8 << 20)
        proc = await prog.spawned.process()
        _, digest = (await prog.cmd("fill", 6)).split()
        await proc.evict()
        child_digest, status, parent_digest = (await prog.cmd("fork")).split()
        assert child_digest == digest and status == "0" and parent_digest == digest
        st = m.statistics()
        assert st["processes"] == 2, st["per_process"]
        assert not st["unmanaged"]
        await prog.close()


async def test_release_gives_the_process_back() -> None:
    """release(): evicted pages come back first, then nothing stays registered."""
    async with Manager() as m:
        prog = Prog(m, 8 << 20)
        proc = await prog.spawned.process()
        _, digest = (await prog.cmd("fill", 7)).split()
        await proc.evict()
        await proc.release()
        smaps = Path(f"/proc/{prog.spawned.pid}/smaps").read_text()
        flags = [ln for ln in smaps.splitlines() if ln.startswith("VmFlags")]
        assert not any(" um" in f for f in flags)  # no uffd-missing mapping left
        assert await prog.cmd("digest") == digest
        await prog.close()


async def test_python_program_starts_agent_itself(tmp_path: Path) -> None:
    """A Python program that cooperates without LD_PRELOAD (uffdio.agent.start)."""
    sock = str(tmp_path / "m.sock")
    async with Manager(sock) as m:
        env = dict(os.environ, PYTHONPATH=str(Path(uffdio.__file__).parent.parent))
        p = subprocess.Popen(
            [sys.executable, str(PROGS / "pytarget.py"), str(4 << 20)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        try:

            async def cmd(*a: object) -> str:
                p.stdin.write(" ".join(map(str, a)) + "\n")
                p.stdin.flush()
                with anyio.fail_after(30):
                    return (
                        await anyio.to_thread.run_sync(p.stdout.readline, abandon_on_cancel=True)
                    ).strip()

            _, digest = (await cmd("fill", 8)).split()
            assert await cmd("agent", sock) == "ok"
            proc = await m.wait_process(p.pid)
            assert await proc.evict() >= (4 << 20) // PAGE
            assert await cmd("digest") == digest
            assert await cmd("agent-stop") == "ok"  # released: pages back, unregistered
            assert await cmd("digest") == digest
            assert await cmd("exit") == "bye"
        finally:
            p.kill()
            p.wait()


async def test_exit_frees_everything() -> None:
    """After the program exits: no process left in the manager, no zombie, no fd leak."""
    fds_before = len(os.listdir("/proc/self/fd"))
    pids = []
    async with Manager() as m:
        for _ in range(3):
            prog = Prog(m, 4 << 20)
            proc = await prog.spawned.process()
            await prog.cmd("fill", 9)
            await proc.evict()
            assert await prog.close() == 0
            pid = proc.pid
            pids.append(pid)
            await _until(lambda: pid not in m.processes, "retire")  # noqa: B023
        assert m.processes == {}
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    # this test's programs are reaped (other tests' children are not this test's business)
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            assert state != "Z", f"{pid} is a zombie"


async def _until(pred, what: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.01)


# ---- uffdio run -----------------------------------------------------------------------------


def run(args: list[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(UFFDIO + args, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.parametrize("churn", [None, "0.02"], ids=["plain", "churn"])
def test_run_memtest(memtest: str, tmp_path: Path, churn: str | None) -> None:
    """The C test program (malloc, realloc/mremap, mmap, munmap, madvise, threads, fork,
    exec) under `uffdio run`, optionally with every page evicted every 20 ms."""
    stats = tmp_path / "s.json"
    extra = ["--churn", churn] if churn else []
    r = run(["run", "--stats-json", str(stats), *extra, "--", memtest, "24", "8", "fet"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("memtest ok") == 2, r.stdout  # itself and its exec'd child
    s = json.loads(stats.read_text())
    assert s["exit_code"] == 0 and s["processes"] >= 3 and not s["unmanaged"]
    assert s["faults"] > 0 and s["pages_registered"] > 0
    assert s["peak_resident_bytes"] > 24 << 20
    if churn:
        assert s["pages_evicted"] > 0


def test_run_exit_status_and_missing_command() -> None:
    assert run(["run", "-q", "--", "sh", "-c", "exit 7"]).returncode == 7
    r = run(["run", "--", "/nonexistent/prog"])
    assert r.returncode != 0 and "command not found" in r.stderr
    assert "PATH" in r.stderr and "unmapped" not in r.stderr  # the fix for this cause
    r = run(["run"])
    assert r.returncode != 0 and "no command given" in r.stderr


def test_run_forwards_signals() -> None:
    p = subprocess.Popen(
        UFFDIO + ["run", "-q", "--", "sleep", "30"], stderr=subprocess.PIPE, start_new_session=True
    )
    time.sleep(1.5)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == -signal.SIGTERM  # CMD died of it, and so did uffdio run


# ---- a manager killed with SIGKILL ---------------------------------------------------------


@pytest.mark.slow
def test_killed_manager_resumes(memtest: str, tmp_path: Path) -> None:
    """SIGKILL the manager while the target faults: the target waits (no zero page), a
    restarted manager on the same socket takes over with the evicted pages, the target
    finishes with every byte right."""
    sock = str(tmp_path / "m.sock")
    serve = UFFDIO + ["serve", "--socket", sock, "--churn", "0.02"]
    first = subprocess.Popen(serve, stderr=subprocess.PIPE, text=True)
    env = dict(os.environ, UFFDIO_AGENT_SOCK=sock, LD_PRELOAD=uffdio.agent.library_path())
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert time.monotonic() < deadline, "the manager did not start"
        time.sleep(0.05)
    target = subprocess.Popen(
        [memtest, "24", "40", "t"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)  # evicting
        first.kill()
        first.wait()
        time.sleep(1.0)
        assert target.poll() is None
        wchan = {
            Path(f"/proc/{target.pid}/task/{t}/wchan").read_text()
            for t in os.listdir(f"/proc/{target.pid}/task")
        }
        assert "handle_userfault" in wchan  # waiting, not reading zeros
        stats = tmp_path / "s.json"
        second = subprocess.run(
            serve + ["--exit-when-idle", "--stats-json", str(stats)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 0, second.stderr
        out, err = target.communicate(timeout=60)
        assert target.returncode == 0, err
        assert "memtest ok" in out
        s = json.loads(stats.read_text())
        assert s["recovered_pages"] > 0
    finally:
        target.kill()
        first.kill()


EVICTING_MANAGER = """
import sys

import anyio

from uffdio import Manager


async def main():
    async with Manager(sys.argv[1]) as m:
        pid = int(await anyio.to_thread.run_sync(sys.stdin.readline))
        proc = await m.wait_process(pid)
        await proc.scan()
        print(await proc.evict(), flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


@pytest.mark.parametrize("event", ["mremap", "zero"])
def test_killed_manager_after_an_event_on_evicted_pages(tmp_path: Path, event: str) -> None:
    """A manager evicts a region (the plain path: rules and a memfd store), the program
    then moves it with mremap (or discards half of it), and the manager is killed.  The
    successor rebuilds the rules from the recovery snapshot, which must say where the
    evicted pages are now: every byte at the new address as it was (not zeros), and the
    discarded half zeros (not its old contents)."""
    import hashlib
    import random

    size = 4 << 20
    sock = str(tmp_path / "m.sock")
    m1 = subprocess.Popen(
        [sys.executable, "-c", EVICTING_MANAGER, sock],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert m1.poll() is None and time.monotonic() < deadline, "the manager did not start"
        time.sleep(0.05)
    env = dict(os.environ, UFFDIO_AGENT_SOCK=sock, LD_PRELOAD=uffdio.agent.library_path())
    target = subprocess.Popen(
        [sys.executable, str(PROGS / "pytarget.py"), str(size)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    m2 = None
    try:

        def cmd(*args: object) -> str:
            assert target.stdin and target.stdout
            target.stdin.write(" ".join(map(str, args)) + "\n")
            target.stdin.flush()
            return target.stdout.readline().strip()

        _, digest = cmd("fill", 61).split()
        data = random.Random(61).randbytes(size)
        assert hashlib.sha256(data).hexdigest() == digest
        assert m1.stdin and m1.stdout
        m1.stdin.write(f"{target.pid}\n")
        m1.stdin.flush()
        assert int(m1.stdout.readline()) >= size // 4096  # all of it evicted
        if event == "mremap":
            cmd("mremap", 2 * size)  # bigger: the kernel moves it elsewhere
            want = hashlib.sha256(data + bytes(size)).hexdigest()
        else:
            assert cmd("zero", 0, size // 2) == "0"
            want = hashlib.sha256(bytes(size // 2) + data[size // 2 :]).hexdigest()
        time.sleep(0.5)  # the event is read and recorded
        m1.kill()
        m1.wait()
        m2 = subprocess.Popen(UFFDIO + ["serve", "--socket", sock], stderr=subprocess.PIPE)
        assert cmd("digest") == want
    finally:
        target.kill()
        m1.kill()
        if m2 is not None:
            m2.kill()
            m2.wait()


# ---- bad input ---------------------------------------------------------------------------


async def test_socket_path_taken(tmp_path: Path) -> None:
    sock = str(tmp_path / "m.sock")
    async with Manager(sock):
        with pytest.raises(uffdio.UffdError, match="another manager is listening"):
            async with Manager(sock):
                pass
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(uffdio.UffdError, match="is not a socket"):
        async with Manager(str(f)):
            pass
    assert f.read_text() == "x"  # left alone


async def test_stale_socket_is_taken_over(tmp_path: Path) -> None:
    sock = str(tmp_path / "m.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(sock)
    s.close()  # a dead manager's socket file
    async with Manager(sock) as m:
        prog = Prog(m, 1 << 20)
        await prog.spawned.process()
        await prog.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a program as another user")
async def test_other_users_process_is_refused() -> None:
    """A manager that may not manage other users' processes refuses them, clearly; the
    program runs on, unmanaged and intact."""
    async with Manager(allow_other_users=False) as m:
        os.chmod(os.path.dirname(m.socket_path), 0o755)
        os.chmod(m.socket_path, 0o777)
        prog = Prog(m, 1 << 20, python=SYSTEM_PYTHON, user=65534, group=65534, cwd="/")
        _, digest = (await prog.cmd("fill", 10)).split()
        assert await prog.cmd("digest") == digest
        assert await prog.close() == 0
        assert m.refused and "belongs to uid 65534" in m.refused[0][1]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a program as another user")
async def test_unprivileged_process_is_left_unmanaged_with_reason() -> None:
    """A process that may not create a kernel-mode uffd (vm.unprivileged_userfaultfd=0)
    is reported, not half-managed (a user-mode-only uffd would break its syscalls)."""
    if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() != "0":
        pytest.skip("vm.unprivileged_userfaultfd is 1 here")
    async with Manager(allow_other_users=True) as m:
        os.chmod(os.path.dirname(m.socket_path), 0o755)
        prog = Prog(m, 1 << 20, python=SYSTEM_PYTHON, user=65534, group=65534, cwd="/")
        proc = await prog.spawned.process()
        assert not proc.managed
        assert "vm.unprivileged_userfaultfd" in (proc.unmanaged_reason or "")
        _, digest = (await prog.cmd("fill", 11)).split()
        assert await prog.cmd("digest") == digest
        assert await prog.close() == 0


def test_agent_path_and_cli_help() -> None:
    r = run(["agent-path"])
    assert r.returncode == 0 and os.path.exists(r.stdout.strip())
    assert shutil.which("gcc")


async def test_fork_without_event_fork_uses_the_fence() -> None:
    """Without EVENT_FORK (a program without CAP_SYS_PTRACE, here forced with
    UFFDIO_AGENT_NO_EVENT_FORK=1) the agent's fork() has every evicted page brought back
    first (the fence), so the child, whose ranges the kernel does not register, reads the
    parent's data - never zeros - and eviction resumes after fork() returns."""
    async with Manager() as m:
        env = dict(os.environ, UFFDIO_AGENT_NO_EVENT_FORK="1")
        prog = Prog(m, 4 << 20, env=env)
        proc = await prog.spawned.process()
        assert proc.managed and not proc.event_fork
        _, digest = (await prog.cmd("fill", 12)).split()
        assert await proc.evict() >= (4 << 20) // PAGE
        child_digest, status, parent_digest = (await prog.cmd("fork")).split()
        assert (child_digest, status, parent_digest) == (digest, "0", digest)
        assert proc.stats["fences"] == 1
        assert proc.stats["pages_swapped_in_for_fork"] >= (4 << 20) // PAGE - 16
        assert await proc.evict() > 0  # the fence was lifted after fork() returned
        assert await prog.cmd("digest") == digest
        st = m.statistics()
        assert st["processes"] == 2 and not st["unmanaged"]  # the child: its own agent
        assert await prog.close() == 0


def test_c_program_links_the_agent(tmp_path: Path) -> None:
    """A C program that links the agent and calls uffdio_agent_start() itself."""
    src = tmp_path / "linked.c"
    src.write_text(
        r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "uffdio_agent.h"
int main(int argc, char **argv) {
    size_t n = 8 << 20;
    unsigned char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int rc = uffdio_agent_start(argv[1]);
    if (rc) { fprintf(stderr, "start: %d\n", rc); return 2; }
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 7 + i / 4096);
    printf("ready\n"); fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 3;
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(i * 7 + i / 4096)) { printf("bad %zu\n", i); return 1; }
    rc = uffdio_agent_stop();
    printf("ok %d\n", rc);
    return rc ? 4 : 0;
}
"""
    )
    lib = Path(uffdio.agent.library_path())
    exe = tmp_path / "linked"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-o",
            str(exe),
            str(src),
            f"-I{HERE.parent / 'csrc'}",
            str(lib),
            f"-Wl,-rpath,{lib.parent}",
        ],
        check=True,
    )

    async def main() -> None:
        async with Manager(str(tmp_path / "m.sock")) as m:
            p = subprocess.Popen(
                [str(exe), m.socket_path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
            try:
                with anyio.fail_after(30):
                    line = await anyio.to_thread.run_sync(p.stdout.readline, abandon_on_cancel=True)
                    assert line == "ready\n"
                    proc = await m.wait_process(p.pid)
                    assert await proc.evict() >= (8 << 20) // PAGE
                    p.stdin.write("go\n")
                    p.stdin.flush()
                    out = await anyio.to_thread.run_sync(p.stdout.read, abandon_on_cancel=True)
                assert out == "ok 0\n"
                assert await anyio.to_thread.run_sync(p.wait) == 0
            finally:
                p.kill()
                p.wait()

    anyio.run(main)


async def test_program_with_its_own_userfaultfd() -> None:
    """A program that registers part of its memory with a uffd of its own: the agent's uffd
    yields that range (its evicted pages are brought back first), the program's
    registration succeeds, its data is intact, and uffdio never evicts from it again."""
    async with Manager() as m:
        prog = Prog(m, 8 << 20)
        proc = await prog.spawned.process()
        addr, digest = (await prog.cmd("fill", 13)).split()
        assert await proc.evict() >= (8 << 20) // PAGE
        fd, api_rc, reg_rc, _err = (await prog.cmd("ownuffd", 0, 4 << 20)).split()
        assert int(fd) >= 0 and api_rc == "0" and reg_rc == "0"
        assert await prog.cmd("digest") == digest
        assert proc.stats["yielded_pages"] == (4 << 20) // PAGE
        await proc.evict()
        present = proc.present_ranges([(int(addr), 4 << 20)])
        assert sum(n for _, n in present) == 4 << 20  # the program's range stays resident
        assert await prog.cmd("digest") == digest
        assert await prog.close() == 0


async def test_evict_fragmented_residency() -> None:
    """Thousands of separate resident runs (every other page faulted back): the page map
    is walked completely and no page is held or moved twice."""
    async with Manager() as m:
        prog = Prog(m, 16 << 20)
        proc = await prog.spawned.process()
        addr, digest = (await prog.cmd("fill", 14)).split()
        await proc.evict()
        await prog.cmd("touch", 0, 16 << 20, 2 * PAGE)  # 2048 runs of one page
        runs = proc.present_ranges([(int(addr), 16 << 20)])
        assert len(runs) >= 2000  # sorted and apart:
        assert all(a[0] + a[1] < b[0] for a, b in zip(runs, runs[1:], strict=False))
        assert await proc.evict([(int(addr), 16 << 20)]) >= 2000
        assert await prog.cmd("digest") == digest
        assert await prog.close() == 0


def test_run_releases_descendants_that_outlive_the_command(tmp_path: Path) -> None:
    """CMD exits while a child it started runs on: before `uffdio run` exits, that child's
    evicted pages are brought back and it is given back; it finishes with every byte right."""
    res = tmp_path / "result"
    script = (
        "import hashlib, os, time\n"
        "b = bytearray(os.urandom(8 << 20)); h = hashlib.sha256(b).hexdigest()\n"
        f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
        "time.sleep(3)\n"
        f"open({str(res)!r}, 'w').write('ok' if hashlib.sha256(b).hexdigest() == h else 'BAD')\n"
    )
    (tmp_path / "bg.py").write_text(script)
    # the command waits until its background child has memory, then exits at once
    cmd = (
        f"{SYSTEM_PYTHON} {tmp_path / 'bg.py'} & "
        f"while [ ! -e {tmp_path / 'ready'} ]; do sleep 0.05; done; sleep 0.5"
    )
    r = run(
        ["run", "--churn", "0.05", "--stats-json", str(tmp_path / "s.json"), "--", "sh", "-c", cmd]
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["pages_evicted"] > 0
    deadline = time.monotonic() + 20
    while not res.exists():
        assert time.monotonic() < deadline, "the background child did not finish"
        time.sleep(0.1)
    time.sleep(0.1)
    assert res.read_text() == "ok"


def test_recovery_snapshots_are_taken_only_whole() -> None:
    """The two snapshot memfds are written in place, in turn: a successor takes the whole
    one with the higher number, so a manager killed in the middle of a write leaves the
    other one.  A snapshot of a manager from before (one memfd each) counts as number 0."""
    import array

    from uffdio.manage import SNAP_MAGIC, SNAP_MAGIC2, _parse_snapshot

    body = [0x1000, 0x3000, 7, 0x40, 0x5000, 0x6000, 7, 0x80]
    new = array.array("Q", [SNAP_MAGIC2, 2, (9 + sum(body)) % (1 << 64), 9, *body]).tobytes()
    got = _parse_snapshot(new)
    assert got is not None and got[0] == 9 and list(got[1]) == body
    assert _parse_snapshot(new + b"stale tail of a longer one") is not None
    assert _parse_snapshot(new[:-8]) is None  # torn: an entry missing
    torn = bytearray(new)
    torn[-8:] = bytes(8)  # torn: the last entry not written yet
    assert _parse_snapshot(bytes(torn)) is None
    assert _parse_snapshot(b"") is None
    old = array.array("Q", [SNAP_MAGIC, 2, sum(body) % (1 << 64), *body]).tobytes()
    got = _parse_snapshot(old)
    assert got is not None and got[0] == 0 and list(got[1]) == body


async def test_both_snapshot_memfds_are_whole_from_the_start() -> None:
    """The agent gets its two snapshot memfds with a whole snapshot in each: a manager
    killed before its first write after them must not leave a successor two empty ones
    (it would refuse the process, whose threads would then wait for ever)."""
    from uffdio.manage import _parse_snapshot

    async with Manager() as m:
        prog = Prog(m, 1 << 20)
        proc = await prog.spawned.process()
        await prog.cmd("fill", 3)
        fds = [
            f"/proc/{proc.pid}/fd/{fd}"
            for fd in os.listdir(f"/proc/{proc.pid}/fd")
            if "uffdio-state" in os.readlink(f"/proc/{proc.pid}/fd/{fd}")
        ]
        assert len(fds) == 2, fds
        for path in fds:
            with open(path, "rb") as f:
                assert _parse_snapshot(f.read()) is not None
        assert await prog.close() == 0


def _threads() -> int:
    """The fault engines' threads of this process (Python's worker threads come and go)."""
    n = 0
    for t in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{t}/comm") as f:
            n += f.read().strip() == "uffdio-engine"
    return n


async def test_fork_event_uffds_of_children_that_never_said_hello_are_closed_when_they_exit() -> (
    None
):
    """Children made by _Fork (no agent runs in them, so they never say hello) are served
    by their fork-event uffd, with the rules and page table their parent had: alive, they
    read the parent's evicted data, however many times the manager looked for gone ones
    meanwhile.  Once they exited, their uffds, engine threads and page tables are closed
    (before, they stayed until the manager ended)."""
    async with Manager() as m:
        m.orphan_interval = 0.05
        prog = Prog(m, 4 << 20)
        proc = await prog.spawned.process()
        await prog.cmd("fill", 21)
        want = await prog.cmd("digest")
        threads = _threads()
        await proc.evict()
        assert (await prog.cmd("rawfork", 4, 0.5)).split() == ["0"] * 4
        deadline = time.monotonic() + 10
        while m.statistics()["orphans"]:
            assert time.monotonic() < deadline, m.statistics()
            await anyio.sleep(0.05)
        assert m.statistics()["orphans_reaped"] == 4
        assert _threads() <= threads
        assert await prog.cmd("digest") == want
        # a child forked the usual way afterwards is matched and reads the data
        child_digest, status, parent_digest = (await prog.cmd("fork")).split()
        assert status == "0" and child_digest == parent_digest
        assert await prog.close() == 0


async def test_children_forked_together_are_each_matched() -> None:
    """Eight children forked back to back while pages are evicted: each reads the parent's
    data and each is matched to its own uffd (none left unmanaged)."""
    async with Manager() as m:
        prog = Prog(m, 4 << 20)
        proc = await prog.spawned.process()
        await prog.cmd("fill", 15)
        await proc.evict()
        assert (await prog.cmd("forkmany", 8)).split() == ["0"] * 8
        st = m.statistics()
        assert not st["unmanaged"], st["unmanaged"]
        assert st["processes"] == 9
        assert await prog.close() == 0
