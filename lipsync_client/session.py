"""Real-time sessions from Python: audio in as a live source produces it, lip-synced frames out as they are made.

A session is one ``StreamSession`` call (``shared_proto/compositing.proto``): the first request carries
``SessionConfig``, then ``AudioChunk`` and ``SessionControl`` messages follow while ``SessionFrame`` messages
come back, in order, each as soon as the audio it needs has arrived. Two threads are the natural shape: one
sends audio (:meth:`LipsyncSession.send_audio`, or :meth:`LipsyncSession.feed` which does it in a background
thread), the other iterates :meth:`LipsyncSession.frames`. Read frames promptly: the server keeps at most
``session.buffer_frames`` unsent frames for a session and fails a reader that falls behind with
RESOURCE_EXHAUSTED (or drops its oldest frames when the session asked for ``drop_late_frames``).

with LipsyncClient("127.0.0.1:50052") as client, client.session("demo") as session:
    session.feed(read_speech("speech.wav"), chunk_ms=40, realtime=True)  # end_of_input and close at the end
    for frame in session.frames():
        show(frame.image)
    print(session.ended)
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from lipsync_protocol.frames import Frame
from lipsync_protocol.timing import FPS, SAMPLE_RATE, UNBOUNDED, frames_to_cover, plan_batch
from shared_proto import compositing_pb2 as pb
from shared_proto import inference_pb2

from .api import LipsyncError
from .media import MediaError, Mp4Writer, read_speech

if TYPE_CHECKING:
    from .api import LipsyncClient

_END = object()  # ends the request stream


@dataclass(frozen=True)
class SessionInfo:
    """``SessionStarted``: what the server opened."""

    session_id: str
    frame_width: int
    frame_height: int
    fps: float
    num_background_frames: int


@dataclass(frozen=True)
class SessionStats:
    """``SessionEnded``: what the server rendered."""

    frames: int
    speech_frames: int
    idle_frames: int
    dropped_frames: int
    audio_seconds: float


@dataclass(frozen=True)
class StreamFrame(Frame):
    """``SessionFrame`` plus ``received_s``, the ``time.perf_counter()`` at which it arrived here."""

    received_s: float = 0.0


@dataclass
class SentAudio:
    """One audio chunk: its utterance, the utterance samples sent up to its end, and when gRPC took it."""

    utterance: int
    end_sample: int
    sent_s: float | None = None


@dataclass
class SentControl:
    kind: str  # "end_of_input", "interrupt" or "close"
    utterance: int  # the utterance it closed; 0 when none was open
    sent_s: float | None = None


def frame_audio_end(utterance_frame: int) -> int:
    """Utterance samples ``[0, end)`` that utterance frame ``k`` needs before the server can make it."""
    return plan_batch(utterance_frame, 1, UNBOUNDED).sample_hi


def as_float32(samples: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
    """16 kHz mono samples as float32: float arrays as they are, int16 arrays and s16le bytes scaled by 1/32768."""
    if isinstance(samples, bytes | bytearray | memoryview):
        data = bytes(samples)
        if len(data) % 2:
            raise LipsyncError(f"audio: {len(data)} bytes is not whole 16-bit samples (s16le)")
        return np.frombuffer(data, "<i2").astype(np.float32) / np.float32(32768.0)
    array = np.asarray(samples)
    if array.ndim != 1:
        raise LipsyncError(f"audio: expected mono samples (one dimension), got shape {array.shape}")
    if array.dtype == np.int16:
        return array.astype(np.float32) / np.float32(32768.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise LipsyncError(f"audio: expected float32 or int16 samples, got {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise LipsyncError("audio: contains NaN or infinity")
    return array


class Feeder(threading.Thread):
    """Sends samples in chunks from a background thread, as a live source would (see :meth:`LipsyncSession.feed`)."""

    def __init__(
        self,
        session: LipsyncSession,
        samples: np.ndarray,
        chunk_samples: int,
        realtime: bool,
        end_of_input: bool,
        close: bool,
    ) -> None:
        super().__init__(name=f"lipsync-feeder-{session.info.session_id}", daemon=True)
        self.session = session
        self.samples = samples
        self.chunk_samples = chunk_samples
        self.realtime = realtime
        self.end = end_of_input
        self.close_after = close
        self.capture_start_s: float | None = None  # when the live source "started recording"
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.capture_start_s = time.perf_counter()
            for start in range(0, len(self.samples), self.chunk_samples):
                stop = min(start + self.chunk_samples, len(self.samples))
                if self.realtime:  # a live source has this chunk once its last sample was captured
                    delay = self.capture_start_s + stop / SAMPLE_RATE - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                self.session.send_audio(self.samples[start:stop])
            if self.end:
                self.session.end_of_input()
            if self.close_after:
                self.session.close()
        except BaseException as exc:  # the reader sees the call's own error; this keeps the feeder's
            self.error = exc


def session_config(
    model: str,
    start_frame: int,
    idle_frames: bool,
    drop_late_frames: bool,
    jpeg_quality: int,
    max_batch_frames: int,
    output_format: str,
) -> pb.SessionConfig:
    """The session's first message; the options checked here, naming the parameter, before any call."""
    if start_frame < 0:
        raise LipsyncError(f"start_frame: expected >= 0, got {start_frame}")
    if not 0 <= jpeg_quality <= 100:
        raise LipsyncError(f"jpeg_quality: expected 0 (the server's) to 100, got {jpeg_quality}")
    if max_batch_frames < 0:
        raise LipsyncError(f"max_batch_frames: expected >= 0, got {max_batch_frames}")
    return pb.SessionConfig(
        model_id=model,
        start_frame_idx=start_frame,
        fps=FPS,
        output_format=output_format,
        jpeg_quality=jpeg_quality,
        audio_encoding=inference_pb2.AUDIO_FLOAT32,
        sample_rate=SAMPLE_RATE,
        idle_frames=idle_frames,
        drop_late_frames=drop_late_frames,
        max_batch_frames=max_batch_frames,
    )


