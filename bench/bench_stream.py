"""Real-time sessions: time to first frame, per-frame latency, and how many real-time sessions one replica sustains.

One inference process and one compositing process (the console scripts, on loopback, like
``bench_compositing.py``), the ``demo`` model, and clients using ``lipsync_client.LipsyncSession``: every
session is fed the committed speech (8.36 s) in 40 ms chunks at real-time pace, as a live source would (chunk
``i`` is sent once its last sample has been "captured", i.e. at capture start + its end time).

Per frame, two figures:

- ``latency``: the send time of the chunk that completed the samples the frame needs
  (``plan_batch(k, 1, 10**12).sample_hi``; for the tail frames, released by end_of_input, its send time) ->
  the frame's arrival. What the server and the network add.
- ``lag``: arrival - (capture start + the frame's timestamp). What a player sees: ``latency`` plus the
  model's audio look-ahead (frame k needs audio up to ~40 k + 450 ms) and the chunking.

Everything below runs once per inference config, on fresh processes: ``default`` (models/inference.yaml as
shipped: ORT ``allow_spinning`` true) and ``no_spin`` (``--set onnx.allow_spinning=false``).

1. ``cold``: one real-time session of 3 s on the fresh servers (only their own start-up warm-up done).
2. Warm-up: ``InferBatchComposite`` with raw audio at every batch size a session uses (1..8), at the start, in
   the middle and at the end of an utterance, so later phases meet no shape ORT has not run yet.
3. ``single``: real-time sessions one at a time: time to first frame, latency and lag p50/p99.
4. ``concurrency``: N = 1, 2, 4, 6, ... concurrent real-time sessions (threads; starts spread over 1 s so
   their chunk phases differ). A frame is late if it arrives after its presentation deadline = capture start +
   frame timestamp + playout delay, with the playout delay = the single-session p99 lag + 200 ms (stated in the
   JSON). ``max_realtime_sessions`` is the largest N with zero late frames.

The compositing process logs every batch (``logging.log_inference_times``); the JSON has per-phase batch sizes
and stage times from those lines. CPU per level: this process (the clients), both servers, the machine.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from lipsync_client import LipsyncClient
from lipsync_client.media import read_speech
from lipsync_client.session import frame_audio_end, frames_to_cover
from lipsync_protocol.timing import required_samples
from service_common.allocator import tune_malloc
from service_common.processes import ServiceProcess, free_port
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc, inference_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SPEECH = common.REPO_ROOT / "tests" / "data" / "speech_16k.wav"
MODEL = "demo"
PLAYOUT_MARGIN_MS = 200.0
BATCH_LINE = re.compile(
    r"demo: (\d+) frames from \d+: prepare ([\d.]+) ms, inference ([\d.]+) ms \(call ([\d.]+)\), "
    r"composite ([\d.]+) ms, total ([\d.]+) ms"
)


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


# -- the servers ---------------------------------------------------------------------------------------------


class Servers:
    def __init__(self, models_dir: Path, work: Path, inference_set: list[str] | None = None) -> None:
        self.log_dir = work / "logs"
        self.log_dir.mkdir(parents=True)
        bin_dir = Path(sys.executable).parent
        inference_port, compositing_port = free_port(), free_port()
        started = time.perf_counter()
        self.inference = ServiceProcess(
            [
                str(bin_dir / "lipsync-inference"),
                *("--config", str(models_dir / "inference.yaml"), "--host", "127.0.0.1"),
                *("--port", str(inference_port), "--log-level", "WARNING"),
                *[arg for kv in inference_set or [] for arg in ("--set", kv)],
            ],
            inference_port,
            self.log_dir / "inference.log",
        )
        self.compositing: ServiceProcess | None = None
        try:
            self.inference.wait_serving(180)
            self.compositing = ServiceProcess(
                [
                    str(bin_dir / "lipsync-compositing"),
                    *("--config", str(models_dir / "compositing.yaml"), "--host", "127.0.0.1"),
                    *("--port", str(compositing_port), "--inference-url", self.inference.address),
                    *("--set", f"frames_cache_dir={work / 'frames'}", "--set", "logging.log_inference_times=true"),
                    *("--log-level", "INFO"),
                ],
                compositing_port,
                self.log_dir / "compositing.log",
            )
            self.compositing.wait_serving(300)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - started

    @property
    def address(self) -> str:
        assert self.compositing is not None
        return self.compositing.address

    def log_size(self) -> int:
        path = self.log_dir / "compositing.log"
        return path.stat().st_size if path.exists() else 0

    def batches_since(self, offset: int) -> dict[str, Any]:
        """Batch sizes and stage times from the compositing log lines written after ``offset``."""
        with (self.log_dir / "compositing.log").open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        rows = [tuple(float(v) for v in m.groups()) for m in BATCH_LINE.finditer(text)]
        if not rows:
            return {"batches": 0}
        sizes = [int(r[0]) for r in rows]
        column = {
            name: [r[i] for r in rows]
            for i, name in enumerate(("", "prepare", "inference", "call", "composite", "total"))
            if name
        }
        return {
            "batches": len(rows),
            "frames": sum(sizes),
            "mean_batch_frames": round(statistics.fmean(sizes), 2),
            "single_frame_batches_pct": round(100 * sizes.count(1) / len(sizes), 1),
            "batch_size_counts": {str(b): sizes.count(b) for b in sorted(set(sizes))},
            "ms_p50": {name: pct(values, 50) for name, values in column.items()},
            "ms_p99": {name: pct(values, 99) for name, values in column.items()},
            "note": "per batch, from the compositing log: prepare (cache + crops), inference (the inference "
            "service's own time), call (the InferBatch call as compositing saw it), composite (paste + JPEG), total",
        }

    def pids(self) -> dict[str, int]:
        out = {"inference": self.inference.process.pid}
        if self.compositing is not None:
            out["compositing"] = self.compositing.process.pid
        return out

    def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        if self.compositing is not None:
            codes["compositing"] = self.compositing.stop(20)
        codes["inference"] = self.inference.stop(20)
        return codes


class Cpu:
    """CPU of this process (the clients), each server and the whole machine over a block, % of one core."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def snapshot(self) -> dict[str, float | None]:
        snap = {name: common.process_cpu_seconds(pid) for name, pid in self.pids.items()}
        snap["bench"] = common.process_cpu_seconds(None)
        snap["machine"] = common.system_cpu_busy_seconds()
        snap["wall"] = time.perf_counter()
        return snap

    @staticmethod
    def usage(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float | None]:
        wall = max(float(b["wall"]) - float(a["wall"]), 1e-9)
        out: dict[str, float | None] = {}
        for name in a:
            if name == "wall":
                continue
            x, y = a[name], b[name]
            out[f"{name}_cpu_pct"] = None if x is None or y is None else round((y - x) / wall * 100, 1)
        known = [out.get(f"{n}_cpu_pct") for n in a if n not in ("wall", "machine")]
        if out.get("machine_cpu_pct") is not None and None not in known:
            out["other_cpu_pct"] = round(max(out["machine_cpu_pct"] - sum(known), 0.0), 1)
        return out


