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
3. ``services``: ``InferBatchComposite`` from a client in this process against a ``lipsync-inference`` +
   ``lipsync-compositing`` pair (separated) and a ``lipsync-compositing --in-process`` (in process), all three
   processes up at once, blocks alternating between the two modes, 2 requests in flight, same model and batch.
4. ``spinning``: the in-process mode with ORT ``allow_spinning`` true versus false (a fourth process), paired the
   same way: spinning threads compete with the compositor's threads for the same cores.
4b. ``splicing``: a second separated compositing process with ``output.jpeg_splicing: false`` on the same
   inference server, paired with the default one the same way: the end-to-end effect of spliced JPEG.
5. ``bytes``: serialized request/response sizes per frame, and of the internal hop.

    .venv/bin/python bench/bench_compositing.py --models-dir models --out bench/results/compositing.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np

from compositing_service.cache import BackgroundCache
from compositing_service.compositor import Compositor, Prepared
from compositing_service.geometry import INNER, crop_328, draw_mouth, encode_image, model_input, paste_back
from compositing_service.jpeg_splice import (
    SplicedBackground,
    SpliceSettings,
    encode_composite,
    encode_with_restarts,
    fit_tile_width,
)
from service_common.allocator import tune_malloc
from service_common.processes import ServiceProcess, free_port

# bench/ is not a package: this lets `common` import however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from shared_proto import compositing_pb2 as cpb
from shared_proto import compositing_pb2_grpc as cpb_grpc
from shared_proto import inference_pb2 as ipb

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
    crops = [crop_328(f, r) for f, r in zip(frames, rects, strict=True)]
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
        return model_input(crop_328(avatar.frames[i], avatar.rects[i]))

    def copy_paste_merge(i: int) -> Any:
        out = avatar.frames[i].copy()
        paste_back_merge(out, avatar.rects[i], avatar.crops[i], avatar.mouths[i])
        return out

    # What the cache holds beside each frame for splicing (built once per frame and quality, not timed here),
    # with the tile width the service fits to the avatar's rectangles.
    settings = SpliceSettings(JPEG_QUALITY, tile_width=fit_tile_width(avatar.frames[0].shape[1], avatar.rects))
    backgrounds = [SplicedBackground.from_frame(f, settings) for f in avatar.frames]
    crops = [c.copy() for c in avatar.crops]  # the service draws the mouth into the request's own crop

    def spliced(i: int) -> Any:
        def draw(dst: np.ndarray) -> None:
            draw_mouth(dst, crops[i], avatar.mouths[i], reuse_crop=True)

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
            "crop_build (crop_328 + model_input)": ms["crop_build"],
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
    cache = BackgroundCache(sum(f.nbytes for f in avatar.frames) * 2, count)
    frames = [cache.get("bench", i, lambda i: avatar.frames[i]) for i in range(count)]

    tile_width = fit_tile_width(frames[0].shape[1], np.array(avatar.rects))

    def encoder(i: int) -> Callable[[int], SplicedBackground]:
        return lambda quality: cache.encoded("bench", i, frames[i], SpliceSettings(quality, tile_width=tile_width))

    batches = []
    for start in range(0, count, batch):
        idx = [(start + j) % count for j in range(batch)]
        prepared = [Prepared(frames[i], avatar.rects[i], avatar.crops[i], None, True, encoder(i)) for i in idx]
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


# -- 3. separated services versus in-process ------------------------------------------------------------------


