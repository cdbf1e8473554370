"""Fuzzing every RPC of both services with malformed requests (hypothesis, about 1,100 calls in all).

Each call must end with a status a client error deserves (never INTERNAL, UNKNOWN or a dead server), and both
servers must still report SERVING afterwards. A copy of the demo model outside ``models_root`` must never be
loaded, whatever path a client names.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ServerThread, make_compositing_config, make_config

from shared_proto import compositing_pb2 as cpb
from shared_proto import compositing_pb2_grpc, inference_pb2_grpc
from shared_proto import inference_pb2 as ipb

# About 1,100 generated requests by design, some of them valid unet328 batches that run it.
pytestmark = pytest.mark.slow

CLIENT_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
}
FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same inputs every run: a red CI is a real bug, reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


CALLS = itertools.count()
COUNTS: dict[str, int] = {}
CODES: dict[tuple[str, str], int] = {}

FRAME = 6 * 320 * 320
WINDOW = 32 * 16 * 16
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
ENUM = st.integers(-3, 12)
MODEL_IDS = st.one_of(
    st.sampled_from(
        ["demo", "unet328", "", "ghost", "../outside", "demo/../../outside", "/etc/passwd", ".", "..", "a" * 300]
    ),
    st.text(max_size=40),
)
PATHS = st.one_of(
    st.sampled_from(
        [
            "../outside/model.onnx",
            "../../outside/model.onnx",
            "outside-link/model.onnx",
            "/etc/passwd",
            "demo/model.onnx",
            "demo/../../outside/model.onnx",
            "demo\x00.onnx",
            "",
            "missing.onnx",
        ]
    ),
    st.text(max_size=60),
)


def tensor_bytes(per_item: int, dtype: str) -> st.SearchStrategy[bytes]:
    """Right-sized and wrong-sized buffers, random contents (NaN and infinities included for floats)."""
    size = np.dtype(dtype).itemsize
    counts = st.one_of(st.sampled_from([1, 2, 3]).map(lambda n: n * per_item), st.integers(0, 64))
    if dtype == "float32":
        values = st.sampled_from([0.0, 0.5, 1.0, -1.0, float("nan"), float("inf"), 1e30])
        return counts.flatmap(
            lambda n: st.lists(values, min_size=min(n, 8), max_size=min(n, 8)).map(
                lambda head, n=n: np.resize(np.array(head or [0.0], np.float32), n).tobytes()
            )
        )
    return counts.flatmap(
        lambda n: st.binary(min_size=min(n * size, 64), max_size=min(n * size, 64)).map(
            lambda head, n=n: (head * (n * size // max(len(head), 1) + 1))[: n * size]
        )
    )


def audio_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=3001), st.integers(0, 16000).map(lambda n: np.zeros(n, np.int16).tobytes()))


def check(code: grpc.StatusCode, details: str, what: str) -> None:
    next(CALLS)
    COUNTS[what] = COUNTS.get(what, 0) + 1
    CODES[(what, code.name)] = CODES.get((what, code.name), 0) + 1
    assert code in CLIENT_ERRORS, f"{what}: {code.name}: {details}"
    if code != grpc.StatusCode.OK:
        assert details, f"{what}: {code.name} without a message"


def call(method, request, what: str, timeout: float = 20.0):
    try:
        response = method(request, timeout=timeout)
    except grpc.RpcError as exc:
        check(exc.code(), exc.details() or "", what)
        return None
    check(grpc.StatusCode.OK, "", what)
    return response


@pytest.fixture(scope="module")
def servers(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    models = root / "models"
    shutil.copytree(models_dir, models)
    (root / "outside").mkdir()
    shutil.copy(models / "demo" / "model.onnx", root / "outside" / "model.onnx")
    (models / "outside-link").symlink_to(root / "outside")
    inference = ServerThread(
        make_config(models, **{"server.max_batch_size": 8, "server.max_message_size_mb": 16, "capacity.max_models": 3})
    )
    compositing = ServerThread.compositing(
        make_compositing_config(
            models,
            inference.address,
            **{"server.max_batch_size": 8, "server.max_message_size_mb": 16, "warmup": False},
        )
    )
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    inf_channel = grpc.insecure_channel(inference.address, options=options)
    comp_channel = grpc.insecure_channel(compositing.address, options=options)
    yield {
        "inference": inference_pb2_grpc.InferenceServiceStub(inf_channel),
        "compositing": compositing_pb2_grpc.CompositingServiceStub(comp_channel),
        "inf_channel": inf_channel,
        "comp_channel": comp_channel,
        "outside": root / "outside" / "model.onnx",
    }
    for channel in (inf_channel, comp_channel):
        channel.close()
    compositing.stop()
    inference.stop()


# -- inference ----------------------------------------------------------------------------------------------------


def valid_visual(batch: int, dtype: str) -> bytes:
    rng = np.random.default_rng(batch)
    frames = rng.integers(0, 256, (batch, 6, 320, 320), dtype=np.uint8)
    return frames.tobytes() if dtype == "uint8" else (frames / 255.0).astype(np.float32).tobytes()


SPEECH = (np.sin(np.arange(19200) / 9.0) * 8000).astype(np.int16).tobytes()  # 1.2 s at 16 kHz: 29 frames

# Malformed values for single fields of an otherwise valid request: the fuzz reaches past the first check.
BAD_FIELDS = {
    "model_id": MODEL_IDS,
    "visual_frames": st.one_of(tensor_bytes(FRAME, "float32"), tensor_bytes(FRAME, "uint8"), st.just(b"")),
    "visual_dtype": ENUM,
    "audio_features": st.one_of(tensor_bytes(WINDOW, "float32"), st.just(b"")),
    "audio_features_shape": st.lists(st.integers(-5, 40), max_size=5),
    "batch_size": st.one_of(st.integers(-2, 10), INT32),
    "output_dtype": ENUM,
    "raw_audio": st.one_of(audio_bytes(), st.just(SPEECH[:-1])),
    "sample_rate": st.one_of(st.sampled_from([0, 16000, 8000, 44100, 7999, 200000, -1]), INT32),
    "audio_encoding": ENUM,
    "audio_offset_samples": st.one_of(st.integers(-10, 10**6), INT64),
    "utterance_samples": st.one_of(st.integers(-10, 10**6), INT64),
    "first_frame": st.one_of(st.integers(-10, 100), INT32),
}
REPEATED = {"audio_features_shape"}


def mutate(data: st.DataObject, request, fields: dict) -> None:
    for name in data.draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        value = data.draw(fields[name])
        if name in REPEATED:
            del getattr(request, name)[:]
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)


@st.composite
def infer_requests(draw: st.DrawFn) -> dict:
    """The fields of a valid batch: features or speech, uint8 or float32 visuals, 1-3 frames."""
    batch = draw(st.integers(1, 3))
    fields: dict = {"model_id": "demo", "batch_size": draw(st.sampled_from([0, batch]))}
    if draw(st.booleans()):
        per_frame = draw(st.booleans())
        shape = [batch, 32, 16, 16] if per_frame else [32, 16, 16]
        fields["audio_features"] = np.full(shape, 0.3, np.float32).tobytes()
        fields["audio_features_shape"] = shape if draw(st.booleans()) else []
    else:
        fields.update(raw_audio=SPEECH, sample_rate=16000, audio_encoding=ipb.AUDIO_PCM_S16LE)
        if draw(st.booleans()):  # a batch of a longer utterance
            fields.update(
                utterance_samples=len(SPEECH) // 2, audio_offset_samples=0, first_frame=draw(st.integers(0, 5))
            )
    return {"batch": batch, **fields}


@fuzz(260)
@given(base=infer_requests(), data=st.data())
def test_infer_batch(servers, base, data) -> None:
    batch = base.pop("batch")
    dtype = data.draw(st.sampled_from(["uint8", "float32"]))
    request = ipb.InferBatchRequest(
        visual_frames=valid_visual(batch, dtype),
        visual_dtype=ipb.DTYPE_UINT8 if dtype == "uint8" else ipb.DTYPE_FLOAT32,
        output_dtype=data.draw(st.sampled_from([0, ipb.DTYPE_UINT8, ipb.DTYPE_FLOAT32])),
        **base,
    )
    mutate(data, request, BAD_FIELDS)
    call(servers["inference"].InferBatch, request, "InferBatch")


@fuzz(130)
@given(
    rpc=st.sampled_from(["LoadModel", "UnloadModel", "GetModelStats", "ListModels", "Health"]),
    model_id=MODEL_IDS,
    model_path=PATHS,
    force=st.booleans(),
)
def test_inference_management(servers, rpc, model_id, model_path, force) -> None:
    stub = servers["inference"]
    if rpc == "LoadModel":
        response = call(
            stub.LoadModel, ipb.LoadModelRequest(model_id=model_id, force_reload=force, model_path=model_path), rpc, 60
        )
        if response is not None:
            assert "outside" not in model_path and "/etc" not in model_path, (model_id, model_path)
    elif rpc == "UnloadModel":
        call(stub.UnloadModel, ipb.UnloadModelRequest(model_id=model_id), rpc)
    elif rpc == "GetModelStats":
        call(stub.GetModelStats, ipb.GetModelStatsRequest(model_id=model_id), rpc)
    elif rpc == "ListModels":
        call(stub.ListModels, ipb.ListModelsRequest(), rpc)
    else:
        call(stub.Health, ipb.HealthRequest(), rpc)


# -- compositing --------------------------------------------------------------------------------------------------


COMPOSITE_BAD = {
    **{k: v for k, v in BAD_FIELDS.items() if k != "output_dtype"},
    "start_frame_idx": st.one_of(st.integers(-5, 10**6), INT32),
}


@fuzz(260)
@given(base=infer_requests(), data=st.data())
def test_infer_batch_composite(servers, base, data) -> None:
    batch = base.pop("batch")
    request = cpb.CompositeBatchRequest(start_frame_idx=data.draw(st.integers(0, 400)), **base)
    if data.draw(st.integers(0, 4)) == 0:  # sometimes the old way: the client sends the visual frames
        request.visual_frames = valid_visual(batch, "float32")
    if request.batch_size == 0 and not request.visual_frames:
        request.batch_size = batch
    mutate(data, request, COMPOSITE_BAD)
    call(servers["compositing"].InferBatchComposite, request, "InferBatchComposite")


@fuzz(110)
@given(
    rpc=st.sampled_from(["LoadModel", "UnloadModel", "GetModelStats", "ListModels", "Health"]),
    model_id=MODEL_IDS,
    force=st.booleans(),
)
def test_compositing_management(servers, rpc, model_id, force) -> None:
    stub = servers["compositing"]
    if rpc == "LoadModel":
        call(stub.LoadModel, cpb.LoadModelRequest(model_id=model_id, force_reload=force), rpc, 60)
    elif rpc == "UnloadModel":
        call(stub.UnloadModel, cpb.UnloadModelRequest(model_id=model_id), rpc)
    elif rpc == "GetModelStats":
        call(stub.GetModelStats, cpb.GetModelStatsRequest(model_id=model_id), rpc)
    elif rpc == "ListModels":
        call(stub.ListModels, cpb.ListModelsRequest(), rpc)
    else:
        call(stub.Health, cpb.HealthRequest(), rpc)


SESSION_CONFIGS = st.builds(
    cpb.SessionConfig,
    model_id=st.one_of(st.just("demo"), MODEL_IDS),
    start_frame_idx=st.one_of(st.integers(-3, 300), INT32),
    fps=st.one_of(st.sampled_from([0.0, 25.0, -1.0, 1e9, float("nan"), 0.001]), st.floats(width=32)),
    output_format=st.sampled_from(["", "jpeg", "png", "gif", "JPEG"]),
    jpeg_quality=st.one_of(st.integers(-1, 101), INT32),
    audio_encoding=ENUM,
    sample_rate=st.one_of(st.sampled_from([0, 16000, 8000, -1, 10**9]), INT32),
    idle_frames=st.booleans(),
    drop_late_frames=st.booleans(),
    max_batch_frames=st.one_of(st.integers(-1, 10), INT32),
)
SESSION_MESSAGES = st.one_of(
    st.builds(lambda d: cpb.SessionRequest(audio=cpb.AudioChunk(data=d)), st.binary(max_size=2001)),
    st.builds(
        lambda n: cpb.SessionRequest(audio=cpb.AudioChunk(data=np.zeros(n, np.float32).tobytes())),
        st.integers(0, 8000),
    ),
    st.builds(
        lambda e, i: cpb.SessionRequest(control=cpb.SessionControl(end_of_input=e, interrupt=i)),
        st.booleans(),
        st.booleans(),
    ),
    SESSION_CONFIGS.map(lambda c: cpb.SessionRequest(config=c)),
    st.just(cpb.SessionRequest()),
)


SESSION_BAD = {
    "model_id": MODEL_IDS,
    "start_frame_idx": st.one_of(st.integers(-3, 300), INT32),
    "fps": st.one_of(st.sampled_from([0.0, -1.0, 1e9, float("nan"), 0.001]), st.floats(width=32)),
    "output_format": st.sampled_from(["", "png", "gif", "JPEG"]),
    "jpeg_quality": st.one_of(st.integers(-1, 101), INT32),
    "audio_encoding": ENUM,
    "sample_rate": st.one_of(st.sampled_from([0, 8000, -1, 10**9]), INT32),
    "max_batch_frames": st.one_of(st.integers(-1, 10), INT32),
}


def audio_chunk(encoding: int) -> st.SearchStrategy[cpb.SessionRequest]:
    dtype = np.float32 if encoding == ipb.AUDIO_FLOAT32 else np.int16
    return st.integers(0, 12000).map(
        lambda n: cpb.SessionRequest(
            audio=cpb.AudioChunk(data=(np.sin(np.arange(n) / 7.0) * 0.5).astype(dtype).tobytes())
        )
    )


@fuzz(140)
@given(data=st.data())
def test_stream_session(servers, data) -> None:
    if data.draw(st.integers(0, 5)) == 0:
        first = data.draw(SESSION_MESSAGES)
    else:
        config = cpb.SessionConfig(
            model_id="demo",
            audio_encoding=data.draw(st.sampled_from([ipb.AUDIO_FLOAT32, ipb.AUDIO_PCM_S16LE])),
            idle_frames=data.draw(st.booleans()),
            drop_late_frames=data.draw(st.booleans()),
        )
        mutate(data, config, SESSION_BAD)
        first = cpb.SessionRequest(config=config)
    encoding = first.config.audio_encoding
    rest = data.draw(
        st.lists(
            st.one_of(audio_chunk(encoding), audio_chunk(encoding), audio_chunk(encoding), SESSION_MESSAGES), max_size=6
        )
    )
    responses = servers["compositing"].StreamSession(iter([first, *rest]), timeout=20)
    try:
        for _ in responses:
            pass
    except grpc.RpcError as exc:
        check(exc.code(), exc.details() or "", "StreamSession")
        return
    check(grpc.StatusCode.OK, "", "StreamSession")


@fuzz(160)
@given(
    method=st.sampled_from(
        [
            "/inference.InferenceService/InferBatch",
            "/inference.InferenceService/LoadModel",
            "/inference.InferenceService/GetModelStats",
            "/compositing.CompositingService/InferBatchComposite",
            "/compositing.CompositingService/UnloadModel",
        ]
    ),
    payload=st.binary(max_size=512),
)
def test_undecodable_bytes(servers, method, payload) -> None:
    """Raw bytes that are (mostly) not a valid message: INVALID_ARGUMENT, not gRPC's own UNKNOWN and traceback."""
    channel = servers["inf_channel"] if method.startswith("/inference") else servers["comp_channel"]
    rpc = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        rpc(payload, timeout=20)
        check(grpc.StatusCode.OK, "", "undecodable")
    except grpc.RpcError as exc:
        check(exc.code(), exc.details() or "", "undecodable")


def test_both_servers_still_serve_and_nothing_outside_models_root_was_loaded(servers) -> None:
    total = sum(COUNTS.values())
    assert total >= 1000, COUNTS
    # The fuzz reached past the first checks: many requests of the heavy RPCs were valid enough to run.
    for rpc in ("InferBatch", "InferBatchComposite", "StreamSession"):
        assert CODES.get((rpc, "OK"), 0) >= 30, sorted(CODES.items())
    for channel in (servers["inf_channel"], servers["comp_channel"]):
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    listed = servers["inference"].GetModelStats(ipb.GetModelStatsRequest(), timeout=10)
    for info in listed.models:
        assert "outside" not in info.model_path and not info.model_path.startswith("/"), info
    window = np.full((32, 16, 16), 0.5, np.float32).tobytes()
    response = servers["compositing"].InferBatchComposite(
        cpb.CompositeBatchRequest(model_id="demo", audio_features=window, batch_size=2), timeout=30
    )
    assert response.success and len(response.composited_frames) == 2
