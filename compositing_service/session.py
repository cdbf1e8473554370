"""Real-time sessions: audio chunks in as they are produced, lip-synced frames out as soon as they can be made.

A session is a sequence of utterances on one timeline. Audio appended to the
open utterance makes frames ready one by one: utterance frame k needs the
samples ``required_samples(k, 1, ∞)`` names (about 40 k + 470 ms of audio);
ready frames go to the compositing core in batches of up to
``max_batch_frames``, two batches in flight, exactly as the batch API
computes them (same RawAudio windows and alignment), so a session yields the
frames ``InferBatchComposite`` would. Frame ``s`` of the session has
timestamp ``s / fps``: the timeline follows the audio samples, never the wall
clock, so nothing drifts.

End of input flushes the tail: the reference's frames for the utterance, then
silent frames until the video covers the audio (so the last timestamp is
within one frame of the audio's end). Between utterances, with
``idle_frames``, background frames continue the ping-pong, paced at fps.
Interrupt drops queued audio and frames not yet sent.

Every buffer is bounded: audio ahead of the frames being made (the input
waits, which pushes back on the client through gRPC flow control) and frames
not yet sent (a reader that falls behind past ``buffer_frames`` fails the
session with RESOURCE_EXHAUSTED, or loses its oldest frames when it asked to
drop late frames).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from lipsync_protocol.errors import InvalidArgument, ResourceExhausted
from lipsync_protocol.frames import Frame
from lipsync_protocol.speech import RawAudio, decode_pcm
from lipsync_protocol.timing import (
    FPS,
    MIN_SAMPLES,
    SAMPLE_RATE,
    UNBOUNDED,
    frame_time,
    frames_to_cover,
    plan_batch,
    required_samples,
)

from .core import CompositingCore
from .geometry import frame_index

log = logging.getLogger(__name__)

BURST_GRACE_S = 0.5  # how long a full output buffer may take to drain before the reader counts as slow


@dataclass(frozen=True)
class SessionOptions:
    model_id: str
    start_frame_idx: int = 0
    fps: float = FPS
    output_format: str = "jpeg"
    jpeg_quality: int = 75
    encoding: str = "f32le"  # as an unset SessionConfig.audio_encoding
    sample_rate: int = SAMPLE_RATE
    idle_frames: bool = False
    drop_late_frames: bool = False
    max_batch_frames: int = 8


@dataclass
class SessionStats:
    frames: int = 0
    speech_frames: int = 0
    idle_frames: int = 0
    dropped_frames: int = 0
    audio_samples: int = 0


class _Utterance:
    def __init__(self, number: int, first_session_frame: int) -> None:
        self.number = number
        self.first_session_frame = first_session_frame
        self.chunks: collections.deque[np.ndarray] = collections.deque()
        self.base = 0  # utterance sample index of the first buffered sample
        self.received = 0
        self.next_frame = 0  # next utterance frame to schedule
        self.ended = False
        self.total_frames = 0  # known once ended

    def buffered(self) -> np.ndarray:
        if len(self.chunks) > 1:
            merged = np.concatenate(list(self.chunks))
            self.chunks.clear()
            self.chunks.append(merged)
        return self.chunks[0] if self.chunks else np.zeros(0, np.float32)

    def trim(self, keep_from: int) -> None:
        """Forget samples before ``keep_from``: no future frame reads them."""
        if keep_from <= self.base:
            return
        data = self.buffered()
        drop = min(keep_from - self.base, len(data))
        self.chunks.clear()
        if drop < len(data):
            self.chunks.append(data[drop:])
        self.base += drop

    def ready_frames(self) -> int:
        """Utterance frames (from next_frame) whose audio has fully arrived."""
        if self.ended:
            return self.total_frames - self.next_frame
        count = 0
        while True:
            plan = plan_batch(self.next_frame + count, 1, UNBOUNDED)
            if plan.sample_hi > self.received:
                return count
            count += 1


class StreamSession:
    def __init__(
        self,
        core: CompositingCore,
        options: SessionOptions,
        *,
        buffer_frames: int = 100,
        max_audio_ahead_s: float = 10.0,
    ) -> None:
        if options.fps != FPS:
            raise InvalidArgument(f"fps: expected {FPS} (the reference models' frame rate), got {options.fps}")
        if options.output_format not in ("jpeg", "png"):
            raise InvalidArgument(f"output_format: expected jpeg or png, got {options.output_format!r}")
        if not 1 <= options.jpeg_quality <= 100:
            raise InvalidArgument(f"jpeg_quality: expected 1..100, got {options.jpeg_quality}")
        if options.start_frame_idx < 0:
            raise InvalidArgument(f"start_frame_idx: expected >= 0, got {options.start_frame_idx}")
        if options.sample_rate != SAMPLE_RATE:
            # A stream cannot be resampled chunk by chunk into exactly what resampling the whole would give.
            raise InvalidArgument(f"sample_rate: sessions take 16000 Hz audio, got {options.sample_rate}")
        self.core = core
        self.options = options
        self.session_id = uuid.uuid4().hex[:12]
        self.stats = SessionStats()
        self.buffer_frames = buffer_frames
        self.max_ahead = int(max_audio_ahead_s * SAMPLE_RATE)
        self._out: asyncio.Queue[Frame | BaseException | None] = asyncio.Queue()
        self._queued = 0  # frames in _out (the queue itself is unbounded; this bound is enforced on put)
        self._wake = asyncio.Event()
        self._room = asyncio.Condition()
        self._drained = asyncio.Condition()
        self._batch_added = asyncio.Event()  # wakes the emitter without polling
        self._scheduled = asyncio.Event()  # an utterance's frames were scheduled, or the session changed course
        self._utterance: _Utterance | None = None
        self._utterances = 0
        self._next_session_frame = 0
        self._batches: collections.deque[asyncio.Task] = collections.deque()
        self._input_closed = False
        self._failed: BaseException | None = None
        self._tasks: list[asyncio.Task] = []
        self._epoch = 0  # bumped by interrupt: results of older batches are dropped
        self.avatar = None

    # -- input side ---------------------------------------------------------

    async def start(self) -> None:
        entry = await asyncio.to_thread(self.core.avatars.checkout, self.options.model_id)
        self.core.avatars.release(entry)
        self.avatar = entry.avatar
        self._tasks = [asyncio.create_task(self._schedule()), asyncio.create_task(self._emit())]
        if self.options.idle_frames:
            self._tasks.append(asyncio.create_task(self._idle()))

    async def feed(self, data: bytes) -> None:
        """Append audio to the open utterance (opening one if needed); waits while too much is ahead."""
        if not data:
            return
        samples = decode_pcm(data, self.options.encoding)
        async with self._room:
            await self._room.wait_for(lambda: self._failed is not None or self._audio_ahead() < self.max_ahead)
        self._raise_if_failed()
        if self._utterance is None or self._utterance.ended:
            if self._utterance is not None and self._utterance.ended:
                await self._drain_utterance()
            self._utterances += 1
            self._utterance = _Utterance(self._utterances, self._next_session_frame)
        utterance = self._utterance
        utterance.chunks.append(samples)
        utterance.received += len(samples)
        self.stats.audio_samples += len(samples)
        self._wake.set()

    async def _drain_utterance(self) -> None:
        """Wait until the ended utterance has scheduled all its frames (they keep their place on the timeline)."""
        while True:
            self._raise_if_failed()
            u = self._utterance
            if u is None or u.next_frame >= u.total_frames:
                return
            self._scheduled.clear()
            await self._scheduled.wait()

    def end_of_input(self) -> None:
        utterance = self._utterance
        if utterance is not None and not utterance.ended:
            if utterance.received < MIN_SAMPLES:  # too short for one mel chunk: pad with silence
                utterance.chunks.append(np.zeros(MIN_SAMPLES - utterance.received, np.float32))
                utterance.received = MIN_SAMPLES
            utterance.total_frames = frames_to_cover(utterance.received, self.options.fps)
            utterance.ended = True
            self._next_session_frame = max(
                self._next_session_frame, utterance.first_session_frame + utterance.total_frames
            )
            self._wake.set()

    def interrupt(self) -> None:
        """Barge-in: drop the open utterance's audio, batches in flight and frames not yet sent."""
        self._epoch += 1
        for task in self._batches:
            task.cancel()
        self._batches.clear()
        if self._utterance is not None:
            first = self._utterance.first_session_frame
            self._next_session_frame = max(first + self._utterance.next_frame, self._next_session_frame)
            self._utterance = None
            self._scheduled.set()
        while not self._out.empty():
            item = self._out.get_nowait()
            if isinstance(item, Frame):
                self._queued -= 1
                self.stats.dropped_frames += 1
        self._wake.set()

    def close_input(self) -> None:
        self.end_of_input()
        self._input_closed = True
        self._wake.set()

    def fail(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
            self._out.put_nowait(exc)
            self._wake.set()
            self._scheduled.set()

    # -- output side --------------------------------------------------------

    async def frames(self) -> AsyncIterator[Frame]:
        while True:
            item = await self._out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            self._queued -= 1
            async with self._drained:
                self._drained.notify_all()
            yield item

    async def close(self) -> None:
        """Cancel everything the session holds (the call ended or was cancelled)."""
        for task in [*self._tasks, *self._batches]:
            task.cancel()
        for task in [*self._tasks, *self._batches]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._batches.clear()
        async with self._room:
            self._room.notify_all()

    # -- internals ------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _audio_ahead(self) -> int:
        u = self._utterance
        if u is None or u.ended:
            return 0
        needed = plan_batch(u.next_frame, 1, UNBOUNDED).sample_hi
        return max(0, u.received - needed)

    async def _put(self, frame: Frame) -> None:
        """Queue a frame for the writer. A full buffer gets a moment to drain (batches arrive in bursts);
        a reader still that far behind fails the session, or loses its oldest frames if it asked to."""
        if self._queued >= self.buffer_frames:
            with contextlib.suppress(TimeoutError):
                async with self._drained:
                    await asyncio.wait_for(
                        self._drained.wait_for(lambda: self._queued < self.buffer_frames), BURST_GRACE_S
                    )
        if self._queued >= self.buffer_frames:
            if not self.options.drop_late_frames:
                raise ResourceExhausted(
                    f"session {self.session_id}: the reader is {self._queued} frames behind (buffer "
                    f"{self.buffer_frames}); read faster or open the session with drop_late_frames"
                )
            while self._queued >= self.buffer_frames:  # drop the oldest unsent frames
                item = self._out.get_nowait()
                if isinstance(item, Frame):
                    self._queued -= 1
                    self.stats.dropped_frames += 1
        self._out.put_nowait(frame)
        self._queued += 1
        self.stats.frames += 1
        if frame.speech:
            self.stats.speech_frames += 1
        else:
            self.stats.idle_frames += 1

    async def _schedule(self) -> None:
        """Turn ready frames into batches, at most two in flight."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while True:
                    u = self._utterance
                    if u is None or len(self._batches) >= 2:
                        break
                    ready = u.ready_frames()
                    if ready <= 0:
                        break
                    count = min(ready, self.options.max_batch_frames)
                    raw = self._raw_audio(u, u.next_frame, count)
                    self._batches.append(asyncio.create_task(self._batch(u, u.next_frame, count, raw)))
                    self._batch_added.set()
                    u.next_frame += count
                    self._scheduled.set()
                    u.trim(self._keep_from(u))
                    async with self._room:
                        self._room.notify_all()
                if (
                    self._input_closed
                    and not self._batches
                    and (self._utterance is None or self._utterance.next_frame >= self._utterance.total_frames)
                ):
                    self._out.put_nowait(None)
                    return
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.fail(exc)

    @staticmethod
    def _keep_from(u: _Utterance) -> int:
        """The first utterance sample any frame not yet scheduled can read."""
        if u.ended:
            if u.next_frame >= u.total_frames:
                return u.received
            return plan_batch(u.next_frame, 1, u.received).sample_lo
        return plan_batch(u.next_frame, 1, UNBOUNDED).sample_lo

    def _raw_audio(self, u: _Utterance, first: int, count: int) -> RawAudio:
        """The batch's samples, sliced now (before trimming): only final frames are scheduled, so the
        current length gives the same features as the utterance's final one."""
        length = u.received
        lo, hi = required_samples(first, count, length)
        if hi <= lo:  # every window lies past the end: any one sample satisfies the request
            lo, hi = length - 1, length
        data = u.buffered()[lo - u.base : hi - u.base]
        return RawAudio(data.tobytes(), "f32le", SAMPLE_RATE, lo, length, first)

    async def _batch(self, u: _Utterance, first: int, count: int, raw: RawAudio) -> list[Frame]:
        session_first = u.first_session_frame + first
        result = await self.core.composite_batch(
            self.options.model_id,
            None,
            batch_size=count,
            start_frame_idx=self.options.start_frame_idx + session_first,
            raw_audio=raw,
            output_format=self.options.output_format,
            jpeg_quality=self.options.jpeg_quality,
        )
        return [
            Frame(
                frame_index=session_first + i,
                timestamp_s=frame_time(session_first + i, self.options.fps),
                image=image,
                background_index=result.frame_indices[i],
                speech=True,
                utterance=u.number,
                utterance_frame=first + i,
            )
            for i, image in enumerate(result.frames)
        ]

    async def _emit(self) -> None:
        """Results of batches, in order, into the bounded output."""
        try:
            while True:
                if not self._batches:
                    self._batch_added.clear()
                    await self._batch_added.wait()
                    continue
                head = self._batches[0]
                epoch = self._epoch
                try:
                    frames = await asyncio.shield(head)
                except asyncio.CancelledError:
                    if self._epoch != epoch:  # interrupted: the batch was dropped on purpose
                        continue
                    raise
                if self._batches and self._batches[0] is head:
                    self._batches.popleft()
                if self._epoch != epoch:
                    continue
                for frame in frames:
                    await self._put(frame)
                self._wake.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.fail(exc)

    async def _idle(self) -> None:
        """Background frames paced at fps whenever no utterance is being rendered."""
        period = 1.0 / self.options.fps
        next_at = time.monotonic()
        try:
            while not self._input_closed:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += period
                u = self._utterance
                busy = self._batches or (u is not None and (not u.ended or u.next_frame < u.total_frames))
                if busy:
                    next_at = time.monotonic() + period
                    continue
                index = self._next_session_frame
                self._next_session_frame += 1
                background = frame_index(
                    self.options.start_frame_idx + index, self.avatar.num_frames, self.core.config.frame_order
                )
                frame = await asyncio.to_thread(self.core.background, self.avatar, background)
                image = await asyncio.to_thread(
                    self.core.background_image,
                    self.avatar,
                    background,
                    frame,
                    self.options.output_format,
                    self.options.jpeg_quality,
                )
                await self._put(Frame(index, frame_time(index, self.options.fps), image, background, False, 0, 0))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.fail(exc)
