"""``lipsync-inference``: build, run and stop the inference gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from service_common.config_source import ConfigError
from service_common.serving import RunningServer, serve_until_signal, start_grpc_server
from shared_proto import inference_pb2, inference_pb2_grpc

from .config import InferenceConfig, load_config
from .core import InferenceCore
from .servicer import InferenceServicer

log = logging.getLogger("inference_service")

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


async def start_server(config: InferenceConfig, core: InferenceCore | None = None) -> RunningServer:
    """Preload, then serve on ``config.host:config.port`` (port 0 picks a free one)."""
    core = core or InferenceCore(config)
    await core.start()

    async def on_stop() -> None:
        core.close()

    running = await start_grpc_server(
        host=config.host,
        port=config.port,
        max_message_bytes=config.max_message_bytes,
        register=lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(core), server
        ),
        service_names=[SERVICE_NAME],
        grace_seconds=config.grace_seconds,
        on_stop=on_stop,
    )
    log.info(
        "inference service listening on %s:%d (devices: %s)",
        config.host,
        running.port,
        ", ".join(d.label for d in core.devices),
    )
    return running


async def serve(config: InferenceConfig) -> None:
    await serve_until_signal(await start_server(config), "inference service")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
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


def overrides_from(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set)
    if args.models_root:
        overrides.append(f"models_root={args.models_root}")
    if args.port is not None:
        overrides.append(f"server.port={args.port}")
    if args.host:
        overrides.append(f"server.host={args.host}")
    return overrides


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lipsync-inference", description=__doc__)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, overrides_from(args))
    except ConfigError as exc:
        print(f"lipsync-inference: invalid config: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.log_level)
    try:
        asyncio.run(serve(config))
    except RuntimeError as exc:
        print(f"lipsync-inference: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
