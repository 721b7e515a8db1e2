"""uffdio's main demo: a program with 256 MiB of data runs under a 32 MiB limit.

The program (tests/progs/swaptest.c, compiled here) fills 256 MiB, then 4 threads read
and write it with a skewed (zipf) access pattern, checking every page on every access and
all of them at the end.  `uffdio run --limit 32M` keeps its resident memory under 32 MiB:
cold pages go to an LZ4-compressed store in this process and come back on the next touch.
A live status line shows resident memory, the swap-in rate and the store; at the end the
statistics JSON is summarised.

    make demo        (or: python examples/swap_demo.py [--mib 256] [--limit 32M] [--store SPEC])
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROG = HERE.parent / "tests" / "progs" / "swaptest.c"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="data size in MiB (default 256)")
    ap.add_argument("--limit", default="32M", help="uffdio run --limit (default 32M)")
    ap.add_argument("--store", default="memory", help="uffdio run --store (default memory)")
    ap.add_argument("--pattern", default="zipf", choices=["seq", "rand", "zipf"])
    ap.add_argument("--ops", type=int, default=20000, help="accesses per thread")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="uffdio-demo-") as tmp:
        exe = Path(tmp) / "swaptest"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(PROG), "-lm"], check=True)
        stats = Path(tmp) / "stats.json"
        cmd = [
            sys.executable,
            "-m",
            "uffdio",
            "run",
            "--limit",
            args.limit,
            "--store",
            args.store,
            "--stats-json",
            str(stats),
            "--",
            str(exe),
            str(args.mib),
            args.pattern,
            str(args.ops),
            "4",
            "20",
        ]
        print(
            "$ uffdio run --limit",
            args.limit,
            "--store",
            args.store,
            "-- swaptest",
            *cmd[-5:],
            flush=True,
        )
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            print(f"demo: the program failed (exit {rc})", file=sys.stderr)
            return 1
        st = json.loads(stats.read_text())
    lat = st["fault_latency_us"]
    print(
        f"\n{args.mib} MiB of data, limit {st['limit_bytes'] >> 20} MiB, {st['wall_s']} s:"
        f" managed resident peak {st['peak_resident_bytes'] / (1 << 20):.1f} MiB\n"
        f"pages evicted {st['pages_evicted']} ({st['pages_evicted_clean']} clean, without a copy;"
        f" {st['pages_evicted_zero']} all-zero, not stored), swapped in {st['pages_swapped_in']}"
        f" ({st['pages_read_ahead']} read ahead)\n"
        f"swap-in latency in the manager: p50 {lat['p50']} us, p99 {lat['p99']} us\n"
        f"store {st['store']}: {st['store_bytes_peak'] / (1 << 20):.1f} MiB at its peak"
        + (f" (x{st['compression_ratio']} compression)" if st["compression_ratio"] else "")
        + f"; page-table metadata {st['metadata_bytes_per_page']} bytes per managed page\n"
        "every page was verified by the program on every access: no byte lost."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
