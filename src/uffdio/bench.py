"""``uffdio bench``: benchmarks that print numbers, compared side by side in one run.

``uffdio bench faults`` serves N MISSING faults of a separate process (4 KiB pages, touched
one by one by a C loop in the target, which times each touch) three ways:

- ``floor``: the simplest correct handler, built with the project (csrc/floor.c): one thread
  doing poll(), read() and UFFDIO_COPY, no busy waiting, no io_uring;
- ``resolver``: uffdio's C resolver (a rule covers the range; engine thread, io_uring reads);
- ``coroutine``: every fault dispatched to a Python coroutine handler (engine inline on the
  event loop) that resolves it with ``Userfaultfd.copy_nowait``.

The paths alternate round by round so that drift of this shared machine hits all of them
alike; latencies of all rounds are pooled per path.  The CPU placement is the same for the
three paths and is stated in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from array import array
from typing import Any

import anyio

from ._constants import PAGE_SIZE, Mode
from ._errors import check
from ._lib import ffi, lib
from ._target import Target
from ._uffd import FaultBatch

PATHS = ("floor", "resolver", "coroutine")

PLACEMENTS = {
    # name: (target cpu, manager cpu, description)
    "same": (
        0,
        0,
        "target and every manager thread (event loop, engine thread, floor thread) pinned to CPU 0",
    ),
    "split": (0, 1, "target pinned to CPU 0; every manager thread pinned to CPU 1"),
    "none": (None, None, "no pinning: the scheduler places every thread"),
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks that print JSON")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    f = bsub.add_parser("faults", help="fault round trip: bare C floor vs C resolver vs coroutine")
    f.add_argument("--pages", type=int, default=20000, help="faults per path and round")
    f.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    f.add_argument(
        "--placement",
        choices=sorted(PLACEMENTS),
        default="same",
        help="CPU placement, the same for all paths (default: same)",
    )
    f.add_argument("--json", action="store_true", help="print only JSON")
    f.set_defaults(func=run_faults)
    from . import benchswap

    benchswap.add_parsers(bsub)


def _percentile(sorted_us: list[float], q: float) -> float:
    i = min(len(sorted_us) - 1, max(0, int(round(q * (len(sorted_us) - 1)))))
    return sorted_us[i]


def _summary(lat_ns: array[int]) -> dict[str, float]:
    us = sorted(x / 1000.0 for x in lat_ns)
    return {
        "median_us": round(statistics.median(us), 2),
        "p99_us": round(_percentile(us, 0.99), 2),
        "mean_us": round(statistics.fmean(us), 2),
        "faults": len(us),
    }


async def _one(
    path: str, pages: int, tcpu: int | None, mcpu: int | None, src: bytearray, srcaddr: int
) -> array[int]:
    """Serve ``pages`` faults of a fresh target by ``path``; return per-touch latencies (ns)."""
    length = pages * PAGE_SIZE
    with Target(cpu=tcpu) as t, tempfile.NamedTemporaryFile(prefix="uffdio-lat-") as lf:
        [addr] = t.cmd("map", length)
        u = t.open_uffd(0)
        t.cmd("register", addr, length, int(Mode.MISSING))
        with u:
            if path == "floor":
                err = ffi.new("int *")
                fl = lib.uf_floor_start(u.fileno(), srcaddr, -1 if mcpu is None else mcpu, err)
                if fl == ffi.NULL:
                    check(err[0], "floor thread")
                try:
                    await t.acmd("touch", addr, pages, 0, lf.name)
                finally:
                    served = lib.uf_floor_stop(fl)
                if served != pages:
                    raise RuntimeError(f"floor served {served} of {pages} faults")
            else:
                if path == "resolver":
                    u.resolver.buffer(addr, memoryview(src)[:length])
                else:

                    def resolve(batch: FaultBatch) -> None:
                        for a in batch.addresses:
                            u.copy_nowait(a & ~(PAGE_SIZE - 1), srcaddr, PAGE_SIZE)

                    async def handler(batch: FaultBatch) -> None:
                        resolve(batch)

                    u.on_fault(handler)
                async with u.serving():
                    await t.acmd("touch", addr, pages, 0, lf.name)
                st = u.statistics()
                key = "resolved" if path == "resolver" else "forwarded"
                if st[key] < pages:
                    raise RuntimeError(
                        f"{path}: {st[key]} of {pages} faults went the expected way: {st}"
                    )
        lat: array[int] = array("Q")
        with open(lf.name, "rb") as f:
            lat.frombytes(f.read())
        return lat


async def bench_faults(
    pages: int, rounds: int, placement: str, progress: Any = None
) -> dict[str, Any]:
    tcpu, mcpu, desc = PLACEMENTS[placement]
    ncpu = os.cpu_count() or 1
    if mcpu is not None and mcpu >= ncpu or tcpu is not None and tcpu >= ncpu:
        raise SystemExit(
            f"placement {placement!r} needs {max(mcpu or 0, tcpu or 0) + 1} CPUs; "
            f"this machine has {ncpu}: use --placement same or none"
        )
    old_aff = os.sched_getaffinity(0)
    if mcpu is not None:
        os.sched_setaffinity(0, {mcpu})  # threads started from here on inherit it
    try:
        # one source buffer, as long as the largest range (the resolver's rule needs that)
        src = bytearray(pages * PAGE_SIZE)
        srcaddr = int(ffi.cast("uintptr_t", ffi.from_buffer(src)))
        lib.uf_pattern(srcaddr, len(src), 1, srcaddr)
        pooled: dict[str, array[int]] = {p: array("Q") for p in PATHS}
        per_round: list[dict[str, float]] = []
        for r in range(rounds):
            row: dict[str, float] = {}
            order = PATHS if r % 2 == 0 else tuple(reversed(PATHS))
            for p in order:
                t0 = time.perf_counter()
                lat = await _one(p, pages, tcpu, mcpu, src, srcaddr)
                pooled[p].extend(lat)
                row[p] = round(statistics.median(lat) / 1000.0, 2)
                if progress:
                    progress(
                        f"round {r + 1}/{rounds} {p:9s} median {row[p]:7.2f} us "
                        f"({time.perf_counter() - t0:.1f} s)"
                    )
            per_round.append(row)
    finally:
        os.sched_setaffinity(0, old_aff)
    res: dict[str, Any] = {
        "pages": pages,
        "rounds": rounds,
        "placement": {
            "name": placement,
            "description": desc,
            "target_cpu": tcpu,
            "manager_cpu": mcpu,
        },
        "paths": {},
        "median_us_per_round": per_round,
        "machine": {
            "kernel": platform.release(),
            "cpus": ncpu,
            "python": platform.python_version(),
        },
        "note": "latency of one touch of a missing page, timed in the target; "
        "ratio = path median / floor median, all paths in this run",
    }
    floor = _summary(pooled["floor"])
    res["paths"]["floor"] = floor
    for p in ("resolver", "coroutine"):
        s = _summary(pooled[p])
        s["ratio"] = round(s["median_us"] / floor["median_us"], 3)
        res["paths"][p] = s
    return res


def run_faults(args: argparse.Namespace) -> int:
    if args.pages < 1 or args.rounds < 1:
        print("uffdio bench faults: --pages and --rounds must be positive", file=sys.stderr)
        return 2
    progress = None if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    res = anyio.run(bench_faults, args.pages, args.rounds, args.placement, progress)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(
            f"{res['pages']} faults x {res['rounds']} rounds; placement: "
            f"{res['placement']['description']}"
        )
        print(f"{'path':10s} {'median us':>10s} {'p99 us':>10s} {'ratio':>7s}")
        for p in PATHS:
            s = res["paths"][p]
            print(f"{p:10s} {s['median_us']:10.2f} {s['p99_us']:10.2f} {s.get('ratio', 1.0):7.2f}")
    return 0
