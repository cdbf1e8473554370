"""Device selection and CUDA provider options, covered on a CPU-only machine."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from inference_service.config import ModelConfig, parse_config
from inference_service.core import InferenceCore
from inference_service.devices import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    parse_nvidia_smi,
    providers_for,
    select_devices,
    session_options,
)
from inference_service.registry import ModelRegistry
from lipsync_protocol.errors import DeadlineExceeded, FailedPrecondition
from service_common.config_source import ConfigError

CUDA_AND_CPU = [CUDA_PROVIDER, CPU_PROVIDER]
TWO_GPUS = [(0, "NVIDIA A10", 24 << 30), (1, "NVIDIA A10", 24 << 30)]


def config(tmp_path: Path, **sections):
    raw = {"models_root": str(tmp_path)}
    raw.update(sections)
    return parse_config(raw, serving=False)


def test_cpu_only_machine_serves_on_the_cpu(tmp_path: Path) -> None:
    (device,) = select_devices(config(tmp_path, server={"cpu_workers": 3}), [CPU_PROVIDER], [])
    assert device.label == "cpu" and device.gpu_id == -1 and device.workers == 3
    assert device.total_memory_bytes > 0 and device.provider == CPU_PROVIDER


def test_each_gpu_becomes_a_device_with_its_workers(tmp_path: Path) -> None:
    cfg = config(tmp_path, server={"worker_count_per_gpu": 4})
    devices = select_devices(cfg, CUDA_AND_CPU, TWO_GPUS)
    assert [d.label for d in devices] == ["cuda:0", "cuda:1"]
    assert all(d.workers == 4 and d.provider == CUDA_PROVIDER for d in devices)
    limited = select_devices(config(tmp_path, gpus={"count": 1, "memory_gb_per_gpu": 16}), CUDA_AND_CPU, TWO_GPUS)
    assert [d.label for d in limited] == ["cuda:0"] and limited[0].total_memory_bytes == 16 << 30


def test_gpu_count_from_config_when_nvidia_smi_is_missing(tmp_path: Path) -> None:
    devices = select_devices(config(tmp_path, gpus={"count": 2, "memory_gb_per_gpu": 8}), CUDA_AND_CPU, [])
    assert [d.gpu_id for d in devices] == [0, 1]


def test_gpus_disabled_or_missing_falls_back_or_fails_when_required(tmp_path: Path) -> None:
    assert select_devices(config(tmp_path, gpus={"enabled": False}), CUDA_AND_CPU, TWO_GPUS)[0].label == "cpu"
    with pytest.raises(RuntimeError, match=r"gpus.required.*no CUDAExecutionProvider"):
        select_devices(config(tmp_path, gpus={"required": True}), [CPU_PROVIDER], [])
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_devices(config(tmp_path, gpus={"required": True}), CUDA_AND_CPU, [])
    with pytest.raises(RuntimeError, match="disabled"):
        select_devices(config(tmp_path, gpus={"required": True, "enabled": False}), CUDA_AND_CPU, TWO_GPUS)


def test_cuda_provider_options(tmp_path: Path) -> None:
    cfg = config(tmp_path, onnx={"cudnn_conv_algo_search": "EXHAUSTIVE", "cuda_mem_limit_gb": 2})
    device = select_devices(cfg, CUDA_AND_CPU, TWO_GPUS)[1]
    (name, options), fallback = providers_for(device, cfg.onnx)
    assert name == CUDA_PROVIDER and fallback == CPU_PROVIDER
    assert options["device_id"] == "1"
    assert options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert options["gpu_mem_limit"] == str(2 << 30)
    assert providers_for(select_devices(cfg, [CPU_PROVIDER], [])[0], cfg.onnx) == [CPU_PROVIDER]


def test_session_options_follow_config(tmp_path: Path) -> None:
    opts = session_options(config(tmp_path, onnx={"intra_op_threads": 3, "inter_op_threads": 2}).onnx)
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 2


def test_parse_nvidia_smi() -> None:
    text = "0, NVIDIA GeForce RTX 4090, 24564\n1, NVIDIA A100-SXM4-80GB, 81920\ngarbage\nx, y, z\n"
    assert parse_nvidia_smi(text) == [
        (0, "NVIDIA GeForce RTX 4090", 24564 << 20),
        (1, "NVIDIA A100-SXM4-80GB", 81920 << 20),
    ]


def test_round_robin_placement_and_preferred_gpu(tmp_path: Path) -> None:
    (tmp_path / "a.onnx").write_bytes(b"x")
    cfg = config(
        tmp_path,
        models={"a": {"model_path": "a.onnx"}, "b": {"model_path": "a.onnx", "preferred_gpu": 0}},
    )
    devices = select_devices(cfg, CUDA_AND_CPU, TWO_GPUS)
    registry = ModelRegistry(cfg, devices)
    spec_a = cfg.models["a"]
    placed = [registry._place(spec_a).label for _ in range(4)]
    assert placed == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert registry._place(cfg.models["b"]).label == "cuda:0"


def fake_model(spec: ModelConfig, device) -> SimpleNamespace:
    """Enough of a LipSyncModel for the registry's bookkeeping, without loading anything."""
    return SimpleNamespace(model_id=spec.model_id, device=device, memory_bytes=1)


