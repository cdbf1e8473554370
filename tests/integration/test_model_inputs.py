"""Model inputs by reference on the compositing -> inference hop: kept once, named by key after.

The inference server is driven directly (what a key resolves to, what it refuses) and through the compositing
service (frames identical however the references fare: hit, miss, eviction, a restarted or a second inference
server), against the frames of the in-process mode and of a client that sends the whole model input itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import ServerThread, make_compositing_config, make_config, wait_until

from compositing_service.avatars import open_avatar
from compositing_service.geometry import frame_index, model_input, real_crop
from lipsync_protocol.geometry import DEFAULT
from shared_proto import compositing_pb2 as cpb
from shared_proto import compositing_pb2_grpc, inference_pb2_grpc
from shared_proto import inference_pb2 as pb

OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
FRAMES = 4
FEATURES = np.random.default_rng(5).standard_normal((FRAMES, 32, 16, 16)).astype(np.float32)


def crops(count: int = FRAMES, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3, 320, 320), dtype=np.uint8)


def infer_request(model: str = "demo", **fields) -> pb.InferBatchRequest:
    request = pb.InferBatchRequest(
        model_id=model,
        batch_size=FRAMES,
        audio_features=FEATURES.tobytes(),
        audio_features_shape=list(FEATURES.shape),
        output_dtype=pb.DTYPE_UINT8,
        visual_dtype=pb.DTYPE_UINT8,
    )
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    return request


def mouths(response: pb.InferBatchResponse) -> np.ndarray:
    return np.stack([np.frombuffer(o.data, np.uint8).reshape(o.shape) for o in response.outputs])


@pytest.fixture(scope="module")
def inference(models_dir: Path) -> Iterator[ServerThread]:
    server = ServerThread(make_config(models_dir, **{"capacity.input_cache_mb": 8}))
    yield server
    server.stop()


@pytest.fixture()
def infer(inference: ServerThread) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(inference.address, options=OPTIONS) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def test_real_crops_give_the_outputs_of_the_whole_input(infer) -> None:
    real = crops()
    whole = np.concatenate([real, real], axis=1)
    whole[:, 3:, DEFAULT.mask_rows, DEFAULT.mask_cols] = 0  # what a client building all six channels sends
    expected = mouths(infer.InferBatch(infer_request(visual_frames=whole.tobytes())))
    three = infer.InferBatch(infer_request(visual_frames=real.tobytes(), visual_channels=3))
    assert np.array_equal(mouths(three), expected)


@pytest.mark.slow  # the forged request loads unet328 (its warm-up run)
def test_keys_hit_miss_and_scoping_by_model(infer) -> None:
    real = crops(seed=2)
    keys = [f"t1/{i}" for i in range(FRAMES)]
    whole = np.concatenate([real, real], axis=1)
    whole[:, 3:, DEFAULT.mask_rows, DEFAULT.mask_cols] = 0
    expected = mouths(infer.InferBatch(infer_request(visual_frames=whole.tobytes())))
    # First pass: every frame's pixels with its key.
    first = infer.InferBatch(
        infer_request(
            visual_keys=keys, visual_sent=list(range(FRAMES)), visual_frames=real.tobytes(), visual_channels=3
        )
    )
    assert first.success and np.array_equal(mouths(first), expected)
    # Keys alone: the held inputs, the same outputs.
    held = infer.InferBatch(infer_request(visual_keys=keys, visual_channels=3))
    assert held.success and not held.missing_visual and np.array_equal(mouths(held), expected)
    # Two keys it never saw: their positions come back, nothing runs.
    mixed = [keys[0], "t1/never", keys[2], "t1/nor-this"]
    missing = infer.InferBatch(infer_request(visual_keys=mixed, visual_channels=3))
    assert list(missing.missing_visual) == [1, 3] and not missing.outputs and not missing.success
    assert "send their pixels" in missing.error
    # Sending just those pixels completes the call.
    done = infer.InferBatch(
        infer_request(visual_keys=mixed, visual_sent=[1, 3], visual_frames=real[[1, 3]].tobytes(), visual_channels=3)
    )
    assert np.array_equal(mouths(done), expected)
    # A key held for demo does not resolve for another model, even one that would accept the pixels.
    forged = infer.InferBatch(infer_request(model="unet328", visual_keys=keys, visual_channels=3))
    assert list(forged.missing_visual) == list(range(FRAMES)) and not forged.outputs
    stats = infer.Health(pb.HealthRequest())
    assert 0 < stats.input_cache_bytes <= stats.input_cache_max_bytes == 8 << 20
    assert stats.input_cache_entries >= FRAMES + 2


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"visual_keys": [""] * FRAMES, "visual_channels": 3}, "visual_keys[0]"),
        ({"visual_keys": ["x" * 201] + ["k"] * 3, "visual_channels": 3}, "visual_keys[0]"),
        ({"visual_keys": ["a", "b", "c", "d"], "visual_channels": 6}, "visual_channels"),
        ({"visual_keys": ["a", "b", "c"], "visual_channels": 3}, "visual_keys: batch_size is 4"),
        ({"visual_keys": ["a", "b", "c", "d"], "visual_sent": [2, 1], "visual_channels": 3}, "visual_sent"),
        ({"visual_keys": ["a", "b", "c", "d"], "visual_sent": [4], "visual_channels": 3}, "visual_sent"),
        ({"visual_keys": ["a", "b", "c", "d"], "visual_sent": [0], "visual_channels": 3}, "visual_frames"),
        ({"visual_channels": 5, "visual_frames": b"\0" * 10}, "visual_channels"),
    ],
)
def test_bad_references_are_refused_naming_the_field(infer, fields: dict, names: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        infer.InferBatch(infer_request(**fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert names in refused.value.details()
    assert infer.Health(pb.HealthRequest()).healthy


def test_the_input_cache_holds_its_bound_under_more_frames_than_it_fits(models_dir: Path) -> None:
    server = ServerThread(make_config(models_dir, **{"capacity.input_cache_mb": 1}))  # three 320x320 crops
    try:
        with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for start in range(0, 40, FRAMES):
                keys = [f"b/{start + i}" for i in range(FRAMES)]
                reply = stub.InferBatch(
                    infer_request(
                        visual_keys=keys,
                        visual_sent=list(range(FRAMES)),
                        visual_frames=crops(seed=start).tobytes(),
                        visual_channels=3,
                    )
                )
                assert len(reply.outputs) == FRAMES  # a request larger than the cache still runs whole
                health = stub.Health(pb.HealthRequest())
                assert health.input_cache_bytes <= health.input_cache_max_bytes == 1 << 20
                assert health.input_cache_entries == 3
            # The oldest are gone, the newest three held.
            oldest = stub.InferBatch(infer_request(visual_keys=["b/0", "b/1", "b/2", "b/3"], visual_channels=3))
            assert list(oldest.missing_visual) == [0, 1, 2, 3]
            newest = stub.InferBatch(infer_request(visual_keys=["b/37", "b/38", "b/39", "b/39"], visual_channels=3))
            assert not newest.missing_visual and len(newest.outputs) == FRAMES
    finally:
        server.stop()


# -- through the compositing service ---------------------------------------------------------------------------


def composite(stub, start: int, batch: int = FRAMES, model: str = "demo") -> list[bytes]:
    audio = np.random.default_rng(start).standard_normal((batch, 32, 16, 16)).astype(np.float32)
    reply = stub.InferBatchComposite(
        cpb.CompositeBatchRequest(
            model_id=model,
            audio_features=audio.tobytes(),
            audio_features_shape=list(audio.shape),
            batch_size=batch,
            start_frame_idx=start,
        )
    )
    return list(reply.composited_frames)


def run_walk(address: str, starts: list[int]) -> list[list[bytes]]:
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        return [composite(stub, s) for s in starts]


WALK = [0, 4, 8, 0, 4, 120, 124, 8, 0]  # repeats (hits), new frames (misses), the ping-pong turn


@pytest.fixture(scope="module")
def in_process_frames(models_dir: Path) -> list[list[bytes]]:
    config = make_compositing_config(
        models_dir,
        "127.0.0.1:1",
        **{"inference.mode": "in_process", "inference.config": str(models_dir / "inference.yaml"), "warmup": False},
    )
    server = ServerThread.compositing(config)
    try:
        return run_walk(server.address, WALK)
    finally:
        server.stop()


def test_old_clients_model_inputs_give_the_same_frames(models_dir: Path, in_process_frames) -> None:
    """A client sending the whole model input (visual_frames) gets the frames the server builds itself."""
    inference = ServerThread(make_config(models_dir))
    compositing = ServerThread.compositing(make_compositing_config(models_dir, inference.address, warmup=False))
    try:
        config = compositing.config
        avatar = open_avatar(config.models["demo"], config)
        with grpc.insecure_channel(compositing.address, options=OPTIONS) as channel:
            stub = compositing_pb2_grpc.CompositingServiceStub(channel)
            start = WALK[5]
            indices = list(stub.InferBatchComposite(_features_request(start)).frame_indices)
            visual = np.stack([model_input(avatar.load_frame(i).crop) for i in indices])
            request = _features_request(start)
            request.visual_frames = visual.tobytes()
            request.visual_dtype = pb.DTYPE_UINT8
            assert list(stub.InferBatchComposite(request).composited_frames) == in_process_frames[5]
        assert real_crop(avatar.load_frame(indices[0]).crop).shape == (3, 320, 320)
    finally:
        compositing.stop()
        inference.stop()


def _features_request(start: int) -> cpb.CompositeBatchRequest:
    audio = np.random.default_rng(start).standard_normal((FRAMES, 32, 16, 16)).astype(np.float32)
    return cpb.CompositeBatchRequest(
        model_id="demo",
        audio_features=audio.tobytes(),
        audio_features_shape=list(audio.shape),
        batch_size=FRAMES,
        start_frame_idx=start,
    )


def test_separated_frames_equal_in_process_through_hits_misses_and_evictions(
    models_dir: Path, in_process_frames
) -> None:
    # An input cache of three crops: most calls find some of their frames evicted and resend them.
    for cache_mb in (1024, 1):
        inference = ServerThread(make_config(models_dir, **{"capacity.input_cache_mb": cache_mb}))
        compositing = ServerThread.compositing(make_compositing_config(models_dir, inference.address, warmup=False))
        try:
            assert run_walk(compositing.address, WALK) == in_process_frames, cache_mb
            health = _inference_health(inference.address)
            assert health.input_cache_bytes <= health.input_cache_max_bytes
            hop = _compositing_health(compositing.address)
            distinct = len({frame_index(s + i, 125, "ping_pong") for s in WALK for i in range(FRAMES)})
            if cache_mb == 1024:  # every frame's pixels crossed once, then only its key
                assert (hop.hop_inputs_sent, hop.hop_inputs_resent) == (distinct, 0)
                assert hop.hop_frames == len(WALK) * FRAMES and hop.hop_requests == len(WALK)
            else:  # evicted inputs were reported missing and resent within the same client call
                assert hop.hop_inputs_resent > 0 and hop.hop_requests > len(WALK)
        finally:
            compositing.stop()
            inference.stop()


def test_a_restarted_and_a_second_inference_server_are_sent_what_they_lack(models_dir: Path, in_process_frames) -> None:
    first = ServerThread(make_config(models_dir))
    second = ServerThread(make_config(models_dir))
    urls = f"{first.address},{second.address}"
    compositing = ServerThread.compositing(make_compositing_config(models_dir, urls, warmup=False))
    try:
        assert run_walk(compositing.address, WALK) == in_process_frames  # round robin over both servers
        assert all(_inference_health(s.address).input_cache_entries > 0 for s in (first, second))
        # The first server restarts on its port: it holds nothing, the compositing service believes it does.
        port = first.running.port
        first.stop()
        first = ServerThread(make_config(models_dir, **{"server.port": port}))
        assert wait_until(lambda: _inference_health(first.address).healthy, timeout=30)
        assert _inference_health(first.address).input_cache_entries == 0
        resent = _compositing_health(compositing.address).hop_inputs_resent
        assert run_walk(compositing.address, WALK) == in_process_frames
        assert _inference_health(first.address).input_cache_entries > 0
        assert _compositing_health(compositing.address).hop_inputs_resent > resent
    finally:
        compositing.stop()
        first.stop()
        second.stop()


def _inference_health(address: str) -> pb.HealthResponse:
    with grpc.insecure_channel(address) as channel:
        return inference_pb2_grpc.InferenceServiceStub(channel).Health(pb.HealthRequest(), timeout=10)


def _compositing_health(address: str) -> cpb.HealthResponse:
    with grpc.insecure_channel(address) as channel:
        return compositing_pb2_grpc.CompositingServiceStub(channel).Health(cpb.HealthRequest(), timeout=10)


def test_held_inputs_on_the_device_path_give_the_same_outputs(models_dir: Path, infer) -> None:
    """The GPU path (inputs uploaded once, the float input built on the device, IOBinding), run on the CPU."""
    real = crops(seed=9)
    keys = [f"dev/{i}" for i in range(FRAMES)]
    send = infer_request(
        visual_keys=keys, visual_sent=list(range(FRAMES)), visual_frames=real.tobytes(), visual_channels=3
    )
    expected = mouths(infer.InferBatch(send))
    server = ServerThread(make_config(models_dir, **{"onnx.io_binding": "on", "onnx.device_inputs": "on"}))
    try:
        with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            assert np.array_equal(mouths(stub.InferBatch(send)), expected)  # pixels sent: stored, then built there
            held = stub.InferBatch(infer_request(visual_keys=keys, visual_channels=3))
            assert np.array_equal(mouths(held), expected)
    finally:
        server.stop()
