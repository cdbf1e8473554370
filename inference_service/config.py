"""Inference service configuration: the old system's YAML keys plus our additions.

Every key is validated at start; an invalid value raises ConfigError naming
its dotted key, so a bad deployment fails before it takes traffic.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipsync_protocol.geometry import Geometry
from service_common.config_source import (
    ConfigError,
    Section,
    parse_geometry,
    parse_listen_address,
    parse_log_level,
    read_config,
    resolve_under,
    valid_model_id,
)
from service_common.serving_config import ServingConfig, parse_serving

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of concurrent requests for one model on one device (inference_service/batching.py)."""

    enabled: bool = False
    max_batch_frames: int = 16  # a batch closes at this many frames ...
    # ... or when its oldest request has waited this long for others to join. 0: a free worker takes what is
    # queued at once (batches still grow under load, while workers are busy) and a lone request never waits.
    max_queue_delay_ms: float = 0.0
    max_queue_frames: int = 256  # frames waiting per model and device; beyond: RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class ModelConfig:
    model_id: str
    model_path: Path
    audio_encoder_path: Path | None = None
    preload: bool = False
    preferred_gpu: int | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    geometry: Geometry | None = None  # None: found from the model's input size
    # ORT's threads spinning during this model's runs (None: onnx.allow_spinning).
    allow_spinning: bool | None = None

    def onnx_for(self, onnx: OnnxConfig) -> OnnxConfig:
        """The session options of this model: the service's, with its own overrides."""
        if self.allow_spinning is None:
            return onnx
        return dataclasses.replace(onnx, allow_spinning=self.allow_spinning)


@dataclass(frozen=True)
class OnnxConfig:
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    # ORT's intra-op threads may spin between a run's parallel sections instead of sleeping. Measured on 2 shared
    # cores (docs/decisions/0010), spinning cost more CPU per frame at equal load than it saved in latency for
    # the demo graph (15-20%) and for unet328 (2-3% in 2 runs of 3), in both modes: off by default. It can be
    # turned on for the service or per model (models.<id>.allow_spinning) where cores are not shared.
    allow_spinning: bool = False
    # ... and by ORT's default they go on spinning after a run ends, waiting for the next one: a core burnt
    # between requests. False stops them when the last concurrent run returns (docs/decisions/0010).
    spin_between_runs: bool = False
    # CUDA execution provider options (see docs/gpu.md).
    cudnn_conv_algo_search: str = "HEURISTIC"
    cudnn_conv_use_max_workspace: bool = True
    cuda_mem_limit_gb: float = 0.0
    arena_extend_strategy: str = "kNextPowerOfTwo"
    # Bind inputs and outputs to reusable buffers on the model's device ("auto": on GPUs only).
    io_binding: str = "auto"
    # Held model inputs uploaded to the device once and the float input built there ("auto": on GPUs; "on" on
    # the CPU too, which only tests want: numpy builds it faster there).
    device_inputs: str = "auto"
    # CUDA graphs: one captured graph per batch size listed; other sizes are padded up to the next one.
    cuda_graph: bool = False
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    # TensorRT execution provider in front of CUDA, with its engines cached on disk.
    tensorrt: bool = False
    tensorrt_fp16: bool = False
    tensorrt_cache_dir: Path | None = None
    tensorrt_max_workspace_gb: float = 2.0


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
    # Model inputs held for inputs by reference (inference_service/inputs.py); 0 keeps none.
    input_cache_bytes: int = 1024 * 1024 * 1024
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    # The audio encoder of every model that names none (top-level audio_encoder_path, or found where the Go
    # system looked), and how it was found, for the start-up log.
    audio_encoder_path: Path | None = None
    audio_encoder_origin: str = ""
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


def graph_sizes(onnx: Section) -> tuple[int, ...]:
    value = onnx.data.get("cuda_graph_batch_sizes", [1, 2, 4, 8, 16])
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"{onnx.key('cuda_graph_batch_sizes')}: expected a list of positive batch sizes")
    return tuple(sorted(set(value)))


def parse_batching(section: Section, defaults: BatchingConfig) -> BatchingConfig:
    """``batching`` (the defaults) or ``models.<id>.batching`` (a model's own, over the defaults)."""
    for key in section.unknown_keys(["enabled", "max_batch_frames", "max_queue_delay_ms", "max_queue_frames"]):
        raise ConfigError(
            f"{key}: unknown key (expected enabled, max_batch_frames, max_queue_delay_ms, max_queue_frames)"
        )
    return BatchingConfig(
        enabled=section.bool("enabled", defaults.enabled),
        max_batch_frames=section.int("max_batch_frames", defaults.max_batch_frames, minimum=1, maximum=4096),
        max_queue_delay_ms=section.float("max_queue_delay_ms", defaults.max_queue_delay_ms, minimum=0.0),
        max_queue_frames=section.int("max_queue_frames", defaults.max_queue_frames, minimum=1),
    )


