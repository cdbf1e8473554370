"""Real-time sessions: time to first frame, per-frame latency, and how many real-time sessions one replica sustains.

One inference process and one compositing process (the console scripts, on loopback, like bench/compositing.py),
the ``demo`` model, and clients using ``lipsync_client.LipsyncSession``: every session is fed the committed speech
(8.36 s) in 40 ms chunks at real-time pace, as a live source would (chunk ``i`` is sent once its last sample has
been "captured", i.e. at capture start + its end time).

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
and stage times from those lines (bench/stream_sessions.py). CPU per level: this process (the clients), both
servers, the machine.

    .venv/bin/python -m bench.stream --models-dir models --out bench/results/stream.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lipsync_client.media import read_speech
from service_common.allocator import tune_malloc

from . import harness
from .harness import REPO_ROOT, Meter, log
from .stream_sessions import (
    MODEL,
    batches_since,
    concurrent,
    log_size,
    run_session,
    strip,
    summarize_sessions,
    warm_shapes,
)

SPEECH = REPO_ROOT / "tests" / "data" / "speech_16k.wav"
PLAYOUT_MARGIN_MS = 200.0
CONFIGS = {
    "default": [],  # models/inference.yaml as shipped: ORT allow_spinning true (its default)
    "no_spin": ["onnx.allow_spinning=false"],
}


@dataclass
class Replica:
    """The running pair of one config: where sessions go, the compositing log, and the CPU meter."""

    address: str
    log: Path
    meter: Meter
    samples: np.ndarray
    args: argparse.Namespace

    def phase(self, measure: Any) -> dict[str, Any]:
        """``measure()``'s summary with the CPU and the server's batches over it."""
        offset, before = log_size(self.log), self.meter.snapshot()
        out = measure()
        out["cpu"] = Meter.percent(before, self.meter.snapshot())
        out["server_batches"] = batches_since(self.log, offset)
        return out


def start(fleet: harness.Fleet, models_dir: Path, inference_set: list[str]) -> harness.ServiceProcess:
    """``lipsync-inference`` with the config's ``--set``s, and one ``lipsync-compositing`` that logs its batches."""
    sets = [a for kv in inference_set for a in ("--set", kv)]
    inference = fleet.start("inference", "lipsync-inference", ["--config", str(models_dir / "inference.yaml"), *sets])
    inference.wait_serving(180)
    args = ["--config", str(models_dir / "compositing.yaml"), "--inference-url", inference.address]
    args += ["--set", f"frames_cache_dir={fleet.work / 'frames'}", "--set", "logging.log_inference_times=true"]
    return fleet.start("compositing", "lipsync-compositing", args, log_level="INFO").wait_serving(300)


def cold(name: str, replica: Replica) -> dict[str, Any]:
    offset = log_size(replica.log)
    session = run_session(replica.address, replica.samples[: 3 * 16000], 0, replica.args.chunk_ms)
    out = {
        **summarize_sessions([session]),
        "server_batches": batches_since(replica.log, offset),
        "note": "one 3 s real-time session on fresh servers: the tail is flushed in batches of 8 and 3, "
        "shapes ORT has not run yet (the start-up warm-up runs batch 1 only)",
    }
    log(f"[{name}] cold: latency p50 {out['latency_ms_p50']} ms, tail frames {out['latency_ms_p50_tail_frames']} ms")
    return out


def single(name: str, replica: Replica, out: dict[str, Any]) -> float:
    """Sessions one at a time into ``out``; the playout delay they give."""
    runs: list[dict[str, Any]] = []

    def measure() -> dict[str, Any]:
        runs.extend(
            run_session(replica.address, replica.samples, 0, replica.args.chunk_ms)
            for _ in range(replica.args.single_runs)
        )
        return summarize_sessions(runs)

    result = out["single"] = replica.phase(measure)
    result["runs"] = [strip(r) for r in runs]
    playout = result["lag_ms_p99"] + PLAYOUT_MARGIN_MS
    out["playout_delay_ms"] = round(playout, 1)
    out["playout_delay_rule"] = (
        f"single-session p99 lag ({result['lag_ms_p99']} ms: p99 latency {result['latency_ms_p99']} ms plus the "
        f"model's look-ahead and chunking) + {PLAYOUT_MARGIN_MS:.0f} ms. The p99 latency alone + 200 ms "
        f"({result['latency_ms_p99'] + PLAYOUT_MARGIN_MS:.0f} ms) is shorter than the look-ahead (frame 0 needs "
        "the first 450 ms of audio, sent with the chunk ending at 480 ms), so against it every frame would be late."
    )
    log(
        f"[{name}] single: ttff {result['time_to_first_frame_ms_p50']} ms, latency p50 {result['latency_ms_p50']}"
        f" / p99 {result['latency_ms_p99']} ms, lag p99 {result['lag_ms_p99']} ms -> playout delay {playout:.0f} ms"
    )
    return playout


