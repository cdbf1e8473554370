"""Avatars (background frames + crop rectangles) known to this replica, with LFU eviction.

Everything here is rebuilt from disk by any replica, which is what lets the
compositing service scale out: no request depends on another's state.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from lipsync_protocol.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from lipsync_protocol.geometry import Geometry
from lipsync_protocol.inputs import avatar_scope, input_key
from service_common.config_source import valid_model_id
from service_common.metrics import NullEvents
from service_common.usage import Usage, UsageClock, lfu_order

from .cache import BackgroundCache, CachedFrame
from .config import AvatarConfig, CompositingConfig
from .frames import AvatarError, FrameSource, check_rects, load_rects, open_source

log = logging.getLogger(__name__)


class Avatar:
    """One avatar's frames and rectangles, validated at load."""

    def __init__(self, spec: AvatarConfig, source: FrameSource, rects: np.ndarray) -> None:
        self.spec = spec
        self.source = source
        available = min(source.count, len(rects))
        if spec.num_frames:
            self.num_frames = min(spec.num_frames, available)
            if spec.num_frames > available:
                # The Go server read frames lazily and never checked; its own configs overstate the count.
                log.warning(
                    "avatar %s: models.%s.num_frames is %d but it has %d background frames and %d rects; serving %d",
                    spec.model_id,
                    spec.model_id,
                    spec.num_frames,
                    source.count,
                    len(rects),
                    self.num_frames,
                )
        else:
            if source.count != len(rects):
                raise AvatarError(
                    f"crop_rects_path: {len(rects)} rects for {source.count} background frames; expected one per frame"
                )
            self.num_frames = source.count
        self.rects = rects[: self.num_frames]
        check_rects(self.rects, source.shape, spec.crop_rects_path)
        # Names this avatar's model inputs on the inference hop: anything that changes them changes the scope.
        self.scope = avatar_scope(spec.model_id, source.identity, self.rects.tobytes(), spec.geometry)

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def frame_shape(self) -> tuple[int, int]:
        return self.source.shape

    def rect(self, index: int) -> tuple[int, int, int, int]:
        x1, y1, x2, y2 = (int(v) for v in self.rects[index])
        return x1, y1, x2, y2

    @property
    def geometry(self) -> Geometry:
        return self.spec.geometry

    def read_frame(self, index: int) -> np.ndarray:
        frame = self.source.read(index)
        if frame.shape[:2] != self.frame_shape or frame.ndim != 3 or frame.shape[2] != 3:
            raise AvatarError(f"background frame {index} of {self.model_id} has shape {list(frame.shape)}")
        return frame

    def load_frame(self, index: int) -> CachedFrame:
        """Frame ``index`` with its face crop and model input, as the cache keeps them (blocking)."""
        return CachedFrame.build(self.read_frame(index), self.rect(index), self.geometry, input_key(self.scope, index))


@dataclass
class AvatarEntry(Usage):
    avatar: Avatar
    loaded_unix_ms: int
    load_time_ms: float


def open_avatar(spec: AvatarConfig, config: CompositingConfig) -> Avatar:
    try:
        rects = load_rects(spec.crop_rects_path)
        source = open_source(spec.background, config.frames_cache_dir)
        return Avatar(spec, source, rects)
    except AvatarError as exc:
        raise FailedPrecondition(f"model {spec.model_id}: broken avatar: {exc}") from exc


class AvatarRegistry:
    def __init__(self, config: CompositingConfig, cache: BackgroundCache) -> None:
        self.config = config
        self.cache = cache
        self._entries: dict[str, AvatarEntry] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._usage = UsageClock(self._lock)
        self.evictions = 0
        self.events = NullEvents()  # the server sets its metrics here

    def spec(self, model_id: str) -> AvatarConfig:
        if not valid_model_id(model_id):
            raise InvalidArgument(
                "model_id: expected 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit"
            )
        try:
            return self.config.models[model_id]
        except KeyError:
            raise NotFound(f"model_id: unknown model {model_id!r} (configured: {sorted(self.config.models)})") from None

    def get(self, model_id: str) -> AvatarEntry | None:
        with self._lock:
            return self._entries.get(model_id)

    def entries(self) -> list[AvatarEntry]:
        with self._lock:
            return list(self._entries.values())

    def load(self, model_id: str, force_reload: bool = False) -> tuple[AvatarEntry, bool]:
        """The avatar's entry and whether this call loaded it (blocking: reads files)."""
        spec = self.spec(model_id)
        with self._load_lock:
            current = self.get(model_id)
            if current is not None and not force_reload:
                return current, False
            started = time.perf_counter()
            try:
                avatar = open_avatar(spec, self.config)
                if spec.preload_backgrounds:
                    for index in range(avatar.num_frames)[: self.config.background_cache_frames]:
                        self.cache.get(model_id, index, avatar.load_frame)
            except BaseException:
                self.events.model_load_failed(model_id)
                raise
            load_ms = (time.perf_counter() - started) * 1000.0
            self.events.model_loaded(model_id, load_ms / 1000.0)
            with self._lock:
                others = [e for mid, e in self._entries.items() if mid != model_id]
                excess = len(others) + 1 - self.config.max_models
                victims = lfu_order(others)[: max(excess, 0)]
                if len(victims) < excess:
                    raise ResourceExhausted(
                        f"no room for another avatar: {len(others)} loaded (capacity.max_models="
                        f"{self.config.max_models}) and the others are serving requests; retry later",
                        retry_after_ms=500,
                    )
                for victim in victims:
                    del self._entries[victim.avatar.model_id]
                    self.evictions += 1
                if current is not None:
                    del self._entries[model_id]
                entry = AvatarEntry(avatar, int(time.time() * 1000), load_ms)
                self._entries[model_id] = entry
            for victim in victims:
                self.cache.drop(victim.avatar.model_id)
                self.events.model_evicted(victim.avatar.model_id)
                log.info("evicted avatar %s", victim.avatar.model_id)
            if current is not None:
                self.cache.drop(model_id)
            log.info(
                "loaded avatar %s: %d frames %dx%d in %.0f ms",
                model_id,
                avatar.num_frames,
                avatar.frame_shape[1],
                avatar.frame_shape[0],
                load_ms,
            )
            return entry, True

    def unload(self, model_id: str) -> None:
        self.spec(model_id)
        with self._load_lock:
            with self._lock:
                entry = self._entries.pop(model_id, None)
            if entry is None:
                raise NotFound(f"model_id: avatar {model_id!r} is not loaded")
            self.cache.drop(model_id)

    def checkout(self, model_id: str) -> AvatarEntry:
        """The entry for a request, loading the avatar first if needed (blocking)."""
        for _ in range(3):
            entry = self.try_checkout(model_id)
            if entry is not None:
                return entry
            self.load(model_id)
        raise ResourceExhausted(
            f"model_id: avatar {model_id!r} was evicted while loading; retry later", retry_after_ms=200
        )

    def try_checkout(self, model_id: str) -> AvatarEntry | None:
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is not None:
                entry.in_flight += 1
            return entry

    def release(self, entry: AvatarEntry, frames: int = 0, inference_ms: float = 0.0) -> None:
        self._usage.release(entry, frames, inference_ms)
