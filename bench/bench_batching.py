"""Dynamic batching on the CPU: N concurrent clients each sending 1-4 frame requests, with and without it.

For each model (``demo``, ``unet328``) two ``lipsync-inference`` processes run side by side on loopback: one with
the model's batching off (the default) and one with ``models.<id>.batching.enabled=true``. For N = 1, 4 and 16
clients (one channel and thread each, its own ``x-client-id``), every client sends InferBatch requests of 1-4
frames (uint8 visuals and per-frame audio features in, uint8 mouths out), one after another, for a block of
seconds. Blocks alternate off, on, off, on so the shared machine's noise hits both alike. Reported per model
and N: frames/s, p50 and p99 request latency for each mode, the ratios on/off, and the mean frames per forward
pass the batching server formed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from service_common.allocator import tune_malloc
from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

CLIENTS = (1, 4, 16)
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
BLOCK_SECONDS = {"demo": 4.0, "unet328": 8.0}


def requests_for(model: str, seed: int) -> list[pb.InferBatchRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for frames in (1, 2, 3, 4):
        out.append(
            pb.InferBatchRequest(
                model_id=model,
                visual_frames=rng.integers(0, 256, (frames, 6, 320, 320), np.uint8).tobytes(),
                visual_dtype=pb.DTYPE_UINT8,
                audio_features=rng.uniform(0, 1, (frames, 32, 16, 16)).astype(np.float32).tobytes(),
                audio_features_shape=[frames, 32, 16, 16],
                batch_size=frames,
                output_dtype=pb.DTYPE_UINT8,
            )
        )
    return out


def block(address: str, model: str, clients: int, seconds: float, seed: int) -> dict:
    latencies: list[float] = []
    frames_done = [0]
    batch_frames: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_at = time.perf_counter() + 0.2
    stop_at = start_at + seconds

    def client(index: int) -> None:
        rng = np.random.default_rng(seed * 1000 + index)
        pool = requests_for(model, seed * 1000 + index)
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            metadata = [("x-client-id", f"client-{index}")]
            stub.InferBatch(pool[0], timeout=120, metadata=metadata)  # connect before the clock starts
            while time.perf_counter() < start_at:
                time.sleep(0.001)
            while time.perf_counter() < stop_at:
                request = pool[int(rng.integers(0, 4))]
                began = time.perf_counter()
                try:
                    reply = stub.InferBatch(request, timeout=120, metadata=metadata)
                except grpc.RpcError as exc:
                    with lock:
                        errors.append(exc.code().name)
                    continue
                ended = time.perf_counter()
                with lock:
                    if ended <= stop_at:
                        latencies.append(ended - began)
                        frames_done[0] += request.batch_size
                        batch_frames.append(reply.batch_frames)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} errors: {sorted(set(errors))}")
    return {
        "frames_per_s": round(frames_done[0] / seconds, 2),
        "requests": len(latencies),
        "latency_ms_p50": round(float(np.percentile(latencies, 50)) * 1000, 2),
        "latency_ms_p99": round(float(np.percentile(latencies, 99)) * 1000, 2),
        "mean_frames_per_pass": round(float(np.mean(batch_frames)), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/batching.json"))
    parser.add_argument("--models", default="demo,unet328")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the block lengths")
    parser.add_argument("--max-batch-frames", type=int, default=16)
    parser.add_argument(
        "--delays", default="0,2", help="batching.max_queue_delay_ms values to measure, each against off (ms)"
    )
    args = parser.parse_args()
    tune_malloc()
    common.ensure_models(args.models_dir)
    config = str((args.models_dir / "inference.yaml").resolve())
    bin_dir = Path(sys.executable).parent
    result: dict = {
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
        "models": {},
    }
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        seconds = BLOCK_SECONDS.get(model, 4.0) * args.scale
        base = [str(bin_dir / "lipsync-inference"), "--config", config, "--host", "127.0.0.1", "--log-level", "WARNING"]
        base += ["--set", "logging.requests=false", "--set", f"models.{model}.preload=true"]
        delays = [float(d) for d in args.delays.split(",")]
        argvs = {"off": base}
        for delay in delays:
            argv = list(base)
            for item in (
                f"models.{model}.batching.enabled=true",
                f"models.{model}.batching.max_batch_frames={args.max_batch_frames}",
                f"models.{model}.batching.max_queue_delay_ms={delay}",
            ):
                argv += ["--set", item]
            argvs[f"on_{delay:g}ms"] = argv
        modes = list(argvs)
        common.log(f"{model}: starting inference servers: {', '.join(modes)}")
        servers = {mode: common.start_server(argv) for mode, argv in argvs.items()}
        per_n: dict = {}
        try:
            for clients in CLIENTS:
                blocks: dict[str, list[dict]] = {mode: [] for mode in modes}
                for round_ in range(args.rounds):
                    for mode in modes if round_ % 2 == 0 else list(reversed(modes)):
                        outcome = block(servers[mode].address, model, clients, seconds, round_)
                        blocks[mode].append(outcome)
                        common.log(f"{model} N={clients:2d} {mode:8s}: {outcome}")

                def med(mode: str, key: str, blocks: dict[str, list[dict]] = blocks) -> float:
                    return round(statistics.median(b[key] for b in blocks[mode]), 2)

                keys = ("frames_per_s", "latency_ms_p50", "latency_ms_p99", "mean_frames_per_pass")
                entry: dict = {mode: {k: med(mode, k) for k in keys} for mode in modes}
                for mode in modes[1:]:
                    entry[f"{mode}_vs_off"] = {
                        "throughput": round(med(mode, "frames_per_s") / med("off", "frames_per_s"), 3),
                        "p50": round(med(mode, "latency_ms_p50") / med("off", "latency_ms_p50"), 3),
                        "p99": round(med(mode, "latency_ms_p99") / med("off", "latency_ms_p99"), 3),
                    }
                entry["blocks"] = blocks
                per_n[str(clients)] = entry
        finally:
            for server in servers.values():
                server.stop()
        result["models"][model] = {"block_seconds": seconds, "clients": per_n}
    result["summary"] = {
        f"{model}_N{n}": {k: val for k, val in v.items() if k.endswith("_vs_off")}
        for model, m in result["models"].items()
        for n, v in m["clients"].items()
    }
    path = common.write_result(args.out, result)
    common.log(f"wrote {path}")
    for key, value in result["summary"].items():
        print(key, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