def level(replica: Replica, n: int, playout: float) -> dict[str, Any]:
    """``n`` concurrent real-time sessions, their frames judged against ``playout``."""
    args = replica.args

    def measure() -> dict[str, Any]:
        runs, errors = concurrent(replica.address, replica.samples, n, args.chunk_ms, args.spread_seconds)
        return {**(summarize_sessions(runs, playout) if runs else {"sessions": 0}), "errors": errors}

    return replica.phase(measure)


def ramp(name: str, replica: Replica, playout: float, started: float) -> dict[str, Any]:
    """The levels in turn, until the budget is spent or ``--stop-after-late-levels`` levels were late."""
    args, levels, late_levels = replica.args, {}, 0
    for n in [int(v) for v in args.levels.split(",") if v.strip()]:
        if time.perf_counter() - started > args.budget_seconds:
            log(f"[{name}] budget of {args.budget_seconds:.0f} s spent: no level {n}")
            break
        result = levels[str(n)] = level(replica, n, playout)
        log(
            f"[{name}] N={n:2d}: {result.get('frames')} frames, late {result.get('late_frames')} "
            f"({result.get('sessions_with_late_frames')} sessions), latency p50 {result.get('latency_ms_p50')} / "
            f"p99 {result.get('latency_ms_p99')} ms, errors {len(result['errors'])}, cpu {result['cpu']}"
        )
        if result["errors"] or result.get("late_frames", 1) > 0:
            late_levels += 1
            if late_levels >= args.stop_after_late_levels:
                break
    return levels


def max_sessions(levels: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """The largest N with no late frame and no error, and the largest N up to which every level was so."""
    on_time = {int(n) for n, lv in levels.items() if not lv["errors"] and lv.get("late_frames") == 0}
    contiguous = 0
    for n in sorted(int(n) for n in levels):
        if n not in on_time:
            break
        contiguous = n
    return max(on_time, default=0), contiguous


def run_config(name: str, inference_set: list[str], args: argparse.Namespace, samples: np.ndarray) -> dict[str, Any]:
    """Fresh servers with ``inference_set``; cold session, warm-up, single sessions, then the concurrency ramp."""
    out: dict[str, Any] = {"inference_set": inference_set}
    started = time.perf_counter()
    with harness.fleet("bench-stream-") as fleet:
        log(f"[{name}] starting inference {inference_set or '(models/inference.yaml as is)'} + compositing")
        compositing = start(fleet, args.models_dir.resolve(), inference_set)
        out["startup_seconds"] = round(time.perf_counter() - started, 1)
        meter = Meter({"inference": fleet.procs["inference"].process.pid, "compositing": compositing.process.pid})
        replica = Replica(compositing.address, fleet.log_path("compositing"), meter, samples, args)
        try:
            out["cold"] = cold(name, replica)
            out["warm_up_seconds"] = round(warm_shapes(replica.address, samples, 8), 2)
            playout = single(name, replica, out)
            out["concurrency"] = ramp(name, replica, playout, started)
        finally:
            out["exit_codes"] = {n: p.stop(20) for n, p in reversed(fleet.procs.items())}
    out["max_realtime_sessions"], out["max_realtime_sessions_all_smaller_on_time"] = max_sessions(out["concurrency"])
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def settings(args: argparse.Namespace, samples: np.ndarray, generated: bool) -> dict[str, Any]:
    return {
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
    }


def summarize(c: dict[str, Any]) -> dict[str, Any]:
    """One config's headline figures."""
    return {
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


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "bench/results/stream.json")
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
    started, machine = time.perf_counter(), harness.machine_info()
    generated = harness.ensure_models(args.models_dir.resolve())
    samples = read_speech(SPEECH)
    result: dict[str, Any] = {
        "benchmark": "stream: real-time sessions (StreamSession) on one compositing replica",
        "settings": settings(args, samples, generated),
        "configs": {name: run_config(name, CONFIGS[name], args, samples) for name in configs},
    }
    result["summary"] = {name: summarize(c) for name, c in result["configs"].items()}
    result["max_realtime_sessions"] = result["configs"][configs[0]]["max_realtime_sessions"]
    result["max_realtime_sessions_config"] = configs[0]
    harness.finish(args.out, result, machine, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
