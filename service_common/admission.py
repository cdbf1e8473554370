"""Admission control for a replica: a bounded number of requests run, a bounded number wait, the rest are refused.

Past both bounds a request gets RESOURCE_EXHAUSTED at once (with a retry hint) instead of joining an ever longer
queue: latency of the admitted requests stays what the machine gives, and memory stays bounded. A waiting request
gives up when its own deadline passes, and one whose deadline has already passed is never started.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

from lipsync_protocol.errors import DeadlineExceeded, ResourceExhausted


class Admission:
    """Runs at most ``max_running`` at once and queues at most ``max_waiting`` (FIFO); event-loop only."""

    def __init__(self, max_running: int, max_waiting: int, name: str = "server") -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.name = name
        self.running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.rejected = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _retry_after_ms(self) -> int:
        return 50 + 25 * self.waiting

    @contextlib.asynccontextmanager
    async def admit(self, deadline: float | None = None, what: str = "request") -> AsyncIterator[None]:
        """``deadline`` is on the monotonic clock (None: the request has none)."""
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded(f"{what}: its deadline passed before it could start")
        if self.running < self.max_running and not self._waiters:
            self.running += 1
        else:
            await self._wait(deadline, what)  # returns holding a slot
        try:
            yield
        finally:
            self._release()

    async def _wait(self, deadline: float | None, what: str) -> None:
        if len(self._waiters) >= self.max_waiting:
            self.rejected += 1
            raise ResourceExhausted(
                f"{self.name}: overloaded ({self.running} requests running, {self.waiting} waiting; limits "
                f"server.max_inflight_requests={self.max_running}, server.max_queued_requests={self.max_waiting}); "
                "retry later or on another replica",
                retry_after_ms=self._retry_after_ms(),
                reason="overloaded",
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # a slot was handed over as we gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(f"{what}: its deadline passed while it waited to start") from None
            raise

    def _release(self) -> None:
        """Free a slot and hand it straight to the oldest waiter (so a newcomer cannot jump the queue)."""
        self.running -= 1
        while self._waiters and self.running < self.max_running:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.running += 1
                waiter.set_result(None)