def test_least_loaded_placement_follows_frames_in_flight_then_models(tmp_path: Path) -> None:
    (tmp_path / "a.onnx").write_bytes(b"x")
    plain = {"model_path": "a.onnx"}
    cfg = config(
        tmp_path,
        gpus={"assignment_strategy": "least-loaded"},
        models={"a": plain, "b": plain, "c": plain, "p": {"model_path": "a.onnx", "preferred_gpu": 1}},
    )
    devices = select_devices(cfg, CUDA_AND_CPU, TWO_GPUS)
    registry = ModelRegistry(cfg, devices, model_factory=fake_model)
    gpu0, gpu1 = devices
    spec = cfg.models["a"]
    assert registry._place(spec) is gpu0  # all even: device order
    assert [registry.load(m).entry.model.device.label for m in ("a", "b", "c")] == ["cuda:0", "cuda:1", "cuda:0"]
    assert registry._place(spec) is gpu1  # no frames anywhere: fewer models (1 against 2)
    busy = registry.get("b")
    registry.begin_frames(busy, 5)
    assert registry.frames_in_flight(gpu1) == 5 and registry.frames_in_flight(gpu0) == 0
    assert registry._place(spec) is gpu0  # fewer frames beats fewer models
    assert registry._place(cfg.models["p"]) is gpu1  # preferred_gpu still wins
    registry.end_frames(busy, 5)
    assert registry.frames_in_flight(gpu1) == 0
    assert registry._place(spec) is gpu1


def test_dedicated_gpu_serves_only_the_model_that_names_it(tmp_path: Path) -> None:
    (tmp_path / "a.onnx").write_bytes(b"x")
    cfg = config(
        tmp_path,
        gpus={"assignment_strategy": "dedicated"},
        models={
            "own": {"model_path": "a.onnx", "preferred_gpu": 0},
            "a": {"model_path": "a.onnx"},
            "gone": {"model_path": "a.onnx", "preferred_gpu": 7},  # no such GPU: no preference, dedicates nothing
        },
    )
    registry = ModelRegistry(cfg, select_devices(cfg, CUDA_AND_CPU, TWO_GPUS))
    assert registry._place(cfg.models["own"]).label == "cuda:0"
    dynamic = ModelConfig("dyn", tmp_path / "a.onnx")
    placed = {registry._place(spec).label for spec in [cfg.models["a"], cfg.models["gone"], dynamic] * 2}
    assert placed == {"cuda:1"}


