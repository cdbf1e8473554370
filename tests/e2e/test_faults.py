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
from support import make_compositing_config, wait_until

from compositing_service.inference_client import channel_options
from lipsync_client.retry import RETRYABLE_CODES
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


def started_after(load: Load, moment: float) -> int:
    """Calls the load has finished that started after ``moment``."""
    return sum(o.started > moment for o in load.snapshot())


@pytest.mark.slow  # a fault under sustained load from several clients, by design
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
            assert wait_until(lambda: len(load.snapshot()) >= 9, timeout=60), "no calls were made"
            assert set(load.codes()) == {"OK"}, load.codes()
            # The baseline: a call with inference up (past each client's first, which loads the avatar).
            calm = percentile([o.seconds for o in load.snapshot()[3:]], 50)
            kill(inference)
            killed = time.monotonic()  # inference is gone (reaped): every call from now on finds it down
            assert wait_until(lambda: started_after(load, killed) >= 6, timeout=60), load.codes()
            restarting = time.monotonic()
            restarted = inference_process(models_dir, port, tmp_path / "inference-2.log")
            serving = time.monotonic()
            assert wait_until(
                lambda: any(o.code == "OK" for o in load.snapshot() if o.started >= serving), timeout=30
            ), load.codes(since=serving)
        outcomes = load.snapshot()
        down = [o for o in outcomes if killed < o.started and o.ended < restarting]
        assert len(down) >= 3, "no requests were made while inference was down"
        assert {o.code for o in down} == {"UNAVAILABLE"}, {(o.code, o.details) for o in down}
        assert all("inference service unreachable" in o.details for o in down)
        # No hang: every call got the replica's own answer before its 3 s deadline (the client never gave up).
        assert "DEADLINE_EXCEEDED" not in {o.code for o in outcomes}, max(o.seconds for o in outcomes)
        # Recovered in time: the replica's channel retries the connection at most every max_reconnect_backoff_ms
        # (gRPC adds up to 20% jitter), a call that just missed it fails after its retries' backoff, and then a
        # call like the calm ones before the kill succeeds.
        config = make_compositing_config(models_dir, "127.0.0.1:1", **{"inference_server.max_retries": 2})
        reconnect = 1.2 * dict(channel_options(config, "127.0.0.1:1"))["grpc.max_reconnect_backoff_ms"] / 1000
        backoff = sum(min(config.inference_retry_backoff_s * 2**k, 2.0) for k in range(config.inference_max_retries))
        bound = reconnect + backoff + 5 * calm + 0.5
        first_ok = min(o.ended for o in outcomes if o.code == "OK" and o.started >= serving)
        assert first_ok - serving < bound, f"recovered {first_ok - serving:.2f} s after the restart (bound {bound:.2f})"
    finally:
        compositing.stop()
        inference.stop()
        if restarted is not None:
            restarted.stop()


@pytest.mark.slow  # a fault under sustained load from several clients, by design
def test_one_of_two_inference_servers_killed_under_load_loses_no_request(models_dir: Path, tmp_path: Path) -> None:
    a = inference_process(models_dir, free_port(), tmp_path / "a.log")
    b = inference_process(models_dir, free_port(), tmp_path / "b.log")
    compositing = compositing_process(models_dir, f"{a.address},{b.address}", tmp_path / "compositing.log")
    try:
        with Load(compositing.address, threads=3, timeout=10.0) as load:
            assert wait_until(lambda: len(load.snapshot()) >= 9, timeout=60), load.codes()  # 3 calls a client
            kill(a)
            killed = time.monotonic()
            # The load goes on with b alone: 4 more calls a client, after those a had in flight.
            assert wait_until(lambda: started_after(load, killed) >= 12, timeout=60), load.codes()
        codes = load.codes()
        assert set(codes) == {"OK"} and codes["OK"] > 20, codes
    finally:
        compositing.stop()
        b.stop()
        a.stop()


@pytest.mark.needs_tools  # nginx: the local cluster
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
            assert wait_until(lambda: len(load.snapshot()) >= 8, timeout=60), load.codes()  # 2 calls a client
            victim.process.process.send_signal(signal.SIGTERM)
            code = victim.process.process.wait(30)
            exited = time.monotonic()
            # The load goes on through the other replica alone: 2 more calls a client, and more than 20 in all.
            assert wait_until(lambda: started_after(load, exited) >= 8 and len(load.snapshot()) > 20, timeout=60), (
                load.codes()
            )
        assert code == 0
        codes = load.codes()
        assert set(codes) == {"OK"} and codes["OK"] > 20, {
            (o.code, o.details) for o in load.snapshot() if o.code != "OK"
        }
        assert cluster.dead_parts() == ["compositing 1"]
    finally:
        cluster.stop()


