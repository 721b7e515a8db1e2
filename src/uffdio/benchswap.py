"""``uffdio bench swap`` and ``uffdio bench evict``: uffdio against the kernel's own swap.

``bench swap`` runs one C target (``progs/swapbench.c``: fill a buffer of SIZE, then a
timed access phase of one workload, every page it reads checked) three ways:

- ``kernel``: in a memory cgroup limited to LIMIT (cgroup v1 ``memory.limit_in_bytes``, or
  v2 ``memory.max``), with a zram swap device (LZ4 when the kernel has it) that the
  benchmark sets up with the highest swap priority and removes afterwards;
- ``uffdio``: under ``uffdio run --limit LIMIT --store STORE``;
- ``nolimit``: no limit, all of its memory resident (the ceiling).

Rounds alternate kernel, uffdio, nolimit so that drift of the machine hits all alike.  The
time compared is the target's own (fill + access phase, measured inside it), so that the
manager's start-up is not counted; the command's whole wall time is reported too.

``bench evict`` measures eviction throughput: a target fills SIZE with compressible pages and
waits; the manager evicts all of them in batches into the store and the MB/s is timed; then
the target reads every page back and checks it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

WORKLOADS = ("seq", "rand", "zipf", "mixed")
SETUPS = ("kernel", "uffdio", "nolimit")
PAGE = 4096


class BenchError(Exception):
    """A benchmark cannot run here; the message says why and what to do."""


# -- the target ------------------------------------------------------------------------


def target_source(name: str = "swapbench") -> str:
    return (resources.files("uffdio") / "progs" / f"{name}.c").read_text()


def build_target(cache: Path | None = None, name: str = "swapbench") -> Path:
    """Compile progs/NAME.c (once per source version) and return the executable."""
    src = target_source(name)
    tag = hashlib.sha256(src.encode()).hexdigest()[:12]
    base = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "uffdio"
    exe = base / f"{name}-{tag}"
    if exe.exists():
        return exe
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BenchError("no C compiler: install gcc (apt-get install gcc) or set CC")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        c = Path(tmp) / f"{name}.c"
        c.write_text(src)
        out = Path(tmp) / name
        r = subprocess.run(
            [cc, "-O2", "-pthread", "-o", str(out), str(c), "-lm"], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise BenchError(f"compiling the benchmark target failed:\n{r.stderr}")
        os.replace(out, exe)
    return exe


def default_accesses(workload: str, size: int) -> int:
    """Accesses of the timed phase: two passes for seq, one access per page otherwise."""
    pages = size // PAGE
    return 2 * pages if workload == "seq" else pages


def _target_result(out: str) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            res: dict[str, Any] = json.loads(line)
            return res
    raise BenchError(f"the benchmark target printed no result:\n{out[-2000:]}")


# -- kernel swap: zram + memory cgroup -------------------------------------------------


def _write(path: str | Path, value: str | int) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _read(path: str | Path) -> str:
    with open(path) as f:
        return f.read().strip()


class KernelSwap:
    """A zram swap device and a memory cgroup limited to ``limit`` bytes (root only).

    ``with KernelSwap(limit, zram_bytes) as ks: ks.run(cmd)``; everything set up is torn
    down on exit, also after errors."""

    def __init__(self, limit: int, zram_bytes: int) -> None:
        self.limit = limit
        self.zram_bytes = zram_bytes
        self.zram: int | None = None
        self.cgroup: Path | None = None
        self.cgroup_version = 0
        self.comp_algorithm = ""
        self.other_swaps: list[str] = []

    @staticmethod
    def check() -> None:
        """Raise BenchError naming what is missing for the kernel baseline."""
        if os.geteuid() != 0:
            raise BenchError(
                "the kernel baseline needs root (it sets up zram swap and a memory cgroup): "
                "run as root, or pass --setups uffdio,nolimit"
            )
        if not Path("/sys/class/zram-control").exists():
            subprocess.run(["modprobe", "zram", "num_devices=0"], capture_output=True)
        if not Path("/sys/class/zram-control").exists():
            raise BenchError(
                "zram is not available (no /sys/class/zram-control; modprobe zram failed): "
                "install the kernel's zram module, or pass --setups uffdio,nolimit"
            )
        for tool in ("mkswap", "swapon", "swapoff"):
            if not shutil.which(tool):
                raise BenchError(f"{tool} not found: apt-get install util-linux")
        if _cgroup_root() is None:
            raise BenchError(
                "no memory cgroup controller (neither /sys/fs/cgroup/memory nor cgroup v2 "
                "with memory): mount one, or pass --setups uffdio,nolimit"
            )

    def __enter__(self) -> KernelSwap:
        self.check()
        try:
            self._setup()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _setup(self) -> None:
        self.other_swaps = [
            ln.split()[0] for ln in Path("/proc/swaps").read_text().splitlines()[1:] if ln
        ]
        self.zram = int(_read("/sys/class/zram-control/hot_add"))
        d = Path(f"/sys/block/zram{self.zram}")
        algs = _read(d / "comp_algorithm").replace("[", "").replace("]", "").split()
        if "lz4" in algs:
            _write(d / "comp_algorithm", "lz4")
        self.comp_algorithm = next(
            (a[1:-1] for a in _read(d / "comp_algorithm").split() if a.startswith("[")), ""
        )
        _write(d / "disksize", self.zram_bytes)
        dev = f"/dev/zram{self.zram}"
        for _ in range(50):  # udev may create the node a moment later
            if os.path.exists(dev):
                break
            time.sleep(0.02)
        subprocess.run(["mkswap", dev], check=True, capture_output=True)
        subprocess.run(["swapon", "-p", "32767", dev], check=True, capture_output=True)
        root, self.cgroup_version = _cgroup_root()  # type: ignore[misc]
        self.cgroup = root / f"uffdio-bench-{os.getpid()}"
        self.cgroup.mkdir(exist_ok=True)
        if self.cgroup_version == 1:
            _write(self.cgroup / "memory.limit_in_bytes", self.limit)
        else:
            _write(self.cgroup / "memory.max", self.limit)

    def __exit__(self, *exc: object) -> None:
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
            self.cgroup = None
        if self.zram is not None:
            dev = f"/dev/zram{self.zram}"
            subprocess.run(["swapoff", dev], capture_output=True)
            with contextlib.suppress(OSError):
                _write(f"/sys/block/zram{self.zram}/reset", 1)
            with contextlib.suppress(OSError):
                _write("/sys/class/zram-control/hot_remove", self.zram)
            self.zram = None

    def run(self, cmd: list[str]) -> dict[str, Any]:
        assert self.cgroup is not None
        procs = self.cgroup / "cgroup.procs"
        if self.cgroup_version == 1:
            _write(self.cgroup / "memory.max_usage_in_bytes", 0)
        t0 = time.monotonic()
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            preexec_fn=lambda: _write(procs, os.getpid()),
        )
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise BenchError(f"target failed under kernel swap (exit {p.returncode}): {p.stdout}")
        res = _target_result(p.stdout)
        res["command_wall_s"] = round(wall, 3)
        peak = "memory.max_usage_in_bytes" if self.cgroup_version == 1 else "memory.peak"
        with contextlib.suppress(OSError, ValueError):
            res["resident_peak_bytes"] = int(_read(self.cgroup / peak))
        return res


def _cgroup_root() -> tuple[Path, int] | None:
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists():
        return v1, 1
    v2 = Path("/sys/fs/cgroup")
    ctl = v2 / "cgroup.controllers"
    if ctl.exists() and "memory" in ctl.read_text().split():
        sub = (v2 / "cgroup.subtree_control").read_text().split()
        if "memory" not in sub:
            with contextlib.suppress(OSError):
                _write(v2 / "cgroup.subtree_control", "+memory")
        return v2, 2
    return None


# -- uffdio and no-limit runs ----------------------------------------------------------


def run_uffdio(cmd: list[str], limit: int, store: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="uffdio-bench-") as tmp:
        stats_path = Path(tmp) / "stats.json"
        full = [
            sys.executable,
            "-m",
            "uffdio",
            "run",
            "--quiet",
            "--limit",
            str(limit),
            "--store",
            store,
            "--stats-json",
            str(stats_path),
            "--",
            *cmd,
        ]
        t0 = time.monotonic()
        p = subprocess.run(full, capture_output=True, text=True)
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise BenchError(
                f"target failed under uffdio (exit {p.returncode}): {p.stdout}{p.stderr[-2000:]}"
            )
        res = _target_result(p.stdout)
        st = json.loads(stats_path.read_text())
    res["command_wall_s"] = round(wall, 3)
    res["resident_peak_bytes"] = st.get("peak_resident_bytes")
    res["uffd_faults"] = st.get("faults", {}).get("total")
    res["pages_evicted"] = st.get("pages_evicted")
    res["pages_swapped_in"] = st.get("pages_swapped_in")
    res["pages_read_ahead"] = st.get("pages_read_ahead")
    res["fault_latency_us"] = st.get("fault_latency_us")
    res["compression_ratio"] = st.get("compression_ratio")
    return res


def run_nolimit(cmd: list[str]) -> dict[str, Any]:
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise BenchError(f"target failed with no limit (exit {p.returncode}): {p.stdout}")
    res = _target_result(p.stdout)
    res["command_wall_s"] = round(wall, 3)
    res["resident_peak_bytes"] = res.get("maxrss_kb", 0) * 1024
    return res


# -- the benchmark ---------------------------------------------------------------------


def bench_swap(
    workloads: list[str],
    size: int,
    limit: int,
    store: str = "memory",
    runs: int = 3,
    setups: tuple[str, ...] = SETUPS,
    accesses: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the side-by-side benchmark; returns the JSON-able result."""
    if limit >= size:
        raise BenchError(f"--limit ({limit} bytes) must be below --size ({size} bytes)")
    _check_size_and_store(size, store)
    exe = build_target()
    ks: KernelSwap | None = None
    res: dict[str, Any] = {
        "benchmark": "swap",
        "size_bytes": size,
        "limit_bytes": limit,
        "store": store,
        "runs_per_setup": runs,
        "setups": list(setups),
        "machine": _machine(),
        "workloads": {},
        "note": "time_s = the target's own fill + access time (manager start-up not "
        "counted; command_wall_s has it); ratio = uffdio time_s / kernel time_s, median "
        "over rounds that ran both; every page read was checked by the target",
    }
    with contextlib.ExitStack() as stack:
        if "kernel" in setups:
            ks = stack.enter_context(KernelSwap(limit, zram_bytes=2 * size))
            res["kernel"] = {
                "cgroup_version": ks.cgroup_version,
                "zram_comp_algorithm": ks.comp_algorithm,
                "other_swap_devices": ks.other_swaps,
                "swappiness": _read("/proc/sys/vm/swappiness"),
            }
        for w in workloads:
            n = accesses if accesses is not None else default_accesses(w, size)
            cmd = [str(exe), str(size >> 20), w, str(n)]
            runs_out: list[dict[str, Any]] = []
            for r in range(runs):
                for s in setups:
                    if s == "kernel":
                        assert ks is not None
                        out = ks.run(cmd)
                    elif s == "uffdio":
                        out = run_uffdio(cmd, limit, store)
                    else:
                        out = run_nolimit(cmd)
                    out["setup"] = s
                    out["round"] = r
                    out["time_s"] = round(out["fill_s"] + out["work_s"], 4)
                    runs_out.append(out)
                    if progress:
                        progress(
                            f"{w} round {r + 1}/{runs} {s}: {out['time_s']:.2f} s "
                            f"(fill {out['fill_s']:.2f} + access {out['work_s']:.2f})"
                        )
            res["workloads"][w] = _summarise(runs_out, n)
    return res


