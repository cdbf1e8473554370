"""Per-frame image work of the compositing service, one thread, against a plain JPEG encode of the same frame.

Why: compositing a mouth into every output frame must cost well under a plain encode of the frame (issue 9's
target: 0.25), and each part (crop, paste, encode, splice) must be visible to know what to work on. Every op is
the service's own function (compositing_service/geometry.py, jpeg_splice.py) as compositor.py calls it, over every
frame of the avatar; rounds of all ops sit between plain-encode blocks, and each op's ratio is its ms over the
geometric mean of the plain blocks around its round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from compositing_service.geometry import INNER, crop_face, draw_mouth, encode_image, model_input, paste_back
from compositing_service.jpeg_splice import (
    SplicedBackground,
    SpliceSettings,
    encode_composite,
    encode_with_restarts,
    fit_tile_width,
)
from lipsync_protocol.geometry import DEFAULT

from .avatar import Avatar
from .harness import Meter, median, neighbour_ratios

JPEG_QUALITY = 75
Op = Callable[[int], Any]


def _copy_paste(avatar: Avatar, i: int) -> np.ndarray:
    out = avatar.frames[i].copy()
    paste_back(out, avatar.rects[i], avatar.crops[i], avatar.mouths[i])
    return out


def _spliced_op(avatar: Avatar, settings: SpliceSettings) -> Op:
    """The default path: the mouth drawn into the box of restart intervals, encoded, spliced into the background's
    cached encode (built once per frame and quality, not timed here)."""
    backgrounds = [SplicedBackground.from_frame(f, settings) for f in avatar.frames]
    scratch = np.empty_like(avatar.crops[0])  # the compositor's per-thread buffer: the cached crop is never written

    def spliced(i: int) -> Any:
        def draw(dst: np.ndarray) -> None:
            draw_mouth(dst, avatar.crops[i], avatar.mouths[i], DEFAULT, scratch)

        data, reason = encode_composite(backgrounds[i], avatar.frames[i], avatar.rects[i], draw)
        assert reason is None, reason
        return data

    return spliced


def geometry_ops(avatar: Avatar) -> dict[str, Op]:
    """One call = one frame, each exactly as the compositing service does it (compositor.py)."""
    encode_params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    composited = [_copy_paste(avatar, i) for i in range(len(avatar.frames))]
    # The tile width the service fits to the avatar's rectangles.
    settings = SpliceSettings(JPEG_QUALITY, tile_width=fit_tile_width(avatar.frames[0].shape[1], avatar.rects))

    def copy_paste_merge(i: int) -> Any:
        out = avatar.frames[i].copy()
        paste_back_merge(out, avatar.rects[i], avatar.crops[i], avatar.mouths[i])
        return out

    return {
        "plain_encode": lambda i: cv2.imencode(".jpg", avatar.frames[i], encode_params),
        "copy_paste": lambda i: _copy_paste(avatar, i),
        "encode": lambda i: encode_image(composited[i], "jpeg", JPEG_QUALITY),
        "total": lambda i: encode_image(_copy_paste(avatar, i), "jpeg", JPEG_QUALITY),
        "spliced": _spliced_op(avatar, settings),
        "full_restarts": lambda i: encode_with_restarts(composited[i], settings),
        "crop_build": lambda i: model_input(crop_face(avatar.frames[i], avatar.rects[i])),
        "copy_paste_cv2_merge": copy_paste_merge,
    }


def paste_back_merge(
    frame: np.ndarray, rect: tuple[int, int, int, int], crop328: np.ndarray, mouth: np.ndarray
) -> None:
    """A candidate for geometry.paste_back (not used by the service): the same pixels, but the mouth's CHW -> HWC
    conversion by cv2.merge instead of numpy's strided ``mouth.transpose(1, 2, 0)`` assignment."""
    x1, y1, x2, y2 = rect
    crop = crop328.copy()
    crop[INNER, INNER] = cv2.merge((mouth[0], mouth[1], mouth[2]))
    frame[y1:y2, x1:x2] = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)


def merge_candidate_identical(avatar: Avatar) -> bool:
    for i, frame in enumerate(avatar.frames):
        b = frame.copy()
        paste_back_merge(b, avatar.rects[i], avatar.crops[i], avatar.mouths[i])
        if not np.array_equal(_copy_paste(avatar, i), b):
            return False
    return True


