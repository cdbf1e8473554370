"""A peer's incoming speech: the browser's microphone, gated into utterances, or audio an application pushes.

The microphone never stops sending (silence included), but a session only renders idle frames between
utterances, so an energy gate opens an utterance when the level rises above a threshold (with a short
pre-roll, so the onset is not clipped) and sends end_of_input after a stretch of silence. Pushed speech (a file,
or a TTS stream in a chunked body) is decoded as it arrives, in a thread, and paced out at real time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import av
import numpy as np
import soxr

RATE = 16000
BLOCK = RATE // 50  # 20 ms, the gate's resolution and the pushed audio's pacing step


def level_db(samples: np.ndarray) -> float:
    """RMS level in dBFS (-inf for digital silence)."""
    if not len(samples):
        return float("-inf")
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return 20 * np.log10(rms) if rms > 0 else float("-inf")


class MicResampler:
    """aiortc's decoded Opus frames (48 kHz s16 stereo) to 16 kHz mono float32, with one PyAV resampler."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)

    def __call__(self, frame: av.AudioFrame) -> np.ndarray:
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class SpeechGate:
    """Decides, per 20 ms block, whether microphone audio is part of an utterance.

    ``feed`` returns the samples to send (the pre-roll too when an utterance opens) and whether the utterance
    ended with this block; the caller starts an utterance on the first samples after an end.
    """

    def __init__(self, threshold_db: float = -45.0, hangover_s: float = 0.6, preroll_s: float = 0.04) -> None:
        self.threshold_db = threshold_db
        self.hangover_blocks = max(1, round(hangover_s * RATE / BLOCK))
        self.preroll: collections.deque[np.ndarray] = collections.deque(maxlen=max(0, round(preroll_s * RATE / BLOCK)))
        self.open = False
        self._quiet = 0
        self._pending = np.zeros(0, np.float32)

    def reset(self) -> None:
        """Close without an end (after end_of_utterance, interrupt or pushed speech): a new onset reopens."""
        self.open = False
        self._quiet = 0
        self.preroll.clear()

    def feed(self, samples: np.ndarray) -> tuple[np.ndarray, bool]:
        data = np.concatenate([self._pending, samples])
        whole = len(data) // BLOCK * BLOCK
        self._pending = data[whole:]
        out: list[np.ndarray] = []
        ended = False
        for block in data[:whole].reshape(-1, BLOCK):  # per 20 ms block, not per sample
            loud = level_db(block) >= self.threshold_db
            if not self.open:
                if loud:
                    self.open, self._quiet = True, 0
                    out.extend(self.preroll)
                    self.preroll.clear()
                    out.append(block)
                elif self.preroll.maxlen:
                    self.preroll.append(block)
                continue
            out.append(block)
            self._quiet = 0 if loud else self._quiet + 1
            if self._quiet >= self.hangover_blocks:
                self.open, ended = False, True
                break  # what follows the end waits for the next onset
        return (np.concatenate(out) if out else np.zeros(0, np.float32)), ended


class _BodyReader:
    """A blocking file-like view of an HTTP body that the event loop feeds chunk by chunk (for PyAV's thread)."""

    def __init__(self) -> None:
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=32)
        self._rest = b""
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        while not self._rest:
            if self.closed:
                return b""
            chunk = self.chunks.get()
            if chunk is None:
                self.closed = True
                return b""
            self._rest = chunk
        n = len(self._rest) if size < 0 else size
        out, self._rest = self._rest[:n], self._rest[n:]
        return out


def _pcm_rate(content_type: str) -> tuple[int, int] | None:
    """(rate, channels) for raw 16-bit PCM bodies: ``audio/L16;rate=24000;channels=1`` or ``audio/pcm``."""
    kind, *params = [p.strip() for p in content_type.split(";")]
    if kind.lower() not in ("audio/l16", "audio/pcm", "audio/x-raw"):
        return None
    values = dict(p.split("=", 1) for p in params if "=" in p)
    return int(values.get("rate", RATE)), int(values.get("channels", 1))


