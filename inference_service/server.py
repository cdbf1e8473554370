"""``lipsync-inference``: build, run and stop the inference gRPC server."""

from __future__ import annotations

import logging
import sys

from service_common.cli import overrides_from, parser_for, run_server
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
        max_connection_age_s=config.max_connection_age_s,
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


def main(argv: list[str] | None = None) -> int:
    parser = parser_for("lipsync-inference", __doc__)
    args = parser.parse_args(argv)
    return run_server("lipsync-inference", args, overrides_from(args), load_config, serve)


if __name__ == "__main__":
    sys.exit(main())
