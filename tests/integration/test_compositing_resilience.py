"""Compositing under failure and pressure: inference down and back, deadlines, cache bounds, broken avatars,
and in-process mode giving the same frames as the remote one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ServerThread, make_compositing_config, make_config, wait_until, write_small_avatar

from service_common.processes import free_port
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc

WINDOW = np.full((32, 16, 16), 0.7, np.float32).tobytes()


def stub_for(server: ServerThread) -> tuple[grpc.Channel, compositing_pb2_grpc.CompositingServiceStub]:
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 256 << 20)])
    return channel, compositing_pb2_grpc.CompositingServiceStub(channel)


def request(batch: int = 2, start: int = 0, model: str = "demo") -> pb.CompositeBatchRequest:
    return pb.CompositeBatchRequest(model_id=model, audio_features=WINDOW, batch_size=batch, start_frame_idx=start)


def seconds_of(call) -> float:
    """How long ``call()`` takes: the baseline a test's time bound is derived from, measured in the same run."""
    started = time.monotonic()
    call()
    return time.monotonic() - started


def test_inference_down_gives_unavailable_in_time_and_recovers_without_restart(models_dir: Path) -> None:
    port = free_port()
    inference = ServerThread(make_config(models_dir, **{"server.port": port}))
    compositing = ServerThread.compositing(
        make_compositing_config(models_dir, f"127.0.0.1:{port}", **{"inference_server.max_retries": 2, "warmup": False})
    )
    channel, stub = stub_for(compositing)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        assert stub.InferBatchComposite(request()).success
        calm = seconds_of(lambda: stub.InferBatchComposite(request()))  # a warm call with inference up
        inference.stop()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.InferBatchComposite(request(), timeout=5)
        elapsed = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "inference service unreachable" in err.value.details()
        # In time: the replica's own answer, after its configured retries and their backoff (not the client's
        # deadline), within a few calm calls' time of that.
        config = compositing.config
        backoff = sum(min(config.inference_retry_backoff_s * 2**k, 2.0) for k in range(config.inference_max_retries))
        assert elapsed < backoff + 5 * calm + 1.0, (elapsed, backoff, calm)
        assert not stub.Health(pb.HealthRequest()).inference_server_healthy

        def not_serving() -> bool:  # the watcher flips grpc.health.v1 within its interval
            return health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING

        assert wait_until(not_serving, timeout=30, interval=0.2)

        inference = ServerThread(make_config(models_dir, **{"server.port": port}))

        def recovered() -> bool:
            try:
                return stub.InferBatchComposite(request(), timeout=5).success
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                return False

        assert wait_until(recovered, timeout=30, interval=0.3), "compositing did not recover"
        assert stub.Health(pb.HealthRequest()).inference_server_healthy
    finally:
        channel.close()
        compositing.stop()
        inference.stop()


@pytest.mark.slow  # unet328 preloaded and run
def test_client_deadline_bounds_the_whole_request(models_dir: Path) -> None:
    inference = ServerThread(make_config(models_dir, **{"models.unet328.preload": True}))
    compositing = ServerThread.compositing(make_compositing_config(models_dir, inference.address))
    channel, stub = stub_for(compositing)
    try:
        calm = seconds_of(lambda: stub.Health(pb.HealthRequest()))  # a quick round trip through both services
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.InferBatchComposite(request(batch=8, model="unet328"), timeout=0.5)
        elapsed = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert elapsed < 0.5 + 5 * calm + 1.0, (elapsed, calm)  # the deadline, and not much more
        assert stub.Health(pb.HealthRequest()).healthy
    finally:
        channel.close()
        compositing.stop()
        inference.stop()