def test_dedicated_refuses_a_model_when_every_gpu_is_taken(tmp_path: Path) -> None:
    (tmp_path / "a.onnx").write_bytes(b"x")
    cfg = config(
        tmp_path,
        gpus={"assignment_strategy": "dedicated"},
        models={
            "x": {"model_path": "a.onnx", "preferred_gpu": 0},
            "y": {"model_path": "a.onnx", "preferred_gpu": 1},
            "z": {"model_path": "a.onnx"},
        },
    )
    registry = ModelRegistry(cfg, select_devices(cfg, CUDA_AND_CPU, TWO_GPUS))
    assert registry._place(cfg.models["y"]).label == "cuda:1"
    with pytest.raises(FailedPrecondition, match=r"'z'.*every device is dedicated.*assignment_strategy: dedicated"):
        registry._place(cfg.models["z"])
    with pytest.raises(FailedPrecondition, match="preferred_gpu of its own"):
        registry._place(ModelConfig("dyn", tmp_path / "a.onnx"))


def test_dedicated_on_a_cpu_only_machine_warns_and_shares_the_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a.onnx").write_bytes(b"x")
    cfg = config(
        tmp_path,
        gpus={"assignment_strategy": "dedicated"},
        models={"x": {"model_path": "a.onnx", "preferred_gpu": 0}, "z": {"model_path": "a.onnx"}},
    )
    devices = select_devices(cfg, [CPU_PROVIDER], [])
    with caplog.at_level(logging.WARNING, logger="inference_service.registry"):
        registry = ModelRegistry(cfg, devices)
    warnings = [r.getMessage() for r in caplog.records if r.name == "inference_service.registry"]
    assert len(warnings) == 1 and "every model shares the CPU" in warnings[0]
    assert registry._place(cfg.models["x"]).label == "cpu"
    assert registry._place(cfg.models["z"]).label == "cpu"


def test_assignment_strategy_config(tmp_path: Path) -> None:
    for strategy in ("round-robin", "least-loaded", "dedicated"):
        assert config(tmp_path, gpus={"assignment_strategy": strategy}).assignment_strategy == strategy
    assert config(tmp_path).assignment_strategy == "round-robin"
    with pytest.raises(ConfigError, match=r"gpus\.assignment_strategy"):
        config(tmp_path, gpus={"assignment_strategy": "random"})
    (tmp_path / "a.onnx").write_bytes(b"x")
    same_gpu = {"a": {"model_path": "a.onnx", "preferred_gpu": 1}, "b": {"model_path": "a.onnx", "preferred_gpu": 1}}
    assert config(tmp_path, models=same_gpu).models["b"].preferred_gpu == 1  # sharing is fine under round-robin
    with pytest.raises(ConfigError, match=r"models\.a\.preferred_gpu and models\.b\.preferred_gpu.*GPU 1"):
        config(tmp_path, gpus={"assignment_strategy": "dedicated"}, models=same_gpu)


async def test_infer_counts_frames_in_flight_until_it_returns(models_dir: Path) -> None:
    cfg = parse_config(
        {
            "models_root": str(models_dir),
            "warmup": False,
            "onnx": {"intra_op_threads": 1},
            "models": {
                "plain": {"model_path": "demo/model.onnx"},
                "batched": {"model_path": "demo/model.onnx", "batching": {"enabled": True}},
            },
        },
        serving=False,
    )
    core = InferenceCore(cfg, select_devices(cfg, [CPU_PROVIDER], []))
    (cpu,) = core.devices
    pool = core.workers[cpu.label]
    seen: list[int] = []
    run = pool.run

    async def counting_run(*args, **kwargs):
        seen.append(core.device_status()[0].frames_in_flight)
        return await run(*args, **kwargs)

    pool.run = counting_run
    rng = np.random.default_rng(0)
    visual = rng.integers(0, 256, (3, 6, 320, 320), np.uint8)
    audio = rng.uniform(0, 1, (3, 32, 16, 16)).astype(np.float32)
    try:
        for model_id in ("plain", "batched"):
            result = await core.infer(model_id, visual, audio)
            assert result.outputs.shape[0] == 3
        assert seen == [3, 3]
        assert core.registry.frames_in_flight(cpu) == 0
        with pytest.raises(DeadlineExceeded):
            await core.infer("plain", visual, audio, deadline=time.monotonic() - 1)
        assert seen[-1] == 3 and core.registry.frames_in_flight(cpu) == 0
        assert core.device_status()[0].frames_in_flight == 0
    finally:
        core.close()
