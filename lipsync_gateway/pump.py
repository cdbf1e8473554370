"""One streaming call's responses, read by a thread from the blocking gRPC call and handed to the event loop.

The gateway calls the compositing service with the synchronous gRPC API (grpc/grpc#36066: the asyncio API hides
the server's status when a stream ends early, see ``server.py``), so a thread does the reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

import grpc

log = logging.getLogger(__name__)


class ResponsePump:
    """Responses handed over at most ``window`` ahead of the reader (None: no bound); close() cancels the call
    and ends the thread."""

    EOF = object()

    def __init__(self, call: Any, loop: asyncio.AbstractEventLoop, window: int | None = 8, name: str = "") -> None:
        self.call = call
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.slots = threading.Semaphore(window) if window else None
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name or "gateway-session", daemon=True)
        self.thread.start()

    def _hand_over(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _wait_for_a_slot(self) -> bool:
        if self.slots is not None:
            while not self.slots.acquire(timeout=0.2):
                if self.closed.is_set():
                    return False
        return not self.closed.is_set()

    def _run(self) -> None:
        try:
            for response in self.call:
                if not self._wait_for_a_slot():
                    return
                self._hand_over(response)
            self._hand_over(self.EOF)
        except grpc.RpcError as exc:
            self._hand_over(exc)
        except Exception as exc:  # a bug rather than a status: still end the reader's wait
            log.exception("%s reader failed", self.thread.name)
            self._hand_over(exc)

    async def get(self) -> Any:
        """The next response, or EOF; raises the call's grpc.RpcError."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is not self.EOF and self.slots is not None:
            self.slots.release()
        return item

    def close(self) -> None:
        self.closed.set()
        self.call.cancel()  # a no-op once the call is done; otherwise (error, disconnect) it ends the session
