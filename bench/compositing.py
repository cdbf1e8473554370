"""What compositing costs per frame, how the compositor scales on threads, and what the service split costs.

Why: the compositing service pastes a generated mouth into every output frame and JPEG-encodes it. We want to
know (1) how much dearer a composited frame is than a plain JPEG of the same frame, (2) whether the compositor's
thread pool uses both cores, (3) how much throughput the separate inference process costs against running the
engine inside the compositing process (the old system paid 11-13%), and (4) what the wire carries per frame.

What runs, in one run on one machine (each part in its own module):
1. ``geometry`` (bench/geometry.py): the service's own functions on the demo avatar's frames (1280x720) and the
   same frames upscaled to 1920x1080, with mouths from the demo model, against a plain encode in paired blocks.
2. ``threads`` (bench/threads.py): ``Compositor.composite`` on batches of 16 with 1 thread versus 2.
3. ``budget`` (bench/frame_budget.py): each per-frame step of the separated path timed alone, set against what
   the processes used.
4. ``services`` and ``spinning`` (bench/separation.py): separated against in-process with the same client load,
   server CPU per frame with and without the model's own run, the hop's bytes cold and warm, splicing on against
   off, and ORT's spinning per mode.

    .venv/bin/python -m bench.compositing --models-dir models --out bench/results/compositing.json
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from service_common.allocator import tune_malloc

from . import frame_budget, harness, separation
from .avatar import build_avatar, load_avatar
from .geometry import JPEG_QUALITY, bench_geometry
from .harness import log
from .threads import bench_threads

SIZES = {"1280x720": 1.0, "1920x1080": 1.5}
PARTS = ("geometry", "threads", "budget", "services", "spinning")
SUMMARY_KEYS = (
    "separated_vs_in_process",
    "separated_cpu_vs_in_process",
    "server_cpu_ms_per_frame",
    "server_cpu_ms_per_frame_excluding_model",
    "hop_request_bytes_per_frame",
    "hop_response_bytes_per_frame",
    "splicing_on_vs_off",
)


def image_parts(models_dir: Path, parts: set[str], scale: float, result: dict[str, Any]) -> None:
    """geometry, budget and threads, on the avatar at each size in turn (one in memory at a time)."""
    log("avatar: decoding models/avatar/background.mp4 and making demo-model mouths")
    frames, rects = load_avatar(models_dir)
    rounds = max(3, round(9 * scale))
    for label, size_scale in SIZES.items():
        avatar = build_avatar(models_dir, frames, rects, label, size_scale)
        if "geometry" in parts:
            log(f"geometry {label}: {rounds} rounds over {len(avatar.frames)} frames")
            g = result.setdefault("geometry", {})[label] = bench_geometry(avatar, rounds)
            log(f"geometry {label}: composite_ratio {g['composite_ratio']}  {g['ms_per_frame']}")
        if "budget" in parts and label == "1280x720":
            log("budget 1280x720: each per-frame step of the separated path, timed alone")
            result["frame_budget_ms"] = frame_budget.measure(avatar.frames, avatar.rects, avatar.crops, avatar.mouths)
        if "threads" in parts:
            log(f"threads {label}: Compositor.composite batch 16, 1 vs 2 threads")
            t = result.setdefault("threads", {})[label] = bench_threads(avatar, 16, 1.0 * scale, 7)
            log(f"threads {label}: {t['fps_threads_1']} -> {t['fps_threads_2']} fps, ratio {t['ratio_2_vs_1']}")
        del avatar


def account(steps: dict[str, float], demo: dict[str, Any]) -> dict[str, Any]:
    """The steps against what the separated processes used beyond the model: the rest is the machinery."""
    excluding = demo["server_cpu_ms_per_frame_excluding_model"]["separated"]
    counted = sum(v for k, v in steps.items() if "draw the mouth" not in k)  # drawing is inside the floor's step
    return {
        "steps (each alone, one thread)": steps,
        "sum of steps": round(counted, 3),
        "separated, excluding the model (measured)": excluding,
        "the rest: gRPC core and glue, asyncio, thread hand-offs, cold caches": round(excluding - counted, 3),
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for label, g in result.get("geometry", {}).items():
        summary[f"composite_ratio_{label}"] = g["composite_ratio"]
        summary[f"composite_ratio_full_{label}"] = g["composite_ratio_full"]
    for label, t in result.get("threads", {}).items():
        summary[f"compositor_threads_2_vs_1_{label}"] = t["ratio_2_vs_1"]
    for model_id, s in result.get("services", {}).items():
        if isinstance(s, dict) and "separated_vs_in_process" in s:
            summary.update({f"{key}_{model_id}": s[key] for key in SUMMARY_KEYS})
    for mode, by_model in result.get("spinning", {}).items():
        for model_id, s in by_model.items():
            summary[f"spinning_cpu_ms_per_frame_at_{s['offered_fps']}_fps_{mode}_{model_id}"] = {
                v: b["server_cpu_ms_per_frame"] for v, b in s["at_offered_load"].items()
            }
            summary[f"spinning_max_fps_{mode}_{model_id}"] = {v: b["fps"] for v, b in s["max"].items()}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "bench/results/compositing.json")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every timed block's length")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset (spinning needs services)")
    parser.add_argument("--models", default="demo,unet328", help="models for the services part")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := set(models) - set(separation.PLANS):
        parser.error(f"--models: unknown {sorted(unknown)}")
    tune_malloc()  # this process is the client: the allocator settings the services use
    started, machine = time.perf_counter(), harness.machine_info()
    models_dir = args.models_dir.resolve()
    result: dict[str, Any] = {
        "benchmark": "compositing: per-frame composite+encode cost, compositor threads, separated vs in-process",
        "settings": {
            "jpeg_quality": JPEG_QUALITY,
            "opencv_threads": "cv2.setNumThreads(1), as the Compositor sets it",
            "scale": args.scale,
            "models_generated_now": harness.ensure_models(models_dir),
        },
    }
    if parts & {"geometry", "threads", "budget"}:
        image_parts(models_dir, parts, args.scale, result)
    if "services" in parts:
        result["services"] = separation.main_comparison(models_dir, models, args.scale)
    if "spinning" in parts:
        result["spinning"] = separation.spinning(models_dir, models, args.scale)
    if "frame_budget_ms" in result and "demo" in result.get("services", {}):
        result["frame_budget_ms"] = account(result["frame_budget_ms"], result["services"]["demo"])
    result["summary"] = summarize(result)
    harness.finish(args.out.resolve(), result, machine, started)
    log("summary: " + json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