class LipsyncSession:
    """One real-time session on a compositing server; a context manager (``LipsyncClient.session(...)``).

    Opening it sends ``SessionConfig`` and waits for ``SessionStarted`` (``info``); errors, here and later,
    are :class:`LipsyncError` with the gRPC code. Audio is 16 kHz mono (resample files once with
    ``media.read_speech``) and goes on the wire as float32.
    """

    def __init__(
        self,
        client: LipsyncClient,
        model: str,
        *,
        start_frame: int = 0,
        idle_frames: bool = False,
        drop_late_frames: bool = False,
        jpeg_quality: int = 0,
        max_batch_frames: int = 0,
        output_format: str = "jpeg",
        timeout: float | None = None,
        send_queue: int = 8,
    ) -> None:
        config = session_config(
            model, start_frame, idle_frames, drop_late_frames, jpeg_quality, max_batch_frames, output_format
        )
        self.model = model
        self.start_frame = start_frame
        self.last_frame: StreamFrame | None = None
        # Bounded, so send_audio waits while gRPC flow control holds the chunks before it.
        self._requests: queue.Queue = queue.Queue(maxsize=max(1, send_queue))
        self._lock = threading.Lock()
        self._utterance = 0
        self._utterance_open = False
        self._utterance_samples = 0
        self._input_closed = False
        self._finished = False  # the response stream ended (ended, error or cancel)
        self._cancelled = False
        self.audio_log: list[SentAudio] = []
        self.controls: list[SentControl] = []
        self._chunks: dict[int, tuple[list[int], list[SentAudio]]] = {}  # per utterance: end samples, chunks
        self._received_s = 0.0
        self.samples_sent = 0
        self.ended: SessionStats | None = None
        self.ended_s: float | None = None
        self.first_audio_s: float | None = None
        self.first_frame_s: float | None = None
        self._requests.put((pb.SessionRequest(config=config), None))
        self.opened_s = time.perf_counter()
        self._call = client.stub.StreamSession(self._request_stream(), timeout=timeout)
        first = self._next()
        if first is None or first.WhichOneof("message") != "started":
            self.cancel()
            raise LipsyncError("session: the server ended the stream before SessionStarted")
        s = first.started
        self.info = SessionInfo(s.session_id, s.frame_width, s.frame_height, s.fps, s.num_background_frames)

    # -- input ------------------------------------------------------------------------------------------------

    def send_audio(self, samples: np.ndarray | bytes) -> None:
        """Append audio to the open utterance (opening one after end_of_input/interrupt).

        ``samples``: float32 (or int16) mono 16 kHz numpy samples, or s16le bytes. Blocks while gRPC flow
        control holds earlier chunks (the server takes at most ``session.max_audio_ahead_seconds`` ahead).
        """
        data = as_float32(samples)
        if not len(data):
            return
        with self._lock:
            self._check_open()
            if not self._utterance_open:
                self._utterance += 1
                self._utterance_open = True
                self._utterance_samples = 0
            self._utterance_samples += len(data)
            record = SentAudio(self._utterance, self._utterance_samples)
            self.audio_log.append(record)
            ends, chunks = self._chunks.setdefault(self._utterance, ([], []))
            ends.append(record.end_sample)
            chunks.append(record)
            self.samples_sent += len(data)
            self._put((pb.SessionRequest(audio=pb.AudioChunk(data=data.tobytes())), record))

    def end_of_input(self) -> None:
        """The open utterance is complete: the server renders its tail now (the session stays open)."""
        self._control("end_of_input", pb.SessionControl(end_of_input=True))

    def interrupt(self) -> None:
        """Barge-in: the server drops the open utterance's audio and frames not yet sent."""
        self._control("interrupt", pb.SessionControl(interrupt=True))

    def close(self) -> None:
        """No more input: the server renders what remains, then ends the session (frames() finishes)."""
        with self._lock:
            if self._input_closed:
                return
            self._input_closed = True
            record = SentControl("close", self._utterance if self._utterance_open else 0)
            self._utterance_open = False
            self.controls.append(record)
            self._put((_END, record), check=False)

    def cancel(self) -> None:
        """Abort the call: the server drops the session; frames() ends."""
        self._cancelled = True
        self._input_closed = True
        self._finished = True
        self._call.cancel()

    def feed(
        self,
        samples: np.ndarray | bytes,
        *,
        chunk_ms: float = 40.0,
        realtime: bool = False,
        end_of_input: bool = True,
        close: bool = True,
    ) -> Feeder:
        """Send ``samples`` from a background thread in chunks of ``chunk_ms``, as a live source would.

        ``realtime``: each chunk goes when a live source would have it (capture start + its end time);
        otherwise as fast as flow control allows. Then end_of_input and close, unless told not to.
        """
        chunk = round(chunk_ms * SAMPLE_RATE / 1000)
        if chunk < 1:
            raise LipsyncError(f"chunk_ms: expected > 0, got {chunk_ms}")
        feeder = Feeder(self, as_float32(samples), chunk, realtime, end_of_input, close)
        feeder.start()
        return feeder

    # -- output -----------------------------------------------------------------------------------------------

    def frames(self) -> Iterator[StreamFrame]:
        """Frames in order until the session ends (after close()); ``ended`` then holds the server's stats."""
        while not self._finished:
            response = self._next()
            if response is None:
                return
            kind = response.WhichOneof("message")
            if kind == "frame":
                frame = StreamFrame(**Frame.field_values(response.frame), received_s=self._received_s)
                if self.first_frame_s is None:
                    self.first_frame_s = frame.received_s
                self.last_frame = frame
                yield frame
            elif kind == "ended":
                e = response.ended
                self.ended = SessionStats(e.frames, e.speech_frames, e.idle_frames, e.dropped_frames, e.audio_seconds)
                self.ended_s = self._received_s
                self._finished = True
                return

    def resume_point(self) -> tuple[int, int]:
        """Where a new session takes over from this one: ``(start_frame, frames_to_skip)``.

        A replica that stops ends its sessions with UNAVAILABLE ("shutting down") once it has sent the frames it
        had made. To go on, open a new session with this ``start_frame`` (the load balancer picks another
        replica). When ``frames_to_skip`` is not 0 the last frame belonged to an unfinished utterance: send that
        utterance's audio again from its start and drop the first ``frames_to_skip`` frames (shown already; the
        others are the frames this session would have made). This library does not do it by itself: it does not
        keep an utterance's audio once sent, and the application usually has it (its TTS output) or drops it."""
        last = self.last_frame
        if last is None:
            return self.start_frame, 0
        if last.speech and not self._utterance_complete(last.utterance, last.utterance_frame):
            return self.start_frame + last.frame_index - last.utterance_frame, last.utterance_frame + 1
        return self.start_frame + last.frame_index + 1, 0

    def _utterance_complete(self, utterance: int, utterance_frame: int) -> bool:
        """Whether frame ``utterance_frame`` was its utterance's last (the utterance closed, its tail received)."""
        closed = any(c.utterance == utterance for c in self.controls)
        ends = self._chunks.get(utterance, ([0], []))[0]
        return closed and utterance_frame + 1 >= frames_to_cover(ends[-1])

    def audio_ready_s(self, utterance: int, utterance_frame: int) -> float | None:
        """When the input that let the server make a speech frame was sent: the chunk completing the samples the
        frame needs (``plan_batch(k, 1, ∞).sample_hi``) or, for tail frames past the utterance's audio, the
        end_of_input (or interrupt/close) that released them. None when unknown (not sent yet)."""
        if utterance not in self._chunks:
            return None
        ends, chunks = self._chunks[utterance]
        need = frame_audio_end(utterance_frame)
        if need <= ends[-1]:
            return chunks[bisect.bisect_left(ends, need)].sent_s
        closing = next((c for c in self.controls if c.utterance == utterance), None)
        return closing.sent_s if closing else None

    # -- context manager --------------------------------------------------------------------------------------

    def __enter__(self) -> LipsyncSession:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None or not self._finished:
            self.cancel()  # an error, or frames left unread: nobody will read the rest
        else:
            self.close()

    # -- internals --------------------------------------------------------------------------------------------

    def _request_stream(self) -> Iterator[pb.SessionRequest]:
        """What gRPC's sending thread consumes; stamps each chunk with the time gRPC took it."""
        while True:
            try:
                request, record = self._requests.get(timeout=0.2)
            except queue.Empty:
                if self._finished:
                    return
                continue
            if record is not None:
                record.sent_s = time.perf_counter()
                if isinstance(record, SentAudio) and self.first_audio_s is None:
                    self.first_audio_s = record.sent_s
            if request is _END:
                return
            yield request

    def _put(self, item: tuple[Any, Any], check: bool = True) -> None:
        while True:
            if self._finished or self._call.done():
                if check:
                    self._raise_call_error()
                return
            try:
                self._requests.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _control(self, kind: str, control: pb.SessionControl) -> None:
        with self._lock:
            self._check_open()
            record = SentControl(kind, self._utterance if self._utterance_open else 0)
            self._utterance_open = False
            self.controls.append(record)
            self._put((pb.SessionRequest(control=control), record))

    def _check_open(self) -> None:
        if self._input_closed:
            raise LipsyncError("session: input already closed")
        if self._finished or self._call.done():
            self._raise_call_error()

    def _raise_call_error(self) -> None:
        if self._cancelled:
            raise LipsyncError("session: cancelled", grpc.StatusCode.CANCELLED)
        code = self._call.code() if self._call.done() else None
        if code is not None and code != grpc.StatusCode.OK:
            raise LipsyncError(f"{code.name}: {self._call.details()}", code)
        raise LipsyncError("session: the server ended the session")

    def _next(self) -> pb.SessionResponse | None:
        try:
            response = next(self._call)
        except StopIteration:
            self._finished = True
            return None
        except grpc.RpcError as exc:
            self._finished = True
            if self._cancelled:
                return None
            raise LipsyncError(f"{exc.code().name}: {exc.details()}", exc.code()) from None
        self._received_s = time.perf_counter()
        return response


