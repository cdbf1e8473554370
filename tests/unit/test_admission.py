"""The replica's bounded run queue: who runs, who waits, who is refused, and deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest
from support import wait_until_async

from lipsync_protocol.errors import DeadlineExceeded, ResourceExhausted
from service_common.admission import Admission


async def hold(admission: Admission, release: asyncio.Event, order: list[int], tag: int, deadline=None) -> None:
    async with admission.admit(deadline):
        order.append(tag)
        await release.wait()


async def test_runs_then_queues_in_order_then_refuses() -> None:
    admission = Admission(max_running=2, max_waiting=2)
    release = asyncio.Event()
    order: list[int] = []
    tasks = [asyncio.create_task(hold(admission, release, order, i)) for i in range(4)]
    await wait_until_async(lambda: admission.running + admission.waiting == 4)
    assert order == [0, 1] and admission.running == 2 and admission.waiting == 2
    with pytest.raises(ResourceExhausted) as err:
        async with admission.admit():
            pass
    assert err.value.retry_after_ms > 0 and "server.max_queued_requests=2" in err.value.message
    assert admission.rejected == 1
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]  # FIFO: the queued ones ran in arrival order
    assert admission.running == 0 and admission.waiting == 0


async def test_deadlines_passed_or_passing_while_waiting() -> None:
    admission = Admission(max_running=1, max_waiting=4)
    with pytest.raises(DeadlineExceeded, match="before it could start"):
        async with admission.admit(time.monotonic() - 1):
            pass
    release = asyncio.Event()
    order: list[int] = []
    first = asyncio.create_task(hold(admission, release, order, 0))
    assert await wait_until_async(lambda: order == [0])
    # The baseline: how long a plain 50 ms timeout takes on this loop, now.
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.Event().wait(), 0.05)
    timer = time.monotonic() - started
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="while it waited"):
        async with admission.admit(time.monotonic() + 0.05):
            pass
    waited = time.monotonic() - started
    # It gives up at its deadline, not when the slot frees (release is not set yet: it never would).
    assert 0.04 <= waited < 5 * timer + 0.25, (waited, timer)
    assert admission.waiting == 0 and order == [0]
    release.set()
    await first
    assert admission.running == 0


async def test_a_cancelled_waiter_gives_its_slot_on() -> None:
    admission = Admission(max_running=1, max_waiting=4)
    release = asyncio.Event()
    order: list[int] = []
    first = asyncio.create_task(hold(admission, release, order, 0))
    assert await wait_until_async(lambda: order == [0])
    doomed = asyncio.create_task(hold(admission, release, order, 1))
    third = asyncio.create_task(hold(admission, release, order, 2))
    assert await wait_until_async(lambda: admission.waiting == 2)
    doomed.cancel()
    release.set()
    await asyncio.gather(first, third)
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert order == [0, 2] and admission.running == 0 and admission.waiting == 0
