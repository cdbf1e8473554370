"""What compositing costs per frame, how the compositor scales on threads, and what the service split costs.

Why: the compositing service pastes a generated mouth into every output frame and JPEG-encodes it. We want to
know (1) how much dearer a composited frame is than a plain JPEG of the same frame, (2) whether the compositor's
thread pool uses both cores, (3) how much throughput the separate inference process costs against running the
engine inside the compositing process (the old system paid 11-13%), and (4) what the wire carries per frame.

What runs, in one run on one machine:
1. ``geometry``: the service's own functions (compositing_service/geometry.py, jpeg_splice.py) on the demo
   avatar's frames (1280x720, decoded with PyAV) and the same frames upscaled to 1920x1080, with mouths from the
   demo model. Plain-encode blocks alternate with the composite blocks; ratios are medians of paired blocks.
   ``composite_ratio`` is the service's default path (spliced JPEG: the patch, then only the tiles under it
   encoded and spliced into the background's cached encode); ``composite_ratio_full`` the full-frame path
   (copy, paste back, encode the whole frame) that ``output.jpeg_splicing: false`` keeps.
2. ``threads``: ``Compositor.composite`` on batches of 16 with 1 thread versus 2, alternating blocks.
3. ``services`` and ``spinning`` (bench/separation.py): separated against in-process with the same client load,
   server CPU per frame with and without the model's own run, the hop's bytes cold and warm, splicing on against
   off, and ORT's spinning per mode.

    .venv/bin/python -m bench.bench_compositing --models-dir models --out bench/results/compositing.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from compositing_service.cache import BackgroundCache, CachedFrame
from compositing_service.compositor import Compositor, Prepared
from compositing_service.geometry import INNER, crop_face, draw_mouth, encode_image, model_input, paste_back
from compositing_service.jpeg_splice import (
    SplicedBackground,
    SpliceSettings,
    encode_composite,
    encode_with_restarts,
    fit_tile_width,
)
from lipsync_protocol.geometry import DEFAULT
from service_common.allocator import tune_malloc

# bench/ is not a package: this lets `common` import however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from bench import frame_budget, separation

JPEG_QUALITY = 75
AUDIO_SHAPE = (32, 16, 16)
VISUAL_SHAPE = (6, 320, 320)
MOUTH_SHAPE = (3, 320, 320)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]
SIZES = {"1280x720": 1.0, "1920x1080": 1.5}
TIMING_FIELDS = (
    "inference_time_ms",
    "inference_call_ms",
    "queue_time_ms",
    "prepare_time_ms",
    "composite_time_ms",
    "total_time_ms",
)
ORT_THREADS = 2
# A pair of blocks counts as quiet when the rest of the machine used at most this much CPU (% of one core) in
# each of its three blocks.
QUIET_OTHER_PCT = 25.0


@dataclass(frozen=True)
class ServicePlan:
    batch: int
    block_seconds: float
    blocks: int  # odd: in_process, separated, in_process, ..., in_process
    warmup_requests: int


SERVICE_PLANS = {
    # A tiny graph: what the services themselves cost shows.
    "demo": ServicePlan(batch=8, block_seconds=2.0, blocks=9, warmup_requests=12),
    # The reference UNet (~4.9 GMAC/frame): inference dominates, ~230 ms per batch of 4 on 2 cores.
    "unet328": ServicePlan(batch=4, block_seconds=4.0, blocks=9, warmup_requests=4),
}


# -- the avatar, and realistic mouths ---------------------------------------------------------------------------


@dataclass
class Avatar:
    label: str
    frames: list[np.ndarray]  # BGR uint8 [H, W, 3], as the cache holds them
    rects: list[tuple[int, int, int, int]]
    crops: list[np.ndarray]  # the 328 crops (what prepare() keeps for the paste-back)
    mouths: np.ndarray  # uint8 [N, 3, 320, 320], the demo model's output for each crop


def loudness_audio(count: int, phase: int = 0) -> np.ndarray:
    """float32 [count, 32, 16, 16] audio windows whose loudness (the demo model reads channels 16-17) cycles 0..1,
    so the demo mouths open and close as in speech."""
    loud = 0.5 + 0.5 * np.sin((np.arange(count) + phase) * 0.7)
    return np.broadcast_to(loud.astype(np.float32)[:, None, None, None], (count, *AUDIO_SHAPE)).copy()


def demo_mouths(models_dir: Path, crops: Sequence[np.ndarray]) -> np.ndarray:
    """The demo model's mouths for these crops, truncated to uint8 as the inference side returns them."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(models_dir / "demo" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    out = np.empty((len(crops), *MOUTH_SHAPE), np.uint8)
    for start in range(0, len(crops), 25):
        chunk = crops[start : start + 25]
        visual = np.stack([model_input(c) for c in chunk]).astype(np.float32) / np.float32(255.0)
        (mouth,) = session.run(None, {"input": visual, "audio": loudness_audio(len(chunk), start)})
        out[start : start + len(chunk)] = (np.clip(mouth, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def load_avatar(models_dir: Path) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    import av

    rects = [tuple(int(v) for v in r) for r in json.loads((models_dir / "avatar" / "crop_rects.json").read_text())]
    with av.open(str(models_dir / "avatar" / "background.mp4")) as container:
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    count = min(len(frames), len(rects))
    return frames[:count], rects[:count]  # type: ignore[return-value]


def build_avatar(models_dir: Path, frames: list[np.ndarray], rects: list, label: str, scale: float) -> Avatar:
    if scale != 1.0:
        height, width = frames[0].shape[:2]
        size = (round(width * scale), round(height * scale))
        frames = [cv2.resize(f, size, interpolation=cv2.INTER_CUBIC) for f in frames]
        rects = [tuple(round(v * scale) for v in r) for r in rects]
    crops = [crop_face(f, r) for f, r in zip(frames, rects, strict=True)]
    return Avatar(label, frames, rects, crops, demo_mouths(models_dir, crops))


# -- 1. per-frame geometry and encode costs -----------------------------------------------------------------------


def geometry_ops(avatar: Avatar) -> dict[str, Callable[[int], Any]]:
    """One call = one frame, each exactly as the compositing service does it (compositor.py)."""
    encode_params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    composited = []
    for i, frame in enumerate(avatar.frames):
        out = frame.copy()
        paste_back(out, avatar.rects[i], avatar.crops[i], avatar.mouths[i])
        composited.append(out)

    def plain(i: int) -> Any:
        return cv2.imencode(".jpg", avatar.frames[i], encode_params)

    def copy_paste(i: int) -> Any:
        out = avatar.frames[i].copy()
        paste_back(out, avatar.rects[i], avatar.crops[i], avatar.mouths[i])
        return out

    def encode(i: int) -> Any:
        return encode_image(composited[i], "jpeg", JPEG_QUALITY)

    def total(i: int) -> Any:
        return encode_image(copy_paste(i), "jpeg", JPEG_QUALITY)

    def crop(i: int) -> Any:
        return model_input(crop_face(avatar.frames[i], avatar.rects[i]))

    def copy_paste_merge(i: int) -> Any:
        out = avatar.frames[i].copy()
        paste_back_merge(out, avatar.rects[i], avatar.crops[i], avatar.mouths[i])
        return out

    # What the cache holds beside each frame for splicing (built once per frame and quality, not timed here),
    # with the tile width the service fits to the avatar's rectangles.
    settings = SpliceSettings(JPEG_QUALITY, tile_width=fit_tile_width(avatar.frames[0].shape[1], avatar.rects))
    backgrounds = [SplicedBackground.from_frame(f, settings) for f in avatar.frames]
    scratch = np.empty_like(avatar.crops[0])  # the compositor's per-thread buffer: the cached crop is never written

    def spliced(i: int) -> Any:
        def draw(dst: np.ndarray) -> None:
            draw_mouth(dst, avatar.crops[i], avatar.mouths[i], DEFAULT, scratch)

        data, reason = encode_composite(backgrounds[i], avatar.frames[i], avatar.rects[i], draw)
        assert reason is None, reason
        return data

    def full_restarts(i: int) -> Any:
        return encode_with_restarts(composited[i], settings)

    return {
        "plain_encode": plain,
        "copy_paste": copy_paste,
        "encode": encode,
        "total": total,
        "spliced": spliced,
        "full_restarts": full_restarts,
        "crop_build": crop,
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
        a, b = frame.copy(), frame.copy()
        paste_back(a, avatar.rects[i], avatar.crops[i], avatar.mouths[i])
        paste_back_merge(b, avatar.rects[i], avatar.crops[i], avatar.mouths[i])
        if not np.array_equal(a, b):
            return False
    return True


def time_block(fn: Callable[[int], Any], count: int) -> float:
    """ms per frame over one pass through every frame of the avatar."""
    started = time.perf_counter()
    for i in range(count):
        fn(i)
    return (time.perf_counter() - started) * 1000.0 / count


def bench_geometry(avatar: Avatar, rounds: int) -> dict[str, Any]:
    """Rounds of plain, copy+paste, encode, total, crop; total / geomean(plain before, plain after) per round."""
    cv2.setNumThreads(1)  # as the Compositor sets it: one frame per thread, no OpenCV-internal threads
    ops = geometry_ops(avatar)
    count = len(avatar.frames)
    for fn in ops.values():  # warm-up: one pass of each
        time_block(fn, count)
    meter = common.CpuMeter()
    blocks: dict[str, list[float]] = {k: [] for k in ops}
    usage = []
    for _ in range(rounds):
        start = meter.snapshot()
        for name, fn in ops.items():
            blocks[name].append(time_block(fn, count))
        usage.append(meter.usage(start, meter.snapshot()))
    blocks["plain_encode"].append(time_block(ops["plain_encode"], count))
    plain = blocks["plain_encode"]
    refs = [math.sqrt(plain[i] * plain[i + 1]) for i in range(rounds)]

    def ratios(name: str) -> list[float]:
        return [blocks[name][i] / refs[i] for i in range(rounds)]

    ms = {name: round(common.median(values), 3) for name, values in blocks.items()}
    jpeg_plain = [len(cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1]) for f in avatar.frames]
    jpeg_composited = [len(ops["total"](i)) for i in range(count)]
    jpeg_spliced = [len(ops["spliced"](i)) for i in range(count)]
    height, width = avatar.frames[0].shape[:2]
    return {
        "frame_size": f"{width}x{height}",
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
        "splice_tile_width": fit_tile_width(width, avatar.rects),
        "spliced_identical_to_full_restart_encode": all(
            ops["spliced"](i) == ops["full_restarts"](i) for i in range(count)
        ),
        "candidate_paste_back_cv2_merge": {
            "copy_paste_ms_per_frame": ms["copy_paste_cv2_merge"],
            "vs_current_copy_paste": round(
                common.median(
                    [a / b for a, b in zip(blocks["copy_paste_cv2_merge"], blocks["copy_paste"], strict=False)]
                ),
                3,
            ),
            "frames_identical_to_paste_back": merge_candidate_identical(avatar),
        },
        "composite_ratio": round(common.median(ratios("spliced")), 3),
        "composite_ratio_blocks": [round(r, 3) for r in ratios("spliced")],
        "composite_ratio_full": round(common.median(ratios("total")), 3),
        "composite_ratio_full_blocks": [round(r, 3) for r in ratios("total")],
        "encode_ratio": round(common.median(ratios("encode")), 3),
        "copy_paste_ratio": round(common.median(ratios("copy_paste")), 3),
        "crop_build_ratio": round(common.median(ratios("crop_build")), 3),
        "per_frame_all_image_work_ms": round(ms["spliced"] + ms["crop_build"], 3),
        "per_frame_all_image_work_ms_full": round(ms["total"] + ms["crop_build"], 3),
        "jpeg_bytes_mean": {
            "plain": round(float(np.mean(jpeg_plain))),
            "composited": round(float(np.mean(jpeg_composited))),
            "spliced (restart markers every tile)": round(float(np.mean(jpeg_spliced))),
        },
        "blocks_ms_per_frame": {k: [round(v, 3) for v in vs] for k, vs in blocks.items()},
        "cpu_per_round": usage,
    }


# -- 2. compositor thread scaling --------------------------------------------------------------------------------


def bench_threads(avatar: Avatar, batch: int, seconds: float, blocks: int) -> dict[str, Any]:
    """Compositor.composite (the service's class) on batches of ``batch`` frames: 1 thread vs 2, alternating."""
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

    batches = []
    for start in range(0, count, batch):
        idx = [(start + j) % count for j in range(batch)]
        prepared = [Prepared(frames[i], avatar.rects[i], DEFAULT, True, encoder(i)) for i in idx]
        batches.append((prepared, avatar.mouths[idx]))
    compositors = {n: Compositor(n, "jpeg", JPEG_QUALITY) for n in (1, 2)}
    loop = asyncio.new_event_loop()
    meter = common.CpuMeter()
    cycle = itertools.cycle(batches)

    def one(compositor: Compositor) -> None:
        prepared, mouths = next(cycle)
        loop.run_until_complete(compositor.composite(prepared, mouths))

    try:
        for compositor in compositors.values():
            for _ in range(len(batches)):
                one(compositor)
        results: list[dict[str, Any]] = []
        for k in range(blocks):
            threads = 1 if k % 2 == 0 else 2
            start = meter.snapshot()
            stamps = common.run_for(lambda c=compositors[threads]: one(c), seconds)
            results.append(
                {
                    "threads": threads,
                    "fps": round(common.throughput(stamps, batch), 2),
                    **meter.usage(start, meter.snapshot()),
                }
            )
    finally:
        loop.close()
        for compositor in compositors.values():
            compositor.close()
    one_fps = [r["fps"] for r in results if r["threads"] == 1]
    ratios, quiet = [], []
    for k in range(1, blocks, 2):
        ratios.append(results[k]["fps"] / math.sqrt(results[k - 1]["fps"] * results[k + 1]["fps"]))
        if all((b["other_cpu_pct"] or 0.0) <= QUIET_OTHER_PCT for b in results[k - 1 : k + 2]):
            quiet.append(ratios[-1])
    return {
        "frame_size": f"{avatar.frames[0].shape[1]}x{avatar.frames[0].shape[0]}",
        "batch": batch,
        "fps_threads_1": round(common.median(one_fps), 2),
        "fps_threads_2": round(common.median([r["fps"] for r in results if r["threads"] == 2]), 2),
        "ratio_2_vs_1": round(common.median(ratios), 3),
        "ratio_blocks": [round(r, 3) for r in ratios],
        "ratio_quiet_pairs": round(common.median(quiet), 3) if quiet else None,
        "quiet_pairs": len(quiet),
        "blocks": results,
    }


# -- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/compositing.json"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every timed block's length")
    parser.add_argument(
        "--parts",
        default="geometry,threads,budget,services,spinning",
        help="comma-separated subset (spinning needs services)",
    )
    parser.add_argument("--models", default="demo,unet328", help="models for the services part")
    args = parser.parse_args(argv)
    # This process is the client: it gets the allocator settings the services use (service_common.allocator).
    tune_malloc()
    started = time.perf_counter()
    machine = common.machine_info()
    models_dir = args.models_dir.resolve()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := set(models) - set(separation.PLANS):
        parser.error(f"--models: unknown {sorted(unknown)}")
    generated = common.ensure_models(models_dir)
    out_path = args.out if args.out.is_absolute() else Path.cwd() / args.out
    result: dict[str, Any] = {
        "benchmark": "compositing: per-frame composite+encode cost, compositor threads, separated vs in-process",
        "settings": {
            "jpeg_quality": JPEG_QUALITY,
            "opencv_threads": "cv2.setNumThreads(1), as the Compositor sets it",
            "scale": args.scale,
            "models_generated_now": generated,
        },
    }
    rounds = max(3, round(9 * args.scale))
    if parts & {"geometry", "threads", "budget"}:
        common.log("avatar: decoding models/avatar/background.mp4 and making demo-model mouths")
        frames, rects = load_avatar(models_dir)
        for label, size_scale in SIZES.items():
            avatar = build_avatar(models_dir, frames, rects, label, size_scale)
            if "geometry" in parts:
                common.log(f"geometry {label}: {rounds} rounds over {len(avatar.frames)} frames")
                result.setdefault("geometry", {})[label] = bench_geometry(avatar, rounds)
                g = result["geometry"][label]
                common.log(f"geometry {label}: composite_ratio {g['composite_ratio']}  {g['ms_per_frame']}")
            if "budget" in parts and label == "1280x720":
                common.log("budget 1280x720: each per-frame step of the separated path, timed alone")
                result["frame_budget_ms"] = frame_budget.measure(
                    avatar.frames, avatar.rects, avatar.crops, avatar.mouths
                )
            if "threads" in parts:
                common.log(f"threads {label}: Compositor.composite batch 16, 1 vs 2 threads")
                result.setdefault("threads", {})[label] = bench_threads(avatar, 16, 1.0 * args.scale, 7)
                t = result["threads"][label]
                common.log(
                    f"threads {label}: {t['fps_threads_1']} -> {t['fps_threads_2']} fps, ratio {t['ratio_2_vs_1']}"
                )
            del avatar
    if "services" in parts:
        result["services"] = separation.main_comparison(models_dir, models, args.scale)
    if "spinning" in parts:
        result["spinning"] = separation.spinning(models_dir, models, args.scale)
    if "frame_budget_ms" in result and "demo" in result.get("services", {}):
        result["frame_budget_ms"] = account(result["frame_budget_ms"], result["services"]["demo"])
    result["summary"] = summarize(result)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    common.write_result(out_path, result, machine)
    common.log(f"wrote {out_path} in {result['wall_seconds']} s")
    common.log("summary: " + json.dumps(result["summary"]))
    return 0


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
            for key in (
                "separated_vs_in_process",
                "separated_cpu_vs_in_process",
                "server_cpu_ms_per_frame",
                "server_cpu_ms_per_frame_excluding_model",
                "hop_request_bytes_per_frame",
                "hop_response_bytes_per_frame",
                "splicing_on_vs_off",
            ):
                summary[f"{key}_{model_id}"] = s[key]
    for mode, by_model in result.get("spinning", {}).items():
        for model_id, s in by_model.items():
            summary[f"spinning_cpu_ms_per_frame_at_{s['offered_fps']}_fps_{mode}_{model_id}"] = {
                v: b["server_cpu_ms_per_frame"] for v, b in s["at_offered_load"].items()
            }
            summary[f"spinning_max_fps_{mode}_{model_id}"] = {v: b["fps"] for v, b in s["max"].items()}
    return summary


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
