"""A peer's outgoing media: the session's frames turned into a 25 fps video track and the matching audio track.

One clock drives both tracks: output tick ``n`` is sent at ``start + n / 25``, its video frame carries pts
``n * 3600`` (90 kHz) and its 40 ms of audio two Opus frames at ``n * 1920`` (48 kHz), i.e. tick ``n`` is sample
``n * 640`` of a 16 kHz output timeline. The audio of a speech frame is the very 16 kHz samples that were fed for
it (utterance frame ``j`` shows utterance samples ``[640 j, 640 (j + 1))``), so picture and sound leave together.

Why a buffer and ticks instead of sending frames as they come: the model needs ~450 ms of audio after a frame's
own before it can make it, so frames stall when speech starts and burst at its end. Between utterances the buffer
holds about ``delay`` of idle frames, which the stall drains just as the first speech frame arrives: speech then
waits a frame or two, no more. The buffer is steered back to that depth only where nobody can tell: an idle
frame is skipped when it is too deep and repeated when too shallow, and a quiet speech frame (a pause, the tail
of silence) is skipped when speech waited too long (after a stall longer than ``delay``, e.g. a cold model). A
tick that finds the buffer empty repeats the last picture with silence: an *underrun*, the only late frame.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import soxr
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

log = logging.getLogger(__name__)

FPS = 25
PERIOD = 1.0 / FPS
IN_RATE = 16000
IN_PER_FRAME = IN_RATE // FPS  # 640 samples of the session's audio per frame
OUT_RATE = 48000  # Opus
OUT_PER_FRAME = OUT_RATE // FPS  # 1920
OPUS_FRAME = OUT_RATE // 50  # 20 ms Opus packets: two per video frame
VIDEO_CLOCK = 90000
VIDEO_TICKS = VIDEO_CLOCK // FPS  # 3600
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
AUDIO_TIME_BASE = fractions.Fraction(1, OUT_RATE)
STALE_S = 3 * PERIOD  # a speech frame waiting longer: the buffer is deeper than speech needs
LATE_AUDIO_S = 0.06  # a 20 ms audio packet this long past its time is not sent (see AudioOut)
MAX_LEFT_OUT = 15  # ... but no more than this many in a row (300 ms): beyond that the lag is overload, not a stall
OPUS_BITRATE = 64000


class StepTimers:
    """CPU seconds per step of the outgoing media, for /healthz and the benchmark; thread-safe sums.

    The encoders run in aiortc's executor threads, so each step is timed with that thread's own CPU clock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.count: dict[str, int] = collections.defaultdict(int)

    def add(self, step: str, seconds: float) -> None:
        with self._lock:
            self.cpu[step] += seconds
            self.count[step] += 1

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {k: {"cpu_s": round(v, 6), "count": self.count[k]} for k, v in self.cpu.items()}


TIMERS = StepTimers()
_timed_encoders = False


def time_encoders() -> None:
    """Wraps aiortc's VP8 and H.264 ``encode`` so their CPU shows in TIMERS (once per process); the audio track
    times its own Opus encode."""
    global _timed_encoders
    if _timed_encoders:
        return
    _timed_encoders = True
    from aiortc.codecs.h264 import H264Encoder
    from aiortc.codecs.vpx import Vp8Encoder

    for cls, step in ((Vp8Encoder, "video_encode"), (H264Encoder, "video_encode")):
        original = cls.encode

        def encode(self: Any, frame: Any, force_keyframe: bool = False, _original: Any = original, _step=step):
            began = time.thread_time()
            try:
                return _original(self, frame, force_keyframe)
            finally:
                TIMERS.add(_step, time.thread_time() - began)

        cls.encode = encode


