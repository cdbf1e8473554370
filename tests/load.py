"""Load for the fault, overload and soak tests: client threads calling InferBatchComposite in a loop."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from lipsync_client.retry import retrying
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc

WINDOW = np.full((32, 16, 16), 0.6, np.float32).tobytes()


@dataclass
class Outcome:
    started: float
    ended: float
    code: str
    details: str = ""
    retry_after_ms: int | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    """``threads`` clients, each with its own channel, sending one request after another until stopped."""

    address: str
    threads: int = 3
    batch_size: int = 2
    timeout: float = 5.0
    pause: float = 0.0
    retries: bool = True  # the retry policy lipsync_client uses (safe: the batch RPC is pure)
    honor_retry_after: bool = False  # sleep as long as a refusal's retry-after-ms says, as a good client does
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def _run(self, worker: int) -> None:
        with grpc.insecure_channel(self.address, options=retrying() if self.retries else None) as channel:
            stub = compositing_pb2_grpc.CompositingServiceStub(channel)
            position = worker * 7
            while not self._stop.is_set():
                request = pb.CompositeBatchRequest(
                    model_id="demo", audio_features=WINDOW, batch_size=self.batch_size, start_frame_idx=position
                )
                position += self.batch_size
                started = time.monotonic()
                try:
                    response = stub.InferBatchComposite(request, timeout=self.timeout)
                    outcome = Outcome(started, time.monotonic(), "OK" if response.success else "NOT_SUCCESS")
                except grpc.RpcError as exc:
                    hint = next((int(v) for k, v in exc.trailing_metadata() or () if k == "retry-after-ms"), None)
                    outcome = Outcome(started, time.monotonic(), exc.code().name, exc.details() or "", hint)
                with self._lock:
                    self.outcomes.append(outcome)
                if self.honor_retry_after and outcome.retry_after_ms:
                    self._stop.wait(outcome.retry_after_ms / 1000.0)
                if self.pause:
                    time.sleep(self.pause)

    def start(self) -> Load:
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for worker in self._workers:
            worker.join(self.timeout + 10)
        return self.snapshot()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def codes(self, since: float = 0.0, until: float = float("inf")) -> Counter:
        return Counter(o.code for o in self.snapshot() if since <= o.started < until)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")
