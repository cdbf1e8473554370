"""WebRTC gateway benchmark: mouth-to-frame latency, the gateway's CPU per frame by step, peers per process.

Why: the gateway decodes every JPEG the compositing service made and encodes it again as video for each peer,
so its CPU, not the model, may bound how many people can talk at once. This measures where that CPU goes and
how many real-time peers one gateway process carries before frames come late.

Method: a local cluster (one inference server with ``onnx.allow_spinning: false``, one compositing replica,
the gateway) and N aiortc peers in this process (lipsync_gateway.rtc_client), each sending 8 s of speech and
pauses at real time as a microphone would. For each N:

- **latency**: per speech frame, the client's own send time of the last sample the frame shows (from the
  frame's ``mic_pos`` on the data channel) -> the frame decoded by the client's aiortc receiver; p50 / p95.
  Split with the gateway's stamps: audio in -> frame back from the service (the model's look-ahead and the
  service), -> frame handed to the encoder (the playout buffer).
- **CPU per frame**: the gateway process's CPU (``/proc``) over the window / frames sent; split by the
  gateway's own step timers (``GET /peers`` ``cpu``, thread CPU): JPEG decode, video encode, audio (resample +
  Opus), the rest (RTP/SRTP/DTLS, asyncio, gRPC, the microphone's Opus decode, data channel).
- **late frames**: playout underruns (no frame when its tick came) + ticks the encoder took more than a frame
  period late + ticks skipped because the encoder was behind. Reported: the most peers with at most 1% and
  with at most 5% late (a shared 2-core machine rarely gives 0 even for one peer); the ramp ends past 50%.

The clients decode VP8 too, on the same 2 shared cores, so the peer count is a floor for a gateway on its own
machine.

    .venv/bin/python -m bench.webrtc --models-dir models --out bench/results/webrtc.json
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from typing import Any

import numpy as np

from lipsync_client.media import read_speech
from lipsync_cluster.launcher import Cluster, ClusterSpec
from lipsync_gateway.rtc_client import SpeechTrack, TalkClient
from service_common.processes import free_port

from . import harness
from .harness import REPO_ROOT, log, percentile, process_cpu_seconds

SPEECH = REPO_ROOT / "tests" / "data" / "speech_16k.wav"
PATTERN = [("silence", 0.5), ("speech", 2.5), ("silence", 1.5), ("speech", 2.5), ("silence", 1.5)]


def speech() -> np.ndarray:
    data = read_speech(SPEECH)
    parts, offset = [], 0
    for kind, seconds in PATTERN:
        n = int(seconds * 16000)
        parts.append(np.zeros(n, np.float32) if kind == "silence" else data[offset : offset + n])
        offset += n if kind == "speech" else 0
    return np.concatenate(parts)


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return sum(p[key] for p in after["peers"]) - sum(p[key] for p in before["peers"])


def cpu_by_step(before: dict[str, Any], after: dict[str, Any], total_ms: float, ticks: int) -> dict[str, float]:
    """The gateway's own step timers per frame; ``rest`` is the process's CPU beyond them."""

    def step(*names: str) -> float:
        cpu = sum(after["cpu"].get(n, {}).get("cpu_s", 0.0) - before["cpu"].get(n, {}).get("cpu_s", 0.0) for n in names)
        return cpu * 1000 / max(ticks, 1)

    steps = {
        "jpeg_decode": step("jpeg_decode"),
        "video_encode": step("video_encode"),
        "audio_resample_and_encode": step("audio_encode", "audio_resample"),
    }
    steps["rest"] = total_ms - sum(steps.values())
    return {k: round(v, 2) for k, v in steps.items()}


def latencies(clients: list[TalkClient]) -> dict[str, Any]:
    """Per speech frame: mouth to decoded frame, audio in to frame back, frame back to sent (ms)."""
    latency, look_ahead, buffered = [], [], []
    for client in clients:
        decoded = {pts // 3600: at for at, pts in client.received.video}
        for m in client.frames():
            if not m["speech"] or m.get("audio_at") is None:
                continue
            look_ahead.append(m["arrived_at"] - m["audio_at"])
            buffered.append(m["sent_at"] - m["arrived_at"])
            if m.get("mic_pos") is not None and m["n"] in decoded:
                latency.append((decoded[m["n"]] - (client.speech.started + m["mic_pos"] / 16000)) * 1000)
    return {
        "mouth_to_frame_ms_p50": percentile(latency, 50),
        "mouth_to_frame_ms_p95": percentile(latency, 95),
        "audio_in_to_frame_back_ms_p50": percentile(look_ahead, 50),
        "frame_back_to_sent_ms_p50": percentile(buffered, 50),
        "speech_frames_measured": len(latency),
    }


async def run_level(url: str, peers: int, gateway_pid: int, seconds: float) -> dict[str, Any]:
    clients = [TalkClient(url, "demo", SpeechTrack(speech())) for _ in range(peers)]
    for client in clients:
        if not await client.connect():
            raise RuntimeError(f"offer refused: {client.status} {client.error}")
    # Measure once every peer is ticking: the window starts with all of them up.
    while min(len(c.received.video) for c in clients) < 5:
        await asyncio.sleep(0.05)
    before = get_json(url + "peers")
    cpu0, t0 = process_cpu_seconds(gateway_pid) or 0.0, time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, t1 = process_cpu_seconds(gateway_pid) or 0.0, time.monotonic()
    after = get_json(url + "peers")
    for client in clients:
        await client.close()
    ticks = _delta(before, after, "ticks")
    late = {k: _delta(before, after, k) for k in ("underruns", "late_sends", "shed")}
    total_ms = (cpu1 - cpu0) * 1000 / max(ticks, 1)
    return {
        "peers": peers,
        "window_s": round(t1 - t0, 2),
        "frames_sent": ticks,
        "fps_per_peer": round(ticks / (t1 - t0) / peers, 2),
        "late_frames": sum(late.values()),
        "late_fraction": round(sum(late.values()) / max(ticks, 1), 4),
        **late,
        "late_audio_packets": _delta(before, after, "late_audio"),  # 20 ms packets left out, not frames
        "send_lag_ms_p95_worst_peer": max((p["send_lag_ms_p95"] or 0) for p in after["peers"]),
        "gateway_cpu_percent": round((cpu1 - cpu0) / (t1 - t0) * 100, 1),
        "cpu_ms_per_frame": round(total_ms, 2),
        "cpu_ms_per_frame_by_step": cpu_by_step(before, after, total_ms, ticks),
        **latencies(clients),
    }


async def ramp(url: str, pid: int, levels: list[int], seconds: float) -> list[dict[str, Any]]:
    results = []
    for peers in levels:
        log(f"{peers} peer(s) for {seconds:g} s")
        result = await run_level(url, peers, pid, seconds)
        log(json.dumps(result))
        results.append(result)
        while get_json(url + "peers")["active"]:  # every peer freed before the next level
            await asyncio.sleep(0.2)
        if result["late_fraction"] > 0.5:  # far past real time: more peers only say the same
            break
    return results


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, "bench/results/webrtc.json")
    parser.add_argument("--levels", default="1,2,3,4,6,8", help="peer counts to try, in order")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window per level")
    args = parser.parse_args(argv)
    machine = harness.machine_info()
    harness.ensure_models(args.models_dir)
    spec = ClusterSpec(
        models_dir=args.models_dir,
        port=free_port(),
        replicas=1,
        inference_overrides=["onnx.allow_spinning=false"],
        gateway_port=free_port(),
        gateway_args=["--max-peers", "64"],
    )
    cluster = Cluster(spec).start()
    try:
        assert cluster.gateway is not None and cluster.gateway_url is not None
        levels = [int(x) for x in args.levels.split(",")]
        results = asyncio.run(ramp(cluster.gateway_url, cluster.gateway.pid, levels, args.seconds))
    finally:
        cluster.stop()
    one = results[0]
    summary = {
        "peers_with_at_most_1pct_late": max((r["peers"] for r in results if r["late_fraction"] <= 0.01), default=0),
        "peers_with_at_most_5pct_late": max((r["peers"] for r in results if r["late_fraction"] <= 0.05), default=0),
        "mouth_to_frame_ms_p50_one_peer": one["mouth_to_frame_ms_p50"],
        "mouth_to_frame_ms_p95_one_peer": one["mouth_to_frame_ms_p95"],
        "cpu_ms_per_frame_one_peer": one["cpu_ms_per_frame"],
        "cpu_ms_per_frame_by_step_one_peer": one["cpu_ms_per_frame_by_step"],
    }
    harness.write_result(args.out, {"benchmark": "webrtc", "summary": summary, "levels": results}, machine)
    log(f"wrote {args.out}: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
