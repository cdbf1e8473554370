"""Bare ONNX Runtime throughput versus InferBatch through the inference service over gRPC, same machine, one run.

Why: the service must not cost real models their throughput (target: unet328 through the service at >= 0.95 of
bare), and where it does cost (the tiny demo model), we want to know where the time goes.

What runs: one real server process (``python -m inference_service.server``, one CPU worker, the same ORT thread
settings as the bare sessions) on a free loopback port, a real client channel in this process, and bare
``InferenceSession.run`` loops in this process. Bare and service blocks alternate; every service block is paired
with the bare blocks just before and after it, and ratios are medians of those pairs (the machine is shared and
noisy, so absolute figures move more than ratios). See bench/README.md.

    .venv/bin/python bench/bench_inference.py --models-dir models --out bench/results/inference.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import math
import pstats
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from service_common.allocator import tune_malloc

# bench/ is not a package: this lets `common` import however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc as pb_grpc

VISUAL_SHAPE = (6, 320, 320)
AUDIO_SHAPE = (32, 16, 16)
OUTPUT_SHAPE = (3, 320, 320)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]
TARGET_RATIO = {"unet328": 0.95}


@dataclass(frozen=True)
class Mode:
    """One way of calling the service: wire dtypes and how many requests the client keeps in flight."""

    name: str
    dtype: str  # "float32": old contract, float32 in and out; "uint8": uint8 pixels in, uint8 out
    in_flight: int


F32_2 = Mode("float32_in_flight_2", "float32", 2)
U8_2 = Mode("uint8_in_flight_2", "uint8", 2)
F32_1 = Mode("float32_in_flight_1", "float32", 1)
U8_1 = Mode("uint8_in_flight_1", "uint8", 1)
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


# -- inputs, requests, sessions ------------------------------------------------------------------------------


@dataclass
class Inputs:
    visual_u8: np.ndarray
    visual_f32: np.ndarray
    audio: np.ndarray

    @classmethod
    def make(cls, batch: int, seed: int = 0) -> Inputs:
        rng = np.random.default_rng(seed)
        visual_u8 = rng.integers(0, 256, (batch, *VISUAL_SHAPE), dtype=np.uint8)
        visual_f32 = np.divide(visual_u8, np.float32(255.0), dtype=np.float32)  # what the server makes of uint8
        audio = rng.standard_normal((batch, *AUDIO_SHAPE), dtype=np.float32)
        return cls(visual_u8, visual_f32, audio)


def make_request(model_id: str, inputs: Inputs, dtype: str) -> pb.InferBatchRequest:
    batch = len(inputs.audio)
    if dtype == "float32":
        # The old client: no dtype fields, audio shape inferred from its length (one window per frame).
        return pb.InferBatchRequest(
            model_id=model_id,
            visual_frames=inputs.visual_f32.tobytes(),
            audio_features=inputs.audio.tobytes(),
            batch_size=batch,
        )
    return pb.InferBatchRequest(
        model_id=model_id,
        visual_frames=inputs.visual_u8.tobytes(),
        audio_features=inputs.audio.tobytes(),
        batch_size=batch,
        visual_dtype=pb.DTYPE_UINT8,
        output_dtype=pb.DTYPE_UINT8,
        audio_features_shape=[batch, *AUDIO_SHAPE],
    )


def session_settings(threads: int) -> dict[str, Any]:
    return {
        "intra_op_threads": threads,
        "inter_op_threads": 1,
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "execution_mode": "ORT_SEQUENTIAL",
        "allow_spinning": False,  # the service's CPU default (docs/decisions/0010), both sides
        "providers": ["CPUExecutionProvider"],
    }


def bare_session(path: Path, threads: int) -> ort.InferenceSession:
    """The bare side: plain ORT with the settings the server is started with (see server_argv)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # The service's defaults (inference_service.devices.session_options): no spinning on the CPU.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def server_argv(models_dir: Path, threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "inference_service.server",
        "--config",
        str(models_dir / "inference.yaml"),
        "--host",
        "127.0.0.1",
        "--log-level",
        "WARNING",
        "--set",
        "server.cpu_workers=1",
        "--set",
        f"onnx.intra_op_threads={threads}",
        "--set",
        "onnx.inter_op_threads=1",
        "--set",
        "onnx.graph_optimization=all",
        "--set",
        "gpus.enabled=false",
        "--set",
        "models.demo.preload=true",
        "--set",
        "models.unet328.preload=true",
    ]


# -- measurement blocks --------------------------------------------------------------------------------------


