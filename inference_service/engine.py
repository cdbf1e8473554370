"""ONNX Runtime sessions for lip-sync models, and the worker pool of each device.

A device runs at most ``workers`` inference calls at once; callers past that
wait in a bounded queue. Work runs on the pool's threads, never on the event
loop: ONNX Runtime releases the GIL inside ``run``, so the loop keeps
serving other calls while a batch computes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from lipsync_protocol.errors import DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, ResourceExhausted
from lipsync_protocol.geometry import Geometry, geometry_for_input

from .binding import BoundRunner
from .config import OnnxConfig
from .devices import CUDA_PROVIDER, TENSORRT_PROVIDER, Device, providers_for, session_options
from .inputs import Crop, PrepGraphs

log = logging.getLogger(__name__)

T = TypeVar("T")

VISUAL_INPUT = "input"
AUDIO_INPUT = "audio"
DEFAULT_VISUAL_SHAPE = (6, 320, 320)
DEFAULT_AUDIO_SHAPE = (32, 16, 16)
DEFAULT_OUTPUT_SHAPE = (3, 320, 320)


@dataclass(frozen=True)
class RunResult:
    value: Any
    queue_ms: float
    run_ms: float
    worker_id: int


_EXPIRED = object()  # a queued job whose deadline passed before a worker took it

_WORKER = threading.local()  # each pool thread's index in its pool (a thread belongs to one pool)


def current_worker() -> int:
    """The index of the pool worker running the calling thread (0 outside a pool)."""
    return getattr(_WORKER, "index", 0)


class DeviceWorkers:
    """A bounded worker pool for one device."""

    def __init__(self, device: Device, max_queue: int) -> None:
        self.device = device
        self.max_queue = max_queue
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.active = 0
        self.queued = 0
        self._executor = ThreadPoolExecutor(
            max_workers=device.workers,
            thread_name_prefix=f"infer-{device.label}",
            initializer=self._init_worker,
        )

    def _init_worker(self) -> None:
        _WORKER.index = next(self._ids)

    async def run(self, fn: Callable[..., T], *args: Any, deadline: float | None = None) -> RunResult:
        """Run ``fn(*args)`` on a worker; queue time and run time are measured apart.

        ``deadline`` (monotonic): a call still queued when it passes is not run (DEADLINE_EXCEEDED).
        """
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"device {self.device.label}: the request's deadline passed before it was queued")
        with self._lock:
            if self.queued >= self.max_queue:
                raise ResourceExhausted(
                    f"device {self.device.label}: {self.queued} calls already queued (limit "
                    f"server.max_queue_per_device={self.max_queue}); retry later",
                    retry_after_ms=100,
                )
            self.queued += 1
        submitted = time.perf_counter()
        abandoned = threading.Event()

        def job() -> RunResult | object | None:
            started = time.perf_counter()
            with self._lock:
                self.queued -= 1
                if abandoned.is_set():
                    return None
                if deadline is not None and time.monotonic() >= deadline:
                    return _EXPIRED
                self.active += 1
            try:
                value = fn(*args)
            finally:
                with self._lock:
                    self.active -= 1
            return RunResult(
                value,
                (started - submitted) * 1000.0,
                (time.perf_counter() - started) * 1000.0,
                current_worker(),
            )

        future = asyncio.get_running_loop().run_in_executor(self._executor, job)
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The caller gave up (deadline, cancel): a job still queued is skipped.
            abandoned.set()
            raise
        if result is _EXPIRED:
            waited = (time.perf_counter() - submitted) * 1000.0
            raise DeadlineExceeded(
                f"device {self.device.label}: the request's deadline passed after {waited:.0f} ms in the queue; "
                "it was not run"
            )
        assert isinstance(result, RunResult)
        return result

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _static_dims(shape: list[Any], default: tuple[int, ...]) -> tuple[int, ...]:
    """Non-batch dims of an ONNX input; symbolic ones fall back to the reference sizes."""
    dims = list(shape[1:])
    if len(dims) != len(default):
        return tuple(-1 for _ in default)
    return tuple(d if isinstance(d, int) and d > 0 else default[i] for i, d in enumerate(dims))


def _geometry_of(visual_shape: tuple[int, ...]) -> Geometry | None:
    """The geometry of a model configured without one, found from its input size (320: 328, 160: 160); None for
    a size of no known family (such a model is served whole 6-channel inputs only)."""
    try:
        return geometry_for_input(visual_shape[-1])
    except ValueError:
        return None


def create_session(path: Path, device: Device, onnx: OnnxConfig, max_batch: int = 64) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(onnx), providers=providers_for(device, onnx, max_batch)
        )
    except Exception as exc:  # ORT raises its own exception types for bad files
        raise InvalidArgument(f"model file {path.name}: ONNX Runtime could not load it ({exc})") from exc


def binding_device(session: ort.InferenceSession) -> str:
    """Where a session's buffers live: the provider ORT actually chose (CUDA falls back to the CPU when absent)."""
    first = session.get_providers()[0]
    return "cuda" if first in (CUDA_PROVIDER, TENSORRT_PROVIDER) else "cpu"


