"""The client's real-time sessions: `lipsync-client stream` and the Python API, through both services on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import wave
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
from support import ServerThread, make_compositing_config, make_config, wait_until

from compositing_service.session import frames_to_cover as server_frames_to_cover
from lipsync_client import LipsyncClient, LipsyncError
from lipsync_client.session import frames_to_cover
from lipsync_protocol.timing import utterance_frames

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech_16k.wav"
BIN = Path(sys.executable).parent
STATS_KEYS = {
    "time_to_first_frame_ms",
    "latency_ms_p50",
    "latency_ms_p95",
    "latency_ms_p99",
    "frames",
    "last_frame_timestamp_s",
    "audio_duration_s",
    "realtime",
    "chunk_ms",
    "wall_seconds",
    "dropped_frames",
}


@pytest.fixture(scope="module")
def services(models_dir: Path):
    inference = ServerThread(make_config(models_dir))
    compositing = ServerThread.compositing(make_compositing_config(models_dir, inference.address))
    yield compositing
    compositing.stop()
    inference.stop()


def speech_pcm() -> np.ndarray:
    with wave.open(str(SPEECH)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def clip(folder: Path, seconds: float) -> tuple[Path, int]:
    """The first ``seconds`` of the committed speech as a WAV; its sample count."""
    pcm = speech_pcm()[: round(seconds * 16000)]
    path = folder / f"clip_{seconds:g}s.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return path, len(pcm)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lipsync-client"), *args], capture_output=True, text=True, timeout=120)


def check_mp4(path: Path, frames: int, audio_seconds: float) -> None:
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and video.average_rate == 25
        decoded = sum(1 for _ in container.decode(video=0))
        audio_duration = float(audio.duration * audio.time_base)  # PyAV 18: streams close with their container
    assert decoded == frames
    assert abs(audio_duration - audio_seconds) < 0.1


def check_stats(stats: dict, samples: int, realtime: bool) -> None:
    assert set(stats) >= STATS_KEYS
    duration = samples / 16000
    assert stats["frames"] == frames_to_cover(samples) == server_frames_to_cover(samples, 25)
    assert stats["audio_duration_s"] == pytest.approx(duration, abs=1e-3)
    assert abs(stats["last_frame_timestamp_s"] - duration) <= 1 / 25 + 1e-6
    assert stats["last_frame_timestamp_s"] == pytest.approx((stats["frames"] - 1) / 25)
    assert 0 < stats["latency_ms_p50"] <= stats["latency_ms_p95"] <= stats["latency_ms_p99"] < 30_000
    assert 0 < stats["time_to_first_frame_ms"] < 30_000 and stats["wall_seconds"] > 0
    assert stats["realtime"] is realtime and stats["chunk_ms"] == 40 and stats["dropped_frames"] == 0


def test_cli_stream_writes_the_video_and_the_stats(services, tmp_path) -> None:
    out, stats_path = tmp_path / "live.mp4", tmp_path / "stats" / "live.json"
    done = run(
        "stream",
        *("--server", services.address, "--model", "demo", "--audio", str(SPEECH)),
        *("--out", str(out), "--stats-json", str(stats_path)),
    )
    assert done.returncode == 0, done.stderr
    assert "latency" in done.stdout and "first frame" in done.stdout
    stats = json.loads(stats_path.read_text())
    samples = len(speech_pcm())
    check_stats(stats, samples, realtime=False)
    check_mp4(out, stats["frames"], samples / 16000)


def test_cli_stream_realtime_takes_the_clips_duration(services, tmp_path) -> None:
    audio, samples = clip(tmp_path, 2.5)
    stats_path = tmp_path / "rt.json"
    started = time.monotonic()
    done = run(
        "stream",
        *("--server", services.address, "--model", "demo", "--audio", str(audio), "--realtime"),
        *("--out", str(tmp_path / "rt.mp4"), "--stats-json", str(stats_path), "--start-frame", "3"),
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    stats = json.loads(stats_path.read_text())
    check_stats(stats, samples, realtime=True)
    assert elapsed >= 2.5 and stats["wall_seconds"] >= 2.5
    # Frame 0 needs the first 0.45 s of audio: at real-time pace it cannot come sooner.
    assert stats["time_to_first_frame_ms"] >= 400
    check_mp4(tmp_path / "rt.mp4", stats["frames"], samples / 16000)


def test_session_api_frames_equal_the_render_commands(services, tmp_path) -> None:
    audio, samples = clip(tmp_path, 3.0)
    render = run(
        "render",
        *("--server", services.address, "--model", "demo", "--audio", str(audio)),
        *("--frames-dir", str(tmp_path / "render"), "--start-frame", "5", "--batch-size", "16"),
    )
    assert render.returncode == 0, render.stderr
    rendered = [p.read_bytes() for p in sorted((tmp_path / "render").glob("*.jpg"))]
    assert len(rendered) == utterance_frames(samples)
    frames = []
    out = tmp_path / "api.mp4"
    with LipsyncClient(services.address) as client:
        result = client.stream("demo", audio, out=out, start_frame=5, on_frame=frames.append)
    # The session renders the reference's frames, then silent ones until the video covers the audio.
    assert result.frames == len(frames) == frames_to_cover(samples) >= len(rendered)
    assert [f.image for f in frames[: len(rendered)]] == rendered
    assert [f.frame_index for f in frames] == list(range(len(frames)))
    assert all(f.speech and f.utterance == 1 and f.utterance_frame == f.frame_index for f in frames)
    check_stats(result.stats(), samples, realtime=False)
    check_mp4(out, result.frames, samples / 16000)
    assert "latency" in result.summary()


def test_session_api_utterances_and_errors(services) -> None:
    pcm = speech_pcm()
    first, second = pcm[:16000], pcm[16000:40000]
    with LipsyncClient(services.address) as client:
        with client.session("demo", start_frame=2, jpeg_quality=60, max_batch_frames=4) as session:
            assert session.info.frame_width == 1280 and session.info.fps == 25
            assert session.info.num_background_frames == 125
            feeder = session.feed(first.tobytes(), chunk_ms=100, close=False)  # s16le bytes
            feeder.join(30)
            assert not feeder.is_alive() and feeder.error is None
            session.send_audio(second.astype(np.float32) / 32768)  # one big chunk, float32
            session.end_of_input()
            session.close()
            frames = list(session.frames())
            with pytest.raises(LipsyncError, match="closed"):
                session.send_audio(first)
        assert session.ended is not None and session.ended.frames == len(frames)
        assert session.ended.audio_seconds == pytest.approx(2.5)
        counts = [frames_to_cover(len(first)), frames_to_cover(len(second))]
        assert [sum(f.utterance == u for f in frames) for u in (1, 2)] == counts
        assert [f.frame_index for f in frames] == list(range(sum(counts)))
        assert all(session.audio_ready_s(f.utterance, f.utterance_frame) is not None for f in frames)
        assert all(f.received_s >= session.audio_ready_s(f.utterance, f.utterance_frame) for f in frames)

        with pytest.raises(LipsyncError) as err:
            client.session("ghost")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(LipsyncError, match="NaN"):
            client.stream("demo", np.full(8000, np.nan, np.float32))
        with pytest.raises(LipsyncError, match="chunk_ms: expected > 0"):
            client.stream("demo", pcm[:8000].astype(np.float32), chunk_ms=0)


def test_session_api_interrupt_and_leaving_early(services) -> None:
    pcm = speech_pcm()
    with LipsyncClient(services.address) as client:
        with client.session("demo") as session:
            session.send_audio(pcm[:32000])
            session.interrupt()  # barge-in: what was not sent of utterance 1 is dropped
            session.send_audio(pcm[:16000])
            session.close()  # closing ends the open utterance too
            frames = list(session.frames())
        indices = [f.frame_index for f in frames]
        assert indices == sorted(set(indices))
        assert sum(f.utterance == 1 for f in frames) <= frames_to_cover(32000)
        assert [f.utterance_frame for f in frames if f.utterance == 2] == list(range(frames_to_cover(16000)))
        assert [c.kind for c in session.controls] == ["interrupt", "close"]

        with client.session("demo") as session:  # leaving with frames unread cancels the call
            feeder = session.feed(pcm)
            first = next(session.frames())
        assert first.frame_index == 0
        feeder.join(30)
        assert not feeder.is_alive()
        assert wait_until(lambda: client.health().active_sessions == 0)
        with pytest.raises(LipsyncError):
            session.send_audio(pcm[:640])


def test_cli_stream_bad_arguments(services, tmp_path) -> None:
    base = ("stream", "--server", services.address, "--out", str(tmp_path / "x.mp4"))
    missing = run(*base, "--model", "demo", "--audio", str(tmp_path / "nope.wav"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    unknown = run(*base, "--model", "ghost", "--audio", str(SPEECH))
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr and "ghost" in unknown.stderr
    chunk = run(*base, "--model", "demo", "--audio", str(SPEECH), "--chunk-ms", "0")
    assert chunk.returncode == 1 and "--chunk-ms" in chunk.stderr
    start = run(*base, "--model", "demo", "--audio", str(SPEECH), "--start-frame", "-1")
    assert start.returncode == 1 and "--start-frame" in start.stderr
    folder = run(*base[:3], "--model", "demo", "--audio", str(SPEECH), "--out", str(tmp_path))
    assert folder.returncode == 1 and "--out" in folder.stderr, folder.stderr
    down = run("stream", "--server", "127.0.0.1:1", "--model", "demo", "--audio", str(SPEECH), *base[3:])
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
    assert not (tmp_path / "x.mp4").exists()  # no video is started before the server accepts the session