class UtteranceAudio:
    """The samples fed into one utterance and when they arrived, kept until the frames showing them are out."""

    def __init__(self, number: int) -> None:
        self.number = number
        self._data = np.zeros(0, np.float32)
        self._base = 0  # utterance sample index of _data[0]
        # (samples so far, arrival time, microphone position of the last one or None)
        self._ends: collections.deque[tuple[int, float, int | None]] = collections.deque()
        self.received = 0

    def append(self, samples: np.ndarray, at: float, position: int | None = None) -> None:
        self._data = np.concatenate([self._data, samples.astype(np.float32, copy=False)])
        self.received += len(samples)
        self._ends.append((self.received, at, position))

    def frame(self, j: int) -> tuple[np.ndarray, float | None, int | None]:
        """Utterance frame ``j``'s own 40 ms (zeros past the end), when its last sample came in and where that
        sample was in the microphone's stream (16 kHz samples since the peer's first).

        Frames come in order, so everything before them is forgotten."""
        lo, hi = j * IN_PER_FRAME, (j + 1) * IN_PER_FRAME
        if lo > self._base:
            drop = min(lo - self._base, len(self._data))
            self._data = self._data[drop:]
            self._base += drop
        out = np.zeros(IN_PER_FRAME, np.float32)
        part = self._data[max(0, lo - self._base) : max(0, hi - self._base)]
        out[: len(part)] = part
        while len(self._ends) > 1 and self._ends[0][0] < min(hi, self.received):
            self._ends.popleft()
        if self._ends and self._ends[0][0] >= min(hi, self.received):
            end, at, position = self._ends[0]
            return out, at, None if position is None else position - (end - min(hi, self.received))
        return out, None, None


@dataclass
class Entry:
    """One session frame waiting for its tick."""

    jpeg: bytes
    audio: np.ndarray  # 640 samples at 16 kHz
    info: dict[str, Any]  # what the data channel reports about it
    speech: bool
    arrived: float  # time.monotonic()
    quiet: bool = True


@dataclass
class Tick:
    video: av.VideoFrame
    info: dict[str, Any]
    due: float  # time.monotonic() the tick was due


@dataclass
class PlayoutStats:
    ticks: int = 0
    frames: int = 0
    speech_frames: int = 0
    underruns: int = 0  # ticks that found no frame: the picture froze (late frames)
    skipped: int = 0  # idle or quiet frames skipped to bring the buffer back to its depth
    repeated: int = 0  # idle pictures shown twice to deepen the buffer
    late_sends: int = 0  # ticks the encoder took more than a period after they were due
    late_audio: int = 0  # 20 ms audio packets not sent: past their time by more than LATE_AUDIO_S
    shed: int = 0  # ticks not encoded at all because a newer one was waiting (an overloaded encoder)
    dropped: int = 0  # frames of interrupted utterances
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2000))
    send_lag_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2000))  # due -> encoder
    audio_lag_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4000))  # due -> sender


