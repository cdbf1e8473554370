"""Every kind of bad input gets the right status code, and the server keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from shared_proto import inference_pb2 as pb

FRAME_U8 = np.zeros((6, 320, 320), np.uint8).tobytes()
FRAME_F32 = np.zeros((6, 320, 320), np.float32).tobytes()
WINDOW = np.zeros((32, 16, 16), np.float32).tobytes()
INVALID = grpc.StatusCode.INVALID_ARGUMENT

CASES = {
    "unknown model": (
        dict(model_id="nope", visual_frames=FRAME_F32, audio_features=WINDOW),
        grpc.StatusCode.NOT_FOUND,
        "model_id",
    ),
    "empty model id": (dict(model_id="", visual_frames=FRAME_F32, audio_features=WINDOW), INVALID, "model_id"),
    "traversal id": (dict(model_id="../etc", visual_frames=FRAME_F32, audio_features=WINDOW), INVALID, "model_id"),
    "no visual": (dict(model_id="demo", audio_features=WINDOW), INVALID, "visual_frames"),
    "no audio": (dict(model_id="demo", visual_frames=FRAME_F32), INVALID, "audio_features"),
    "raw audio too short": (
        dict(model_id="demo", visual_frames=FRAME_F32, raw_audio=b"\0\0" * 1600),
        INVALID,
        "raw_audio",
    ),
    "raw audio odd bytes": (
        dict(model_id="demo", visual_frames=FRAME_F32, raw_audio=b"\0" * 8001),
        INVALID,
        "raw_audio",
    ),
    "raw audio float ragged": (
        dict(model_id="demo", visual_frames=FRAME_F32, raw_audio=b"\0" * 16002, audio_encoding=pb.AUDIO_FLOAT32),
        INVALID,
        "raw_audio",
    ),
    "raw audio NaN": (
        dict(
            model_id="demo",
            visual_frames=FRAME_F32,
            audio_encoding=pb.AUDIO_FLOAT32,
            raw_audio=np.full(8000, np.nan, np.float32).tobytes(),
        ),
        INVALID,
        "raw_audio",
    ),
    "raw audio bad encoding": (
        dict(model_id="demo", visual_frames=FRAME_F32, raw_audio=b"\0" * 8000, audio_encoding=7),
        INVALID,
        "audio_encoding",
    ),
    "raw audio rate too low": (
        dict(model_id="demo", visual_frames=FRAME_F32, raw_audio=b"\0" * 8000, sample_rate=4000),
        INVALID,
        "sample_rate",
    ),
    "raw audio rate too high": (
        dict(model_id="demo", visual_frames=FRAME_F32, raw_audio=b"\0" * 8000, sample_rate=384000),
        INVALID,
        "sample_rate",
    ),
    "batched context at 48k": (
        dict(
            model_id="demo",
            visual_frames=FRAME_F32,
            raw_audio=b"\0" * 96000,
            sample_rate=48000,
            audio_offset_samples=100,
        ),
        INVALID,
        "sample_rate",
    ),
    "raw audio window misses samples": (
        dict(
            model_id="demo",
            visual_frames=FRAME_F32,
            raw_audio=b"\0" * 8000,
            utterance_samples=160000,
            audio_offset_samples=80000,
            first_frame=100,
        ),
        INVALID,
        "raw_audio",
    ),
    "raw audio past the utterance": (
        dict(model_id="demo", visual_frames=FRAME_F32, raw_audio=b"\0" * 8000, utterance_samples=1000),
        INVALID,
        "raw_audio",
    ),
    "negative offset": (
        dict(model_id="demo", visual_frames=FRAME_F32, raw_audio=b"\0" * 8000, audio_offset_samples=-5),
        INVALID,
        "audio_offset_samples",
    ),
    "truncated visual": (
        dict(model_id="demo", visual_frames=FRAME_F32[:-4], audio_features=WINDOW),
        INVALID,
        "visual_frames",
    ),
    "ragged visual bytes": (
        dict(model_id="demo", visual_frames=FRAME_F32[:-1], audio_features=WINDOW),
        INVALID,
        "visual_frames",
    ),
    "batch size mismatch": (
        dict(model_id="demo", visual_frames=FRAME_F32, audio_features=WINDOW, batch_size=2),
        INVALID,
        "batch_size",
    ),
    "negative batch size": (
        dict(model_id="demo", visual_frames=FRAME_F32, audio_features=WINDOW, batch_size=-1),
        INVALID,
        "batch_size",
    ),
    "uint8 bytes declared float32": (
        dict(model_id="demo", visual_frames=FRAME_U8, audio_features=WINDOW),
        INVALID,
        "visual_frames",
    ),
    "unknown dtype": (
        dict(model_id="demo", visual_frames=FRAME_F32, audio_features=WINDOW, visual_dtype=7),
        INVALID,
        "visual_dtype",
    ),
    "unknown output dtype": (
        dict(model_id="demo", visual_frames=FRAME_F32, audio_features=WINDOW, output_dtype=9),
        INVALID,
        "output_dtype",
    ),
    "audio wrong size": (
        dict(model_id="demo", visual_frames=FRAME_F32, audio_features=WINDOW[:-4]),
        INVALID,
        "audio_features",
    ),
    "audio windows for other batch": (
        dict(model_id="demo", visual_frames=FRAME_F32 * 2, audio_features=WINDOW * 3, batch_size=2),
        INVALID,
        "audio_features",
    ),
    "audio shape lies": (
        dict(model_id="demo", visual_frames=FRAME_F32, audio_features=WINDOW, audio_features_shape=[2, 32, 16, 16]),
        INVALID,
        "audio_features_shape",
    ),
    "audio NaN": (
        dict(
            model_id="demo", visual_frames=FRAME_F32, audio_features=np.full((32, 16, 16), np.nan, np.float32).tobytes()
        ),
        INVALID,
        "audio_features",
    ),
    "visual NaN": (
        dict(
            model_id="demo", visual_frames=np.full((6, 320, 320), np.inf, np.float32).tobytes(), audio_features=WINDOW
        ),
        INVALID,
        "visual_frames",
    ),
    "batch over limit": (
        dict(model_id="demo", visual_frames=FRAME_U8 * 9, visual_dtype=pb.DTYPE_UINT8, audio_features=WINDOW),
        INVALID,
        "batch_size",
    ),
}


@pytest.fixture(scope="module")
def inference_server(models_dir, tmp_path_factory):
    from support import ServerThread, make_config

    server = ServerThread(make_config(models_dir, **{"server.max_batch_size": 8}))
    yield server
    server.stop()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_infer_batch_gets_its_code(stub, name: str) -> None:
    fields, code, field_name = CASES[name]
    with pytest.raises(grpc.RpcError) as err:
        stub.InferBatch(pb.InferBatchRequest(**fields))
    assert err.value.code() == code, err.value.details()
    assert field_name in err.value.details()
    assert stub.Health(pb.HealthRequest()).healthy


def test_message_over_the_size_limit_is_refused(models_dir, start_inference) -> None:
    from support import make_config

    server = start_inference(make_config(models_dir, **{"server.max_message_size_mb": 1}))
    with grpc.insecure_channel(server.address) as channel:
        from shared_proto import inference_pb2_grpc

        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.InferBatch(pb.InferBatchRequest(model_id="demo", visual_frames=FRAME_F32, audio_features=WINDOW))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Health(pb.HealthRequest()).healthy


@pytest.mark.parametrize(
    "request_fields, code",
    [
        (dict(model_id="x", model_path="../outside.onnx"), INVALID),
        (dict(model_id="x", model_path="/etc/passwd"), INVALID),
        (dict(model_id="x", model_path="demo/../../outside.onnx"), INVALID),
        (dict(model_id="x", model_path="demo/missing.onnx"), grpc.StatusCode.NOT_FOUND),
        (dict(model_id="x", model_path="inference.yaml"), grpc.StatusCode.NOT_FOUND),
        (dict(model_id="../demo"), INVALID),
        (dict(model_id="a/b"), INVALID),
        (dict(model_id="unknown"), grpc.StatusCode.NOT_FOUND),
        (dict(model_id=""), INVALID),
    ],
)
def test_load_model_refuses_paths_outside_models_root(stub, request_fields, code) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.LoadModel(pb.LoadModelRequest(**request_fields))
    assert err.value.code() == code, err.value.details()
    assert stub.Health(pb.HealthRequest()).healthy


def test_bad_management_requests(stub) -> None:
    for call, request, code in [
        (stub.UnloadModel, pb.UnloadModelRequest(model_id="../x"), INVALID),
        (stub.UnloadModel, pb.UnloadModelRequest(model_id="never-loaded"), grpc.StatusCode.NOT_FOUND),
        (stub.GetModelStats, pb.GetModelStatsRequest(model_id="nope"), grpc.StatusCode.NOT_FOUND),
        (stub.GetModelStats, pb.GetModelStatsRequest(model_id="../../x"), INVALID),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code() == code
    assert stub.Health(pb.HealthRequest()).healthy