def time_block(fn: Op, count: int) -> float:
    """ms per frame over one pass through every frame of the avatar."""
    started = time.perf_counter()
    for i in range(count):
        fn(i)
    return (time.perf_counter() - started) * 1000.0 / count


def measure_rounds(ops: dict[str, Op], count: int, rounds: int) -> tuple[dict[str, list[float]], list[dict]]:
    """ms per frame of every op, round by round (plain first in each), one more plain block last; CPU per round."""
    for fn in ops.values():  # warm-up: one pass of each
        time_block(fn, count)
    meter = Meter({"server": None})  # no server: the column stays, empty, as the results have it
    blocks: dict[str, list[float]] = {k: [] for k in ops}
    usage = []
    for _ in range(rounds):
        start = meter.snapshot()
        for name, fn in ops.items():
            blocks[name].append(time_block(fn, count))
        usage.append(Meter.percent(start, meter.snapshot()))
    blocks["plain_encode"].append(time_block(ops["plain_encode"], count))
    return blocks, usage


def bench_geometry(avatar: Avatar, rounds: int) -> dict[str, Any]:
    """Rounds of every op between plain encodes; each op's ratio to the plain blocks around its round."""
    cv2.setNumThreads(1)  # as the Compositor sets it: one frame per thread, no OpenCV-internal threads
    ops = geometry_ops(avatar)
    count = len(avatar.frames)
    blocks, usage = measure_rounds(ops, count, rounds)
    ms = {name: round(median(values), 3) for name, values in blocks.items()}

    def ratio(name: str) -> list[float]:
        return neighbour_ratios(blocks["plain_encode"], blocks[name])

    def sizes(op: str) -> float:
        return round(float(np.mean([len(ops[op](i)[1] if op == "plain_encode" else ops[op](i)) for i in range(count)])))

    merge_vs_current = [a / b for a, b in zip(blocks["copy_paste_cv2_merge"], blocks["copy_paste"], strict=False)]
    return {
        "frame_size": avatar.size,
        "frames_per_block": count,
        "rounds": rounds,
        "ms_per_frame": {
            "plain_encode (cv2.imencode q75, baseline)": ms["plain_encode"],
            "copy_paste (frame.copy + paste_back)": ms["copy_paste"],
            "encode (encode_image of the composited frame)": ms["encode"],
            "total (copy + paste_back + encode)": ms["total"],
            "spliced (draw_mouth into the box + encode_composite on the cached background encode)": ms["spliced"],
            "full_restarts (encode_with_restarts of the composited frame: what spliced equals)": ms["full_restarts"],
            "crop_build (crop_face + model_input)": ms["crop_build"],
        },
        "splice_tile_width": fit_tile_width(avatar.frames[0].shape[1], avatar.rects),
        "spliced_identical_to_full_restart_encode": all(
            ops["spliced"](i) == ops["full_restarts"](i) for i in range(count)
        ),
        "candidate_paste_back_cv2_merge": {
            "copy_paste_ms_per_frame": ms["copy_paste_cv2_merge"],
            "vs_current_copy_paste": round(median(merge_vs_current), 3),
            "frames_identical_to_paste_back": merge_candidate_identical(avatar),
        },
        "composite_ratio": round(median(ratio("spliced")), 3),
        "composite_ratio_blocks": [round(r, 3) for r in ratio("spliced")],
        "composite_ratio_full": round(median(ratio("total")), 3),
        "composite_ratio_full_blocks": [round(r, 3) for r in ratio("total")],
        "encode_ratio": round(median(ratio("encode")), 3),
        "copy_paste_ratio": round(median(ratio("copy_paste")), 3),
        "crop_build_ratio": round(median(ratio("crop_build")), 3),
        "per_frame_all_image_work_ms": round(ms["spliced"] + ms["crop_build"], 3),
        "per_frame_all_image_work_ms_full": round(ms["total"] + ms["crop_build"], 3),
        "jpeg_bytes_mean": {
            "plain": sizes("plain_encode"),
            "composited": sizes("total"),
            "spliced (restart markers every tile)": sizes("spliced"),
        },
        "blocks_ms_per_frame": {k: [round(v, 3) for v in vs] for k, vs in blocks.items()},
        "cpu_per_round": usage,
    }
