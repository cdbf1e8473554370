"""Real-time sessions as bench/stream.py runs them: one session's frames, many at once, and what they add up to.

Why: a session's figures are per frame (latency, lag, lateness against a playout delay), and a level's are over
every frame of every session at that level; both come from the same per-frame stamps, kept here with the
compositing log's per-batch lines that say what the server did meanwhile.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from lipsync_client import LipsyncClient
from lipsync_client.session import frame_audio_end, frames_to_cover
from lipsync_protocol.timing import required_samples
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc, inference_pb2

from .harness import CHANNEL_OPTIONS, percentile

MODEL = "demo"
BATCH_LINE = re.compile(
    r"demo: (\d+) frames from \d+: prepare ([\d.]+) ms, inference ([\d.]+) ms \(call ([\d.]+)\), "
    r"composite ([\d.]+) ms, total ([\d.]+) ms"
)
STAGES = ("prepare", "inference", "call", "composite", "total")


def run_session(
    address: str, samples: np.ndarray, start_frame: int, chunk_ms: float, start_at: float | None = None
) -> dict[str, Any]:
    """One real-time session; per-frame timestamps, latencies and lags."""
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.perf_counter()))
    with LipsyncClient(address) as client, client.session(MODEL, start_frame=start_frame) as session:
        feeder = session.feed(samples, chunk_ms=chunk_ms, realtime=True)
        frames = list(session.frames())
        feeder.join()
    capture = feeder.capture_start_s
    assert capture is not None and session.ended is not None
    latencies, lags, tail = [], [], []
    for f in frames:
        ready = session.audio_ready_s(f.utterance, f.utterance_frame)
        if ready is not None:  # every chunk is stamped once gRPC took it: always known here
            latencies.append((f.received_s - ready) * 1000)
            tail.append(frame_audio_end(f.utterance_frame) > len(samples))
        lags.append((f.received_s - capture - f.timestamp_s) * 1000)
    return {
        "frames": len(frames),
        "expected_frames": frames_to_cover(len(samples)),
        "dropped": session.ended.dropped_frames,
        "ttff_ms": (frames[0].received_s - session.first_audio_s) * 1000 if frames and session.first_audio_s else None,
        "latency_ms": latencies,
        "lag_ms": lags,
        "tail": tail,
        "timestamps": [f.timestamp_s for f in frames],
        "open_ms": (capture - session.opened_s) * 1000,
    }


def strip(run: dict[str, Any]) -> dict[str, Any]:
    """A session's summary figures without its per-frame lists."""
    return {k: v for k, v in run.items() if k not in ("latency_ms", "lag_ms", "tail", "timestamps")}


def summarize_sessions(runs: list[dict[str, Any]], playout_ms: float | None = None) -> dict[str, Any]:
    latencies = [v for r in runs for v in r["latency_ms"]]
    steady = [v for r in runs for v, t in zip(r["latency_ms"], r["tail"], strict=True) if not t]
    tail = [v for r in runs for v, t in zip(r["latency_ms"], r["tail"], strict=True) if t]
    lags = [v for r in runs for v in r["lag_ms"]]
    out: dict[str, Any] = {
        "sessions": len(runs),
        "frames": sum(r["frames"] for r in runs),
        "frames_expected": sum(r["expected_frames"] for r in runs),
        "dropped_frames": sum(r["dropped"] for r in runs),
        "time_to_first_frame_ms_p50": percentile([r["ttff_ms"] for r in runs if r["ttff_ms"] is not None], 50),
        "time_to_first_frame_ms_max": round(max(r["ttff_ms"] or 0 for r in runs), 1),
        "latency_ms_p50": percentile(latencies, 50),
        "latency_ms_p99": percentile(latencies, 99),
        "latency_ms_max": round(max(latencies), 1),
        "latency_ms_p50_before_end_of_input": percentile(steady, 50),
        "latency_ms_p99_before_end_of_input": percentile(steady, 99),
        "latency_ms_p50_tail_frames": percentile(tail, 50),
        "lag_ms_p50": percentile(lags, 50),
        "lag_ms_p99": percentile(lags, 99),
        "lag_ms_max": round(max(lags), 1),
    }
    if playout_ms is not None:
        out.update(lateness(runs, playout_ms))
    return out


