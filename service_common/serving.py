"""What both servers share: the standard services, TLS, the interceptor, metrics, startup and shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .admission import Admission
from .auth import TokenStore
from .grpc_glue import server_options
from .interceptor import CallPolicy, ServiceInterceptor
from .metrics import ServiceMetrics
from .serving_config import LOOPBACK, ServingConfig
from .tls import TlsError, server_credentials

log = logging.getLogger(__name__)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: Sequence[str]
    grace_seconds: float
    on_stop: Callable[[], Awaitable[None]]
    metrics: ServiceMetrics | None = None
    policy: CallPolicy | None = None
    shutdown_delay_s: float = 0.0
    tls: bool = False
    probe_server: grpc.aio.Server | None = None  # server.health_port: health only, plain text
    # Called once new calls stop being routed here, before the grace period: what cannot finish in it (open
    # streaming sessions) ends now with a status that says so, instead of being cut when the grace ends.
    on_drain: Callable[[], Awaitable[None]] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_port(self) -> int:
        return self.metrics.port if self.metrics is not None else 0

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (and for ``shutdown_delay_s``, so load balancers stop sending), then refuse new
        calls and let calls in flight finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        if self.shutdown_delay_s > 0 and grace is None:
            await asyncio.sleep(self.shutdown_delay_s)
        if self.on_drain is not None:
            await self.on_drain()
        await self.server.stop(self.grace_seconds if grace is None else grace)
        if self.probe_server is not None:
            await self.probe_server.stop(0)
        await self.on_stop()
        if self.metrics is not None:
            self.metrics.close()


def build_policy(
    service: str,
    serving: ServingConfig,
    metrics: ServiceMetrics | None,
    admitted_methods: Collection[str],
) -> CallPolicy:
    try:
        tokens = TokenStore(serving.auth) if serving.auth.enabled else None
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None
    return CallPolicy(
        service=service,
        metrics=metrics,
        tokens=tokens,
        admission=Admission(serving.max_inflight_requests, serving.max_queued_requests, service),
        admitted_methods=admitted_methods,
        log_requests=serving.log_requests,
    )


class ListenConfig(Protocol):
    """What both services' configs say about serving (InferenceConfig and CompositingConfig have it all)."""

    host: str
    port: int
    grace_seconds: float
    max_connection_age_s: float
    serving: ServingConfig

    @property
    def max_message_bytes(self) -> int: ...


async def start_grpc_server(
    config: ListenConfig,
    *,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    on_stop: Callable[[], Awaitable[None]],
    policy: CallPolicy,
) -> RunningServer:
    """A grpc.aio server with the given services, grpc.health.v1 and reflection, started and SERVING, on the
    address and with the serving settings ``config`` gives."""
    serving = config.serving
    server = grpc.aio.server(
        options=server_options(config.max_message_bytes, config.max_connection_age_s),
        interceptors=[ServiceInterceptor(policy)],
        maximum_concurrent_rpcs=serving.max_concurrent_rpcs,
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = _listen(server, config.host, config.port, serving)
    metrics = policy.metrics
    if metrics is not None and serving.metrics.enabled:
        metrics_port = metrics.serve(serving.metrics.host, serving.metrics.port)
        log.info("metrics on http://%s:%d/metrics", serving.metrics.host, metrics_port)
    if serving.tls is None and policy.tokens is None and config.host not in LOOPBACK:
        log.warning(
            "serving plain text without authentication on %s:%d: anyone who reaches it may call it",
            config.host,
            config.port,
        )
    probe_server = await _health_probe(health_servicer, config.host, serving.health_port)
    await server.start()
    running = RunningServer(
        server,
        health_servicer,
        bound,
        list(service_names),
        config.grace_seconds,
        on_stop,
        metrics=metrics,
        policy=policy,
        shutdown_delay_s=serving.shutdown_delay_s,
        tls=serving.tls is not None,
        probe_server=probe_server,
    )
    await running.set_serving(True)
    return running


def _listen(server: grpc.aio.Server, host: str, port: int, serving: ServingConfig) -> int:
    """The bound port: TLS when configured, plain text otherwise (which the config had to ask for)."""
    address = f"{host}:{port}"
    if serving.tls is not None:
        try:
            bound = server.add_secure_port(address, server_credentials(serving.tls))
        except TlsError as exc:
            raise RuntimeError(str(exc)) from None
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"server.port: cannot listen on {address}")
    return bound


async def _health_probe(health_servicer: health.aio.HealthServicer, host: str, port: int) -> grpc.aio.Server | None:
    """``server.health_port``: the same health status in plain text, for probes that cannot speak TLS."""
    if not port:
        return None
    probe_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe_server)
    if probe_server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"server.health_port: cannot listen on {host}:{port}")
    await probe_server.start()
    return probe_server


async def serve_until_signal(running: RunningServer, name: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s shutting down (grace %.1f s)", name, running.grace_seconds)
    await running.stop()
