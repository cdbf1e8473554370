"""Headless Chromium driven over the DevTools protocol (CDP), for the viewer's end-to-end test.

Debian's chromium package is the browser; the protocol is spoken over a WebSocket with aiohttp (already a
dependency), so no driver binary or browser download is needed. Only what the test uses is here: open a page,
evaluate JavaScript, collect console errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# Flags for a closed network and a root user; the autoplay flag lets the page start its <audio> without a click.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--autoplay-policy=no-user-gesture-required",
    "--remote-debugging-port=0",
    "--remote-debugging-address=127.0.0.1",
    "--window-size=1280,900",
]


def find_chromium() -> str:
    """The browser binary; CI installs Debian's chromium (make test), so a missing one is an error, not a skip."""
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("chromium not found: install Debian's chromium package (make system-deps-test does)")


class BrowserError(RuntimeError):
    pass


class Page:
    """One tab: ``evaluate`` runs an expression and returns its JSON value."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.console_errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console_errors.append(json.dumps(data["params"]["exceptionDetails"])[:500])
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                self.console_errors.append(" ".join(str(a.get("value")) for a in data["params"]["args"]))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrowserError("the browser closed the DevTools connection"))

    async def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict:
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Runtime.enable")
        await self.send("Page.enable")
        await self.send("Page.navigate", {"url": url})

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


class Chromium:
    """A headless Chromium process with its own empty profile; ``async with`` starts and stops it."""

    def __init__(
        self, binary: str | None = None, start_timeout: float = 30.0, extra_flags: tuple[str, ...] = ()
    ) -> None:
        self.binary = binary or find_chromium()
        self.extra_flags = list(extra_flags)
        self.start_timeout = start_timeout
        self._profile = Path(tempfile.mkdtemp(prefix="lipsync-chromium-"))
        self._process: subprocess.Popen | None = None
        self._http: aiohttp.ClientSession | None = None
        self.port = 0

    async def __aenter__(self) -> Chromium:
        self._process = subprocess.Popen(
            [self.binary, *CHROMIUM_FLAGS, *self.extra_flags, f"--user-data-dir={self._profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=(self._profile.parent / f"{self._profile.name}.log").open("wb"),
        )
        active = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while not active.exists() or not active.read_text().strip():
            if self._process.poll() is not None:
                raise BrowserError(f"chromium exited with {self._process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise BrowserError(f"chromium did not open its DevTools port in {self.start_timeout} s")
            await asyncio.sleep(0.1)
        self.port = int(active.read_text().split()[0])
        self._http = aiohttp.ClientSession()
        return self

    def log_tail(self, lines: int = 20) -> str:
        path = self._profile.parent / f"{self._profile.name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def new_page(self) -> Page:
        assert self._http is not None
        async with self._http.put(f"http://127.0.0.1:{self.port}/json/new?about:blank") as response:
            target = await response.json(content_type=None)
        ws = await self._http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        return Page(ws)

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        log = self._profile.parent / f"{self._profile.name}.log"
        shutil.rmtree(self._profile, ignore_errors=True)
        log.unlink(missing_ok=True)