def console_script(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found next to {sys.executable} nor on PATH (make install)")
    return found


@dataclass
class Services:
    """The server processes by role: ``inference``, ``separated`` (its compositing), ``in_process`` and, for the
    spinning experiment, ``in_process_no_spin``."""

    procs: dict[str, ServiceProcess]
    startup_seconds: float
    log_dir: Path

    def stop(self) -> dict[str, int | None]:
        return {name: proc.stop() for name, proc in reversed(self.procs.items())}


def start_services(models_dir: Path, work: Path, no_spin: bool) -> Services:
    """inference + compositing (remote), compositing --in-process, and optionally an in-process one without spinning.

    ORT intra-op threads are 2 on both sides: ``--set`` for the inference service; for the in-process mode the
    engine reads inference.yaml itself, so the override goes in through the environment
    (LIPSYNC_ONNX__INTRA_OP_THREADS), which every config that process loads sees (the compositing config
    then warns that it ignores an unknown ``onnx`` key). Both avatars' backgrounds are preloaded.
    """
    frames_dir, log_dir = work / "frames", work / "logs"
    log_dir.mkdir(parents=True)
    common_args = ["--host", "127.0.0.1", "--log-level", "WARNING"]
    compositing = [
        console_script("lipsync-compositing"),
        "--config",
        str(models_dir / "compositing.yaml"),
        *common_args,
        "--set",
        f"frames_cache_dir={frames_dir}",
        "--set",
        "models.unet328.preload_backgrounds=true",
    ]
    in_process_args = ["--in-process", "--set", "inference.config=inference.yaml"]
    in_process_env = {"LIPSYNC_ONNX__INTRA_OP_THREADS": str(ORT_THREADS)}
    names = ["inference", "in_process", "separated", "separated_no_splice"]
    names += ["in_process_no_spin"] if no_spin else []
    ports = {name: free_port() for name in names}
    procs: dict[str, ServiceProcess] = {}

    def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> ServiceProcess:
        procs[name] = ServiceProcess([*argv, "--port", str(ports[name])], ports[name], log_dir / f"{name}.log", env)
        return procs[name]

    started = time.perf_counter()
    try:
        inference = start(
            "inference",
            [
                console_script("lipsync-inference"),
                "--config",
                str(models_dir / "inference.yaml"),
                *common_args,
                "--set",
                f"onnx.intra_op_threads={ORT_THREADS}",
            ],
        )
        first = start("in_process", [*compositing, *in_process_args], in_process_env)
        inference.wait_serving(180)
        first.wait_serving(300)  # it decodes the video into frames_dir: the others start after it (no decode race)
        remote = [*compositing, "--inference-url", f"127.0.0.1:{ports['inference']}"]
        later = [
            start("separated", remote),
            start("separated_no_splice", [*remote, "--set", "output.jpeg_splicing=false"]),
        ]
        if no_spin:
            env = {**in_process_env, "LIPSYNC_ONNX__ALLOW_SPINNING": "false"}
            later.append(start("in_process_no_spin", [*compositing, *in_process_args], env))
        for proc in later:
            proc.wait_serving(300)
    except BaseException:
        for proc in reversed(procs.values()):
            proc.stop(10)
        raise
    return Services(procs, time.perf_counter() - started, log_dir)


class Positions:
    """start_frame_idx advancing by one batch per request, so consecutive requests walk the avatar."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self._next = itertools.count()
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            return next(self._next) * self.batch


def composite_request(model_id: str, batch: int, start: int) -> cpb.CompositeBatchRequest:
    """A new client: audio features only (one [32,16,16] window per frame), the server builds the crops."""
    audio = loudness_audio(batch, start)
    return cpb.CompositeBatchRequest(
        model_id=model_id,
        audio_features=audio.tobytes(),
        audio_features_shape=list(audio.shape),
        batch_size=batch,
        start_frame_idx=start,
    )


def call_loop(
    stub: cpb_grpc.CompositingServiceStub,
    model_id: str,
    positions: Positions,
    seconds: float,
    in_flight: int,
) -> list[tuple[float, cpb.CompositeBatchResponse]]:
    """``in_flight`` threads doing blocking calls until the deadline; (completion stamp, reply) each."""
    done: list[tuple[float, cpb.CompositeBatchResponse]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        try:
            while True:
                with lock:
                    if time.perf_counter() >= deadline and len(done) >= 3:
                        return
                request = composite_request(model_id, positions.batch, positions.take())
                reply = stub.InferBatchComposite(request, timeout=120)
                now = time.perf_counter()
                with lock:
                    done.append((now, reply))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, name=f"bench-client-{i}", daemon=True) for i in range(in_flight)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return done


class ProcessMeter:
    """CPU % of one core per block: this process, each named server process, and the rest of the machine."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def snapshot(self) -> tuple[float, float | None, dict[str, float | None], float | None]:
        return (
            time.perf_counter(),
            common.process_cpu_seconds(None),
            {name: common.process_cpu_seconds(pid) for name, pid in self.pids.items()},
            common.system_cpu_busy_seconds(),
        )

    @staticmethod
    def usage(start: tuple, end: tuple) -> dict[str, float | None]:
        wall = max(end[0] - start[0], 1e-9)

        def pct(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) / wall * 100.0, 1)

        out: dict[str, float | None] = {"bench_cpu_pct": pct(start[1], end[1])}
        for name in start[2]:
            out[f"{name}_cpu_pct"] = pct(start[2][name], end[2][name])
        machine = pct(start[3], end[3])
        known = [v for v in out.values() if v is not None]
        out["machine_cpu_pct"] = machine
        out["other_cpu_pct"] = None if machine is None else round(max(machine - sum(known), 0.0), 1)
        return out


