"""``lipsync-inference``: build, run and stop the inference gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service_common.config_source import ConfigError
from service_common.grpc_glue import server_options
from shared_proto import inference_pb2, inference_pb2_grpc

from .config import InferenceConfig, load_config
from .core import InferenceCore
from .servicer import InferenceServicer

log = logging.getLogger("inference_service")

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    core: InferenceCore
    health: health.aio.HealthServicer
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let calls in flight finish within ``grace``, then free the devices."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.core.config.grace_seconds if grace is None else grace)
        self.core.close()


async def start_server(config: InferenceConfig, core: InferenceCore | None = None) -> RunningServer:
    """Start serving on ``config.host:config.port`` (port 0 picks a free one) after preloading."""
    core = core or InferenceCore(config)
    await core.start()
    server = grpc.aio.server(options=server_options(config.max_message_bytes))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise RuntimeError(f"server.port: cannot listen on {config.host}:{config.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "inference service listening on %s:%d (devices: %s)",
        config.host,
        port,
        ", ".join(d.label for d in core.devices),
    )
    return RunningServer(server, core, health_servicer, port)


async def serve(config: InferenceConfig) -> None:
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace %.1f s)", config.grace_seconds)
    await running.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lipsync-inference", description=__doc__)
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument("--host", help="listen address (default 0.0.0.0)")
    parser.add_argument("--models-root", help="overrides models_root")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set capacity.max_models=2",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    if args.models_root:
        overrides.append(f"models_root={args.models_root}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"lipsync-inference: invalid config: {exc}", file=sys.stderr)
        return 2
    if args.port is not None:
        config = replace(config, port=args.port)
    if args.host:
        config = replace(config, host=args.host)
    logging.basicConfig(
        level=args.log_level or config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(config))
    except RuntimeError as exc:
        print(f"lipsync-inference: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
