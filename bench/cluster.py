"""The cluster: throughput through nginx with 1 versus 2 compositing replicas, and the cost of the nginx hop.

One run, one cluster (one inference server, two compositing replicas, nginx, all real processes on loopback via
lipsync_cluster), plus a second nginx whose upstream is only replica 1. Three modes, interleaved in blocks so the
shared machine's noise hits them alike:

- ``two``:    nginx -> both replicas
- ``one``:    nginx -> replica 1 only
- ``direct``: straight to replica 1 (no load balancer)

Load: the ``demo`` model (compositing dominates: JPEG-encoding 1280x720 frames costs far more than the demo
model), batches of 8 frames with server-built visuals, ``--in-flight`` requests kept in flight by client threads,
each with its own channel. ``scaling_2_vs_1`` = two / one; ``lb_hop`` = one / direct (and the median
single-request latency with and without nginx).

On this 2-core machine the client, nginx, the inference server and both replicas share the same two cores, so
scaling is bounded by the cores, not by the design; the JSON records CPU use per block.

    .venv/bin/python -m bench.cluster --models-dir models --out bench/results/cluster.json
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import grpc

from lipsync_cluster import nginx
from lipsync_cluster.launcher import Cluster, ClusterSpec
from service_common.allocator import tune_malloc
from service_common.processes import free_port
from shared_proto import compositing_pb2_grpc

from . import harness
from .harness import CHANNEL_OPTIONS, Meter, closed_loop, log, median, throughput
from .walk import walk

BATCH = 8


def block(address: str, seconds: float, in_flight: int) -> dict[str, Any]:
    """Frames/s with ``in_flight`` client threads (a channel each) doing back-to-back calls; per-call latencies."""
    channels = [grpc.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(in_flight)]
    errors: list[str] = []
    calls = [
        walk(compositing_pb2_grpc.CompositingServiceStub(c), BATCH, i * 37, errors) for i, c in enumerate(channels)
    ]
    meter = Meter({"server": None})  # no server of its own: the column stays, empty, as the results have it
    before = meter.snapshot()
    try:
        done = closed_loop(calls, seconds)
    finally:
        for channel in channels:
            channel.close()
    usage = Meter.percent(before, meter.snapshot())
    ok = [(at, latency) for at, latency in done if latency is not None]
    return {
        "fps": round(throughput([at for at, _ in ok], BATCH), 2),
        "requests": len(ok),
        "latency_ms_p50": round(statistics.median(latency * 1000 for _, latency in ok), 2),
        "errors": len(errors),
        "cpu": usage,
    }


def single_latency(address: str, count: int) -> float:
    """Median ms of one-frame calls made one at a time."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = walk(compositing_pb2_grpc.CompositingServiceStub(channel), 1, 0)
        return statistics.median(call() * 1000 for _ in range(count))


def measure(addresses: dict[str, str], args: Any) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """Rounds of a block per mode; then the single-frame latency of each."""
    for address in addresses.values():  # warm every path and the background cache
        block(address, 2.0, args.in_flight)
    blocks: dict[str, list[dict[str, Any]]] = {mode: [] for mode in addresses}
    for round_ in range(args.rounds):
        for mode, address in addresses.items():
            result = block(address, args.seconds, args.in_flight)
            blocks[mode].append(result)
            log(f"round {round_ + 1} {mode:6s} {result['fps']:7.2f} fps  p50 {result['latency_ms_p50']} ms")
    return blocks, {mode: round(single_latency(address, 30), 2) for mode, address in addresses.items()}


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "bench/results/cluster.json")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args(argv)
    tune_malloc()
    started, machine = time.perf_counter(), harness.machine_info()
    harness.ensure_models(args.models_dir)
    binary = nginx.find_nginx()
    if binary is None:
        print(nginx.install_hint(), file=sys.stderr)
        return 1
    spec = ClusterSpec(models_dir=args.models_dir, port=free_port(), replicas=2)
    with Cluster(spec) as cluster, harness.fleet("lipsync-bench-nginx-") as fleet:
        nginx.prepare_prefix(fleet.work)
        one_port, replica1 = free_port(), cluster.replicas[0].process.address
        (fleet.work / "nginx.conf").write_text(nginx.render(fleet.work, "127.0.0.1", one_port, [replica1]))
        single = fleet.add("nginx-one", nginx.command(binary, fleet.work), one_port).wait_serving(30)
        blocks, latency = measure({"two": cluster.address, "one": single.address, "direct": replica1}, args)
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
        "fps": {mode: round(median([b["fps"] for b in bs]), 2) for mode, bs in blocks.items()},
        "scaling_2_vs_1": round(median(scaling), 3),
        "lb_hop": {
            "throughput_ratio_nginx_vs_direct": round(median(hop), 3),
            "single_frame_latency_ms": latency,
            "added_latency_ms": round(latency["one"] - latency["direct"], 2),
        },
        "blocks": blocks,
    }
    harness.finish(args.out, result, machine, started)
    log(f"scaling_2_vs_1 {result['scaling_2_vs_1']}, nginx/direct {result['lb_hop']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
