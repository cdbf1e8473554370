"""Per-frame image work of a batch, run in parallel on a thread pool.

OpenCV's resize and JPEG encoder release the GIL, so threads scale on the
cores without the cost of moving frames between processes. OpenCV's own
internal threading is turned off: with a frame per thread it only adds
contention (bench/README.md has the measurement).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from .geometry import Rect, crop_328, encode_image, model_input, paste_back


@dataclass
class Prepared:
    frame: np.ndarray  # the cached background (read-only)
    rect: Rect
    crop328: np.ndarray
    visual: np.ndarray | None  # uint8 [6, 320, 320] when built here
    cache_hit: bool


class Compositor:
    def __init__(self, threads: int, output_format: str, jpeg_quality: int) -> None:
        cv2.setNumThreads(1)
        self.threads = threads or os.cpu_count() or 1
        self.output_format = output_format
        self.jpeg_quality = jpeg_quality
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="composite")

    async def _map(self, fn: Callable, items: Sequence) -> list:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(self._pool, fn, item) for item in items)))

    async def prepare(
        self,
        jobs: Sequence[tuple[Callable[[], tuple[np.ndarray, bool]], Rect]],
        build_visual: bool,
    ) -> list[Prepared]:
        """Fetch each background (cache or disk) and build its 328 crop and, if asked, the model input."""

        def one(job: tuple[Callable[[], tuple[np.ndarray, bool]], Rect]) -> Prepared:
            fetch, rect = job
            frame, hit = fetch()
            crop = crop_328(frame, rect)
            return Prepared(frame, rect, crop, model_input(crop) if build_visual else None, hit)

        return await self._map(one, jobs)

    async def composite(
        self,
        prepared: Sequence[Prepared],
        mouths: np.ndarray,
        output_format: str | None = None,
        jpeg_quality: int | None = None,
    ) -> tuple[list[bytes], float]:
        """Encoded frames in order (the service's format and quality unless given), and the summed encode ms."""
        fmt = output_format or self.output_format
        quality = jpeg_quality or self.jpeg_quality

        def one(i: int) -> tuple[bytes, float]:
            item = prepared[i]
            frame = item.frame.copy()
            paste_back(frame, item.rect, item.crop328, mouths[i])
            started = time.perf_counter()
            data = encode_image(frame, fmt, quality)
            return data, (time.perf_counter() - started) * 1000.0

        results = await self._map(one, range(len(prepared)))
        return [r[0] for r in results], sum(r[1] for r in results)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
