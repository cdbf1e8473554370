"""Inference service configuration: the old system's YAML keys plus our additions.

Every key is validated at start; an invalid value raises ConfigError naming
its dotted key, so a bad deployment fails before it takes traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service_common.config_source import (
    ConfigError,
    Section,
    parse_listen_address,
    read_config,
    resolve_under,
    valid_model_id,
)
from service_common.serving_config import ServingConfig, parse_serving

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class ModelConfig:
    model_id: str
    model_path: Path
    audio_encoder_path: Path | None = None
    preload: bool = False
    preferred_gpu: int | None = None


@dataclass(frozen=True)
class OnnxConfig:
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    # ORT's intra-op threads spin between parallel sections (its default). Turning it off
    # frees cores for other work but costs a wake-up per op: unet328 through the service
    # fell from 0.98 to 0.86 of bare here (docs/decisions/0004).
    allow_spinning: bool = True
    # CUDA execution provider options (see docs/gpu.md).
    cudnn_conv_algo_search: str = "HEURISTIC"
    cuda_mem_limit_gb: float = 0.0
    arena_extend_strategy: str = "kNextPowerOfTwo"


@dataclass(frozen=True)
class InferenceConfig:
    models_root: Path
    host: str = "0.0.0.0"
    port: int = 50051
    max_message_size_mb: int = 64
    worker_count_per_gpu: int = 2
    cpu_workers: int = 1
    max_queue_per_device: int = 64
    max_batch_size: int = 64
    gpus_enabled: bool = True
    gpus_required: bool = False
    gpu_count: int = 0
    memory_gb_per_gpu: float = 0.0
    assignment_strategy: str = "round-robin"
    max_models: int = 8
    max_memory_bytes: int = 0
    eviction_policy: str = "lfu"
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    warmup: bool = True
    log_level: str = "INFO"
    grace_seconds: float = 10.0
    tune_malloc: bool = True
    # Clients re-resolve DNS when a connection ends: bounding a connection's age lets
    # new pods behind a headless Service get traffic. 0 = unbounded.
    max_connection_age_s: float = 0.0
    serving: ServingConfig = field(default_factory=ServingConfig)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_size_mb * 1024 * 1024


def load_config(
    path: Path | str | None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    environ: Mapping[str, str] | None = None,
    *,
    serving: bool = True,
) -> InferenceConfig:
    """``serving=False`` for the engine run inside the compositing process: it listens on no port, so the
    keys of how to serve (TLS or plain text) are not required."""
    return parse_config(*read_config(path, overrides, environ), serving=serving)


def parse_config(raw: dict[str, Any], base_dir: Path | None = None, *, serving: bool = True) -> InferenceConfig:
    root = Section(raw)
    known = ["models_root", "server", "gpus", "capacity", "onnx", "models", "logging", "warmup", "auth", "metrics"]
    for key in root.unknown_keys(known):
        log.warning("config: unknown key %s ignored", key)

    root_value = root.str("models_root", None)
    if not root_value:
        raise ConfigError("models_root: required (the folder that holds the models)")
    models_root = Path(root_value).expanduser()
    if not models_root.is_absolute():
        models_root = (base_dir or Path.cwd()) / models_root
    models_root = models_root.resolve()
    if not models_root.is_dir():
        raise ConfigError(f"models_root: {models_root} is not a directory")

    server = root.section("server")
    host, port = parse_listen_address(server.data.get("port", ":50051"), server.key("port"))
    if server.has("host"):
        host = server.str("host", host) or host

    gpus = root.section("gpus")
    capacity = root.section("capacity")
    onnx = root.section("onnx")
    if onnx.has("library_path"):
        log.warning("config: onnx.library_path is ignored (the onnxruntime Python package brings its own)")

    eviction = capacity.str("eviction_policy", "lfu", choices=["lfu"]) or "lfu"
    strategy = gpus.str("assignment_strategy", "round-robin", choices=["round-robin"]) or "round-robin"

    onnx_cfg = OnnxConfig(
        intra_op_threads=onnx.int("intra_op_threads", 0, minimum=0),
        inter_op_threads=onnx.int("inter_op_threads", 1, minimum=0),
        graph_optimization=onnx.str("graph_optimization", "all", choices=["disable", "basic", "extended", "all"])
        or "all",
        allow_spinning=onnx.bool("allow_spinning", True),
        cudnn_conv_algo_search=onnx.str(
            "cudnn_conv_algo_search", "HEURISTIC", choices=["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]
        )
        or "HEURISTIC",
        cuda_mem_limit_gb=onnx.float("cuda_mem_limit_gb", 0.0, minimum=0.0),
        arena_extend_strategy=onnx.str(
            "arena_extend_strategy", "kNextPowerOfTwo", choices=["kNextPowerOfTwo", "kSameAsRequested"]
        )
        or "kNextPowerOfTwo",
    )

    gpu_count = gpus.int("count", 0, minimum=0)
    models: dict[str, ModelConfig] = {}
    models_section = root.section("models")
    for model_id, spec in models_section.data.items():
        model_id = str(model_id)
        key = models_section.key(model_id)
        if not valid_model_id(model_id):
            raise ConfigError(f"{key}: invalid model id (expected letters, digits, '.', '_' or '-')")
        section = Section(spec, key)
        path_value = section.str("model_path", None)
        if not path_value:
            raise ConfigError(f"{key}.model_path: required")
        model_path = resolve_under(models_root, path_value, section.key("model_path"))
        encoder_value = section.str("audio_encoder_path", None)
        encoder_path = (
            resolve_under(models_root, encoder_value, section.key("audio_encoder_path")) if encoder_value else None
        )
        preferred = section.int("preferred_gpu", -1, minimum=-1) if section.has("preferred_gpu") else -1
        models[model_id] = ModelConfig(
            model_id=model_id,
            model_path=model_path,
            audio_encoder_path=encoder_path,
            preload=section.bool("preload", False),
            preferred_gpu=None if preferred < 0 else preferred,
        )

    logging_section = root.section("logging")
    return InferenceConfig(
        models_root=models_root,
        host=host,
        port=port,
        max_message_size_mb=server.int("max_message_size_mb", 64, minimum=1, maximum=2047),
        worker_count_per_gpu=server.int("worker_count_per_gpu", 2, minimum=1, maximum=64),
        cpu_workers=server.int("cpu_workers", 1, minimum=1, maximum=64),
        max_queue_per_device=server.int("max_queue_per_device", 64, minimum=1),
        max_batch_size=server.int("max_batch_size", 64, minimum=1, maximum=4096),
        grace_seconds=server.float("grace_seconds", 10.0, minimum=0.0),
        tune_malloc=server.bool("tune_malloc", True),
        max_connection_age_s=server.float("max_connection_age_seconds", 0.0, minimum=0.0),
        gpus_enabled=gpus.bool("enabled", True),
        gpus_required=gpus.bool("required", False),
        gpu_count=gpu_count,
        memory_gb_per_gpu=gpus.float("memory_gb_per_gpu", 0.0, minimum=0.0),
        assignment_strategy=strategy,
        max_models=capacity.int("max_models", 8, minimum=1),
        max_memory_bytes=int(capacity.float("max_memory_gb", 0.0, minimum=0.0) * GIB),
        eviction_policy=eviction,
        onnx=onnx_cfg,
        models=models,
        warmup=root.bool("warmup", True),
        log_level=(logging_section.str("level", "INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]) or "INFO"),
        serving=parse_serving(
            root,
            base_dir or Path.cwd(),
            host,
            default_metrics_port=9091,
            required=serving,
            # device queues (server.max_queue_per_device) do the fine-grained bounding here
            default_inflight=64,
            default_queued=64,
        ),
    )
