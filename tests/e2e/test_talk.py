"""Talk mode in a real browser: headless Chromium's fake microphone (a WAV of speech and silences) talks to the
demo avatar over real WebRTC through a real cluster, and the page shows the lip-synced video and plays its voice.

What is measured in the page: frames decoded per second (getStats ``framesDecoded``); the mouth region of each
presented frame (requestVideoFrameCallback, drawn to a canvas at the mouth of the frame's background, which the
data channel names), darker than the idle picture's when the mouth opens; and the audio/video offset, from the
inbound-rtp ``estimatedPlayoutTimestamp`` of both tracks: the sender time (RTCP SR) of what each track plays now,
so their difference is how far apart sound and picture are on screen. The gateway sends a frame's 40 ms of audio
with it from one clock, so the offset shows whether the browser keeps them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
import wave
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import soxr
from browser import Chromium
from support import speech_with_pauses, wait_until

from demo_models.avatar import mouth_center_in_frame
from lipsync_cluster.launcher import Cluster, ClusterSpec
from service_common.processes import free_port
from shared_proto import compositing_pb2, compositing_pb2_grpc

pytestmark = pytest.mark.needs_tools  # chromium, and nginx in the local cluster

# speech, silence, speech, silence (chromium loops the file): each silence is longer than the gate's hangover
PATTERN = [("silence", 1.0), ("speech", 2.0), ("silence", 2.5), ("speech", 2.0), ("silence", 1.5)]


def fake_mic_wav(path: Path) -> Path:
    samples = soxr.resample(speech_with_pauses(*PATTERN), 16000, 48000)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def cluster(models_dir: Path):
    spec = ClusterSpec(
        models_dir=models_dir,
        port=free_port(),
        replicas=1,
        gateway_port=free_port(),
        compositing_overrides=["warmup=false"],
    )
    running = Cluster(spec).start()
    yield running
    running.stop()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def open_sessions(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        return stub.Health(compositing_pb2.HealthRequest(), timeout=10).active_sessions


# Installed in the page once the call is up: per presented frame, the mouth box's mean luma and the frame's
# stats from the data channel (matched by RTP timestamp).
WATCH_MOUTH = """(() => {
  const centers = %s;
  const video = document.getElementById("remote");
  const canvas = document.createElement("canvas");
  canvas.width = 28; canvas.height = 10;
  const g = canvas.getContext("2d", {willReadFrequently: true});
  window.mouthSamples = [];
  const onFrame = (now, meta) => {
    const call = window.lipsyncTalk;
    const info = call && call.frames.get(meta.rtpTimestamp);
    if (info && info.background !== undefined && video.videoWidth === 1280) {
      const [x, y] = centers[info.background];
      g.drawImage(video, x - 14, y - 5, 28, 10, 0, 0, 28, 10);
      const px = g.getImageData(0, 0, 28, 10).data;
      let sum = 0;
      for (let i = 0; i < px.length; i += 4) sum += 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
      window.mouthSamples.push({luma: sum / (px.length / 4), speech: info.speech, utterance: info.utterance,
                                n: info.n, hold: info.hold || null, level: info.level_db});
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
  return true;
})()"""

STATE = """(() => {
  const c = window.lipsyncTalk;
  if (!c) return null;
  return {state: document.getElementById("status").dataset.state, status: document.getElementById("status").textContent,
          peer: c.peerId, framesDecoded: c.framesDecoded, rvfc: c.decoded, latencies: c.latencies.slice(),
          av: c.avOffsets.slice(), samples: (window.mouthSamples || []).length, t: performance.now()};
})()"""


async def poll(page, predicate, timeout: float, interval: float = 0.2):
    """The page's state once ``predicate`` holds (or the last one at the deadline)."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = await page.evaluate(STATE)
        if state and predicate(state):
            return state
        await asyncio.sleep(interval)
    return state


class Stalls:
    """The gateway's process stopped (SIGSTOP) for ``length`` seconds every ``every`` seconds, as a loaded
    machine stops it now and then: afterwards its ticks are late and catch up at once."""

    def __init__(self, pid: int, every: float = 2.0, length: float = 0.2) -> None:
        self.pid, self.every, self.length = pid, every, length
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            os.kill(self.pid, signal.SIGSTOP)
            try:
                time.sleep(self.length)  # the stall itself: its length is the point
            finally:
                os.kill(self.pid, signal.SIGCONT)
            self.count += 1

    def __enter__(self) -> Stalls:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def talk(url: str, wav: Path, centers: list[list[float]], address: str, stalls: Stalls | None = None) -> dict:
    flags = (
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
    )
    async with Chromium(extra_flags=flags) as browser:
        page = await browser.new_page()
        await page.goto(url + "?model=demo&talk=1")
        up = await poll(page, lambda s: s["state"] == "talking" and s["framesDecoded"] > 0, 60)
        assert up and up["state"] == "talking", f"the call did not come up: {up}"
        await page.evaluate(WATCH_MOUTH % json.dumps(centers))
        # Frame rate over a measured interval, once the first frames are in.
        first = await poll(page, lambda s: s["framesDecoded"] >= 25, 30)
        second = await poll(page, lambda s: s["t"] - first["t"] >= 4000, 30)
        # Long enough for both utterances of the WAV (and their silences) to come back.
        with stalls or contextlib.nullcontext():
            done = await poll(page, lambda s: s["samples"] >= 300, 60)
        samples = await page.evaluate("window.mouthSamples")
        assert done["peer"] and open_sessions(address) == 1
        peers = await asyncio.to_thread(get_json, url + "peers")
        errors = list(page.console_errors)
        await page.send("Page.close")
        await page.close()
        return {"first": first, "second": second, "done": done, "samples": samples, "errors": errors, "peers": peers}


def mouth_centers(models_dir: Path) -> list[list[float]]:
    rects = json.loads((models_dir / "avatar" / "crop_rects.json").read_text())
    return [[round(v) for v in mouth_center_in_frame(rect)] for rect in rects]


def settled_offset(result: dict) -> tuple[float, list[int], dict]:
    """The median audio - video offset of the call's second half, the offsets, and the gateway's lateness."""
    offsets = result["done"]["av"]
    settled = offsets[len(offsets) // 2 :]
    assert len(settled) >= 5, offsets
    sender = {k: v for k, v in result["peers"]["peers"][0].items() if "late" in k or "lag" in k or k == "shed"}
    print("a/v offsets", offsets, "gateway", sender)  # shown with -rP: the figures of a passing call
    return float(np.median(settled)), offsets, sender


def test_talk_in_headless_chromium(cluster, models_dir: Path, tmp_path: Path) -> None:
    wav = fake_mic_wav(tmp_path / "mic.wav")
    result = asyncio.run(talk(cluster.gateway_url, wav, mouth_centers(models_dir), cluster.address))
    first, second, samples = result["first"], result["second"], result["samples"]
    assert not result["errors"], result["errors"]

    # About 25 frames decoded per second of the page's clock.
    rate = (second["framesDecoded"] - first["framesDecoded"]) / ((second["t"] - first["t"]) / 1000)
    assert 20 <= rate <= 30, f"{rate:.1f} frames decoded per second"

    # The mouth opens while the WAV speaks and settles when it is silent: idle frames show the closed mouth of
    # the idle picture; frames of loud speech are much darker there, frames of silence (the gate's hangover and
    # the tail) close again; and both utterances of the WAV came through.
    closed = float(np.median([s["luma"] for s in samples if not s["speech"] and not s["hold"]]))
    idle = np.array([s["luma"] for s in samples if not s["speech"] and not s["hold"]])
    loud = np.array([s["luma"] for s in samples if s["speech"] and (s["level"] or -200) > -30])
    silent = np.array([s["luma"] for s in samples if s["speech"] and (s["level"] or -200) < -70])
    assert len(idle) >= 25 and len(loud) >= 25 and len(silent) >= 10, (len(idle), len(loud), len(silent))
    assert np.mean(np.abs(idle - closed) < 15) >= 0.95, "the idle picture's mouth moved"
    assert np.mean(loud < closed - 25) >= 0.6, f"the mouth rarely opened: closed {closed:.0f}, {loud}"
    assert np.mean(silent > closed - 15) >= 0.7, f"the mouth stayed open in silence: closed {closed:.0f}, {silent}"
    assert len({s["utterance"] for s in samples if s["speech"]}) >= 2

    # Sound and picture together: audio minus video playout position, sampled twice a second. Chrome's own
    # synchronisation moves the two delays in steps after a change (the call's start, each utterance's onset),
    # so single samples swing; what must hold is where it settles: the median of the call's second half.
    # The gateway's side is in the message, to tell a stall there (late_audio, audio_lag_ms_*) from the browser's.
    median, offsets, sender = settled_offset(result)
    assert abs(median) <= 80, (offsets, sender)

    # The latency the page shows: speech reaching the gateway -> the frame made for it presented here.
    latencies = result["done"]["latencies"]
    assert latencies and 300 < float(np.median(latencies)) < 3000, latencies[:20]

    # Closing the tab frees the peer and its session on the replica.
    assert wait_until(lambda: freed(cluster), timeout=60, interval=0.2)


def freed(cluster) -> bool:
    peers = get_json(cluster.gateway_url + "healthz")["peers"]
    return peers["active"] == 0 and open_sessions(cluster.address) == 0


def test_talk_through_stalls_of_the_gateway(cluster, models_dir: Path, tmp_path: Path) -> None:
    # The gateway stopped for 200 ms every 2 s of the call. The packets of the ticks that were due meanwhile are
    # left out (late_audio), so the browser's audio buffer keeps its depth, and sound and picture stay together.
    assert wait_until(lambda: freed(cluster), timeout=60, interval=0.2)  # the previous call's peer is gone
    wav = fake_mic_wav(tmp_path / "mic.wav")
    stalls = Stalls(cluster.gateway.pid)
    result = asyncio.run(talk(cluster.gateway_url, wav, mouth_centers(models_dir), cluster.address, stalls))
    assert stalls.count >= 3, stalls.count
    median, offsets, sender = settled_offset(result)
    assert sender["late_audio"] >= stalls.count, sender
    assert abs(median) <= 80, (offsets, sender)
    assert len({s["utterance"] for s in result["samples"] if s["speech"]}) >= 2
    assert wait_until(lambda: freed(cluster), timeout=60, interval=0.2)
