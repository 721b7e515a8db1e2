"""The core in one glance: a separate process's faults served by the C resolver and by a
coroutine, every byte checked in the target."""

from __future__ import annotations

import pytest
from conftest import PAGE, managed, pattern


@pytest.mark.asyncio
async def test_resolver_buffer_serves_content(target):
    n = 64
    addr, u = managed(target, n)
    with u:
        u.resolver.buffer(addr, pattern(addr, n * PAGE, 7))
        async with u.serving():
            assert await target.acmd("check", addr, n * PAGE, 7) == [0]
        st = u.statistics()
    assert st["resolved"] == n and st["forwarded"] == 0 and st["thread"] == 1


@pytest.mark.asyncio
async def test_coroutine_handler_serves_content(target):
    n = 64
    addr, u = managed(target, n)
    data = pattern(addr, n * PAGE, 9)
    seen = []
    with u:

        @u.on_fault
        async def handler(batch):
            for page in batch.pages():
                seen.append(page)
                off = page - addr
                await u.copy(page, data[off : off + PAGE])

        async with u.serving():
            assert await target.acmd("check", addr, n * PAGE, 9) == [0]
        st = u.statistics()
    assert sorted(seen) == [addr + i * PAGE for i in range(n)]
    assert st["forwarded"] == n and st["thread"] == 0
