"""Inference service configuration: its schema (the old system's YAML keys plus ours) and the dataclasses.

Every key is declared once in SCHEMA, with its type, default, bounds and doc line; validation, the dataclass
defaults and docs/configuration.md come from it. An invalid value or an unknown key raises ConfigError naming
its dotted key, so a bad deployment fails before it takes traffic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipsync_protocol.geometry import Geometry
from service_common.config_schema import (
    From,
    Key,
    Schema,
    Table,
    Values,
    choice,
    flag,
    ignored,
    integer,
    number,
    path,
)
from service_common.config_source import (
    ConfigError,
    models_root_dir,
    read_config,
    resolve_under,
    to_geometry,
    valid_model_id,
)
from service_common.serving_config import ServingConfig, parse_serving, server_keys, serving_keys

GIB = 1024**3
MIB = 1024**2


def graph_sizes(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"{key}: expected a list of positive batch sizes")
    return tuple(sorted(set(value)))


def batching_keys(per_model: bool) -> tuple[Key, ...]:
    """``batching.*``, or a model's own ``models.<id>.batching.*``, whose defaults are the former's values."""

    def default_of(name: str, literal: Any) -> Any:
        return From(f"batching.{name}") if per_model else literal

    return (
        flag("batching.enabled", default_of("enabled", False), "dynamic batching of concurrent requests (docs/gpu.md)"),
        integer(
            "batching.max_batch_frames",
            default_of("max_batch_frames", 16),
            "a batch closes at this many frames",
            1,
            4096,
        ),
        number(
            "batching.max_queue_delay_ms",
            default_of("max_queue_delay_ms", 0.0),
            "... or when its oldest request has waited this long; 0: a free worker takes what is queued at once",
            0.0,
        ),
        integer(
            "batching.max_queue_frames", default_of("max_queue_frames", 256), "frames waiting per model and device", 1
        ),
    )


MODEL_KEYS = (
    path("model_path", "the UNet ONNX file (relative to models_root)", required=True),
    path("audio_encoder_path", "the model's audio encoder (raw_audio needs one)", shown="`audio_encoder_path`"),
    flag("preload", False, "load at start"),
    integer("preferred_gpu", None, "GPU index for this model; -1: any", -1, shown="any"),
    *batching_keys(per_model=True),
    Key(
        "geometry",
        "geometry",
        None,
        "the crop, input and paste geometry: a family's name or a mapping (see Types)",
        parse=to_geometry,
        shown="from the model's input size",
    ),
    flag("allow_spinning", From("onnx.allow_spinning"), "ORT's threads spinning during this model's runs"),
)

SCHEMA = Schema(
    "inference",
    (
        path(
            "models_root",
            "the folder holding the models; nothing outside it is read on a client's request",
            required="the folder that holds the models",
        ),
        path(
            "audio_encoder_path",
            "the encoder of every model that names none",
            shown="the Go places (docs/migrating.md)",
        ),
        flag("warmup", True, "one run at load"),
        *server_keys(50051),
        integer("server.worker_count_per_gpu", 2, "concurrent runs per GPU", 1, 64),
        integer("server.cpu_workers", 1, "concurrent runs on the CPU (each uses onnx.intra_op_threads)", 1, 64),
        integer("server.max_queue_per_device", 64, "calls waiting per device before RESOURCE_EXHAUSTED", 1),
        integer("server.max_batch_size", 64, "frames per InferBatch", 1, 4096),
        ignored("server.queue_size", "replaced by server.max_queue_per_device"),
        *serving_keys(9091, 64, 64, "InferBatch calls running at once (device queues bound the rest)"),
        ignored("logging.log_inference_times", "logging.requests logs every request with its stage timings"),
        flag("gpus.enabled", True, "use CUDA when onnxruntime-gpu and a device are present"),
        flag("gpus.required", False, "fail at start instead of falling back to the CPU"),
        integer("gpus.count", 0, "use the first N GPUs; 0: all", 0),
        number("gpus.memory_gb_per_gpu", 0.0, "memory per GPU, for reporting; 0: as reported", 0.0),
        choice(
            "gpus.assignment_strategy",
            "round-robin",
            "round-robin least-loaded dedicated",
            "model placement (docs/gpu.md)",
        ),
        ignored("gpus.allow_multi_gpu_models", "a model runs on the one device it is placed on"),
        integer("capacity.max_models", 8, "models loaded at once", 1),
        number("capacity.max_memory_gb", 0.0, "bytes of model files loaded at once; 0: unbounded", 0.0),
        number("capacity.input_cache_mb", 1024, "model inputs held for inputs by reference; 0 keeps none", 0.0),
        choice("capacity.eviction_policy", "lfu", "lfu", "the only policy"),
        ignored("capacity.idle_timeout_minutes", "eviction is LFU, by count and memory"),
        integer("onnx.intra_op_threads", 0, "threads per run; 0: ORT's default (all cores)", 0),
        integer("onnx.inter_op_threads", 1, "threads across a graph's independent nodes", 0),
        choice("onnx.graph_optimization", "all", "disable basic extended all", "ORT's graph optimization level"),
        flag(
            "onnx.allow_spinning",
            False,
            "ORT's intra-op threads spin between a run's parallel sections (docs/decisions/0010)",
        ),
        flag("onnx.spin_between_runs", False, "... and go on spinning after a run ends, waiting for the next"),
        choice("onnx.cudnn_conv_algo_search", "HEURISTIC", "EXHAUSTIVE HEURISTIC DEFAULT", "CUDA provider"),
        flag("onnx.cudnn_conv_use_max_workspace", True, "CUDA provider"),
        number("onnx.cuda_mem_limit_gb", 0.0, "CUDA provider arena limit; 0: none", 0.0),
        choice(
            "onnx.arena_extend_strategy", "kNextPowerOfTwo", "kNextPowerOfTwo kSameAsRequested", "CUDA arena growth"
        ),
        choice(
            "onnx.io_binding", "auto", "auto on off", "inputs and outputs bound to reused device buffers (auto: GPUs)"
        ),
        choice(
            "onnx.device_inputs",
            "auto",
            "auto on off",
            "held inputs uploaded once, the float input built on the device",
        ),
        flag("onnx.cuda_graph", False, "CUDA graphs, one per batch size (needs io_binding)"),
        Key(
            "onnx.cuda_graph_batch_sizes",
            "list",
            [1, 2, 4, 8, 16],
            "batch sizes captured; others are padded up",
            parse=graph_sizes,
        ),
        flag("onnx.tensorrt", False, "the TensorRT provider in front of CUDA"),
        flag("onnx.tensorrt_fp16", False, "TensorRT in float16"),
        path("onnx.tensorrt_cache_dir", "where TensorRT engines are cached (relative to models_root)", ".trt-cache"),
        number("onnx.tensorrt_max_workspace_gb", 2.0, "TensorRT workspace", 0.1),
        ignored("onnx.library_path", "the onnxruntime Python package brings its own"),
        ignored("onnx.cuda_streams_per_worker", "each worker's session has its own CUDA stream"),
        *batching_keys(per_model=False),
        Table("models", MODEL_KEYS, valid_model_id, "invalid model id (expected letters, digits, '.', '_' or '-')"),
    ),
)
default = SCHEMA.default  # the dataclasses' defaults are the schema's


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of concurrent requests for one model on one device (inference_service/batching.py)."""

    enabled: bool = default("batching.enabled")
    max_batch_frames: int = default("batching.max_batch_frames")
    # 0: a free worker takes what is queued at once (batches still grow under load) and a lone request never waits.
    max_queue_delay_ms: float = default("batching.max_queue_delay_ms")
    max_queue_frames: int = default("batching.max_queue_frames")  # beyond: RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class ModelConfig:
    model_id: str
    model_path: Path
    audio_encoder_path: Path | None = None
    preload: bool = default("models.<id>.preload")
    preferred_gpu: int | None = default("models.<id>.preferred_gpu")
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    geometry: Geometry | None = None  # unset (as in the schema): found from the model's input size
    # ORT's threads spinning during this model's runs (None: onnx.allow_spinning).
    allow_spinning: bool | None = None

    def onnx_for(self, onnx: OnnxConfig) -> OnnxConfig:
        """The session options of this model: the service's, with its own overrides."""
        if self.allow_spinning is None:
            return onnx
        return dataclasses.replace(onnx, allow_spinning=self.allow_spinning)


