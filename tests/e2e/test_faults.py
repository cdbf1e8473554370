"""Faults under load, with the services as real processes: inference killed and restarted, one of two inference
servers killed, a compositing replica stopped behind nginx, and overload."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from load import Load, percentile, rss_bytes

from lipsync_cluster import nginx
from lipsync_cluster.launcher import Cluster, ClusterSpec
from service_common.processes import ServiceProcess, free_port, wait_serving
from shared_proto import inference_pb2 as ipb
from shared_proto import inference_pb2_grpc

BIN = Path(sys.executable).parent


def inference_process(models_dir: Path, port: int, log: Path, *extra: str) -> ServiceProcess:
    argv = [
        str(BIN / "lipsync-inference"),
        "--config",
        str(models_dir / "inference.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    return ServiceProcess(argv, port, log).wait_serving(120)


def compositing_process(models_dir: Path, targets: str, log: Path, *sets: str) -> ServiceProcess:
    port = free_port()
    argv = [
        str(BIN / "lipsync-compositing"),
        "--config",
        str(models_dir / "compositing.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--inference-url",
        targets,
        "--set",
        f"frames_cache_dir={log.parent / 'frames'}",
        "--set",
        "warmup=false",
    ]
    for override in sets:
        argv += ["--set", override]
    return ServiceProcess(argv, port, log).wait_serving(120)


def kill(process: ServiceProcess) -> None:
    os.kill(process.process.pid, signal.SIGKILL)
    process.process.wait(10)
    process.stop()


def test_inference_killed_under_load_gives_unavailable_in_time_then_recovers(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    inference = inference_process(models_dir, port, tmp_path / "inference.log")
    compositing = compositing_process(
        models_dir,
        f"127.0.0.1:{port}",
        tmp_path / "compositing.log",
        "inference_server.max_retries=2",
        "inference_server.timeout_seconds=2",
    )
    restarted = None
    try:
        with Load(compositing.address, threads=3, timeout=3.0, retries=False) as load:  # the service's own answer
            time.sleep(1.5)
            assert load.codes() and set(load.codes()) == {"OK"}, load.codes()
            killed = time.monotonic()
            kill(inference)
            time.sleep(3.0)
            restarting = time.monotonic()
            restarted = inference_process(models_dir, port, tmp_path / "inference-2.log")
            serving = time.monotonic()
            deadline = serving + 10
            while time.monotonic() < deadline and not any(
                o.code == "OK" for o in load.snapshot() if o.started >= serving
            ):
                time.sleep(0.05)
            time.sleep(0.5)
        outcomes = load.snapshot()
        down = [o for o in outcomes if killed + 0.2 < o.started and o.ended < restarting]
        assert len(down) >= 3, "no requests were made while inference was down"
        assert {o.code for o in down} == {"UNAVAILABLE"}, {(o.code, o.details) for o in down}
        assert all("inference service unreachable" in o.details for o in down)
        # No hang: every call ended within its 3 s deadline (the replica answers before the client gives up).
        assert max(o.seconds for o in outcomes) < 3.0, max(o.seconds for o in outcomes)
        first_ok = min(o.ended for o in outcomes if o.code == "OK" and o.started >= serving)
        assert first_ok - serving < 2.0, f"recovered {first_ok - serving:.2f} s after the restart"
    finally:
        compositing.stop()
        inference.stop()
        if restarted is not None:
            restarted.stop()


def test_one_of_two_inference_servers_killed_under_load_loses_no_request(models_dir: Path, tmp_path: Path) -> None:
    a = inference_process(models_dir, free_port(), tmp_path / "a.log")
    b = inference_process(models_dir, free_port(), tmp_path / "b.log")
    compositing = compositing_process(models_dir, f"{a.address},{b.address}", tmp_path / "compositing.log")
    try:
        with Load(compositing.address, threads=3, timeout=10.0) as load:
            time.sleep(1.5)
            kill(a)
            time.sleep(3.0)
        codes = load.codes()
        assert set(codes) == {"OK"} and codes["OK"] > 20, codes
    finally:
        compositing.stop()
        b.stop()
        a.stop()


def test_sigterm_to_a_replica_behind_nginx_loses_no_accepted_request(models_dir: Path) -> None:
    assert nginx.find_nginx(), nginx.install_hint()  # make test installs nginx: a failure, never a skip
    spec = ClusterSpec(
        models_dir=models_dir,
        port=free_port(),
        replicas=2,
        compositing_overrides=["warmup=false", "server.grace_seconds=10"],
    )
    cluster = Cluster(spec).start()
    try:
        victim = cluster.replicas[0]
        with Load(cluster.address, threads=4, timeout=20.0) as load:
            time.sleep(1.5)
            victim.process.process.send_signal(signal.SIGTERM)
            code = victim.process.process.wait(30)
            time.sleep(1.5)
        assert code == 0
        codes = load.codes()
        assert set(codes) == {"OK"} and codes["OK"] > 20, {
            (o.code, o.details) for o in load.snapshot() if o.code != "OK"
        }
        assert cluster.dead_parts() == ["compositing 1"]
    finally:
        cluster.stop()


def test_overload_is_refused_at_once_memory_stays_flat_and_admitted_latency_holds(
    models_dir: Path, tmp_path: Path
) -> None:
    inference = inference_process(models_dir, free_port(), tmp_path / "inference.log")
    compositing = compositing_process(
        models_dir,
        inference.address,
        tmp_path / "compositing.log",
        "server.max_inflight_requests=1",
        "server.max_queued_requests=1",
    )
    try:
        with Load(compositing.address, threads=1, batch_size=4, timeout=30.0) as calm:
            time.sleep(3.0)
        baseline = [o.seconds for o in calm.snapshot()[3:] if o.code == "OK"]
        assert len(baseline) >= 5
        rss_before = rss_bytes(compositing.process.pid)
        rounds = []
        for _ in range(3):
            with Load(compositing.address, threads=12, batch_size=4, timeout=30.0, honor_retry_after=True) as storm:
                time.sleep(3.0)
            rounds.append(storm.snapshot())
        rss_after = rss_bytes(compositing.process.pid)
        outcomes = [o for r in rounds for o in r]
        refused = [o for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
        admitted = [o.seconds for o in outcomes if o.code == "OK"]
        assert {o.code for o in outcomes} <= {"OK", "RESOURCE_EXHAUSTED"}
        assert len(refused) > len(admitted) > 10
        assert all(o.retry_after_ms and o.retry_after_ms > 0 for o in refused)
        assert percentile([o.seconds for o in refused], 99) < 0.25, "a refusal must come at once"
        # 1 running + 1 waiting: an admitted request waits for at most one other, whatever the load.
        p50, base50 = percentile(admitted, 50), percentile(baseline, 50)
        assert p50 < 3.0 * base50 + 0.05, (p50, base50)
        assert percentile(admitted, 95) < 4.0 * percentile(baseline, 95) + 0.1
        assert rss_after - rss_before < 64 << 20, (rss_before >> 20, rss_after >> 20)
        with grpc.insecure_channel(compositing.address) as channel:
            wait_serving(compositing.address, 5)
            assert channel is not None
    finally:
        compositing.stop()
        inference.stop()


@pytest.mark.timeout(1800)
def test_soak_flat_memory_and_zero_errors(models_dir: Path, tmp_path: Path, soak_seconds: float) -> None:
    """Minutes of steady load (``--soak-seconds`` or LIPSYNC_SOAK_SECONDS for longer): no error, flat RSS."""
    inference = inference_process(models_dir, free_port(), tmp_path / "inference.log")
    compositing = compositing_process(models_dir, inference.address, tmp_path / "compositing.log")
    pids = {"inference": inference.process.pid, "compositing": compositing.process.pid}
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
    try:
        started = time.monotonic()
        with Load(compositing.address, threads=2, batch_size=4, timeout=30.0, pause=0.02) as load:
            while time.monotonic() - started < soak_seconds:
                for name, pid in pids.items():
                    samples[name].append((time.monotonic() - started, rss_bytes(pid)))
                time.sleep(2.0)
        codes = load.codes()
        assert set(codes) == {"OK"} and codes["OK"] > soak_seconds, codes
        for name, series in samples.items():
            # After the first third (caches, arenas and ORT warming up), memory stays within a few MB.
            settled = [rss for t, rss in series if t >= soak_seconds / 3]
            middle = [rss for t, rss in series if soak_seconds / 3 <= t < 2 * soak_seconds / 3]
            late = [rss for t, rss in series if t >= 2 * soak_seconds / 3]
            assert settled and middle and late
            growth = max(late) - max(middle)
            assert growth < 24 << 20, f"{name}: RSS grew {growth >> 20} MB in the last third ({settled[0] >> 20} MB)"
    finally:
        compositing.stop()
        inference.stop()


def test_sigterm_goes_not_serving_refuses_new_calls_and_lets_calls_in_flight_finish(
    models_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    service = inference_process(
        models_dir,
        port,
        tmp_path / "inference.log",
        "--set",
        "models.unet328.preload=true",
        "--set",
        "server.shutdown_delay_seconds=1.5",
        "--set",
        "server.grace_seconds=20",
    )
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            slow = ipb.InferBatchRequest(
                model_id="unet328",
                visual_frames=np.zeros((6, 6, 320, 320), np.uint8).tobytes(),
                visual_dtype=ipb.DTYPE_UINT8,
                audio_features=np.zeros((32, 16, 16), np.float32).tobytes(),
                batch_size=6,
                output_dtype=ipb.DTYPE_UINT8,
            )
            started = time.monotonic()
            in_flight = stub.InferBatch.future(slow, timeout=60)
            time.sleep(0.3)
            service.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            # During the shutdown delay: still answering, but NOT_SERVING (load balancers stop sending).
            for name in ("", "inference.InferenceService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            time.sleep(1.5)
            # After it: new calls are refused ...
            with grpc.insecure_channel(service.address) as fresh, pytest.raises(grpc.RpcError) as err:
                inference_pb2_grpc.InferenceServiceStub(fresh).Health(ipb.HealthRequest(), timeout=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # ... and the call accepted before SIGTERM still completes.
            response = in_flight.result(timeout=60)
            assert response.success and len(response.outputs) == 6
            assert time.monotonic() - started > 2.0, "the call should have outlived the shutdown delay"
        assert service.process.wait(30) == 0
    finally:
        service.stop()
