"""The LRU cache of background frames, bounded in bytes overall and in frames per avatar.

One cachetools.LRUCache sized in bytes holds every avatar's frames; a
per-avatar recency list enforces ``capacity.background_cache_frames``. A miss
is loaded once however many requests want the frame at the same time: the
first loads it, the others wait for its result.

A cached frame carries what is deterministic about it: its face crop (the paste-back's border, and the source
of its model input, which the inference hop sends once and then names by key), made when the frame is loaded
and counted in the byte bound with it (12% more at 720p).

Beside each frame it keeps the frame's restart-marker JPEG encodes that spliced
encoding reuses (compositing_service/jpeg_splice.py), one per quality and
subsampling in use; they leave with the frame. They are about 1-7% of the raw
frame's bytes and are counted apart (``encoded_bytes``), not in the byte bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import cachetools
import numpy as np

from lipsync_protocol.geometry import DEFAULT, Geometry

from .geometry import Rect, crop_face
from .jpeg_splice import SplicedBackground, SpliceSettings

Key = tuple[str, int]


@dataclass(frozen=True)
class CachedFrame:
    """A background frame and what is derived from it alone, all read-only (shared by every request)."""

    frame: np.ndarray  # BGR [H, W, 3]
    crop: np.ndarray  # the face rectangle at the family's crop size, [S, S, 3]
    key: str  # names the model input made from ``crop`` on the inference hop (lipsync_protocol.inputs)

    def __post_init__(self) -> None:
        for array in (self.frame, self.crop):
            array.flags.writeable = False

    @property
    def nbytes(self) -> int:
        return self.frame.nbytes + self.crop.nbytes

    @classmethod
    def build(cls, frame: np.ndarray, rect: Rect, geometry: Geometry = DEFAULT, key: str = "") -> CachedFrame:
        return cls(frame, crop_face(frame, rect, geometry), key)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    frames: int = 0
    bytes: int = 0
    encoded_bytes: int = 0  # the frames' cached restart-marker encodes (spliced JPEG)


class _BytesLRU(cachetools.LRUCache):
    """An LRUCache that tells its owner what it evicts to make room."""

    def __init__(self, maxsize: int, on_evict: Callable[[Key, CachedFrame], None]) -> None:
        super().__init__(maxsize=maxsize, getsizeof=lambda frame: frame.nbytes)
        self._on_evict = on_evict

    def popitem(self) -> tuple[Key, CachedFrame]:
        key, value = super().popitem()
        self._on_evict(key, value)
        return key, value


class BackgroundCache:
    def __init__(self, max_bytes: int, max_frames_per_model: int) -> None:
        self.max_bytes = max_bytes
        self.max_frames_per_model = max_frames_per_model
        self._lock = threading.Lock()
        self._frames = _BytesLRU(max_bytes, self._evicted)
        self._recency: dict[str, OrderedDict[int, None]] = {}
        self._loading: dict[Key, Future] = {}
        self._stats: dict[str, CacheStats] = {}
        self._encoded: dict[Key, dict[SpliceSettings, SplicedBackground]] = {}

    def _evicted(self, key: Key, frame: CachedFrame) -> None:
        model_id, index = key
        self._recency[model_id].pop(index, None)
        stats = self._stats[model_id]
        stats.evictions += 1
        stats.frames -= 1
        stats.bytes -= frame.nbytes
        for encoded in self._encoded.pop(key, {}).values():
            stats.encoded_bytes -= encoded.nbytes

    def stats(self, model_id: str) -> CacheStats:
        with self._lock:
            return CacheStats(**vars(self._stats.get(model_id, CacheStats())))

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return int(self._frames.currsize)

    def get(self, model_id: str, index: int, load: Callable[[int], CachedFrame]) -> CachedFrame:
        return self.fetch(model_id, index, load)[0]

    def peek(self, model_id: str, index: int) -> CachedFrame | None:
        """The cached frame, counted as a hit, or None (not counted: the caller fetches it next)."""
        key = (model_id, index)
        with self._lock:
            frame = self._frames.get(key)
            if frame is not None:
                self._stats.setdefault(model_id, CacheStats()).hits += 1
                self._recency[model_id].move_to_end(index)
            return frame

    def fetch(self, model_id: str, index: int, load: Callable[[int], CachedFrame]) -> tuple[CachedFrame, bool]:
        """Frame ``index`` of ``model_id`` and whether it was a hit; ``load(index)`` runs once per miss (blocking)."""
        key = (model_id, index)
        with self._lock:
            stats = self._stats.setdefault(model_id, CacheStats())
            frame = self._frames.get(key)
            if frame is not None:
                stats.hits += 1
                self._recency[model_id].move_to_end(index)
                return frame, True
            stats.misses += 1
            pending = self._loading.get(key)
            owner = pending is None
            if owner:
                pending = self._loading[key] = Future()
        if not owner:
            return pending.result(), False
        try:
            frame = load(index)
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
            self._insert(model_id, index, frame)
        pending.set_result(frame)
        return frame, False

    def _insert(self, model_id: str, index: int, frame: CachedFrame) -> None:
        stats = self._stats.setdefault(model_id, CacheStats())
        recency = self._recency.setdefault(model_id, OrderedDict())
        if frame.nbytes > self.max_bytes:
            return  # larger than the whole cache: served, not kept
        if len(recency) >= self.max_frames_per_model:
            oldest = next(iter(recency))
            self._evicted((model_id, oldest), self._frames.pop((model_id, oldest)))
        self._frames[(model_id, index)] = frame
        recency[index] = None
        stats.loads += 1
        stats.frames += 1
        stats.bytes += frame.nbytes

    def encoded(self, model_id: str, index: int, frame: CachedFrame, settings: SpliceSettings) -> SplicedBackground:
        """The restart-marker encode of cached frame ``index`` with ``settings``, built on first use (blocking).

        Kept only while the frame itself is cached; a frame that is not (larger than the cache) is encoded
        each time, which costs what a plain full encode does.
        """
        key = (model_id, index)
        with self._lock:
            found = self._encoded.get(key, {}).get(settings)
        if found is not None:
            return found
        built = SplicedBackground.from_frame(frame.frame, settings)
        with self._lock:
            if self._frames.get(key) is not frame:
                return built  # evicted (or replaced) meanwhile: do not keep an encode without its frame
            per_frame = self._encoded.setdefault(key, {})
            if settings not in per_frame:
                per_frame[settings] = built
                self._stats[model_id].encoded_bytes += built.nbytes
            return per_frame[settings]

    def drop(self, model_id: str) -> None:
        """Forget every frame of an avatar (it was unloaded or evicted)."""
        with self._lock:
            for index in list(self._recency.get(model_id, ())):
                frame = self._frames.pop((model_id, index))
                self._evicted((model_id, index), frame)
            self._recency.pop(model_id, None)
            self._stats.pop(model_id, None)

    def cached_indices(self, model_id: str) -> list[int]:
        with self._lock:
            return list(self._recency.get(model_id, ()))