async def decode_body(
    chunks: AsyncIterator[bytes], content_type: str, max_seconds: float, on_error: Callable[[str], None]
) -> AsyncIterator[np.ndarray]:
    """Yields 16 kHz mono float32 blocks as the body arrives; stops (via on_error) past ``max_seconds``.

    Raw PCM (``audio/L16``, big-endian as RFC 2586 says, or ``audio/pcm``, little-endian) is converted directly;
    anything else is a container or codec PyAV can read from a stream (WAV, OGG/Opus, MP3, WebM...).
    """
    pcm = _pcm_rate(content_type)
    if pcm is not None:
        big_endian = content_type.lower().startswith("audio/l16")
        blocks = _decode_pcm(chunks, *pcm, ">i2" if big_endian else "<i2")
    else:
        blocks = _decode_container(chunks, on_error)
    total = 0
    limit = int(max_seconds * RATE)
    async with contextlib.aclosing(blocks):
        async for samples in blocks:
            total += len(samples)
            if total > limit:
                on_error(f"audio: longer than the {max_seconds:g} s limit")
                return
            yield samples


async def _decode_pcm(chunks: AsyncIterator[bytes], rate: int, channels: int, dtype: str) -> AsyncIterator[np.ndarray]:
    resampler = soxr.ResampleStream(rate, RATE, 1, dtype="float32") if rate != RATE else None
    frame_bytes = 2 * channels
    rest = b""
    async for chunk in chunks:
        data = rest + chunk
        usable = len(data) // frame_bytes * frame_bytes
        rest = data[usable:]
        samples = np.frombuffer(data[:usable], dtype).reshape(-1, channels).mean(axis=1, dtype=np.float32)
        samples = samples / 32768.0
        if resampler is not None:
            samples = resampler.resample_chunk(samples)
        yield samples.astype(np.float32, copy=False)
    if resampler is not None:
        yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def _container_decoder(
    reader: _BodyReader, out: asyncio.Queue[Any], stop: threading.Event, loop: asyncio.AbstractEventLoop
) -> Callable[[], None]:
    """The body's decoder, run on its own thread because PyAV reads blocking; None on ``out`` ends it."""

    def put(item: Any) -> None:
        asyncio.run_coroutine_threadsafe(out.put(item), loop).result()

    def decode() -> None:
        try:
            with av.open(reader, mode="r") as container:
                stream = container.streams.audio[0]
                resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
                for frame in container.decode(stream):
                    for piece in resampler.resample(frame):
                        if stop.is_set():
                            return
                        put(piece.to_ndarray().reshape(-1))
                for piece in resampler.resample(None):
                    put(piece.to_ndarray().reshape(-1))
            put(None)
        except Exception as exc:  # not audio, or cut short: the handler answers 400
            with contextlib.suppress(RuntimeError):
                put(exc)

    return decode


async def _decode_container(chunks: AsyncIterator[bytes], on_error: Callable[[str], None]) -> AsyncIterator[np.ndarray]:
    reader = _BodyReader()
    out: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
    stop = threading.Event()

    async def pump() -> None:
        try:
            async for chunk in chunks:
                await asyncio.to_thread(reader.chunks.put, chunk)
        finally:
            await asyncio.to_thread(reader.chunks.put, None)

    decode = _container_decoder(reader, out, stop, asyncio.get_running_loop())
    threading.Thread(target=decode, name="gateway-speech-decode", daemon=True).start()
    feeder = asyncio.create_task(pump())
    try:
        while (item := await out.get()) is not None:
            if isinstance(item, Exception):
                on_error(f"audio: cannot decode the body ({type(item).__name__}: {item})")
                return
            yield item
    finally:
        stop.set()
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feeder
        while not out.empty():  # let a decoder blocked on a full queue see the stop
            out.get_nowait()
        reader.closed = True
        with contextlib.suppress(queue.Full):
            reader.chunks.put_nowait(None)
