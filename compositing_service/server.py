"""``lipsync-compositing``: build, run and stop the compositing gRPC server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from service_common.cli import overrides_from, parser_for, run_server
from service_common.metrics import ServiceMetrics
from service_common.serving import RunningServer, build_policy, serve_until_signal, start_grpc_server
from shared_proto import compositing_pb2, compositing_pb2_grpc

from . import __version__
from .compositor import EncodeCounts, opencv_single_threaded
from .config import CompositingConfig, load_config
from .core import CompositingCore
from .inference_client import HopStats
from .servicer import CompositingServicer

log = logging.getLogger("compositing_service")

SERVICE_NAME = compositing_pb2.DESCRIPTOR.services_by_name["CompositingService"].full_name
HEALTH_INTERVAL_S = 2.0
HEAVY_METHODS = ("InferBatchComposite",)


def core_metrics(core: CompositingCore, servicer: CompositingServicer, watch: InferenceWatch) -> Iterable[Metric]:
    """Read at scrape time: the background cache per avatar, avatars, sessions, inference reachability, the hop
    and how JPEG frames were encoded."""
    yield from cache_metrics(core)
    yield gauge("lipsync_loaded_models", "Avatars loaded.", len(core.avatars.entries()))
    yield gauge("lipsync_sessions_active", "Streaming sessions open now.", servicer.active_sessions)
    yield gauge("lipsync_inference_reachable", "1 while the inference service answers Health.", int(watch.reachable))
    yield from hop_metrics(core.backend.hop)
    yield from jpeg_metrics(core.compositor.counts)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family


CACHE_METRICS = [  # per avatar: (name, doc, CacheStats field, family)
    ("lipsync_cache_hits", "Background frame cache hits.", "hits", CounterMetricFamily),
    ("lipsync_cache_misses", "Background frame cache misses.", "misses", CounterMetricFamily),
    ("lipsync_cache_evictions", "Background frames evicted.", "evictions", CounterMetricFamily),
    ("lipsync_cache_frames", "Background frames cached.", "frames", GaugeMetricFamily),
    ("lipsync_cache_model_bytes", "Bytes of background frames cached.", "bytes", GaugeMetricFamily),
    (
        "lipsync_cache_encoded_bytes",
        "Bytes of cached background encodes reused by spliced JPEG.",
        "encoded_bytes",
        GaugeMetricFamily,
    ),
]


def cache_metrics(core: CompositingCore) -> Iterable[Metric]:
    stats = {model_id: core.cache.stats(model_id) for model_id in sorted(core.config.models)}
    for name, doc, field, kind in CACHE_METRICS:
        family = kind(name, doc, labels=["model"])
        for model_id, found in stats.items():
            family.add_metric([model_id], getattr(found, field))
        yield family
    yield gauge("lipsync_cache_bytes", "Bytes of background frames cached in all.", core.cache.total_bytes)
    bound = core.config.background_cache_bytes
    yield gauge("lipsync_cache_max_bytes", "The cache's bound (capacity.background_cache_mb).", bound)


def hop_metrics(hop: HopStats) -> Iterable[Metric]:
    calls = CounterMetricFamily("lipsync_hop_requests", "InferBatch calls to the inference service.")
    calls.add_metric([], hop.requests)
    frames = CounterMetricFamily("lipsync_hop_frames", "Frames sent to the inference service.")
    frames.add_metric([], hop.frames)
    sizes = CounterMetricFamily(
        "lipsync_hop_bytes", "Bytes of InferBatch messages on the hop, by direction.", labels=["direction"]
    )
    sizes.add_metric(["request"], hop.request_bytes)
    sizes.add_metric(["response"], hop.response_bytes)
    inputs = CounterMetricFamily(
        "lipsync_hop_inputs_sent",
        "Model inputs sent as pixels: first (the server did not hold them yet) or resent (it reported them missing).",
        labels=["why"],
    )
    inputs.add_metric(["first"], hop.inputs_sent)
    inputs.add_metric(["resent"], hop.inputs_resent)
    return [calls, frames, sizes, inputs]


def jpeg_metrics(counts: EncodeCounts) -> Iterable[Metric]:
    jpeg = CounterMetricFamily("lipsync_jpeg_frames", "JPEG frames by how they were encoded.", labels=["path"])
    jpeg.add_metric(["spliced"], counts.spliced)
    jpeg.add_metric(["full"], counts.full)
    fallbacks = CounterMetricFamily(
        "lipsync_jpeg_full_encodes",
        "JPEG frames encoded whole, by reason (disabled: output.jpeg_splicing off; else a FallbackReason).",
        labels=["reason"],
    )
    for reason, count in sorted(counts.fallbacks.items()):
        fallbacks.add_metric([reason], count)
    return [jpeg, fallbacks]


class InferenceWatch:
    """Keeps grpc.health.v1 in step with the inference service's reachability (a replica without inference is
    NOT_SERVING, so a load balancer or Kubernetes sends traffic elsewhere); the metrics read ``reachable``."""

    def __init__(self, core: CompositingCore) -> None:
        self.core = core
        self.reachable = True

    async def run(self, running: RunningServer) -> None:
        while True:
            healthy = await self.core.backend.reachable() > 0
            if healthy != self.reachable:
                state = "reachable" if healthy else "unreachable"
                log.warning("inference service %s: %s", self.core.backend.description, state)
                await running.set_serving(healthy)
            self.reachable = healthy
            await asyncio.sleep(HEALTH_INTERVAL_S)


async def start_server(config: CompositingConfig) -> RunningServer:
    opencv_single_threaded()
    metrics = ServiceMetrics("compositing", __version__)
    core = CompositingCore(config, metrics=metrics)
    servicer = CompositingServicer(core)
    watch = InferenceWatch(core)
    metrics.add_collector(lambda: core_metrics(core, servicer, watch))
    policy = build_policy("compositing", config.serving, metrics, HEAVY_METHODS)
    await core.start()
    watcher: asyncio.Task | None = None

    async def on_stop() -> None:
        if watcher is not None:
            watcher.cancel()
        await core.close()

    running = await start_grpc_server(
        config,
        register=lambda server: compositing_pb2_grpc.add_CompositingServiceServicer_to_server(servicer, server),
        service_names=[SERVICE_NAME],
        on_stop=on_stop,
        policy=policy,
    )
    running.on_drain = servicer.end_sessions
    watcher = asyncio.create_task(watch.run(running))
    log.info(
        "compositing service listening on %s:%d (%s; inference: %s)",
        config.host,
        running.port,
        "TLS" if running.tls else "plain text",
        core.backend.description,
    )
    return running


async def serve(config: CompositingConfig) -> None:
    await serve_until_signal(await start_server(config), "compositing service")


def main(argv: list[str] | None = None) -> int:
    parser = parser_for("lipsync-compositing", __doc__)
    parser.add_argument("--inference-url", help="inference target(s): host:port[,host:port] or dns:///name:port")
    parser.add_argument("--in-process", action="store_true", help="run the inference engine in this process")
    args = parser.parse_args(argv)
    overrides = overrides_from(args)
    if args.inference_url:
        overrides.append(f"inference_server.url={args.inference_url}")
    if args.in_process:
        overrides.append("inference.mode=in_process")
    return run_server("lipsync-compositing", args, overrides, load_config, serve)


if __name__ == "__main__":
    sys.exit(main())