# -- a whole file through a session: the `stream` command ----------------------------------------------------


@dataclass
class StreamResult:
    frames: int
    audio_seconds: float
    realtime: bool
    chunk_ms: float
    wall_seconds: float = 0.0
    speech_frames: int = 0
    dropped_frames: int = 0
    time_to_first_frame_ms: float = 0.0
    last_frame_timestamp_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    session_id: str = ""
    out: Path | None = None
    frames_dir: Path | None = None

    def latency_ms(self, percentile: float) -> float:
        return float(np.percentile(self.latencies_ms, percentile)) if self.latencies_ms else 0.0

    def stats(self) -> dict[str, Any]:
        """What ``--stats-json`` records."""
        return {
            "time_to_first_frame_ms": round(self.time_to_first_frame_ms, 2),
            "latency_ms_p50": round(self.latency_ms(50), 2),
            "latency_ms_p95": round(self.latency_ms(95), 2),
            "latency_ms_p99": round(self.latency_ms(99), 2),
            "frames": self.frames,
            "last_frame_timestamp_s": round(self.last_frame_timestamp_s, 4),
            "audio_duration_s": round(self.audio_seconds, 4),
            "realtime": self.realtime,
            "chunk_ms": self.chunk_ms,
            "wall_seconds": round(self.wall_seconds, 3),
            "dropped_frames": self.dropped_frames,
            "speech_frames": self.speech_frames,
            "latency_ms_max": round(max(self.latencies_ms, default=0.0), 2),
            "session_id": self.session_id,
        }

    def summary(self) -> str:
        pace = "real time" if self.realtime else "as fast as flow control allows"
        lines = [
            f"frames           {self.frames} ({self.dropped_frames} dropped), "
            f"last at {self.last_frame_timestamp_s:.2f} s",
            f"audio            {self.audio_seconds:.2f} s in {self.chunk_ms:g} ms chunks, {pace}",
            f"first frame      {self.time_to_first_frame_ms:.0f} ms after the first chunk was sent",
            f"latency          p50 {self.latency_ms(50):.0f} ms, p95 {self.latency_ms(95):.0f} ms, "
            f"p99 {self.latency_ms(99):.0f} ms (the chunk completing a frame's audio sent -> the frame received)",
            f"total            {self.wall_seconds:.2f} s wall",
        ]
        if self.out:
            lines.append(f"video            {self.out}")
        if self.frames_dir:
            lines.append(f"frames           {self.frames_dir}/")
        return "\n".join(lines)


