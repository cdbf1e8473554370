"""Starting a service as a child process and waiting until it serves.

Used by the demo, the end-to-end tests and the benchmarks (and later the
local cluster launcher), so each waits for readiness the same way: the
standard grpc.health.v1 check, not a sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_serving(address: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    """Block until the overall health status is SERVING; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with code {process.returncode} before serving on {address}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:
                last_error = exc.code().name
            time.sleep(0.1)
    raise TimeoutError(f"{address} not SERVING after {timeout:.0f} s (last: {last_error})")


def wait_http(url: str, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    """Block until ``url`` answers 200 (an HTTP service's health check); fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before answering {url}")
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            last_error = str(getattr(exc, "reason", exc))
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 after {timeout:.0f} s (last: {last_error})")


class ServiceProcess:
    """A service started from its console script; stopped with SIGTERM like an orchestrator would."""

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_serving(self, timeout: float = 60.0) -> ServiceProcess:
        try:
            wait_serving(self.address, timeout, self.process)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
            raise RuntimeError(f"{exc}\n{tail}") from None
        return self

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
