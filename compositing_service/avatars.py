"""Avatars (background frames + crop rectangles) known to this replica, with LFU eviction.

Everything here is rebuilt from disk by any replica, which is what lets the
compositing service scale out: no request depends on another's state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from lipsync_protocol.errors import FailedPrecondition, InvalidArgument, NotFound
from lipsync_protocol.geometry import Geometry
from lipsync_protocol.inputs import avatar_scope, input_key
from service_common.config_source import valid_model_id
from service_common.registry import LfuRegistry, Loaded, RegistryEvents

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


@dataclass(kw_only=True)
class AvatarEntry(Loaded):
    avatar: Avatar

    @property
    def key(self) -> str:
        return self.avatar.model_id


def open_avatar(spec: AvatarConfig, config: CompositingConfig) -> Avatar:
    try:
        rects = load_rects(spec.crop_rects_path)
        source = open_source(spec.background, config.frames_cache_dir)
        return Avatar(spec, source, rects)
    except AvatarError as exc:
        raise FailedPrecondition(f"model {spec.model_id}: broken avatar: {exc}") from exc


class AvatarRegistry(LfuRegistry[AvatarEntry]):
    """This replica's avatars; their frames live in the background cache and leave it with them."""

    noun = "avatar"

    def __init__(self, config: CompositingConfig, cache: BackgroundCache, events: RegistryEvents | None = None) -> None:
        super().__init__(events)
        self.config = config
        self.cache = cache
        self.limit = f"capacity.max_models={config.max_models}"

    def spec(self, model_id: str) -> AvatarConfig:
        if not valid_model_id(model_id):
            raise InvalidArgument(
                "model_id: expected 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit"
            )
        try:
            return self.config.models[model_id]
        except KeyError:
            raise NotFound(f"model_id: unknown model {model_id!r} (configured: {sorted(self.config.models)})") from None

    def load(self, model_id: str, force_reload: bool = False) -> tuple[AvatarEntry, bool]:
        """The avatar's entry and whether this call loaded it (blocking: reads files)."""
        spec = self.spec(model_id)
        if force_reload:
            self.cache.drop(model_id)  # the files may have changed: preloading must not find the old frames
        entry, loaded, _ = self._load(model_id, lambda: self._open(spec), force=force_reload)
        if loaded:
            avatar = entry.avatar
            log.info(
                "loaded avatar %s: %d frames %dx%d in %.0f ms",
                model_id,
                avatar.num_frames,
                avatar.frame_shape[1],
                avatar.frame_shape[0],
                entry.load_time_ms,
            )
        return entry, loaded

    def _open(self, spec: AvatarConfig) -> AvatarEntry:
        avatar = open_avatar(spec, self.config)
        if spec.preload_backgrounds:
            for index in range(avatar.num_frames)[: self.config.background_cache_frames]:
                self.cache.get(spec.model_id, index, avatar.load_frame)
        return AvatarEntry(avatar=avatar)

    def _fits(self, remaining: list[AvatarEntry], new_size: int) -> bool:
        return len(remaining) + 1 <= self.config.max_models

    def _removed(self, entry: AvatarEntry, evicted: bool) -> None:
        if self.get(entry.key) is None:  # evicted or unloaded; a reload dropped them before reading its own
            self.cache.drop(entry.key)

    def unload(self, model_id: str) -> None:
        self.spec(model_id)
        self._unload(model_id)

    def checkout(self, model_id: str) -> AvatarEntry:
        """The entry for a request, loading the avatar first if needed (blocking)."""
        return self._checkout(model_id, lambda: self.load(model_id))[0]
