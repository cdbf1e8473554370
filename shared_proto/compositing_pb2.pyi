from shared_proto import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CompositeBatchRequest(_message.Message):
    __slots__ = ("model_id", "visual_frames", "raw_audio", "audio_features", "batch_size", "start_frame_idx", "sample_rate", "visual_dtype", "audio_features_shape", "audio_encoding", "audio_offset_samples", "utterance_samples", "first_frame")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    VISUAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    RAW_AUDIO_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FEATURES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    START_FRAME_IDX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    VISUAL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FEATURES_SHAPE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_ENCODING_FIELD_NUMBER: _ClassVar[int]
    AUDIO_OFFSET_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    visual_frames: bytes
    raw_audio: bytes
    audio_features: bytes
    batch_size: int
    start_frame_idx: int
    sample_rate: int
    visual_dtype: _inference_pb2.DType
    audio_features_shape: _containers.RepeatedScalarFieldContainer[int]
    audio_encoding: _inference_pb2.AudioEncoding
    audio_offset_samples: int
    utterance_samples: int
    first_frame: int
    def __init__(self, model_id: _Optional[str] = ..., visual_frames: _Optional[bytes] = ..., raw_audio: _Optional[bytes] = ..., audio_features: _Optional[bytes] = ..., batch_size: _Optional[int] = ..., start_frame_idx: _Optional[int] = ..., sample_rate: _Optional[int] = ..., visual_dtype: _Optional[_Union[_inference_pb2.DType, str]] = ..., audio_features_shape: _Optional[_Iterable[int]] = ..., audio_encoding: _Optional[_Union[_inference_pb2.AudioEncoding, str]] = ..., audio_offset_samples: _Optional[int] = ..., utterance_samples: _Optional[int] = ..., first_frame: _Optional[int] = ...) -> None: ...

