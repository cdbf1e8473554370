"""``lipsync-inference``: build, run and stop the inference gRPC server."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from service_common.cli import overrides_from, parser_for, run_server
from service_common.metrics import ServiceMetrics
from service_common.serving import RunningServer, build_policy, serve_until_signal, start_grpc_server
from shared_proto import inference_pb2

from . import __version__
from .config import InferenceConfig, load_config
from .core import InferenceCore
from .servicer import InferenceServicer, add_to_server

log = logging.getLogger("inference_service")

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
HEAVY_METHODS = ("InferBatch",)


def core_metrics(core: InferenceCore) -> Iterable[Metric]:
    """Read at scrape time: per-device concurrency and the models loaded."""
    labels = ["device"]
    workers = GaugeMetricFamily("lipsync_device_workers", "Concurrent runs a device allows.", labels=labels)
    active = GaugeMetricFamily("lipsync_device_active_runs", "Runs executing on a device now.", labels=labels)
    queued = GaugeMetricFamily("lipsync_device_queued_runs", "Runs waiting for a device's worker.", labels=labels)
    models = GaugeMetricFamily("lipsync_device_loaded_models", "Models loaded on a device.", labels=labels)
    memory = GaugeMetricFamily("lipsync_device_model_bytes", "Bytes of the models loaded on a device.", labels=labels)
    frames = GaugeMetricFamily(
        "lipsync_device_frames_in_flight", "Frames of requests run or queued on a device.", labels=labels
    )
    for status in core.device_status():
        label = [status.device.label]
        workers.add_metric(label, status.device.workers)
        active.add_metric(label, status.active_runs)
        queued.add_metric(label, status.queued_runs)
        models.add_metric(label, status.loaded_models)
        memory.add_metric(label, status.used_memory_bytes)
        frames.add_metric(label, status.frames_in_flight)
    loaded = GaugeMetricFamily("lipsync_loaded_models", "Models loaded in all.")
    loaded.add_metric([], len(core.registry.entries()))
    batch_labels = ["model", "device"]
    passes = CounterMetricFamily(
        "lipsync_batcher_passes", "Forward passes formed by dynamic batching.", labels=batch_labels
    )
    batched = CounterMetricFamily("lipsync_batcher_frames", "Frames run in those passes.", labels=batch_labels)
    waiting = GaugeMetricFamily("lipsync_batcher_queued_frames", "Frames waiting to be batched.", labels=batch_labels)
    for (model_id, device), batcher in list(core.batchers.items()):
        passes.add_metric([model_id, device], batcher.batches)
        batched.add_metric([model_id, device], batcher.batched_frames)
        waiting.add_metric([model_id, device], batcher.queued_frames)
    return [workers, active, queued, models, memory, frames, loaded, passes, batched, waiting]


async def start_server(config: InferenceConfig) -> RunningServer:
    """Preload, then serve on ``config.host:config.port`` (port 0 picks a free one)."""
    metrics = ServiceMetrics("inference", __version__)
    core = InferenceCore(config, events=metrics)
    metrics.add_collector(lambda: core_metrics(core))
    policy = build_policy("inference", config.serving, metrics, HEAVY_METHODS)
    await core.start()

    async def on_stop() -> None:
        core.close()

    running = await start_grpc_server(
        config,
        register=lambda server: add_to_server(InferenceServicer(core, metrics), server),
        service_names=[SERVICE_NAME],
        on_stop=on_stop,
        policy=policy,
    )
    log.info(
        "inference service listening on %s:%d (%s; devices: %s)",
        config.host,
        running.port,
        "TLS" if running.tls else "plain text",
        ", ".join(d.label for d in core.devices),
    )
    return running


async def serve(config: InferenceConfig) -> None:
    await serve_until_signal(await start_server(config), "inference service")


def main(argv: list[str] | None = None) -> int:
    parser = parser_for("lipsync-inference", __doc__)
    args = parser.parse_args(argv)
    return run_server("lipsync-inference", args, overrides_from(args), load_config, serve)


if __name__ == "__main__":
    sys.exit(main())
