"""The core on both anyio backends (asyncio and trio): faults of a real target served by a
resolver rule and by a coroutine handler, in both engine modes, and cancellation of the
serving task leaving nothing in the kernel's hands (statistics()["inflight"] == 0)."""

from __future__ import annotations

import functools

import anyio
import pytest
from conftest import MODES, PAGE, acmd, managed, pattern, until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request) -> str:
    return request.param


@MODES
@pytest.mark.anyio
async def test_resolver_rule(target, anyio_backend, thread):
    n, seed = 256, 131
    addr, u = managed(target, n)
    with u:
        u.resolver.buffer(addr, pattern(addr, n * PAGE, seed))
        with anyio.fail_after(60):
            async with u.serving(thread=thread):
                assert await acmd(target, "threads", addr, n * PAGE, seed, 8) == [0]
        st = u.statistics()
    assert st["resolved"] == st["faults"] == n and st["forwarded"] == 0
    assert st["thread"] == int(thread) and st["inflight"] == 0 and st["errors"] == 0


@MODES
@pytest.mark.anyio
async def test_coroutine_handler(target, anyio_backend, thread):
    n, seed = 256, 137
    addr, u = managed(target, n)
    data = memoryview(pattern(addr, n * PAGE, seed))
    seen: list[int] = []
    with u:

        @u.on_fault
        async def handler(batch):
            for page in batch.pages():
                seen.append(page)
                off = page - addr
                await u.copy(page, data[off : off + PAGE])

        with anyio.fail_after(60):
            async with u.serving(thread=thread):
                assert await acmd(target, "threads", addr, n * PAGE, seed, 8) == [0]
        st = u.statistics()
    assert sorted(seen) == [addr + i * PAGE for i in range(n)]
    assert st["forwarded"] == st["faults"] == n and st["faults_py"] == n
    assert st["thread"] == int(thread) and st["inflight"] == 0 and st["errors"] == 0


@MODES
@pytest.mark.anyio
async def test_cancel_idle_serving(target, anyio_backend, thread):
    """Serving cancelled while nothing happens: the armed read is cancelled and completed."""
    addr, u = managed(target, 4)
    with u:
        u.resolver.zero(addr, 4 * PAGE)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(functools.partial(u.serve, thread=thread))
                await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        st = u.statistics()
        assert st["inflight"] == 0 and st["deferred_now"] == 0
        # and serving again works
        with anyio.fail_after(20):
            async with u.serving(thread=thread):
                assert await acmd(target, "touch", addr, 4, 0, "-") == [0]
        st = u.statistics()
    assert st["inflight"] == 0 and st["resolved"] == 4


@MODES
@pytest.mark.anyio
async def test_cancel_with_fault_in_python(target, anyio_backend, thread):
    """Serving is cancelled while a coroutine handler holds the only fault.  Afterwards
    inflight == 0; the faulting thread was woken, faulted again, and the next server
    resolves it with the right data."""
    seed = 139
    addr, u = managed(target, 1)
    data = pattern(addr, PAGE, seed)
    entered = anyio.Event()
    result: list = []
    with u:

        @u.on_fault
        async def stuck(batch):
            entered.set()
            await anyio.sleep_forever()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as outer:

                async def check():
                    result.append(await acmd(target, "check", addr, PAGE, seed))

                outer.start_soon(check)
                async with anyio.create_task_group() as tg:
                    await tg.start(functools.partial(u.serve, thread=thread))
                    with anyio.fail_after(10):
                        await entered.wait()
                    tg.cancel_scope.cancel()
                st = u.statistics()
                assert st["inflight"] == 0 and st["deferred_now"] == 0
                # 1, or 2 when the woken thread faulted again before the engine stopped
                assert st["forwarded"] in (1, 2) and result == []

                @u.on_fault
                async def handler(batch):
                    for page in batch.pages():
                        await u.copy(page, data)

                async with u.serving(thread=thread):
                    await until(
                        lambda: result, f"the check after the restart {st} {u.statistics()}"
                    )
        st = u.statistics()
    assert result == [[0]]
    assert st["inflight"] == 0 and st["forwarded"] == 2 and st["errors"] == 0