class CompositeBatchResponse(_message.Message):
    __slots__ = ("composited_frames", "inference_time_ms", "composite_time_ms", "total_time_ms", "audio_processing_ms", "model_loaded", "model_load_time_ms", "success", "error", "gpu_id", "frame_indices", "prepare_time_ms", "queue_time_ms", "inference_call_ms", "device", "cache_hits", "cache_misses", "utterance_frames", "spliced_frames")
    COMPOSITED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    COMPOSITE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_PROCESSING_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOAD_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GPU_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDICES_FIELD_NUMBER: _ClassVar[int]
    PREPARE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_CALL_MS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SPLICED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    composited_frames: _containers.RepeatedScalarFieldContainer[bytes]
    inference_time_ms: float
    composite_time_ms: float
    total_time_ms: float
    audio_processing_ms: float
    model_loaded: bool
    model_load_time_ms: float
    success: bool
    error: str
    gpu_id: int
    frame_indices: _containers.RepeatedScalarFieldContainer[int]
    prepare_time_ms: float
    queue_time_ms: float
    inference_call_ms: float
    device: str
    cache_hits: int
    cache_misses: int
    utterance_frames: int
    spliced_frames: int
    def __init__(self, composited_frames: _Optional[_Iterable[bytes]] = ..., inference_time_ms: _Optional[float] = ..., composite_time_ms: _Optional[float] = ..., total_time_ms: _Optional[float] = ..., audio_processing_ms: _Optional[float] = ..., model_loaded: _Optional[bool] = ..., model_load_time_ms: _Optional[float] = ..., success: _Optional[bool] = ..., error: _Optional[str] = ..., gpu_id: _Optional[int] = ..., frame_indices: _Optional[_Iterable[int]] = ..., prepare_time_ms: _Optional[float] = ..., queue_time_ms: _Optional[float] = ..., inference_call_ms: _Optional[float] = ..., device: _Optional[str] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., utterance_frames: _Optional[int] = ..., spliced_frames: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_id", "force_reload")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_RELOAD_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    force_reload: bool
    def __init__(self, model_id: _Optional[str] = ..., force_reload: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("healthy", "inference_server_healthy", "loaded_models", "max_models", "version", "inference_server_url", "inference_mode", "cache_bytes", "cache_max_bytes", "active_sessions", "jpeg_spliced_frames", "jpeg_full_frames", "inference_servers_reachable", "hop_requests", "hop_frames", "hop_request_bytes", "hop_response_bytes", "hop_inputs_sent", "hop_inputs_resent")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SERVER_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    LOADED_MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODELS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SERVER_URL_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MODE_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    JPEG_SPLICED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    JPEG_FULL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SERVERS_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    HOP_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    HOP_FRAMES_FIELD_NUMBER: _ClassVar[int]
    HOP_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOP_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOP_INPUTS_SENT_FIELD_NUMBER: _ClassVar[int]
    HOP_INPUTS_RESENT_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    inference_server_healthy: bool
    loaded_models: int
    max_models: int
    version: str
    inference_server_url: str
    inference_mode: str
    cache_bytes: int
    cache_max_bytes: int
    active_sessions: int
    jpeg_spliced_frames: int
    jpeg_full_frames: int
    inference_servers_reachable: int
    hop_requests: int
    hop_frames: int
    hop_request_bytes: int
    hop_response_bytes: int
    hop_inputs_sent: int
    hop_inputs_resent: int
    def __init__(self, healthy: _Optional[bool] = ..., inference_server_healthy: _Optional[bool] = ..., loaded_models: _Optional[int] = ..., max_models: _Optional[int] = ..., version: _Optional[str] = ..., inference_server_url: _Optional[str] = ..., inference_mode: _Optional[str] = ..., cache_bytes: _Optional[int] = ..., cache_max_bytes: _Optional[int] = ..., active_sessions: _Optional[int] = ..., jpeg_spliced_frames: _Optional[int] = ..., jpeg_full_frames: _Optional[int] = ..., inference_servers_reachable: _Optional[int] = ..., hop_requests: _Optional[int] = ..., hop_frames: _Optional[int] = ..., hop_request_bytes: _Optional[int] = ..., hop_response_bytes: _Optional[int] = ..., hop_inputs_sent: _Optional[int] = ..., hop_inputs_resent: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "loaded", "model_path", "background_dir", "crop_rects_path", "stats", "num_frames", "frame_width", "frame_height")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_DIR_FIELD_NUMBER: _ClassVar[int]
    CROP_RECTS_PATH_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAME_WIDTH_FIELD_NUMBER: _ClassVar[int]
    FRAME_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    loaded: bool
    model_path: str
    background_dir: str
    crop_rects_path: str
    stats: ModelStats
    num_frames: int
    frame_width: int
    frame_height: int
    def __init__(self, model_id: _Optional[str] = ..., loaded: _Optional[bool] = ..., model_path: _Optional[str] = ..., background_dir: _Optional[str] = ..., crop_rects_path: _Optional[str] = ..., stats: _Optional[_Union[ModelStats, _Mapping]] = ..., num_frames: _Optional[int] = ..., frame_width: _Optional[int] = ..., frame_height: _Optional[int] = ...) -> None: ...

class ModelStats(_message.Message):
    __slots__ = ("usage_count", "last_used_unix_ms", "total_inference_time_ms", "memory_bytes", "loaded_unix_ms", "total_frames", "mean_inference_time_ms", "cache_hits", "cache_misses", "cached_frames", "cache_bytes", "cache_evictions", "load_time_ms", "cache_encoded_bytes", "jpeg_spliced_frames", "jpeg_full_frames")
    USAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_INFERENCE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MEAN_INFERENCE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    CACHE_ENCODED_BYTES_FIELD_NUMBER: _ClassVar[int]
    JPEG_SPLICED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    JPEG_FULL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    usage_count: int
    last_used_unix_ms: int
    total_inference_time_ms: float
    memory_bytes: int
    loaded_unix_ms: int
    total_frames: int
    mean_inference_time_ms: float
    cache_hits: int
    cache_misses: int
    cached_frames: int
    cache_bytes: int
    cache_evictions: int
    load_time_ms: float
    cache_encoded_bytes: int
    jpeg_spliced_frames: int
    jpeg_full_frames: int
    def __init__(self, usage_count: _Optional[int] = ..., last_used_unix_ms: _Optional[int] = ..., total_inference_time_ms: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., loaded_unix_ms: _Optional[int] = ..., total_frames: _Optional[int] = ..., mean_inference_time_ms: _Optional[float] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., cached_frames: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., cache_evictions: _Optional[int] = ..., load_time_ms: _Optional[float] = ..., cache_encoded_bytes: _Optional[int] = ..., jpeg_spliced_frames: _Optional[int] = ..., jpeg_full_frames: _Optional[int] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("config", "audio", "control")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    audio: AudioChunk
    control: SessionControl
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., control: _Optional[_Union[SessionControl, _Mapping]] = ...) -> None: ...

class SessionConfig(_message.Message):
    __slots__ = ("model_id", "start_frame_idx", "fps", "output_format", "jpeg_quality", "audio_encoding", "sample_rate", "idle_frames", "drop_late_frames", "max_batch_frames")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FRAME_IDX_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    AUDIO_ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    IDLE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DROP_LATE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FRAMES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start_frame_idx: int
    fps: float
    output_format: str
    jpeg_quality: int
    audio_encoding: _inference_pb2.AudioEncoding
    sample_rate: int
    idle_frames: bool
    drop_late_frames: bool
    max_batch_frames: int
    def __init__(self, model_id: _Optional[str] = ..., start_frame_idx: _Optional[int] = ..., fps: _Optional[float] = ..., output_format: _Optional[str] = ..., jpeg_quality: _Optional[int] = ..., audio_encoding: _Optional[_Union[_inference_pb2.AudioEncoding, str]] = ..., sample_rate: _Optional[int] = ..., idle_frames: _Optional[bool] = ..., drop_late_frames: _Optional[bool] = ..., max_batch_frames: _Optional[int] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class SessionControl(_message.Message):
    __slots__ = ("end_of_input", "interrupt")
    END_OF_INPUT_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    end_of_input: bool
    interrupt: bool
    def __init__(self, end_of_input: _Optional[bool] = ..., interrupt: _Optional[bool] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("started", "frame", "ended")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    started: SessionStarted
    frame: SessionFrame
    ended: SessionEnded
    def __init__(self, started: _Optional[_Union[SessionStarted, _Mapping]] = ..., frame: _Optional[_Union[SessionFrame, _Mapping]] = ..., ended: _Optional[_Union[SessionEnded, _Mapping]] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session_id", "frame_width", "frame_height", "fps", "num_background_frames")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_WIDTH_FIELD_NUMBER: _ClassVar[int]
    FRAME_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    NUM_BACKGROUND_FRAMES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    frame_width: int
    frame_height: int
    fps: float
    num_background_frames: int
    def __init__(self, session_id: _Optional[str] = ..., frame_width: _Optional[int] = ..., frame_height: _Optional[int] = ..., fps: _Optional[float] = ..., num_background_frames: _Optional[int] = ...) -> None: ...

class SessionFrame(_message.Message):
    __slots__ = ("frame_index", "timestamp_s", "image", "background_index", "speech", "utterance", "utterance_frame")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_S_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_INDEX_FIELD_NUMBER: _ClassVar[int]
    SPEECH_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_FRAME_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    timestamp_s: float
    image: bytes
    background_index: int
    speech: bool
    utterance: int
    utterance_frame: int
    def __init__(self, frame_index: _Optional[int] = ..., timestamp_s: _Optional[float] = ..., image: _Optional[bytes] = ..., background_index: _Optional[int] = ..., speech: _Optional[bool] = ..., utterance: _Optional[int] = ..., utterance_frame: _Optional[int] = ...) -> None: ...

class SessionEnded(_message.Message):
    __slots__ = ("frames", "speech_frames", "idle_frames", "dropped_frames", "audio_seconds")
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    SPEECH_FRAMES_FIELD_NUMBER: _ClassVar[int]
    IDLE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    frames: int
    speech_frames: int
    idle_frames: int
    dropped_frames: int
    audio_seconds: float
    def __init__(self, frames: _Optional[int] = ..., speech_frames: _Optional[int] = ..., idle_frames: _Optional[int] = ..., dropped_frames: _Optional[int] = ..., audio_seconds: _Optional[float] = ...) -> None: ...
