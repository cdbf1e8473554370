"""The work behind every compositing RPC, as a plain class the servicer and tests call."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lipsync_protocol.errors import FailedPrecondition, InvalidArgument
from lipsync_protocol.geometry import DEFAULT as DEFAULT_GEOMETRY
from lipsync_protocol.speech import RawAudio
from lipsync_protocol.tensors import audio_windows, batch_of
from service_common.metrics import ServiceMetrics

from . import __version__
from .avatars import Avatar, AvatarEntry, AvatarRegistry
from .cache import BackgroundCache, CachedFrame
from .compositor import Compositor, Prepared
from .config import CompositingConfig
from .geometry import encode_image, frame_index
from .inference_client import InferenceBackend, ModelInputs, make_backend
from .jpeg_splice import SplicedBackground, SpliceSettings, fit_tile_width

log = logging.getLogger(__name__)

AUDIO_SHAPE = (32, 16, 16)


def check_mouths(mouths: Sequence[np.ndarray], avatar: Avatar, batch_size: int) -> None:
    """The model's outputs fit the avatar's geometry (a 160 model behind a 328 avatar is a config mistake)."""
    expected = avatar.geometry.crop_shape
    found = next((m.shape for m in mouths if m.shape != expected), None)
    if found is not None or len(mouths) != batch_size:
        raise FailedPrecondition(
            f"models.{avatar.model_id}.geometry: the model returned {len(mouths)} mouths of "
            f"{list(found or expected)} but the avatar's geometry {avatar.geometry.name} pastes {batch_size} of "
            f"{list(expected)}; set geometry to the model's family"
        )


@dataclass(kw_only=True)
class CompositeResult:
    frames: list[bytes]
    frame_indices: list[int]
    inference_ms: float
    inference_call_ms: float
    queue_ms: float
    audio_ms: float
    prepare_ms: float
    composite_ms: float
    encode_ms: float
    gpu_id: int
    device: str
    cache_hits: int
    cache_misses: int
    utterance_frames: int = 0
    spliced_frames: int = 0
    total_ms: float = 0.0  # the whole call, set by composite_batch
    model_loaded: bool = False  # whether this call loaded the avatar, and how long that took
    model_load_ms: float = 0.0


class CompositingCore:
    def __init__(
        self,
        config: CompositingConfig,
        backend: InferenceBackend | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics  # every batch (unary or session) is counted here when given
        self.cache = BackgroundCache(config.background_cache_bytes, config.background_cache_frames)
        self.avatars = AvatarRegistry(config, self.cache, metrics)
        self.backend = backend or make_backend(config)
        self.compositor = Compositor(
            config.composite_threads,
            config.output_format,
            config.jpeg_quality,
            splicing=config.jpeg_splicing,
            subsampling=config.jpeg_subsampling,
        )
        self.jpeg_counts: dict[str, list[int]] = {}  # per avatar: [spliced, encoded whole]
        self._tile_widths: weakref.WeakKeyDictionary[Avatar, int] = weakref.WeakKeyDictionary()
        self.version = __version__

    async def start(self) -> None:
        """Open the inference channels, preload avatars, and warm the path up (failures only logged)."""
        await self.backend.start()
        for model_id, spec in self.config.models.items():
            if spec.preload_backgrounds:
                await asyncio.to_thread(self.avatars.load, model_id)
        if self.config.warmup:
            await self.warm_up()

    async def warm_up(self) -> None:
        """One single-frame batch per preloaded avatar, so the first client does not pay for connecting."""
        for entry in self.avatars.entries():
            try:
                await self.composite_batch(
                    entry.avatar.model_id,
                    np.zeros(AUDIO_SHAPE, np.float32),
                    batch_size=1,
                    deadline=time.monotonic() + self.config.inference_timeout_s,
                )
            except Exception as exc:  # the service starts anyway and reports unhealthy inference
                log.warning("warm-up of %s failed: %s", entry.avatar.model_id, exc)

    async def close(self) -> None:
        await self.backend.close()
        self.compositor.close()

    async def _checkout(self, model_id: str) -> tuple[AvatarEntry, float | None]:
        entry = self.avatars.try_checkout(model_id)
        if entry is not None:
            return entry, None
        started = time.perf_counter()
        entry = await asyncio.to_thread(self.avatars.checkout, model_id)
        return entry, (time.perf_counter() - started) * 1000.0

    async def composite_batch(
        self,
        model_id: str,
        audio_features: np.ndarray | None,
        *,
        batch_size: int,
        start_frame_idx: int = 0,
        audio_shape: tuple[int, ...] | list[int] = (),
        visual_frames: np.ndarray | None = None,
        raw_audio: RawAudio | None = None,
        deadline: float | None = None,
        output_format: str | None = None,
        jpeg_quality: int | None = None,
    ) -> CompositeResult:
        """One batch: the avatar's frames from ``start_frame_idx``, their mouths from the inference backend for
        this audio (``visual_frames``: a client's own model inputs, the old way), composited and encoded."""
        started = time.perf_counter()
        batch_size = self._batch_size(batch_size, start_frame_idx, visual_frames)
        audio = self._audio(audio_features, audio_shape, raw_audio, batch_size)
        entry, load_ms = await self._checkout(model_id)
        result: CompositeResult | None = None
        try:
            avatar = entry.avatar
            client_visual = self._client_visual(visual_frames, avatar, batch_size)
            indices = [
                frame_index(start_frame_idx + i, avatar.num_frames, self.config.frame_order) for i in range(batch_size)
            ]
            result = await self._render(avatar, indices, audio, client_visual, deadline, output_format, jpeg_quality)
        finally:
            self.avatars.release(entry, batch_size if result else 0, result.inference_ms if result else 0.0)
        result.total_ms = (time.perf_counter() - started) * 1000.0
        result.model_loaded, result.model_load_ms = load_ms is not None, load_ms or 0.0
        self._report(model_id, batch_size, start_frame_idx, result)
        return result

    async def _render(
        self,
        avatar: Avatar,
        indices: list[int],
        audio: np.ndarray | RawAudio,
        client_visual: np.ndarray | None,
        deadline: float | None,
        output_format: str | None,
        jpeg_quality: int | None,
    ) -> CompositeResult:
        """The frames of ``indices``: backgrounds and their model inputs, the mouths, the composites."""
        started = time.perf_counter()
        prepared = await self._prepare(avatar.model_id, avatar, indices)
        prepare_ms = (time.perf_counter() - started) * 1000.0
        inputs = ModelInputs(
            [p.cached.key for p in prepared], [p.cached.crop for p in prepared], avatar.geometry, client_visual
        )
        call_started = time.perf_counter()
        mouths = await self.backend.infer(avatar.spec.inference_model, inputs, audio, deadline)
        call_ms = (time.perf_counter() - call_started) * 1000.0
        check_mouths(mouths.mouths, avatar, len(indices))
        composite_started = time.perf_counter()
        jpegs, encode_ms, spliced = await self.compositor.composite(
            prepared, mouths.mouths, output_format, jpeg_quality
        )
        if (output_format or self.config.output_format) == "jpeg":
            counts = self.jpeg_counts.setdefault(avatar.model_id, [0, 0])
            counts[0] += spliced
            counts[1] += len(indices) - spliced
        hits = sum(p.cache_hit for p in prepared)
        return CompositeResult(
            frames=jpegs,
            frame_indices=indices,
            inference_ms=mouths.inference_ms,
            inference_call_ms=call_ms,
            queue_ms=mouths.queue_ms,
            audio_ms=mouths.audio_ms,
            prepare_ms=prepare_ms,
            composite_ms=(time.perf_counter() - composite_started) * 1000.0,
            encode_ms=encode_ms,
            gpu_id=mouths.gpu_id,
            device=mouths.device,
            cache_hits=hits,
            cache_misses=len(indices) - hits,
            utterance_frames=mouths.utterance_frames,
            spliced_frames=spliced,
        )

    def _batch_size(self, batch_size: int, start_frame_idx: int, visual_frames: np.ndarray | None) -> int:
        if start_frame_idx < 0:
            raise InvalidArgument(f"start_frame_idx: expected >= 0, got {start_frame_idx}")
        if visual_frames is not None and visual_frames.size and batch_size == 0:
            batch_size = visual_frames.size // int(np.prod(DEFAULT_GEOMETRY.visual_shape))
        if not 1 <= batch_size <= self.config.max_batch_size:
            raise InvalidArgument(
                f"batch_size: expected 1..{self.config.max_batch_size} (server.max_batch_size), got {batch_size}"
            )
        return batch_size

    @staticmethod
    def _audio(
        features: np.ndarray | None, shape: tuple[int, ...] | list[int], raw: RawAudio | None, batch_size: int
    ) -> np.ndarray | RawAudio:
        if features is not None and features.size:
            audio = audio_windows(features.reshape(-1), AUDIO_SHAPE, batch_size, shape)
            return audio if audio.strides[0] else audio[:1].reshape(AUDIO_SHAPE)  # one window stays one on the wire
        if raw is not None:
            raw.check(batch_size)  # fail before touching the cache or the inference service
            return raw
        raise InvalidArgument("audio_features: required (float32 [32,16,16] or [B,32,16,16]), or raw_audio")

    @staticmethod
    def _client_visual(visual_frames: np.ndarray | None, avatar: Avatar, batch_size: int) -> np.ndarray | None:
        if visual_frames is None or not visual_frames.size:
            return None
        return batch_of(visual_frames.reshape(-1), avatar.geometry.visual_shape, batch_size, "visual_frames")

    async def _prepare(self, model_id: str, avatar: Avatar, indices: list[int]) -> list[Prepared]:
        """Each frame's cached background, crop and model input; misses are loaded on the compositor's pool
        (hits are dictionary lookups: no thread for them)."""
        prepared: list[Prepared | None] = []
        for index in indices:
            cached = self.cache.peek(model_id, index)
            if cached is None:
                prepared.append(None)
                continue
            encoder = self._encoder(avatar, index)
            encoded = encoder(cached) if encoder is not None else None
            prepared.append(Prepared(cached, avatar.rect(index), avatar.geometry, True, encoded))
        misses = [k for k, p in enumerate(prepared) if p is None]
        if misses:
            jobs = [
                (self._fetcher(model_id, avatar, i), avatar.rect(i), self._encoder(avatar, i))
                for i in (indices[k] for k in misses)
            ]
            loaded = await self.compositor.prepare(jobs, avatar.geometry)
            for k, item in zip(misses, loaded, strict=True):
                prepared[k] = item
        return prepared  # type: ignore[return-value]

    def _report(self, model_id: str, batch_size: int, start_frame_idx: int, result: CompositeResult) -> None:
        if self.metrics is not None:
            self.metrics.batch_done(
                model_id,
                batch_size,
                {
                    "prepare": result.prepare_ms,
                    "inference_call": result.inference_call_ms,
                    "queue": result.queue_ms,
                    "audio": result.audio_ms,
                    "inference": result.inference_ms,
                    "compositing": result.composite_ms,  # wall: paste-back and encode of the batch, in parallel
                    "encode": result.encode_ms,  # JPEG encoding summed over the frames
                    "total": result.total_ms,
                },
            )
        if self.config.log_inference_times or self.config.log_compositing_times:
            log.info(
                "%s: %d frames from %d: prepare %.1f ms, inference %.1f ms (call %.1f), composite %.1f ms, "
                "total %.1f ms",
                model_id,
                batch_size,
                start_frame_idx,
                result.prepare_ms,
                result.inference_ms,
                result.inference_call_ms,
                result.composite_ms,
                result.total_ms,
            )

    def splice_settings(self, avatar: Avatar, quality: int) -> SpliceSettings:
        """The avatar's splice settings: its tile width is fitted to where its mouths sit, once per avatar."""
        width = self._tile_widths.get(avatar)
        if width is None:
            width = self.config.jpeg_tile_width or fit_tile_width(
                avatar.frame_shape[1], avatar.rects, self.config.jpeg_subsampling
            )
            self._tile_widths[avatar] = width
        return SpliceSettings(quality, self.config.jpeg_subsampling, width)

    def _encoder(self, avatar: Avatar, index: int) -> Callable[[CachedFrame], Callable] | None:
        if not self.config.jpeg_splicing:
            return None

        def for_frame(frame: CachedFrame) -> Callable[[int], SplicedBackground]:
            return lambda quality: self.cache.encoded(
                avatar.model_id, index, frame, self.splice_settings(avatar, quality)
            )

        return for_frame

    def background_image(self, avatar: Avatar, index: int, frame: CachedFrame, fmt: str, quality: int) -> bytes:
        """A background frame as it would be sent with no mouth on it (idle frames of a session): with splicing,
        the cached restart-marker encode itself, which costs nothing once built (blocking)."""
        if fmt == "jpeg" and self.config.jpeg_splicing:
            settings = self.splice_settings(avatar, quality)
            return self.cache.encoded(avatar.model_id, index, frame, settings).jpeg
        return encode_image(frame.frame, fmt, quality, self.config.jpeg_subsampling)

    def background(self, avatar: Avatar, index: int) -> CachedFrame:
        """Frame ``index`` of the avatar from the cache, loaded on a miss (blocking)."""
        return self.cache.get(avatar.model_id, index, avatar.load_frame)

    def _fetcher(self, model_id: str, avatar: Avatar, index: int) -> Callable[[], tuple[CachedFrame, bool]]:
        return lambda: self.cache.fetch(model_id, index, avatar.load_frame)

    # -- management --------------------------------------------------------

    async def load(self, model_id: str, force_reload: bool = False) -> tuple[AvatarEntry, bool, float]:
        started = time.perf_counter()
        entry, loaded = await asyncio.to_thread(self.avatars.load, model_id, force_reload)
        await self.backend.load_model(entry.avatar.spec.inference_model, force_reload)
        return entry, loaded, (time.perf_counter() - started) * 1000.0

    async def unload(self, model_id: str) -> None:
        """Drop the avatar here and its model on the inference side, unless another avatar uses it."""
        spec = self.avatars.spec(model_id)
        await asyncio.to_thread(self.avatars.unload, model_id)
        in_use = {e.avatar.spec.inference_model for e in self.avatars.entries()}
        if spec.inference_model not in in_use:
            await self.backend.unload_model(spec.inference_model)