# The processes that do a mode's work (for its CPU ms per frame).
MODE_PROCS = {
    "in_process": ["in_process"],
    "separated": ["separated", "inference"],
    "separated_no_splice": ["separated_no_splice", "inference"],
    "in_process_no_spin": ["in_process_no_spin"],
}


def service_block(
    stub: cpb_grpc.CompositingServiceStub,
    model_id: str,
    positions: Positions,
    seconds: float,
    meter: ProcessMeter,
    mode: str,
) -> tuple[dict[str, Any], list[cpb.CompositeBatchResponse]]:
    start = meter.snapshot()
    done = call_loop(stub, model_id, positions, seconds, in_flight=2)
    usage = meter.usage(start, meter.snapshot())
    replies = [r for _, r in done]
    fps = common.throughput([s for s, _ in done], positions.batch)
    server_pct = sum(usage[f"{p}_cpu_pct"] or 0.0 for p in MODE_PROCS[mode])
    return {
        "mode": mode,
        "fps": round(fps, 3),
        "requests": len(done),
        "seconds": round(max(s for s, _ in done) - min(s for s, _ in done), 3),
        "server_cpu_ms_per_frame": round(server_pct * 10.0 / fps, 2),
        "cache_hits": sum(r.cache_hits for r in replies),
        "cache_misses": sum(r.cache_misses for r in replies),
        **usage,
    }, replies


def timing_means(replies: Sequence[cpb.CompositeBatchResponse], batch: int) -> dict[str, float]:
    out = {f: round(float(np.mean([getattr(r, f) for r in replies])), 2) for f in TIMING_FIELDS}
    out["composite_ms_per_frame"] = round(out["composite_time_ms"] / batch, 3)
    out["prepare_ms_per_frame"] = round(out["prepare_time_ms"] / batch, 3)
    return out


