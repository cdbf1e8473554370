"""Zero loss at a stop: `lipsync-cluster restart --rolling` under load from 8 rendering clients.

A detached cluster (2 inference servers, 2 compositing replicas, nginx) is restarted process by process while 8
``LipsyncClient.render`` loops run through nginx: no client call may fail, and every frame must equal the frame of
the same render on the quiet cluster (the batch RPC is a pure function of its request).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from lipsync_client import LipsyncClient, LipsyncError
from lipsync_cluster import nginx
from lipsync_cluster.cli import state_file
from service_common.processes import free_port

pytestmark = pytest.mark.needs_tools  # nginx: the local cluster

BIN = Path(sys.executable).parent
SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech_16k.wav"
CLIENTS = 8


def speech(seconds: float) -> np.ndarray:
    with wave.open(str(SPEECH)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    return pcm[: round(seconds * 16000)].astype(np.float32) / 32768.0


def cluster_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lipsync-cluster"), *args], capture_output=True, text=True, timeout=timeout)


def render_frames(client: LipsyncClient, samples: np.ndarray, start: int, folder: Path) -> list[bytes]:
    client.render("demo", samples, frames_dir=folder, batch_size=8, concurrency=2, start_frame=start)
    return [path.read_bytes() for path in sorted(folder.glob("*.jpg"))]


class Renderer(threading.Thread):
    """One client rendering the same clip again and again, checking each render against the quiet one."""

    def __init__(self, index: int, address: str, samples: np.ndarray, expected: list[bytes], folder: Path) -> None:
        super().__init__(daemon=True)
        self.index, self.address, self.samples, self.expected, self.folder = index, address, samples, expected, folder
        self.stop = threading.Event()
        self.renders = 0
        self.failures: list[str] = []

    def run(self) -> None:
        with LipsyncClient(self.address, timeout=60) as client:
            while not self.stop.is_set():
                folder = self.folder / f"{self.renders}"
                try:
                    frames = render_frames(client, self.samples, self.index * 5, folder)
                except LipsyncError as exc:
                    self.failures.append(f"client {self.index}: {exc}")
                    continue
                if frames != self.expected:
                    self.failures.append(f"client {self.index}: render {self.renders} differs from the quiet run")
                self.renders += 1


def test_rolling_restart_under_load_loses_no_call_and_changes_no_frame(models_dir: Path, tmp_path: Path) -> None:
    assert nginx.find_nginx(), nginx.install_hint()  # make test installs nginx: a failure, never a skip
    port = free_port()
    up = cluster_cli(
        "up",
        "--detach",
        "--port",
        str(port),
        "--replicas",
        "2",
        "--inference-servers",
        "2",
        "--models-dir",
        str(models_dir),
        "--set-compositing",
        "warmup=false",
    )
    assert up.returncode == 0, up.stderr + up.stdout
    address = f"127.0.0.1:{port}"
    renderers: list[Renderer] = []
    try:
        before = json.loads(state_file(port).read_text())
        samples = speech(1.2)
        with LipsyncClient(address, timeout=60) as client:  # the quiet run
            expected = [render_frames(client, samples, i * 5, tmp_path / f"quiet-{i}") for i in range(CLIENTS)]
        assert all(len(frames) == len(expected[0]) > 20 for frames in expected)
        renderers = [Renderer(i, address, samples, expected[i], tmp_path / f"load-{i}") for i in range(CLIENTS)]
        for renderer in renderers:
            renderer.start()
        restarted = cluster_cli("restart", "--rolling", "--port", str(port))
        assert restarted.returncode == 0, restarted.stderr + restarted.stdout
        for renderer in renderers:
            renderer.stop.set()
        for renderer in renderers:
            renderer.join(120)
        lines = restarted.stdout.splitlines()
        assert lines[:4] == [
            "compositing 1 -> compositing 3",
            "compositing 2 -> compositing 4",
            "inference 1 restarted",
            "inference 2 restarted",
        ], restarted.stdout
        assert all(r.renders >= 1 for r in renderers), [r.renders for r in renderers]
        failures = [f for r in renderers for f in r.failures]
        assert not failures, failures
        # Every process was replaced: new pids (and new ports for the replicas), the same public address.
        after = json.loads(state_file(port).read_text())
        assert after["supervisor_pid"] == before["supervisor_pid"]
        with LipsyncClient(address, timeout=60) as client:
            assert client.health().healthy
            assert render_frames(client, samples, 0, tmp_path / "after") == expected[0]
    finally:
        for renderer in renderers:
            renderer.stop.set()
        down = cluster_cli("down", "--port", str(port))
        assert down.returncode == 0, down.stderr + down.stdout