class LipSyncModel:
    """A loaded UNet (and its audio encoder when configured) on one device.

    On a GPU every worker gets its own session (its own CUDA stream, and the only way to use CUDA graphs, which
    forbid concurrent runs of one session); the CPU shares one session, whose intra-op threads serve all.
    With IOBinding (``onnx.io_binding``: on GPUs by default) each worker runs through a ``BoundRunner``.
    """

    def __init__(
        self,
        model_id: str,
        path: Path,
        device: Device,
        onnx: OnnxConfig,
        encoder_path: Path | None = None,
        max_batch: int = 64,
        geometry: Geometry | None = None,
    ) -> None:
        self.model_id = model_id
        self.path = path
        self.encoder_path = encoder_path
        self.device = device
        count = device.workers if device.kind == "cuda" else 1
        self.sessions = [create_session(path, device, onnx, max_batch) for _ in range(count)]
        self.encoders = [create_session(encoder_path, device, onnx) for _ in range(count)] if encoder_path else []
        self._read_io(path, geometry)
        self.providers = self.session.get_providers()
        self.runners = self._runners(onnx, count)
        weights = path.stat().st_size + (encoder_path.stat().st_size if encoder_path else 0)
        self.weights_bytes = weights
        self.memory_bytes = weights * count  # every session holds its own copy of the weights

    def _read_io(self, path: Path, geometry: Geometry | None) -> None:
        """The model's tensor names and per-frame shapes, checked against what the service feeds it."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        if set(inputs) != {VISUAL_INPUT, AUDIO_INPUT}:
            raise InvalidArgument(
                f"model file {path.name}: expected inputs 'input' and 'audio', found {sorted(inputs)}"
            )
        outputs = self.session.get_outputs()
        if len(outputs) != 1:
            raise InvalidArgument(f"model file {path.name}: expected one output, found {len(outputs)}")
        self.output_name = outputs[0].name
        self.visual_shape = _static_dims(inputs[VISUAL_INPUT].shape, DEFAULT_VISUAL_SHAPE)
        self.audio_shape = _static_dims(inputs[AUDIO_INPUT].shape, DEFAULT_AUDIO_SHAPE)
        self.output_shape = _static_dims(outputs[0].shape, DEFAULT_OUTPUT_SHAPE)
        for name, dims in (("input", self.visual_shape), ("audio", self.audio_shape), ("output", self.output_shape)):
            if -1 in dims:
                raise InvalidArgument(f"model file {path.name}: {name} must be 4-D [batch, C, H, W]")
        self.geometry = geometry or _geometry_of(self.visual_shape)
        if self.geometry is not None and self.geometry.visual_shape != self.visual_shape:
            raise InvalidArgument(
                f"model file {path.name}: input is {list(self.visual_shape)} but geometry "
                f"{self.geometry.name} feeds {list(self.geometry.visual_shape)}"
            )

    def _runners(self, onnx: OnnxConfig, count: int) -> list[BoundRunner]:
        """A bound runner per worker where buffers are bound (GPUs by default), with the on-device input builder
        when held inputs live on the device; none where plain ``session.run`` serves."""
        location = binding_device(self.session)
        use_binding = onnx.io_binding == "on" or (onnx.io_binding == "auto" and location == "cuda")
        self.graph_sizes = onnx.cuda_graph_batch_sizes if onnx.cuda_graph and location == "cuda" else ()
        # Held inputs live on the device and the float input is built there (CUDA; the CPU when asked, as tests do).
        device_inputs = onnx.device_inputs == "on" or (onnx.device_inputs == "auto" and location == "cuda")
        bound = use_binding or bool(self.graph_sizes)
        index = max(self.device.index, 0)
        self.prep = (
            PrepGraphs(self.geometry, self.session.get_providers(), location, index)
            if device_inputs and self.geometry is not None and bound
            else None
        )
        if not bound:
            return []
        names = (VISUAL_INPUT, AUDIO_INPUT)
        return [
            BoundRunner(
                self.sessions[w % count],
                names,
                self.output_name,
                self.output_shape,
                location,
                index,
                self.graph_sizes,
                self.prep,
            )
            for w in range(self.device.workers)
        ]

    @property
    def session(self) -> ort.InferenceSession:
        return self.sessions[0]

    @property
    def encoder(self) -> ort.InferenceSession | None:
        return self.encoders[0] if self.encoders else None

    @property
    def device_buffer_bytes(self) -> int:
        return sum(r.device_bytes for r in self.runners)

    def crop_geometry(self) -> Geometry:
        """The geometry that turns a real crop into this model's input (crops sent or held need one)."""
        if self.geometry is None:
            raise FailedPrecondition(
                f"visual_channels: model {self.model_id!r} takes a {list(self.visual_shape)} input of no known "
                f"geometry; set models.{self.model_id}.geometry, or send all 6 channels"
            )
        return self.geometry

    def run(self, visual: np.ndarray | list[Crop], audio: np.ndarray, worker: int = 0) -> np.ndarray:
        """One forward pass on ``worker``'s session; inputs already validated float32 C-contiguous, or crops
        (held inputs) whose model input the device builds (``self.prep``)."""
        try:
            if self.runners:
                return self.runners[worker % len(self.runners)].run(visual, audio)
            session = self.sessions[worker % len(self.sessions)]
            (out,) = session.run([self.output_name], {VISUAL_INPUT: visual, AUDIO_INPUT: audio})
        except Exception as exc:
            raise Internal(f"model {self.model_id}: inference failed ({exc})") from exc
        return out

    def encode_audio(self, chunks: np.ndarray, worker: int = 0) -> np.ndarray:
        """Mel chunks [N, 1, 80, 16] to embeddings [N, 512] with the model's audio encoder, on its device."""
        assert self.encoders
        encoder = self.encoders[worker % len(self.encoders)]
        try:
            (out,) = encoder.run(None, {encoder.get_inputs()[0].name: chunks})
        except Exception as exc:
            raise Internal(f"model {self.model_id}: audio encoder failed ({exc})") from exc
        return out.reshape(len(chunks), -1)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Runs at load so the first requests do not pay for allocation and kernel choice (and, with CUDA graphs,
        so every graph is captured): each batch size on every worker's session."""
        sizes = sorted(set(batch_sizes) | set(self.graph_sizes))
        for worker in range(max(len(self.runners), len(self.sessions))):
            for size in sizes:
                visual = np.zeros((size, *self.visual_shape), np.float32)
                audio = np.zeros((size, *self.audio_shape), np.float32)
                self.run(visual, audio, worker)
        for encoder in self.encoders:
            enc_input = encoder.get_inputs()[0]
            dims = [d if isinstance(d, int) and d > 0 else 1 for d in enc_input.shape]
            encoder.run(None, {enc_input.name: np.zeros(dims, np.float32)})
