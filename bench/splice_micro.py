"""Spliced JPEG against a full encode, per frame: the measurement behind docs/decisions/0006.

For each frame size and rect size, on one thread (as the compositor runs OpenCV), all in one process and
interleaved round by round so a busy neighbour hits every variant alike:
- ``plain_ms``: ``cv2.imencode`` of the composited frame at the quality (what ``encode_image`` costs today);
- ``copy_paste_plain_ms``: the frame copy, the paste and that encode (today's per-frame path minus the resize);
- ``with_restarts_ms``: ``encode_with_restarts`` of the composited frame (the full encode splicing equals);
- ``splice_ms``: ``splice_composite`` (copy the box, paste into it, encode it, join the bytes);
- ``box_encode_ms``: only the box's ``cv2.imencode`` inside that.
Figures are medians over the runs; rect positions cycle through a fixed random set.

    .venv/bin/python -m bench.splice_micro [--runs 300] [--out bench/results/splice_micro.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from compositing_service.jpeg_splice import (
    SplicedBackground,
    SpliceSettings,
    encode_with_restarts,
    splice_composite,
    tile_box,
)

from .harness import machine_info, write_result

Rect = tuple[int, int, int, int]


def textured(height: int, width: int, seed: int) -> np.ndarray:
    """Gradients plus blurred noise: detail about like a sharp video frame (q75 gives ~1.5 bits per pixel)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (3 * xx + 5 * yy) % 256], axis=-1).astype(np.float32)
    noisy = base + rng.normal(0, 25, (height, width, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noisy, (3, 3), 0), 0, 255).astype(np.uint8)


def rects_of(side: int, height: int, width: int, count: int, seed: int) -> list[Rect]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x1, y1 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        out.append((x1, y1, x1 + side, y1 + side))
    return out


def measure(variants: dict[str, Callable[[int], object]], runs: int) -> dict[str, float]:
    """Median ms of each variant; one call of each per round, so they share the machine's state."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(runs + 20):
        for name, fn in variants.items():
            started = time.perf_counter()
            fn(i)
            if i >= 20:  # warm-up rounds are not counted
                times[name].append((time.perf_counter() - started) * 1000.0)
    return {name: round(statistics.median(t), 4) for name, t in times.items()}


def case(
    frame: np.ndarray, rects: list[Rect], patches: list[np.ndarray], quality: int, tile_width: int, runs: int
) -> dict[str, Any]:
    height, width = frame.shape[:2]
    settings = SpliceSettings(quality, "420", tile_width)
    started = time.perf_counter()
    background = SplicedBackground.from_frame(frame, settings)
    build_ms = (time.perf_counter() - started) * 1000.0
    n = len(rects)
    composited = []
    for rect, patch in zip(rects, patches, strict=True):
        full = frame.copy()
        full[rect[1] : rect[3], rect[0] : rect[2]] = patch
        composited.append(full)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    boxes = []
    for rect, patch in zip(rects, patches, strict=True):
        x0, y0, x1, y1 = tile_box(rect, background)
        box = frame[y0:y1, x0:x1].copy()
        box[rect[1] - y0 : rect[3] - y0, rect[0] - x0 : rect[2] - x0] = patch
        boxes.append(box)
    box_params = settings.encode_params(background.geometry.restart_interval)

    def copy_paste_plain(i: int) -> None:
        x1, y1, x2, y2 = rects[i % n]
        full = frame.copy()
        full[y1:y2, x1:x2] = patches[i % n]
        cv2.imencode(".jpg", full, params)

    variants = {
        "plain_ms": lambda i: cv2.imencode(".jpg", composited[i % n], params),
        "copy_paste_plain_ms": copy_paste_plain,
        "with_restarts_ms": lambda i: encode_with_restarts(composited[i % n], settings),
        "splice_ms": lambda i: splice_composite(background, frame, rects[i % n], patches[i % n]),
        "box_encode_ms": lambda i: cv2.imencode(".jpg", boxes[i % n], box_params),
    }
    # The bytes are checked once before timing anything.
    for i in range(n):
        assert splice_composite(background, frame, rects[i], patches[i]) == encode_with_restarts(
            composited[i], settings
        )
    times = measure(variants, runs)
    plain_bytes = len(cv2.imencode(".jpg", frame, params)[1])
    box_px = statistics.mean((b.shape[0] * b.shape[1]) for b in boxes)
    return {
        **times,
        "splice_over_plain": round(times["splice_ms"] / times["plain_ms"], 3),
        "restart_interval_mcus": background.geometry.restart_interval,
        "tile": f"{background.geometry.tile_width}x{background.geometry.tile_height}",
        "mean_box_share_of_frame": round(box_px / (height * width), 4),
        "plain_bytes": plain_bytes,
        "with_restarts_bytes": len(background.jpeg),
        "restarts_overhead": round(len(background.jpeg) / plain_bytes - 1, 4),
        "background_nbytes": background.nbytes,
        "frame_nbytes": frame.nbytes,
        "build_ms": round(build_ms, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300, help="timed rounds per case (default 300)")
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--out", type=Path, help="also write the JSON here (with a machine block)")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # as the compositor: one frame per thread

    results: dict[str, dict[str, Any]] = {}
    for height, width in [(720, 1280), (1080, 1920)]:
        frame = textured(height, width, 0)
        for side in (210, 320):
            rects = rects_of(side, height, width, 32, side)
            patches = [textured(side, side, 100 + i) for i in range(len(rects))]  # texture like the frame's
            name = f"textured_{width}x{height}_rect{side}"
            results[name] = case(frame, rects, patches, args.quality, 128, args.runs)
    # The tile width trade-off at 720p: narrower tiles re-encode less, but every frame carries more markers.
    frame = textured(720, 1280, 0)
    rects = rects_of(210, 720, 1280, 32, 210)
    patches = [textured(210, 210, 100 + i) for i in range(len(rects))]
    for tile_width in (64, 256):
        name = f"textured_1280x720_rect210_tile{tile_width}"
        results[name] = case(frame, rects, patches, args.quality, tile_width, args.runs)
    # The demo avatar: a flat cartoon, far easier to compress than video, with its own rects (~268 px); the
    # patch is what a later frame has there.
    from demo_models.avatar import crop_rect, draw_frame

    rects = [crop_rect(i) for i in range(32)]
    patches = [draw_frame(i + 7)[y1:y2, x1:x2].copy() for i, (x1, y1, x2, y2) in enumerate(rects)]
    results["demo_avatar_1280x720"] = case(draw_frame(0), rects, patches, args.quality, 128, args.runs)

    result = {"quality": args.quality, "runs": args.runs, "opencv": cv2.__version__, "cases": results}
    if args.out:
        write_result(args.out, result)
    print(json.dumps({"machine": machine_info(), **result}, indent=2))


if __name__ == "__main__":
    main()
