"""``Compositor.composite`` (the service's class) on batches of frames: 1 thread against 2, alternating blocks.

Why: the compositor's pool is the service's way of using more than one core for the image work; if 2 threads do
not beat 1 on the same batches, the pool is pure overhead. Pairs whose three blocks had the rest of the machine
quiet are reported apart, since a neighbour's load falls on the 2-thread block hardest.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

from compositing_service.cache import BackgroundCache, CachedFrame
from compositing_service.compositor import Compositor, Prepared
from compositing_service.jpeg_splice import SplicedBackground, SpliceSettings, fit_tile_width
from lipsync_protocol.geometry import DEFAULT

from .avatar import Avatar
from .geometry import JPEG_QUALITY
from .harness import Meter, closed_loop, median, paired, throughput

# A pair of blocks counts as quiet when the rest of the machine used at most this much CPU (% of one core) in
# each of its three blocks.
QUIET_OTHER_PCT = 25.0


def batches(avatar: Avatar, batch: int) -> list[tuple[list[Prepared], np.ndarray]]:
    """The avatar in batches, prepared as the service prepares them: frames from a BackgroundCache, spliced."""
    count = len(avatar.frames)
    cache = BackgroundCache(
        sum(f.nbytes + c.nbytes for f, c in zip(avatar.frames, avatar.crops, strict=True)) * 2, count
    )
    frames = [
        cache.get("bench", i, lambda i: CachedFrame(avatar.frames[i], avatar.crops[i], f"bench/{i}"))
        for i in range(count)
    ]
    tile_width = fit_tile_width(avatar.frames[0].shape[1], np.array(avatar.rects))

    def encoder(i: int) -> Callable[[int], SplicedBackground]:
        return lambda quality: cache.encoded("bench", i, frames[i], SpliceSettings(quality, tile_width=tile_width))

    out = []
    for start in range(0, count, batch):
        idx = [(start + j) % count for j in range(batch)]
        prepared = [Prepared(frames[i], avatar.rects[i], DEFAULT, True, encoder(i)) for i in idx]
        out.append((prepared, avatar.mouths[idx]))
    return out


def quiet_ratios(pairs: dict[str, Any]) -> list[float]:
    """The ratios whose block and both neighbours had the rest of the machine under QUIET_OTHER_PCT."""
    blocks = pairs["blocks"]
    return [
        ratio
        for k, ratio in enumerate(pairs["ratios"])
        if all((b["other_cpu_pct"] or 0.0) <= QUIET_OTHER_PCT for b in blocks[2 * k : 2 * k + 3])
    ]


def bench_threads(avatar: Avatar, batch: int, seconds: float, blocks: int) -> dict[str, Any]:
    """Blocks of 1 thread, 2 threads, 1 thread, ... (``blocks`` odd), each over the avatar's batches in turn."""
    compositors = {"1": Compositor(1, "jpeg", JPEG_QUALITY), "2": Compositor(2, "jpeg", JPEG_QUALITY)}
    prepared = batches(avatar, batch)
    cycle = itertools.cycle(prepared)
    loop = asyncio.new_event_loop()
    meter = Meter({"server": None})  # no server: the column stays, empty, as the results have it

    def one(compositor: Compositor) -> None:
        frames, mouths = next(cycle)
        loop.run_until_complete(compositor.composite(frames, mouths))

    def run(threads: str) -> dict[str, Any]:
        start = meter.snapshot()
        stamps = closed_loop(lambda: one(compositors[threads]), seconds).stamps
        return {
            "threads": int(threads),
            "fps": round(throughput(stamps, batch), 2),
            **meter.percent(start, meter.snapshot()),
        }

    try:
        for compositor in compositors.values():
            for _ in range(len(prepared)):
                one(compositor)
        pairs = paired(run, "1", "2", blocks, label=None)
    finally:
        loop.close()
        for compositor in compositors.values():
            compositor.close()
    results = pairs["blocks"]
    quiet = quiet_ratios(pairs)
    return {
        "frame_size": avatar.size,
        "batch": batch,
        "fps_threads_1": round(median([r["fps"] for r in results if r["threads"] == 1]), 2),
        "fps_threads_2": round(median([r["fps"] for r in results if r["threads"] == 2]), 2),
        "ratio_2_vs_1": round(median(pairs["ratios"]), 3),
        "ratio_blocks": [round(r, 3) for r in pairs["ratios"]],
        "ratio_quiet_pairs": round(median(quiet), 3) if quiet else None,
        "quiet_pairs": len(quiet),
        "blocks": results,
    }