def lateness(runs: list[dict[str, Any]], playout_ms: float) -> dict[str, Any]:
    """Frames whose lag passed the playout delay: how many, in how many sessions, how late, and when."""
    late = [v - playout_ms for r in runs for v in r["lag_ms"] if v > playout_ms]
    lags = sum(len(r["lag_ms"]) for r in runs)
    by_second: dict[str, int] = {}
    for r in runs:
        for lag, ts in zip(r["lag_ms"], r["timestamps"], strict=True):
            if lag > playout_ms:
                by_second[str(int(ts))] = by_second.get(str(int(ts)), 0) + 1
    return {
        "late_frames": len(late),
        "late_frames_pct": round(100 * len(late) / max(lags, 1), 2),
        "sessions_with_late_frames": sum(any(v > playout_ms for v in r["lag_ms"]) for r in runs),
        "worst_lateness_ms": round(max(late), 1) if late else 0.0,
        "late_frames_by_timestamp_second": dict(sorted(by_second.items(), key=lambda kv: int(kv[0]))),
    }


def concurrent(address: str, samples: np.ndarray, n: int, chunk_ms: float, spread_s: float) -> tuple[list, list]:
    """``n`` sessions in threads, starts spread over ``spread_s``: the results, and the errors of those that failed."""
    results: list[dict[str, Any] | None] = [None] * n
    errors: list[str] = []
    start = time.perf_counter() + 0.2

    def one(i: int) -> None:
        try:
            results[i] = run_session(address, samples, (i * 17) % 125, chunk_ms, start + spread_s * i / n)
        except Exception as exc:  # recorded; the level counts as not sustained
            errors.append(f"session {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return [r for r in results if r is not None], errors


def warm_shapes(address: str, samples: np.ndarray, max_batch: int) -> float:
    """Every batch size a session uses (1..max_batch) at an utterance's start, middle and end; seconds taken."""
    started = time.perf_counter()
    total = frames_to_cover(len(samples))
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        for count in range(1, max_batch + 1):
            for first in (0, total // 2, total - count):
                lo, hi = required_samples(first, count, len(samples))
                lo, hi = (lo, hi) if hi > lo else (len(samples) - 1, len(samples))
                request = pb.CompositeBatchRequest(
                    model_id=MODEL,
                    raw_audio=samples[lo:hi].tobytes(),
                    audio_encoding=inference_pb2.AUDIO_FLOAT32,
                    sample_rate=16000,
                    audio_offset_samples=lo,
                    utterance_samples=len(samples),
                    first_frame=first,
                    batch_size=count,
                    start_frame_idx=first,
                )
                stub.InferBatchComposite(request, timeout=120)
    return time.perf_counter() - started


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def batches_since(path: Path, offset: int) -> dict[str, Any]:
    """Batch sizes and stage times from the compositing log lines written after ``offset``."""
    with path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    rows = [tuple(float(v) for v in m.groups()) for m in BATCH_LINE.finditer(text)]
    if not rows:
        return {"batches": 0}
    sizes = [int(r[0]) for r in rows]
    column = {name: [r[i + 1] for r in rows] for i, name in enumerate(STAGES)}
    return {
        "batches": len(rows),
        "frames": sum(sizes),
        "mean_batch_frames": round(statistics.fmean(sizes), 2),
        "single_frame_batches_pct": round(100 * sizes.count(1) / len(sizes), 1),
        "batch_size_counts": {str(b): sizes.count(b) for b in sorted(set(sizes))},
        "ms_p50": {name: percentile(values, 50) for name, values in column.items()},
        "ms_p99": {name: percentile(values, 99) for name, values in column.items()},
        "note": "per batch, from the compositing log: prepare (cache + crops), inference (the inference "
        "service's own time), call (the InferBatch call as compositing saw it), composite (paste + JPEG), total",
    }
