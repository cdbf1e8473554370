"""Retrying the calls that are safe to retry, with gRPC's own retry policy (a channel's service config).

The batch RPC is a pure function of its request, so a call that a stopping or failing replica did not answer
can go again, to whichever replica the load balancer picks next. gRPC retries only while no response headers
have arrived (the servers send theirs with the answer), so a call is never half-answered twice. Sessions are
not retried: they carry state (see ``lipsync_client.session``).
"""

from __future__ import annotations

import json
from typing import Any

SERVICE = "compositing.CompositingService"
IDEMPOTENT_METHODS = ("InferBatchComposite", "Health", "ListModels", "GetModelStats", "LoadModel")
# UNAVAILABLE: refused or unreachable. CANCELLED from the server's side: a replica that stopped with the call in
# flight, or a proxy that dropped it (a call the caller cancels itself is never retried).
RETRYABLE_CODES = ("UNAVAILABLE", "CANCELLED")
MAX_ATTEMPTS = 5  # gRPC caps it at 5


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
    extra = [("grpc.enable_retries", 1), ("grpc.service_config", service_config(max_attempts))]
    return [*(options or []), *extra]
