"""Helpers for tests: configs for generated models, small avatars, and in-thread gRPC servers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from compositing_service.config import CompositingConfig
from compositing_service.config import load_config as load_compositing_config
from compositing_service.server import start_server as start_compositing_server
from inference_service.config import InferenceConfig, load_config
from inference_service.server import start_server as start_inference_server
from lipsync_client.media import read_speech
from service_common.serving import RunningServer

SPEECH = Path(__file__).resolve().parent / "data" / "speech_16k.wav"


def make_config(models_root: Path, **overrides: Any) -> InferenceConfig:
    base = {
        "models_root": str(models_root),
        "server.port": 0,
        "server.host": "127.0.0.1",
        "models.demo.preload": True,
        "models.unet328.preload": False,
    }
    base.update(overrides)
    return load_config(models_root / "inference.yaml", base, environ={})


def make_compositing_config(models_root: Path, inference_url: str, **overrides: Any) -> CompositingConfig:
    base = {
        "models_root": str(models_root),
        "server.port": 0,
        "server.host": "127.0.0.1",
        "inference_server.url": inference_url,
        "inference_server.timeout_seconds": 20,
        "frames_cache_dir": str(models_root / ".frames"),
        "models.unet328.preload_backgrounds": False,
    }
    base.update(overrides)
    return load_compositing_config(models_root / "compositing.yaml", base, environ={})


def write_small_avatar(folder: Path, frames: int = 12, size: tuple[int, int] = (640, 360)) -> tuple[Path, Path]:
    """A folder of PNG frames (a moving textured face-like blob) and its rects; fast to composite."""
    width, height = size
    frames_dir = folder / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    rects = []
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(frames):
        dx = round(8 * np.sin(i / 3))
        image = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx + yy + 7 * i) % 256)], -1).astype(np.uint8)
        cv2.circle(image, (width // 2 + dx, height // 2), height // 3, (110, 150, 210), -1, cv2.LINE_AA)
        cv2.imwrite(str(frames_dir / f"{i}.png"), image)
        side = 180
        x1, y1 = width // 2 + dx - side // 2, height // 2 - side // 2 + 20
        rects.append([x1, y1, x1 + side, y1 + side])
    rects_path = folder / "rects.json"
    rects_path.write_text(json.dumps(rects))
    return frames_dir, rects_path


class ServerThread:
    """An asyncio gRPC server on its own loop in a thread, so tests can use plain blocking stubs."""

    def __init__(
        self,
        config: Any,
        start: Callable[[Any], Coroutine[Any, Any, RunningServer]] = start_inference_server,
    ) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        try:
            self.running: RunningServer = self.call(start(config))
        except BaseException:
            self._close_loop()
            raise

    @classmethod
    def compositing(cls, config: CompositingConfig) -> ServerThread:
        return cls(config, start_compositing_server)

    def call(self, coro: Any, timeout: float = 120) -> Any:
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    @property
    def address(self) -> str:
        return self.running.address

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def stop(self) -> None:
        try:
            self.call(self.running.stop(grace=1.0))
        finally:
            self._close_loop()


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it gives something truthy or ``timeout`` seconds pass; its last value.

    For a test that waits for a condition instead of sleeping a fixed time: it returns as soon as the condition
    holds, so a generous timeout costs nothing when all is well. The caller asserts on what it returns.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.001) -> Any:
    """``wait_until`` for a coroutine on an event loop: sleeps with ``asyncio.sleep`` so other tasks run."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(interval)


def speech_with_pauses(*parts: tuple[str, float]) -> np.ndarray:
    """16 kHz test speech cut into ("speech" | "silence", seconds) parts; each speech part goes on where the
    last one stopped."""
    speech = read_speech(SPEECH)
    out, offset = [], 0
    for kind, seconds in parts:
        n = int(seconds * 16000)
        out.append(np.zeros(n, np.float32) if kind == "silence" else speech[offset : offset + n])
        offset += n if kind == "speech" else 0
    return np.concatenate(out)
