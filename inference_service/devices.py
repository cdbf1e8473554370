"""Execution devices: which exist, and how ONNX Runtime is told to use each.

No GPU is available where this project is developed, so the CUDA branch is
built from ONNX Runtime's documented provider options and its logic (device
discovery, provider lists, placement) is covered by tests that call these
functions with explicit inputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

import onnxruntime as ort

from .config import InferenceConfig, OnnxConfig

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    index: int  # -1 for the CPU
    name: str
    total_memory_bytes: int
    workers: int

    @property
    def label(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def gpu_id(self) -> int:
        return self.index if self.kind == "cuda" else -1

    @property
    def provider(self) -> str:
        return CUDA_PROVIDER if self.kind == "cuda" else CPU_PROVIDER


def parse_nvidia_smi(text: str) -> list[tuple[int, str, int]]:
    """Rows of ``index, name, memory.total [MiB]`` as printed with csv,noheader,nounits."""
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            rows.append((int(parts[0]), parts[1], int(float(parts[2])) * 1024 * 1024))
        except ValueError:
            continue
    return rows


def query_gpus() -> list[tuple[int, str, int]]:
    """GPUs visible to this process, via nvidia-smi when present."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed: %s", exc)
        return []
    return parse_nvidia_smi(out)


def cpu_device(config: InferenceConfig) -> Device:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return Device("cpu", -1, f"cpu ({os.cpu_count()} cores)", total, config.cpu_workers)


def select_devices(
    config: InferenceConfig,
    available_providers: list[str] | None = None,
    gpus: list[tuple[int, str, int]] | None = None,
) -> list[Device]:
    """The devices models are placed on: configured GPUs when CUDA works, else the CPU.

    ``available_providers`` and ``gpus`` default to what this machine has; tests
    pass them to cover the GPU branch on a CPU-only machine.
    """
    providers = ort.get_available_providers() if available_providers is None else available_providers
    cuda_ok = config.gpus_enabled and CUDA_PROVIDER in providers
    if cuda_ok:
        found = query_gpus() if gpus is None else gpus
        if not found and config.gpu_count:
            # nvidia-smi missing (e.g. a slim container): trust the config.
            found = [(i, f"cuda:{i}", int(config.memory_gb_per_gpu * 1024**3)) for i in range(config.gpu_count)]
        if config.gpu_count:
            found = found[: config.gpu_count]
        if found:
            devices = []
            for index, name, total in found:
                if config.memory_gb_per_gpu:
                    total = int(config.memory_gb_per_gpu * 1024**3)
                devices.append(Device("cuda", index, name, total, config.worker_count_per_gpu))
            return devices
        cuda_ok = False
    if config.gpus_required:
        reason = (
            "GPUs are disabled in config (gpus.enabled: false)"
            if not config.gpus_enabled
            else f"ONNX Runtime has no {CUDA_PROVIDER} (providers: {', '.join(providers)})"
            if CUDA_PROVIDER not in providers
            else "no CUDA device was found"
        )
        raise RuntimeError(f"gpus.required is true but {reason}")
    if config.gpus_enabled:
        log.warning("no usable CUDA device: serving on the CPU (providers: %s)", ", ".join(providers))
    return [cpu_device(config)]


def providers_for(device: Device, onnx: OnnxConfig, max_batch: int = 64) -> list[str | tuple[str, dict[str, str]]]:
    """Provider list for a session on ``device``; the CPU provider is always the fallback.

    On a GPU: the CUDA provider with the configured options (``enable_cuda_graph`` when CUDA graphs are on), and
    with ``onnx.tensorrt`` the TensorRT provider in front of it, its engines and timing cache kept in
    ``onnx.tensorrt_cache_dir`` and one optimization profile from batch 1 to ``max_batch``.
    """
    if device.kind != "cuda":
        return [CPU_PROVIDER]
    options: dict[str, str] = {
        "device_id": str(device.index),
        "cudnn_conv_algo_search": onnx.cudnn_conv_algo_search,
        "arena_extend_strategy": onnx.arena_extend_strategy,
        "do_copy_in_default_stream": "1",
        "cudnn_conv_use_max_workspace": "1" if onnx.cudnn_conv_use_max_workspace else "0",
    }
    if onnx.cuda_mem_limit_gb:
        options["gpu_mem_limit"] = str(int(onnx.cuda_mem_limit_gb * 1024**3))
    if onnx.cuda_graph:
        options["enable_cuda_graph"] = "1"
    providers: list[str | tuple[str, dict[str, str]]] = [(CUDA_PROVIDER, options), CPU_PROVIDER]
    if onnx.tensorrt:
        providers.insert(0, (TENSORRT_PROVIDER, tensorrt_options(device, onnx, max_batch)))
    return providers


def tensorrt_options(device: Device, onnx: OnnxConfig, max_batch: int) -> dict[str, str]:
    def shapes(batch: int) -> str:
        return f"input:{batch}x6x320x320,audio:{batch}x32x16x16"

    cache = str(onnx.tensorrt_cache_dir) if onnx.tensorrt_cache_dir else ".trt-cache"
    return {
        "device_id": str(device.index),
        "trt_fp16_enable": "1" if onnx.tensorrt_fp16 else "0",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": cache,
        "trt_max_workspace_size": str(int(onnx.tensorrt_max_workspace_gb * 1024**3)),
        "trt_profile_min_shapes": shapes(1),
        "trt_profile_opt_shapes": shapes(min(8, max_batch)),
        "trt_profile_max_shapes": shapes(max_batch),
    }


_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(onnx: OnnxConfig) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = onnx.intra_op_threads
    opts.inter_op_num_threads = onnx.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _OPT_LEVELS[onnx.graph_optimization]
    opts.log_severity_level = 3
    spin = "1" if onnx.allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    # Spin while a run's parallel sections follow each other, stop as soon as the last run returns: the fast
    # wake-ups without the cores burnt between requests (docs/decisions/0010).
    opts.add_session_config_entry("session.force_spinning_stop", "0" if onnx.spin_between_runs else "1")
    return opts
