#!/usr/bin/env python3
"""Container health check: exit 0 when a gRPC server reports SERVING, 1 otherwise.

    grpc-health-check [ADDRESS] [SERVICE] [--timeout SECONDS]

ADDRESS defaults to 127.0.0.1:50051, SERVICE to "" (the server as a whole); both services answer the
standard grpc.health.v1.Health/Check for "" and for their own name (`inference.InferenceService`,
`compositing.CompositingService`). Docker's HEALTHCHECK treats exit 0 as healthy and 1 as unhealthy.
It only needs grpcio and grpcio-health-checking, which the images install with the project.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(serving, what was seen) for one Health/Check call."""
    try:
        # A proxy from the container's environment must not take the loopback call.
        with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpc-health-check", description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051")
    parser.add_argument("service", nargs="?", default="")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    serving, seen = check(args.address, args.service, args.timeout)
    print(f"{args.address} {args.service or '(server)'}: {seen}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
