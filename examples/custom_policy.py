"""A policy of your own: a limit that follows a schedule.

uffdio's policies are coroutines (uffdio.swap.Policy.run).  This one starts with all of the
program's memory allowed, then lowers the limit step by step to --limit, the way a
far-memory system would squeeze a job it has just placed; each round it lets the default
LimitPolicy pick the victims (least recently faulted first).  The Swap object gives a
policy what it needs: measure() (resident pages, from the kernel's page map), evict(proc,
n, victims), set_limit(), wait_pressure(), statistics().

    python examples/custom_policy.py [--limit 16M] -- CMD [ARGS...]
"""

from __future__ import annotations

import argparse
import sys

import anyio

from uffdio import Manager
from uffdio.swap import PAGE, LimitPolicy, Swap, parse_size


class Squeeze(LimitPolicy):
    name = "squeeze"

    def __init__(self, final: int, steps: int = 10, every: float = 0.5) -> None:
        super().__init__()
        self.final, self.steps, self.every = final, steps, every

    async def run(self, swap: Swap) -> None:
        start = max(self.final, await swap.measure() * PAGE)
        for i in range(1, self.steps + 1):
            swap.set_limit(start - (start - self.final) * i // self.steps)
            with anyio.move_on_after(self.every):
                while True:
                    await self.step(swap)
                    await swap.wait_pressure(swap.interval)
        await super().run(swap)  # then hold the final limit


async def main() -> int:
    ap = argparse.ArgumentParser(description="squeeze a program down to --limit")
    ap.add_argument("--limit", default="16M")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give a command after --")
    limit = parse_size(args.limit)
    sw = Swap(limit=limit, policy=Squeeze(limit))
    try:
        async with Manager(swap=sw) as m:
            code = await m.spawn(cmd).wait()
            st = sw.statistics()
    finally:
        sw.close()
    print(
        f"squeeze: exit {code}; limit {limit >> 20} MiB,"
        f" peak {st['peak_resident_bytes'] >> 20} MiB, {st['pages_evicted']} pages evicted,"
        f" {st['pages_swapped_in']} swapped in",
        file=sys.stderr,
    )
    return code


if __name__ == "__main__":
    sys.exit(anyio.run(main))
