"""Print the README tables from bench/results/*.json (make bench runs it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    d = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
    sw = json.loads((d / "swap-512M-128M.json").read_text())
    m = sw["machine"]
    print(
        f"{sw['size_bytes'] >> 20} MiB under {sw['limit_bytes'] >> 20} MiB, store "
        f"{sw['store']}, {sw['runs_per_setup']} alternating rounds; {m['cpus']} CPUs "
        f"({m['cpu_model']}), Linux {m['kernel']}; kernel: zram "
        f"{sw.get('kernel', {}).get('zram_comp_algorithm', '-')} in a cgroup "
        f"v{sw.get('kernel', {}).get('cgroup_version', '-')} memory limit\n"
    )
    print("| workload | kernel swap (s) | uffdio (s) | no limit (s) | uffdio / kernel (median) |")
    print("|---|---|---|---|---|")
    for w, r in sw["workloads"].items():
        print(
            f"| {w} | {r.get('kernel_time_s_median', '-')} | {r.get('uffdio_time_s_median', '-')}"
            f" | {r.get('nolimit_time_s_median', '-')} | {r['ratio_median']} |"
        )
    print()
    for name in ("evict-sparse8", "evict-sparse2", "evict-file"):
        f = d / f"{name}.json"
        if f.exists():
            ev = json.loads(f.read_text())
            ratio = ev["rounds"][0]["compression_ratio"]
            print(
                f"- eviction into the store {ev['store']}, {ev['size_bytes'] >> 20} MiB"
                + (f", data compressing x{ratio}" if ratio else "")
                + f": median {ev['mb_per_s_median']:.0f} MB/s"
            )
    f = d / "dirty-64M.json"
    if f.exists():
        dt = json.loads(f.read_text())
        print(
            f"\nDirty tracking, {dt['size_bytes'] >> 20} MiB, {dt['pattern']} writes "
            "(overhead per written page over the bare writes, median of rounds)\n"
        )
        print(
            "| pages written | write-protect faults (us) | WP_ASYNC + PAGEMAP_SCAN (us) |"
            " one scan, nothing written (ms) |"
        )
        print("|---|---|---|---|")
        for fr, r in dt["fractions"].items():
            print(
                f"| {float(fr):.0%} | {r['wp']['overhead_us_per_written_page']} | "
                f"{r['async']['overhead_us_per_written_page']} | "
                f"{r['async']['scan_clean_s_median'] * 1e3:.3f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
