"""Helpers for tests: configs for generated models and in-thread gRPC servers."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from inference_service.config import InferenceConfig, load_config
from inference_service.server import RunningServer, start_server


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


class ServerThread:
    """An asyncio gRPC server on its own loop in a thread, so tests can use plain blocking stubs."""

    def __init__(self, config: InferenceConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = self.call(start_server(config))

    def call(self, coro: Any, timeout: float = 120) -> Any:
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    @property
    def address(self) -> str:
        return self.running.address

    def stop(self) -> None:
        try:
            self.call(self.running.stop(grace=1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
