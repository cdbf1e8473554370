"""The server interceptor both services run every call through.

In order: a request id (the caller's ``x-request-id`` or a new one, sent back in the initial metadata); the token
check, the admin check for management RPCs, the per-token rate limit and session limit; admission to the
replica's bounded run queue for the heavy RPCs; then the call itself, counted in the metrics (in flight,
latency, status code) and logged as one line when it ends. The standard health and reflection services pass
straight through: probes carry no token and must stay cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import grpc

from lipsync_protocol.errors import (
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
)

from . import request_log
from .admission import Admission
from .auth import Limits, Principal, TokenStore, bearer_token, require_admin
from .grpc_glue import abort_with
from .metrics import ServiceMetrics

log = logging.getLogger(__name__)

PASS_THROUGH_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
ADMIN_METHODS = frozenset({"LoadModel", "UnloadModel"})


@dataclass
class CallPolicy:
    """What the interceptor enforces; every part is optional."""

    service: str
    metrics: ServiceMetrics | None = None
    tokens: TokenStore | None = None
    admission: Admission | None = None
    admitted_methods: Collection[str] = ()  # short method names that take a run slot
    admin_methods: Collection[str] = ADMIN_METHODS
    log_requests: bool = True
    limits: Limits = field(default_factory=Limits)


def _reason(exc: ServiceError) -> str:
    if exc.reason:
        return exc.reason
    if isinstance(exc, Unauthenticated):
        return "unauthenticated"
    if isinstance(exc, PermissionDenied):
        return "permission_denied"
    if isinstance(exc, DeadlineExceeded):
        return "deadline"
    return "other"


def _decoder(deserialize: Callable[[bytes], Any] | None, method: str) -> Callable[[Any], Any]:
    if deserialize is None:
        return lambda raw: raw

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:
            raise InvalidArgument(f"request: not a valid {method} request message ({exc})") from None

    return decode


async def _decode_stream(requests: AsyncIterator[bytes], decode: Callable[[bytes], Any]) -> AsyncIterator[Any]:
    async for raw in requests:
        yield decode(raw)


def _code_name(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = context.code()
    if code is None:
        return "OK" if exc is None else "UNKNOWN"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, policy: CallPolicy) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(PASS_THROUGH_PREFIXES):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        metadata = tuple(details.invocation_metadata or ())
        if handler.unary_unary:
            kind = "unary_unary"
        elif handler.stream_stream:
            kind = "stream_stream"
        elif handler.unary_stream:
            kind = "unary_stream"
        else:
            kind = "stream_unary"
        inner = getattr(handler, kind)
        decode = _decoder(handler.request_deserializer, method)
        serving = self._serving

        # Requests arrive as bytes and are decoded here: gRPC's own decoder answers UNKNOWN (and logs a traceback)
        # for a message that does not parse; a client sending garbage gets INVALID_ARGUMENT instead.
        async def decoded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if kind.startswith("stream_"):
                return _decode_stream(request, decode)
            try:
                return decode(request)
            except ServiceError as exc:
                await abort_with(context, exc, method)

        if kind.endswith("_stream"):

            async def stream_behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with serving(method, metadata, kind, context):
                    async for response in inner(await decoded(request, context), context):
                        yield response

            behavior: Callable = stream_behavior
        else:

            async def unary_behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with serving(method, metadata, kind, context):
                    response = await inner(await decoded(request, context), context)
                    # Headers go with the answer: a client's gRPC retry policy may retry a call whose server
                    # stopped before answering only while no headers have arrived.
                    await context.send_initial_metadata(((request_log.REQUEST_ID_KEY, request_log.request_id()),))
                    return response

            behavior = unary_behavior
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(behavior, request_deserializer=None, response_serializer=handler.response_serializer)

    def _authenticate(self, method: str, metadata: tuple) -> Principal | None:
        policy = self.policy
        if policy.tokens is None:
            return None
        principal = policy.tokens.authenticate(bearer_token(metadata))
        if method in policy.admin_methods:
            require_admin(principal, method)
        policy.limits.check_rate(principal)
        return principal

    @contextlib.asynccontextmanager
    async def _serving(
        self, method: str, metadata: tuple, kind: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        policy, metrics = self.policy, self.policy.metrics
        record = request_log.RequestRecord(request_log.request_id_from(metadata), method, context.peer())
        token = request_log.begin(record)
        if metrics is not None:
            metrics.in_flight.labels(method).inc()
        failure: BaseException | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    if kind != "unary_unary":  # a unary call sends it with its answer
                        await context.send_initial_metadata(((request_log.REQUEST_ID_KEY, record.request_id),))
                    principal = self._authenticate(method, metadata)
                    if principal is not None:
                        record.principal = principal.name
                        if kind == "stream_stream":  # a session
                            policy.limits.open_session(principal)
                            stack.callback(policy.limits.close_session, principal)
                    if policy.admission is not None and method in policy.admitted_methods:
                        remaining = context.time_remaining()
                        deadline = None if remaining is None else time.monotonic() + remaining
                        await stack.enter_async_context(policy.admission.admit(deadline, method))
                        record.stages["admission_wait"] = round((time.perf_counter() - record.started) * 1000.0, 3)
                except ServiceError as exc:
                    if metrics is not None:
                        metrics.rejected.labels(_reason(exc)).inc()
                    await abort_with(context, exc, method)
                yield
        except BaseException as exc:
            failure = exc
            raise
        finally:
            code = _code_name(context, failure)
            if metrics is not None:
                metrics.in_flight.labels(method).dec()
                metrics.requests.labels(method, code).inc()
                metrics.request_seconds.labels(method).observe(time.perf_counter() - record.started)
            if policy.log_requests:
                request_log.log_request(record, code, policy.service)
            request_log.end(token)
