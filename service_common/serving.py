"""What both servers share: the standard services, startup, and shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .grpc_glue import server_options

log = logging.getLogger(__name__)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: Sequence[str]
    grace_seconds: float
    on_stop: Callable[[], Awaitable[None]]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, then refuse new calls and let calls in flight finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_seconds if grace is None else grace)
        await self.on_stop()


async def start_grpc_server(
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    grace_seconds: float,
    on_stop: Callable[[], Awaitable[None]],
    max_connection_age_s: float = 0.0,
) -> RunningServer:
    """A grpc.aio server with the given services, grpc.health.v1 and reflection, started and SERVING."""
    server = grpc.aio.server(options=server_options(max_message_bytes, max_connection_age_s))
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"server.port: cannot listen on {host}:{port}")
    await server.start()
    running = RunningServer(server, health_servicer, bound, list(service_names), grace_seconds, on_stop)
    await running.set_serving(True)
    return running


async def serve_until_signal(running: RunningServer, name: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s shutting down (grace %.1f s)", name, running.grace_seconds)
    await running.stop()
