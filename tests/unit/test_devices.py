"""Device selection and CUDA provider options, covered on a CPU-only machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_service.config import parse_config
from inference_service.devices import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    parse_nvidia_smi,
    providers_for,
    select_devices,
    session_options,
)
from inference_service.registry import ModelRegistry

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
