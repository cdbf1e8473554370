"""A live ``StreamSession`` for one WebRTC peer: requests pushed as speech arrives, responses read as frames come.

The gateway's ``POST /session`` knows its whole clip up front; a peer does not, so its requests come from a
thread-safe queue that the event loop fills, and a reader thread hands the responses to the loop. It uses the
synchronous gRPC API for the reason ``server.py`` gives (grpc/grpc#36066 hides the server's status otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from shared_proto import compositing_pb2 as pb

log = logging.getLogger(__name__)

_CLOSE = object()  # ends the request stream: the server finishes its frames and sends SessionEnded


class LiveSession:
    """One StreamSession call; every method but ``get`` and ``start`` may be called from the event loop freely."""

    EOF = object()

    def __init__(self, stub: Any, config: pb.SessionConfig, timeout: float) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._requests.put(pb.SessionRequest(config=config))
        self._responses: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._call = stub.StreamSession(self._request_stream(), timeout=timeout)
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="gateway-peer-session", daemon=True)
        self._reader.start()

    def _request_stream(self) -> Iterator[pb.SessionRequest]:
        while True:
            item = self._requests.get()
            if item is _CLOSE:
                return
            yield item

    def _hand_over(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._responses.put_nowait, item)

    def _read(self) -> None:
        try:
            for response in self._call:
                self._hand_over(response)
            self._hand_over(self.EOF)
        except grpc.RpcError as exc:
            self._hand_over(exc)
        except Exception as exc:  # a bug rather than a status: still end the reader's wait
            log.exception("peer session reader failed")
            self._hand_over(exc)

    async def get(self) -> Any:
        """The next SessionResponse, or EOF; raises the call's grpc.RpcError."""
        item = await self._responses.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def start(self) -> pb.SessionStarted:
        """Waits for SessionStarted, so an unknown model or a full replica fails the offer, not the stream."""
        first = await self.get()
        if first is self.EOF or first.WhichOneof("message") != "started":
            raise RuntimeError("the compositing service ended the session before it started")
        return first.started

    def send_audio(self, samples: np.ndarray) -> None:
        """16 kHz mono float32, as the session was configured."""
        if not self._closed and len(samples):
            data = np.ascontiguousarray(samples, "<f4").tobytes()
            self._requests.put(pb.SessionRequest(audio=pb.AudioChunk(data=data)))

    def end_of_input(self) -> None:
        if not self._closed:
            self._requests.put(pb.SessionRequest(control=pb.SessionControl(end_of_input=True)))

    def interrupt(self) -> None:
        if not self._closed:
            self._requests.put(pb.SessionRequest(control=pb.SessionControl(interrupt=True)))

    def close(self) -> None:
        """Ends the request stream and cancels the call: the replica frees the session at once."""
        if not self._closed:
            self._closed = True
            self._requests.put(_CLOSE)
        self._call.cancel()
