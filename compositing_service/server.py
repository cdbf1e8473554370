"""``lipsync-compositing``: build, run and stop the compositing gRPC server."""

from __future__ import annotations

import asyncio
import logging
import sys

from service_common.cli import overrides_from, parser_for, run_server
from service_common.serving import RunningServer, serve_until_signal, start_grpc_server
from shared_proto import compositing_pb2, compositing_pb2_grpc

from .config import CompositingConfig, load_config
from .core import CompositingCore
from .servicer import CompositingServicer

log = logging.getLogger("compositing_service")

SERVICE_NAME = compositing_pb2.DESCRIPTOR.services_by_name["CompositingService"].full_name
HEALTH_INTERVAL_S = 2.0


async def watch_inference(core: CompositingCore, running: RunningServer) -> None:
    """Keep grpc.health.v1 in step with the inference service's reachability (a replica without
    inference is NOT_SERVING, so a load balancer or Kubernetes sends traffic elsewhere)."""
    serving = True
    while True:
        healthy = await core.backend.healthy()
        if healthy != serving:
            log.warning("inference service %s: %s", core.backend.description, "reachable" if healthy else "unreachable")
            await running.set_serving(healthy)
            serving = healthy
        await asyncio.sleep(HEALTH_INTERVAL_S)


async def start_server(config: CompositingConfig, core: CompositingCore | None = None) -> RunningServer:
    core = core or CompositingCore(config)
    await core.start()
    watcher: asyncio.Task | None = None

    async def on_stop() -> None:
        if watcher is not None:
            watcher.cancel()
        await core.close()

    running = await start_grpc_server(
        host=config.host,
        port=config.port,
        max_message_bytes=config.max_message_bytes,
        register=lambda server: compositing_pb2_grpc.add_CompositingServiceServicer_to_server(
            CompositingServicer(core), server
        ),
        service_names=[SERVICE_NAME],
        grace_seconds=config.grace_seconds,
        on_stop=on_stop,
        max_connection_age_s=config.max_connection_age_s,
    )
    watcher = asyncio.create_task(watch_inference(core, running))
    log.info(
        "compositing service listening on %s:%d (inference: %s)", config.host, running.port, core.backend.description
    )
    return running


async def serve(config: CompositingConfig) -> None:
    await serve_until_signal(await start_server(config), "compositing service")


def main(argv: list[str] | None = None) -> int:
    parser = parser_for("lipsync-compositing", __doc__)
    parser.add_argument("--inference-url", help="inference target(s): host:port[,host:port] or dns:///name:port")
    parser.add_argument("--in-process", action="store_true", help="run the inference engine in this process")
    args = parser.parse_args(argv)
    overrides = overrides_from(args)
    if args.inference_url:
        overrides.append(f"inference_server.url={args.inference_url}")
    if args.in_process:
        overrides.append("inference.mode=in_process")
    return run_server("lipsync-compositing", args, overrides, load_config, serve)


if __name__ == "__main__":
    sys.exit(main())
