"""Userspace swap (uffdio.swap): the C page table and stores, eviction and swap-in, the
limit, and `uffdio run --limit`.  Real processes, real uffds, every byte checked."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from conftest import requires
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_manage import Prog

import uffdio
from uffdio import Manager
from uffdio._lib import ffi, lib
from uffdio.swap import FileStore, MemoryStore, PyStore, Swap, open_store, parse_size

PAGE = 4096
PROGS = Path(__file__).parent / "progs"
NONE, CLEAN, TRANSIT, EVICTED, ZERO = range(5)

pytestmark = [pytest.mark.anyio, requires(uffdio.Feature.MOVE, root=True, kernel=(6, 8))]


def states(sw: Swap, proc: uffdio.ManagedProcess, addr: int, n: int) -> list[int]:
    pt = sw.procs[proc.pid].pt
    slot = ffi.new("uint64_t *")
    return [lib.uf_pt_state(pt, addr + i * PAGE, slot) for i in range(n)]


def _scratch_entries(pid: int) -> int:
    """How many runs in transit (in the scratch area) the newest whole recovery snapshot
    of pid records."""
    from uffdio.manage import SNAP_SCRATCH, _parse_snapshot

    best = None
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if "uffdio-state" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                    got = _parse_snapshot(f.read())
                if got is not None and (best is None or got[0] > best[0]):
                    best = got
    assert best is not None, f"pid {pid}: no whole snapshot"
    body = best[1]
    return sum(1 for i in range(0, len(body), 4) if body[i + 2] == SNAP_SCRATCH)


def present(pid: int, addr: int, n: int) -> list[bool]:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        data = f.read(8 * n)
    return [bool(int.from_bytes(data[8 * i : 8 * i + 8], "little") >> 63) for i in range(n)]


# ---- the API ----------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "file"])
async def test_evict_swap_in_and_clean_re_eviction(store: str, tmp_path: Path) -> None:
    """Evicted pages leave the target (page map), come back byte for byte; pages read back
    and not written are evicted again without being read or stored (CLEAN); written ones
    are stored again; all-zero pages are not stored."""
    sw = Swap(store=FileStore(str(tmp_path)) if store == "file" else MemoryStore(), policy="none")
    async with Manager(swap=sw) as m:
        prog = Prog(m, 8 << 20)
        proc = await prog.spawned.process()
        addr_s, digest = (await prog.cmd("fill", 11)).split()
        addr = int(addr_s)
        await prog.cmd("zero", 0, 1 << 20)  # the first MiB: zeros (not stored)
        await proc.scan()
        region = [(addr, 8 << 20)]
        n = await proc.evict(region)
        npages = (8 << 20) // PAGE
        assert n >= npages - 256  # zeroed pages were not resident, the rest went
        assert not any(present(proc.pid, addr, npages))
        s = states(sw, proc, addr + (1 << 20), npages - 256)
        assert set(s) == {EVICTED}, set(s)
        stored0 = sw.store.statistics()["puts"]
        assert stored0 == npages - 256
        zero_digest = await prog.cmd("digest", 0, 1 << 20)
        assert await prog.cmd("iszero", 0, 1 << 20) == "1"
        rest = await prog.cmd("digest", 1 << 20, 7 << 20)
        # read back: CLEAN (write-protected, the store keeps the copy)
        s = states(sw, proc, addr + (1 << 20), npages - 256)
        assert set(s) == {CLEAN}, set(s)
        await prog.cmd("write", 4 << 20, 1 << 20, 9)  # dirty one MiB
        s = states(sw, proc, addr + (4 << 20), 256)
        assert set(s) == {NONE}, set(s)
        want = await prog.cmd("digest", 1 << 20, 7 << 20)
        assert want != rest
        st0 = sw.statistics()
        await proc.evict(region)
        st1 = sw.statistics()
        # 6 MiB clean (evicted without a copy), 1 MiB written (stored again)
        assert st1["pages_evicted_clean"] - st0["pages_evicted_clean"] == 6 * 256
        assert sw.store.statistics()["puts"] - stored0 == 256
        assert await prog.cmd("digest", 1 << 20, 7 << 20) == want
        assert await prog.cmd("digest", 0, 1 << 20) == zero_digest
        _ = digest
        assert await prog.close() == 0
    sw.close()


async def test_madvise_munmap_mremap_fork_of_evicted_pages() -> None:
    """The application's events on evicted pages: DONTNEED reads zeros (the copy is
    dropped), munmap frees the copies, mremap finds them at the new address, a forked
    child reads the parent's data and its writes stay its own."""
    sw = Swap(policy="none")
    async with Manager(swap=sw) as m:
        prog = Prog(m, 8 << 20)
        proc = await prog.spawned.process()
        _, digest = (await prog.cmd("fill", 12)).split()
        tail = await prog.cmd("digest", 6 << 20, 2 << 20)
        await proc.scan()
        await proc.evict()
        child, status, parent = (await prog.cmd("fork")).split()
        assert child == digest and status == "0" and parent == digest
        await proc.evict()
        assert await prog.cmd("zero", 0, 2 << 20) == "0"
        assert await prog.cmd("iszero", 0, 2 << 20) == "1"
        held = sw.store.statistics()["pages"]
        assert await prog.cmd("munmap", 4 << 20, 4 << 20) == "0"
        await anyio.sleep(0.1)
        assert sw.store.statistics()["pages"] <= held - 1024  # the copies are gone
        await proc.scan()
        await proc.evict()
        new = int(await prog.cmd("mremap", 64 << 20))
        assert new
        assert await prog.cmd("iszero", 0, 2 << 20) == "1"
        assert await prog.cmd("iszero", 4 << 20, 60 << 20) == "1"
        _ = tail
        assert await prog.close() == 0
    sw.close()


