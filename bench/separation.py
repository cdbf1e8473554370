"""What the two-service split costs: separated against in-process, with the same client load, in one run.

For each model: throughput (paired blocks), the server processes' CPU per output frame, the same without the
model's own run (the bare ``InferenceSession.run`` CPU per frame, measured here with the service's session
options), and the hop's bytes per frame on a first pass over the avatar (cold: the inference service holds no
inputs yet) and after (warm). ORT's spinning is compared per mode at one offered load (CPU per frame at equal
throughput) and at saturation. Splicing on against off rides along.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from shared_proto import compositing_pb2 as cpb
from shared_proto import compositing_pb2_grpc as cpb_grpc

from . import harness
from .avatar import loudness_audio
from .harness import CHANNEL_OPTIONS, Fleet, Meter, closed_loop, log, open_loop, paired, throughput

ORT_THREADS = 2
AVATAR_FRAMES = 125
PING_PONG_PERIOD = 2 * (AVATAR_FRAMES - 1)  # positions that show every background frame once each way


# ORT's spinning, per variant: key=value overrides of the inference config.
# (Per model too: a model's own allow_spinning, as the demo config sets for the demo model, would win.)
def _spinning(allow: bool, between: bool) -> list[str]:
    return [f"models.{m}.allow_spinning={str(allow).lower()}" for m in ("demo", "unet328")] + [
        f"onnx.spin_between_runs={str(between).lower()}"
    ]


SPINNING = {
    # spin while a run's parallel sections follow each other, stop when the last run returns
    "during_runs": _spinning(True, False),
    # ORT's own default: go on spinning after a run, waiting for the next
    "between_runs": _spinning(True, True),
    "off": _spinning(False, False),
}


# Whether each mode's ORT threads spin during a run by default (onnx.allow_spinning).
MODE_SPINNING = {"in_process": False, "separated": False}


@dataclass(frozen=True)
class Plan:
    batch: int
    block_seconds: float
    blocks: int
    warmup: int


PLANS = {"demo": Plan(8, 2.0, 7, 12), "unet328": Plan(4, 4.0, 5, 4)}


class Client:
    """A compositing service's stub walking an avatar batch by batch (start_frame_idx advances per call)."""

    def __init__(self, address: str, model: str, batch: int) -> None:
        self.channel = grpc.insecure_channel(address, CHANNEL_OPTIONS)
        self.stub = cpb_grpc.CompositingServiceStub(self.channel)
        self.model, self.batch = model, batch
        self._next = 0
        self._lock = threading.Lock()

    def call(self, start: int | None = None) -> cpb.CompositeBatchResponse:
        """The next batch of the walk, or the one at ``start``."""
        if start is None:
            with self._lock:
                start, self._next = self._next, self._next + self.batch
        audio = loudness_audio(self.batch, start)
        request = cpb.CompositeBatchRequest(
            model_id=self.model,
            audio_features=audio.tobytes(),
            audio_features_shape=list(audio.shape),
            batch_size=self.batch,
            start_frame_idx=start,
        )
        return self.stub.InferBatchComposite(request, timeout=300)

    def health(self) -> cpb.HealthResponse:
        return self.stub.Health(cpb.HealthRequest(), timeout=30)


def compositing_args(models_dir: Path, work: Path) -> list[str]:
    return [
        "--config",
        str(models_dir / "compositing.yaml"),
        "--set",
        f"frames_cache_dir={work / 'frames'}",
        "--set",
        "models.unet328.preload_backgrounds=true",
        "--set",
        "warmup=false",
        "--set",
        "logging.requests=false",
    ]


def start_separated(fleet: Fleet, models_dir: Path, name: str, inference_set: list[str]) -> None:
    inference = fleet.start(
        f"{name}/inference",
        "lipsync-inference",
        ["--config", str(models_dir / "inference.yaml"), "--set", f"onnx.intra_op_threads={ORT_THREADS}"]
        + [a for kv in [*inference_set, "logging.requests=false"] for a in ("--set", kv)],
    ).wait_serving(180)
    fleet.start(
        name,
        "lipsync-compositing",
        [*compositing_args(models_dir, fleet.work), "--inference-url", inference.address],
    ).wait_serving(300)