# Where the Go inference server looked for its one audio_encoder.onnx, here taken relative to models_root.
GO_ENCODER_PLACES = (
    "../audio_encoder.onnx",
    "../../audio_encoder.onnx",
    "audio_encoder.onnx",
    "model/audio_encoder.onnx",
)


def shared_encoder(root: Section, models_root: Path) -> tuple[Path | None, str]:
    """The audio encoder for models that name none: ``audio_encoder_path``, else the first of the Go places."""
    value = root.str("audio_encoder_path", None)
    if value:
        path = resolve_under(models_root, value, "audio_encoder_path")
        if not path.is_file():
            raise ConfigError(f"audio_encoder_path: {path} is not a file (expected the audio encoder's .onnx)")
        return path, "audio_encoder_path"
    for place in GO_ENCODER_PLACES:
        path = (models_root / place).resolve()
        if path.is_file():
            return path, f"found at models_root/{place}, where the Go system looked"
    return None, ""


def parse_config(raw: dict[str, Any], base_dir: Path | None = None, *, serving: bool = True) -> InferenceConfig:
    root = Section(raw)
    known = [
        "models_root",
        "server",
        "gpus",
        "capacity",
        "onnx",
        "models",
        "logging",
        "warmup",
        "auth",
        "metrics",
        "batching",
        "plaintext",
        "audio_encoder_path",
    ]
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
    strategy = (
        gpus.str("assignment_strategy", "round-robin", choices=["round-robin", "least-loaded", "dedicated"])
        or "round-robin"
    )

    onnx_cfg = OnnxConfig(
        intra_op_threads=onnx.int("intra_op_threads", 0, minimum=0),
        inter_op_threads=onnx.int("inter_op_threads", 1, minimum=0),
        graph_optimization=onnx.str("graph_optimization", "all", choices=["disable", "basic", "extended", "all"])
        or "all",
        allow_spinning=onnx.bool("allow_spinning", False),
        spin_between_runs=onnx.bool("spin_between_runs", False),
        cudnn_conv_algo_search=onnx.str(
            "cudnn_conv_algo_search", "HEURISTIC", choices=["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]
        )
        or "HEURISTIC",
        cuda_mem_limit_gb=onnx.float("cuda_mem_limit_gb", 0.0, minimum=0.0),
        arena_extend_strategy=onnx.str(
            "arena_extend_strategy", "kNextPowerOfTwo", choices=["kNextPowerOfTwo", "kSameAsRequested"]
        )
        or "kNextPowerOfTwo",
        cudnn_conv_use_max_workspace=onnx.bool("cudnn_conv_use_max_workspace", True),
        io_binding=onnx.str("io_binding", "auto", choices=["auto", "on", "off"]) or "auto",
        device_inputs=onnx.str("device_inputs", "auto", choices=["auto", "on", "off"]) or "auto",
        cuda_graph=onnx.bool("cuda_graph", False),
        cuda_graph_batch_sizes=graph_sizes(onnx),
        tensorrt=onnx.bool("tensorrt", False),
        tensorrt_fp16=onnx.bool("tensorrt_fp16", False),
        tensorrt_cache_dir=resolve_under(
            models_root, onnx.str("tensorrt_cache_dir", ".trt-cache") or ".trt-cache", onnx.key("tensorrt_cache_dir")
        ),
        tensorrt_max_workspace_gb=onnx.float("tensorrt_max_workspace_gb", 2.0, minimum=0.1),
    )
    batching_defaults = parse_batching(root.section("batching"), BatchingConfig())

    encoder_default, encoder_origin = shared_encoder(root, models_root)
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
            audio_encoder_path=encoder_path or encoder_default,
            preload=section.bool("preload", False),
            preferred_gpu=None if preferred < 0 else preferred,
            batching=parse_batching(section.section("batching"), batching_defaults),
            geometry=parse_geometry(section) if section.has("geometry") else None,
            allow_spinning=section.bool("allow_spinning", False) if section.has("allow_spinning") else None,
        )

    logging_section = root.section("logging")
    config = InferenceConfig(
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
        input_cache_bytes=int(capacity.float("input_cache_mb", 1024, minimum=0.0) * 1024 * 1024),
        eviction_policy=eviction,
        onnx=onnx_cfg,
        models=models,
        audio_encoder_path=encoder_default,
        audio_encoder_origin=encoder_origin,
        warmup=root.bool("warmup", True),
        log_level=parse_log_level(logging_section),
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
    if onnx_cfg.cuda_graph and onnx_cfg.io_binding == "off":
        raise ConfigError("onnx.cuda_graph: CUDA graphs need bound buffers; onnx.io_binding must not be off")
    if strategy == "dedicated":
        owners: dict[int, str] = {}
        for model_id, model in models.items():
            gpu = model.preferred_gpu
            if gpu is None:
                continue
            if gpu in owners:
                first, second = models_section.key(owners[gpu]), models_section.key(model_id)
                raise ConfigError(
                    f"{first}.preferred_gpu and {second}.preferred_gpu: both name GPU {gpu}, "
                    "but gpus.assignment_strategy: dedicated gives each GPU to one model"
                )
            owners[gpu] = model_id
    return config
