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
from .compositor import opencv_single_threaded
from .config import CompositingConfig, load_config
from .core import CompositingCore
from .servicer import CompositingServicer

log = logging.getLogger("compositing_service")

SERVICE_NAME = compositing_pb2.DESCRIPTOR.services_by_name["CompositingService"].full_name
HEALTH_INTERVAL_S = 2.0
HEAVY_METHODS = ("InferBatchComposite",)


def core_metrics(core: CompositingCore, servicer: CompositingServicer, watch: InferenceWatch) -> Iterable[Metric]:
    """Read at scrape time: the background cache per avatar, avatars, sessions, inference reachability."""
    hits = CounterMetricFamily("lipsync_cache_hits", "Background frame cache hits.", labels=["model"])
    misses = CounterMetricFamily("lipsync_cache_misses", "Background frame cache misses.", labels=["model"])
    evictions = CounterMetricFamily("lipsync_cache_evictions", "Background frames evicted.", labels=["model"])
    frames = GaugeMetricFamily("lipsync_cache_frames", "Background frames cached.", labels=["model"])
    per_model = GaugeMetricFamily("lipsync_cache_model_bytes", "Bytes of background frames cached.", labels=["model"])
    encoded = GaugeMetricFamily(
        "lipsync_cache_encoded_bytes", "Bytes of cached background encodes reused by spliced JPEG.", labels=["model"]
    )
    for model_id in sorted(core.config.models):
        stats = core.cache.stats(model_id)
        hits.add_metric([model_id], stats.hits)
        misses.add_metric([model_id], stats.misses)
        evictions.add_metric([model_id], stats.evictions)
        frames.add_metric([model_id], stats.frames)
        per_model.add_metric([model_id], stats.bytes)
        encoded.add_metric([model_id], stats.encoded_bytes)
    total = GaugeMetricFamily("lipsync_cache_bytes", "Bytes of background frames cached in all.")
    total.add_metric([], core.cache.total_bytes)
    limit = GaugeMetricFamily("lipsync_cache_max_bytes", "The cache's bound (capacity.background_cache_mb).")
    limit.add_metric([], core.config.background_cache_bytes)
    avatars = GaugeMetricFamily("lipsync_loaded_models", "Avatars loaded.")
    avatars.add_metric([], len(core.avatars.entries()))
    sessions = GaugeMetricFamily("lipsync_sessions_active", "Streaming sessions open now.")
    sessions.add_metric([], servicer.active_sessions)
    reachable = GaugeMetricFamily("lipsync_inference_reachable", "1 while the inference service answers Health.")
    reachable.add_metric([], 1 if watch.reachable else 0)
    hop = core.backend.hop
    hop_calls = CounterMetricFamily("lipsync_hop_requests", "InferBatch calls to the inference service.")
    hop_calls.add_metric([], hop.requests)
    hop_frames = CounterMetricFamily("lipsync_hop_frames", "Frames sent to the inference service.")
    hop_frames.add_metric([], hop.frames)
    hop_bytes = CounterMetricFamily(
        "lipsync_hop_bytes", "Bytes of InferBatch messages on the hop, by direction.", labels=["direction"]
    )
    hop_bytes.add_metric(["request"], hop.request_bytes)
    hop_bytes.add_metric(["response"], hop.response_bytes)
    hop_inputs = CounterMetricFamily(
        "lipsync_hop_inputs_sent",
        "Model inputs sent as pixels: first (the server did not hold them yet) or resent (it reported them missing).",
        labels=["why"],
    )
    hop_inputs.add_metric(["first"], hop.inputs_sent)
    hop_inputs.add_metric(["resent"], hop.inputs_resent)
    counts = core.compositor.counts
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
    return [
        hop_calls,
        hop_frames,
        hop_bytes,
        hop_inputs,
        hits,
        misses,
        evictions,
        frames,
        per_model,
        encoded,
        total,
        limit,
        avatars,
        sessions,
        reachable,
        jpeg,
        fallbacks,
    ]


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
