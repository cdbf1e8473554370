"""OpenCV or Pillow for the compositing geometry and JPEG: the measurement behind docs/decisions/0001.

Two questions, on the demo avatar's real frames and crop rectangles:
1. How far is Pillow's bicubic resize from OpenCV's INTER_CUBIC (the reference's)?
2. How long does a 1280x720 JPEG at quality 75 take with each?

    .venv/bin/python -m bench.image_libs --models-dir models --out bench/results/image_libs.json
"""

from __future__ import annotations

import io
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from PIL import Image

from . import harness


def best_of(fn: Callable[[], Any], repeats: int = 30) -> float:
    """Median ms of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = harness.parser(__doc__, "bench/results/image_libs.json").parse_args(argv)
    machine = harness.machine_info()
    harness.ensure_models(args.models_dir)
    import av

    rects = json.loads((args.models_dir / "avatar" / "crop_rects.json").read_text())
    with av.open(str(args.models_dir / "avatar" / "background.mp4")) as container:
        frames = [f.to_ndarray(format="bgr24") for _, f in zip(range(10), container.decode(video=0), strict=False)]
    diffs = []
    for frame, (x1, y1, x2, y2) in zip(frames, rects, strict=False):
        crop = frame[y1:y2, x1:x2]
        ocv = cv2.resize(crop, (328, 328), interpolation=cv2.INTER_CUBIC)
        pil = np.asarray(Image.fromarray(crop[:, :, ::-1]).resize((328, 328), Image.BICUBIC))[:, :, ::-1]
        diffs.append(np.abs(ocv.astype(int) - pil.astype(int)))
    stacked = np.stack(diffs)
    frame = frames[0]
    rgb = Image.fromarray(frame[:, :, ::-1].copy())

    def encode_pil() -> None:
        rgb.save(io.BytesIO(), format="JPEG", quality=75)

    cv_ms = best_of(lambda: cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 75]))
    pil_ms = best_of(encode_pil)
    result = {
        "resize_328_pillow_vs_opencv": {
            "max_abs_diff_levels": int(stacked.max()),
            "mean_abs_diff_levels": round(float(stacked.mean()), 3),
            "share_of_values_off_by_more_than_1": round(float((stacked > 1).mean()), 4),
        },
        "jpeg_1280x720_q75_ms": {
            "opencv": round(cv_ms, 3),
            "pillow": round(pil_ms, 3),
            "pillow_over_opencv": round(pil_ms / cv_ms, 3),
        },
    }
    harness.write_result(args.out, result, machine)
    print(json.dumps({"machine": machine, **result}, indent=2))


if __name__ == "__main__":
    main()
