"""What production hardening costs: the same load on a plain pair of services and on a hardened pair.

Pairs of real processes on loopback, each an inference server and a compositing replica with the demo model:

- ``plain``: plain text on both hops, no tokens, no request log lines, no metrics.
- ``observed``: plain text, but tokens on the public port (no rate limit, so only the check is measured), a
  JSON log line per request on both services, and metrics served and scraped once a second.
- ``hardened``: ``observed`` plus TLS from the client and mutual TLS to inference.

Load: client threads keep ``--in-flight`` InferBatchComposite calls going with server-built visuals, for 1 and
8 frames per call. The pairs are measured in alternating blocks, ``--rounds`` times, so the machine's noise
hits all alike. Reported: frames/s and median latency per pair, and each pair's ratio to ``plain``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from lipsync_client.api import open_channel
from service_common.tls import ClientTls
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import common  # noqa: E402
from certs import make_pki  # noqa: E402

WINDOW = np.full((32, 16, 16), 0.6, np.float32).tobytes()
TOKEN = "bench-token-0123456789abcdef"
OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


def start_pair(models: Path, work: Path, name: str) -> dict:
    hardened = name != "plain"
    use_tls = name == "hardened"
    work.mkdir(parents=True, exist_ok=True)
    inf_sets: list[str] = ["logging.requests=false"]
    comp_sets: list[str] = ["logging.requests=false", "warmup=true", f"frames_cache_dir={work / 'frames'}"]
    probe_inf = probe_comp = None
    if hardened:
        pki = make_pki(work / "pki", server_name="localhost")
        tokens = work / "tokens.yaml"
        tokens.write_text(f"tokens:\n  - name: bench\n    token: {TOKEN}\n")
        probe_inf, probe_comp = common.free_port(), common.free_port()
        tls = [f"server.tls.cert_file={pki.server_cert}", f"server.tls.key_file={pki.server_key}"]
        inf_tls = ["server.plaintext=false", *tls, f"server.tls.client_ca_file={pki.ca}"] if use_tls else []
        comp_tls = [
            "server.plaintext=false",
            *tls,
            "inference_server.plaintext=false",
            f"inference_server.tls.ca_file={pki.ca}",
            f"inference_server.tls.cert_file={pki.client_cert}",
            f"inference_server.tls.key_file={pki.client_key}",
        ]
        inf_sets = [*inf_tls, f"server.health_port={probe_inf}", "metrics.enabled=true", "metrics.port=0"]
        comp_sets = [
            *(comp_tls if use_tls else []),
            f"server.health_port={probe_comp}",
            "auth.enabled=true",
            f"auth.tokens_file={tokens}",
            f"frames_cache_dir={work / 'frames'}",
            "warmup=true",
        ]
    bin_dir = Path(sys.executable).parent
    inf_port, comp_port = common.free_port(), common.free_port()
    inf_argv = [str(bin_dir / "lipsync-inference"), "--config", str(models / "inference.yaml"), "--host", "127.0.0.1"]
    comp_argv = [str(bin_dir / "lipsync-compositing"), "--config", str(models / "compositing.yaml")]
    comp_argv += ["--host", "127.0.0.1", "--inference-url", f"localhost:{inf_port}"]
    if hardened:
        inf_argv += ["--log-format", "json", "--set", "logging.requests=true"]
        comp_argv += ["--log-format", "json", "--metrics-port", str(common.free_port())]
        comp_metrics = int(comp_argv[-1])
    for item in inf_sets:
        inf_argv += ["--set", item]
    for item in comp_sets:
        comp_argv += ["--set", item]
    servers = []
    try:
        servers.append(_start(inf_argv, inf_port, probe_inf, work / f"{name}-inference.log"))
        servers.append(_start(comp_argv, comp_port, probe_comp, work / f"{name}-compositing.log"))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    pair = {"name": name, "servers": servers, "address": f"localhost:{comp_port}"}
    if hardened:
        pair.update(token=TOKEN, metrics=f"http://127.0.0.1:{comp_metrics}/metrics")
    if use_tls:
        pair["tls"] = ClientTls(ca_file=pki.ca)
    return pair


def _start(argv: list[str], port: int, probe: int | None, log_path: Path) -> common.ServerProcess:
    """Like common.start_server, but readiness comes from the plain-text health port when the main one is TLS."""
    server = common.ServerProcess([*argv, "--port", str(port)], port)
    server.log_path = log_path
    with log_path.open("wb") as log:
        server.proc = subprocess.Popen(server.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        common.wait_for_serving(f"127.0.0.1:{probe or port}", 180, "", server.alive)
    except BaseException as exc:
        server.stop(5)
        raise RuntimeError(f"{exc}\n{server.log_tail()}") from None
    return server


def block(pair: dict, batch: int, seconds: float, in_flight: int) -> dict:
    raw, channel = open_channel(pair["address"], OPTIONS, token=pair.get("token"), tls=pair.get("tls"))
    stub = compositing_pb2_grpc.CompositingServiceStub(channel)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    stop_scrape = threading.Event()

    def worker(offset: int) -> None:
        position = offset * 31
        while time.perf_counter() < stop_at:
            request = pb.CompositeBatchRequest(
                model_id="demo", audio_features=WINDOW, batch_size=batch, start_frame_idx=position
            )
            position += batch
            started = time.perf_counter()
            try:
                stub.InferBatchComposite(request, timeout=60)
            except grpc.RpcError as exc:
                with lock:
                    errors.append(exc.code().name)
                continue
            with lock:
                latencies.append(time.perf_counter() - started)

    def scrape() -> None:  # Prometheus scraping once a second is part of the hardened cost
        while not stop_scrape.wait(1.0):
            with urllib.request.urlopen(pair["metrics"], timeout=5) as response:
                response.read()

    for _ in range(2):  # warm the connection and both caches
        stub.InferBatchComposite(pb.CompositeBatchRequest(model_id="demo", audio_features=WINDOW, batch_size=batch))
    scraper = threading.Thread(target=scrape, daemon=True) if "metrics" in pair else None
    if scraper:
        scraper.start()
    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(in_flight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    stop_scrape.set()
    raw.close()
    if errors:
        raise RuntimeError(f"{pair['name']}: {len(errors)} errors, e.g. {errors[:3]}")
    return {
        "frames_per_s": round(len(latencies) * batch / wall, 2),
        "calls": len(latencies),
        "latency_ms_p50": round(statistics.median(latencies) * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/hardening.json"))
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=2)
    args = parser.parse_args()
    common.ensure_models(args.models_dir)
    models = args.models_dir.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-hardening-"))
    pairs = []
    try:
        pairs = [start_pair(models, work / name, name) for name in ("plain", "observed", "hardened")]
        blocks: dict = {}
        for round_ in range(args.rounds):
            for batch in (1, 8):
                for pair in pairs if round_ % 2 == 0 else list(reversed(pairs)):
                    common.log(f"round {round_ + 1}: {pair['name']}, {batch} frames per call")
                    result = block(pair, batch, args.seconds, args.in_flight)
                    blocks.setdefault(f"{pair['name']}_batch{batch}", []).append(result)
        summary: dict = {}
        for batch in (1, 8):
            row: dict = {}
            base_fps = statistics.median(b["frames_per_s"] for b in blocks[f"plain_batch{batch}"])
            base_lat = statistics.median(b["latency_ms_p50"] for b in blocks[f"plain_batch{batch}"])
            for pair in pairs:
                name = pair["name"]
                fps = statistics.median(b["frames_per_s"] for b in blocks[f"{name}_batch{batch}"])
                lat = statistics.median(b["latency_ms_p50"] for b in blocks[f"{name}_batch{batch}"])
                row[f"{name}_frames_per_s"] = fps
                row[f"{name}_latency_ms_p50"] = lat
                if name != "plain":
                    row[f"throughput_ratio_{name}_vs_plain"] = round(fps / base_fps, 3)
                    row[f"latency_ratio_{name}_vs_plain"] = round(lat / base_lat, 3)
            summary[f"batch{batch}"] = row
        result = {
            "benchmark": "hardening",
            "description": __doc__.strip().splitlines()[0],
            "settings": {"seconds": args.seconds, "rounds": args.rounds, "in_flight": args.in_flight, "model": "demo"},
            "summary": summary,
            "blocks": blocks,
        }
        path = common.write_result(args.out, result)
        common.log(f"wrote {path}")
        for key, value in summary.items():
            print(key, value)
    finally:
        for pair in pairs:
            for server in reversed(pair["servers"]):
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
