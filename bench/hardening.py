"""What production hardening costs: the same load on a plain pair of services and on a hardened pair.

Pairs of real processes on loopback, each an inference server and a compositing replica with the demo model:

- ``plain``: plain text on both hops, no tokens, no request log lines, no metrics.
- ``observed``: plain text, but tokens on the public port (no rate limit, so only the check is measured), a
  JSON log line per request on both services, and metrics served and scraped once a second.
- ``hardened``: ``observed`` plus TLS from the client and mutual TLS to inference.

Load: client threads keep ``--in-flight`` InferBatchComposite calls going with server-built visuals, for 1 and
8 frames per call. The pairs are measured in alternating blocks, ``--rounds`` times, so the machine's noise
hits all alike. Reported: frames/s and median latency per pair, and each pair's ratio to ``plain``.

    .venv/bin/python -m bench.hardening --models-dir models --out bench/results/hardening.json
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipsync_client.api import open_channel
from lipsync_protocol.channels import ClientTls
from service_common.processes import free_port
from shared_proto import compositing_pb2_grpc
from tests.certs import make_pki

from . import harness
from .harness import CHANNEL_OPTIONS, Fleet, closed_loop, log, throughput
from .walk import walk

TOKEN = "bench-token-0123456789abcdef"
PAIRS = ("plain", "observed", "hardened")


@dataclass
class Pair:
    name: str
    address: str
    token: str | None = None
    tls: ClientTls | None = None
    metrics: str | None = None


def _settings(name: str, work: Path) -> tuple[list[str], list[str], Pair]:
    """The ``--set``s of each service of a pair (readiness ports first when they have them), and the client's view."""
    frames = f"frames_cache_dir={work / 'frames'}"
    if name == "plain":
        return ["logging.requests=false"], ["logging.requests=false", "warmup=true", frames], Pair(name, "")
    pki = make_pki(work / "pki", server_name="localhost")
    tokens = work / "tokens.yaml"
    tokens.write_text(f"tokens:\n  - name: bench\n    token: {TOKEN}\n")
    tls = [f"server.tls.cert_file={pki.server_cert}", f"server.tls.key_file={pki.server_key}"]
    inference, compositing = [f"server.health_port={free_port()}"], [f"server.health_port={free_port()}"]
    if name == "hardened":
        inference += ["server.plaintext=false", *tls, f"server.tls.client_ca_file={pki.ca}"]
        compositing += ["server.plaintext=false", *tls, "inference_server.plaintext=false"]
        compositing += [f"inference_server.tls.ca_file={pki.ca}", f"inference_server.tls.cert_file={pki.client_cert}"]
        compositing += [f"inference_server.tls.key_file={pki.client_key}"]
    inference += ["metrics.enabled=true", "metrics.port=0", "logging.requests=true"]
    compositing += ["auth.enabled=true", f"auth.tokens_file={tokens}", frames, "warmup=true"]
    return inference, compositing, Pair(name, "", TOKEN, ClientTls(ca_file=pki.ca) if name == "hardened" else None)


def _up(proc: harness.ServiceProcess, sets: list[str]) -> None:
    """Ready on the plain-text health port when there is one (the main port may be TLS), else on the main port."""
    probe = next((int(s.split("=", 1)[1]) for s in sets if s.startswith("server.health_port=")), None)
    if probe:
        harness.ready(proc, probe)
    else:
        proc.wait_serving(180)


def start_pair(fleet: Fleet, models: Path, name: str) -> Pair:
    work = fleet.work / name
    work.mkdir(parents=True, exist_ok=True)
    inference_sets, compositing_sets, pair = _settings(name, work)
    hardened = name != "plain"
    inference_args = ["--config", str(models / "inference.yaml")] + (["--log-format", "json"] if hardened else [])
    inference = fleet.start(f"{name}/inference", "lipsync-inference", inference_args + _sets(inference_sets), None)
    _up(inference, inference_sets)
    args = ["--config", str(models / "compositing.yaml"), "--inference-url", f"localhost:{inference.port}"]
    if hardened:
        metrics = free_port()
        args += ["--log-format", "json", "--metrics-port", str(metrics)]
        pair.metrics = f"http://127.0.0.1:{metrics}/metrics"
    compositing = fleet.start(name, "lipsync-compositing", args + _sets(compositing_sets), None)
    _up(compositing, compositing_sets)
    pair.address = f"localhost:{compositing.port}"
    return pair


def _sets(items: list[str]) -> list[str]:
    return [a for kv in items for a in ("--set", kv)]


def _scrape(url: str, stop: threading.Event) -> None:
    """Prometheus scraping once a second is part of the hardened cost."""
    while not stop.wait(1.0):
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()


def block(pair: Pair, batch: int, seconds: float, in_flight: int) -> dict[str, Any]:
    raw, channel = open_channel(pair.address, CHANNEL_OPTIONS, token=pair.token, tls=pair.tls)
    stub = compositing_pb2_grpc.CompositingServiceStub(channel)
    stop = threading.Event()
    try:
        for _ in range(2):  # warm the connection and both caches
            walk(stub, batch, 0)()
        if pair.metrics:
            threading.Thread(target=_scrape, args=(pair.metrics, stop), daemon=True).start()
        done = closed_loop([walk(stub, batch, i * 31) for i in range(in_flight)], seconds)
    finally:
        stop.set()
        raw.close()
    return {
        "frames_per_s": round(throughput(done.stamps, batch), 2),
        "calls": len(done),
        "latency_ms_p50": round(statistics.median(done.replies) * 1000, 2),
    }


def summarize(blocks: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per frames-per-call: each pair's median frames/s and latency, and its ratios to plain."""
    summary: dict[str, Any] = {}
    for batch in (1, 8):
        row: dict[str, Any] = {}
        for name in PAIRS:
            fps = statistics.median(b["frames_per_s"] for b in blocks[f"{name}_batch{batch}"])
            lat = statistics.median(b["latency_ms_p50"] for b in blocks[f"{name}_batch{batch}"])
            row[f"{name}_frames_per_s"], row[f"{name}_latency_ms_p50"] = fps, lat
            if name != "plain":
                row[f"throughput_ratio_{name}_vs_plain"] = round(fps / row["plain_frames_per_s"], 3)
                row[f"latency_ratio_{name}_vs_plain"] = round(lat / row["plain_latency_ms_p50"], 3)
        summary[f"batch{batch}"] = row
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "bench/results/hardening.json")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=2)
    args = parser.parse_args(argv)
    started, machine = time.perf_counter(), harness.machine_info()
    harness.ensure_models(args.models_dir)
    blocks: dict[str, list[dict[str, Any]]] = {}
    with harness.fleet("bench-hardening-") as fleet:
        pairs = [start_pair(fleet, args.models_dir.resolve(), name) for name in PAIRS]
        for round_ in range(args.rounds):
            for batch in (1, 8):
                for pair in pairs if round_ % 2 == 0 else pairs[::-1]:
                    log(f"round {round_ + 1}: {pair.name}, {batch} frames per call")
                    result = block(pair, batch, args.seconds, args.in_flight)
                    blocks.setdefault(f"{pair.name}_batch{batch}", []).append(result)
    summary = summarize(blocks)
    result = {
        "benchmark": "hardening",
        "description": __doc__.strip().splitlines()[0],
        "settings": {"seconds": args.seconds, "rounds": args.rounds, "in_flight": args.in_flight, "model": "demo"},
        "summary": summary,
        "blocks": blocks,
    }
    harness.finish(args.out, result, machine, started)
    for key, value in summary.items():
        print(key, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
