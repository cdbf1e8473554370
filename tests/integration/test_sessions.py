"""Streaming sessions: same frames as the batch API, drift-free timestamps, idle, interrupt, flow control."""

from __future__ import annotations

import queue
import threading
import time
import wave
from pathlib import Path

import grpc
import numpy as np
import pytest
from support import ServerThread, make_compositing_config, wait_until, write_small_avatar

from compositing_service.session import BURST_GRACE_S, frames_to_cover
from lipsync_protocol.timing import required_samples
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc, inference_pb2

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech_16k.wav"
OPTIONS = [("grpc.max_receive_message_length", 1 << 28)]


S16 = inference_pb2.AUDIO_PCM_S16LE  # what speech_pcm() samples are; an unset encoding means float32
BUFFER_FRAMES = 12  # session.buffer_frames of the module's replica: frames a reader may fall behind


def speech_pcm() -> np.ndarray:
    with wave.open(str(SPEECH)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def session_requests(config: pb.SessionConfig, pcm: np.ndarray, chunk: int = 3200, end: bool = True):
    yield pb.SessionRequest(config=config)
    for start in range(0, len(pcm), chunk):
        yield pb.SessionRequest(audio=pb.AudioChunk(data=pcm[start : start + chunk].tobytes()))
    if end:
        yield pb.SessionRequest(control=pb.SessionControl(end_of_input=True))


@pytest.fixture(scope="module")
def compositing(models_dir: Path, inference_server):
    server = ServerThread.compositing(
        make_compositing_config(models_dir, inference_server.address, **{"session.buffer_frames": BUFFER_FRAMES})
    )
    yield server
    server.stop()


@pytest.fixture()
def stub(compositing):
    with grpc.insecure_channel(compositing.address, options=OPTIONS) as channel:
        yield compositing_pb2_grpc.CompositingServiceStub(channel)


def calm_session_seconds(stub, pcm: np.ndarray) -> float:
    """The baseline for a test's time bounds: how long one session of ``pcm`` takes on this machine, now."""
    started = time.monotonic()
    responses = list(stub.StreamSession(session_requests(pb.SessionConfig(model_id="demo", audio_encoding=S16), pcm)))
    assert responses[-1].ended.frames == frames_to_cover(len(pcm), 25)
    return time.monotonic() - started


def composited(stub) -> int:
    """Frames of demo the replica has composited so far (every session and batch call on it)."""
    return stub.GetModelStats(pb.GetModelStatsRequest(model_id="demo")).models[0].stats.total_frames


def compositing_paused(stub, seconds: float, since: int):
    """A wait_until predicate: true once the replica, having composited more than a buffer's worth of frames since
    the count ``since``, has composited no new frame for ``seconds``."""
    last = {"count": composited(stub), "at": time.monotonic()}

    def paused() -> bool:
        count, now = composited(stub), time.monotonic()
        if count != last["count"]:
            last.update(count=count, at=now)
        return count - since > BUFFER_FRAMES and now - last["at"] > seconds

    return paused


def test_session_frames_equal_the_batch_api_and_timestamps_follow_the_audio(stub) -> None:
    pcm = speech_pcm().astype(np.float32) / 32768  # float32 with the encoding left unset, as old clients send
    responses = list(stub.StreamSession(session_requests(pb.SessionConfig(model_id="demo", start_frame_idx=7), pcm)))
    assert responses[0].WhichOneof("message") == "started"
    assert responses[0].started.frame_width == 1280 and responses[0].started.fps == 25
    frames = [r.frame for r in responses if r.WhichOneof("message") == "frame"]
    ended = responses[-1].ended
    duration = len(pcm) / 16000
    assert ended.frames == len(frames) == ended.speech_frames and ended.audio_seconds == pytest.approx(duration)
    assert [f.frame_index for f in frames] == list(range(len(frames)))
    assert all(f.timestamp_s == pytest.approx(f.frame_index / 25) for f in frames)
    assert abs(frames[-1].timestamp_s - duration) <= 1 / 25
    images, backgrounds = [], []
    for first in range(0, len(frames), 40):  # the batch API, in batches with their context
        count = min(40, len(frames) - first)
        lo, hi = required_samples(first, count, len(pcm))
        lo, hi = (lo, hi) if hi > lo else (len(pcm) - 1, len(pcm))
        part = stub.InferBatchComposite(
            pb.CompositeBatchRequest(
                model_id="demo",
                raw_audio=pcm[lo:hi].tobytes(),
                sample_rate=16000,
                audio_offset_samples=lo,
                utterance_samples=len(pcm),
                first_frame=first,
                batch_size=count,
                start_frame_idx=7 + first,
            )
        )
        images.extend(part.composited_frames)
        backgrounds.extend(part.frame_indices)
    assert [f.image for f in frames] == images
    assert [f.background_index for f in frames] == backgrounds


def test_idle_frames_between_utterances_and_interrupt(stub) -> None:
    pcm = speech_pcm()
    calm = calm_session_seconds(stub, pcm[:32000])  # the second utterance below, alone
    outgoing: queue.Queue = queue.Queue()

    def requests():
        while True:
            item = outgoing.get()
            if item is None:
                return
            yield item

    arrivals: list[tuple[float, pb.SessionResponse]] = []  # (when it came, what came), in order

    def read() -> None:
        for response in call:
            arrivals.append((time.monotonic(), response))

    def frames_so_far() -> list[tuple[float, pb.SessionFrame]]:
        return [(t, r.frame) for t, r in list(arrivals) if r.WhichOneof("message") == "frame"]

    started = time.monotonic()
    call = stub.StreamSession(requests())
    outgoing.put(pb.SessionRequest(config=pb.SessionConfig(model_id="demo", idle_frames=True, audio_encoding=S16)))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert wait_until(lambda: len(frames_so_far()) >= 10), "no idle frames"
    idle_before = frames_so_far()
    assert not any(f.speech for _, f in idle_before)
    assert [f.frame_index for _, f in idle_before] == list(range(len(idle_before)))
    # Background paced at 25 fps: idle frame k cannot come sooner than k / 25 s into the session.
    assert all(t - started >= f.frame_index / 25 - 1e-3 for t, f in idle_before), [t - started for t, _ in idle_before]
    for start in range(0, 48000, 3200):  # 3 s of speech, then barge-in
        outgoing.put(pb.SessionRequest(audio=pb.AudioChunk(data=pcm[start : start + 3200].tobytes())))
    assert wait_until(lambda: any(f.utterance == 1 for _, f in frames_so_far())), "utterance 1 was not rendered"
    outgoing.put(pb.SessionRequest(control=pb.SessionControl(interrupt=True)))
    for start in range(0, 32000, 3200):  # a second utterance, completed
        outgoing.put(pb.SessionRequest(audio=pb.AudioChunk(data=pcm[start : start + 3200].tobytes())))
    outgoing.put(pb.SessionRequest(control=pb.SessionControl(end_of_input=True)))

    def idle_after_second() -> bool:
        got = [f for _, f in frames_so_far()]
        second = [f.frame_index for f in got if f.utterance == 2]
        if len(second) < frames_to_cover(32000, 25):
            return False
        return any(not f.speech and f.frame_index > second[-1] for f in got)

    assert wait_until(idle_after_second, timeout=60), "no idle frame after the second utterance"
    outgoing.put(None)
    reader.join(30)
    received = [r for _, r in arrivals]
    frames = [r.frame for r in received if r.WhichOneof("message") == "frame"]
    assert received[-1].WhichOneof("message") == "ended"
    indices = [f.frame_index for f in frames]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    first = [f for f in frames if f.utterance == 1]
    second = [f for f in frames if f.utterance == 2]
    assert len(first) < 75  # interrupted before its 3 s were rendered
    # 2 s of audio: the whole utterance, its tail flushed, covering the audio
    assert [f.utterance_frame for f in second] == list(range(frames_to_cover(32000, 25)))
    assert any(not f.speech for f in frames[indices.index(second[-1].frame_index) + 1 :])  # idle again after
    # About 2 utterances' rendering and a few idle frames: within a few times what one calm utterance takes.
    elapsed = time.monotonic() - started
    assert elapsed < 10 * calm + 5, (elapsed, calm)


def test_slow_reader_gets_resource_exhausted_unless_it_drops_late_frames(stub) -> None:
    pcm = speech_pcm()
    total = frames_to_cover(len(pcm), 25)  # 209 frames, far more than the buffer's 12
    calm = calm_session_seconds(stub, pcm[:32000])  # 50 frames (7 batches) made and read at once
    before = composited(stub)
    call = stub.StreamSession(session_requests(pb.SessionConfig(model_id="demo", audio_encoding=S16), pcm))
    # Read nothing until the session has stopped making frames for longer than its grace (what a full buffer gets
    # before it fails) and than a whole calm session takes: its buffer filled, the grace ran out, it failed.
    assert wait_until(compositing_paused(stub, max(4 * BURST_GRACE_S, calm), before), timeout=60)
    assert composited(stub) - before < total  # it stopped early: the session failed, it did not finish
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "drop_late_frames" in err.value.details()

    before = composited(stub)
    call = stub.StreamSession(
        session_requests(pb.SessionConfig(model_id="demo", drop_late_frames=True, audio_encoding=S16), pcm)
    )
    # Read nothing until making frames has stalled: with the buffer full, each frame waits out the grace and then
    # drops the oldest, so a batch of 8 takes 8 graces; a pause of 4 graces means frames are being dropped.
    assert wait_until(compositing_paused(stub, 4 * BURST_GRACE_S, before), timeout=60)
    assert composited(stub) - before < total
    responses = list(call)
    ended = responses[-1].ended
    assert ended.dropped_frames > 0
    assert ended.frames == ended.speech_frames and len([r for r in responses if r.frame.image]) < ended.frames


def test_bad_session_requests(stub) -> None:
    cases = [
        ([pb.SessionRequest(audio=pb.AudioChunk(data=b"\0\0"))], "config"),
        ([pb.SessionRequest(config=pb.SessionConfig(model_id="ghost"))], "model_id"),
        ([pb.SessionRequest(config=pb.SessionConfig(model_id="demo", fps=30))], "fps"),
        ([pb.SessionRequest(config=pb.SessionConfig(model_id="demo", sample_rate=48000))], "sample_rate"),
        ([pb.SessionRequest(config=pb.SessionConfig(model_id="demo", output_format="gif"))], "output_format"),
        ([pb.SessionRequest(config=pb.SessionConfig(model_id="demo", max_batch_frames=1000))], "max_batch_frames"),
        ([pb.SessionRequest(config=pb.SessionConfig(model_id="demo", audio_encoding=9))], "audio_encoding"),
        (
            [
                pb.SessionRequest(config=pb.SessionConfig(model_id="demo")),
                pb.SessionRequest(audio=pb.AudioChunk(data=b"\0\0\0")),
            ],
            "raw_audio",
        ),
        (
            [
                pb.SessionRequest(config=pb.SessionConfig(model_id="demo")),
                pb.SessionRequest(config=pb.SessionConfig(model_id="demo")),
            ],
            "config",
        ),
    ]
    for requests, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamSession(iter(requests)))
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), err.value.details()
        assert field in err.value.details()
    assert stub.Health(pb.HealthRequest()).active_sessions == 0


