"""Lazy restore: serve a process's memory on demand from a snapshot file.

The way VM snapshot restore and post-copy migration work: the restored process starts at once
with its memory missing; each page is read from the snapshot the first time it is touched.

1. A "source" process fills a region; uffdio snapshots it with batched process_vm_readv
   (one call per 1024 pages) into a file.
2. A fresh process maps an empty region and registers it with a userfaultfd.
3. uffdio installs one resolver rule: "this range comes from that file".  Every fault is then
   served in C: a read through the io_uring ring into a staging buffer, then UFFDIO_COPY
   (``--chunk`` pages at a time: read-ahead).  Python is not called per fault.
4. The restored process touches its memory; uffdio reads it back and checks every byte
   against the snapshot.

    python examples/lazy_restore.py [--mib 64] [--chunk 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import anyio

import uffdio
from uffdio._target import Target

PAGE = uffdio.PAGE_SIZE


def snapshot(t: Target, addr: int, length: int, path: str) -> None:
    batch = 1024 * PAGE
    buf = bytearray(batch)
    with open(path, "wb") as f:
        for off in range(0, length, batch):
            n = min(batch, length - off)
            ranges = [(addr + off + i, PAGE) for i in range(0, n, PAGE)]
            got = uffdio.read_memory(t.pid, ranges, buf)
            assert got == n, f"short read {got} of {n}"
            f.write(buf[:n])
        os.fchmod(f.fileno(), 0o600)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="size of the process's memory")
    ap.add_argument("--chunk", type=int, default=16, help="pages installed per fault")
    args = ap.parse_args()
    length = args.mib << 20

    with tempfile.TemporaryDirectory(prefix="uffdio-restore-") as d:
        snap = os.path.join(d, "memory.snap")
        with Target() as src:
            [saddr] = src.cmd("map", length)
            src.cmd("fill", saddr, length, 42)
            t0 = time.perf_counter()
            snapshot(src, saddr, length, snap)
            print(f"snapshot: {args.mib} MiB in {time.perf_counter() - t0:.2f} s -> {snap}")

        with Target() as dst, open(snap, "rb") as f:
            [addr] = dst.cmd("map", length)
            u = dst.open_uffd(uffdio.EVENTS)
            dst.cmd("register", addr, length, int(uffdio.Mode.MISSING))
            with u:
                u.resolver.file(addr, length, f, 0, chunk_pages=args.chunk)
                async with u.serving():
                    t0 = time.perf_counter()
                    await dst.acmd("touch", addr, length // PAGE, 0, "-")
                    dt = time.perf_counter() - t0
                st = u.statistics()
            print(
                f"restore: {length // PAGE} pages touched in {dt:.3f} s "
                f"({length / dt / 1e6:.0f} MB/s); {st['faults']} faults, "
                f"{st['file_reads']} ring reads, {st['resolved']} resolved in C, "
                f"{st['forwarded']} sent to Python"
            )
            # every byte must equal the snapshot (pages are present now: no faults)
            f.seek(0)
            want = f.read()
            got = bytearray(length)
            uffdio.read_memory(dst.pid, [(addr, length)], got)
            if got != want:
                bad = sum(
                    1 for i in range(0, length, PAGE) if got[i : i + PAGE] != want[i : i + PAGE]
                )
                print(f"FAILED: {bad} pages differ from the snapshot", file=sys.stderr)
                return 1
            print("verified: every byte equals the snapshot")
    return 0


if __name__ == "__main__":
    raise SystemExit(anyio.run(main))
