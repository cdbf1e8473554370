"""The local cluster through nginx on loopback: spreading, failover, round_robin inference, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from lipsync_cluster import nginx
from lipsync_cluster.launcher import Cluster, ClusterError, ClusterSpec
from service_common.processes import free_port
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.needs_tools  # nginx: the local cluster

BIN = Path(sys.executable).parent
WINDOW = np.full((32, 16, 16), 0.6, np.float32).tobytes()


def require_nginx() -> None:
    # make test installs nginx (Makefile: system-deps); a missing nginx is a failure, never a skip.
    assert nginx.find_nginx(), nginx.install_hint()


def request(start: int) -> pb.CompositeBatchRequest:
    return pb.CompositeBatchRequest(model_id="demo", audio_features=WINDOW, batch_size=2, start_frame_idx=start)


def usage(address: str, inference: bool = False) -> int:
    with grpc.insecure_channel(address) as channel:
        if inference:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            return stub.GetModelStats(inference_pb2.GetModelStatsRequest(model_id="demo")).models[0].stats.usage_count
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        return stub.GetModelStats(pb.GetModelStatsRequest(model_id="demo")).models[0].stats.usage_count


@pytest.fixture(scope="module")
def cluster(models_dir: Path):
    require_nginx()
    spec = ClusterSpec(
        models_dir=models_dir, port=free_port(), replicas=2, inference_servers=2, compositing_overrides=["warmup=false"]
    )
    running = Cluster(spec).start()
    yield running
    running.stop()


def test_requests_spread_over_replicas_and_inference_servers(cluster: Cluster) -> None:
    before = [usage(p.process.address) for p in cluster.replicas]
    before_inf = [usage(p.process.address, inference=True) for p in cluster.inference]
    with grpc.insecure_channel(cluster.address) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        for i in range(12):
            assert stub.InferBatchComposite(request(i * 2), timeout=60).success
    after = [usage(p.process.address) for p in cluster.replicas]
    after_inf = [usage(p.process.address, inference=True) for p in cluster.inference]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert sum(after) - sum(before) == 12
    assert all(a > b for a, b in zip(after_inf, before_inf, strict=True)), (before_inf, after_inf)


def test_killing_a_replica_mid_run_later_requests_succeed(cluster: Cluster) -> None:
    victim = cluster.replicas[0]
    with grpc.insecure_channel(cluster.address) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        assert stub.InferBatchComposite(request(0), timeout=60).success
        os.kill(victim.pid, signal.SIGKILL)
        victim.process.process.wait(10)
        # No wait for nginx to notice: the replica is reaped (its sockets closed), and nginx passes a request that
        # fails on it to the other replica (grpc_next_upstream error), so the very next request must succeed.
        results = [stub.InferBatchComposite(request(i), timeout=60).success for i in range(8)]
    assert all(results)
    assert cluster.dead_parts() == ["compositing 1"]


def test_cluster_stops_cleanly_and_reports_a_part_that_fails(models_dir: Path, tmp_path: Path) -> None:
    require_nginx()
    spec = ClusterSpec(models_dir=models_dir, port=free_port(), replicas=1, compositing_overrides=["warmup=false"])
    cluster = Cluster(spec).start()
    pids = [part.pid for part in cluster.parts()]
    workdir = cluster.workdir
    assert len(pids) == 3 and workdir.is_dir()
    cluster.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not workdir.exists()

    bad = ClusterSpec(
        models_dir=models_dir, port=free_port(), replicas=1, compositing_overrides=["output.jpeg_quality=500"]
    )
    with pytest.raises(ClusterError, match=r"(?s)compositing 1 failed to start.*jpeg_quality"):
        Cluster(bad).start()
    with pytest.raises(ClusterError, match="missing"):
        Cluster(ClusterSpec(models_dir=tmp_path)).start()


def test_cli_up_detached_and_down(models_dir: Path) -> None:
    require_nginx()
    port = free_port()
    up = subprocess.run(
        [
            str(BIN / "lipsync-cluster"),
            "up",
            "--detach",
            "--replicas",
            "1",
            "--models-dir",
            str(models_dir),
            "--port",
            str(port),
            "--set-compositing",
            "warmup=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert up.returncode == 0, up.stderr
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = compositing_pb2_grpc.CompositingServiceStub(channel)
            assert stub.InferBatchComposite(request(0), timeout=60).success
    finally:
        down = subprocess.run(
            [str(BIN / "lipsync-cluster"), "down", "--port", str(port)], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    again = subprocess.run(
        [str(BIN / "lipsync-cluster"), "down", "--port", str(port)], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 1 and "no background cluster" in again.stderr