def paired_modes(
    model_id: str,
    plan: ServicePlan,
    services: Services,
    stubs: dict[str, cpb_grpc.CompositingServiceStub],
    reference: str,
    candidate: str,
    seconds: float,
    blocks: int,
) -> tuple[dict[str, Any], dict[str, list[cpb.CompositeBatchResponse]]]:
    """Blocks reference, candidate, reference, ..., reference; candidate / geomean(its neighbours), median."""
    meter = ProcessMeter({name: proc.process.pid for name, proc in services.procs.items()})
    positions = {mode: Positions(plan.batch) for mode in (reference, candidate)}
    for mode in (reference, candidate):
        stubs[mode].LoadModel(cpb.LoadModelRequest(model_id=model_id), timeout=300)
        for _ in range(plan.warmup_requests):
            stubs[mode].InferBatchComposite(
                composite_request(model_id, plan.batch, positions[mode].take()), timeout=300
            )
    common.log(f"{model_id}: {blocks} blocks of ~{seconds:.1f} s, {reference} and {candidate} alternating")
    results: list[dict[str, Any]] = []
    replies: dict[str, list[cpb.CompositeBatchResponse]] = {reference: [], candidate: []}
    for k in range(blocks):
        mode = reference if k % 2 == 0 else candidate
        block, got = service_block(stubs[mode], model_id, positions[mode], seconds, meter, mode)
        replies[mode].extend(got)
        results.append(block)
        procs = ", ".join(f"{p} {block[p + '_cpu_pct']}%" for p in MODE_PROCS[mode])
        common.log(
            f"{model_id}: {mode:18s} {block['fps']:8.2f} fps  ({procs}, "
            f"{block['server_cpu_ms_per_frame']} ms CPU/frame; bench {block['bench_cpu_pct']}%, "
            f"other {block['other_cpu_pct']}%)"
        )
    ratios, quiet = [], []
    for k in range(1, blocks, 2):
        ref = math.sqrt(results[k - 1]["fps"] * results[k + 1]["fps"])
        results[k][f"{reference}_ref_fps"] = round(ref, 3)
        results[k]["ratio"] = round(results[k]["fps"] / ref, 4)
        ratios.append(results[k]["ratio"])
        if all((b["other_cpu_pct"] or 0.0) <= QUIET_OTHER_PCT for b in results[k - 1 : k + 2]):
            quiet.append(results[k]["ratio"])

    def median_of(mode: str, key: str) -> float:
        return common.median([b[key] for b in results if b["mode"] == mode])

    summary = {
        "batch_size": plan.batch,
        "in_flight": 2,
        "ort_intra_op_threads": ORT_THREADS,
        f"{candidate}_fps": round(median_of(candidate, "fps"), 3),
        f"{reference}_fps": round(median_of(reference, "fps"), 3),
        f"{candidate}_vs_{reference}": round(common.median(ratios), 4),
        "ratio_blocks": ratios,
        "ratio_quiet_pairs": round(common.median(quiet), 4) if quiet else None,
        "quiet_pairs": len(quiet),
        "server_cpu_ms_per_frame": {
            m: round(median_of(m, "server_cpu_ms_per_frame"), 2) for m in (reference, candidate)
        },
        "timing_means_ms": {m: timing_means(replies[m], plan.batch) for m in (reference, candidate)},
        "cache": {
            m: {"hits": sum(r.cache_hits for r in replies[m]), "misses": sum(r.cache_misses for r in replies[m])}
            for m in (reference, candidate)
        },
        "block_seconds": round(seconds, 2),
        "blocks": results,
    }
    return summary, replies