@dataclass(frozen=True)
class OnnxConfig:
    intra_op_threads: int = default("onnx.intra_op_threads")
    inter_op_threads: int = default("onnx.inter_op_threads")
    graph_optimization: str = default("onnx.graph_optimization")
    # Spinning cost more CPU per frame than it saved in latency on 2 shared cores (docs/decisions/0010).
    allow_spinning: bool = default("onnx.allow_spinning")
    # False stops the threads when the last concurrent run returns instead of burning a core between requests.
    spin_between_runs: bool = default("onnx.spin_between_runs")
    # CUDA execution provider options (see docs/gpu.md).
    cudnn_conv_algo_search: str = default("onnx.cudnn_conv_algo_search")
    cudnn_conv_use_max_workspace: bool = default("onnx.cudnn_conv_use_max_workspace")
    cuda_mem_limit_gb: float = default("onnx.cuda_mem_limit_gb")
    arena_extend_strategy: str = default("onnx.arena_extend_strategy")
    io_binding: str = default("onnx.io_binding")
    # "on" on the CPU too only tests want: numpy builds the input faster there.
    device_inputs: str = default("onnx.device_inputs")
    cuda_graph: bool = default("onnx.cuda_graph")
    cuda_graph_batch_sizes: tuple[int, ...] = default("onnx.cuda_graph_batch_sizes")
    tensorrt: bool = default("onnx.tensorrt")
    tensorrt_fp16: bool = default("onnx.tensorrt_fp16")
    # A config resolves onnx.tensorrt_cache_dir under models_root; built without one, there is no folder to use.
    tensorrt_cache_dir: Path | None = None
    tensorrt_max_workspace_gb: float = default("onnx.tensorrt_max_workspace_gb")


