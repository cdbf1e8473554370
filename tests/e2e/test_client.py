"""The client users run: speech file in, MP4 out, through both services on loopback ports."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import av
import cv2
import grpc
import numpy as np
import pytest
from support import ServerThread, make_compositing_config, make_config

from compositing_service.geometry import frame_index
from demo_models.avatar import mouth_center_in_frame
from lipsync_client import LipsyncClient, LipsyncError
from lipsync_protocol.timing import utterance_frames
from shared_proto import compositing_pb2, compositing_pb2_grpc, inference_pb2

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech_16k.wav"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def services(models_dir: Path):
    inference = ServerThread(make_config(models_dir))
    compositing = ServerThread.compositing(make_compositing_config(models_dir, inference.address))
    yield compositing
    compositing.stop()
    inference.stop()


def speech() -> np.ndarray:
    with wave.open(str(SPEECH)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def mouth_darkness(frame: np.ndarray, rect) -> float:
    """Share of dark pixels around where the avatar's lips are: the demo model's open mouth is dark."""
    x, y = (round(v) for v in mouth_center_in_frame(rect))
    side = rect[2] - rect[0]
    box = frame[y - side // 10 : y + side // 10, x - side // 6 : x + side // 6]
    return float((box.mean(axis=2) < 60).mean())


def test_render_writes_the_reference_frame_count_with_the_speech_muxed_in(services, models_dir, tmp_path) -> None:
    out = tmp_path / "talk.mp4"
    progress = []
    with LipsyncClient(services.address) as client:
        result = client.render(
            "demo",
            SPEECH,
            out=out,
            frames_dir=tmp_path / "frames",
            batch_size=12,
            concurrency=3,
            progress=lambda done, total: progress.append((done, total)),
        )
    x = speech()
    expected = utterance_frames(len(x))
    assert result.frames == expected and progress[-1] == (expected, expected)
    assert len(list((tmp_path / "frames").glob("*.jpg"))) == expected
    assert result.inference_ms > 0 and result.composite_ms > 0 and result.audio_ms > 0
    assert result.real_time_factor > 0 and result.fps > 0 and "real-time factor" in result.summary()
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        assert video.codec_context.name == "h264" and video.average_rate == 25
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
        audio_duration = float(audio.duration * audio.time_base)  # PyAV 18: streams close with their container
    assert len(frames) == expected
    assert abs(audio_duration - len(x) / 16000) < 0.1

    # Louder speech opens the mouth more than silence, measured on the output frames.
    rects = json.loads((models_dir / "avatar" / "crop_rects.json").read_text())
    background = [frame_index(i, len(rects), "ping_pong") for i in range(expected)]
    darkness = np.array([mouth_darkness(frames[i], rects[background[i]]) for i in range(expected)])
    energy = np.array([np.sqrt(np.mean(x[i * 640 : (i + 1) * 640] ** 2) + 1e-12) for i in range(expected)])
    loud = darkness[energy > np.quantile(energy, 0.7)]
    silent = darkness[energy < 1e-3]
    assert len(silent) >= 10 and len(loud) >= 10
    assert loud.mean() > silent.mean() + 0.05, (loud.mean(), silent.mean())


def test_batching_and_concurrency_do_not_change_the_frames(services, tmp_path) -> None:
    with LipsyncClient(services.address) as client:
        client.render("demo", SPEECH, frames_dir=tmp_path / "a", batch_size=40, concurrency=1)
        client.render("demo", SPEECH, frames_dir=tmp_path / "b", batch_size=7, concurrency=4)
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert len(a) == len(b) and all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))


def test_other_audio_formats_and_rates(services, tmp_path) -> None:
    x = speech()
    flac = tmp_path / "speech.flac"
    with av.open(str(flac), "w") as container:
        stream = container.add_stream("flac", rate=44100)
        stream.layout = "stereo"
        import soxr

        y = soxr.resample(x, 16000, 44100)
        stereo = np.stack([y, y]).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(
            (stereo * 32767).astype(np.int16).T.reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate = 44100
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with LipsyncClient(services.address) as client:
        result = client.render("demo", flac, frames_dir=tmp_path / "f", batch_size=32)
    assert abs(result.frames - utterance_frames(len(x))) <= 1


def test_cli_render_health_models_and_errors(services, tmp_path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "lipsync-client"), *args], capture_output=True, text=True, timeout=300)

    health = run("health", "--server", services.address)
    assert health.returncode == 0 and "healthy: True" in health.stdout
    models = run("models", "--server", services.address)
    assert models.returncode == 0 and "demo" in models.stdout and "unet328" in models.stdout
    out = tmp_path / "cli.mp4"
    render = run(
        "render",
        "--server",
        services.address,
        "--model",
        "demo",
        "--audio",
        str(SPEECH),
        "--out",
        str(out),
        "--batch-size",
        "24",
        "--concurrency",
        "2",
    )
    assert render.returncode == 0, render.stderr
    assert "real-time factor" in render.stdout and out.stat().st_size > 10_000
    missing = run(
        "render",
        "--server",
        services.address,
        "--model",
        "demo",
        "--audio",
        str(tmp_path / "nope.wav"),
        "--out",
        str(out),
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    unknown = run(
        "render",
        "--server",
        services.address,
        "--model",
        "ghost",
        "--audio",
        str(SPEECH),
        "--out",
        str(tmp_path / "x.mp4"),
    )
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    bad = run(
        "render",
        "--server",
        services.address,
        "--model",
        "demo",
        "--audio",
        str(SPEECH),
        "--out",
        str(out),
        "--batch-size",
        "0",
    )
    assert bad.returncode == 1 and "batch-size" in bad.stderr
    down = run("health", "--server", "127.0.0.1:1")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_api_errors() -> None:
    with LipsyncClient("127.0.0.1:1", timeout=2) as client, pytest.raises(LipsyncError):
        client.render("demo", SPEECH)
    frame = np.zeros((10, 10, 3), np.uint8)
    assert cv2.imencode(".jpg", frame)[0]


class Recorder(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Keeps the requests a client sends (the session's first one: its config)."""

    def __init__(self) -> None:
        self.requests: list = []

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        return continuation(details, request)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        def recorded():
            for request in requests:
                self.requests.append(request)
                yield request

        return continuation(details, recorded())


def test_the_client_says_its_audio_is_float32_and_never_leans_on_the_default(services, tmp_path) -> None:
    """An unset audio_encoding means float32 (the Go clients' format); ours sets it all the same."""
    recorder = Recorder()
    with LipsyncClient(services.address) as client:
        client.stub = compositing_pb2_grpc.CompositingServiceStub(grpc.intercept_channel(client.channel, recorder))
        client.render("demo", speech()[:16000], frames_dir=tmp_path / "frames", batch_size=10)
        with client.session("demo") as session:
            session.send_audio(speech()[:8000])
            session.close()
            list(session.frames())
    batches = [r for r in recorder.requests if isinstance(r, compositing_pb2.CompositeBatchRequest)]
    configs = [
        r.config for r in recorder.requests if isinstance(r, compositing_pb2.SessionRequest) and r.config.model_id
    ]
    assert len(batches) >= 3 and len(configs) == 1
    assert all(r.raw_audio for r in batches)
    assert {r.audio_encoding for r in batches} == {inference_pb2.AUDIO_FLOAT32}
    assert configs[0].audio_encoding == inference_pb2.AUDIO_FLOAT32