# -- sessions ------------------------------------------------------------------------------------------------


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
        "time_to_first_frame_ms_p50": pct([r["ttff_ms"] for r in runs if r["ttff_ms"] is not None], 50),
        "time_to_first_frame_ms_max": round(max(r["ttff_ms"] or 0 for r in runs), 1),
        "latency_ms_p50": pct(latencies, 50),
        "latency_ms_p99": pct(latencies, 99),
        "latency_ms_max": round(max(latencies), 1),
        "latency_ms_p50_before_end_of_input": pct(steady, 50),
        "latency_ms_p99_before_end_of_input": pct(steady, 99),
        "latency_ms_p50_tail_frames": pct(tail, 50),
        "lag_ms_p50": pct(lags, 50),
        "lag_ms_p99": pct(lags, 99),
        "lag_ms_max": round(max(lags), 1),
    }
    if playout_ms is not None:
        late = [v - playout_ms for v in lags if v > playout_ms]
        out["late_frames"] = len(late)
        out["late_frames_pct"] = round(100 * len(late) / max(len(lags), 1), 2)
        out["sessions_with_late_frames"] = sum(any(v > playout_ms for v in r["lag_ms"]) for r in runs)
        out["worst_lateness_ms"] = round(max(late), 1) if late else 0.0
        by_second: dict[str, int] = {}
        for r in runs:
            for lag, ts in zip(r["lag_ms"], r["timestamps"], strict=True):
                if lag > playout_ms:
                    by_second[str(int(ts))] = by_second.get(str(int(ts)), 0) + 1
        out["late_frames_by_timestamp_second"] = dict(sorted(by_second.items(), key=lambda kv: int(kv[0])))
    return out