async def test_release_brings_everything_back() -> None:
    sw = Swap(policy="none")
    async with Manager(swap=sw) as m:
        prog = Prog(m, 8 << 20)
        proc = await prog.spawned.process()
        addr, digest = (await prog.cmd("fill", 13)).split()
        await proc.scan()
        await proc.evict()
        # half comes back as CLEAN (write-protected), half stays evicted
        await prog.cmd("digest", 0, 4 << 20)
        await proc.release()
        assert all(present(proc.pid, int(addr), (8 << 20) // PAGE))
        assert await prog.cmd("digest") == digest
        # nothing is left write-protected or registered: writes just work
        await prog.cmd("write", 0, 8 << 20, 5)
        assert await prog.cmd("digest") != digest
        smaps = Path(f"/proc/{prog.spawned.pid}/smaps").read_text()
        assert not any(
            " um" in ln or " uw" in ln for ln in smaps.splitlines() if ln.startswith("VmFlags")
        )
        assert await prog.close() == 0
    sw.close()


def test_bad_store_and_size_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown store"):
        open_store("tape:/dev/st0")
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
    assert parse_size("32M") == 32 << 20 and parse_size("1.5G") == 3 << 29
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(uffdio.UffdError, match="exists"):
        FileStore(str(f))
    fs = FileStore(str(tmp_path / "swap"))
    assert oct(os.stat(fs.path).st_mode & 0o777) == "0o600"
    fs.close()
    assert not os.path.exists(tmp_path / "swap")


# ---- the page state machine, by hypothesis ----------------------------------------------

REGION_PAGES = 64


class PageStates(RuleBasedStateMachine):
    """A real target (pytarget.py) under a Manager with swap; rules evict, write, read,
    discard ranges of its region in any order; the model is one byte per page (the
    pattern a page was last written with, 0 = zeros).  After every step: the target's
    bytes equal the model, no page is left in transit, an EVICTED/ZERO page is not
    present and a CLEAN one is."""

    def __init__(self) -> None:
        super().__init__()
        self.portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self.portal_cm.__enter__()
        self.sw = Swap(policy="none")
        self.m_cm = self.portal.wrap_async_context_manager(Manager(swap=self.sw))
        self.m = self.m_cm.__enter__()
        self.prog = Prog(self.m, REGION_PAGES * PAGE)
        self.proc = self.portal.call(self.prog.spawned.process)
        addr, _ = self.call("fill", 1).split()
        self.addr = int(addr)
        self.call("write", 0, REGION_PAGES * PAGE, 1)
        self.model = [1] * REGION_PAGES
        self.portal.call(self.proc.scan)

    def call(self, *args: object) -> str:
        return self.portal.call(self.prog.cmd, *args)

    def teardown(self) -> None:
        try:
            self.call("exit")
        finally:
            self.m_cm.__exit__(None, None, None)
            self.portal_cm.__exit__(None, None, None)
            self.sw.close()

    ranges = st.tuples(st.integers(0, REGION_PAGES - 1), st.integers(1, 16))

    def _clip(self, r: tuple[int, int]) -> tuple[int, int]:
        s, n = r
        return s, min(n, REGION_PAGES - s)

    @rule(r=ranges)
    def evict(self, r: tuple[int, int]) -> None:
        s, n = self._clip(r)
        self.portal.call(self.proc.evict, [(self.addr + s * PAGE, n * PAGE)])

    @rule(r=ranges, v=st.integers(1, 255))
    def write(self, r: tuple[int, int], v: int) -> None:
        s, n = self._clip(r)
        self.call("write", s * PAGE, n * PAGE, v)
        for i in range(s, s + n):
            self.model[i] = v

    @rule(r=ranges)
    def discard(self, r: tuple[int, int]) -> None:
        s, n = self._clip(r)
        assert self.call("zero", s * PAGE, n * PAGE) == "0"
        for i in range(s, s + n):
            self.model[i] = 0

    @rule(r=ranges)
    def read(self, r: tuple[int, int]) -> None:
        s, n = self._clip(r)
        self.call("touch", s * PAGE, n * PAGE, PAGE)

    @precondition(lambda self: True)
    @invariant()
    def consistent(self) -> None:
        sts = states(self.sw, self.proc, self.addr, REGION_PAGES)
        pres = present(self.proc.pid, self.addr, REGION_PAGES)
        for i, (s, p) in enumerate(zip(sts, pres, strict=True)):
            assert s in (NONE, CLEAN, EVICTED, ZERO), (i, s)
            if s in (EVICTED, ZERO):
                assert not p, (i, s)
            if s == CLEAN:
                assert p, (i, s)

    @invariant()
    def bytes_match(self) -> None:
        # the first byte of each page, read through the target (faults included)
        got = self.call("touch", 0, REGION_PAGES * PAGE, PAGE)
        assert int(got) == sum(self.model)


TestPageStates = PageStates.TestCase
TestPageStates.settings = settings(
    max_examples=12,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---- uffdio run --limit -------------------------------------------------------------------


def _managed_rss(pid: int) -> int | None:
    """Resident bytes of the target's registered (uffd 'um') mappings, from smaps."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    total = rss = 0
    for line in text.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmFlags:") and " um" in line:
            total += rss
    return total


def run_limited(
    swaptest: str,
    tmp_path: Path,
    args: list[str],
    *opts: str,
    timeout: float = 240,
    env: dict[str, str] | None = None,
) -> tuple[dict, list[int], str]:
    """`uffdio run` with options around swaptest; samples the target's managed RSS from
    smaps every 20 ms while it runs.  Returns (stats, samples, stderr)."""
    stats = tmp_path / "stats.json"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uffdio",
            "run",
            *opts,
            "--stats-json",
            str(stats),
            "--",
            swaptest,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        pid = None
        while not stop.is_set():
            if pid is None:
                out = subprocess.run(
                    ["pgrep", "-P", str(p.pid), "-x", "swaptest"], capture_output=True, text=True
                ).stdout.split()
                pid = int(out[0]) if out else None
            if pid is not None:
                v = _managed_rss(pid)
                if v is None:
                    break
                samples.append(v)
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        stop.set()
        t.join()
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, (out, err)
    assert out.startswith("ok "), (out, err)
    return json.loads(stats.read_text()), samples, err


SLACK = 8 << 20  # documented in README: what the program touches between two policy rounds


@pytest.mark.parametrize(
    "pattern, store",
    [("rand", "memory"), ("seq", "memory"), ("zipf", "memory"), ("rand", "file")],
)
def test_run_limit_holds_every_byte_checked(
    swaptest: str, tmp_path: Path, pattern: str, store: str
) -> None:
    """256 MiB of data, 4 threads reading and writing (20 %) under a 32 MiB limit: every
    page verified on every access and at the end, the limit held (smaps), the stats
    JSON complete."""
    spec = "memory" if store == "memory" else f"file:{tmp_path}"
    stats, samples, _ = run_limited(
        swaptest, tmp_path, ["256", pattern, "6000", "4", "20"], "--limit", "32M", "--store", spec
    )
    limit = 32 << 20
    assert samples, "no smaps samples"
    assert max(samples) <= limit + SLACK, (max(samples) >> 20, len(samples))
    for key in (
        "limit_bytes",
        "peak_resident_bytes",
        "final_resident_bytes",
        "faults",
        "pages_evicted",
        "pages_swapped_in",
        "store_bytes",
        "fault_latency_us",
        "metadata_bytes_per_page",
    ):
        assert key in stats, key
    assert stats["limit_bytes"] == limit
    assert stats["peak_resident_bytes"] <= limit + SLACK
    assert stats["pages_evicted"] > (256 - 32) << 8 // 2
    assert stats["pages_swapped_in"] > 0
    assert stats["fault_latency_us"]["p50"] is not None
    assert stats["fault_latency_us"]["p99"] is not None
    assert 0 < stats["metadata_bytes_per_page"] <= 16
    assert not stats["errors"]


@pytest.mark.parametrize("events", ["f", "m", "r", "d"])
def test_run_limit_with_fork_munmap_mremap_madvise(
    swaptest: str, tmp_path: Path, events: str
) -> None:
    """Midway, with pages evicted: fork (the child verifies and rewrites its copy, the
    parent's stays), munmap, mremap, madvise(DONTNEED) - every byte checked after."""
    stats, samples, _ = run_limited(
        swaptest, tmp_path, ["32", "rand", "8000", "2", "20", events], "--limit", "8M"
    )
    assert stats["pages_evicted"] > 0 and stats["pages_swapped_in"] > 0


def test_new_mapping_at_an_evicted_address_keeps_its_data(swaptest: str, tmp_path: Path) -> None:
    """A thread unmaps an area and maps new memory at the same address with raw syscalls
    (as glibc's malloc does with big blocks: nobody registers the new mapping), fills and
    checks it, again and again, while the manager evicts.  A page of the old mapping in an
    eviction batch must never take the new mapping's data with it: the MOVE runs under a
    hold of the fault engine (no event is read, so no mapping can change under it) and
    moves only what the table still describes.  Before that hold, the first page of the
    new mapping read zeros within a few dozen rounds, every run."""
    stats, _, _ = run_limited(
        swaptest,
        tmp_path,
        ["32", "rand", "25000", "2", "20"],
        "--limit",
        "8M",
        env={"SWAPTEST_CHURN": "256"},
    )
    assert stats["pages_evicted"] > 0


def test_forks_of_forks_during_eviction_batches(swaptest: str, tmp_path: Path) -> None:
    """A thread forks a child that forks a grandchild, again and again, while the manager
    evicts: both check an area that never changes (its pages are evicted and read back
    all the time, so forks land in eviction batches).  A fork of a fork copies the batch
    in flight too, and the batch's outcome must reach it.  (The old code's grandchild
    never had its copy settled - found by reading; two runs of this test on that code did
    not hit the window, so this guards forks under eviction in general.)"""
    stats, _, _ = run_limited(
        swaptest,
        tmp_path,
        ["32", "rand", "20000", "2", "20"],
        "--limit",
        "8M",
        env={"SWAPTEST_FORKS": "256"},
    )
    assert stats["pages_evicted"] > 0


def test_fork_while_evicted_pages_are_written_back_gives_the_child_every_page(
    swaptest: str, tmp_path: Path
) -> None:
    """Four threads rewrite random pages of an area whole, writing first (an evicted page
    comes back on a write fault, and its entry drops the store copy), while another forks
    again and again; each child checks the pages being written and the last ones written
    at the fork (and every page at every 16th fork).  The kernel copies the parent's
    memory before it queues FORK, and a read returns pending faults before events: the
    engine used to serve those faults and then copy the table, so a page that came back
    in the parent was resident in the child's table but missing in the child, which read
    zeros - 5 runs in 5 on that code, within a second.  The table is now copied under
    the lock its reads take (uf_pt_read)."""
    stats, _, _ = run_limited(
        swaptest,
        tmp_path,
        ["32", "rand", "10000", "2", "30"],
        "--limit",
        "8M",
        env={"SWAPTEST_FORKS": "4", "SWAPTEST_WRITER": "2048", "SWAPTEST_WRITERS": "4"},
    )
    assert stats["pages_evicted"] > 0


async def test_plain_eviction_of_an_address_mapped_anew(swaptest: str) -> None:
    """The same, for Manager.evict without userspace swap (the engine's rules): an
    unmapped range's HOLD rule is gone by the time the MOVE is decided, so the new
    mapping there is left alone."""
    async with Manager() as m:
        sp = m.spawn(
            [swaptest, "8", "rand", "25000", "2", "20"],
            env={"SWAPTEST_CHURN": "256"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        proc = await sp.process()
        rounds = 0
        codes: list[int] = []

        async def wait() -> None:
            codes.append(await sp.wait())

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                while not codes:
                    with contextlib.suppress(uffdio.UffdProcessGone):
                        await proc.scan()
                        await proc.evict()
                    rounds += 1
                    await anyio.sleep(0.003)
        rc = codes[0]
        out, err = sp.popen.communicate()
        assert rc == 0, (out, err)
        assert rounds > 10 and proc.stats["pages_evicted"] > 0


def test_file_store_that_fills_up(swaptest: str, tmp_path: Path) -> None:
    """A swap file on a 4 MiB filesystem: ENOSPC leaves the pages resident (nothing
    lost: the program's checks pass) and is reported."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        stats, _, err = run_limited(
            swaptest,
            tmp_path,
            ["32", "rand", "4000", "2", "20"],
            "--limit",
            "8M",
            "--store",
            f"file:{mnt}",
        )
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert any("No space left" in e for e in stats["errors"]), stats["errors"]
    assert "No space left" in err
    assert stats["store_errors"]["put"] > 0
    assert stats["pages_evicted"] > 0  # what fitted was used


def test_run_limit_bad_input(tmp_path: Path) -> None:
    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "uffdio", "run", *a, "--", "true"],
            capture_output=True,
            text=True,
        )

    r = run("--limit", "lots")
    assert r.returncode != 0 and "not a size" in r.stderr
    r = run("--limit", "32M", "--store", "tape:x")
    assert r.returncode != 0 and "unknown store" in r.stderr
    r = run("--limit", "32M", "--policy", "magic")
    assert r.returncode != 0 and "unknown policy" in r.stderr
    r = run("--limit", "100K")
    assert r.returncode != 0 and "at least 1M" in r.stderr


async def test_sequential_faults_read_ahead() -> None:
    """A sequential walk over evicted pages is served with read-ahead: fewer faults than
    pages, and the read-ahead pages are installed like any other (CLEAN)."""
    sw = Swap(policy="none")
    async with Manager(swap=sw) as m:
        prog = Prog(m, 8 << 20)
        proc = await prog.spawned.process()
        addr, digest = (await prog.cmd("fill", 14)).split()
        await proc.scan()
        await proc.evict([(int(addr), 8 << 20)])
        before = sw.statistics()
        assert await prog.cmd("digest") == digest  # reads the region front to back
        after = sw.statistics()
        ins = after["pages_swapped_in"] - before["pages_swapped_in"]
        ahead = after["pages_read_ahead"] - before["pages_read_ahead"]
        faults = after["faults"]["swap_in"] - before["faults"]["swap_in"]
        assert ins >= (8 << 20) // PAGE
        assert ahead > ins // 2, (ahead, ins)
        assert faults < ins // 2, (faults, ins)
        await prog.close()
    sw.close()


def test_pressure_policy_shrinks_the_limit(
    swaptest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--policy pressure: the limit starts from what the program uses and moves with the
    stall uffdio measures, below the ceiling given by --limit; pages get evicted; the
    data stays intact.  The program idles 2 s after its fill: the policy sees no stall
    for several periods and must shrink the limit under what it uses."""
    monkeypatch.setenv("SWAPTEST_PAUSE_MS", "2000")
    stats, _, _ = run_limited(
        swaptest,
        tmp_path,
        ["64", "zipf", "60000", "2", "20"],
        "--limit",
        "96M",
        "--policy",
        "pressure",
    )
    assert stats["policy"] == "pressure"
    assert stats["limit_bytes"] < 96 << 20, stats["limit_bytes"]
    assert stats["pages_evicted"] > 0


def test_examples_swap_demo_and_custom_policy(swaptest: str, tmp_path: Path) -> None:
    """The main demo (small) and the user-policy example run and check their data."""
    ex = Path(__file__).parent.parent / "examples"
    r = subprocess.run(
        [sys.executable, str(ex / "swap_demo.py"), "--mib", "32", "--limit", "8M", "--ops", "3000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "no byte lost" in r.stdout
    r = subprocess.run(
        [
            sys.executable,
            str(ex / "custom_policy.py"),
            "--limit",
            "8M",
            "--",
            swaptest,
            "32",
            "rand",
            "6000",
            "2",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok ") and "squeeze: exit 0" in r.stderr


class DictStore(PyStore):
    """A store written in Python, as a user would: pages in a dict.  It can be told to
    fail reads (the next N) or writes (with an errno)."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: dict[int, bytes] = {}
        self.next_key = 1
        self.fail_gets = 0
        self.put_errno = 0
        self.discarded: list[int] = []

    async def put(self, pages: memoryview) -> list[int]:
        if self.put_errno:
            raise OSError(self.put_errno, os.strerror(self.put_errno))
        keys = []
        for i in range(0, len(pages), PAGE):
            self.pages[self.next_key] = bytes(pages[i : i + PAGE])
            keys.append(self.next_key)
            self.next_key += 1
        return keys

    async def get(self, key: int) -> bytes:
        if self.fail_gets:
            self.fail_gets -= 1
            raise OSError(5, "Input/output error (test)")
        return self.pages[key]

    async def discard(self, keys: list[int]) -> None:
        for k in keys:
            del self.pages[k]
        self.discarded.extend(keys)


class GatedStore(DictStore):
    """A DictStore whose puts wait for `gate`: an eviction batch stays in flight (its
    pages moved out, read, not yet stored) for as long as a test needs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.putting = anyio.Event()

    async def put(self, pages: memoryview) -> list[int]:
        self.putting.set()
        await self.gate.wait()
        return await super().put(pages)


async def test_fork_then_discard_during_a_batch_leaves_the_child_its_pages() -> None:
    """The program forks while an eviction batch is in flight (its put waits) and then
    discards the region (madvise DONTNEED) in the parent: the pages are gone for the
    parent (zeros), not for the child, whose only copy of the batch's pages is the
    batch's.  (A Python store's put list is fixed before the put, so this path kept them;
    the memory store's is made at the commit, where a page dropped in the parent was left
    out and its outcome - zero - given to the child too: fixed in pages_to_put, and a
    child's clean copy is kept in apply().  That window, between the read and the
    commit, cannot be held open from a test.)"""
    store = GatedStore()
    store.gate.set()
    sw = Swap(store=store, policy="none")
    async with Manager(swap=sw) as m:
        size = 2 << 20
        prog = Prog(m, size)
        proc = await prog.spawned.process()
        addr_s, digest = (await prog.cmd("fill", 7)).split()
        region = [(int(addr_s), size)]
        await proc.scan()
        assert await proc.evict(region) == size // PAGE
        assert await prog.cmd("digest") == digest  # every page back, CLEAN
        await prog.cmd("write", 0, size // 2, 9)  # the first half dirty again
        want = await prog.cmd("digest")
        store.gate, store.putting = anyio.Event(), anyio.Event()
        reply: list[str] = []

        async def forkzap() -> None:
            reply.extend((await prog.cmd("forkzap", 1.5, timeout=60)).split())

        async with anyio.create_task_group() as tg:
            tg.start_soon(proc.evict, region)
            with anyio.fail_after(20):
                await store.putting.wait()  # moved, read, the dirty half in the put
            tg.start_soon(forkzap)
            await anyio.sleep(0.8)  # forked and discarded; the child waits
            store.gate.set()
        child, zap, parent_zero = reply
        assert zap == "0" and parent_zero == "1"  # the parent's copy is gone
        assert child == want  # the child's is whole
        assert await prog.close() == 0
    sw.close()


async def test_python_store_put_get_discard_and_failures() -> None:
    """A store written in Python (PyStore): pages go through its put/get/discard; a read
    that fails makes the thread wait (no zeros) until a retry succeeds, and is reported; a
    put that fails leaves the pages resident; release brings its pages back."""
    store = DictStore()
    sw = Swap(store=store, policy="none")
    async with Manager(swap=sw) as m:
        prog = Prog(m, 4 << 20)
        proc = await prog.spawned.process()
        addr_s, digest = (await prog.cmd("fill", 21)).split()
        region = [(int(addr_s), 4 << 20)]
        await proc.scan()
        n = await proc.evict(region)
        assert n == 1024 and len(store.pages) == 1024
        assert not any(present(proc.pid, int(addr_s), 1024))
        store.fail_gets = 5  # the first reads fail: the program waits, then continues
        assert await prog.cmd("digest") == digest
        assert any("retrying" in e for e in sw.errors), sw.errors
        # written pages are stored again; the old copies are discarded
        await prog.cmd("write", 0, 1 << 20, 3)
        want = await prog.cmd("digest")
        await proc.evict(region)
        await sw.measure()  # drains discards
        assert len(store.discarded) >= 256
        assert await prog.cmd("digest") == want
        # a failing put: nothing is evicted, nothing lost
        await prog.cmd("write", 0, 4 << 20, 4)
        want = await prog.cmd("digest")
        store.put_errno = 28
        with pytest.raises(uffdio.UffdError, match="No space left"):
            await proc.evict(region)
        assert all(present(proc.pid, int(addr_s), 1024))
        assert await prog.cmd("digest") == want
        store.put_errno = 0
        await proc.evict(region)
        await proc.release()
        assert await prog.cmd("digest") == want
        assert await prog.close() == 0
    sw.close()


async def test_python_store_put_that_fails_after_a_fork_during_the_batch() -> None:
    """The program forks while a batch is between its MOVE and its commit (the Python
    store's put is running), then the put fails.  Parent and child both had the batch's
    pages as holes: both get them back (the child's through its own uffd, on the event
    loop - a copy that must never block it) and read every byte as it was."""
    store = DictStore()
    sw = Swap(store=store, policy="none")
    async with Manager(swap=sw) as m:
        prog = Prog(m, 4 << 20)
        proc = await prog.spawned.process()
        addr_s, digest = (await prog.cmd("fill", 29)).split()
        region = [(int(addr_s), 4 << 20)]
        await proc.scan()
        real_put = store.put

        async def put_after_fork(pages: memoryview) -> list[int]:
            prog.popen.stdin.write("fork\n")  # the reply comes once the child has read
            prog.popen.stdin.flush()
            await anyio.sleep(0.5)  # forked by now; its reads wait on the batch
            raise OSError(errno.ENOSPC, "no space (test)")

        store.put = put_after_fork  # type: ignore[method-assign]
        with pytest.raises(uffdio.UffdError, match="No space left"):
            await proc.evict(region)
        store.put = real_put  # type: ignore[method-assign]
        with anyio.fail_after(30):
            line = await anyio.to_thread.run_sync(prog.popen.stdout.readline)
        child, status, parent = line.split()
        assert (child, status, parent) == (digest, "0", digest)
        assert all(present(proc.pid, int(addr_s), 1024))
        assert await prog.cmd("digest") == digest
        assert await prog.close() == 0
    sw.close()


@pytest.mark.parametrize("with_swap", [True, False], ids=["swap", "plain"])
async def test_cancelled_evictions_lose_nothing(with_swap: bool) -> None:
    """Evictions cancelled at random moments (a policy's timeout, a task group ending):
    a begun batch completes, so no page is left moved out behind the books' back (it
    would read as zeros)."""
    import random

    sw = Swap(policy="none") if with_swap else None
    async with Manager(swap=sw) as m:
        prog = Prog(m, 16 << 20)
        proc = await prog.spawned.process()
        _, digest = (await prog.cmd("fill", 31)).split()
        await proc.scan()
        rnd = random.Random(5)
        for _ in range(25):
            with anyio.move_on_after(rnd.uniform(0, 0.004)):
                await proc.evict()
            assert await prog.cmd("digest") == digest
        assert await prog.close() == 0
    if sw is not None:
        sw.close()


@pytest.mark.parametrize("agent_version", [2, 1], ids=["zap-with-move", "zap-alone"])
async def test_eviction_batches_alternate_scratch_halves(agent_version: int) -> None:
    """Batches alternate between the two halves of the scratch area, the agent emptying
    the previous half after it answered the next MOVE (protocol 2); an agent of protocol 1
    gets one synchronous zap per batch.  Either way every byte comes back and the scratch
    area is empty when evict() returns."""
    sw = Swap(policy="none")
    async with Manager(swap=sw) as m:
        size = 40 << 20  # batches of 1, 2, 4, 8, 8 ... MiB (FIRST_BATCH pages doubling)
        prog = Prog(m, size)
        proc = await prog.spawned.process()
        addr_s, digest = (await prog.cmd("fill", 17)).split()
        addr = int(addr_s)
        assert proc.agent_version == 2
        proc.agent_version = agent_version
        assert proc.zap_with_move == (agent_version >= 2)
        await proc.scan()
        npages = size // PAGE
        n = await proc.evict([(addr, size)])
        assert n == npages
        assert not any(present(proc.pid, addr, npages))
        assert not any(present(proc.pid, proc.scratch, proc.scratch_len // PAGE))
        ph = sw.statistics()["evict_seconds"]
        assert ph["collect_read"] > 0 and ph["collect_put"] > 0, ph
        assert await prog.cmd("digest") == digest
        # again, with the program rewriting everything while its pages go
        out: list[str] = []

        async def writer() -> None:
            out.append(await prog.cmd("write", 0, size, 3))

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            await proc.evict([(addr, size)])
        assert out
        await proc.evict([(addr, size)])
        assert not any(present(proc.pid, proc.scratch, proc.scratch_len // PAGE))
        want = await prog.cmd("digest")
        await prog.cmd("write", 0, size, 3)  # the same bytes again: nothing was lost
        assert await prog.cmd("digest") == want
        assert await prog.close() == 0
    sw.close()


async def test_agent_refuses_a_zap_outside_its_scratch_area() -> None:
    """The range a MOVE request asks the agent to empty must lie in the scratch area and
    be page aligned: anything else is refused (EINVAL) before anything moves."""
    from uffdio import _agentproto as P

    sw = Swap(policy="none")
    async with Manager(swap=sw) as m:
        prog = Prog(m, 1 << 20)
        proc = await prog.spawned.process()
        addr_s, digest = (await prog.cmd("fill", 5)).split()
        addr = int(addr_s)
        s, n = proc.scratch, proc.scratch_len
        for zs, zl in [
            (addr, PAGE),  # the program's own memory
            (s - PAGE, 2 * PAGE),  # starts before the scratch area
            (s + n - PAGE, 2 * PAGE),  # ends after it
            (s + 1, PAGE),  # unaligned
            (s, PAGE + 1),
        ]:
            r = await proc.request(P.M_MOVE, [addr, s, PAGE], b=zs, c=zl)
            assert r.a == -errno.EINVAL, (zs, zl, r.a)
        assert all(present(proc.pid, addr, 256))
        assert await prog.cmd("digest") == digest
        assert await prog.close() == 0
    sw.close()


async def test_memory_store_gives_its_memory_back() -> None:
    """The memory store's chunks go back to the system when it holds no page any more:
    after the program rewrote every evicted page (each store copy dropped) and after the
    program exited."""
    store = MemoryStore()
    sw = Swap(store=store, policy="none")
    async with Manager(swap=sw) as m:
        size = 16 << 20
        prog = Prog(m, size)
        proc = await prog.spawned.process()
        addr_s, _ = (await prog.cmd("fill", 23)).split()
        await proc.scan()
        assert await proc.evict([(int(addr_s), size)]) == size // PAGE
        st = store.statistics()
        assert st["pages"] == size // PAGE and st["reserved_bytes"] >= st["bytes"] > 0
        await prog.cmd("write", 0, size, 4)  # every page written: no store copy is valid
        want = await prog.cmd("digest")
        st = store.statistics()
        assert st["pages"] == 0 and st["bytes"] == 0, st
        assert st["reserved_bytes"] == 0, st
        # again, and this time the program exits with its pages in the store
        assert await proc.evict([(int(addr_s), size)]) == size // PAGE
        assert store.statistics()["reserved_bytes"] > 0
        assert await prog.cmd("digest") == want  # read back: CLEAN, the copies stay
        assert store.statistics()["pages"] == size // PAGE
        assert await prog.close() == 0
        await prog.spawned.wait()
        for _ in range(100):  # the exit is seen by the manager a moment later
            gc.collect()  # the page table goes with the last reference to it
            if not store.statistics()["reserved_bytes"]:
                break
            await anyio.sleep(0.05)
        st = store.statistics()
        assert st["pages"] == 0 and st["reserved_bytes"] == 0, st
        # the summary still says what the store held
        sst = sw.statistics()
        assert sst["store_bytes"] == 0 and sst["store_bytes_peak"] >= st["bytes_in"] // 8
        assert sst["compression_ratio"] is not None  # (random data: about 1)
    sw.close()


async def test_store_pages_of_children_that_never_said_hello_go_when_they_exit() -> None:
    """Children made by _Fork never say hello: their fork-event uffds keep a copy of the
    parent's page table, and with it the store copies of the pages evicted before the
    fork.  Alive, they read them; once they exited, the copies go (before, they stayed until
    the manager ended)."""
    store = MemoryStore()
    sw = Swap(store=store, policy="none")
    async with Manager(swap=sw) as m:
        m.orphan_interval = 0.05
        size = 4 << 20
        prog = Prog(m, size)
        proc = await prog.spawned.process()
        addr_s, _ = (await prog.cmd("fill", 29)).split()
        await proc.scan()
        assert await proc.evict([(int(addr_s), size)]) == size // PAGE
        assert (await prog.cmd("rawfork", 2, 0.3)).split() == ["0"] * 2
        await prog.cmd("write", 0, size, 5)  # the parent's own copies are dropped
        want = await prog.cmd("digest")
        deadline = time.monotonic() + 10
        while store.statistics()["pages"]:
            assert time.monotonic() < deadline, (store.statistics(), m.statistics()["orphans"])
            await anyio.sleep(0.05)
        assert m.statistics()["orphans_reaped"] == 2
        assert await prog.cmd("digest") == want
        assert await prog.close() == 0
    sw.close()


async def test_agent_reconnecting_to_its_own_manager_keeps_every_page() -> None:
    """The agent's connection breaks (here: a message it cannot parse) and it calls the
    same manager again at once, AF_RECONNECT, before the manager saw the old connection
    end.  The old engine and page table stop before the new ones take the table over
    from its memfd - the old ones must not drop the store references the new table
    carries on, nor retire the new process from swap when the old connection ends.
    Four rounds of evict, reconnect, read back, rewrite half; every byte checked, the
    store's page count exact, and empty once the program exited."""
    store = MemoryStore()
    sw = Swap(store=store, policy="none")
    async with Manager(swap=sw) as m:
        size = 8 << 20
        npages = size // PAGE
        prog = Prog(m, size)
        proc = await prog.spawned.process()
        addr_s, want = (await prog.cmd("fill", 41)).split()
        addr = int(addr_s)
        await proc.scan()
        for rnd in range(4):
            assert await proc.evict([(addr, size)]) == npages, rnd
            assert store.statistics()["pages"] == npages
            old = proc
            old._sock.send(b"xx")  # shorter than a header: EBADMSG, the agent calls again
            for _ in range(2000):
                if m.processes.get(old.pid) not in (None, old):
                    break
                await anyio.sleep(0.01)
            proc = m.processes[old.pid]
            assert proc.resumed and old.exited
            with anyio.fail_after(20):
                await proc._welcomed.wait()
            assert await prog.cmd("digest") == want, rnd  # read back: CLEAN, copies stay
            assert store.statistics()["pages"] == npages, rnd
            await prog.cmd("write", 0, size // 2, 50 + rnd)  # half rewritten: copies drop
            want = await prog.cmd("digest")
            assert store.statistics()["pages"] == npages // 2, rnd
            await proc.scan()
        assert await prog.close() == 0
        await prog.spawned.wait()
        for _ in range(400):  # the exit is seen by the manager a moment later (20 s at most:
            # a CI run next to a stress run once needed more than 5)
            gc.collect()
            if not store.statistics()["pages"]:
                break
            await anyio.sleep(0.05)
        assert store.statistics()["pages"] == 0, store.statistics()
    sw.close()


@pytest.mark.parametrize("with_swap", [True, False], ids=["swap", "plain"])
async def test_agent_error_answer_to_move_commits_what_moved(with_swap: bool) -> None:
    """The agent answers a MOVE with an error after it moved some pages (here: the last
    triple of the request points outside its scratch area, which it refuses).  That is an
    answer, not a lost one: the pages it moved are committed (evicted, read back intact),
    the error is raised, the batch is closed and the next eviction works."""
    sw = Swap(store=MemoryStore(), policy="none") if with_swap else None
    async with Manager(swap=sw) as m:
        size = 4 << 20
        prog = Prog(m, size)
        proc = await prog.spawned.process()
        addr_s, want = (await prog.cmd("fill", 43)).split()
        addr = int(addr_s)
        await proc.scan()
        real = proc._op_move

        async def bad_last(triples, zap=None):  # type: ignore[no-untyped-def]
            bad = [int(w) for w in triples] + [addr, proc.scratch + proc.scratch_len, PAGE]
            return await real(bad, zap)

        proc._op_move = bad_last  # type: ignore[method-assign]
        with pytest.raises(uffdio.UffdError, match="UFFDIO_MOVE"):
            await proc.evict([(addr, size)])
        proc._op_move = real  # type: ignore[method-assign]
        assert sum(not x for x in present(proc.pid, addr, size // PAGE)) > 0  # some moved
        with anyio.fail_after(30):
            assert await prog.cmd("digest") == want  # every page back, none waits forever
        assert await proc.evict([(addr, size)]) == size // PAGE
        assert await prog.cmd("digest") == want
        assert await prog.close() == 0
    if sw is not None:
        sw.close()


@pytest.mark.parametrize("grandchild", [False, True], ids=["child", "grandchild"])
@pytest.mark.parametrize("with_swap", [True, False], ids=["swap", "plain"])
async def test_parent_exiting_between_move_and_read_leaves_its_child_every_page(
    with_swap: bool, grandchild: bool, tmp_path: Path
) -> None:
    """A program forks during an eviction batch, after the MOVE, and exits before the
    manager read the moved pages (a daemon's fork).  The child has them in its own copy of
    the scratch area: it reads every page of the parent's data, none as zeros (it did
    before: the batch was closed without its pages).  So does a grandchild the child
    forks at once (before the batch is decided: it has the batch open too)."""
    sw = Swap(store=MemoryStore(), policy="none") if with_swap else None
    async with Manager(swap=sw) as m:
        size = 4 << 20
        prog = Prog(m, size)
        proc = await prog.spawned.process()
        addr_s, _ = (await prog.cmd("fill", 47)).split()
        addr = int(addr_s)
        want = await prog.cmd("digest")
        await proc.scan()
        result = tmp_path / "child"
        owner = sw if sw is not None else proc
        real = owner._move_held
        child: list[int] = []

        async def move_then_fork_and_exit(*args):  # type: ignore[no-untyped-def]
            out = await real(*args)
            owner._move_held = real  # type: ignore[method-assign]
            child.append(int(await prog.cmd("forkexit", want, result, *[1] * grandchild)))
            for _ in range(2000):  # its agent said hello and it was paired
                if any(q.pid == child[0] for q in m.processes.values()):
                    break
                await anyio.sleep(0.01)
            with anyio.fail_after(20):
                await prog.spawned.wait()
            return out

        owner._move_held = move_then_fork_and_exit  # type: ignore[method-assign]
        seen: list[int] = []
        if sw is None:
            # while a child waits for the rescue, its recovery snapshot records the batch
            # it inherited (a manager killed then would leave its successor the pages)
            real_into = proc._rescue_into

            async def look_then_rescue(q, *args):  # type: ignore[no-untyped-def]
                seen.append(_scratch_entries(q.pid))
                return await real_into(q, *args)

            proc._rescue_into = look_then_rescue  # type: ignore[method-assign]
        with pytest.raises(uffdio.UffdError):
            await proc.evict([(addr, size)])
        assert child
        results = [result, Path(f"{result}.g")] if grandchild else [result]
        for _ in range(600):
            if all(r.exists() and r.read_text() for r in results):
                break
            await anyio.sleep(0.05)
        assert [r.read_text() for r in results] == ["ok"] * len(results)
        if sw is not None:
            assert sw.statistics()["pages_rescued"] > 0
        else:
            assert m.statistics()["pages_rescued"] > 0
            assert seen and min(seen) > 0, seen
    if sw is not None:
        sw.close()


async def test_a_policy_that_raises_does_not_stop_the_manager() -> None:
    """A policy that raises is reported and started again; meanwhile the limit is lifted,
    so threads waiting at it go on instead of waiting for a policy that is gone."""
    from uffdio.swap import LimitPolicy

    class Flaky(LimitPolicy):
        name = "flaky"
        runs = 0

        async def run(self, swap: Swap) -> None:
            Flaky.runs += 1
            if Flaky.runs == 1:
                await anyio.sleep(0.2)  # long enough for the program to reach the limit
                raise RuntimeError("a bug in the policy")
            await super().run(swap)

    sw = Swap(limit=4 << 20, policy=Flaky())
    async with Manager(swap=sw) as m:
        prog = Prog(m, 16 << 20)
        await prog.spawned.process()
        _, digest = (await prog.cmd("fill", 41)).split()
        assert await prog.cmd("digest") == digest
        with anyio.fail_after(20):
            while Flaky.runs < 2 or sw.statistics()["pages_evicted"] == 0:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        st = sw.statistics()
        assert st["policy_failures"] == 1
        assert any("a bug in the policy" in e for e in st["errors"]), st["errors"]
        assert await prog.cmd("digest") == digest
        assert await prog.close() == 0
    sw.close()


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse (FUSE)")
async def test_file_store_whose_reads_fail(tmp_path: Path) -> None:
    """A swap file on a file system whose reads fail with EIO for a while (tests/progs/
    flakyfs.py, FUSE): the program's threads that need an evicted page wait - they never
    see zeros - the errors are counted, and once reads work again every byte comes back."""
    mnt, flag = tmp_path / "mnt", tmp_path / "fail-reads"
    mnt.mkdir()
    fs = subprocess.Popen(
        [sys.executable, str(PROGS / "flakyfs.py"), str(mnt), str(flag)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fs.stdout is not None and fs.stdout.readline().strip() == "mounted"
        # a limit far above the program's size: the policy evicts nothing itself but
        # kicks the engines every round, which retries the failed reads
        sw = Swap(store=FileStore(str(mnt)), limit=1 << 30)
        async with Manager(swap=sw) as m:
            size = 4 << 20
            prog = Prog(m, size)
            proc = await prog.spawned.process()
            addr_s, digest = (await prog.cmd("fill", 13)).split()
            await proc.scan()
            assert await proc.evict([(int(addr_s), size)]) == size // PAGE
            flag.touch()
            out: list[str] = []

            async def reader() -> None:
                out.append(await prog.cmd("digest", timeout=60))

            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                with anyio.fail_after(20):
                    while sw.statistics()["store_errors"]["get"] < 3:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                await anyio.sleep(0.3)
                assert not out  # still waiting for its page: no zeros were handed out
                errs = sw.statistics()["errors"]
                assert any("reading the swap store" in e and "waits" in e for e in errs), errs
                flag.unlink()
            assert out == [digest]  # every byte, once the reads work again
            assert await prog.close() == 0
        sw.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        fs.wait(timeout=10)