def bench_services(
    models_dir: Path, scale: float, models: Sequence[str], spinning: bool
) -> tuple[dict[str, Any], dict[str, dict[str, cpb.CompositeBatchResponse]]]:
    work = Path(tempfile.mkdtemp(prefix="bench-compositing-"))
    common.log(f"services: starting inference, compositing (separated), compositing --in-process ({work})")
    result: dict[str, Any] = {}
    samples: dict[str, dict[str, cpb.CompositeBatchResponse]] = {}
    services = None
    channels: list[grpc.Channel] = []
    try:
        services = start_services(models_dir, work, spinning)
        result["settings"] = {
            "separated": "lipsync-inference (onnx.intra_op_threads=2, server.cpu_workers=1) + lipsync-compositing "
            "--inference-url, loopback gRPC",
            "in_process": "lipsync-compositing --in-process --set inference.config=inference.yaml, "
            "env LIPSYNC_ONNX__INTRA_OP_THREADS=2",
            "both": "models/compositing.yaml, composite_threads=0 (one per core), jpeg q75, ping_pong, "
            "models.unet328.preload_backgrounds=true, frames_cache_dir in a temp folder; ORT allow_spinning "
            "left at its default (true)",
            "client": "grpc sync channel in the bench process, 2 threads doing blocking calls (2 in flight); "
            "audio features only ([B,32,16,16] float32), start_frame_idx advancing by the batch per request",
            "schedule": "in_process, separated, in_process, ... (odd count); each separated block divided by the "
            "geometric mean of the in_process blocks before and after it; the figure is the median",
            "server_cpu_ms_per_frame": "CPU of the mode's processes (compositing, plus inference when separated) "
            "per output frame",
            "startup_seconds": round(services.startup_seconds, 1),
        }
        in_process_log = (services.log_dir / "in_process.log").read_text(errors="replace")
        result["settings"]["in_process_env_override_warning"] = next(
            (line.split(": ", 1)[-1] for line in in_process_log.splitlines() if "unknown key" in line), None
        )
        stubs = {}
        for name, proc in services.procs.items():
            if name != "inference":
                channels.append(grpc.insecure_channel(proc.address, CHANNEL_OPTIONS))
                stubs[name] = cpb_grpc.CompositingServiceStub(channels[-1])
        for model_id in models:
            plan = SERVICE_PLANS[model_id]
            common.log(f"services/{model_id}: warm-up, then separated vs in_process (batch {plan.batch})")
            summary, replies = paired_modes(
                model_id, plan, services, stubs, "in_process", "separated", plan.block_seconds * scale, plan.blocks
            )
            # The same request to both: the frames must be byte-identical (README: the modes agree).
            same = [
                stubs[m].InferBatchComposite(composite_request(model_id, plan.batch, 0), timeout=300).composited_frames
                for m in ("in_process", "separated")
            ]
            summary["frames_identical_across_modes"] = list(same[0]) == list(same[1])
            summary["per_frame_cost_of_separation_ms"] = round(
                common.per_item_overhead_ms(summary["separated_fps"], summary["in_process_fps"]), 3
            )
            result[model_id] = summary
            samples[model_id] = {m: r[-1] for m, r in replies.items()}
        result["splicing"] = {}
        for model_id in models:
            plan = SERVICE_PLANS[model_id]
            common.log(f"splicing/{model_id}: separated with output.jpeg_splicing true vs false")
            summary, _ = paired_modes(
                model_id,
                plan,
                services,
                stubs,
                "separated_no_splice",
                "separated",
                plan.block_seconds * scale,
                plan.blocks,
            )
            result["splicing"][model_id] = summary
        if spinning:
            result["spinning"] = {}
            for model_id in models:
                plan = SERVICE_PLANS[model_id]
                common.log(f"spinning/{model_id}: in_process with ORT allow_spinning true vs false")
                summary, _ = paired_modes(
                    model_id,
                    plan,
                    services,
                    stubs,
                    "in_process",
                    "in_process_no_spin",
                    plan.block_seconds * scale * 0.75,
                    7,
                )
                result["spinning"][model_id] = summary
    finally:
        for channel in channels:
            channel.close()
        if services is not None:
            result.setdefault("settings", {})["exit_codes"] = services.stop()
        shutil.rmtree(work, ignore_errors=True)
    return result, samples


# -- 4. bytes per frame --------------------------------------------------------------------------------------


def bytes_per_frame(batch: int, samples: dict[str, dict[str, cpb.CompositeBatchResponse]]) -> dict[str, Any]:
    """Serialized sizes (ByteSize) per frame of the client's request and reply, and of the internal hop."""
    rng = np.random.default_rng(0)
    audio = loudness_audio(batch)
    visual_u8 = rng.integers(0, 256, (batch, *VISUAL_SHAPE), dtype=np.uint8)
    new = composite_request("demo", batch, 123)
    old_f32 = cpb.CompositeBatchRequest(
        model_id="demo",
        visual_frames=(visual_u8.astype(np.float32) / np.float32(255.0)).tobytes(),
        audio_features=audio.tobytes(),
        batch_size=batch,
        start_frame_idx=123,
    )
    uint8 = cpb.CompositeBatchRequest(
        model_id="demo",
        visual_frames=visual_u8.tobytes(),
        visual_dtype=ipb.DTYPE_UINT8,
        audio_features=audio.tobytes(),
        audio_features_shape=list(audio.shape),
        batch_size=batch,
        start_frame_idx=123,
    )
    # What the separated compositing service sends to inference and gets back (inference_client.RemoteInference).
    hop_request = ipb.InferBatchRequest(
        model_id="demo",
        visual_frames=visual_u8.tobytes(),
        visual_dtype=ipb.DTYPE_UINT8,
        audio_features=audio.tobytes(),
        audio_features_shape=list(audio.shape),
        batch_size=batch,
        output_dtype=ipb.DTYPE_UINT8,
    )
    hop_reply = ipb.InferBatchResponse(
        outputs=[
            ipb.RawMouthRegion(data=bytes(int(np.prod(MOUTH_SHAPE))), dtype=ipb.DTYPE_UINT8, shape=list(MOUTH_SHAPE))
        ]
        * batch,
        success=True,
        inference_time_ms=1.0,
        device="cpu",
    )
    new_size = new.ByteSize() / batch
    old_size = old_f32.ByteSize() / batch
    result: dict[str, Any] = {
        "batch": batch,
        "request": {
            "server_built_visuals (audio only)": round(new_size, 1),
            "old_float32_visuals": round(old_size, 1),
            "uint8_visuals": round(uint8.ByteSize() / batch, 1),
            "old_vs_new": round(old_size / new_size, 1),
        },
        "response": {},
        "internal_hop_separated_only": {
            "InferBatchRequest (uint8 visuals + audio)": round(hop_request.ByteSize() / batch, 1),
            "InferBatchResponse (uint8 mouths)": round(hop_reply.ByteSize() / batch, 1),
        },
    }
    for model_id, by_mode in samples.items():
        reply = by_mode.get("in_process") or next(iter(by_mode.values()))
        frames = len(reply.composited_frames) or 1
        result["response"][model_id] = {
            "response_bytes_per_frame": round(reply.ByteSize() / frames, 1),
            "jpeg_bytes_mean": round(float(np.mean([len(f) for f in reply.composited_frames])), 1),
        }
    return result


