"""OpenCV or Pillow for the compositing geometry and JPEG: the measurement behind docs/decisions/0001.

Two questions, on the demo avatar's real frames and crop rectangles:
1. How far is Pillow's bicubic resize from OpenCV's INTER_CUBIC (the reference's)?
2. How long does a 1280x720 JPEG at quality 75 take with each?
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# bench/ is not a package: this lets `common` import however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_models, machine_info, write_result


def best_of(fn, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/image_libs.json"))
    args = parser.parse_args()
    ensure_models(args.models_dir)
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
        import io

        rgb.save(io.BytesIO(), format="JPEG", quality=75)

    cv_ms = best_of(lambda: cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 75]))
    pil_ms = best_of(encode_pil)
    result = {
        "machine": machine_info(),
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
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