def start_in_process(fleet: Fleet, models_dir: Path, name: str, inference_set: list[str]) -> None:
    overrides = json.dumps([f"onnx.intra_op_threads={ORT_THREADS}", *inference_set])
    fleet.start(
        name,
        "lipsync-compositing",
        [
            *compositing_args(models_dir, fleet.work),
            "--in-process",
            "--set",
            "inference.config=inference.yaml",
            "--set",
            f"inference.overrides={overrides}",
        ],
    ).wait_serving(300)


def procs_of(mode: str, fleet: Fleet) -> list[str]:
    return [n for n in fleet.procs if n == mode or n.startswith(mode + "/")]


def block_runner(
    fleet: Fleet, clients: dict[str, Client], seconds: float, rate: float | None = None
) -> Callable[[str], dict[str, Any]]:
    """One block of a mode: fps, and the CPU of its processes per output frame (the machine's other load too)."""
    meter = Meter(fleet.pids())

    def run(mode: str) -> dict[str, Any]:
        client = clients[mode]
        start = meter.snapshot()
        if rate is None:
            done = closed_loop(client.call, seconds, in_flight=2)
        else:
            done = open_loop(client.call, seconds, rate / client.batch)
        used = Meter.used(start, meter.snapshot())
        frames = len(done) * client.batch
        server = sum(used[p] for p in procs_of(mode, fleet))
        return {
            "fps": round(throughput(done.stamps, client.batch), 2),
            "server_cpu_ms_per_frame": round(server * 1000 / frames, 3),
            "other_cpu_pct": round(used["other"] / used["wall"] * 100, 1),
        }

    return run


