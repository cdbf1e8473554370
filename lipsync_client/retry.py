"""Retrying the calls that are safe to retry, with gRPC's own retry policy (a channel's service config).

The batch RPC is a pure function of its request, so a call that a stopping or failing replica did not answer
can go again, to whichever replica the load balancer picks next. gRPC retries only while no response headers
have arrived (the servers send theirs with the answer), so a call is never half-answered twice. One case is
left to the caller: a replica killed while its answer was on the way, behind a proxy that had already passed
the headers on; the proxy resets the stream (INTERNAL, RST_STREAM) and ``cut_in_transit`` recognises it, so
the batch can be asked again (``LipsyncClient.composite`` and ``render`` do). Sessions are not retried: they
carry state (see ``lipsync_client.session``).
"""

from __future__ import annotations

import json
from typing import Any

import grpc

SERVICE = "compositing.CompositingService"
IDEMPOTENT_METHODS = ("InferBatchComposite", "Health", "ListModels", "GetModelStats", "LoadModel")
# UNAVAILABLE: refused or unreachable. CANCELLED from the server's side: a replica that stopped with the call in
# flight, or a proxy that dropped it (a call the caller cancels itself is never retried).
RETRYABLE_CODES = ("UNAVAILABLE", "CANCELLED")
MAX_ATTEMPTS = 5  # gRPC caps it at 5
# gRPC keeps a request for its retries only up to this size (default 256 KiB; beyond it the call is not retried).
# A batch of raw audio or features is often larger; the servers refuse messages over 64 MiB anyway.
RETRY_BUFFER_BYTES = 64 * 1024 * 1024
# A batch cut in transit is asked again this many times at most.
REASKS = 3


def service_config(max_attempts: int = MAX_ATTEMPTS) -> str:
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": list(RETRYABLE_CODES),
    }
    names = [{"service": SERVICE, "method": method} for method in IDEMPOTENT_METHODS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def retrying(options: list[tuple[str, Any]] | None = None, max_attempts: int = MAX_ATTEMPTS) -> list[tuple[str, Any]]:
    """Channel options with the retry policy on; ``max_attempts`` 1 turns retries off."""
    if max_attempts < 2:  # gRPC refuses a policy of fewer than 2 attempts
        return [*(options or []), ("grpc.enable_retries", 0)]
    extra = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(max_attempts)),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
    ]
    return [*(options or []), *extra]


def cut_in_transit(error: grpc.RpcError) -> bool:
    """The stream was reset by the transport after the answer had begun (no verdict of the server's)."""
    details = error.details() or ""
    return error.code() == grpc.StatusCode.INTERNAL and ("RST_STREAM" in details or "Stream removed" in details)
