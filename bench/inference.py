"""Bare ONNX Runtime throughput versus InferBatch through the inference service over gRPC, same machine, one run.

Why: the service must not cost real models their throughput (target: unet328 through the service at >= 0.95 of
bare), and where it does cost (the tiny demo model), we want to know where the time goes.

What runs: one real server process (``lipsync-inference``, one CPU worker, the same ORT thread settings as the
bare sessions) on a free loopback port, a real client channel in this process, and bare ``InferenceSession.run``
loops in this process. Bare and service blocks alternate; every service block is paired with the bare blocks just
before and after it, and ratios are medians of those pairs (the machine is shared and noisy, so absolute figures
move more than ratios). For the demo model, also: the server profiled under load (bench/inference_profile.py),
the gRPC floor (bench/inference_floor.py) and each step timed alone (bench/inference_steps.py). See
bench/README.md.

    .venv/bin/python -m bench.inference --models-dir models --out bench/results/inference.json
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import onnxruntime as ort

from service_common.allocator import tune_malloc
from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc as pb_grpc

from . import harness, inference_floor, inference_profile, inference_steps
from .harness import CHANNEL_OPTIONS, Meter, log, median
from .inference_calls import (
    F32_1,
    F32_2,
    MODES,
    U8_1,
    U8_2,
    Inputs,
    bare_block,
    bare_session,
    bytes_per_frame,
    check_outputs,
    make_request,
    server_args,
    service_block,
    session_settings,
)

TARGET_RATIO = {"unet328": 0.95}
# Headline mode three times, the uint8 figure twice, the 1-in-flight figures once; a bare block before,
# between and after all of them.
SCHEDULE = [F32_2, U8_2, F32_2, U8_2, F32_2, F32_1, U8_1]


@dataclass(frozen=True)
class Plan:
    batch: int
    block_seconds: float
    warmup_runs: int


PLANS = {
    # ~4.9 GMAC per frame: a batch of 4 takes a few hundred ms with 2 threads.
    "unet328": Plan(batch=4, block_seconds=6.0, warmup_runs=2),
    # A tiny graph: ORT takes well under 1 ms per frame, so the service's own costs show.
    "demo": Plan(batch=8, block_seconds=2.0, warmup_runs=20),
}


@dataclass
class Bench:
    """One model against the running server: the bare session, the requests, and where the CPU is read."""

    model_id: str
    plan: Plan
    session: ort.InferenceSession
    inputs: Inputs
    requests: dict[str, pb.InferBatchRequest]
    stub: pb_grpc.InferenceServiceStub
    meter: Meter

    def warm_up(self) -> tuple[dict[str, pb.InferBatchResponse], dict[str, float]]:
        """Warm runs on both sides, and the service's outputs checked against bare for the same inputs."""
        for _ in range(self.plan.warmup_runs):
            (bare_out,) = self.session.run(None, self.inputs.feeds)
        replies: dict[str, pb.InferBatchResponse] = {}
        for dtype, request in self.requests.items():
            for _ in range(max(2, self.plan.warmup_runs // 2)):
                replies[dtype] = self.stub.InferBatch(request, timeout=300)
        return replies, check_outputs(bare_out, replies)

    def block(self, mode: str, seconds: float) -> dict[str, Any]:
        if mode == "bare":
            return bare_block(self.session, self.inputs, seconds, self.meter)
        return service_block(self.stub, self.requests[MODES[mode].dtype], MODES[mode], seconds, self.meter)


def summarize_mode(blocks: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    service_fps = median([b["fps"] for b in blocks])
    bare_fps = median([b["bare_ref_fps"] for b in blocks])
    ratios = [b["ratio"] for b in blocks]
    return {
        "service_fps": round(service_fps, 3),
        "bare_fps_paired": round(bare_fps, 3),
        "ratio": round(median(ratios), 4),
        "ratio_blocks": [round(r, 4) for r in ratios],
        "per_frame_overhead_ms": round(harness.per_item_overhead_ms(service_fps, bare_fps), 3),
        "iterations": sum(b["iterations"] for b in blocks),
        "frames": sum(b["iterations"] for b in blocks) * batch,
    }


def bench_model(bench: Bench, seconds: float, threads: int) -> dict[str, Any]:
    log(f"{bench.model_id}: warming up (batch {bench.plan.batch}, {threads} threads)")
    replies, correctness = bench.warm_up()
    log(f"{bench.model_id}: {len(SCHEDULE)} service blocks between bare blocks, ~{seconds:.1f} s each")
    schedule = [m.name for m in SCHEDULE]
    out = harness.interleaved(lambda mode: bench.block(mode, seconds), "bare", schedule, label=None)
    bare_blocks, service_blocks = out["blocks"][0::2], out["blocks"][1::2]
    for block, reference in zip(service_blocks, out["references"], strict=True):
        block["bare_ref_fps"] = round(reference, 3)
        block["ratio"] = round(block["fps"] / reference, 4)
    batch = bench.plan.batch
    modes = {m.name: summarize_mode([b for b in service_blocks if b["kind"] == m.name], batch) for m in MODES.values()}
    log(f"{bench.model_id}: ratios " + "  ".join(f"{name} {m['ratio']:.3f}" for name, m in modes.items()))
    result = headline(modes, median([b["fps"] for b in bare_blocks]), batch, threads)
    result["iterations"] = {
        "bare_runs": sum(b["iterations"] for b in bare_blocks),
        "service_requests": sum(b["iterations"] for b in service_blocks),
        "block_seconds": round(seconds, 2),
        "bare_blocks": len(bare_blocks),
        "service_blocks": len(service_blocks),
    }
    result["bytes_per_frame"] = bytes_per_frame(bench.requests, replies, batch)
    result["outputs_vs_bare"] = correctness
    result["modes"] = modes
    result["blocks"] = {"bare": bare_blocks, "service": service_blocks}
    if bench.model_id in TARGET_RATIO:
        result["target_ratio"] = TARGET_RATIO[bench.model_id]
        result["meets_target"] = result["ratio"] >= TARGET_RATIO[bench.model_id]
    return result


def headline(modes: dict[str, dict[str, Any]], bare_fps: float, batch: int, threads: int) -> dict[str, Any]:
    head, u8 = modes[F32_2.name], modes[U8_2.name]
    figures = ("service_fps", "ratio", "per_frame_overhead_ms")
    return {
        "batch_size": batch,
        "intra_op_threads": threads,
        "mode": "float32 in / float32 out (old contract), 2 requests in flight",
        "bare_fps": round(bare_fps, 3),
        **{k: head[k] for k in figures},
        "uint8": {"mode": "uint8 in / uint8 out, 2 requests in flight", **{k: u8[k] for k in figures}},
        "in_flight_1": {
            "float32": {k: modes[F32_1.name][k] for k in figures},
            "uint8": {k: modes[U8_1.name][k] for k in figures},
        },
    }


def settings(threads: int, scale: float, generated: bool) -> dict[str, Any]:
    return {
        "ort": session_settings(threads),
        "server": "separate process, server.cpu_workers=1, loopback gRPC, same ORT settings",
        "client": "grpc sync channel in the bench process; N threads doing blocking calls = N in flight",
        "schedule": ["bare", *[x for m in SCHEDULE for x in (m.name, "bare")]],
        "ratio_rule": "per service block: fps / geometric mean of the bare blocks before and after; "
        "the figure is the median over blocks of that mode",
        "throughput_rule": "(completions - 1) * batch / (last completion - first completion)",
        "scale": scale,
        "models_generated_now": generated,
    }


def demo_split(demo: dict[str, Any], floor: dict[str, Any]) -> dict[str, float]:
    """Service ms/frame = bare ORT + the gRPC floor + the rest."""
    bare_ms, service_ms = 1000.0 / demo["bare_fps"], 1000.0 / demo["service_fps"]
    floor_ms = floor[F32_2.name]["ms_per_frame"]
    return {
        "service_total": round(service_ms, 3),
        "bare_ort": round(bare_ms, 3),
        "overhead": round(service_ms - bare_ms, 3),
        "grpc_floor (gRPC + protobuf, no work)": floor_ms,
        "rest (service code, ORT, contention)": round(service_ms - floor_ms, 3),
    }


def measure(args: Any, models_dir: Path, threads: int, result: dict[str, Any]) -> dict[str, Any] | None:
    """Every model against one server, then the demo's profile under load; the demo's requests, if it ran."""
    demo_requests = None
    with harness.fleet("bench-inference-") as fleet:
        log(f"starting server ({threads} intra-op threads, 1 worker)")
        started = time.perf_counter()
        server = fleet.start("inference", "lipsync-inference", server_args(models_dir, threads)).wait_serving(300)
        result["settings"]["server_startup_seconds"] = round(time.perf_counter() - started, 2)
        with grpc.insecure_channel(server.address, CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            for model_id in [m for m in PLANS if m in args.models]:
                plan = PLANS[model_id]
                inputs = Inputs.make(plan.batch)
                requests = {dtype: make_request(model_id, inputs, dtype) for dtype in ("float32", "uint8")}
                session = bare_session(models_dir / model_id / "model.onnx", threads)
                bench = Bench(model_id, plan, session, inputs, requests, stub, Meter({"server": server.process.pid}))
                result["models"][model_id] = bench_model(bench, plan.block_seconds * args.scale, threads)
                demo_requests = requests if model_id == "demo" else demo_requests
            if demo_requests is not None and args.profiler != "none":
                job = inference_profile.Job(server.process.pid, stub, demo_requests, PLANS["demo"].batch)
                path = args.out.parent / "inference_demo_profile.txt"
                how = args.profiler
                result["demo_profile"] = inference_profile.profile_demo(how, job, path, args.scale, models_dir, threads)
        log(f"server stopped (exit code {server.stop()})")
    return demo_requests


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "bench/results/inference.json")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads both sides (0: cpu count)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every block's duration")
    parser.add_argument("--models", default="unet328,demo", help="comma-separated subset of unet328,demo")
    parser.add_argument("--profiler", choices=["auto", "py-spy", "cprofile", "none"], default="auto")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := set(args.models) - set(PLANS):
        parser.error(f"--models: unknown {sorted(unknown)}")
    tune_malloc()  # this process is the client: the allocator settings the services use
    started, machine = time.perf_counter(), harness.machine_info()
    models_dir = args.models_dir.resolve()
    threads = args.threads or machine["cpu_count"] or 1
    args.out = args.out.resolve()
    generated = harness.ensure_models(models_dir)
    result: dict[str, Any] = {
        "benchmark": "inference: bare onnxruntime InferenceSession.run vs InferBatch over gRPC",
        "settings": settings(threads, args.scale, generated),
        "models": {},
    }
    demo_requests = measure(args, models_dir, threads, result)
    if demo_requests is not None:
        log("demo: gRPC floor and per-step timings")
        plan = PLANS["demo"]
        floor = inference_floor.measure(demo_requests, plan.block_seconds * args.scale)
        profile = result.setdefault("demo_profile", {})
        profile["grpc_floor"] = floor
        profile["components"] = inference_steps.measure(models_dir, threads, plan.batch)
        profile["overhead_split_float32_in_flight_2_ms_per_frame"] = demo_split(result["models"]["demo"], floor)
    harness.finish(args.out, result, machine, started)
    for model_id, r in result["models"].items():
        log(
            f"{model_id}: bare {r['bare_fps']:.2f} fps, service {r['service_fps']:.2f} fps, ratio {r['ratio']:.3f} "
            f"(uint8 {r['uint8']['ratio']:.3f}), overhead {r['per_frame_overhead_ms']:.3f} ms/frame"
        )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