class _Writer(threading.Thread):
    """Writes frames off the reading thread, so a slow encoder never makes the session's reader late."""

    def __init__(self, out: Path | None, frames_dir: Path | None, samples: np.ndarray) -> None:
        super().__init__(name="lipsync-writer", daemon=True)
        self.queue: queue.Queue[StreamFrame | None] = queue.Queue()
        self.mp4 = Mp4Writer(out, samples) if out else None
        self.frames_dir = frames_dir
        self.error: BaseException | None = None

    def run(self) -> None:
        previous: StreamFrame | None = None
        try:
            while (frame := self.queue.get()) is not None:
                if self.mp4:
                    # Frames dropped by the server (drop_late_frames) leave gaps: repeat the last image, so the
                    # video stays on the audio's timeline.
                    for _ in range(frame.frame_index - (previous.frame_index + 1 if previous else 0)):
                        self.mp4.add_jpeg(previous.image if previous else frame.image)
                    self.mp4.add_jpeg(frame.image)
                if self.frames_dir:
                    (self.frames_dir / f"{frame.frame_index:06d}.jpg").write_bytes(frame.image)
                previous = frame
        except BaseException as exc:
            self.error = exc
            while self.queue.get() is not None:  # keep draining so the reader never blocks
                pass

    def finish(self) -> None:
        self.queue.put(None)
        self.join()
        if self.mp4:
            try:
                self.mp4.close()
            except Exception as exc:  # e.g. no frame came: an empty container
                self.error = self.error or exc