@dataclass(frozen=True)
class InferenceConfig:
    """Built only by parse_config: every default is SCHEMA's."""

    models_root: Path
    host: str
    port: int
    max_message_size_mb: int
    worker_count_per_gpu: int
    cpu_workers: int
    max_queue_per_device: int
    max_batch_size: int
    gpus_enabled: bool
    gpus_required: bool
    gpu_count: int
    memory_gb_per_gpu: float
    assignment_strategy: str
    max_models: int
    max_memory_bytes: int
    eviction_policy: str
    input_cache_bytes: int  # model inputs held for inputs by reference (inference_service/inputs.py); 0: none
    onnx: OnnxConfig
    batching: BatchingConfig  # batching.*: that of every model without its own, including those added after start
    models: Mapping[str, ModelConfig]
    # The audio encoder of every model that names none (top-level audio_encoder_path, or found where the Go
    # system looked), and how it was found, for the start-up log.
    audio_encoder_path: Path | None
    audio_encoder_origin: str
    warmup: bool
    log_level: str
    grace_seconds: float
    tune_malloc: bool
    # Clients re-resolve DNS when a connection ends: bounding a connection's age lets
    # new pods behind a headless Service get traffic. 0 = unbounded.
    max_connection_age_s: float
    serving: ServingConfig

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
    return parse_config(*read_config(path, overrides, environ, SCHEMA), serving=serving)


# Where the Go inference server looked for its one audio_encoder.onnx, here taken relative to models_root.
GO_ENCODER_PLACES = (
    "../audio_encoder.onnx",
    "../../audio_encoder.onnx",
    "audio_encoder.onnx",
    "model/audio_encoder.onnx",
)


def shared_encoder(values: Values, models_root: Path) -> tuple[Path | None, str]:
    """The audio encoder for models that name none: ``audio_encoder_path``, else the first of the Go places."""
    value = values["audio_encoder_path"]
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


def batching_config(values: Values) -> BatchingConfig:
    """``batching.*``, or a model's own ``models.<id>.batching.*`` (whose defaults are the former)."""
    return BatchingConfig(
        enabled=values["batching.enabled"],
        max_batch_frames=values["batching.max_batch_frames"],
        max_queue_delay_ms=values["batching.max_queue_delay_ms"],
        max_queue_frames=values["batching.max_queue_frames"],
    )


