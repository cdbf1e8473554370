"""Helpers shared by the benchmarks: machine info, result files, timing, CPU accounting, server processes.

Why: every benchmark here runs on small, shared, noisy machines. Results are only comparable when each file
says where and with what it was measured, when throughput is computed the same way everywhere, and when the
servers are real processes started and stopped the same way.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# -- machine info and result files -----------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_revision() -> dict[str, Any] | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def machine_info() -> dict[str, Any]:
    """Where and with what a result was measured."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "timestamp_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "loadavg_at_start": load,
        "git": _git_revision(),
    }


def write_result(path: Path | str, result: dict[str, Any], machine: dict[str, Any] | None = None) -> Path:
    """Write ``result`` as indented JSON with a ``machine`` block first; parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine or machine_info(), **result}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


# -- timing ----------------------------------------------------------------------------------------------------


def throughput(completions: Sequence[float], items_per_completion: float) -> float:
    """Items/s between the first and the last completion time stamp.

    The first completion only marks the start: pipeline fill (first request's transfer, first run) is not
    counted, so a pipelined service and a bare loop are measured by the same rule.
    """
    stamps = sorted(completions)
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        raise ValueError("throughput needs at least two distinct completion times")
    return (len(stamps) - 1) * items_per_completion / (stamps[-1] - stamps[0])


def run_for(fn: Callable[[], Any], seconds: float, min_iterations: int = 3) -> list[float]:
    """Call ``fn`` back to back for ``seconds`` (and at least ``min_iterations`` times); completion stamps."""
    stamps: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(stamps) < min_iterations:
        fn()
        stamps.append(time.perf_counter())
    return stamps


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def per_item_overhead_ms(service_rate: float, bare_rate: float) -> float:
    """Extra milliseconds per item the service path costs over the bare path."""
    return (1.0 / service_rate - 1.0 / bare_rate) * 1000.0


# -- CPU accounting --------------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int | None = None) -> float | None:
    """User+system CPU seconds of a process (all its threads); None where /proc is unavailable."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_cpu_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (from /proc/stat), or None."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _CLK_TCK


@dataclass
class CpuSnapshot:
    wall: float
    own: float | None
    server: float | None
    system: float | None


class CpuMeter:
    """CPU used during a block by this process, a server process and the whole machine, as % of one core.

    ``other_pct`` (machine minus the two) shows how much a noisy neighbour took during the block.
    """

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid

    def snapshot(self) -> CpuSnapshot:
        return CpuSnapshot(
            time.perf_counter(),
            process_cpu_seconds(None),
            process_cpu_seconds(self.server_pid) if self.server_pid else None,
            system_cpu_busy_seconds(),
        )

    @staticmethod
    def usage(start: CpuSnapshot, end: CpuSnapshot) -> dict[str, float | None]:
        wall = max(end.wall - start.wall, 1e-9)

        def pct(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) / wall * 100.0, 1)

        own, server, system = pct(start.own, end.own), pct(start.server, end.server), pct(start.system, end.system)
        other = None
        if system is not None and own is not None:
            other = round(max(system - own - (server or 0.0), 0.0), 1)
        return {"bench_cpu_pct": own, "server_cpu_pct": server, "machine_cpu_pct": system, "other_cpu_pct": other}


# -- server processes ------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` (the server binds it a moment later; a clash fails loudly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_serving(address: str, timeout: float, service: str = "", alive: Callable[[], bool] | None = None) -> float:
    """Poll grpc.health.v1 until ``service`` is SERVING; returns the seconds waited."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.perf_counter()
    deadline = started + timeout
    last_error = "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.perf_counter() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"server at {address} exited before it was SERVING")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - started
                last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last_error = f"{exc.code().name}"
            time.sleep(0.1)
    raise TimeoutError(f"server at {address} not SERVING after {timeout:.0f} s (last: {last_error})")


@dataclass
class ServerProcess:
    """A server subprocess on a loopback port; its stdout+stderr go to ``log_path``."""

    argv: list[str]
    port: int
    host: str = "127.0.0.1"
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(prefix="bench-server-", suffix=".log")[1]))
    proc: subprocess.Popen | None = None
    startup_seconds: float | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (the server's graceful shutdown), then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    argv: Sequence[str],
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    ready_timeout: float = 180.0,
    health_service: str = "",
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> ServerProcess:
    """Start ``argv + ['--port', N]`` and wait until grpc.health.v1 reports SERVING.

    The server must take ``--port`` and serve the standard health service (both our services do).
    """
    port = port or free_port(host)
    server = ServerProcess([*argv, "--port", str(port)], port, host)
    if log_path is not None:
        server.log_path = log_path
    with server.log_path.open("wb") as log:
        server.proc = subprocess.Popen(
            server.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=REPO_ROOT,
        )
    try:
        server.startup_seconds = wait_for_serving(server.address, ready_timeout, health_service, server.alive)
    except BaseException as exc:
        server.stop(5)
        tail = server.log_tail()
        if isinstance(exc, Exception):
            raise RuntimeError(f"{exc}\n--- server log ({server.log_path}) ---\n{tail}") from exc
        raise
    return server


def log(message: str) -> None:
    """Progress on stderr, so stdout stays clean for whoever pipes the script."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_models(models_dir: Path) -> bool:
    """Generate every demo model, the avatar and both configs when any is missing; True when generated."""
    needed = [
        models_dir / "inference.yaml",
        models_dir / "compositing.yaml",
        models_dir / "demo" / "model.onnx",
        models_dir / "unet328" / "model.onnx",
        models_dir / "avatar" / "background.mp4",
    ]
    config = models_dir / "inference.yaml"
    if all(p.exists() for p in needed) and "unet328:" in config.read_text():
        return False
    from demo_models import write_all

    log(f"generating models into {models_dir} (demo_models.write_all, seed 0)")
    write_all(models_dir, seed=0, include_unet328=True)
    return True
