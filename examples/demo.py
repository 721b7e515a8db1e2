"""uffdio demo: another process's page faults served by a Python coroutine and by C.

A separate process (the target) maps two empty regions and hands its userfaultfd to this
manager.  Faults in region A go to a coroutine handler, which builds each page's content in
Python (a stand-in for a store lookup).  Faults in region B are served by uffdio's C resolver
from a buffer, without entering Python.  The target reads everything with 8 threads at once,
forks a child that checks the same memory through its own uffd, and discards part of region A
with madvise(DONTNEED), after which it must read zeros.  A live line shows the fault counts.

    make demo            (or: python examples/demo.py [--mib 32])
"""

from __future__ import annotations

import argparse
import sys
import time

import anyio

import uffdio
from uffdio._target import Target

PAGE = uffdio.PAGE_SIZE
MADV_DONTNEED = 4


def pattern(as_addr: int, length: int, seed: int) -> bytearray:
    from uffdio._lib import ffi, lib

    buf = bytearray(length)
    lib.uf_pattern(int(ffi.cast("uintptr_t", ffi.from_buffer(buf))), length, seed, as_addr)
    return buf


async def main() -> int:
    ap = argparse.ArgumentParser(description="uffdio demo")
    ap.add_argument("--mib", type=int, default=32, help="size of each region (default 32)")
    args = ap.parse_args()
    size = args.mib << 20
    tty = sys.stdout.isatty()

    print(
        "uffdio demo: kernel features "
        + ", ".join(f.name or "" for f in uffdio.Userfaultfd.probe()[0])
    )
    with Target() as t:
        [a] = t.cmd("map", size)
        [b] = t.cmd("map", size)
        u = t.open_uffd(uffdio.EVENTS)
        t.cmd("register", a, size, int(uffdio.Mode.MISSING))
        t.cmd("register", b, size, int(uffdio.Mode.MISSING))
        print(
            f"target pid {t.pid}: region A {a:#x} (coroutine), region B {b:#x} (C resolver), "
            f"{args.mib} MiB each"
        )
        events: list[str] = []
        discarded: list[tuple[int, int]] = []  # ranges the target threw away

        @u.on_fault
        async def serve_from_python(batch: uffdio.FaultBatch) -> None:
            for page in batch.pages():
                if any(s <= page < e for s, e in discarded):
                    await u.zeropage(page)  # the data was discarded: never bring it back
                else:
                    await u.copy(page, pattern(page, PAGE, 1))

        async def note(ev: object) -> None:
            events.append(type(ev).__name__)
            if isinstance(ev, uffdio.RemoveEvent):
                discarded.append((ev.start, ev.end))

        for kind in (uffdio.Event.FORK, uffdio.Event.REMOVE):
            u.on_event(kind, note)
        u.resolver.buffer(b, pattern(b, size, 2), chunk_pages=8)

        async def live(stop: anyio.Event) -> None:
            t0 = time.monotonic()
            while not stop.is_set():
                with anyio.move_on_after(0.25):
                    await stop.wait()
                st = u.statistics()
                for c in u.children:
                    cs = c.statistics()
                    st["faults_py"] += cs["faults_py"]
                    st["resolved"] += cs["resolved"]
                dt = time.monotonic() - t0
                line = (
                    f"  {dt:5.1f} s  faults served: coroutine {st['faults_py']:7d}  "
                    f"C resolver {st['resolved']:7d}  events {len(events)}"
                )
                print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            if tty:
                print()

        async with u.serving(thread=True):
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(live, stop)
                bad_a = (await t.acmd("threads", a, size, 1, 8))[0]
                bad_b = (await t.acmd("threads", b, size, 2, 8))[0]
                child = (await t.acmd("fork", a, size, 1))[0]
                await t.acmd("madvise", a, size // 2, MADV_DONTNEED)
                await t.acmd("touch", a, size // 2 // PAGE, 0, "-")
                stop.set()
        got = bytearray(size // 2)
        uffdio.read_memory(t.pid, [(a, size // 2)], got)
        zero_ok = got.count(0) == len(got)
        rest_ok = (await t.acmd("check", a + size // 2, size // 2, 1))[0] == 0
        st = u.statistics()
        ok = bad_a == 0 and bad_b == 0 and child == 0 and rest_ok
        print(
            f"region A (coroutine): {'every byte correct' if bad_a == 0 else f'{bad_a} bad words'}"
        )
        print(
            f"region B (C resolver): {'every byte correct' if bad_b == 0 else f'{bad_b} bad words'}"
        )
        print(
            f"fork: child saw {'the same memory' if child == 0 else f'wrong data (status {child})'}"
        )
        print(
            "madvise(DONTNEED): "
            + ("reads zeros as the kernel promises" if zero_ok else "WRONG: old data came back")
            + f"{'' if rest_ok else ' (and the kept half changed!)'}"
        )
        print(
            f"events: {', '.join(events)}; engine: {st['msgs']} messages in {st['batches']} "
            f"ring batches, {st['resolved']} faults resolved in C, {st['forwarded']} sent to Python"
        )
        u.close()
        return 0 if ok and zero_ok else 1


if __name__ == "__main__":
    raise SystemExit(anyio.run(main))