def stream(
    client: LipsyncClient,
    model: str,
    audio: str | Path | np.ndarray,
    *,
    out: str | Path | None = None,
    frames_dir: str | Path | None = None,
    realtime: bool = False,
    chunk_ms: float = 40.0,
    start_frame: int = 0,
    progress: Callable[[int, int], None] | None = None,
    on_frame: Callable[[StreamFrame], None] | None = None,
    **session_options: Any,
) -> StreamResult:
    """Feed speech (a file, or 16 kHz mono float32 samples) through a session as a live source would.

    Chunks of ``chunk_ms`` (paced at real time with ``realtime``), end_of_input at the end; the frames go to an
    MP4 (H.264, 25 fps, the speech muxed in) and/or JPEG files, and the result has the latency figures.
    """
    if not chunk_ms > 0:
        raise LipsyncError(f"chunk_ms: expected > 0, got {chunk_ms}")
    if start_frame < 0:
        raise LipsyncError(f"start_frame: expected >= 0, got {start_frame}")
    try:
        samples = read_speech(audio) if not isinstance(audio, np.ndarray) else as_float32(audio)
    except MediaError as exc:
        raise LipsyncError(str(exc)) from None
    if not len(samples):
        raise LipsyncError("audio: holds no samples")
    expected = frames_to_cover(len(samples))
    frames_path = Path(frames_dir) if frames_dir else None
    if frames_path:
        frames_path.mkdir(parents=True, exist_ok=True)
    result = StreamResult(
        0, len(samples) / SAMPLE_RATE, realtime, chunk_ms, out=Path(out) if out else None, frames_dir=frames_path
    )
    received: list[StreamFrame] = []
    with LipsyncSession(client, model, start_frame=start_frame, **session_options) as session:
        result.session_id = session.info.session_id
        try:  # once the server accepted the session, so a refused one leaves no file behind
            writer = _Writer(result.out, frames_path, samples)
        except Exception as exc:
            raise LipsyncError(f"out: cannot write {result.out} ({exc})") from None
        writer.start()
        try:
            feeder = session.feed(samples, chunk_ms=chunk_ms, realtime=realtime)
            for frame in session.frames():
                received.append(frame)
                writer.queue.put(frame)
                if on_frame:
                    on_frame(frame)
                if progress:
                    progress(len(received), expected)
            feeder.join()
        finally:
            writer.finish()
    if writer.error is not None:
        raise LipsyncError(f"out: {writer.error}") from None
    _figures(result, session, received)
    return result


def _figures(result: StreamResult, session: LipsyncSession, received: list[StreamFrame]) -> None:
    """The session's counts and latencies into ``result``: each speech frame against when its audio was ready."""
    stats = session.ended
    if stats is None or session.ended_s is None:
        raise LipsyncError("session: the server closed the stream without SessionEnded")
    result.frames = len(received)
    result.speech_frames = stats.speech_frames
    result.dropped_frames = stats.dropped_frames
    result.wall_seconds = session.ended_s - session.opened_s
    if received:
        result.last_frame_timestamp_s = received[-1].timestamp_s
        if session.first_audio_s is not None:
            result.time_to_first_frame_ms = (received[0].received_s - session.first_audio_s) * 1000
    for frame in received:
        if frame.speech:
            ready = session.audio_ready_s(frame.utterance, frame.utterance_frame)
            if ready is not None:
                result.latencies_ms.append((frame.received_s - ready) * 1000)
