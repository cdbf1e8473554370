"""The inference service over real gRPC on a loopback port, with real ONNX Runtime sessions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared_proto import inference_pb2 as pb

FRAME = (6, 320, 320)
WINDOW = (32, 16, 16)


def make_inputs(batch: int, seed: int = 0, loud: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    visual = rng.integers(0, 256, size=(batch, *FRAME), dtype=np.uint8)
    audio = rng.uniform(0, loud, size=(batch, *WINDOW)).astype(np.float32)
    return visual, audio


def bare_run(path: Path, visual_f32: np.ndarray, audio: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": visual_f32, "audio": audio})[0]


def outputs_of(response: pb.InferBatchResponse, dtype: type = np.float32) -> np.ndarray:
    return np.stack([np.frombuffer(o.data, dtype=dtype).reshape(o.shape) for o in response.outputs])


def test_infer_batch_equals_direct_session_run(stub, models_dir: Path) -> None:
    visual, audio = make_inputs(3)
    visual_f32 = visual.astype(np.float32) / 255.0
    response = stub.InferBatch(
        pb.InferBatchRequest(
            model_id="demo", visual_frames=visual_f32.tobytes(), audio_features=audio.tobytes(), batch_size=3
        )
    )
    assert response.success and not response.error
    assert len(response.outputs) == 3
    assert list(response.outputs[0].shape) == [3, 320, 320]
    assert response.outputs[0].dtype == pb.DTYPE_FLOAT32
    assert response.device == "cpu" and response.gpu_id == -1
    assert response.inference_time_ms > 0
    expected = bare_run(models_dir / "demo" / "model.onnx", visual_f32, audio)
    np.testing.assert_array_equal(outputs_of(response), expected)


@pytest.mark.slow
def test_unet328_through_service_equals_direct_run(stub, models_dir: Path) -> None:
    visual, audio = make_inputs(2, seed=3)
    response = stub.InferBatch(
        pb.InferBatchRequest(
            model_id="unet328",
            visual_frames=visual.tobytes(),
            visual_dtype=pb.DTYPE_UINT8,
            audio_features=audio.tobytes(),
            batch_size=2,
        )
    )
    expected = bare_run(models_dir / "unet328" / "model.onnx", visual.astype(np.float32) / 255.0, audio)
    np.testing.assert_allclose(outputs_of(response), expected, rtol=0, atol=1e-5)
    assert float(expected.std()) > 0.01


def test_uint8_and_float32_inputs_give_the_same_result(stub) -> None:
    visual, audio = make_inputs(2, seed=1)
    common = dict(model_id="demo", audio_features=audio.tobytes(), batch_size=2)
    as_float = stub.InferBatch(
        pb.InferBatchRequest(visual_frames=(visual.astype(np.float32) / 255.0).tobytes(), **common)
    )
    as_uint8 = stub.InferBatch(
        pb.InferBatchRequest(visual_frames=visual.tobytes(), visual_dtype=pb.DTYPE_UINT8, **common)
    )
    np.testing.assert_array_equal(outputs_of(as_float), outputs_of(as_uint8))


def test_one_window_for_all_frames_equals_the_window_repeated(stub) -> None:
    visual, audio = make_inputs(3, seed=2)
    window = audio[0]
    one = stub.InferBatch(
        pb.InferBatchRequest(
            model_id="demo",
            visual_frames=visual.tobytes(),
            visual_dtype=pb.DTYPE_UINT8,
            audio_features=window.tobytes(),
            batch_size=3,
        )
    )
    repeated = stub.InferBatch(
        pb.InferBatchRequest(
            model_id="demo",
            visual_frames=visual.tobytes(),
            visual_dtype=pb.DTYPE_UINT8,
            audio_features=np.repeat(window[None], 3, axis=0).tobytes(),
            audio_features_shape=[3, 32, 16, 16],
            batch_size=3,
        )
    )
    np.testing.assert_array_equal(outputs_of(one), outputs_of(repeated))


def test_uint8_output_is_the_reference_truncation(stub) -> None:
    visual, audio = make_inputs(1, seed=4)
    common = dict(
        model_id="demo", visual_frames=visual.tobytes(), visual_dtype=pb.DTYPE_UINT8, audio_features=audio.tobytes()
    )
    as_float = outputs_of(stub.InferBatch(pb.InferBatchRequest(**common)))
    response = stub.InferBatch(pb.InferBatchRequest(output_dtype=pb.DTYPE_UINT8, **common))
    assert response.outputs[0].dtype == pb.DTYPE_UINT8
    assert len(response.outputs[0].data) == 3 * 320 * 320
    np.testing.assert_array_equal(outputs_of(response, np.uint8), (as_float * 255).astype(np.uint8))


def test_list_models_and_stats(stub) -> None:
    listed = {m.model_id: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert {"demo", "unet328"} <= set(listed)
    assert listed["demo"].loaded and listed["demo"].model_path == "demo/model.onnx"
    visual, audio = make_inputs(2)
    before = stub.GetModelStats(pb.GetModelStatsRequest(model_id="demo")).models[0].stats
    stub.InferBatch(
        pb.InferBatchRequest(
            model_id="demo",
            visual_frames=visual.tobytes(),
            visual_dtype=pb.DTYPE_UINT8,
            audio_features=audio.tobytes(),
        )
    )
    stats = stub.GetModelStats(pb.GetModelStatsRequest(model_id="demo"))
    after = stats.models[0].stats
    assert after.usage_count == before.usage_count + 1
    assert after.total_frames == before.total_frames + 2
    assert after.total_inference_time_ms > before.total_inference_time_ms
    assert after.mean_inference_time_ms == pytest.approx(after.total_inference_time_ms / after.usage_count)
    assert after.memory_bytes > 0 and after.loaded_unix_ms > 0 and after.last_used_unix_ms >= after.loaded_unix_ms
    assert after.device == "cpu"
    assert stats.loaded_models >= 1 and stats.max_models >= 1 and stats.total_memory_bytes >= after.memory_bytes
    everything = stub.GetModelStats(pb.GetModelStatsRequest())
    assert {m.model_id for m in everything.models} >= {"demo", "unet328"}


def test_health_reports_devices(stub, inference_server) -> None:
    health = stub.Health(pb.HealthRequest())
    assert health.healthy and not health.cuda_available and health.gpu_count == 0
    assert health.version and health.loaded_models >= 1
    (cpu,) = health.devices
    assert cpu.device == "cpu" and cpu.execution_provider == "CPUExecutionProvider"
    assert cpu.total_memory_bytes > 0 and cpu.workers >= 1 and cpu.loaded_models >= 1
    with grpc.insecure_channel(inference_server.address) as channel:
        checker = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.InferenceService"):
            status = checker.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow  # loads unet328 (its warm-up run)
def test_load_and_unload_round_trip(stub) -> None:
    loaded = stub.LoadModel(pb.LoadModelRequest(model_id="unet328"))
    assert loaded.success and loaded.stats.memory_bytes > 40_000_000
    again = stub.LoadModel(pb.LoadModelRequest(model_id="unet328"))
    assert again.success and again.load_time_ms == 0.0  # already loaded: nothing done
    assert stub.UnloadModel(pb.UnloadModelRequest(model_id="unet328")).success
    listed = {m.model_id: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert not listed["unet328"].loaded
    with pytest.raises(grpc.RpcError) as err:
        stub.UnloadModel(pb.UnloadModelRequest(model_id="unet328"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_first_request_loads_a_configured_model(stub) -> None:
    stub.UnloadModel(pb.UnloadModelRequest(model_id="demo"))
    visual, audio = make_inputs(1)
    response = stub.InferBatch(
        pb.InferBatchRequest(
            model_id="demo",
            visual_frames=visual.tobytes(),
            visual_dtype=pb.DTYPE_UINT8,
            audio_features=audio.tobytes(),
        )
    )
    assert response.success and len(response.outputs) == 1


def test_concurrent_clients_each_get_their_own_answer(stub, models_dir: Path) -> None:
    session = ort.InferenceSession(str(models_dir / "demo" / "model.onnx"), providers=["CPUExecutionProvider"])

    def one_client(seed: int) -> bool:
        ok = True
        for round_ in range(3):
            batch = 1 + (seed + round_) % 3
            visual, audio = make_inputs(batch, seed=seed * 10 + round_, loud=1.0)
            response = stub.InferBatch(
                pb.InferBatchRequest(
                    model_id="demo",
                    visual_frames=visual.tobytes(),
                    visual_dtype=pb.DTYPE_UINT8,
                    audio_features=audio.tobytes(),
                    batch_size=batch,
                )
            )
            expected = session.run(None, {"input": visual.astype(np.float32) / 255.0, "audio": audio})[0]
            ok = ok and np.array_equal(outputs_of(response), expected)
        return ok

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one_client, range(8)))
    assert all(results)
