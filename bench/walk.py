"""``InferBatchComposite`` calls walking the demo avatar with server-built visuals, each one timed.

Why: the cluster and the hardening benchmarks load a compositing service the same way (a constant audio window,
the service building the visuals from its avatar, each client thread walking its own stretch of frames), so that
their figures are comparable with each other and with the cluster's own numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np

from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc

WINDOW = np.full((32, 16, 16), 0.6, np.float32).tobytes()


def walk(
    stub: compositing_pb2_grpc.CompositingServiceStub, batch: int, start: int, errors: list[str] | None = None
) -> Callable[[], float | None]:
    """A call sending the next ``batch`` frames from ``start`` on, returning its latency in seconds.

    With ``errors``, a failed call appends its gRPC code there and returns None (the load goes on); else it raises.
    """
    position = [start]

    def call() -> float | None:
        request = pb.CompositeBatchRequest(
            model_id="demo", audio_features=WINDOW, batch_size=batch, start_frame_idx=position[0]
        )
        position[0] += batch
        sent = time.perf_counter()
        try:
            stub.InferBatchComposite(request, timeout=60)
        except grpc.RpcError as exc:
            if errors is None:
                raise
            errors.append(exc.code().name)
            return None
        return time.perf_counter() - sent

    return call