@pytest.mark.slow  # over 1,200 calls of overload in three rounds, by design
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
            # The baseline: 30 calls after 3 warming ones (avatar load, first inference), one at a time.
            assert wait_until(lambda: len(calm.snapshot()) >= 33, timeout=120), calm.codes()
        baseline = [o.seconds for o in calm.snapshot()[3:] if o.code == "OK"]
        assert len(baseline) >= 30
        rss_before = rss_bytes(compositing.process.pid)
        rounds = []
        for _ in range(3):
            with Load(compositing.address, threads=12, batch_size=4, timeout=30.0, honor_retry_after=True) as storm:
                # A round lasts for 400 calls, 10 of them admitted at least: the same load on any machine.
                assert wait_until(lambda: storm.codes()["OK"] >= 10 and len(storm.snapshot()) >= 400, timeout=120), (
                    storm.codes()
                )
            rounds.append(storm.snapshot())
        rss_after = rss_bytes(compositing.process.pid)
        outcomes = [o for r in rounds for o in r]
        refused = [o for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
        admitted = [o.seconds for o in outcomes if o.code == "OK"]
        assert {o.code for o in outcomes} <= {"OK", "RESOURCE_EXHAUSTED"}
        assert len(refused) > len(admitted) > 10
        assert all(o.retry_after_ms and o.retry_after_ms > 0 for o in refused)
        # A refusal comes at once: no later than a few calm calls would take (it does no work and waits for none).
        refused_p99, base95 = percentile([o.seconds for o in refused], 99), percentile(baseline, 95)
        assert refused_p99 < 5 * base95 + 0.1, ("a refusal must come at once", refused_p99, base95)
        # 1 running + 1 waiting: an admitted request waits for at most one other, whatever the load.
        p50, base50 = percentile(admitted, 50), percentile(baseline, 50)
        assert p50 < 3.0 * base50 + 0.05, (p50, base50)
        assert percentile(admitted, 95) < 4.0 * base95 + 0.1
        assert rss_after - rss_before < 64 << 20, (rss_before >> 20, rss_after >> 20)
        with grpc.insecure_channel(compositing.address) as channel:
            wait_serving(compositing.address, 30)
            assert channel is not None
    finally:
        compositing.stop()
        inference.stop()


@pytest.mark.slow  # minutes of load (--soak-seconds)
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


@pytest.mark.slow  # unet328 preloaded, a batch of it in flight
def test_sigterm_goes_not_serving_refuses_new_calls_and_lets_calls_in_flight_finish(
    models_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    delay = 1.5  # server.shutdown_delay_seconds: NOT_SERVING, still answering, for this long after SIGTERM
    service = inference_process(
        models_dir,
        port,
        tmp_path / "inference.log",
        "--set",
        "models.unet328.preload=true",
        "--set",
        f"server.shutdown_delay_seconds={delay}",
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

            def running() -> bool:  # accepted and running on a device worker (or, on fast hardware, done already)
                return in_flight.done() or any(
                    d.active_runs for d in stub.Health(ipb.HealthRequest(), timeout=5).devices
                )

            assert wait_until(running, timeout=30, interval=0.02), "the slow call never started"
            service.process.send_signal(signal.SIGTERM)

            def status(name: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status

            # During the shutdown delay: still answering, but NOT_SERVING (load balancers stop sending).
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert wait_until(lambda: status("") == not_serving, timeout=30, interval=0.02)
            for name in ("", "inference.InferenceService"):
                assert status(name) == not_serving

            # After it: new calls are refused ...
            def refused() -> grpc.RpcError | None:
                with grpc.insecure_channel(service.address) as fresh:
                    try:
                        inference_pb2_grpc.InferenceServiceStub(fresh).Health(ipb.HealthRequest(), timeout=2)
                    except grpc.RpcError as exc:
                        return exc
                return None  # still answering: the delay is not over

            err = wait_until(refused, timeout=30, interval=0.05)
            assert err is not None, "new calls were still answered"
            # A call that reaches the server in the instant it stops accepting is cancelled by gRPC (1 run in 40
            # here); every later one finds no listener. Both codes are ones lipsync-client retries elsewhere.
            assert err.code().name in RETRYABLE_CODES, err.code()
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                err = refused()
                assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, err
            # ... and the call accepted before SIGTERM still completes.
            response = in_flight.result(timeout=60)
            assert response.success and len(response.outputs) == 6
            assert time.monotonic() - started > delay, "the call should have outlived the shutdown delay"
        assert service.process.wait(30) == 0
    finally:
        service.stop()
