"""The cluster: throughput through nginx with 1 versus 2 compositing replicas, and the cost of the nginx hop.

One run, one cluster (one inference server, two compositing replicas, nginx,
all real processes on loopback via lipsync_cluster), plus a second nginx
whose upstream is only replica 1. Three modes, interleaved in blocks so the
shared machine's noise hits them alike:

- ``two``:    nginx -> both replicas
- ``one``:    nginx -> replica 1 only
- ``direct``: straight to replica 1 (no load balancer)

Load: the ``demo`` model (compositing dominates: JPEG-encoding 1280x720
frames costs far more than the demo model), batches of 8 frames with
server-built visuals, ``--in-flight`` requests kept in flight by client
threads. ``scaling_2_vs_1`` = two / one; ``lb_hop`` = one / direct (and the
median single-request latency with and without nginx).

On this 2-core machine the client, nginx, the inference server and both
replicas share the same two cores, so scaling is bounded by the cores, not
by the design; the JSON records CPU use per block.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from lipsync_cluster import nginx
from lipsync_cluster.launcher import Cluster, ClusterSpec
from service_common.allocator import tune_malloc
from service_common.processes import ServiceProcess, free_port, wait_serving
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

BATCH = 8
WINDOW = np.full((32, 16, 16), 0.6, np.float32).tobytes()
OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


def block(address: str, seconds: float, in_flight: int) -> dict:
    """Frames/s with ``in_flight`` client threads doing back-to-back calls; per-call latencies."""
    stamps: list[float] = []
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    errors = []

    def worker(offset: int) -> None:
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            stub = compositing_pb2_grpc.CompositingServiceStub(channel)
            start = offset * 37
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                try:
                    stub.InferBatchComposite(
                        pb.CompositeBatchRequest(
                            model_id="demo", audio_features=WINDOW, batch_size=BATCH, start_frame_idx=start
                        ),
                        timeout=60,
                    )
                except grpc.RpcError as exc:
                    errors.append(exc.code().name)
                    continue
                done = time.perf_counter()
                with lock:
                    stamps.append(done)
                    latencies.append((done - sent) * 1000)
                start += BATCH

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(in_flight)]
    meter = common.CpuMeter()
    before = meter.snapshot()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    usage = common.CpuMeter.usage(before, meter.snapshot())
    return {
        "fps": round(common.throughput(stamps, BATCH), 2),
        "requests": len(stamps),
        "latency_ms_p50": round(statistics.median(latencies), 2),
        "errors": len(errors),
        "cpu": usage,
    }


def single_latency(address: str, count: int) -> float:
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        times = []
        for i in range(count):
            sent = time.perf_counter()
            stub.InferBatchComposite(
                pb.CompositeBatchRequest(model_id="demo", audio_features=WINDOW, batch_size=1, start_frame_idx=i),
                timeout=60,
            )
            times.append((time.perf_counter() - sent) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/cluster.json"))
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    tune_malloc()
    common.ensure_models(args.models_dir)
    binary = nginx.find_nginx()
    if binary is None:
        print(nginx.install_hint(), file=sys.stderr)
        return 1
    started = time.perf_counter()
    spec = ClusterSpec(models_dir=args.models_dir, port=free_port(), replicas=2)
    with Cluster(spec) as cluster, tempfile.TemporaryDirectory(prefix="lipsync-bench-nginx-") as tmp:
        prefix = Path(tmp)
        nginx.prepare_prefix(prefix)
        one_port = free_port()
        replica1 = cluster.replicas[0].process.address
        (prefix / "nginx.conf").write_text(nginx.render(prefix, "127.0.0.1", one_port, [replica1]))
        with ServiceProcess(nginx.command(binary, prefix), one_port) as single:
            wait_serving(single.address, 30, single.process)
            addresses = {"two": cluster.address, "one": single.address, "direct": replica1}
            for address in addresses.values():  # warm every path and the background cache
                block(address, 2.0, args.in_flight)
            blocks: dict[str, list[dict]] = {mode: [] for mode in addresses}
            for round_ in range(args.rounds):
                for mode, address in addresses.items():
                    result = block(address, args.seconds, args.in_flight)
                    blocks[mode].append(result)
                    common.log(
                        f"round {round_ + 1} {mode:6s} {result['fps']:7.2f} fps  p50 {result['latency_ms_p50']} ms"
                    )
            latency = {mode: round(single_latency(address, 30), 2) for mode, address in addresses.items()}
    scaling = [t["fps"] / o["fps"] for t, o in zip(blocks["two"], blocks["one"], strict=True)]
    hop = [o["fps"] / d["fps"] for o, d in zip(blocks["one"], blocks["direct"], strict=True)]
    result = {
        "benchmark": "cluster: nginx -> 2 vs 1 compositing replicas, and nginx vs direct",
        "settings": {
            "model": "demo",
            "batch_size": BATCH,
            "in_flight": args.in_flight,
            "block_seconds": args.seconds,
            "rounds": args.rounds,
            "topology": "1 inference server, 2 compositing replicas, nginx; loopback",
        },
        "fps": {mode: round(common.median([b["fps"] for b in bs]), 2) for mode, bs in blocks.items()},
        "scaling_2_vs_1": round(common.median(scaling), 3),
        "lb_hop": {
            "throughput_ratio_nginx_vs_direct": round(common.median(hop), 3),
            "single_frame_latency_ms": latency,
            "added_latency_ms": round(latency["one"] - latency["direct"], 2),
        },
        "blocks": blocks,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    common.write_result(args.out, result)
    common.log(f"scaling_2_vs_1 {result['scaling_2_vs_1']}, nginx/direct {result['lb_hop']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
