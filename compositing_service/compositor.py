"""Per-frame image work of a batch, run in parallel on a thread pool.

OpenCV's resize and JPEG encoder release the GIL, so threads scale on the
cores without the cost of moving frames between processes. The service turns
OpenCV's own internal threading off when it starts (``opencv_single_threaded``):
with a frame per thread it only adds contention (bench/README.md).

JPEG frames are spliced by default (``output.jpeg_splicing``): only the
restart intervals under the mouth are encoded, between the background's
cached encode (jpeg_splice.py, docs/decisions/0007). The full composited frame
is never built on that path; where splicing cannot apply, the frame is encoded
whole and the reason counted.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np

from lipsync_protocol.geometry import Geometry

from .cache import CachedFrame
from .geometry import Rect, draw_mouth, encode_image
from .jpeg_splice import SplicedBackground, encode_composite

# The background's cached restart-marker encode at a JPEG quality (the avatar fixes sampling and tile width).
EncodedFor = Callable[[int], SplicedBackground]


@dataclass
class Prepared:
    cached: CachedFrame  # the background, its face crop and model input (read-only)
    rect: Rect
    geometry: Geometry
    cache_hit: bool
    # The background's restart-marker encode at a quality (cached with the frame); None: no splicing.
    encoded: EncodedFor | None = None

    @property
    def frame(self) -> np.ndarray:
        return self.cached.frame


@dataclass
class EncodeCounts:
    """JPEG frames spliced or encoded whole, and why whole (a jpeg_splice.FallbackReason value, or 'disabled')."""

    spliced: int = 0
    full: int = 0
    fallbacks: collections.Counter = field(default_factory=collections.Counter)


def opencv_single_threaded() -> None:
    """A process-wide setting, made once by the service's entry point: one frame per pool thread, no OpenCV
    threads of its own beside them."""
    cv2.setNumThreads(1)


def _run_all(fn: Callable, items: Sequence) -> list:
    return [fn(item) for item in items]


class Compositor:
    def __init__(
        self,
        threads: int,
        output_format: str,
        jpeg_quality: int,
        *,
        splicing: bool = True,
        subsampling: str = "420",
    ) -> None:
        self.threads = threads or os.cpu_count() or 1
        self.output_format = output_format
        self.jpeg_quality = jpeg_quality
        self.splicing = splicing
        self.subsampling = subsampling
        self.counts = EncodeCounts()
        self._counts_lock = threading.Lock()
        self._scratch = threading.local()  # per pool thread: the crop being assembled, reused frame after frame
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="composite")

    async def _map(self, fn: Callable, items: Sequence) -> list:
        """``fn`` over ``items`` on the pool, in order: one job per thread, each a contiguous run of items (a job
        per item cost the event loop ~40 us of futures and wake-ups each)."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        count = min(self.threads, len(items))
        bounds = [len(items) * k // count for k in range(count + 1)]
        chunks = [items[bounds[k] : bounds[k + 1]] for k in range(count)]
        done = await asyncio.gather(*(loop.run_in_executor(self._pool, _run_all, fn, chunk) for chunk in chunks))
        return [result for chunk in done for result in chunk]

    async def prepare(
        self,
        jobs: Sequence[tuple[Callable[[], tuple[CachedFrame, bool]], Rect, Callable[[CachedFrame], EncodedFor] | None]],
        geometry: Geometry,
    ) -> list[Prepared]:
        """Fetch each background with its crop and model input (cache, or disk and built once), on the pool: a
        miss reads and decodes a file.

        A job is (fetch, rect, encoder): ``encoder(frame)`` gives the frame's cached restart-marker encodes for
        splicing (None: this frame is encoded whole).
        """

        def one(job: tuple) -> Prepared:
            fetch, rect, encoder = job
            cached, hit = fetch()
            return Prepared(cached, rect, geometry, hit, encoder(cached) if encoder is not None else None)

        return await self._map(one, jobs)

    async def composite(
        self,
        prepared: Sequence[Prepared],
        mouths: Sequence[np.ndarray],
        output_format: str | None = None,
        jpeg_quality: int | None = None,
    ) -> tuple[list[bytes], float, int]:
        """Encoded frames in order (the service's format and quality unless given), the summed encode ms, and
        how many were spliced."""
        fmt = output_format or self.output_format
        quality = jpeg_quality or self.jpeg_quality
        quality_for_splice = quality if fmt == "jpeg" and self.splicing else None

        def one(i: int) -> tuple[bytes, float, str | None]:
            item = prepared[i]
            scratch = self._scratch_for(item.cached.crop)

            def draw(dst: np.ndarray) -> None:  # straight into the box: no patch array, no full frame
                draw_mouth(dst, item.cached.crop, mouths[i], item.geometry, scratch)

            if quality_for_splice is not None and item.encoded is not None:
                started = time.perf_counter()
                data, reason = encode_composite(item.encoded(quality_for_splice), item.frame, item.rect, draw)
                return data, (time.perf_counter() - started) * 1000.0, reason.value if reason else None
            frame = item.frame.copy()
            x1, y1, x2, y2 = item.rect
            draw(frame[y1:y2, x1:x2])
            started = time.perf_counter()
            data = encode_image(frame, fmt, quality, self.subsampling)
            return data, (time.perf_counter() - started) * 1000.0, "disabled"

        results = await self._map(one, range(len(prepared)))
        spliced = sum(1 for r in results if r[2] is None)
        if fmt == "jpeg":
            with self._counts_lock:
                self.counts.spliced += spliced
                self.counts.full += len(results) - spliced
                self.counts.fallbacks.update(r[2] for r in results if r[2] is not None)
        return [r[0] for r in results], sum(r[1] for r in results), spliced

    def _scratch_for(self, crop: np.ndarray) -> np.ndarray:
        found = getattr(self._scratch, "buffer", None)
        if found is None or found.shape != crop.shape:
            found = self._scratch.buffer = np.empty_like(crop)
        return found

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
