"""Which models are loaded, where, and which to evict when full.

Capacity is bounded by count (``capacity.max_models``) and by memory
(``capacity.max_memory_gb``). When a load needs room, the least frequently
used model that is not serving a request goes first (ties: least recently
used), in the order service_common.usage gives; see
docs/decisions/0002-lfu-eviction-without-cachetools.md.

Loads are serialized (one at a time): they are rare, heavy, and racing two
of them for the same room would need more locking than they are worth. A
load that fails leaves the registry as it was; a replaced or evicted model
keeps serving the requests that hold it, and is freed when they finish.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lipsync_protocol.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from service_common.config_source import valid_model_id
from service_common.registry import LfuRegistry, Loaded, RegistryEvents

from .config import InferenceConfig, ModelConfig
from .devices import Device
from .engine import LipSyncModel

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
ENCODER_FILE = "audio_encoder.onnx"


GPU_MEMORY_FRACTION = 0.9  # of a GPU's memory that models may be placed into (the rest: activations, arenas)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(kw_only=True)
class ModelEntry(Loaded):
    spec: ModelConfig
    model: LipSyncModel
    resident: bool = True

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def key(self) -> str:
        return self.spec.model_id

    @property
    def memory_bytes(self) -> int:
        return self.model.memory_bytes


@dataclass
class LoadOutcome:
    entry: ModelEntry
    load_time_ms: float
    already_loaded: bool
    evicted: list[str] = field(default_factory=list)


ModelFactory = Callable[[ModelConfig, Device], LipSyncModel]


class ModelRegistry(LfuRegistry[ModelEntry]):
    noun = "model"

    def __init__(
        self,
        config: InferenceConfig,
        devices: list[Device],
        model_factory: ModelFactory | None = None,
        events: RegistryEvents | None = None,
    ) -> None:
        super().__init__(events)
        self.config = config
        self.devices = devices
        self.limit = f"capacity.max_models={config.max_models}"
        self._factory = model_factory or self._default_factory
        self._dynamic: dict[str, ModelConfig] = {}
        self._round_robin = itertools.count()
        self._frames: Counter[str] = Counter()  # device label -> frames of requests run or queued there
        self._dedicated = self._dedicated_gpus()

    # -- model specs -------------------------------------------------------

    def _default_factory(self, spec: ModelConfig, device: Device) -> LipSyncModel:
        model = LipSyncModel(
            spec.model_id,
            spec.model_path,
            device,
            spec.onnx_for(self.config.onnx),
            spec.audio_encoder_path,
            max_batch=self.config.max_batch_size,
            geometry=spec.geometry,
        )
        if self.config.warmup:
            # With batching, the batch size it forms under load is warmed too (a cold size costs a first run).
            sizes = (1, spec.batching.max_batch_frames) if spec.batching.enabled else (1,)
            model.warm_up(sizes)
        return model

    def inside_root(self, relative: str, field_name: str) -> Path:
        """Resolve a client-given path; anything that leaves models_root is refused."""
        if not relative or "\x00" in relative:
            raise InvalidArgument(f"{field_name}: expected a path relative to models_root")
        candidate = Path(relative)
        if candidate.is_absolute():
            raise InvalidArgument(f"{field_name}: expected a path relative to models_root, got an absolute path")
        root = self.config.models_root
        resolved = (root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise InvalidArgument(f"{field_name}: path leaves models_root")
        return resolved

    def spec_for(self, model_id: str, model_path: str = "") -> ModelConfig:
        if not valid_model_id(model_id):
            raise InvalidArgument(
                "model_id: expected 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit"
            )
        if model_path:
            path = self.inside_root(model_path, "model_path")
            if path.suffix != ".onnx" or not path.is_file():
                raise NotFound(f"model_path: no .onnx file at {model_path!r} under models_root")
            configured = self.config.models.get(model_id)
            if configured and configured.model_path != path:
                raise InvalidArgument(f"model_path: model_id {model_id!r} is configured with another path")
            encoder = path.parent / ENCODER_FILE
            own = encoder if encoder.is_file() and encoder != path else None
            return ModelConfig(model_id, path, own or self.config.audio_encoder_path, batching=self.config.batching)
        if model_id in self.config.models:
            return self.config.models[model_id]
        if model_id in self._dynamic:
            return self._dynamic[model_id]
        # Convention: models_root/<id>/model.onnx, for models added after start.
        folder = self.inside_root(model_id, "model_id")
        if (folder / MODEL_FILE).is_file():
            encoder = folder / ENCODER_FILE
            own = encoder if encoder.is_file() else None
            return ModelConfig(
                model_id, folder / MODEL_FILE, own or self.config.audio_encoder_path, batching=self.config.batching
            )
        raise NotFound(f"model_id: unknown model {model_id!r} (not configured, no {model_id}/{MODEL_FILE})")

    def known_ids(self) -> list[str]:
        with self._lock:
            return sorted(set(self.config.models) | set(self._dynamic) | set(self._entries))

    # -- placement and capacity --------------------------------------------

    def device_bytes(self, device: Device) -> int:
        """Memory accounted to a device: every session's weights and the bound buffers of its models."""
        with self._lock:
            mine = [e for e in self._entries.values() if e.model.device.label == device.label]
        return sum(e.memory_bytes + getattr(e.model, "device_buffer_bytes", 0) for e in mine)

    def _dedicated_gpus(self) -> set[int]:
        """GPUs that configured models name as their own: with ``dedicated``, nothing else goes there."""
        if self.config.assignment_strategy != "dedicated":
            return set()
        if not any(d.kind == "cuda" for d in self.devices):
            log.warning("gpus.assignment_strategy: dedicated, but there is no GPU: every model shares the CPU")
        present = {d.gpu_id for d in self.devices}
        return {s.preferred_gpu for s in self.config.models.values() if s.preferred_gpu in present}

    def _place(self, spec: ModelConfig) -> Device:
        """``preferred_gpu`` if present; else the strategy's order over the devices nobody has dedicated."""
        if spec.preferred_gpu is not None:
            for device in self.devices:
                if device.gpu_id == spec.preferred_gpu:
                    return device
            log.warning(
                "model %s: preferred_gpu %d not available, placing it as if it named none",
                spec.model_id,
                spec.preferred_gpu,
            )
        shared = [d for d in self.devices if d.gpu_id not in self._dedicated]
        if not shared:
            raise FailedPrecondition(
                f"model {spec.model_id!r}: every device is dedicated to a configured model "
                "(gpus.assignment_strategy: dedicated); give it a preferred_gpu of its own, add a GPU, "
                "or use gpus.assignment_strategy: round-robin"
            )
        if self.config.assignment_strategy == "least-loaded":
            return self._first_fitting(self._by_load(shared), spec)
        return self._first_fitting(self._rotation(shared), spec)

    def _rotation(self, devices: list[Device]) -> list[Device]:
        start = next(self._round_robin)
        return [devices[(start + k) % len(devices)] for k in range(len(devices))]

    def _by_load(self, devices: list[Device]) -> list[Device]:
        """Fewest frames in flight first: they measure the work a device has now, which models loaded do not."""
        with self._lock:
            frames = dict(self._frames)
            models = Counter(e.model.device.label for e in self._entries.values())
        return sorted(devices, key=lambda d: (frames.get(d.label, 0), models[d.label]))  # stable: device order

    def _first_fitting(self, order: list[Device], spec: ModelConfig) -> Device:
        """The first device the model fits in; if none, the first (the load itself then says why)."""
        estimate = spec.model_path.stat().st_size if spec.model_path.is_file() else 0
        for device in order:
            if device.kind != "cuda" or not device.total_memory_bytes:
                return device
            copies = device.workers  # a session per worker
            if self.device_bytes(device) + estimate * copies <= device.total_memory_bytes * GPU_MEMORY_FRACTION:
                return device
        return order[0]

    def begin_frames(self, entry: ModelEntry, frames: int) -> None:
        """Count a request's frames against its device until ``end_frames``; ``least-loaded`` reads this."""
        with self._lock:
            self._frames[entry.model.device.label] += frames

    def end_frames(self, entry: ModelEntry, frames: int) -> None:
        with self._lock:
            self._frames[entry.model.device.label] -= frames

    def frames_in_flight(self, device: Device) -> int:
        with self._lock:
            return self._frames[device.label]

    def _fits(self, remaining: list[ModelEntry], new_size: int) -> bool:
        max_memory = self.config.max_memory_bytes
        if max_memory and new_size > max_memory:
            raise ResourceExhausted(
                f"model needs {new_size} bytes, more than capacity.max_memory_gb allows ({max_memory} bytes)"
            )
        memory = sum(e.memory_bytes for e in remaining)
        return len(remaining) + 1 <= self.config.max_models and (not max_memory or memory + new_size <= max_memory)

    def _size(self, entry: ModelEntry) -> int:
        return entry.memory_bytes

    def _removed(self, entry: ModelEntry, evicted: bool) -> None:
        entry.resident = False  # requests holding it finish; nothing new reaches it

    # -- load / unload -----------------------------------------------------

    def load(self, model_id: str, force_reload: bool = False, model_path: str = "") -> LoadOutcome:
        spec = self.spec_for(model_id, model_path)
        estimate = spec.model_path.stat().st_size if spec.model_path.is_file() else 0
        entry, loaded, evicted = self._load(
            model_id,
            lambda: ModelEntry(spec=spec, model=self._factory(spec, self._place(spec))),
            force=force_reload,
            keep=lambda current: not model_path or current.spec == spec,
            estimate=estimate,
        )
        if not loaded:
            return LoadOutcome(entry, entry.load_time_ms, already_loaded=True)
        if model_id not in self.config.models:
            with self._lock:
                self._dynamic[model_id] = spec
        log.info(
            "loaded model %s on %s in %.0f ms (%d bytes)%s",
            model_id,
            entry.model.device.label,
            entry.load_time_ms,
            entry.memory_bytes,
            f", evicted {evicted}" if evicted else "",
        )
        return LoadOutcome(entry, entry.load_time_ms, already_loaded=False, evicted=evicted)

    def unload(self, model_id: str) -> None:
        if not valid_model_id(model_id):
            raise InvalidArgument("model_id: expected 1-128 letters, digits, '.', '_' or '-'")
        self._unload(model_id)

    def preload(self) -> None:
        for model_id, spec in self.config.models.items():
            if spec.preload:
                self.load(model_id)

    # -- use ---------------------------------------------------------------

    def checkout(self, model_id: str) -> tuple[ModelEntry, LoadOutcome | None]:
        """The entry for a request, loading it first if needed (blocking)."""
        return self._checkout(model_id, lambda: self.load(model_id))