def bare_model_cpu_ms(models_dir: Path, model: str, batch: int, spinning: bool, seconds: float = 3.0) -> float:
    """CPU per frame of the model's own run: InferenceSession.run with a mode's session options (spinning during
    runs, or not at all), in a fresh process so that nothing else of the benchmark's is counted."""
    command = [sys.executable, "-m", "bench.bare_model", str(models_dir / model / "model.onnx"), str(batch)]
    command += ["--threads", str(ORT_THREADS), "--seconds", str(seconds)] + (["--spinning"] if spinning else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    return float(json.loads(done.stdout)["cpu_ms_per_frame"])


def hop_pass(client: Client, frames: int) -> dict[str, float]:
    """One pass over ``frames`` avatar frames: the hop's bytes per frame each way, from the service's counters."""
    before = client.health()
    for _ in range(max(1, frames // client.batch)):
        client.call()
    after = client.health()
    sent = after.hop_frames - before.hop_frames
    return {
        "request_bytes_per_frame": round((after.hop_request_bytes - before.hop_request_bytes) / sent, 1),
        "response_bytes_per_frame": round((after.hop_response_bytes - before.hop_response_bytes) / sent, 1),
        "inputs_sent_per_frame": round((after.hop_inputs_sent - before.hop_inputs_sent) / sent, 3),
    }


def compare_model(fleet: Fleet, models_dir: Path, model: str, scale: float) -> dict[str, Any]:
    """One model on the running fleet: hop bytes cold and warm, separated against in-process, splicing off/on."""
    plan = PLANS[model]
    clients = {m: Client(fleet.procs[m].address, model, plan.batch) for m in fleet.procs if "/" not in m}
    # Cold, then warm: the hop's bytes on the first pass over the avatar and on the next.
    hop = {"cold": hop_pass(clients["separated"], PING_PONG_PERIOD)}
    hop["warm"] = hop_pass(clients["separated"], PING_PONG_PERIOD)
    for client in clients.values():
        for _ in range(plan.warmup):
            client.call()
    run = block_runner(fleet, clients, plan.block_seconds * scale)
    log(f"separation/{model}: in_process against separated, {plan.blocks} blocks")
    pairs = paired(run, "in_process", "separated", plan.blocks)
    bare = {m: bare_model_cpu_ms(models_dir, model, plan.batch, spin) for m, spin in MODE_SPINNING.items()}
    cpu = {
        m: round(harness.median([b["server_cpu_ms_per_frame"] for b in pairs["blocks"] if b["mode"] == m]), 3)
        for m in ("in_process", "separated")
    }
    log(f"splicing/{model}: separated with splicing off against on")
    splicing = paired(run, "separated_no_splice", "separated", 5)
    same = [clients[m].call(start=40).composited_frames for m in ("in_process", "separated")]
    for client in clients.values():
        client.channel.close()
    return {
        "batch_size": plan.batch,
        "in_flight": 2,
        "separated_vs_in_process": pairs["ratio"],
        "ratios": pairs["ratios"],
        "server_cpu_ms_per_frame": cpu,
        "separated_cpu_vs_in_process": round(cpu["separated"] / cpu["in_process"], 3),
        "model_cpu_ms_per_frame (bare InferenceSession.run)": {m: round(v, 3) for m, v in bare.items()},
        "server_cpu_ms_per_frame_excluding_model": {m: round(v - bare[m], 3) for m, v in cpu.items()},
        "hop_request_bytes_per_frame": {k: v["request_bytes_per_frame"] for k, v in hop.items()},
        "hop_response_bytes_per_frame": {k: v["response_bytes_per_frame"] for k, v in hop.items()},
        "hop": hop,
        "splicing_on_vs_off": splicing["ratio"],
        "frames_identical_across_modes": len({tuple(f) for f in same}) == 1,
        "blocks": pairs["blocks"],
        "splicing_blocks": splicing["blocks"],
    }


def main_comparison(models_dir: Path, models: list[str], scale: float) -> dict[str, Any]:
    """separated against in-process (defaults), hop bytes cold and warm, splicing on against off."""
    out: dict[str, Any] = {}
    with harness.fleet("bench-separation-") as fleet:
        log("separation: starting inference + compositing (separated, and without splicing) and in-process")
        start_separated(fleet, models_dir, "separated", [])
        inference = fleet.procs["separated/inference"].address
        no_splice = ["--inference-url", inference, "--set", "output.jpeg_splicing=false"]
        args = [*compositing_args(models_dir, fleet.work), *no_splice]
        fleet.start("separated_no_splice", "lipsync-compositing", args).wait_serving(300)
        start_in_process(fleet, models_dir, "in_process", [])
        for model in models:
            out[model] = compare_model(fleet, models_dir, model, scale)
        out["exit_codes"] = fleet.stop()
    return out


def spinning(models_dir: Path, models: list[str], scale: float) -> dict[str, Any]:
    """Per mode, each spinning variant: max throughput, and CPU per frame at one offered load (the same for all
    variants: 60% of the slowest variant's max), which is how the default was chosen (docs/decisions/0010)."""
    out: dict[str, Any] = {}
    for mode in ("separated", "in_process"):
        with harness.fleet(f"bench-spin-{mode}-") as fleet:
            log(f"spinning/{mode}: starting {', '.join(SPINNING)}")
            for variant, settings in SPINNING.items():
                if mode == "separated":
                    start_separated(fleet, models_dir, variant, settings)
                else:
                    start_in_process(fleet, models_dir, variant, settings)
            out[mode] = {}
            for model in models:
                plan = PLANS[model]
                clients = {v: Client(fleet.procs[v].address, model, plan.batch) for v in SPINNING}
                for client in clients.values():
                    for _ in range(plan.warmup):
                        client.call()
                closed = block_runner(fleet, clients, plan.block_seconds * scale)
                saturated = {v: closed(v) for v in SPINNING}
                rate = 0.6 * min(b["fps"] for b in saturated.values())
                opened = block_runner(fleet, clients, plan.block_seconds * scale * 1.5, rate=rate)
                at_rate = {v: opened(v) for v in SPINNING}
                log(f"spinning/{mode}/{model}: max {saturated}; at {rate:.0f} fps {at_rate}")
                out[mode][model] = {"max": saturated, "offered_fps": round(rate, 1), "at_offered_load": at_rate}
                for client in clients.values():
                    client.channel.close()
    return out
