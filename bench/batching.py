"""Dynamic batching on the CPU: N concurrent clients each sending 1-4 frame requests, with and without it.

For each model (``demo``, ``unet328``) ``lipsync-inference`` processes run side by side on loopback: one with the
model's batching off (the default) and one per ``--delays`` value with ``models.<id>.batching.enabled=true`` and
that ``max_queue_delay_ms``. For N = 1, 4 and 16 clients (one channel and thread each, its own ``x-client-id``),
every client sends InferBatch requests of 1-4 frames (uint8 visuals and per-frame audio features in, uint8 mouths
out), one after another, for a block of seconds. Blocks go off, on, ..., then reversed, so the shared machine's
noise hits every mode alike. Reported per model and N: frames/s, p50 and p99 request latency for each mode, the
ratios on/off, and the mean frames per forward pass the batching server formed.

    .venv/bin/python -m bench.batching --models-dir models --out bench/results/batching.json
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from service_common.allocator import tune_malloc
from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc

from . import harness
from .harness import CHANNEL_OPTIONS, Fleet, closed_loop, log, percentile, throughput

CLIENTS = (1, 4, 16)
BLOCK_SECONDS = {"demo": 4.0, "unet328": 8.0}
FIGURES = ("frames_per_s", "latency_ms_p50", "latency_ms_p99", "mean_frames_per_pass")


def requests_for(model: str, seed: int) -> list[pb.InferBatchRequest]:
    """One request of each size, 1-4 frames, with the uint8 contract."""
    rng = np.random.default_rng(seed)
    return [
        pb.InferBatchRequest(
            model_id=model,
            visual_frames=rng.integers(0, 256, (frames, 6, 320, 320), np.uint8).tobytes(),
            visual_dtype=pb.DTYPE_UINT8,
            audio_features=rng.uniform(0, 1, (frames, 32, 16, 16)).astype(np.float32).tobytes(),
            audio_features_shape=[frames, 32, 16, 16],
            batch_size=frames,
            output_dtype=pb.DTYPE_UINT8,
        )
        for frames in (1, 2, 3, 4)
    ]


def client(channel: grpc.Channel, model: str, index: int, seed: int) -> Callable[[], tuple[float, int, int]]:
    """Client ``index``: a call sending one of its requests at random; (latency s, frames, frames in the pass)."""
    rng = np.random.default_rng(seed * 1000 + index)
    pool = requests_for(model, seed * 1000 + index)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    metadata = [("x-client-id", f"client-{index}")]
    stub.InferBatch(pool[0], timeout=120, metadata=metadata)  # connect before the clock starts

    def call() -> tuple[float, int, int]:
        request = pool[int(rng.integers(0, 4))]
        began = time.perf_counter()
        reply = stub.InferBatch(request, timeout=120, metadata=metadata)
        return time.perf_counter() - began, request.batch_size, reply.batch_frames

    return call


def block(address: str, model: str, clients: int, seconds: float, seed: int) -> dict[str, Any]:
    channels = [grpc.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(clients)]
    try:
        done = closed_loop([client(c, model, i, seed) for i, c in enumerate(channels)], seconds)
    finally:
        for channel in channels:
            channel.close()
    latencies = [latency for latency, _, _ in done.replies]
    return {
        "frames_per_s": round(throughput(done.stamps, [frames for _, frames, _ in done.replies]), 2),
        "requests": len(done),
        "latency_ms_p50": percentile([v * 1000 for v in latencies], 50, 2),
        "latency_ms_p99": percentile([v * 1000 for v in latencies], 99, 2),
        "mean_frames_per_pass": round(float(np.mean([passed for _, _, passed in done.replies])), 2),
    }


def start_servers(fleet: Fleet, config: str, model: str, args: Any) -> dict[str, str]:
    """One server with batching off and one per delay; their addresses by mode."""
    base = ["--config", config, "--set", "logging.requests=false", "--set", f"models.{model}.preload=true"]
    modes = {"off": base}
    for delay in [float(d) for d in args.delays.split(",")]:
        on = ["enabled=true", f"max_batch_frames={args.max_batch_frames}", f"max_queue_delay_ms={delay}"]
        modes[f"on_{delay:g}ms"] = base + [a for kv in on for a in ("--set", f"models.{model}.batching.{kv}")]
    log(f"{model}: starting inference servers: {', '.join(modes)}")
    procs = {mode: fleet.start(f"{model}/{mode}", "lipsync-inference", argv) for mode, argv in modes.items()}
    return {mode: proc.wait_serving(180).address for mode, proc in procs.items()}


def compare(blocks: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians of each mode's blocks, and each batching mode's ratios to off."""

    def med(mode: str, key: str) -> float:
        return round(statistics.median(b[key] for b in blocks[mode]), 2)

    entry: dict[str, Any] = {mode: {k: med(mode, k) for k in FIGURES} for mode in blocks}
    for mode in list(blocks)[1:]:
        entry[f"{mode}_vs_off"] = {
            "throughput": round(med(mode, "frames_per_s") / med("off", "frames_per_s"), 3),
            "p50": round(med(mode, "latency_ms_p50") / med("off", "latency_ms_p50"), 3),
            "p99": round(med(mode, "latency_ms_p99") / med("off", "latency_ms_p99"), 3),
        }
    entry["blocks"] = blocks
    return entry


def bench_model(model: str, args: Any) -> dict[str, Any]:
    seconds = BLOCK_SECONDS.get(model, 4.0) * args.scale
    per_n: dict[str, Any] = {}
    with harness.fleet(f"bench-batching-{model}-") as fleet:
        addresses = start_servers(fleet, str((args.models_dir / "inference.yaml").resolve()), model, args)
        modes = list(addresses)
        for clients in CLIENTS:
            blocks: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
            for round_ in range(args.rounds):
                for mode in modes if round_ % 2 == 0 else modes[::-1]:
                    outcome = block(addresses[mode], model, clients, seconds, round_)
                    blocks[mode].append(outcome)
                    log(f"{model} N={clients:2d} {mode:8s}: {outcome}")
            per_n[str(clients)] = compare(blocks)
    return {"block_seconds": seconds, "clients": per_n}


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "bench/results/batching.json")
    parser.add_argument("--models", default="demo,unet328")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the block lengths")
    parser.add_argument("--max-batch-frames", type=int, default=16)
    parser.add_argument("--delays", default="0,2", help="batching.max_queue_delay_ms values, each against off (ms)")
    args = parser.parse_args(argv)
    tune_malloc()
    started, machine = time.perf_counter(), harness.machine_info()
    harness.ensure_models(args.models_dir)
    result: dict[str, Any] = {
        "benchmark": "batching",
        "description": __doc__.strip().splitlines()[0],
        "settings": {
            "clients": list(CLIENTS),
            "request_frames": "1-4, uniform",
            "rounds": args.rounds,
            "max_batch_frames": args.max_batch_frames,
            "max_queue_delay_ms": args.delays,
            "server": "lipsync-inference, models/inference.yaml, ORT intra-op threads: all cores, server.cpu_workers=1",
        },
        "models": {m.strip(): bench_model(m.strip(), args) for m in args.models.split(",") if m.strip()},
    }
    result["summary"] = {
        f"{model}_N{n}": {k: val for k, val in v.items() if k.endswith("_vs_off")}
        for model, m in result["models"].items()
        for n, v in m["clients"].items()
    }
    harness.finish(args.out, result, machine, started)
    for key, value in result["summary"].items():
        print(key, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
