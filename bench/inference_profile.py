"""Where the inference server's time goes under a demo-model load: py-spy on the server, or cProfile in process.

Why: with the demo model the service costs far more than ORT itself, and the throughput figures alone cannot say
whether protobuf, gRPC, numpy copies or the allocator take it. py-spy samples every Python thread of the real
server process (``--native``, so upb, numpy, ORT and cygrpc frames show); tools/pyspy_summary.py sorts the
samples. Where py-spy cannot attach (no ptrace), the server runs in this process with its event-loop thread
under cProfile instead, which sees Python functions only.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc as pb_grpc
from tools.pyspy_summary import summarize

from .harness import CHANNEL_OPTIONS, REPO_ROOT, closed_loop, log, throughput
from .inference_calls import F32_2, U8_2, Mode


@dataclass(frozen=True)
class Job:
    """The running server and the demo load to drive while it is sampled."""

    pid: int
    stub: pb_grpc.InferenceServiceStub
    requests: dict[str, pb.InferBatchRequest]
    batch: int


def profile_demo(how: str, job: Job, path: Path, scale: float, models_dir: Path, threads: int) -> dict[str, Any]:
    """``how``: py-spy, cprofile, or auto (py-spy, with cProfile if py-spy cannot attach)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {}
    if how in ("auto", "py-spy"):
        log("demo: profiling the server with py-spy (float32 load, then uint8 load)")
        try:
            profile = pyspy_profile(job, F32_2, path, max(3.0, 6.0 * scale))
            uint8_path = path.with_name(path.stem + "_uint8.txt")
            profile["uint8"] = pyspy_profile(job, U8_2, uint8_path, max(3.0, 4.0 * scale))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            if how == "py-spy":
                raise
            log(f"py-spy unavailable ({exc}); falling back to cProfile")
            profile = {"py_spy_error": str(exc)}
    if how == "cprofile" or (how == "auto" and "busy_samples" not in profile):
        profile.update(cprofile_in_process(models_dir, threads, job.requests["float32"], job.batch, path))
    return profile


def _record(pid: int, out: Path, seconds: float) -> str:
    """Records ``out``; the way that worked (blocking native stacks, else Python only without stopping it)."""
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not pyspy:
        raise RuntimeError("py-spy not found")
    base = [pyspy, "record", "--pid", str(pid), "--format", "raw", "-o", str(out), "--duration", str(int(seconds))]
    attempts = [
        ("native, blocking", [*base, "--rate", "100", "--native", "--idle", "--threads"]),
        ("python only, nonblocking", [*base, "--rate", "100", "--nonblocking", "--idle", "--threads"]),
    ]
    errors = []
    for label, argv in attempts:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        if proc.returncode == 0 and out.exists() and out.stat().st_size:
            return label
        errors.append(f"{label}: rc={proc.returncode} {proc.stderr.strip()[-300:]}")
    raise RuntimeError("py-spy failed: " + " | ".join(errors))


def pyspy_profile(job: Job, mode: Mode, out: Path, seconds: float) -> dict[str, Any]:
    """The server sampled for ``seconds`` while a load in ``mode`` runs (started a second before, ending after)."""
    request = job.requests[mode.dtype]
    load: dict[str, Any] = {}

    def drive() -> None:
        done = closed_loop(lambda: job.stub.InferBatch(request, timeout=120), seconds + 2.5, mode.in_flight)
        load["fps"] = round(throughput(done.stamps, job.batch), 2)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    time.sleep(1.0)
    try:
        used = _record(job.pid, out, seconds)
    finally:
        driver.join()
    return {
        "tool": f"py-spy record ({used}), {int(seconds)} s at 100 Hz, all Python threads of the server",
        "raw_profile": str(out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out),
        "load": f"{mode.name}, batch {job.batch}",
        "load_fps_while_profiled": load.get("fps"),
        **summarize(out),
    }


def _serve_profiled(models_dir: Path, threads: int) -> tuple[Any, asyncio.AbstractEventLoop, threading.Thread, Any]:
    """The service started on an event loop in a thread of this process, that loop under cProfile."""
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
    return running, loop, thread, profiler


def cprofile_in_process(
    models_dir: Path, threads: int, request: pb.InferBatchRequest, batch: int, out: Path
) -> dict[str, Any]:
    """Fallback when py-spy cannot attach: the server in this process, its event-loop thread under cProfile."""
    running, loop, thread, profiler = _serve_profiled(models_dir, threads)
    try:
        with grpc.insecure_channel(running.address, CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            stamps = closed_loop(lambda: stub.InferBatch(request, timeout=120), 6.0, 2).stamps
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
        "load_fps_while_profiled": round(throughput(stamps, batch), 2),
        "top_functions_pct_of_tottime": {
            f"{fn[2]} ({Path(fn[0]).name}:{fn[1]})": round(100.0 * v[2] / total, 1) for fn, v in top
        },
    }
