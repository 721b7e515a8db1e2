"""The engine's two read paths (multishot READ with provided buffers, re-armed READ) and its
two modes (C thread, inline), each serving a separate process's faults with content checks."""

from __future__ import annotations

import pytest
from conftest import PAGE, managed, pattern


@pytest.mark.asyncio
@pytest.mark.parametrize("multishot", [True, False], ids=["multishot", "rearmed-read"])
@pytest.mark.parametrize("thread", [True, False], ids=["thread", "inline"])
async def test_read_paths_and_modes(target, multishot, thread):
    n = 256
    addr, u = managed(target, n)
    half = n // 2 * PAGE
    data = pattern(addr + half, half, 5)
    with u:
        u.multishot = multishot
        u.resolver.buffer(addr, pattern(addr, half, 5))  # first half: C resolver

        @u.on_fault
        async def handler(batch):  # second half: coroutine
            for page in batch.pages():
                off = page - addr - half
                await u.copy(page, data[off : off + PAGE])

        async with u.serving(thread=thread):
            assert await target.acmd("threads", addr, n * PAGE, 5, 8) == [0]
        st = u.statistics()
    assert st["multishot"] == int(multishot)
    assert st["thread"] == int(thread)
    assert st["faults"] == st["resolved"] + st["forwarded"]
    assert st["forwarded"] >= n // 2 and st["resolved"] >= n // 2
    assert st["inflight"] == 0 and st["errors"] == 0


@pytest.mark.asyncio
async def test_restart_serving_keeps_faults(target):
    """Serving stopped and started again (other mode): nothing is lost in between."""
    n = 64
    addr, u = managed(target, n)
    with u:
        u.resolver.buffer(addr, pattern(addr, n * PAGE, 3))
        async with u.serving(thread=True):
            assert await target.acmd("check", addr, n // 2 * PAGE, 3) == [0]
        async with u.serving(thread=False):
            assert await target.acmd("check", addr, n * PAGE, 3) == [0]
        assert u.statistics()["resolved"] >= n
