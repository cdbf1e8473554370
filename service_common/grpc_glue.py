"""gRPC glue both servicers use: error translation and server options."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from lipsync_protocol.errors import ServiceError

log = logging.getLogger(__name__)

R = TypeVar("R")

RETRY_AFTER_KEY = "retry-after-ms"


def translate_errors(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """Turn ServiceError into its status code, and any other failure into INTERNAL.

    The server keeps serving either way: an exception never escapes to gRPC's
    handler thread as an unhandled error.
    """

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort_with(context, exc, method.__name__)
        raise AssertionError("unreachable")  # abort always raises

    return wrapper


def translate_stream_errors(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[R]]:
    """``translate_errors`` for a streaming method: what it raises ends the stream with its status."""

    @functools.wraps(method)
    async def wrapper(self: Any, requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[R]:
        try:
            async for response in method(self, requests, context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort_with(context, exc, method.__name__)

    return wrapper


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception, name: str) -> None:
    """End the call with ``exc``'s status (ServiceError) or INTERNAL (anything else, logged)."""
    if isinstance(exc, ServiceError):
        if exc.retry_after_ms is not None:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(exc.retry_after_ms)),))
        await context.abort(exc.code, exc.message)
    log.exception("%s failed", name)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on the monotonic clock, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def server_options(max_message_bytes: int, max_connection_age_s: float = 0.0) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if max_connection_age_s > 0:
        age_ms = int(max_connection_age_s * 1000)
        options += [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", max(age_ms, 30_000))]
    return options