def test_cancel_frees_the_session_and_others_keep_going(stub) -> None:
    pcm = speech_pcm()
    calm = calm_session_seconds(stub, pcm[:32000])  # the other session's, with no stalled one beside it
    stalled = stub.StreamSession(
        session_requests(pb.SessionConfig(model_id="demo", audio_encoding=S16), np.tile(pcm, 3), end=False)
    )
    assert wait_until(lambda: stub.Health(pb.HealthRequest()).active_sessions == 1)
    started = time.monotonic()
    others = list(
        stub.StreamSession(
            session_requests(pb.SessionConfig(model_id="demo", audio_encoding=S16), pcm[:32000]), timeout=120
        )
    )
    elapsed = time.monotonic() - started
    assert others[-1].ended.frames == frames_to_cover(32000, 25) and elapsed < 10 * calm + 5, (elapsed, calm)
    stalled.cancel()
    assert wait_until(lambda: stub.Health(pb.HealthRequest()).active_sessions == 0)


@pytest.mark.slow  # ten minutes of audio through one session (about 20 s of rendering)
@pytest.mark.timeout(900)  # minutes of rendering (2.5 here when calm, 4.5 under load): more than the default 300 s
def test_ten_minutes_of_audio_end_within_one_frame(models_dir: Path, inference_server, tmp_path: Path) -> None:
    frames_dir, rects = write_small_avatar(tmp_path / "small", frames=20, size=(320, 240))
    server = ServerThread.compositing(
        make_compositing_config(
            models_dir,
            inference_server.address,
            **{
                "models.small.background_dir": str(frames_dir),
                "models.small.crop_rects_path": str(rects),
                "models.small.inference_model": "demo",
                "session.max_batch_frames": 64,
                "session.buffer_frames": 200,
                "warmup": False,
            },
        )
    )
    pcm = np.tile(speech_pcm(), 72)[: 600 * 16000]  # 10 minutes
    try:
        with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
            stub = compositing_pb2_grpc.CompositingServiceStub(channel)
            config = pb.SessionConfig(model_id="small", jpeg_quality=40, max_batch_frames=64, audio_encoding=S16)
            last = None
            count = 0
            for response in stub.StreamSession(session_requests(config, pcm, chunk=16000)):
                if response.WhichOneof("message") == "frame":
                    assert response.frame.frame_index == count
                    count += 1
                    last = response.frame
                elif response.WhichOneof("message") == "ended":
                    ended = response.ended
    finally:
        server.stop()
    assert ended.audio_seconds == pytest.approx(600.0)
    assert count == ended.frames >= 600 * 25 - 1
    assert abs(last.timestamp_s - 600.0) <= 1 / 25
