"""Chaos soak (`make soak`, not in CI): rolling restarts, kills and inference outages under load.

A local cluster (2 inference servers, 2 compositing replicas, nginx) serves 8 clients that call the batch RPC in a
loop through nginx with ``LipsyncClient.composite`` (gRPC's retry policy, and a batch whose answer was cut in transit
asked again). Meanwhile, in turn:

- a rolling restart (each replica replaced behind nginx, each inference server restarted);
- a compositing replica killed with SIGKILL (no drain at all), then replaced;
- an inference outage: one of the two inference servers killed with SIGKILL and started again after a pause.

It reports the client-visible failures (must be 0 for the batch RPC: every call is retried onto a live replica),
the calls made, latency percentiles, and the RSS of each process over its life. Results: JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from lipsync_client.api import LipsyncClient, LipsyncError
from lipsync_cluster.launcher import Cluster, ClusterSpec, Part
from service_common.processes import free_port
from shared_proto import compositing_pb2 as pb

WINDOW = np.full((32, 16, 16), 0.6, np.float32).tobytes()


class Clients:
    """``count`` clients calling InferBatchComposite one after another until stopped; outcomes by code."""

    def __init__(self, address: str, count: int) -> None:
        self.address = address
        self.codes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def _run(self, index: int) -> None:
        with LipsyncClient(self.address, timeout=60) as client:
            position = index * 11
            while not self._stop.is_set():
                request = pb.CompositeBatchRequest(
                    model_id="demo", audio_features=WINDOW, batch_size=4, start_frame_idx=position
                )
                position += 4
                started = time.monotonic()
                try:
                    client.composite(request)
                    code = "OK"
                except LipsyncError as exc:
                    code = exc.code.name if exc.code else "ERROR"
                    with self._lock:
                        self.failures.append(f"{time.strftime('%H:%M:%S')} {exc}")
                with self._lock:
                    self.codes[code] += 1
                    self.latencies.append(time.monotonic() - started)

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Memory:
    """RSS of every process the cluster runs, sampled over each one's life (first sample after a warm-up)."""

    def __init__(self, cluster: Cluster, warmup_s: float = 20.0) -> None:
        self.cluster = cluster
        self.warmup_s = warmup_s
        self.lives: dict[int, dict] = {}  # pid -> name, first_seen, first/last/max rss after warm-up

    def sample(self) -> None:
        now = time.monotonic()
        for part in self.cluster.parts():
            life = self.lives.setdefault(part.pid, {"name": part.name, "seen": now, "first": 0, "last": 0, "max": 0})
            if now - life["seen"] < self.warmup_s:
                continue
            value = rss(part.pid)
            if value:
                life["first"] = life["first"] or value
                life["last"] = value
                life["max"] = max(life["max"], value)

    def report(self) -> list[dict]:
        out = []
        for pid, life in self.lives.items():
            if life["first"]:
                growth = life["last"] - life["first"]
                out.append(
                    {
                        "process": life["name"],
                        "pid": pid,
                        "rss_mb_first": round(life["first"] / 2**20, 1),
                        "rss_mb_last": round(life["last"] / 2**20, 1),
                        "rss_mb_max": round(life["max"] / 2**20, 1),
                        "growth_mb": round(growth / 2**20, 1),
                    }
                )
        return out


def kill_replica(cluster: Cluster) -> str:
    victim: Part = cluster.replicas[0]
    victim.process.process.send_signal(signal.SIGKILL)
    victim.process.process.wait(30)
    new = cluster.add_replica()
    cluster.remove_replica(victim)  # already dead: out of nginx's list
    return f"SIGKILL {victim.name}, replaced by {new.name}"


def inference_outage(cluster: Cluster, pause_s: float) -> str:
    victim = cluster.inference[0]
    victim.process.process.send_signal(signal.SIGKILL)
    victim.process.process.wait(30)
    time.sleep(pause_s)  # the outage itself: the other server carries the load meanwhile
    cluster.restart_inference(victim)
    return f"SIGKILL {victim.name}, down {pause_s:.0f} s, restarted"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/soak.py", description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args(argv)
    spec = ClusterSpec(
        models_dir=args.models_dir,
        port=free_port(),
        replicas=2,
        inference_servers=2,
        compositing_overrides=["warmup=false", "logging.requests=false"],
        inference_overrides=["logging.requests=false"],
    )
    events: list[dict] = []
    started = time.monotonic()
    with Cluster(spec) as cluster, Clients(cluster.address, args.clients) as clients:
        memory = Memory(cluster)
        actions = [
            ("rolling restart", lambda: "; ".join(cluster.rolling_restart())),
            ("replica killed", lambda: kill_replica(cluster)),
            ("inference outage", lambda: inference_outage(cluster, 5.0)),
        ]
        step = 0
        end = started + args.minutes * 60
        while time.monotonic() < end:
            name, action = actions[step % len(actions)]
            step += 1
            t0 = time.monotonic()
            detail = action()
            events.append({"at_s": round(t0 - started, 1), "event": name, "detail": detail})
            print(f"[{t0 - started:6.0f} s] {name}: {detail}  calls so far {dict(clients.codes)}", flush=True)
            quiet_until = time.monotonic() + 10  # load between events, memory sampled
            while time.monotonic() < min(quiet_until, end):
                memory.sample()
                time.sleep(1.0)
    codes = dict(clients.codes)
    latencies = np.asarray(clients.latencies)
    result = {
        "minutes": round((time.monotonic() - started) / 60, 2),
        "clients": args.clients,
        "events": events,
        "calls": codes,
        "client_visible_failures": sum(v for k, v in codes.items() if k != "OK"),
        "failures": clients.failures[:50],
        "latency_s_p50": round(float(np.percentile(latencies, 50)), 3) if latencies.size else None,
        "latency_s_p99": round(float(np.percentile(latencies, 99)), 3) if latencies.size else None,
        "rss": memory.report(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("events", "rss")}, indent=2))
    print(f"results: {args.out}")
    return 0 if result["client_visible_failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
