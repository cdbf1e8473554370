"""The browser viewer, started by the cluster: its HTTP API streams a real session, and the page plays the
frames in headless Chromium (Debian's chromium, driven over the DevTools protocol) in step with its clock."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import urllib.error
import urllib.request
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest
from browser import Chromium

from lipsync_cluster.launcher import Cluster, ClusterSpec
from service_common.processes import free_port

pytestmark = pytest.mark.needs_tools  # chromium, and nginx in the local cluster

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech_16k.wav"


def short_clip(path: Path, seconds: float = 2.0) -> Path:
    with wave.open(str(SPEECH)) as src:
        data = src.readframes(int(16000 * seconds))
    with wave.open(str(path), "wb") as dst:
        dst.setnchannels(1)
        dst.setsampwidth(2)
        dst.setframerate(16000)
        dst.writeframes(data)
    return path


@pytest.fixture(scope="module")
def cluster(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    clip = short_clip(tmp_path_factory.mktemp("clip") / "clip.wav")
    spec = ClusterSpec(
        models_dir=models_dir,
        port=free_port(),
        replicas=1,
        gateway_port=free_port(),
        gateway_args=["--sample-clip", str(clip)],
        compositing_overrides=["warmup=false"],
    )
    running = Cluster(spec).start()
    yield running, clip
    running.stop()


def test_gateway_api_streams_a_session(cluster) -> None:
    running, clip = cluster
    url = running.gateway_url
    with urllib.request.urlopen(url + "healthz", timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(url + "models", timeout=10) as response:
        assert "demo" in response.read().decode()
    request = urllib.request.Request(url + "session?model=demo&start_frame=3", data=clip.read_bytes(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        lines = [json.loads(line) for line in response.read().decode().splitlines() if line.strip()]
    assert "started" in lines[0] and "ended" in lines[-1]
    frames = [line for line in lines if "jpeg" in line]
    assert [f["index"] for f in frames] == list(range(len(frames))) and len(frames) >= 50
    image = cv2.imdecode(np.frombuffer(base64.b64decode(frames[0]["jpeg"]), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (720, 1280, 3)
    bad = urllib.request.Request(url + "session?model=ghost", data=clip.read_bytes(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=60)
    assert err.value.code == 404 and "NOT_FOUND" in err.value.read().decode()


# Everything the test reads off the page at once: the canvas's data-* attributes (viewer.js keeps them current)
# and a checksum of the pixels drawn, so a frame counter that moves over an unchanging picture would fail.
PAGE_STATE = """(() => {
  const c = document.getElementById("screen");
  const small = document.createElement("canvas");
  small.width = 64; small.height = 36;
  const g = small.getContext("2d");
  g.drawImage(c, 0, 0, 64, 36);
  const px = g.getImageData(0, 0, 64, 36).data;
  let sum = 0;
  for (let i = 0; i < px.length; i += 4) sum = (sum * 31 + px[i] + 7 * px[i + 1] + 13 * px[i + 2]) % 1000000007;
  return {state: c.dataset.state, shown: +c.dataset.framesShown, received: +c.dataset.framesReceived,
          clockT: +(c.dataset.clockT || 0), shownT: +(c.dataset.shownT || -1), clock: c.dataset.clock || "",
          pixels: sum, status: document.getElementById("status").textContent};
})()"""


async def watch_page(url: str, timeout_s: float = 90.0) -> tuple[list[dict], list[str]]:
    """Open the page and sample its state every 100 ms until it reports done (or error, or the timeout)."""
    async with Chromium() as browser:
        page = await browser.new_page()
        try:
            await page.goto(url)
            samples: list[dict] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while loop.time() < deadline:
                with contextlib.suppress(Exception):  # the page may still be loading
                    state = await page.evaluate(PAGE_STATE)
                    if state:
                        samples.append(state)
                        if state["state"] in ("done", "error"):
                            break
                await asyncio.sleep(0.1)
            return samples, page.console_errors
        finally:
            await page.close()


def test_page_plays_the_session_in_headless_chromium(cluster) -> None:
    running, clip = cluster
    url = running.gateway_url + "?model=demo&clip=/sample-clip&autoplay=1"
    samples, console_errors = asyncio.run(watch_page(url))
    assert samples, "the page never answered"
    last = samples[-1]
    assert last["state"] == "done", f"the page ended as {last['state']!r}: {last['status']!r}"
    assert not console_errors, console_errors

    # Every frame of the 2 s clip arrived (the reference renders int(((1 + n // 200) - 16) / 80 * 25) + 4 frames).
    with wave.open(str(clip)) as w:
        samples_n = w.getnframes()
    expected = int(((1 + samples_n // 200) - 16) / 80 * 25) + 4
    assert last["received"] >= expected

    playing = [s for s in samples if s["state"] == "playing" and s["shown"] > 0]
    assert len(playing) >= 10, f"too few samples while playing: {len(playing)}"
    # Frames advance: the count shown never goes back, rises many times, and the picture itself changes.
    shown = [s["shown"] for s in samples]
    assert shown == sorted(shown)
    assert len({s["shown"] for s in playing}) >= 8
    assert len({s["pixels"] for s in playing}) >= 5
    # Paced by the clock, not dumped at once: about 25 frames shown per second of clock.
    first, final = playing[0], playing[-1]
    span = final["clockT"] - first["clockT"]
    assert span > 1.0
    rate = (final["shown"] - first["shown"]) / span
    assert 10 <= rate <= 30, f"{rate:.1f} frames shown per clock second"
    # In sync: the frame on screen is the one whose timestamp the clock (the clip's audio when it plays) has reached.
    assert final["clock"] == "audio", f"the page fell back to {final['clock']!r}"
    lags = [s["clockT"] - s["shownT"] for s in playing]
    assert min(lags) > -0.05 and max(lags) < 0.3, (min(lags), max(lags), final["clock"])