def test_cache_bounds_hold_under_many_frames_and_models(models_dir: Path, tmp_path: Path) -> None:
    frames_dir, rects = write_small_avatar(tmp_path / "small")
    frame_bytes = 640 * 360 * 3 + 328 * 328 * 3  # a cached frame and its face crop
    overrides = {
        "capacity.background_cache_frames": 6,
        "capacity.background_cache_mb": (10 * frame_bytes) / 2**20,
        "capacity.max_models": 2,
        "models.demo.preload_backgrounds": False,
        "models.small.background_dir": str(frames_dir),
        "models.small.crop_rects_path": str(rects),
        "models.small.inference_model": "demo",
        "models.small2.background_dir": str(frames_dir),
        "models.small2.crop_rects_path": str(rects),
        "models.small2.inference_model": "demo",
        "warmup": False,
    }
    inference = ServerThread(make_config(models_dir))
    compositing = ServerThread.compositing(make_compositing_config(models_dir, inference.address, **overrides))
    channel, stub = stub_for(compositing)
    try:
        for start in range(0, 30, 4):
            stub.InferBatchComposite(request(batch=4, start=start, model="small"))
            stats = stub.GetModelStats(pb.GetModelStatsRequest(model_id="small")).models[0].stats
            assert stats.cached_frames <= 6 and stats.cache_bytes <= 6 * frame_bytes
        for start in range(0, 30, 4):
            stub.InferBatchComposite(request(batch=4, start=start, model="small2"))
        everything = stub.GetModelStats(pb.GetModelStatsRequest())
        assert everything.total_memory_bytes <= 10 * frame_bytes
        assert everything.loaded_models <= 2
        # A third avatar evicts the least frequently used one (small: 8 uses, small2: 8, then small2 is newer).
        stub.InferBatchComposite(request(batch=1, model="small2"))
        stub.InferBatchComposite(request(batch=1, model="demo"))
        loaded = {m.model_id for m in stub.ListModels(pb.ListModelsRequest()).models if m.loaded}
        assert loaded == {"small2", "demo"}
        assert stub.GetModelStats(pb.GetModelStatsRequest(model_id="small")).models[0].stats.cached_frames == 0
    finally:
        channel.close()
        compositing.stop()
        inference.stop()


def test_broken_avatar_fails_its_load_and_breaks_no_other(models_dir: Path, tmp_path: Path) -> None:
    frames_dir, rects = write_small_avatar(tmp_path / "small", frames=5)
    too_few = tmp_path / "short.json"
    too_few.write_text("[[0, 0, 100, 100]]")
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps([[600, 300, 700, 400]] * 5))
    overrides = {
        "models.short.background_dir": str(frames_dir),
        "models.short.crop_rects_path": str(too_few),
        "models.outside.background_dir": str(frames_dir),
        "models.outside.crop_rects_path": str(outside),
        "models.nodir.background_dir": str(tmp_path / "missing"),
        "models.nodir.crop_rects_path": str(rects),
        "warmup": False,
    }
    inference = ServerThread(make_config(models_dir))
    compositing = ServerThread.compositing(make_compositing_config(models_dir, inference.address, **overrides))
    channel, stub = stub_for(compositing)
    try:
        for model, words in (("short", "1 rects for 5"), ("outside", "not inside"), ("nodir", "does not exist")):
            with pytest.raises(grpc.RpcError) as err:
                stub.InferBatchComposite(request(model=model))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert words in err.value.details() and model in err.value.details()
            assert stub.InferBatchComposite(request()).success
    finally:
        channel.close()
        compositing.stop()
        inference.stop()


def test_in_process_and_remote_modes_give_identical_frames(models_dir: Path) -> None:
    inference = ServerThread(make_config(models_dir))
    remote = ServerThread.compositing(make_compositing_config(models_dir, inference.address))
    local = ServerThread.compositing(
        make_compositing_config(
            models_dir, "127.0.0.1:1", **{"inference.mode": "in_process", "inference.config": "inference.yaml"}
        )
    )
    remote_channel, remote_stub = stub_for(remote)
    local_channel, local_stub = stub_for(local)
    try:
        audio = np.linspace(0, 1, 3 * 32 * 16 * 16, dtype=np.float32).tobytes()
        req = pb.CompositeBatchRequest(model_id="demo", audio_features=audio, batch_size=3, start_frame_idx=9)
        a = remote_stub.InferBatchComposite(req)
        b = local_stub.InferBatchComposite(req)
        assert list(a.composited_frames) == list(b.composited_frames)
        health = local_stub.Health(pb.HealthRequest())
        assert health.healthy and health.inference_mode == "in_process"
    finally:
        remote_channel.close()
        local_channel.close()
        local.stop()
        remote.stop()
        inference.stop()
