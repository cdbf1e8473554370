"""The WebRTC gateway's parts without a peer: the speech gate, the utterance audio store, the playout clock,
ICE server flags, NTP times."""

from __future__ import annotations

import asyncio
import fractions
import time
from types import SimpleNamespace

import av
import cv2
import numpy as np
import pytest

from lipsync_gateway import playout as playout_module
from lipsync_gateway.audio_in import BLOCK, SpeechGate, level_db
from lipsync_gateway.playout import IN_PER_FRAME, Playout, UtteranceAudio
from lipsync_gateway.rtp_clock import NTP_UNIX_OFFSET, ntp_time, on_capture_clock
from lipsync_gateway.webrtc import ice_servers


def tone(seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_gate_opens_on_speech_with_preroll_and_closes_after_the_hangover() -> None:
    gate = SpeechGate(threshold_db=-45, hangover_s=0.2, preroll_s=0.04)
    out, ended = gate.feed(np.zeros(16000 // 2, np.float32))
    assert len(out) == 0 and not ended and not gate.open
    out, ended = gate.feed(tone(0.1))
    assert gate.open and not ended and len(out) == 2 * BLOCK + len(tone(0.1))  # the pre-roll came first
    out, ended = gate.feed(np.zeros(16000, np.float32))
    assert ended and not gate.open and len(out) == 10 * BLOCK  # 0.2 s of hangover, then nothing
    assert level_db(np.zeros(10, np.float32)) == float("-inf") and -14 < level_db(tone(0.1)) < -13  # 0.3 / sqrt(2)
    gate.feed(tone(0.1))
    gate.reset()
    assert not gate.open


def test_utterance_audio_gives_each_frame_its_own_samples_and_arrival() -> None:
    u = UtteranceAudio(1)
    data = np.arange(3 * IN_PER_FRAME, dtype=np.float32)
    u.append(data[:1000], 10.0, 1000)
    u.append(data[1000:], 11.0, 1920)
    frame0, at0, pos0 = u.frame(0)
    assert np.array_equal(frame0, data[:IN_PER_FRAME]) and at0 == 10.0 and pos0 == IN_PER_FRAME
    frame1, at1, pos1 = u.frame(1)
    assert np.array_equal(frame1, data[IN_PER_FRAME : 2 * IN_PER_FRAME]) and at1 == 11.0 and pos1 == 1280
    tail, at3, _ = u.frame(3)  # past the end: silence, released with the last sample
    assert not tail.any() and at3 == 11.0


def test_ice_server_flags() -> None:
    stun, turn = ice_servers(["stun:stun.example:3478", "turn:turn.example:3478"], "u", "p")
    assert stun.username is None and turn.username == "u" and turn.credential == "p"
    with pytest.raises(ValueError, match="--ice-server"):
        ice_servers(["http://example"], None, None)


def test_ntp_time_and_a_sender_that_is_not_aiortcs() -> None:
    assert ntp_time(0.0) == NTP_UNIX_OFFSET << 32
    assert ntp_time(1.5) - ntp_time(1.0) == 1 << 31  # half a second: half of the low word's range
    other = object()
    assert on_capture_clock(other) is other


async def test_a_ticks_sound_is_queued_before_its_picture_is_decoded() -> None:
    # The decode waits for a thread; the tick's first Opus frame must already be on its way by then.
    playout = Playout(delay=0.0)
    playout.accepting = True
    seen: list[int] = []

    def decode(jpeg: bytes) -> av.VideoFrame:
        seen.append(playout.audio.queue.qsize())
        return av.VideoFrame(16, 16, "yuv420p")

    playout._decode = decode
    image = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
    frame = SimpleNamespace(speech=False, frame_index=0, background_index=0, utterance=0, utterance_frame=0)
    playout.push(SimpleNamespace(**vars(frame), image=image), time.time())
    clock = asyncio.create_task(playout.run())
    try:
        tick = await asyncio.wait_for(playout.video.queue.get(), timeout=10)
    finally:
        clock.cancel()
    assert tick.info["n"] == 0 and seen[0] >= 1, seen
    assert playout.capture_time(1920, 48000) == pytest.approx(playout.epoch + 0.04)


STEP = 960  # one 20 ms Opus frame at 48 kHz


def on_a_fake_clock(monkeypatch) -> tuple[SimpleNamespace, Playout]:
    """A playout whose pts 0 was due at 1000.0 on a clock the test sets (``clock.now``)."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(playout_module, "time", SimpleNamespace(time=lambda: clock.now, thread_time=time.thread_time))
    playout = Playout(delay=0.0)
    playout.epoch = 1000.0
    return clock, playout


def frame(k: int) -> av.AudioFrame:
    """Audio frame ``k`` of the track: 20 ms of a tone at pts ``k * STEP``."""
    samples = (1000 * np.sin(np.arange(STEP) / 7 + k)).astype(np.int16)[None]
    out = av.AudioFrame.from_ndarray(samples, "s16", "mono")
    out.sample_rate, out.pts, out.time_base = 48000, k * STEP, fractions.Fraction(1, 48000)
    return out


async def test_late_audio_packets_are_left_out_and_the_rest_keep_their_timestamps(monkeypatch) -> None:
    # A stall: frames 3-8 reach the track together, 5 ms after frame 8 was due. The three more than 60 ms late
    # must not go (a burst grows the browser's jitter buffer); the encoder still sees them, so every packet
    # that goes keeps its own frame's pts.
    clock, playout = on_a_fake_clock(monkeypatch)
    track, step = playout.audio, STEP

    sent = []
    for k in range(3):
        clock.now = 1000.0 + k * 0.02 + 0.002
        track.queue.put_nowait(frame(k))
        sent.append(await track.recv())
    clock.now = 1000.0 + 8 * 0.02 + 0.005
    for k in range(3, 9):
        track.queue.put_nowait(frame(k))
    sent += [await track.recv() for _ in range(3)]
    assert [p.pts for p in sent] == [k * step for k in (0, 1, 2, 6, 7, 8)]
    assert all(p.time_base == fractions.Fraction(1, 48000) and p.size > 0 for p in sent)
    assert playout.stats.late_audio == 3
    assert sorted(round(v) for v in playout.stats.audio_lag_ms) == [2, 2, 2, 5, 25, 45, 65, 85, 105]
    assert track.captured == pytest.approx(1000.0 + 8 * 0.02)


async def test_a_lasting_lag_is_overload_and_its_audio_still_goes(monkeypatch) -> None:
    # 40 packets in a row 200 ms late: the first MAX_LEFT_OUT are left out (a stall would end there), the
    # rest go late rather than leave the listener in silence; an on-time packet arms the rule again.
    clock, playout = on_a_fake_clock(monkeypatch)
    track, step = playout.audio, STEP
    sent = []
    for k in range(45):
        clock.now = 1000.0 + k * 0.02 + (0.2 if k < 40 else 0.0)
        track.queue.put_nowait(frame(k))
        if k >= playout_module.MAX_LEFT_OUT:
            sent.append((await track.recv()).pts // step)
    assert sent == list(range(playout_module.MAX_LEFT_OUT, 45))
    assert playout.stats.late_audio == playout_module.MAX_LEFT_OUT
    assert track._left_out == 0