def concurrent(address: str, samples: np.ndarray, n: int, chunk_ms: float, spread_s: float) -> tuple[list, list]:
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
    """Every batch size a session uses (1..max_batch) at an utterance's start, middle and end."""
    started = time.perf_counter()
    total = frames_to_cover(len(samples))
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 28)]) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        for count in range(1, max_batch + 1):
            for first in (0, total // 2, total - count):
                lo, hi = required_samples(first, count, len(samples))
                lo, hi = (lo, hi) if hi > lo else (len(samples) - 1, len(samples))
                stub.InferBatchComposite(
                    pb.CompositeBatchRequest(
                        model_id=MODEL,
                        raw_audio=samples[lo:hi].tobytes(),
                        audio_encoding=inference_pb2.AUDIO_FLOAT32,
                        sample_rate=16000,
                        audio_offset_samples=lo,
                        utterance_samples=len(samples),
                        first_frame=first,
                        batch_size=count,
                        start_frame_idx=first,
                    ),
                    timeout=120,
                )
    return time.perf_counter() - started


def strip(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k not in ("latency_ms", "lag_ms", "tail", "timestamps")}


# -- main ----------------------------------------------------------------------------------------------------


def run_config(name: str, inference_set: list[str], args: argparse.Namespace, samples: np.ndarray) -> dict[str, Any]:
    """Fresh servers with ``inference_set``; cold session, warm-up, single sessions, then the concurrency ramp."""
    levels = [int(v) for v in args.levels.split(",") if v.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    out: dict[str, Any] = {"inference_set": inference_set}
    servers = None
    started = time.perf_counter()
    try:
        common.log(f"[{name}] starting inference {inference_set or '(models/inference.yaml as is)'} + compositing")
        servers = Servers(args.models_dir.resolve(), work, inference_set)
        meter = Cpu(servers.pids())
        out["startup_seconds"] = round(servers.startup_seconds, 1)

        offset = servers.log_size()
        cold = run_session(servers.address, samples[: 3 * 16000], 0, args.chunk_ms)
        out["cold"] = {
            **summarize_sessions([cold]),
            "server_batches": servers.batches_since(offset),
            "note": "one 3 s real-time session on fresh servers: the tail is flushed in batches of 8 and 3, "
            "shapes ORT has not run yet (the start-up warm-up runs batch 1 only)",
        }
        common.log(
            f"[{name}] cold: latency p50 {out['cold']['latency_ms_p50']} ms, "
            f"tail frames {out['cold']['latency_ms_p50_tail_frames']} ms"
        )
        out["warm_up_seconds"] = round(warm_shapes(servers.address, samples, 8), 2)

        offset = servers.log_size()
        before = meter.snapshot()
        singles = [run_session(servers.address, samples, 0, args.chunk_ms) for _ in range(args.single_runs)]
        single = summarize_sessions(singles)
        single["cpu"] = Cpu.usage(before, meter.snapshot())
        single["server_batches"] = servers.batches_since(offset)
        single["runs"] = [strip(r) for r in singles]
        out["single"] = single
        playout = single["lag_ms_p99"] + PLAYOUT_MARGIN_MS
        out["playout_delay_ms"] = round(playout, 1)
        out["playout_delay_rule"] = (
            f"single-session p99 lag ({single['lag_ms_p99']} ms: p99 latency {single['latency_ms_p99']} ms plus the "
            f"model's look-ahead and chunking) + {PLAYOUT_MARGIN_MS:.0f} ms. The p99 latency alone + 200 ms "
            f"({single['latency_ms_p99'] + PLAYOUT_MARGIN_MS:.0f} ms) is shorter than the look-ahead (frame 0 needs "
            "the first 450 ms of audio, sent with the chunk ending at 480 ms), so against it every frame would be late."
        )
        common.log(
            f"[{name}] single: ttff {single['time_to_first_frame_ms_p50']} ms, latency p50 {single['latency_ms_p50']}"
            f" / p99 {single['latency_ms_p99']} ms, lag p99 {single['lag_ms_p99']} ms -> playout delay {playout:.0f} ms"
        )

        out["concurrency"] = {}
        late_levels = 0
        for n in levels:
            if time.perf_counter() - started > args.budget_seconds:
                common.log(f"[{name}] budget of {args.budget_seconds:.0f} s spent: no level {n}")
                break
            offset = servers.log_size()
            before = meter.snapshot()
            runs, errors = concurrent(servers.address, samples, n, args.chunk_ms, args.spread_seconds)
            level = summarize_sessions(runs, playout) if runs else {"sessions": 0}
            level["errors"] = errors
            level["cpu"] = Cpu.usage(before, meter.snapshot())
            level["server_batches"] = servers.batches_since(offset)
            out["concurrency"][str(n)] = level
            common.log(
                f"[{name}] N={n:2d}: {level.get('frames')} frames, late {level.get('late_frames')} "
                f"({level.get('sessions_with_late_frames')} sessions), latency p50 {level.get('latency_ms_p50')} / "
                f"p99 {level.get('latency_ms_p99')} ms, errors {len(errors)}, cpu {level['cpu']}"
            )
            if errors or level.get("late_frames", 1) > 0:
                late_levels += 1
                if late_levels >= args.stop_after_late_levels:
                    break
    finally:
        if servers is not None:
            out["exit_codes"] = servers.stop()
        shutil.rmtree(work, ignore_errors=True)
    on_time = [int(n) for n, lv in out["concurrency"].items() if not lv["errors"] and lv.get("late_frames") == 0]
    contiguous = 0
    for n in sorted(int(n) for n in out["concurrency"]):
        if n not in on_time:
            break
        contiguous = n
    out["max_realtime_sessions"] = max(on_time, default=0)
    out["max_realtime_sessions_all_smaller_on_time"] = contiguous
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


CONFIGS = {
    "default": [],  # models/inference.yaml as shipped: ORT allow_spinning true (its default)
    "no_spin": ["onnx.allow_spinning=false"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/stream.json"))
    parser.add_argument("--levels", default="1,2,4,6,8,10,12,14,16", help="concurrent sessions to try, ascending")
    parser.add_argument("--configs", default="default,no_spin", help=f"inference configs: {', '.join(CONFIGS)}")
    parser.add_argument("--single-runs", type=int, default=2)
    parser.add_argument("--chunk-ms", type=float, default=40.0)
    parser.add_argument("--spread-seconds", type=float, default=1.0, help="session starts spread over this")
    parser.add_argument("--stop-after-late-levels", type=int, default=2, help="stop a ramp after this many late levels")
    parser.add_argument("--budget-seconds", type=float, default=150.0, help="per config: no new level after this")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := set(configs) - set(CONFIGS):
        parser.error(f"--configs: unknown {sorted(unknown)}")
    tune_malloc()  # the bench process is the client: the services' allocator settings
    started = time.perf_counter()
    machine = common.machine_info()
    generated = common.ensure_models(args.models_dir.resolve())
    samples = read_speech(SPEECH)
    result: dict[str, Any] = {
        "benchmark": "stream: real-time sessions (StreamSession) on one compositing replica",
        "settings": {
            "model": MODEL,
            "topology": "lipsync-inference (models/inference.yaml, plus the config's --set) + one "
            "lipsync-compositing (models/compositing.yaml, --inference-url; session defaults: max_batch_frames 8, "
            "buffer_frames 100), loopback, no load balancer; fresh processes per config",
            "client": "lipsync_client.LipsyncSession per session (own channel, a feeder thread and a reader thread), "
            "in this process",
            "audio": f"{SPEECH.name}: {len(samples) / 16000:.2f} s per session, float32 on the wire",
            "chunk_ms": args.chunk_ms,
            "pace": "real time: chunk i is sent at capture start + its end time (as a live source has it)",
            "concurrency": f"N sessions in threads, starts spread over {args.spread_seconds:g} s, start frames "
            "(i * 17) mod 125; levels stop after "
            f"{args.stop_after_late_levels} levels with late frames or errors",
            "latency": "send time of the chunk completing the samples a frame needs (plan_batch(k,1,10**12)."
            "sample_hi; tail frames: the end_of_input's send time) -> the frame's arrival",
            "lag": "arrival - (capture start + frame timestamp): latency + the model's audio look-ahead + chunking",
            "late": "lag > playout delay, i.e. arrival > capture start + frame timestamp + playout delay",
            "models_generated_now": generated,
        },
        "configs": {},
    }
    for name in configs:
        result["configs"][name] = run_config(name, CONFIGS[name], args, samples)
    summary: dict[str, Any] = {}
    for name, c in result["configs"].items():
        summary[name] = {
            "time_to_first_frame_ms": c["single"]["time_to_first_frame_ms_p50"],
            "latency_ms_p50": c["single"]["latency_ms_p50"],
            "latency_ms_p99": c["single"]["latency_ms_p99"],
            "latency_ms_p99_before_end_of_input": c["single"]["latency_ms_p99_before_end_of_input"],
            "lag_ms_p99": c["single"]["lag_ms_p99"],
            "playout_delay_ms": c["playout_delay_ms"],
            "cold_tail_latency_ms_p50": c["cold"]["latency_ms_p50_tail_frames"],
            "inference_cpu_pct_1_session": c["single"]["cpu"].get("inference_cpu_pct"),
            "max_realtime_sessions": c["max_realtime_sessions"],
            "late_frames_by_sessions": {n: lv.get("late_frames") for n, lv in c["concurrency"].items()},
            "latency_ms_p99_by_sessions": {n: lv.get("latency_ms_p99") for n, lv in c["concurrency"].items()},
        }
    result["summary"] = summary
    first = result["configs"][configs[0]]
    result["max_realtime_sessions"] = first["max_realtime_sessions"]
    result["max_realtime_sessions_config"] = configs[0]
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    common.write_result(args.out, result, machine)
    common.log(f"wrote {args.out} in {result['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
