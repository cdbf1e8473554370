"""Both services end to end on loopback ports, with real ONNX Runtime and the generated avatar."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ServerThread, make_compositing_config, make_config

from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc, inference_pb2

WINDOW = (32, 16, 16)
OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


def loud_audio(batch: int, level: float = 0.8) -> np.ndarray:
    return np.full((batch, *WINDOW), level, np.float32)


@pytest.fixture(scope="module")
def inference(models_dir: Path):
    server = ServerThread(make_config(models_dir))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def compositing(models_dir: Path, inference):
    config = make_compositing_config(models_dir, inference.address, **{"output.format": "png"})
    server = ServerThread.compositing(config)
    yield server
    server.stop()


@pytest.fixture()
def comp_stub(compositing):
    with grpc.insecure_channel(compositing.address, options=OPTIONS) as channel:
        yield compositing_pb2_grpc.CompositingServiceStub(channel)


def decode(frames) -> list[np.ndarray]:
    return [cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_COLOR) for f in frames]


def reference_frame(frame: np.ndarray, rect, session: ort.InferenceSession, audio: np.ndarray) -> np.ndarray:
    """PIPELINE.md written out with OpenCV as SyncTalk_2D's inference script does it."""
    x1, y1, x2, y2 = rect
    crop_img = cv2.resize(frame[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    real = crop_img[4:324, 4:324].copy()
    masked = cv2.rectangle(real.copy(), (5, 5, 310, 305), (0, 0, 0), -1)
    concat = np.concatenate([real.transpose(2, 0, 1), masked.transpose(2, 0, 1)])[None].astype(np.float32) / 255.0
    pred = session.run(None, {"input": concat, "audio": audio[None]})[0][0]
    pred = np.array(pred.transpose(1, 2, 0) * 255, dtype=np.uint8)
    crop_img[4:324, 4:324] = pred
    out = frame.copy()
    out[y1:y2, x1:x2] = cv2.resize(crop_img, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
    return out


def background(config, index: int) -> np.ndarray:
    """The avatar's decoded frame as the service reads it."""
    from compositing_service.avatars import open_avatar

    return open_avatar(config.models["demo"], config).read_frame(index)


def test_frames_match_the_reference_pipeline_pixel_for_pixel(comp_stub, compositing, models_dir: Path) -> None:
    audio = loud_audio(3)
    response = comp_stub.InferBatchComposite(
        pb.CompositeBatchRequest(model_id="demo", audio_features=audio.tobytes(), batch_size=3, start_frame_idx=5)
    )
    assert response.success and list(response.frame_indices) == [5, 6, 7]
    assert response.total_time_ms >= response.composite_time_ms > 0 and response.inference_time_ms > 0
    assert response.device == "cpu" and response.gpu_id == -1
    rects = json.loads((models_dir / "avatar" / "crop_rects.json").read_text())
    session = ort.InferenceSession(str(models_dir / "demo" / "model.onnx"), providers=["CPUExecutionProvider"])
    for got, index in zip(decode(response.composited_frames), response.frame_indices, strict=True):
        expected = reference_frame(background(compositing.config, index), rects[index], session, audio[0])
        assert got.shape == (720, 1280, 3)
        assert int(np.abs(got.astype(int) - expected.astype(int)).max()) <= 1
        # The mouth really moved: the demo model opened it.
        assert int(np.abs(got.astype(int) - background(compositing.config, index).astype(int)).max()) > 50


def test_old_visual_frames_and_server_built_crops_give_the_same_frames(comp_stub, compositing) -> None:
    from compositing_service.geometry import crop_face, model_input

    audio = loud_audio(2, 0.5)
    built = comp_stub.InferBatchComposite(
        pb.CompositeBatchRequest(model_id="demo", audio_features=audio.tobytes(), batch_size=2, start_frame_idx=40)
    )
    rects = json.loads((Path(compositing.config.models_root) / "avatar" / "crop_rects.json").read_text())
    visual = (
        np.stack(
            [model_input(crop_face(background(compositing.config, i), rects[i])) for i in built.frame_indices]
        ).astype(np.float32)
        / 255.0
    )
    old = comp_stub.InferBatchComposite(
        pb.CompositeBatchRequest(
            model_id="demo",
            visual_frames=visual.tobytes(),
            audio_features=audio.tobytes(),
            batch_size=2,
            start_frame_idx=40,
        )
    )
    assert list(old.frame_indices) == list(built.frame_indices)
    for a, b in zip(decode(old.composited_frames), decode(built.composited_frames), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ping_pong_across_both_ends(comp_stub) -> None:
    audio = np.zeros(WINDOW, np.float32)
    end = comp_stub.InferBatchComposite(
        pb.CompositeBatchRequest(model_id="demo", audio_features=audio.tobytes(), batch_size=4, start_frame_idx=122)
    )
    assert list(end.frame_indices) == [122, 123, 124, 123]
    start = comp_stub.InferBatchComposite(
        pb.CompositeBatchRequest(model_id="demo", audio_features=audio.tobytes(), batch_size=3, start_frame_idx=247)
    )
    assert list(start.frame_indices) == [1, 0, 1]


# A cached frame: the frame and its 328 face crop (counted in the byte bound).
FRAME_BYTES = 1280 * 720 * 3 + 328 * 328 * 3


def test_management_rpcs(comp_stub) -> None:
    models = {m.model_id: m for m in comp_stub.ListModels(pb.ListModelsRequest()).models}
    demo = models["demo"]
    assert demo.loaded and demo.background_dir == "avatar/background.mp4"
    assert demo.crop_rects_path == "avatar/crop_rects.json" and demo.num_frames == 125
    assert (demo.frame_width, demo.frame_height) == (1280, 720)
    stats = comp_stub.GetModelStats(pb.GetModelStatsRequest(model_id="demo"))
    s = stats.models[0].stats
    assert s.cache_hits + s.cache_misses > 0 and s.cached_frames > 0 and s.cache_bytes == s.cached_frames * FRAME_BYTES
    assert stats.total_memory_bytes >= s.cache_bytes
    health = comp_stub.Health(pb.HealthRequest())
    assert health.healthy and health.inference_server_healthy and health.inference_mode == "remote"
    loaded = comp_stub.LoadModel(pb.LoadModelRequest(model_id="demo"))
    assert loaded.success and loaded.load_time_ms == 0.0


def test_bad_raw_audio_is_refused_before_any_work(comp_stub) -> None:
    for fields, field_name in [
        (dict(raw_audio=b"\0" * 7), "raw_audio"),
        (dict(raw_audio=b"\0" * 8000, sample_rate=1000), "sample_rate"),
        (dict(raw_audio=b"\0" * 100), "raw_audio"),
        (dict(raw_audio=b"\0" * 8000, audio_offset_samples=4, utterance_samples=100000, first_frame=90), "raw_audio"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            comp_stub.InferBatchComposite(pb.CompositeBatchRequest(model_id="demo", batch_size=2, **fields))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert field_name in err.value.details()


@pytest.mark.parametrize(
    "fields, code, field_name",
    [
        (dict(model_id="nope", batch_size=1), grpc.StatusCode.NOT_FOUND, "model_id"),
        (dict(model_id="../x", batch_size=1), grpc.StatusCode.INVALID_ARGUMENT, "model_id"),
        (dict(model_id="demo", batch_size=0), grpc.StatusCode.INVALID_ARGUMENT, "batch_size"),
        (dict(model_id="demo", batch_size=1000), grpc.StatusCode.INVALID_ARGUMENT, "batch_size"),
        (dict(model_id="demo", batch_size=1, start_frame_idx=-1), grpc.StatusCode.INVALID_ARGUMENT, "start_frame_idx"),
        (
            dict(model_id="demo", batch_size=2, audio_features=b"\0" * 12),
            grpc.StatusCode.INVALID_ARGUMENT,
            "audio_features",
        ),
        (dict(model_id="demo", batch_size=1, audio_features=b""), grpc.StatusCode.INVALID_ARGUMENT, "audio_features"),
        (
            dict(model_id="demo", batch_size=2, visual_frames=b"\0" * 40),
            grpc.StatusCode.INVALID_ARGUMENT,
            "visual_frames",
        ),
    ],
)
def test_bad_requests_get_their_code(comp_stub, fields, code, field_name) -> None:
    fields = dict(fields)
    fields.setdefault("audio_features", np.zeros(WINDOW, np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as err:
        comp_stub.InferBatchComposite(pb.CompositeBatchRequest(**fields))
    assert err.value.code() == code, err.value.details()
    assert field_name in err.value.details()
    assert comp_stub.Health(pb.HealthRequest()).healthy


def test_health_service_is_serving(compositing) -> None:
    with grpc.insecure_channel(compositing.address) as channel:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service="compositing.CompositingService"))
            .status
        )
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert inference_pb2.DTYPE_UINT8 == 2


@pytest.fixture(scope="module")
def jpeg_servers(models_dir: Path, inference):
    """Two JPEG replicas beside the PNG one: splicing on (the default) and off."""
    spliced = ServerThread.compositing(make_compositing_config(models_dir, inference.address, warmup=False))
    whole = ServerThread.compositing(
        make_compositing_config(models_dir, inference.address, **{"warmup": False, "output.jpeg_splicing": False})
    )
    yield spliced, whole
    spliced.stop()
    whole.stop()


def test_spliced_jpeg_is_the_full_encode_of_the_composited_frame(comp_stub, jpeg_servers, models_dir: Path) -> None:
    from compositing_service.jpeg_splice import SpliceSettings, encode_with_restarts, fit_tile_width

    spliced_server, whole_server = jpeg_servers
    audio = loud_audio(4)
    request = pb.CompositeBatchRequest(model_id="demo", audio_features=audio.tobytes(), batch_size=4, start_frame_idx=9)
    lossless = decode(comp_stub.InferBatchComposite(request).composited_frames)  # the composited frames (PNG)
    with (
        grpc.insecure_channel(spliced_server.address, options=OPTIONS) as a,
        grpc.insecure_channel(whole_server.address, options=OPTIONS) as b,
    ):
        spliced_stub = compositing_pb2_grpc.CompositingServiceStub(a)
        spliced = spliced_stub.InferBatchComposite(request)
        whole = compositing_pb2_grpc.CompositingServiceStub(b).InferBatchComposite(request)
        assert spliced.spliced_frames == 4 and whole.spliced_frames == 0
        # The tiles are fitted to the demo avatar's rectangles (160 px: two tiles hold its 273 px mouths).
        rects = json.loads((models_dir / "avatar" / "crop_rects.json").read_text())
        settings = SpliceSettings(75, tile_width=fit_tile_width(1280, rects))
        assert settings.tile_width == 160
        for frame, got, plain in zip(lossless, spliced.composited_frames, whole.composited_frames, strict=True):
            # Byte for byte the full-frame encode (same quality, sampling and restart interval) of the frame ...
            assert got == encode_with_restarts(frame, settings)
            # ... without splicing, the plain encode; both decode to the same pixels.
            assert plain == cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 75])[1].tobytes()
            assert np.array_equal(decode([got])[0], decode([plain])[0])
        stats = spliced_stub.GetModelStats(pb.GetModelStatsRequest(model_id="demo")).models[0].stats
        assert stats.jpeg_spliced_frames >= 4 and stats.jpeg_full_frames == 0
        assert 0 < stats.cache_encoded_bytes < stats.cache_bytes
        health = spliced_stub.Health(pb.HealthRequest())
        assert health.jpeg_spliced_frames >= 4 and health.jpeg_full_frames == 0
