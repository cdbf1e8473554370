"""Prometheus metrics of one service instance, served on their own HTTP port (``--metrics-port``).

Each instance has its own CollectorRegistry (tests run several servers in one process); state that already
lives in the service (cache sizes, device queues, loaded models) is read at scrape time by collectors the
service registers, rather than copied into gauges on every request. Reference: docs/operations.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from . import request_log

log = logging.getLogger(__name__)

# Seconds: from sub-millisecond stages (a cache hit, a JPEG) to long batches on a CPU.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics.*``; the defaults are each service's own (its schema's), so this class has none."""

    enabled: bool
    host: str
    port: int  # 0 picks a free port


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        try:
            yield from self._collect()
        except Exception:  # a scrape must never take the service down
            log.exception("metrics collector failed")


class ServiceMetrics:
    def __init__(self, service: str, version: str = "") -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        info = Gauge("lipsync_build_info", "The service and its version (1).", ["service", "version"], registry=r)
        info.labels(service, version).set(1)
        self.requests = Counter(
            "lipsync_requests", "Finished RPCs by method and gRPC status code.", ["method", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "lipsync_request_duration_seconds",
            "Whole-RPC latency as the server sees it (streams: the session's length).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("lipsync_requests_in_flight", "RPCs being served now.", ["method"], registry=r)
        self.stage_seconds = Histogram(
            "lipsync_stage_duration_seconds",
            "Time per request spent in each stage: queue, audio, inference, prepare, inference_call, "
            "compositing, encode, total.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.frames = Counter("lipsync_frames", "Frames produced.", ["model"], registry=r)
        self.batch_frames = Histogram(
            "lipsync_batch_frames", "Frames per batch run.", buckets=BATCH_BUCKETS, registry=r
        )
        self.rejected = Counter(
            "lipsync_rejected_requests",
            "Requests refused before any work, by reason (overloaded, rate_limited, sessions, "
            "unauthenticated, permission_denied, deadline).",
            ["reason"],
            registry=r,
        )
        self.model_loads = Counter(
            "lipsync_model_loads", "Model (or avatar) loads by outcome.", ["model", "outcome"], registry=r
        )
        self.model_evictions = Counter(
            "lipsync_model_evictions", "Models (or avatars) evicted to make room.", ["model"], registry=r
        )
        self.model_load_seconds = Histogram(
            "lipsync_model_load_seconds", "Time to load a model (or avatar).", buckets=LOAD_BUCKETS, registry=r
        )
        self._server: object | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_Callback(collect))

    def observe_stages(self, stages: dict[str, float]) -> None:
        """Stage timings in milliseconds, as the services measure them."""
        for stage, ms in stages.items():
            self.stage_seconds.labels(stage).observe(max(ms, 0.0) / 1000.0)

    def batch_done(self, model: str, frames: int, stages_ms: dict[str, float]) -> None:
        self.frames.labels(model).inc(frames)
        self.batch_frames.observe(frames)
        self.observe_stages(stages_ms)

    # -- events from the registries (model loads and evictions) -----------------

    def model_loaded(self, model_id: str, seconds: float) -> None:
        self.model_loads.labels(model_id, "ok").inc()
        self.model_load_seconds.observe(seconds)

    def model_load_failed(self, model_id: str) -> None:
        self.model_loads.labels(model_id, "failed").inc()

    def model_evicted(self, model_id: str) -> None:
        self.model_evictions.labels(model_id).inc()

    # -- the HTTP endpoint --------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` from a daemon thread; returns the bound port."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise RuntimeError(f"metrics.port: cannot listen on {host}:{port} ({exc.strerror})") from None
        self._server, self._thread = server, thread
        self.port = server.server_port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server.server_close()  # type: ignore[attr-defined]
            self._server = None


class NullEvents:
    """Registry events when nobody listens (the plain classes used without a server)."""

    def model_loaded(self, model_id: str, seconds: float) -> None:
        pass

    def model_load_failed(self, model_id: str) -> None:
        pass

    def model_evicted(self, model_id: str) -> None:
        pass


def report_batch(metrics: ServiceMetrics | None, model: str, frames: int, stages_ms: dict[str, float]) -> None:
    """A finished batch: into the request's log line and, when the server has metrics, the histograms."""
    request_log.note(model=model, frames=frames, **stages_ms)
    if metrics is not None:
        metrics.batch_done(model, frames, stages_ms)
