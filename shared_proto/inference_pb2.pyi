from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    AUDIO_PCM_S16LE: _ClassVar[AudioEncoding]
    AUDIO_FLOAT32: _ClassVar[AudioEncoding]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_UINT8: DType
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
AUDIO_PCM_S16LE: AudioEncoding
AUDIO_FLOAT32: AudioEncoding

class InferBatchRequest(_message.Message):
    __slots__ = ("model_id", "visual_frames", "raw_audio", "audio_features", "batch_size", "sample_rate", "visual_dtype", "output_dtype", "audio_features_shape", "audio_encoding", "audio_offset_samples", "utterance_samples", "first_frame", "visual_keys", "visual_sent", "visual_channels")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VISUAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    RAW_AUDIO_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FEATURES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    VISUAL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FEATURES_SHAPE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_ENCODING_FIELD_NUMBER: _ClassVar[int]
    AUDIO_OFFSET_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    VISUAL_KEYS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_SENT_FIELD_NUMBER: _ClassVar[int]
    VISUAL_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    visual_frames: bytes
    raw_audio: bytes
    audio_features: bytes
    batch_size: int
    sample_rate: int
    visual_dtype: DType
    output_dtype: DType
    audio_features_shape: _containers.RepeatedScalarFieldContainer[int]
    audio_encoding: AudioEncoding
    audio_offset_samples: int
    utterance_samples: int
    first_frame: int
    visual_keys: _containers.RepeatedScalarFieldContainer[str]
    visual_sent: _containers.RepeatedScalarFieldContainer[int]
    visual_channels: int
    def __init__(self, model_id: _Optional[str] = ..., visual_frames: _Optional[bytes] = ..., raw_audio: _Optional[bytes] = ..., audio_features: _Optional[bytes] = ..., batch_size: _Optional[int] = ..., sample_rate: _Optional[int] = ..., visual_dtype: _Optional[_Union[DType, str]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., audio_features_shape: _Optional[_Iterable[int]] = ..., audio_encoding: _Optional[_Union[AudioEncoding, str]] = ..., audio_offset_samples: _Optional[int] = ..., utterance_samples: _Optional[int] = ..., first_frame: _Optional[int] = ..., visual_keys: _Optional[_Iterable[str]] = ..., visual_sent: _Optional[_Iterable[int]] = ..., visual_channels: _Optional[int] = ...) -> None: ...

class RawMouthRegion(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class InferBatchResponse(_message.Message):
    __slots__ = ("outputs", "inference_time_ms", "audio_processing_ms", "success", "error", "worker_id", "gpu_id", "queue_time_ms", "device", "utterance_frames", "batch_frames", "batch_requests", "missing_visual")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PROCESSING_MS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    BATCH_FRAMES_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MISSING_VISUAL_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[RawMouthRegion]
    inference_time_ms: float
    audio_processing_ms: float
    success: bool
    error: str
    worker_id: int
    gpu_id: int
    queue_time_ms: float
    device: str
    utterance_frames: int
    batch_frames: int
    batch_requests: int
    missing_visual: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, outputs: _Optional[_Iterable[_Union[RawMouthRegion, _Mapping]]] = ..., inference_time_ms: _Optional[float] = ..., audio_processing_ms: _Optional[float] = ..., success: _Optional[bool] = ..., error: _Optional[str] = ..., worker_id: _Optional[int] = ..., gpu_id: _Optional[int] = ..., queue_time_ms: _Optional[float] = ..., device: _Optional[str] = ..., utterance_frames: _Optional[int] = ..., batch_frames: _Optional[int] = ..., batch_requests: _Optional[int] = ..., missing_visual: _Optional[_Iterable[int]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_id", "force_reload", "model_path")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_RELOAD_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    force_reload: bool
    model_path: str
    def __init__(self, model_id: _Optional[str] = ..., force_reload: _Optional[bool] = ..., model_path: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("success", "error", "load_time_ms", "stats", "evicted")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    success: bool
    error: str
    load_time_ms: float
    stats: ModelStats
    evicted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, success: _Optional[bool] = ..., error: _Optional[str] = ..., load_time_ms: _Optional[float] = ..., stats: _Optional[_Union[ModelStats, _Mapping]] = ..., evicted: _Optional[_Iterable[str]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("success", "error")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    success: bool
    error: str
    def __init__(self, success: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class GetModelStatsRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class GetModelStatsResponse(_message.Message):
    __slots__ = ("models", "max_models", "loaded_models", "total_memory_bytes", "max_memory_bytes")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODELS_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    max_models: int
    loaded_models: int
    total_memory_bytes: int
    max_memory_bytes: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., max_models: _Optional[int] = ..., loaded_models: _Optional[int] = ..., total_memory_bytes: _Optional[int] = ..., max_memory_bytes: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("healthy", "cuda_available", "loaded_models", "max_models", "gpu_count", "version", "gpus", "devices", "input_cache_bytes", "input_cache_max_bytes", "input_cache_entries")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CUDA_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODELS_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    INPUT_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUT_CACHE_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUT_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    cuda_available: bool
    loaded_models: int
    max_models: int
    gpu_count: int
    version: str
    gpus: _containers.RepeatedCompositeFieldContainer[GPUInfo]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    input_cache_bytes: int
    input_cache_max_bytes: int
    input_cache_entries: int
    def __init__(self, healthy: _Optional[bool] = ..., cuda_available: _Optional[bool] = ..., loaded_models: _Optional[int] = ..., max_models: _Optional[int] = ..., gpu_count: _Optional[int] = ..., version: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GPUInfo, _Mapping]]] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., input_cache_bytes: _Optional[int] = ..., input_cache_max_bytes: _Optional[int] = ..., input_cache_entries: _Optional[int] = ...) -> None: ...

class GPUInfo(_message.Message):
    __slots__ = ("gpu_id", "name", "total_memory_bytes", "used_memory_bytes", "loaded_models")
    GPU_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    gpu_id: int
    name: str
    total_memory_bytes: int
    used_memory_bytes: int
    loaded_models: int
    def __init__(self, gpu_id: _Optional[int] = ..., name: _Optional[str] = ..., total_memory_bytes: _Optional[int] = ..., used_memory_bytes: _Optional[int] = ..., loaded_models: _Optional[int] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device", "gpu_id", "name", "total_memory_bytes", "used_memory_bytes", "loaded_models", "execution_provider", "workers", "active_runs", "queued_runs")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GPU_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_RUNS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_RUNS_FIELD_NUMBER: _ClassVar[int]
    device: str
    gpu_id: int
    name: str
    total_memory_bytes: int
    used_memory_bytes: int
    loaded_models: int
    execution_provider: str
    workers: int
    active_runs: int
    queued_runs: int
    def __init__(self, device: _Optional[str] = ..., gpu_id: _Optional[int] = ..., name: _Optional[str] = ..., total_memory_bytes: _Optional[int] = ..., used_memory_bytes: _Optional[int] = ..., loaded_models: _Optional[int] = ..., execution_provider: _Optional[str] = ..., workers: _Optional[int] = ..., active_runs: _Optional[int] = ..., queued_runs: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "loaded", "model_path", "stats", "gpu_id", "device")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    GPU_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    loaded: bool
    model_path: str
    stats: ModelStats
    gpu_id: int
    device: str
    def __init__(self, model_id: _Optional[str] = ..., loaded: _Optional[bool] = ..., model_path: _Optional[str] = ..., stats: _Optional[_Union[ModelStats, _Mapping]] = ..., gpu_id: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class ModelStats(_message.Message):
    __slots__ = ("usage_count", "last_used_unix_ms", "total_inference_time_ms", "memory_bytes", "loaded_unix_ms", "total_frames", "mean_inference_time_ms", "device", "load_time_ms")
    USAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_INFERENCE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MEAN_INFERENCE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    usage_count: int
    last_used_unix_ms: int
    total_inference_time_ms: float
    memory_bytes: int
    loaded_unix_ms: int
    total_frames: int
    mean_inference_time_ms: float
    device: str
    load_time_ms: float
    def __init__(self, usage_count: _Optional[int] = ..., last_used_unix_ms: _Optional[int] = ..., total_inference_time_ms: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., loaded_unix_ms: _Optional[int] = ..., total_frames: _Optional[int] = ..., mean_inference_time_ms: _Optional[float] = ..., device: _Optional[str] = ..., load_time_ms: _Optional[float] = ...) -> None: ...
