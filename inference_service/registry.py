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
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lipsync_protocol.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from service_common.config_source import valid_model_id
from service_common.metrics import NullEvents
from service_common.usage import Usage, UsageClock, lfu_order

from .config import InferenceConfig, ModelConfig
from .devices import Device
from .engine import LipSyncModel

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
ENCODER_FILE = "audio_encoder.onnx"


GPU_MEMORY_FRACTION = 0.9  # of a GPU's memory that models may be placed into (the rest: activations, arenas)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class ModelEntry(Usage):
    spec: ModelConfig
    model: LipSyncModel
    loaded_unix_ms: int
    load_time_ms: float
    resident: bool = True

    @property
    def model_id(self) -> str:
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


class ModelRegistry:
    def __init__(
        self,
        config: InferenceConfig,
        devices: list[Device],
        model_factory: ModelFactory | None = None,
    ) -> None:
        self.config = config
        self.devices = devices
        self._factory = model_factory or self._default_factory
        self._entries: dict[str, ModelEntry] = {}
        self._dynamic: dict[str, ModelConfig] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._round_robin = itertools.count()
        self._usage = UsageClock(self._lock)
        self._frames: Counter[str] = Counter()  # device label -> frames of requests run or queued there
        self._dedicated = self._dedicated_gpus()
        self.evictions = 0
        self.events = NullEvents()  # the server sets its metrics here

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
            return ModelConfig(model_id, path, own or self.config.audio_encoder_path)
        if model_id in self.config.models:
            return self.config.models[model_id]
        if model_id in self._dynamic:
            return self._dynamic[model_id]
        # Convention: models_root/<id>/model.onnx, for models added after start.
        folder = self.inside_root(model_id, "model_id")
        if (folder / MODEL_FILE).is_file():
            encoder = folder / ENCODER_FILE
            own = encoder if encoder.is_file() else None
            return ModelConfig(model_id, folder / MODEL_FILE, own or self.config.audio_encoder_path)
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

    def _victims(self, new_bytes: int, replacing: str | None) -> list[ModelEntry]:
        """LFU-ordered idle models to evict so that one more of ``new_bytes`` fits (lock held)."""
        others = [e for mid, e in self._entries.items() if mid != replacing]
        count = len(others)
        memory = sum(e.memory_bytes for e in others)
        max_memory = self.config.max_memory_bytes

        def fits() -> bool:
            return count + 1 <= self.config.max_models and (not max_memory or memory + new_bytes <= max_memory)

        if max_memory and new_bytes > max_memory:
            raise ResourceExhausted(
                f"model needs {new_bytes} bytes, more than capacity.max_memory_gb allows ({max_memory} bytes)"
            )
        victims: list[ModelEntry] = []
        for entry in lfu_order(others):
            if fits():
                break
            victims.append(entry)
            count -= 1
            memory -= entry.memory_bytes
        if not fits():
            raise ResourceExhausted(
                f"no room for another model: {len(others)} loaded (capacity.max_models={self.config.max_models}) "
                "and every candidate for eviction is serving requests; retry later",
                retry_after_ms=500,
            )
        return victims

    # -- load / unload -----------------------------------------------------

    def load(self, model_id: str, force_reload: bool = False, model_path: str = "") -> LoadOutcome:
        spec = self.spec_for(model_id, model_path)
        with self._load_lock:
            with self._lock:
                current = self._entries.get(model_id)
                if current is not None and not force_reload and (not model_path or current.spec == spec):
                    return LoadOutcome(current, current.load_time_ms, already_loaded=True)
                estimate = spec.model_path.stat().st_size if spec.model_path.is_file() else 0
                self._victims(estimate, replacing=model_id)  # fail fast before the heavy part
            device = self._place(spec)
            started = time.perf_counter()
            try:
                model = self._factory(spec, device)
            except BaseException:
                self.events.model_load_failed(model_id)
                raise
            load_ms = (time.perf_counter() - started) * 1000.0
            self.events.model_loaded(model_id, load_ms / 1000.0)
            with self._lock:
                victims = self._victims(model.memory_bytes, replacing=model_id)
                for victim in victims:
                    self._evict(victim)
                previous = self._entries.get(model_id)
                if previous is not None:
                    previous.resident = False
                entry = ModelEntry(spec, model, now_ms(), load_ms)
                self._entries[model_id] = entry
                if model_id not in self.config.models:
                    self._dynamic[model_id] = spec
            log.info(
                "loaded model %s on %s in %.0f ms (%d bytes)%s",
                model_id,
                device.label,
                load_ms,
                model.memory_bytes,
                f", evicted {[v.model_id for v in victims]}" if victims else "",
            )
            return LoadOutcome(entry, load_ms, already_loaded=False, evicted=[v.model_id for v in victims])

    def _evict(self, entry: ModelEntry) -> None:
        del self._entries[entry.model_id]
        entry.resident = False
        self.evictions += 1
        self.events.model_evicted(entry.model_id)
        log.info("evicted model %s (usage %d)", entry.model_id, entry.usage_count)

    def unload(self, model_id: str) -> None:
        if not valid_model_id(model_id):
            raise InvalidArgument("model_id: expected 1-128 letters, digits, '.', '_' or '-'")
        with self._load_lock, self._lock:
            entry = self._entries.pop(model_id, None)
            if entry is None:
                raise NotFound(f"model_id: model {model_id!r} is not loaded")
            entry.resident = False
        log.info("unloaded model %s", model_id)

    def preload(self) -> None:
        for model_id, spec in self.config.models.items():
            if spec.preload:
                self.load(model_id)

    # -- use ---------------------------------------------------------------

    def try_checkout(self, model_id: str) -> ModelEntry | None:
        """Non-blocking: the loaded entry with its in-flight count raised, or None."""
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is not None:
                entry.in_flight += 1
            return entry

    def checkout(self, model_id: str) -> tuple[ModelEntry, LoadOutcome | None]:
        """The entry for a request, loading it first if needed (blocking)."""
        outcome = None
        for _ in range(3):
            entry = self.try_checkout(model_id)
            if entry is not None:
                return entry, outcome
            outcome = self.load(model_id)
        raise ResourceExhausted(
            f"model_id: model {model_id!r} was evicted while loading; retry later", retry_after_ms=200
        )

    def release(self, entry: ModelEntry, frames: int = 0, inference_ms: float = 0.0) -> None:
        self._usage.release(entry, frames, inference_ms)

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def get(self, model_id: str) -> ModelEntry | None:
        with self._lock:
            return self._entries.get(model_id)
