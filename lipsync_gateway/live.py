"""A live ``StreamSession`` for one WebRTC peer: requests pushed as speech arrives, responses read as frames come.

The gateway's ``POST /session`` knows its whole clip up front; a peer does not, so its requests come from a
thread-safe queue that the event loop fills, and a ResponsePump hands the responses to the loop. It uses the
synchronous gRPC API for the reason ``server.py`` gives (grpc/grpc#36066 hides the server's status otherwise).
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Iterator
from typing import Any

import numpy as np

from shared_proto import compositing_pb2 as pb

from .pump import ResponsePump

log = logging.getLogger(__name__)

_CLOSE = object()  # ends the request stream: the server finishes its frames and sends SessionEnded


class LiveSession:
    """One StreamSession call; every method but ``get`` and ``start`` may be called from the event loop freely."""

    EOF = ResponsePump.EOF

    def __init__(self, stub: Any, config: pb.SessionConfig, timeout: float) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._requests.put(pb.SessionRequest(config=config))
        self._call = stub.StreamSession(self._request_stream(), timeout=timeout)
        self._closed = False
        # Unbounded: playout, not the reader, decides how far ahead frames are held.
        self._pump = ResponsePump(self._call, asyncio.get_running_loop(), window=None, name="gateway-peer-session")

    def _request_stream(self) -> Iterator[pb.SessionRequest]:
        while True:
            item = self._requests.get()
            if item is _CLOSE:
                return
            yield item

    async def get(self) -> Any:
        """The next SessionResponse, or EOF; raises the call's grpc.RpcError."""
        return await self._pump.get()

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
        self._pump.close()