def bare_block(session: ort.InferenceSession, inputs: Inputs, seconds: float, meter: common.CpuMeter) -> dict:
    feeds = {"input": inputs.visual_f32, "audio": inputs.audio}
    start = meter.snapshot()
    stamps = common.run_for(lambda: session.run(None, feeds), seconds)
    usage = meter.usage(start, meter.snapshot())
    batch = len(inputs.audio)
    return {
        "kind": "bare",
        "fps": round(common.throughput(stamps, batch), 3),
        "iterations": len(stamps),
        "seconds": round(stamps[-1] - stamps[0], 3),
        **usage,
    }


def call_loop(
    stub: pb_grpc.InferenceServiceStub, request: pb.InferBatchRequest, seconds: float, in_flight: int
) -> list[tuple[float, float, float]]:
    """``in_flight`` threads doing blocking InferBatch calls until the deadline: (done stamp, run ms, queue ms)."""
    done: list[tuple[float, float, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        try:
            while True:
                with lock:
                    if time.perf_counter() >= deadline and len(done) >= 3:
                        return
                reply = stub.InferBatch(request, timeout=120)
                now = time.perf_counter()
                with lock:
                    done.append((now, reply.inference_time_ms, reply.queue_time_ms))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, name=f"bench-client-{i}", daemon=True) for i in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return done


def service_block(
    stub: pb_grpc.InferenceServiceStub,
    request: pb.InferBatchRequest,
    mode: Mode,
    batch: int,
    seconds: float,
    meter: common.CpuMeter,
) -> dict:
    start = meter.snapshot()
    done = call_loop(stub, request, seconds, mode.in_flight)
    usage = meter.usage(start, meter.snapshot())
    stamps = [d[0] for d in done]
    return {
        "kind": mode.name,
        "fps": round(common.throughput(stamps, batch), 3),
        "iterations": len(done),
        "seconds": round(max(stamps) - min(stamps), 3),
        "server_run_ms_mean": round(float(np.mean([d[1] for d in done])), 2),
        "server_queue_ms_mean": round(float(np.mean([d[2] for d in done])), 2),
        **usage,
    }


def bytes_per_frame(requests: dict[str, pb.InferBatchRequest], replies: dict[str, pb.InferBatchResponse], batch: int):
    """Serialized sizes (ByteSize) of the real messages, per frame."""
    req = {k: round(v.ByteSize() / batch, 1) for k, v in requests.items()}
    rep = {k: round(v.ByteSize() / batch, 1) for k, v in replies.items()}
    return {
        "request": {"float32_visual": req["float32"], "uint8_visual": req["uint8"]},
        "response": {"float32_output": rep["float32"], "uint8_output": rep["uint8"]},
        "round_trip": {
            "float32_in_float32_out": round(req["float32"] + rep["float32"], 1),
            "uint8_in_uint8_out": round(req["uint8"] + rep["uint8"], 1),
        },
        "payload_reference": {
            "visual_float32": int(np.prod(VISUAL_SHAPE)) * 4,
            "visual_uint8": int(np.prod(VISUAL_SHAPE)),
            "audio_float32": int(np.prod(AUDIO_SHAPE)) * 4,
            "output_float32": int(np.prod(OUTPUT_SHAPE)) * 4,
            "output_uint8": int(np.prod(OUTPUT_SHAPE)),
        },
    }


def check_outputs(bare_out: np.ndarray, replies: dict[str, pb.InferBatchResponse]) -> dict[str, float]:
    """Service outputs versus the bare session's for the same inputs (a sanity check, not a benchmark)."""
    f32 = np.stack([np.frombuffer(o.data, np.float32).reshape(OUTPUT_SHAPE) for o in replies["float32"].outputs])
    u8 = np.stack([np.frombuffer(o.data, np.uint8).reshape(OUTPUT_SHAPE) for o in replies["uint8"].outputs])
    expected_u8 = np.clip(bare_out * np.float32(255.0), 0.0, 255.0).astype(np.uint8)
    return {
        "float32_max_abs_diff": float(np.max(np.abs(f32 - bare_out))),
        "uint8_max_abs_diff": int(np.max(np.abs(u8.astype(np.int16) - expected_u8.astype(np.int16)))),
    }


def summarize_mode(blocks: list[dict], batch: int) -> dict:
    fps = [b["fps"] for b in blocks]
    ratios = [b["ratio"] for b in blocks]
    bare_ref = [b["bare_ref_fps"] for b in blocks]
    service_fps = common.median(fps)
    bare_fps = common.median(bare_ref)
    return {
        "service_fps": round(service_fps, 3),
        "bare_fps_paired": round(bare_fps, 3),
        "ratio": round(common.median(ratios), 4),
        "ratio_blocks": [round(r, 4) for r in ratios],
        "per_frame_overhead_ms": round(common.per_item_overhead_ms(service_fps, bare_fps), 3),
        "iterations": sum(b["iterations"] for b in blocks),
        "frames": sum(b["iterations"] for b in blocks) * batch,
    }


def bench_model(
    model_id: str,
    plan: Plan,
    models_dir: Path,
    stub: pb_grpc.InferenceServiceStub,
    server: common.ServerProcess,
    threads: int,
    scale: float,
) -> tuple[dict, dict[str, pb.InferBatchRequest]]:
    seconds = plan.block_seconds * scale
    inputs = Inputs.make(plan.batch)
    session = bare_session(models_dir / model_id / "model.onnx", threads)
    requests = {dtype: make_request(model_id, inputs, dtype) for dtype in ("float32", "uint8")}
    meter = common.CpuMeter(server.pid)

    common.log(f"{model_id}: warming up (batch {plan.batch}, {threads} threads)")
    feeds = {"input": inputs.visual_f32, "audio": inputs.audio}
    for _ in range(plan.warmup_runs):
        (bare_out,) = session.run(None, feeds)
    replies: dict[str, pb.InferBatchResponse] = {}
    for dtype, request in requests.items():
        for _ in range(max(2, plan.warmup_runs // 2)):
            replies[dtype] = stub.InferBatch(request, timeout=300)
    correctness = check_outputs(bare_out, replies)

    common.log(f"{model_id}: {len(SCHEDULE)} service blocks between bare blocks, ~{seconds:.1f} s each")
    bare_blocks = [bare_block(session, inputs, seconds, meter)]
    blocks: list[dict] = []
    for mode in SCHEDULE:
        block = service_block(stub, requests[mode.dtype], mode, plan.batch, seconds, meter)
        bare_blocks.append(bare_block(session, inputs, seconds, meter))
        before, after = bare_blocks[-2]["fps"], bare_blocks[-1]["fps"]
        block["bare_ref_fps"] = round(math.sqrt(before * after), 3)
        block["ratio"] = round(block["fps"] / block["bare_ref_fps"], 4)
        blocks.append(block)
        common.log(
            f"{model_id}: {mode.name:22s} {block['fps']:9.2f} fps  bare {before:9.2f}/{after:9.2f}  "
            f"ratio {block['ratio']:.3f}  (server {block['server_cpu_pct']}%, other {block['other_cpu_pct']}%)"
        )

    modes = {
        m.name: summarize_mode([b for b in blocks if b["kind"] == m.name], plan.batch) for m in dict.fromkeys(SCHEDULE)
    }
    bare_fps = common.median([b["fps"] for b in bare_blocks])
    head, u8 = modes[F32_2.name], modes[U8_2.name]
    result = {
        "batch_size": plan.batch,
        "intra_op_threads": threads,
        "mode": "float32 in / float32 out (old contract), 2 requests in flight",
        "bare_fps": round(bare_fps, 3),
        "service_fps": head["service_fps"],
        "ratio": head["ratio"],
        "per_frame_overhead_ms": head["per_frame_overhead_ms"],
        "uint8": {
            "mode": "uint8 in / uint8 out, 2 requests in flight",
            "service_fps": u8["service_fps"],
            "ratio": u8["ratio"],
            "per_frame_overhead_ms": u8["per_frame_overhead_ms"],
        },
        "in_flight_1": {
            "float32": {k: modes[F32_1.name][k] for k in ("service_fps", "ratio", "per_frame_overhead_ms")},
            "uint8": {k: modes[U8_1.name][k] for k in ("service_fps", "ratio", "per_frame_overhead_ms")},
        },
        "iterations": {
            "bare_runs": sum(b["iterations"] for b in bare_blocks),
            "service_requests": sum(b["iterations"] for b in blocks),
            "block_seconds": round(seconds, 2),
            "bare_blocks": len(bare_blocks),
            "service_blocks": len(blocks),
        },
        "bytes_per_frame": bytes_per_frame(requests, replies, plan.batch),
        "outputs_vs_bare": correctness,
        "modes": modes,
        "blocks": {"bare": bare_blocks, "service": blocks},
    }
    if model_id in TARGET_RATIO:
        result["target_ratio"] = TARGET_RATIO[model_id]
        result["meets_target"] = head["ratio"] >= TARGET_RATIO[model_id]
    return result, requests


# -- gRPC floor: the same messages through a server that does no work ---------------------------------------


def serve_echo(port: int) -> None:
    """``--serve-echo``: InferBatch that parses the request and returns a ready reply of the real size.

    It shows what gRPC + protobuf alone cost for these message sizes on this machine.
    """
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from service_common.grpc_glue import server_options

    replies: dict[tuple[int, int], pb.InferBatchResponse] = {}

    async def infer(request: pb.InferBatchRequest, context: grpc.aio.ServicerContext) -> pb.InferBatchResponse:
        key = (request.batch_size, request.output_dtype)
        if key not in replies:
            dtype = pb.DTYPE_UINT8 if request.output_dtype == pb.DTYPE_UINT8 else pb.DTYPE_FLOAT32
            size = int(np.prod(OUTPUT_SHAPE)) * (1 if dtype == pb.DTYPE_UINT8 else 4)
            out = pb.RawMouthRegion(data=bytes(size), dtype=dtype, shape=list(OUTPUT_SHAPE))
            replies[key] = pb.InferBatchResponse(outputs=[out] * request.batch_size, success=True, device="cpu")
        return replies[key]

    async def main() -> None:
        server = grpc.aio.server(options=server_options(64 * 1024 * 1024))
        handler = grpc.method_handlers_generic_handler(
            "inference.InferenceService",
            {
                "InferBatch": grpc.unary_unary_rpc_method_handler(
                    infer,
                    request_deserializer=pb.InferBatchRequest.FromString,
                    response_serializer=pb.InferBatchResponse.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(main())


def grpc_floor(requests: dict[str, pb.InferBatchRequest], batch: int, seconds: float) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-echo"]
    out: dict[str, Any] = {"what": "same requests and reply sizes through a gRPC server that does no work"}
    with (
        common.start_server(argv, ready_timeout=60) as echo,
        grpc.insecure_channel(echo.address, CHANNEL_OPTIONS) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)
        meter = common.CpuMeter(echo.pid)
        for mode in (F32_2, U8_2, F32_1, U8_1):
            for _ in range(5):
                stub.InferBatch(requests[mode.dtype], timeout=60)
            block = service_block(stub, requests[mode.dtype], mode, batch, seconds, meter)
            out[mode.name] = {
                "fps": block["fps"],
                "ms_per_frame": round(1000.0 / block["fps"], 3),
                "server_cpu_pct": block["server_cpu_pct"],
                "bench_cpu_pct": block["bench_cpu_pct"],
            }
            common.log(f"grpc floor: {mode.name:22s} {block['fps']:9.2f} fps")
    return out


# -- where the demo's time goes ------------------------------------------------------------------------------


def time_step(fn: Callable[[], Any], budget: float = 0.25, min_reps: int = 5) -> float:
    fn()
    times = []
    end = time.perf_counter() + budget
    while time.perf_counter() < end or len(times) < min_reps:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return common.median(times) * 1000.0


def demo_components(models_dir: Path, threads: int, batch: int) -> dict:
    """Each step of an InferBatch, timed alone in this process with the service's own functions."""
    from inference_service.tensors import to_model_input, to_output_dtype
    from lipsync_protocol.tensors import audio_windows, batch_of, frombuffer

    session = bare_session(models_dir / "demo" / "model.onnx", threads)
    inputs = Inputs.make(batch)
    out: dict[str, Any] = {"batch_size": batch, "unit": "ms per batch (median); per_frame = /batch"}
    for dtype in ("float32", "uint8"):
        request = make_request("demo", inputs, dtype)
        wire = request.SerializeToString()
        parsed = pb.InferBatchRequest.FromString(wire)
        np_dtype = np.float32 if dtype == "float32" else np.uint8
        visual_bytes = parsed.visual_frames
        visual = batch_of(frombuffer(visual_bytes, np_dtype, "v"), VISUAL_SHAPE, batch, "v")
        audio = audio_windows(frombuffer(parsed.audio_features, np.float32, "a"), AUDIO_SHAPE, batch)
        model_visual = to_model_input(visual)
        model_audio = np.ascontiguousarray(audio, dtype=np.float32)
        (raw_out,) = session.run(None, {"input": model_visual, "audio": model_audio})
        result = to_output_dtype(raw_out, np_dtype)
        pb_dtype = pb.DTYPE_FLOAT32 if dtype == "float32" else pb.DTYPE_UINT8

        def build(result=result, pb_dtype=pb_dtype) -> pb.InferBatchResponse:
            return pb.InferBatchResponse(
                outputs=[pb.RawMouthRegion(data=f.tobytes(), dtype=pb_dtype, shape=list(f.shape)) for f in result],
                success=True,
            )

        reply = build()
        reply_wire = reply.SerializeToString()
        steps = {
            "client: request SerializeToString": lambda request=request: request.SerializeToString(),
            "server: request parse (FromString)": lambda wire=wire: pb.InferBatchRequest.FromString(wire),
            "server: request.visual_frames read (copy; servicer reads it twice)": lambda p=parsed: p.visual_frames,
            "server: frombuffer/reshape + audio read/isfinite": lambda p=parsed, vb=visual_bytes, d=np_dtype: (
                batch_of(frombuffer(vb, d, "v"), VISUAL_SHAPE, batch, "v"),
                audio_windows(frombuffer(p.audio_features, np.float32, "a"), AUDIO_SHAPE, batch),
            ),
            "server: isfinite(visual)": (lambda v=visual: np.isfinite(v).all()) if dtype == "float32" else None,
            "server: to_model_input": lambda v=visual: to_model_input(v),
            "server: ORT run": lambda mv=model_visual, ma=model_audio: session.run(None, {"input": mv, "audio": ma}),
            "server: to_output_dtype": lambda o=raw_out, d=np_dtype: to_output_dtype(o, d),
            "server: build reply (tobytes + RawMouthRegion)": build,
            "server: reply SerializeToString": lambda reply=reply: reply.SerializeToString(),
            "client: reply parse (FromString)": lambda w=reply_wire: pb.InferBatchResponse.FromString(w),
        }
        timings = {}
        for name, fn in steps.items():
            if fn is None:
                continue
            ms = time_step(fn)
            timings[name] = {"ms": round(ms, 3), "per_frame_ms": round(ms / batch, 4)}
        server_ms = sum(v["ms"] for k, v in timings.items() if k.startswith("server:"))
        # The servicer reads visual_frames twice (`if not request.visual_frames` and frombuffer(...)).
        server_ms += timings["server: request.visual_frames read (copy; servicer reads it twice)"]["ms"]
        out[dtype] = {
            "steps": timings,
            "server_steps_total_ms": round(server_ms, 3),
            "server_steps_total_per_frame_ms": round(server_ms / batch, 4),
        }
    return out


_PY_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]+\.py):(?P<line>\d+)\)$")
_ALLOCATOR = {"munmap", "mmap", "mmap64", "brk", "sbrk", "madvise", "__madvise", "mremap"}
_WAITS = {
    "epoll_wait",
    "epoll_pwait",
    "poll",
    "select",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "PyThread_acquire_lock_timed",
    "sem_wait",
    "sem_timedwait",
    "clock_nanosleep",
    "nanosleep",
    "__futex_abstimed_wait_common",
}
# Keywords of a service source line -> category, first match wins (used when no native frame said more).
_LINE_RULES = [
    ("isfinite", "isfinite_check"),
    ("session.run", "ort_run"),
    ("model.run", "ort_run"),
    ("RawMouthRegion", "protobuf_message_build"),
    ("InferBatchResponse(", "protobuf_message_build"),
    ("request.", "protobuf_bytes_field_copy"),
    ("to_model_input", "numpy_dtype_conversion"),
    ("to_output_dtype", "numpy_dtype_conversion"),
    ("np.divide", "numpy_dtype_conversion"),
    ("np.multiply", "numpy_dtype_conversion"),
    ("np.clip", "numpy_dtype_conversion"),
    (".astype", "numpy_dtype_conversion"),
    ("ascontiguousarray", "numpy_dtype_conversion"),
    ("tobytes", "numpy_tobytes"),
    ("frombuffer", "numpy_views"),
    ("reshape", "numpy_views"),
    ("broadcast_to", "numpy_views"),
]
HEADLINE = {
    "protobuf_parse_serialize": "serialization (protobuf)",
    "protobuf_bytes_field_copy": "serialization (protobuf)",
    "protobuf_message_build": "serialization (protobuf)",
    "numpy_tobytes": "numpy conversion/copies",
    "numpy_dtype_conversion": "numpy conversion/copies",
    "numpy_views": "numpy conversion/copies",
    "isfinite_check": "isfinite check",
    "ort_run": "ORT run (calling thread only)",
    "grpc": "gRPC (cygrpc: byte buffers, HTTP/2, sockets, call handling)",
    "allocator": "memory allocation (mmap/munmap/brk)",
    "service_python": "asyncio / Python glue / other",
    "python_glue": "asyncio / Python glue / other",
    "other_native": "asyncio / Python glue / other",
}


class _Lines:
    def __init__(self) -> None:
        self.cache: dict[str, list[str]] = {}

    def text(self, file: str, line: int) -> str:
        if file not in self.cache:
            path = common.REPO_ROOT / file
            self.cache[file] = path.read_text().splitlines() if path.is_file() else []
        lines = self.cache[file]
        return lines[line - 1] if 0 < line <= len(lines) else ""


def _classify_frame(frame: str, lines: _Lines, inside_foreign_python: bool = False) -> str | None:
    """Category of one frame, or None when it does not tell (then the caller looks further up).

    A service source line without a telling keyword only claims the sample when no other Python code
    (asyncio, threading) runs below it; otherwise the entry frame would claim every idle-ish loop turn.
    """
    if _named(frame) in _ALLOCATOR:
        return "allocator"
    if "_message.abi3" in frame or "upb_" in frame:
        if "GetAttr" in frame or "GetFieldValue" in frame:
            return "protobuf_bytes_field_copy"
        if any(k in frame for k in ("Decode", "Encode", "encode_", "Serialize", "Parse", "MergeFrom", "FromString")):
            return "protobuf_parse_serialize"
        if any(k in frame for k in ("_Init", "Set", "Append", "Extend", "_New")):
            return "protobuf_message_build"
        return None
    if frame.startswith("array_tobytes"):
        return "numpy_tobytes"
    if "onnxruntime" in frame:
        return "ort_run"
    if "cygrpc" in frame or "(grpc/" in frame:
        return "grpc"
    match = _PY_FRAME.match(frame)
    if match and match["file"].startswith(("inference_service/", "service_common/")):
        text = lines.text(match["file"], int(match["line"]))
        for keyword, category in _LINE_RULES:
            if keyword in text:
                return category
        return None if inside_foreign_python else "service_python"
    return None


def _named(frame: str) -> str:
    return frame.split(" (", 1)[0]


def _leaf_label(frames: list[str], named_leaf: str) -> str:
    """The innermost named frame, plus the libraries of unsymbolized frames below it (e.g. cygrpc > libc)."""
    below = frames[frames.index(named_leaf) + 1 :]
    libs = list(dict.fromkeys(f.split(" (", 1)[-1].rstrip(")").rsplit("/", 1)[-1].split(".", 1)[0] for f in below))
    return named_leaf + "".join(f" > [{lib}]" for lib in libs)


def summarize_pyspy_raw(path: Path) -> dict:
    """Busy samples by category (leaf first: the innermost frame that says what the time is for)."""
    lines = _Lines()
    by_thread_total: Counter = Counter()
    by_thread_busy: Counter = Counter()
    categories: Counter = Counter()
    thread_categories: dict[str, Counter] = defaultdict(Counter)
    leaves: Counter = Counter()
    for raw in path.read_text().splitlines():
        if not raw.strip():
            continue
        stack_text, count_text = raw.rsplit(" ", 1)
        count = int(count_text)
        frames = stack_text.split(";")
        thread = "all"
        if frames and frames[0].startswith("thread ("):
            name = frames.pop(0).split(": ", 1)[-1]
            thread = (
                "event_loop (MainThread)"
                if name == "MainThread"
                else "infer_worker"
                if name.startswith("infer-")
                else "grpc_poller"
                if "_poll_wrapper" in name
                else name
            )
        by_thread_total[thread] += count
        named = [f for f in frames if not f.startswith("0x")]
        if named and _named(named[-1]) in _WAITS:
            continue
        by_thread_busy[thread] += count
        category = None
        foreign = False
        for frame in reversed(frames):
            category = _classify_frame(frame, lines, foreign)
            if category:
                break
            match = _PY_FRAME.match(frame)
            foreign = foreign or bool(match and not match["file"].startswith(("inference_service/", "service_common/")))
        if category is None:
            category = "python_glue" if any(_PY_FRAME.match(f) for f in frames) else "other_native"
        categories[category] += count
        thread_categories[thread][category] += count
        if named:
            leaves[_leaf_label(frames, named[-1])] += count
    busy = sum(categories.values())

    def pct(n: int, total: int) -> float:
        return round(100.0 * n / total, 1) if total else 0.0

    headline: Counter = Counter()
    for cat, n in categories.items():
        headline[HEADLINE.get(cat, cat)] += n
    return {
        "busy_samples": busy,
        "top_costs_pct_of_busy": {k: pct(v, busy) for k, v in headline.most_common()},
        "categories_pct_of_busy": {k: pct(v, busy) for k, v in categories.most_common()},
        "threads": {
            t: {
                "busy_pct_of_wall": pct(by_thread_busy[t], by_thread_total[t]),
                "share_of_busy_pct": pct(by_thread_busy[t], busy),
                "top": {k: pct(v, by_thread_busy[t]) for k, v in thread_categories[t].most_common(5)},
            }
            for t in sorted(by_thread_total, key=lambda t: -by_thread_busy[t])
        },
        "top_leaf_functions_pct_of_busy": {k: pct(v, busy) for k, v in leaves.most_common(12)},
    }


def pyspy_profile(
    pid: int,
    stub: pb_grpc.InferenceServiceStub,
    request: pb.InferBatchRequest,
    mode: Mode,
    batch: int,
    out: Path,
    seconds: float,
) -> dict:
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not pyspy:
        raise RuntimeError("py-spy not found")
    load: dict[str, Any] = {}

    def drive() -> None:
        stamps = [d[0] for d in call_loop(stub, request, seconds + 2.5, mode.in_flight)]
        load["fps"] = round(common.throughput(stamps, batch), 2)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    time.sleep(1.0)
    base = [pyspy, "record", "--pid", str(pid), "--format", "raw", "-o", str(out), "--duration", str(int(seconds))]
    attempts = [
        ("native, blocking", [*base, "--rate", "100", "--native", "--idle", "--threads"]),
        ("python only, nonblocking", [*base, "--rate", "100", "--nonblocking", "--idle", "--threads"]),
    ]
    errors = []
    used = None
    for label, argv in attempts:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        if proc.returncode == 0 and out.exists() and out.stat().st_size:
            used = label
            break
        errors.append(f"{label}: rc={proc.returncode} {proc.stderr.strip()[-300:]}")
    driver.join()
    if used is None:
        raise RuntimeError("py-spy failed: " + " | ".join(errors))
    return {
        "tool": f"py-spy record ({used}), {int(seconds)} s at 100 Hz, all Python threads of the server",
        "raw_profile": str(out.relative_to(common.REPO_ROOT) if out.is_relative_to(common.REPO_ROOT) else out),
        "load": f"{mode.name}, batch {batch}",
        "load_fps_while_profiled": load.get("fps"),
        **summarize_pyspy_raw(out),
    }


def cprofile_in_process(models_dir: Path, threads: int, request: pb.InferBatchRequest, batch: int, out: Path) -> dict:
    """Fallback when py-spy cannot attach: the server in this process, its event-loop thread under cProfile."""
    from inference_service.config import load_config
    from inference_service.server import start_server

    overrides = {
        "server.host": "127.0.0.1",
        "server.port": 0,
        "server.cpu_workers": 1,
        "onnx.intra_op_threads": threads,
        "onnx.inter_op_threads": 1,
        "models.unet328.preload": False,
    }
    config = load_config(models_dir / "inference.yaml", overrides, environ={})
    loop = asyncio.new_event_loop()
    profiler = cProfile.Profile()

    def run_loop() -> None:
        asyncio.set_event_loop(loop)
        profiler.enable()
        try:
            loop.run_forever()
        finally:
            profiler.disable()

    thread = threading.Thread(target=run_loop, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start_server(config), loop).result(120)
    try:
        with grpc.insecure_channel(running.address, CHANNEL_OPTIONS) as channel:
            stamps = [d[0] for d in call_loop(pb_grpc.InferenceServiceStub(channel), request, 6.0, 2)]
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(grace=1.0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats(30)
    out.write_text(text.getvalue())
    total = sum(v[2] for v in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:12]  # type: ignore[attr-defined]
    return {
        "tool": "cProfile of the event-loop thread, server in-process (py-spy unavailable)",
        "raw_profile": str(out),
        "load_fps_while_profiled": round(common.throughput(stamps, batch), 2),
        "top_functions_pct_of_tottime": {
            f"{fn[2]} ({Path(fn[0]).name}:{fn[1]})": round(100.0 * v[2] / total, 1) for fn, v in top
        },
    }


# -- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/inference.json"))
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads both sides (0: cpu count)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every block's duration")
    parser.add_argument("--models", default="unet328,demo", help="comma-separated subset of unet328,demo")
    parser.add_argument("--profiler", choices=["auto", "py-spy", "cprofile", "none"], default="auto")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # This process is the client: it gets the allocator settings the services use (service_common.allocator).
    tune_malloc()
    if args.serve_echo:
        serve_echo(args.port)
        return 0

    started = time.perf_counter()
    machine = common.machine_info()
    models_dir = args.models_dir.resolve()
    threads = args.threads or machine["cpu_count"] or 1
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(wanted) - set(PLANS)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}")
    generated = common.ensure_models(models_dir)
    out_path = args.out if args.out.is_absolute() else Path.cwd() / args.out
    profile_path = out_path.parent / "inference_demo_profile.txt"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    result: dict[str, Any] = {
        "benchmark": "inference: bare onnxruntime InferenceSession.run vs InferBatch over gRPC",
        "settings": {
            "ort": session_settings(threads),
            "server": "separate process, server.cpu_workers=1, loopback gRPC, same ORT settings",
            "client": "grpc sync channel in the bench process; N threads doing blocking calls = N in flight",
            "schedule": ["bare", *[x for m in SCHEDULE for x in (m.name, "bare")]],
            "ratio_rule": "per service block: fps / geometric mean of the bare blocks before and after; "
            "the figure is the median over blocks of that mode",
            "throughput_rule": "(completions - 1) * batch / (last completion - first completion)",
            "scale": args.scale,
            "models_generated_now": generated,
        },
        "models": {},
    }
    common.log(f"starting server ({threads} intra-op threads, 1 worker)")
    with common.start_server(server_argv(models_dir, threads), ready_timeout=300) as server:
        result["settings"]["server_startup_seconds"] = round(server.startup_seconds or 0.0, 2)
        with grpc.insecure_channel(server.address, CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            demo_requests = None
            for model_id in [m for m in PLANS if m in wanted]:
                model_result, requests = bench_model(
                    model_id, PLANS[model_id], models_dir, stub, server, threads, args.scale
                )
                result["models"][model_id] = model_result
                if model_id == "demo":
                    demo_requests = requests
            if demo_requests is not None:
                batch = PLANS["demo"].batch
                profile: dict[str, Any] = {}
                if args.profiler in ("auto", "py-spy"):
                    common.log("demo: profiling the server with py-spy (float32 load, then uint8 load)")
                    seconds = max(3.0, 6.0 * args.scale)
                    try:
                        profile = pyspy_profile(
                            server.pid, stub, demo_requests["float32"], F32_2, batch, profile_path, seconds
                        )
                        u8_path = profile_path.with_name(profile_path.stem + "_uint8.txt")
                        profile["uint8"] = pyspy_profile(
                            server.pid, stub, demo_requests["uint8"], U8_2, batch, u8_path, max(3.0, 4.0 * args.scale)
                        )
                    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        if args.profiler == "py-spy":
                            raise
                        common.log(f"py-spy unavailable ({exc}); falling back to cProfile")
                        profile = {"py_spy_error": str(exc)}
                if args.profiler == "cprofile" or (args.profiler == "auto" and "busy_samples" not in profile):
                    profile.update(
                        cprofile_in_process(models_dir, threads, demo_requests["float32"], batch, profile_path)
                    )
                if args.profiler != "none":
                    result["demo_profile"] = profile
    common.log(f"server stopped (exit code {server.proc.returncode if server.proc else None})")
    if demo_requests is not None:
        demo = result["models"]["demo"]
        common.log("demo: gRPC floor and per-step timings")
        floor = grpc_floor(demo_requests, PLANS["demo"].batch, PLANS["demo"].block_seconds * args.scale)
        components = demo_components(models_dir, threads, PLANS["demo"].batch)
        bare_ms = 1000.0 / demo["bare_fps"]
        service_ms = 1000.0 / demo["service_fps"]
        floor_ms = floor[F32_2.name]["ms_per_frame"]
        result.setdefault("demo_profile", {})
        result["demo_profile"]["grpc_floor"] = floor
        result["demo_profile"]["components"] = components
        result["demo_profile"]["overhead_split_float32_in_flight_2_ms_per_frame"] = {
            "service_total": round(service_ms, 3),
            "bare_ort": round(bare_ms, 3),
            "overhead": round(service_ms - bare_ms, 3),
            "grpc_floor (gRPC + protobuf, no work)": floor_ms,
            "rest (service code, ORT, contention)": round(service_ms - floor_ms, 3),
        }
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    common.write_result(out_path, result, machine)
    common.log(f"wrote {out_path} in {result['wall_seconds']} s")
    for model_id, r in result["models"].items():
        common.log(
            f"{model_id}: bare {r['bare_fps']:.2f} fps, service {r['service_fps']:.2f} fps, ratio {r['ratio']:.3f} "
            f"(uint8 {r['uint8']['ratio']:.3f}), overhead {r['per_frame_overhead_ms']:.3f} ms/frame"
        )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
