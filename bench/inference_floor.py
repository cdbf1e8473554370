"""The gRPC floor: the inference benchmark's requests through a server that parses them and returns a ready reply.

Why: what gRPC + protobuf alone cost for these message sizes on this machine is the least the service can cost;
the demo's overhead is split into that floor and the rest (bench/inference.py).

    python -m bench.inference_floor --port N    # the do-nothing server (started by ``measure``)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import grpc
import numpy as np

from service_common.allocator import tune_malloc
from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc as pb_grpc

from . import harness
from .harness import CHANNEL_OPTIONS, REPO_ROOT, Meter, log
from .inference_calls import MODES, OUTPUT_SHAPE, service_block


def measure(requests: dict[str, pb.InferBatchRequest], seconds: float) -> dict[str, Any]:
    """Each mode's requests against the do-nothing server: fps, ms per frame, and both sides' CPU."""
    out: dict[str, Any] = {"what": "same requests and reply sizes through a gRPC server that does no work"}
    with harness.fleet("bench-floor-") as fleet:
        command = [sys.executable, "-m", "bench.inference_floor"]
        echo = fleet.start("echo", command, env={"PYTHONPATH": str(REPO_ROOT)}).wait_serving(60)
        meter = Meter({"server": echo.process.pid})
        with grpc.insecure_channel(echo.address, CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            for mode in MODES.values():
                for _ in range(5):
                    stub.InferBatch(requests[mode.dtype], timeout=60)
                block = service_block(stub, requests[mode.dtype], mode, seconds, meter)
                out[mode.name] = {
                    "fps": block["fps"],
                    "ms_per_frame": round(1000.0 / block["fps"], 3),
                    "server_cpu_pct": block["server_cpu_pct"],
                    "bench_cpu_pct": block["bench_cpu_pct"],
                }
                log(f"grpc floor: {mode.name:22s} {block['fps']:9.2f} fps")
    return out


def _reply(request: pb.InferBatchRequest, replies: dict[tuple[int, int], pb.InferBatchResponse]) -> Any:
    key = (request.batch_size, request.output_dtype)
    if key not in replies:
        dtype = pb.DTYPE_UINT8 if request.output_dtype == pb.DTYPE_UINT8 else pb.DTYPE_FLOAT32
        size = int(np.prod(OUTPUT_SHAPE)) * (1 if dtype == pb.DTYPE_UINT8 else 4)
        out = pb.RawMouthRegion(data=bytes(size), dtype=dtype, shape=list(OUTPUT_SHAPE))
        replies[key] = pb.InferBatchResponse(outputs=[out] * request.batch_size, success=True, device="cpu")
    return replies[key]


async def serve(host: str, port: int) -> None:
    """InferBatch that parses the request and returns a reply of the real size, until SIGTERM."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from service_common.grpc_glue import server_options

    replies: dict[tuple[int, int], pb.InferBatchResponse] = {}

    async def infer(request: pb.InferBatchRequest, context: grpc.aio.ServicerContext) -> pb.InferBatchResponse:
        return _reply(request, replies)

    server = grpc.aio.server(options=server_options(64 * 1024 * 1024))
    handler = grpc.unary_unary_rpc_method_handler(
        infer,
        request_deserializer=pb.InferBatchRequest.FromString,
        response_serializer=pb.InferBatchResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.InferenceService", {"InferBatch": handler}),)
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", help="accepted like the services' (nothing is logged)")
    args = parser.parse_args(argv)
    tune_malloc()  # the allocator settings the services run with
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
