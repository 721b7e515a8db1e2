"""uffdio bench swap / bench evict: real runs at small sizes (kernel zram + memory cgroup
baseline, uffdio run, no limit), their JSON, the teardown, bad input.  No timing is
asserted: the numbers are for the README, the checks are on structure and content."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

UFFDIO = [sys.executable, "-m", "uffdio"]
MIB = 1 << 20


def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*UFFDIO, "bench", *args], capture_output=True, text=True, timeout=timeout
    )


def kernel_ok() -> bool:
    return (
        os.geteuid() == 0
        and Path("/sys/class/zram-control").exists()
        and (
            Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
            or "memory" in Path("/sys/fs/cgroup/cgroup.controllers").read_text(errors="ignore")
        )
    )


def zram_swaps() -> list[str]:
    return [
        ln.split()[0] for ln in Path("/proc/swaps").read_text().splitlines()[1:] if "zram" in ln
    ]


def test_bench_swap_side_by_side(tmp_path: Path) -> None:
    """All three setups on two workloads; every access checked by the target; the
    kernel's zram device and cgroup are gone afterwards; the plot is drawn."""
    setups = "kernel,uffdio,nolimit" if kernel_ok() else "uffdio,nolimit"
    swaps_before = zram_swaps()
    png = tmp_path / "b.png"
    r = run(
        "swap",
        "--size", "24M",
        "--limit", "8M",
        "--workload", "seq,mixed",
        "--runs", "1",
        "--setups", setups,
        "--json",
        *(["--plot", str(png)] if _has_matplotlib() else []),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["workloads"]) == {"seq", "mixed"}
    for w, wl in res["workloads"].items():
        assert len(wl["runs"]) == len(setups.split(","))
        for run_ in wl["runs"]:
            assert run_["pages_checked"] == run_["accesses"] == wl["accesses"] > 0, (w, run_)
            assert run_["time_s"] > 0
        by = {x["setup"]: x for x in wl["runs"]}
        # the limit held: the kernel's cgroup peak and uffdio's managed peak (8 MiB
        # documented slack for uffdio, as in test_swap.py)
        assert by["uffdio"]["resident_peak_bytes"] <= 8 * MIB + 8 * MIB
        assert by["uffdio"]["pages_evicted"] > 0
        assert by["nolimit"]["resident_peak_bytes"] >= 24 * MIB
        if "kernel" in by:
            assert by["kernel"]["resident_peak_bytes"] <= 8 * MIB
            assert by["kernel"]["majflt"] > 0  # it did swap
            assert wl["ratio_median"] is not None and wl["ratio_median"] > 0
    if "kernel" in setups:
        assert res["kernel"]["zram_comp_algorithm"]
    assert zram_swaps() == swaps_before
    assert not list(Path("/sys/fs/cgroup/memory").glob("uffdio-bench-*"))
    if _has_matplotlib():
        assert png.stat().st_size > 1000


def test_bench_evict_checks_every_page() -> None:
    r = run("evict", "--size", "16M", "--rounds", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    (rnd,) = res["rounds"]
    assert rnd["pages_evicted"] >= 16 * MIB // 4096 * 0.9
    assert rnd["pages_checked_after"] == 16 * MIB // 4096  # read back and checked
    assert rnd["compression_ratio"] > 2  # --sparse 8: compressible
    assert res["mb_per_s_median"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "8M", "--limit", "16M"], "must be below --size"),
        (["--workload", "stride"], "unknown workload 'stride'"),
        (["--setups", "kernel,vm"], "--setups"),
        (["--size", "lots"], "not a size"),
        (["--size", "8M", "--limit", "4M", "--store", "tape:x"], "unknown store 'tape:x'"),
    ],
)
def test_bench_swap_bad_input(args: list[str], message: str) -> None:
    r = run("swap", *args, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "1500K"], "a whole number of MiB"),
        (["--store", "tape:x"], "unknown store 'tape:x'"),
    ],
)
def test_bench_evict_bad_input(args: list[str], message: str) -> None:
    r = run("evict", *args, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr


def test_bench_dirty_tracks_exactly_the_written_pages() -> None:
    """bench dirty: for each fraction, write-protect faults and WP_ASYNC + PAGEMAP_SCAN each
    found exactly the pages written (the C program exits 1 otherwise), every write landed,
    and the JSON carries every run and the per-page figures."""
    r = run("dirty", "--size", "8M", "--fractions", "0.05,1", "--rounds", "2", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["fractions"]) == {"0.05", "1.0"}
    for f, want in (("0.05", int(0.05 * 2048)), ("1.0", 2048)):
        fr = res["fractions"][f]
        assert len(fr["runs"]) == 6  # 3 modes x 2 rounds
        for x in fr["runs"]:
            assert x["written"] == want and x["pages"] == 2048
            # write-protect faults: one message handled per written page; WP_ASYNC: none
            assert x["faults_handled"] == (want if x["mode"] == "wp" else 0)
        for mode in ("wp", "async"):
            assert fr[mode]["total_s_median"] > 0
            assert "overhead_us_per_written_page" in fr[mode]
        assert fr["cheaper"] in ("wp", "async")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "1500K"], "a whole number of MiB"),
        (["--fractions", "0.5,2"], "--fractions"),
        (["--fractions", "half"], "--fractions"),
        (["--rounds", "0"], "--rounds"),
    ],
)
def test_bench_dirty_bad_input(args: list[str], message: str) -> None:
    r = run("dirty", *args, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("limit", ["1G", "8M"])
def test_first_touch_fault_around(tmp_path: Path, limit: str) -> None:
    """Sequential first touches are served a window of zero pages at a time: far fewer
    faults than pages; under a small limit the window is capped by the room left, the
    limit holds, and every page the program reads back is right."""
    from uffdio.benchswap import build_target

    exe = build_target()
    stats = tmp_path / "s.json"
    r = subprocess.run(
        [*UFFDIO, "run", "--quiet", "--limit", limit, "--stats-json", str(stats), "--",
         str(exe), "32", "seq", str(2 * 32 * 256)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["pages_checked"] == 2 * 32 * 256
    st = json.loads(stats.read_text())
    pages = 32 * 256
    if limit == "1G":
        assert st["faults"]["first_touch"] < pages // 8, st["faults"]
        assert st["pages_fault_around"] > pages // 2
    else:
        assert st["peak_resident_bytes"] <= 16 * MIB
        assert st["pages_evicted"] > 0