class Playout:
    """Session frames in (``push``), ticks out to the two tracks; ``run`` is the clock."""

    def __init__(
        self, delay: float, report: Callable[[dict[str, Any]], None] | None = None, quiet_db: float = -45.0
    ) -> None:
        self.delay = delay
        self.quiet_rms = 10 ** (quiet_db / 20)
        self.target = max(1, round(delay * FPS))  # frames the buffer should hold
        self.report = report or (lambda info: None)
        self.buffer: collections.deque[Entry] = collections.deque()
        self.utterances: dict[int, UtteranceAudio] = {}
        self.dropped_through = 0  # frames of utterances up to this one were interrupted
        self.stats = PlayoutStats()
        self.video = VideoOut(self)
        self.audio = AudioOut(self)
        self._decoder = av.CodecContext.create("mjpeg", "r")
        self._resampler = soxr.ResampleStream(IN_RATE, OUT_RATE, 1, dtype="float32")
        self._out = np.zeros(0, np.float32)  # resampled audio not yet sent
        self._last_jpeg: bytes | None = None
        self._held: asyncio.TimerHandle | None = None
        self._pending_audio: list[av.AudioFrame] = []
        self._first = asyncio.Event()
        self.accepting = False  # frames before the peer connects are dropped: nobody sees them
        self.speaking = False  # an utterance is open: its stall must drain the buffer, not be filled in
        self.epoch: float | None = None  # time.time() of pts 0, the tracks' capture clock (rtp_clock.py)

    # -- input: the session's frames ------------------------------------------------------------------

    def utterance(self, number: int) -> UtteranceAudio:
        if number not in self.utterances:
            self.utterances[number] = UtteranceAudio(number)
        return self.utterances[number]

    def interrupt(self, through: int) -> None:
        """Forget the frames (buffered or still to come) of utterances up to ``through``."""
        self.dropped_through = max(self.dropped_through, through)
        kept = [e for e in self.buffer if not (e.speech and e.info["utterance"] <= through)]
        self.stats.dropped += len(self.buffer) - len(kept)
        self.buffer = collections.deque(kept)
        for number in [n for n in self.utterances if n <= through]:
            del self.utterances[number]

    def push(self, frame: Any, arrived: float) -> None:
        """A SessionFrame from the service, at ``arrived`` (time.time())."""
        if frame.speech and frame.utterance <= self.dropped_through:
            self.stats.dropped += 1
            return
        audio_at = position = None
        if frame.speech:
            for number in [n for n in self.utterances if n < frame.utterance]:
                del self.utterances[number]  # a later utterance's frame: the earlier ones are done
            audio, audio_at, position = self.utterance(frame.utterance).frame(frame.utterance_frame)
        else:
            audio = np.zeros(IN_PER_FRAME, np.float32)
        if not self.accepting:
            return
        info = {
            "frame": frame.frame_index,
            "background": frame.background_index,
            "speech": frame.speech,
            "utterance": frame.utterance,
            "utterance_frame": frame.utterance_frame,
            "audio_at": audio_at,
            "mic_pos": position,
            "arrived_at": arrived,
        }
        rms = float(np.sqrt(np.mean(np.square(audio))))
        info["level_db"] = round(20 * np.log10(rms), 1) if rms > 0 else None
        quiet = not frame.speech or rms < self.quiet_rms
        self.buffer.append(Entry(frame.image, audio, info, frame.speech, time.monotonic(), quiet))
        self._first.set()

    # -- output: the clock ----------------------------------------------------------------------------

    def _decode(self, jpeg: bytes) -> av.VideoFrame:
        began = time.thread_time()
        frames = self._decoder.decode(av.Packet(jpeg))
        frame = frames[0].reformat(format="yuv420p")  # the JPEG's full range to the encoders' video range
        TIMERS.add("jpeg_decode", time.thread_time() - began)
        return frame

    def _audio_frames(self, samples: np.ndarray, n: int) -> list[av.AudioFrame]:
        began = time.thread_time()
        self._out = np.concatenate([self._out, self._resampler.resample_chunk(samples)])
        if len(self._out) < OUT_PER_FRAME:  # only at the start: the resampler's filter delay
            self._out = np.concatenate([np.zeros(OUT_PER_FRAME - len(self._out), np.float32), self._out])
        pcm = (np.clip(self._out[:OUT_PER_FRAME], -1.0, 1.0) * 32767).astype(np.int16)
        self._out = self._out[OUT_PER_FRAME:]
        frames = []
        for i in range(OUT_PER_FRAME // OPUS_FRAME):
            frame = av.AudioFrame.from_ndarray(pcm[None, i * OPUS_FRAME : (i + 1) * OPUS_FRAME], "s16", "mono")
            frame.sample_rate = OUT_RATE
            frame.pts = n * OUT_PER_FRAME + i * OPUS_FRAME
            frame.time_base = AUDIO_TIME_BASE
            frames.append(frame)
        TIMERS.add("audio_resample", time.thread_time() - began)
        return frames

    def _next_entry(self) -> Entry | bool | None:
        """The entry for this tick; None: nothing there (underrun); True: repeat the last idle picture."""
        if not self.buffer:
            return None
        head = self.buffer[0]
        idle = not self.speaking and not any(e.speech for e in self.buffer)
        if idle and len(self.buffer) < self.target - 1 and self._last_jpeg is not None:
            self.stats.repeated += 1
            return True
        too_deep = len(self.buffer) > self.target + 1 if not head.speech else time.monotonic() - head.arrived > STALE_S
        if too_deep and head.quiet and len(self.buffer) > 1:
            self.stats.skipped += 1
            self.buffer.popleft()
        return self.buffer.popleft()

    async def run(self) -> None:
        """Ticks at 25 fps from ``delay`` after the first frame, until cancelled."""
        await self._first.wait()
        start = time.monotonic() + self.delay
        n = 0
        while True:
            due = start + n * PERIOD
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            entry = self._next_entry()
            if entry is None and self._last_jpeg is None:
                start += PERIOD  # nothing shown yet: nothing to repeat
                continue
            if not isinstance(entry, Entry):
                self.stats.underruns += entry is None
                jpeg, audio = self._last_jpeg, np.zeros(IN_PER_FRAME, np.float32)
                info: dict[str, Any] = {"frame": None, "speech": False, "hold": "repeat" if entry else "underrun"}
            else:
                jpeg, audio, info = entry.jpeg, entry.audio, entry.info
                self.stats.frames += 1
                self.stats.speech_frames += entry.speech
            assert jpeg is not None
            self._last_jpeg = jpeg
            if self.epoch is None:
                self.epoch = time.time() - (time.monotonic() - start)
            # The sound first: its packets leave on the tick, however long the picture's decode waits for a
            # thread (a browser's jitter buffer grows with the spread of their arrival, and lip sync with it).
            sound = self._audio_frames(audio, n)
            self._queue_audio(sound)
            video = await asyncio.to_thread(self._decode, jpeg)
            video.pts = n * VIDEO_TICKS
            video.time_base = VIDEO_TIME_BASE
            info = {**info, "n": n, "pts": n * VIDEO_TICKS, "buffer": len(self.buffer)}
            self.video.queue.put_nowait(Tick(video, info, due))
            self.stats.ticks += 1
            n += 1

    def _queue_audio(self, frames: list[av.AudioFrame]) -> None:
        """Each 20 ms packet when its time comes (so the RTCP sender reports stay true), in order: a tick that
        comes early (catching up) first releases what the previous one still held."""
        if self._held is not None:
            self._held.cancel()
            self._release()
        self.audio.queue.put_nowait(frames[0])
        self._pending_audio = list(frames[1:])
        if self._pending_audio:
            self._held = asyncio.get_running_loop().call_later(OPUS_FRAME / OUT_RATE, self._release)

    def _release(self) -> None:
        self._held = None
        for frame in self._pending_audio:
            self.audio.queue.put_nowait(frame)
        self._pending_audio = []

    def capture_time(self, pts: int, clock_rate: int) -> float | None:
        """time.time() at which the frame with ``pts`` (on a ``clock_rate`` clock) was due."""
        return None if self.epoch is None else self.epoch + pts / clock_rate

    def sent(self, tick: Tick, rtp: int | None) -> None:
        """The video encoder took ``tick``: stamp it and report it on the data channel."""
        now_mono, now = time.monotonic(), time.time()
        late = now_mono - tick.due > PERIOD
        self.stats.late_sends += late
        self.stats.send_lag_ms.append((now_mono - tick.due) * 1000)
        info = {**tick.info, "type": "frame", "sent_at": now, "late": late}
        if rtp is not None:
            info["rtp"] = rtp
        if info.get("audio_at") is not None:
            self.stats.latencies_ms.append((now - info["audio_at"]) * 1000)
        self.report(info)


class VideoOut(MediaStreamTrack):
    """The avatar's video: one av.VideoFrame per tick; the sender is attached so RTP timestamps can be reported."""

    kind = "video"

    def __init__(self, playout: Playout) -> None:
        super().__init__()
        self.playout = playout
        self.queue: asyncio.Queue[Tick] = asyncio.Queue()
        self.sender: Any = None
        self.captured: float | None = None  # when the frame last handed to the encoder was due (rtp_clock.py)
        self._origin: int | None = None

    def _rtp(self, n: int) -> int | None:
        """Tick n's RTP timestamp. aiortc adds a random origin it keeps private; it is read back from the last
        timestamp the sender used (tick n - 1's, when the encoder asks for tick n)."""
        if self._origin is None and n > 0 and self.sender is not None:
            last = getattr(self.sender, "_RTCRtpSender__rtp_timestamp", 0)
            if last:
                self._origin = (last - (n - 1) * VIDEO_TICKS) % 2**32
        return None if self._origin is None else (self._origin + n * VIDEO_TICKS) % 2**32

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        tick = await self.queue.get()
        while self.queue.qsize() > 2:  # the encoder fell behind by > 3 frames: skip to the newest, not a backlog
            self.playout.stats.shed += 1
            tick = self.queue.get_nowait()
        self.playout.sent(tick, self._rtp(tick.info["n"]))
        self.captured = self.playout.capture_time(tick.video.pts, VIDEO_CLOCK)
        return tick.video


class AudioOut(MediaStreamTrack):
    """The speech the frames were made for (silence between), in step with the video: 20 ms Opus packets.

    The track encodes its own Opus so that it can leave out a packet that is late without disturbing the encoder.
    After a stall (of this process, or of the machine) the ticks catch up, and their packets would reach the
    browser in a burst. A browser's audio jitter buffer grows to cover every arrival spread that it sees, and it
    shrinks again only slowly. Its lip sync then delays the picture to match, for many seconds. A packet that is
    missing is concealed instead, and the buffer keeps its depth. The encoder sees every frame in order, because
    Opus looks ahead 6.5 ms and a gap in its input would mislabel the next packet. The RTP timestamps stay the
    frames' own pts, and aiortc sends the packets as they are.

    At most ``MAX_LEFT_OUT`` packets in a row are left out, which covers a stall of up to about 360 ms. A lag
    that lasts longer is overload (more peers than the process can encode), not a stall. There, speech that
    arrives late is better than no speech. An on-time packet arms the rule again.
    """

    kind = "audio"

    def __init__(self, playout: Playout) -> None:
        super().__init__()
        self.playout = playout
        self.queue: asyncio.Queue[av.AudioFrame] = asyncio.Queue()
        self.captured: float | None = None  # as VideoOut's
        self._encoder = opus_encoder()
        self._shift: int | None = None  # frame pts - packet pts: the encoder's look-ahead
        self._left_out = 0  # late packets left out since the last one sent

    def _encode(self, frame: av.AudioFrame) -> av.Packet | None:
        began = time.thread_time()
        packets = self._encoder.encode(frame)
        TIMERS.add("audio_encode", time.thread_time() - began)
        if not packets:
            return None
        packet = packets[0]
        if self._shift is None:
            self._shift = frame.pts - packet.pts
        packet.pts += self._shift
        packet.time_base = AUDIO_TIME_BASE
        return packet

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        while True:
            frame = await self.queue.get()
            packet = self._encode(frame)
            due = self.playout.capture_time(frame.pts, OUT_RATE)
            if packet is None or due is None:
                continue
            lag = time.time() - due
            self.playout.stats.audio_lag_ms.append(lag * 1000)
            if lag > LATE_AUDIO_S and self._left_out < MAX_LEFT_OUT:
                self._left_out += 1
                self.playout.stats.late_audio += 1
                continue
            if lag <= LATE_AUDIO_S:
                self._left_out = 0
            self.captured = self.playout.capture_time(packet.pts, OUT_RATE)
            return packet


def opus_encoder() -> av.CodecContext:
    """Mono Opus for speech at 48 kHz, 20 ms a packet (one per frame we give it)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate = OPUS_BITRATE
    codec.format = "s16"
    codec.layout = "mono"
    codec.sample_rate = OUT_RATE
    codec.time_base = AUDIO_TIME_BASE
    codec.options = {"application": "voip"}
    return codec


def frame_message(info: dict[str, Any]) -> str:
    """A frame's stats as the data channel sends them: times in ms since the epoch, rounded."""
    out = {k: (round(v * 1000, 1) if k.endswith("_at") and v is not None else v) for k, v in info.items()}
    return json.dumps(out, separators=(",", ":"))
