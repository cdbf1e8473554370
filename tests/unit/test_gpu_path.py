"""The GPU path's logic, run on the CPU: IOBinding buffers, CUDA-graph padding and pieces, a session per worker,
provider options (CUDA, TensorRT), per-device memory accounting and placement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from inference_service.binding import MAX_SIZES, BoundRunner, graph_size_for, pieces
from inference_service.config import OnnxConfig, load_config
from inference_service.devices import CPU_PROVIDER, CUDA_PROVIDER, TENSORRT_PROVIDER, Device, providers_for
from inference_service.engine import LipSyncModel
from inference_service.inputs import Crop, PrepGraphs, crops_of, fill_from_crops
from inference_service.registry import ModelRegistry
from lipsync_protocol.geometry import DEFAULT


def inputs(frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(0, 1, (frames, 6, 320, 320)).astype(np.float32),
        rng.uniform(0, 1, (frames, 32, 16, 16)).astype(np.float32),
    )


@pytest.fixture(scope="module")
def session(models_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(models_dir / "demo" / "model.onnx"), providers=[CPU_PROVIDER])


def bare(session: ort.InferenceSession, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
    return session.run(None, {"input": visual, "audio": audio})[0]


def test_graph_sizes_and_pieces() -> None:
    sizes = (1, 2, 4, 8)
    assert [graph_size_for(n, sizes) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]
    assert pieces(3, sizes) == [(0, 3, 4)]
    assert pieces(19, sizes) == [(0, 8, 8), (8, 8, 8), (16, 3, 4)]
    assert pieces(8, (4,)) == [(0, 4, 4), (4, 4, 4)]


def test_bound_outputs_are_reused_per_batch_size_and_bounded(session: ort.InferenceSession) -> None:
    runner = BoundRunner(session, ("input", "audio"), "output", (3, 320, 320), "cpu")
    for frames in (2, 2, 3, 2):
        visual, audio = inputs(frames, frames)
        np.testing.assert_array_equal(runner.run(visual, audio), bare(session, visual, audio))
    assert runner.allocations == 2  # one output buffer for 2 frames, one for 3, reused after
    first = runner.run(*inputs(1, 7))
    second = runner.run(*inputs(1, 8))
    assert not np.array_equal(first, second)  # a result is the caller's: the next run does not overwrite it
    for frames in range(1, MAX_SIZES + 3):
        runner.run(*inputs(frames))
    assert len(runner._outputs) == MAX_SIZES
    assert runner.device_bytes == sum(n * 3 * 320 * 320 * 4 for n in runner._outputs)


def test_graph_runs_pad_and_split_with_fixed_buffers(session: ort.InferenceSession) -> None:
    runner = BoundRunner(session, ("input", "audio"), "output", (3, 320, 320), "cpu", graph_sizes=(1, 2, 4))
    for frames in (3, 1, 7, 4, 2):
        visual, audio = inputs(frames, frames)
        np.testing.assert_allclose(runner.run(visual, audio), bare(session, visual, audio), atol=1e-6)
    # Fixed buffers per graph size (input, audio, output), never reallocated: 3 sizes x 3 buffers.
    assert runner.allocations == 9 and sorted(runner._graphs) == [1, 2, 4]


def test_a_session_per_worker_on_a_gpu_device(models_dir: Path) -> None:
    """A "cuda" device on this CPU-only build: ORT falls back to the CPU, the structure is the GPU one."""
    gpu = Device("cuda", 0, "test gpu", 8 << 30, 3)
    onnx = OnnxConfig(intra_op_threads=1, io_binding="on")
    model = LipSyncModel(
        "demo", models_dir / "demo" / "model.onnx", gpu, onnx, models_dir / "demo" / "audio_encoder.onnx"
    )
    assert len(model.sessions) == 3 and len(model.encoders) == 3 and len({id(s) for s in model.sessions}) == 3
    assert len(model.runners) == 3 and {r.device_type for r in model.runners} == {"cpu"}  # no CUDA here
    assert model.memory_bytes == 3 * model.weights_bytes
    visual, audio = inputs(2)
    outs = [model.run(visual, audio, worker) for worker in range(3)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    model.warm_up((1, 4))
    assert model.device_buffer_bytes > 0
    cpu = LipSyncModel("demo", models_dir / "demo" / "model.onnx", Device("cpu", -1, "cpu", 0, 2), OnnxConfig())
    assert len(cpu.sessions) == 1 and not cpu.runners and cpu.memory_bytes == cpu.weights_bytes


def test_provider_options_from_config(tmp_path: Path) -> None:
    gpu = Device("cuda", 1, "gpu", 0, 2)
    onnx = OnnxConfig(cudnn_conv_use_max_workspace=False, cuda_mem_limit_gb=2.0, cuda_graph=True)
    (name, options), fallback = providers_for(gpu, onnx)
    assert name == CUDA_PROVIDER and fallback == CPU_PROVIDER
    assert options["device_id"] == "1" and options["cudnn_conv_use_max_workspace"] == "0"
    assert options["enable_cuda_graph"] == "1" and options["gpu_mem_limit"] == str(2 << 30)
    trt = OnnxConfig(tensorrt=True, tensorrt_fp16=True, tensorrt_cache_dir=tmp_path / "trt")
    (first, trt_options), (second, _), third = providers_for(gpu, trt, max_batch=24)
    assert (first, second, third) == (TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER)
    assert trt_options["trt_fp16_enable"] == "1" and trt_options["trt_engine_cache_enable"] == "1"
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert trt_options["trt_profile_max_shapes"] == "input:24x6x320x320,audio:24x32x16x16"
    assert providers_for(Device("cpu", -1, "cpu", 0, 1), trt) == [CPU_PROVIDER]


def test_gpu_config_keys(models_dir: Path) -> None:
    config = load_config(
        models_dir / "inference.yaml",
        {
            "server.plaintext": True,
            "onnx.cuda_graph": True,
            "onnx.cuda_graph_batch_sizes": [8, 1, 4],
            "onnx.tensorrt": True,
            "onnx.tensorrt_cache_dir": "cache/trt",
            "batching.enabled": True,
            "models.demo.batching.max_batch_frames": 6,
        },
        environ={},
    )
    assert config.onnx.cuda_graph_batch_sizes == (1, 4, 8) and config.onnx.tensorrt
    assert config.onnx.tensorrt_cache_dir == config.models_root / "cache" / "trt"
    assert config.models["demo"].batching.enabled and config.models["demo"].batching.max_batch_frames == 6
    assert config.models["unet328"].batching.max_batch_frames == 16  # the defaults
    from service_common.config_source import ConfigError

    for bad, key in [
        ({"onnx.cuda_graph": True, "onnx.io_binding": "off"}, "onnx.cuda_graph"),
        ({"onnx.cuda_graph_batch_sizes": [0]}, "onnx.cuda_graph_batch_sizes"),
        ({"models.demo.batching.size": 3}, "models.demo.batching.size"),
        ({"batching.max_queue_delay_ms": -1}, "batching.max_queue_delay_ms"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(models_dir / "inference.yaml", {"server.plaintext": True, **bad}, environ={})


def test_placement_passes_over_a_full_gpu(models_dir: Path) -> None:
    config = load_config(models_dir / "inference.yaml", {"server.plaintext": True, "warmup": False}, environ={})
    size = (models_dir / "demo" / "model.onnx").stat().st_size

    def placements(small_bytes: int) -> list[str]:
        small = Device("cuda", 0, "small", small_bytes, 1)
        large = Device("cuda", 1, "large", 64 << 30, 1)
        registry = ModelRegistry(config, [small, large])
        # Round-robin: demo -> cuda:0, unet328 -> cuda:1, then a second copy of demo's file -> cuda:0 if it fits.
        out = [registry.load(mid).entry.model.device.label for mid in ("demo", "unet328")]
        out.append(registry.load("demo2", model_path="demo/model.onnx").entry.model.device.label)
        assert registry.device_bytes(small) == sum(
            e.memory_bytes for e in registry.entries() if e.model.device.label == "cuda:0"
        )
        return out

    assert placements(64 << 30) == ["cuda:0", "cuda:1", "cuda:0"]
    assert placements(int(size * 1.5)) == ["cuda:0", "cuda:1", "cuda:1"]  # no room for a second copy there


def held_crops(frames: int, seed: int = 3) -> tuple[list[Crop], np.ndarray]:
    """Crops as the input cache holds them, and the float model input the host path builds from them."""
    real = np.random.default_rng(seed).integers(0, 256, (frames, 3, 320, 320), dtype=np.uint8)
    expected = np.empty((frames, 6, 320, 320), np.float32)
    fill_from_crops(expected, crops_of(real), DEFAULT)
    return [Crop(r.copy()) for r in real], expected


def test_held_inputs_are_uploaded_once_and_built_on_the_device(session: ort.InferenceSession) -> None:
    prep = PrepGraphs(DEFAULT, [CPU_PROVIDER], "cpu", 0)
    runner = BoundRunner(session, ("input", "audio"), "output", (3, 320, 320), "cpu", prep=prep)
    crops, expected = held_crops(3)
    audio = inputs(3)[1]
    np.testing.assert_array_equal(prep.build(crops).numpy(), expected)  # the graph's arithmetic is numpy's
    np.testing.assert_array_equal(runner.run(crops, audio), bare(session, expected, audio))
    uploaded = [c.on_device("cpu", 0, keep_host=False) for c in crops]
    runner.run(crops, audio)
    assert all(c.on_device("cpu", 0, False) is u for c, u in zip(crops, uploaded, strict=True))  # not re-uploaded
    again, _ = held_crops(3)
    assert all(np.array_equal(c.host, a.host) for c, a in zip(crops, again, strict=True))  # read back from there


def test_held_inputs_fill_cuda_graph_buffers_with_padding(session: ort.InferenceSession) -> None:
    prep = PrepGraphs(DEFAULT, [CPU_PROVIDER], "cpu", 0)
    runner = BoundRunner(session, ("input", "audio"), "output", (3, 320, 320), "cpu", graph_sizes=(2, 4), prep=prep)
    for frames in (3, 1, 6):
        crops, expected = held_crops(frames, frames)
        audio = inputs(frames, frames)[1]
        np.testing.assert_allclose(runner.run(crops, audio), bare(session, expected, audio), atol=1e-6)
    assert sorted(runner._graphs) == [2, 4] and runner.allocations == 6  # fixed buffers, filled in place


def test_a_model_with_device_inputs_serves_crops_and_whole_inputs_alike(models_dir: Path) -> None:
    path = models_dir / "demo" / "model.onnx"
    cpu = Device("cpu", -1, "cpu", 0, 1)
    model = LipSyncModel("demo", path, cpu, OnnxConfig(io_binding="on", device_inputs="on"))
    plain = LipSyncModel("demo", path, cpu, OnnxConfig())
    assert model.prep is not None and plain.prep is None
    crops, expected = held_crops(2)
    audio = inputs(2)[1]
    np.testing.assert_array_equal(model.run(crops, audio), plain.run(expected, audio))
    np.testing.assert_array_equal(model.run(expected, audio), plain.run(expected, audio))
