"""Health per service name, reflection, Prometheus metrics, and one request id across both services' logs."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import ServerThread, make_compositing_config, make_config

from service_common.request_log import JsonFormatter
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc

WINDOW = np.full((32, 16, 16), 0.7, np.float32).tobytes()


@pytest.fixture(scope="module")
def pair(models_dir: Path):
    inference = ServerThread(make_config(models_dir, **{"metrics.enabled": True, "metrics.port": 0}))
    compositing = ServerThread.compositing(
        make_compositing_config(
            models_dir, inference.address, **{"metrics.enabled": True, "metrics.port": 0, "warmup": False}
        )
    )
    yield inference, compositing
    compositing.stop()
    inference.stop()


def scrape(server: ServerThread) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on the server's /metrics."""
    port = server.running.metrics_port
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def matching(samples: dict[str, float], pattern: str) -> float:
    return sum(v for k, v in samples.items() if re.fullmatch(pattern, k))


def scrape_after(server: ServerThread, pattern: str, minimum: float, timeout: float = 5.0) -> dict[str, float]:
    """Scrape once ``pattern`` reaches ``minimum``: an aborted call's status reaches the client before the
    interceptor has counted it (grpc.aio sends it from within ``abort``)."""
    deadline = time.monotonic() + timeout
    samples = scrape(server)
    while matching(samples, pattern) < minimum and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(server)
    return samples


def test_health_per_service_and_reflection(pair) -> None:
    inference, compositing = pair
    for server, service in ((inference, "inference.InferenceService"), (compositing, "compositing.CompositingService")):
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            (answer,) = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for s in answer.list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= names


def test_metrics_count_requests_stages_cache_and_devices(pair) -> None:
    inference, compositing = pair
    with grpc.insecure_channel(compositing.address) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        for start in range(3):
            request = pb.CompositeBatchRequest(
                model_id="demo", audio_features=WINDOW, batch_size=4, start_frame_idx=start
            )
            assert stub.InferBatchComposite(request, timeout=30).success
        with pytest.raises(grpc.RpcError):
            stub.InferBatchComposite(pb.CompositeBatchRequest(model_id="ghost", audio_features=WINDOW, batch_size=1))
    not_found = r'lipsync_requests_total\{code="NOT_FOUND",method="InferBatchComposite"\}'
    comp = scrape_after(compositing, not_found, 1)
    assert matching(comp, r'lipsync_requests_total\{code="OK",method="InferBatchComposite"\}') >= 3
    assert matching(comp, not_found) >= 1
    assert matching(comp, r'lipsync_frames_total\{model="demo"\}') >= 12
    for stage in ("prepare", "inference_call", "inference", "queue", "compositing", "encode", "total"):
        assert matching(comp, rf'lipsync_stage_duration_seconds_count\{{stage="{stage}"\}}') >= 3, stage
    assert matching(comp, r'lipsync_batch_frames_bucket\{le="4.0"\}') >= 3
    assert matching(comp, r'lipsync_cache_(hits|misses)_total\{model="demo"\}') >= 12
    assert matching(comp, r"lipsync_cache_bytes") > 0
    assert matching(comp, r'lipsync_requests_in_flight\{method="InferBatchComposite"\}') == 0
    assert matching(comp, r"lipsync_inference_reachable") == 1
    assert matching(comp, r'lipsync_model_loads_total\{model="demo",outcome="ok"\}') >= 1

    inf = scrape(inference)
    assert matching(inf, r'lipsync_requests_total\{code="OK",method="InferBatch"\}') >= 3
    for stage in ("queue", "audio", "inference", "total"):
        assert matching(inf, rf'lipsync_stage_duration_seconds_count\{{stage="{stage}"\}}') >= 3, stage
    assert matching(inf, r'lipsync_device_workers\{device="cpu"\}') >= 1
    assert matching(inf, r'lipsync_device_(active|queued)_runs\{device="cpu"\}') == 0
    assert inf['lipsync_device_frames_in_flight{device="cpu"}'] == 0  # present, and back to 0
    assert matching(inf, r'lipsync_device_loaded_models\{device="cpu"\}') >= 1
    assert matching(inf, r'lipsync_model_loads_total\{model="demo",outcome="ok"\}') >= 1
    assert matching(inf, r'lipsync_build_info\{service="inference",version=".+"\}') == 1


def test_one_request_id_in_both_services_logs(pair, caplog: pytest.LogCaptureFixture) -> None:
    _inference, compositing = pair
    caplog.set_level(logging.INFO, logger="lipsync.requests")
    with grpc.insecure_channel(compositing.address) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        request = pb.CompositeBatchRequest(model_id="demo", audio_features=WINDOW, batch_size=2)
        response, call = stub.InferBatchComposite.with_call(
            request, timeout=30, metadata=[("x-request-id", "trace-7f3a")]
        )
        assert response.success
        assert ("x-request-id", "trace-7f3a") in call.initial_metadata()
        # Without an id (or with a malformed one) the server makes one and says which.
        _, call = stub.InferBatchComposite.with_call(
            request, timeout=30, metadata=[("x-request-id", "not a valid id!")]
        )
        made = dict(call.initial_metadata())["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", made)
    lines = [r for r in caplog.records if getattr(r, "request_id", "") == "trace-7f3a"]
    by_service = {r.service: r for r in lines}
    assert set(by_service) == {"compositing", "inference"}, [vars(r) for r in lines]
    comp, inf = by_service["compositing"], by_service["inference"]
    assert comp.method == "InferBatchComposite" and inf.method == "InferBatch"
    assert comp.code == "OK" and comp.model == "demo" and comp.frames == 2
    assert {"prepare", "inference_call", "compositing", "encode", "total"} <= set(comp.stages)
    assert inf.frames == 2 and {"queue", "audio", "inference"} <= set(inf.stages)
    # The JSON form of that line holds every field.
    record = json.loads(JsonFormatter().format(comp))
    assert record["request_id"] == "trace-7f3a" and record["frames"] == 2 and record["stages"]["total"] > 0
    assert record["level"] == "INFO" and record["logger"] == "lipsync.requests"