def _summarise(runs: list[dict[str, Any]], accesses: int) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["setup"], []).append(r)
    out: dict[str, Any] = {"accesses": accesses, "runs": runs}
    for s, rs in by.items():
        out[f"{s}_time_s_median"] = round(statistics.median(x["time_s"] for x in rs), 4)
        out[f"{s}_work_s_median"] = round(statistics.median(x["work_s"] for x in rs), 4)
    ratios = []
    rounds = {r["round"] for r in runs}
    for rnd in sorted(rounds):
        k = [x for x in by.get("kernel", []) if x["round"] == rnd]
        u = [x for x in by.get("uffdio", []) if x["round"] == rnd]
        if k and u:
            ratios.append(u[0]["time_s"] / k[0]["time_s"])
    out["ratio_median"] = round(statistics.median(ratios), 3) if ratios else None
    out["ratios"] = [round(x, 3) for x in ratios]
    return out


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": mem,
        "python": platform.python_version(),
    }


def plot(res: dict[str, Any], path: str) -> None:
    """Bar chart: time per workload for each setup (median of the rounds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError(
            "--plot needs matplotlib: pip install 'uffdio[bench]' (or pip install matplotlib)"
        ) from None
    ws = list(res["workloads"])
    setups = [s for s in SETUPS if s in res["setups"]]
    colors = {"kernel": "#4c72b0", "uffdio": "#dd8452", "nolimit": "#8c8c8c"}
    labels = {
        "kernel": "kernel swap (zram, cgroup limit)",
        "uffdio": f"uffdio run --store {res['store']}",
        "nolimit": "no limit",
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(setups)
    for i, s in enumerate(setups):
        ys = [res["workloads"][w].get(f"{s}_time_s_median", 0) for w in ws]
        xs = [j + (i - (len(setups) - 1) / 2) * width for j in range(len(ws))]
        bars = ax.bar(xs, ys, width, label=labels[s], color=colors[s])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(ws)), ws)
    ax.set_ylabel("time (s), median of rounds")
    m = res["machine"]
    ax.set_title(
        f"{res['size_bytes'] >> 20} MiB under a {res['limit_bytes'] >> 20} MiB limit "
        f"({m['cpus']} CPUs, Linux {m['kernel']})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- eviction throughput ----------------------------------------------------------------


async def bench_evict(size: int, store: str, rounds: int = 3, sparse: int = 8) -> dict[str, Any]:
    """Evict ``size`` bytes of a filled target into ``store`` and time it, ``rounds``
    times (every page is read back and checked by the target after each round)."""
    from .manage import Manager
    from .swap import Swap

    _check_size_and_store(size, store)
    exe = build_target()
    out: dict[str, Any] = {
        "benchmark": "evict",
        "size_bytes": size,
        "store": store,
        "sparse": sparse,
        "machine": _machine(),
        "rounds": [],
    }
    for _ in range(rounds):
        sw = Swap(store=store, limit=None, policy="none")
        try:
            async with Manager(swap=sw) as m:
                env = dict(os.environ, SWAPBENCH_PAUSE="1", SWAPBENCH_SPARSE=str(sparse))
                cmd = [str(exe), str(size >> 20), "seq", str(size // PAGE)]
                prog = m.spawn(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                line = await _readline(prog)
                if not line.startswith("filled"):
                    raise BenchError(f"benchmark target: unexpected output {line!r}")
                mp = await prog.process()
                await sw.measure()
                before = sw.last_resident
                t0 = time.perf_counter()
                n = await sw.evict(mp, size // PAGE)
                dt = time.perf_counter() - t0
                st = sw.statistics()
                await _send(prog, b"go\n")
                rest = await _readall(prog)
                code = await prog.wait()
                if code != 0:
                    raise BenchError(f"benchmark target failed after eviction: {rest}")
                res = _target_result(rest)
                out["rounds"].append(
                    {
                        "pages_evicted": n,
                        "resident_before_bytes": before,
                        "seconds": round(dt, 4),
                        "mb_per_s": round(n * PAGE / dt / 1e6, 1),
                        "store_bytes": st["store_bytes"],
                        "compression_ratio": st["compression_ratio"],
                        "pages_checked_after": res["pages_checked"],
                        "phase_seconds": st["evict_seconds"],
                    }
                )
        finally:
            sw.close()
    out["mb_per_s_median"] = statistics.median(r["mb_per_s"] for r in out["rounds"])
    return out


async def _readline(prog: Any) -> str:
    import anyio

    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await anyio.to_thread.run_sync(os.read, prog.popen.stdout.fileno(), 1)
        if not chunk:
            break
        buf += chunk
    return buf.decode()


async def _send(prog: Any, data: bytes) -> None:
    import anyio

    await anyio.to_thread.run_sync(os.write, prog.popen.stdin.fileno(), data)


async def _readall(prog: Any) -> str:
    import anyio

    chunks = []
    while True:
        c = await anyio.to_thread.run_sync(os.read, prog.popen.stdout.fileno(), 65536)
        if not c:
            break
        chunks.append(c)
    return b"".join(chunks).decode()


# -- CLI --------------------------------------------------------------------------------


def add_parsers(bsub: Any) -> None:
    s = bsub.add_parser(
        "swap",
        help="uffdio vs kernel swap (zram in a memory cgroup) vs no limit, side by side",
    )
    s.add_argument("--workload", default="all", help="seq, rand, zipf, mixed, a comma list, or all")
    s.add_argument("--size", default="512M", help="the target's data (default 512M)")
    s.add_argument("--limit", default="128M", help="the memory limit (default 128M)")
    s.add_argument("--store", default="memory", help="uffdio's store (default memory)")
    s.add_argument("--runs", type=int, default=3, help="rounds per setup (default 3)")
    s.add_argument(
        "--setups", default=",".join(SETUPS), help="comma list of kernel, uffdio, nolimit"
    )
    s.add_argument("--accesses", type=int, help="accesses of the timed phase (default by workload)")
    s.add_argument("--json", action="store_true", help="print only the JSON result")
    s.add_argument("--plot", metavar="PNG", help="draw the bar chart (needs matplotlib)")
    e = bsub.add_parser("evict", help="eviction throughput (MB/s) into a store")
    e.add_argument("--size", default="256M", help="data evicted per round (default 256M)")
    e.add_argument("--store", default="memory", help="the store (default memory)")
    e.add_argument("--rounds", type=int, default=3)
    e.add_argument(
        "--sparse",
        type=int,
        default=8,
        choices=[1, 2, 4, 8, 16],
        help="one word in N of each page is random, the rest constant: 8 (default) "
        "compresses about 5x with LZ4, 2 about 1.5x, 1 not at all",
    )
    e.add_argument("--json", action="store_true", help="print only the JSON result")
    d = bsub.add_parser(
        "dirty",
        help="dirty-page tracking: write-protect faults vs WP_ASYNC + PAGEMAP_SCAN",
    )
    d.add_argument("--size", default="64M", help="the tracked range (default 64M)")
    d.add_argument(
        "--fractions",
        default="0.01,0.1,1",
        help="fractions of its pages written per round, a comma list (default 0.01,0.1,1)",
    )
    d.add_argument("--pattern", default="rand", choices=["seq", "rand"])
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--json", action="store_true", help="print only the JSON result")
    s.set_defaults(func=run_swap)
    e.set_defaults(func=run_evict)
    d.set_defaults(func=run_dirty)


def _check_size_and_store(size: int, store: str) -> None:
    """The target takes whole MiB; a bad store spec is named before anything runs."""
    from .swap import open_store

    if size < (1 << 20) or size % (1 << 20):
        raise BenchError(f"--size {size} bytes: a whole number of MiB (e.g. 256M)")
    try:
        open_store(store).close()
    except (ValueError, OSError) as exc:
        raise BenchError(f"--store {store}: {exc}") from None


def _sizes(args: argparse.Namespace, *names: str) -> list[int]:
    from .swap import parse_size

    try:
        return [parse_size(getattr(args, n)) for n in names]
    except ValueError as exc:
        raise BenchError(str(exc)) from None


def run_swap(args: argparse.Namespace) -> int:
    try:
        size, limit = _sizes(args, "size", "limit")
        ws = list(WORKLOADS) if args.workload == "all" else args.workload.split(",")
        bad = [w for w in ws if w not in WORKLOADS]
        if bad:
            raise BenchError(f"unknown workload {bad[0]!r}: choose from {', '.join(WORKLOADS)}")
        setups = tuple(s for s in args.setups.split(",") if s)
        if not setups or any(s not in SETUPS for s in setups):
            raise BenchError(f"--setups: a comma list of {', '.join(SETUPS)}")
        if args.runs < 1:
            raise BenchError("--runs must be at least 1")
        progress = None if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
        res = bench_swap(ws, size, limit, args.store, args.runs, setups, args.accesses, progress)
        if args.plot:
            plot(res, args.plot)
    except BenchError as exc:
        print(f"uffdio bench swap: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{size >> 20} MiB under {limit >> 20} MiB, store {args.store}; median time (s)")
        print(f"{'workload':9s}" + "".join(f"{s:>10s}" for s in setups) + f"{'ratio':>8s}")
        for w, r in res["workloads"].items():
            cells = "".join(f"{r.get(f'{s}_time_s_median', 0):10.2f}" for s in setups)
            ratio = r["ratio_median"]
            print(f"{w:9s}{cells}{'' if ratio is None else f'{ratio:8.2f}'}")
    return 0


def run_evict(args: argparse.Namespace) -> int:
    import anyio

    try:
        (size,) = _sizes(args, "size")
        if args.rounds < 1:
            raise BenchError("--rounds must be at least 1")
        res = anyio.run(bench_evict, size, args.store, args.rounds, args.sparse)
    except BenchError as exc:
        print(f"uffdio bench evict: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for r in res["rounds"]:
            print(
                f"evicted {r['pages_evicted']} pages in {r['seconds']:.3f} s: "
                f"{r['mb_per_s']:.0f} MB/s (store x{r['compression_ratio']})"
            )
        print(f"median {res['mb_per_s_median']:.0f} MB/s into {args.store}")
    return 0


# -- dirty-page tracking -------------------------------------------------------------------

DIRTY_MODES = ("bare", "wp", "async")


def bench_dirty(size: int, fractions: list[float], pattern: str, rounds: int) -> dict[str, Any]:
    """Run progs/dirtybench.c: per fraction of pages written, the cost of learning which
    pages were written with write-protect faults (what uffdio does for CLEAN pages) and
    with WP_ASYNC + PAGEMAP_SCAN, beside the bare writes; modes alternate within a round."""
    if size < (1 << 20) or size % (1 << 20):
        raise BenchError(f"--size {size} bytes: a whole number of MiB (e.g. 64M)")
    exe = build_target(name="dirtybench")
    out: dict[str, Any] = {
        "benchmark": "dirty",
        "size_bytes": size,
        "pattern": pattern,
        "machine": _machine(),
        "fractions": {},
    }
    for f in fractions:
        r = subprocess.run(
            [str(exe), str(size >> 20), repr(f), str(rounds), pattern],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise BenchError(f"dirtybench {size >> 20} MiB, fraction {f}: {r.stderr.strip()}")
        runs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        summary: dict[str, Any] = {"runs": runs}
        for mode in DIRTY_MODES:
            mine = [x for x in runs if x["mode"] == mode]
            written = mine[0]["written"]
            tracked = [x["write_s"] + x["collect_s"] + x["rearm_s"] for x in mine]
            summary[mode] = {
                "write_s_median": statistics.median(x["write_s"] for x in mine),
                "total_s_median": statistics.median(tracked),
                "us_per_written_page": round(statistics.median(tracked) / written * 1e6, 3),
            }
            if mode == "async":
                summary[mode]["scan_clean_s_median"] = statistics.median(
                    x["scan_clean_s"] for x in mine
                )
        bare = summary["bare"]["total_s_median"]
        for mode in ("wp", "async"):
            m = summary[mode]
            m["overhead_us_per_written_page"] = round(
                (m["total_s_median"] - bare) / runs[0]["written"] * 1e6, 3
            )
        summary["cheaper"] = min(("wp", "async"), key=lambda m: summary[m]["total_s_median"])
        out["fractions"][str(f)] = summary
    return out


def run_dirty(args: argparse.Namespace) -> int:
    try:
        (size,) = _sizes(args, "size")
        try:
            fractions = [float(x) for x in args.fractions.split(",") if x]
        except ValueError:
            fractions = []
        if not fractions or any(not 0 < f <= 1 for f in fractions):
            raise BenchError(f"--fractions {args.fractions!r}: numbers in (0, 1], comma separated")
        if args.rounds < 1:
            raise BenchError("--rounds must be at least 1")
        res = bench_dirty(size, fractions, args.pattern, args.rounds)
    except BenchError as exc:
        print(f"uffdio bench dirty: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{size >> 20} MiB tracked, {args.pattern} writes; overhead per written page (us)")
    print(f"{'fraction':>9s}{'wp faults':>12s}{'wp_async':>12s}{'scan, clean (ms)':>18s}")
    for f, r in res["fractions"].items():
        print(
            f"{f:>9s}{r['wp']['overhead_us_per_written_page']:12.2f}"
            f"{r['async']['overhead_us_per_written_page']:12.2f}"
            f"{r['async']['scan_clean_s_median'] * 1e3:18.3f}"
        )
    return 0