# -- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/compositing.json"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every timed block's length")
    parser.add_argument(
        "--parts",
        default="geometry,threads,services,spinning,bytes",
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
    if unknown := set(models) - set(SERVICE_PLANS):
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
    if parts & {"geometry", "threads"}:
        common.log("avatar: decoding models/avatar/background.mp4 and making demo-model mouths")
        frames, rects = load_avatar(models_dir)
        for label, size_scale in SIZES.items():
            avatar = build_avatar(models_dir, frames, rects, label, size_scale)
            if "geometry" in parts:
                common.log(f"geometry {label}: {rounds} rounds over {len(avatar.frames)} frames")
                result.setdefault("geometry", {})[label] = bench_geometry(avatar, rounds)
                g = result["geometry"][label]
                common.log(f"geometry {label}: composite_ratio {g['composite_ratio']}  {g['ms_per_frame']}")
            if "threads" in parts:
                common.log(f"threads {label}: Compositor.composite batch 16, 1 vs 2 threads")
                result.setdefault("threads", {})[label] = bench_threads(avatar, 16, 1.0 * args.scale, 7)
                t = result["threads"][label]
                common.log(
                    f"threads {label}: {t['fps_threads_1']} -> {t['fps_threads_2']} fps, ratio {t['ratio_2_vs_1']}"
                )
            del avatar
    samples: dict = {}
    if "services" in parts:
        result["services"], samples = bench_services(models_dir, args.scale, models, "spinning" in parts)
    if "bytes" in parts:
        result["bytes_per_frame"] = bytes_per_frame(SERVICE_PLANS["demo"].batch, samples)
    result["summary"] = summarize(result)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    common.write_result(out_path, result, machine)
    common.log(f"wrote {out_path} in {result['wall_seconds']} s")
    common.log("summary: " + json.dumps(result["summary"]))
    return 0


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for label, g in result.get("geometry", {}).items():
        summary[f"composite_ratio_{label}"] = g["composite_ratio"]
        summary[f"composite_ratio_full_{label}"] = g["composite_ratio_full"]
    for label, t in result.get("threads", {}).items():
        summary[f"compositor_threads_2_vs_1_{label}"] = t["ratio_2_vs_1"]
    services = result.get("services", {})
    for model_id in SERVICE_PLANS:
        if model_id in services:
            summary[f"separated_vs_in_process_{model_id}"] = services[model_id]["separated_vs_in_process"]
    for model_id, s in services.get("splicing", {}).items():
        summary[f"splicing_on_vs_off_{model_id}"] = s["separated_vs_separated_no_splice"]
    for model_id, s in services.get("spinning", {}).items():
        summary[f"in_process_no_spin_vs_spin_{model_id}"] = s["in_process_no_spin_vs_in_process"]
    if "bytes_per_frame" in result:
        summary["request_bytes_old_vs_new"] = result["bytes_per_frame"]["request"]["old_vs_new"]
    return summary


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