def onnx_config(values: Values, models_root: Path) -> OnnxConfig:
    """OnnxConfig's fields are the ``onnx.*`` keys, one for one."""
    onnx = {f.name: values[f"onnx.{f.name}"] for f in dataclasses.fields(OnnxConfig)}
    cache = onnx["tensorrt_cache_dir"] or default("onnx.tensorrt_cache_dir")
    onnx["tensorrt_cache_dir"] = resolve_under(models_root, cache, "onnx.tensorrt_cache_dir")
    config = OnnxConfig(**onnx)
    if config.cuda_graph and config.io_binding == "off":
        raise ConfigError("onnx.cuda_graph: CUDA graphs need bound buffers; onnx.io_binding must not be off")
    return config


def model_config(model_id: str, model: Values, models_root: Path, shared: Path | None) -> ModelConfig:
    encoder = model["audio_encoder_path"] if model.given("audio_encoder_path") else None
    preferred = model["preferred_gpu"]
    return ModelConfig(
        model_id=model_id,
        model_path=resolve_under(models_root, model["model_path"], model.key("model_path")),
        audio_encoder_path=resolve_under(models_root, encoder, model.key("audio_encoder_path")) if encoder else shared,
        preload=model["preload"],
        preferred_gpu=None if preferred is None or preferred < 0 else preferred,
        batching=batching_config(model),
        geometry=model["geometry"],
        allow_spinning=model["allow_spinning"] if model.given("allow_spinning") else None,
    )


def check_dedicated(strategy: str, models: Mapping[str, ModelConfig]) -> None:
    """``dedicated`` gives each GPU to one model: two models may not name the same one."""
    if strategy != "dedicated":
        return
    owners: dict[int, str] = {}
    for model_id, model in models.items():
        gpu = model.preferred_gpu
        if gpu is None:
            continue
        if gpu in owners:
            raise ConfigError(
                f"models.{owners[gpu]}.preferred_gpu and models.{model_id}.preferred_gpu: both name GPU {gpu}, "
                "but gpus.assignment_strategy: dedicated gives each GPU to one model"
            )
        owners[gpu] = model_id


def parse_config(raw: dict[str, Any], base_dir: Path | None = None, *, serving: bool = True) -> InferenceConfig:
    values = SCHEMA.check(raw)
    base = base_dir or Path.cwd()
    models_root = models_root_dir(values["models_root"], base)
    host, port = values["server.port"]
    host = values["server.host"] or host
    onnx = onnx_config(values, models_root)
    encoder, origin = shared_encoder(values, models_root)
    models = {mid: model_config(mid, model, models_root, encoder) for mid, model in values.entries("models").items()}
    check_dedicated(values["gpus.assignment_strategy"], models)
    return InferenceConfig(
        models_root=models_root,
        host=host,
        port=port,
        max_message_size_mb=values["server.max_message_size_mb"],
        worker_count_per_gpu=values["server.worker_count_per_gpu"],
        cpu_workers=values["server.cpu_workers"],
        max_queue_per_device=values["server.max_queue_per_device"],
        max_batch_size=values["server.max_batch_size"],
        grace_seconds=values["server.grace_seconds"],
        tune_malloc=values["server.tune_malloc"],
        max_connection_age_s=values["server.max_connection_age_seconds"],
        gpus_enabled=values["gpus.enabled"],
        gpus_required=values["gpus.required"],
        gpu_count=values["gpus.count"],
        memory_gb_per_gpu=values["gpus.memory_gb_per_gpu"],
        assignment_strategy=values["gpus.assignment_strategy"],
        max_models=values["capacity.max_models"],
        max_memory_bytes=int(values["capacity.max_memory_gb"] * GIB),
        input_cache_bytes=int(values["capacity.input_cache_mb"] * MIB),
        eviction_policy=values["capacity.eviction_policy"],
        onnx=onnx,
        batching=batching_config(values),
        models=models,
        audio_encoder_path=encoder,
        audio_encoder_origin=origin,
        warmup=values["warmup"],
        log_level=values["logging.level"],
        serving=parse_serving(values, base, host, required=serving),
    )
