"""A Go-system user switching over: its own config files, and its test client's requests, request for request.

The Go repository's two ``config.yaml`` files (tests/data/go_configs, only paths and ports changed plus one
``plaintext: true`` line) start both services as processes from their console scripts, on an avatar laid out as
the Go system lays it out (``<id>/checkpoint/model_best.onnx``, ``<id>/frames/frame_0000.png``,
``<id>/crop_rects.json``, one global ``audio_encoder.onnx`` beside the models root). Then the Go test client's
calls: Health, and 5 x InferBatchComposite of 24 frames from ``start_frame_idx`` 0, 24, 48, ... with 15,360
float32 samples each and neither ``audio_encoding`` nor ``sample_rate`` set.
"""

from __future__ import annotations

import json
import shutil
import sys
import wave
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from demo_models import avatar, talking
from service_common.processes import ServiceProcess, free_port
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc

# The Go client's own load by design: five 59 MB float32 requests, then 300 frames checked one by one.
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DATA = Path(__file__).resolve().parents[1] / "data"
RATE = 16000
BATCH = 24
CHUNK = BATCH * RATE // 25  # 15,360 samples: 960 ms, what the Go client cuts per batch
HALF = BATCH // 2
FRAMES_ON_DISK = 50  # fewer than the config's num_frames (523, 2000): the services must warn and wrap
MAX_MESSAGE = 100 * 1024 * 1024  # the Go client's own limit


def go_layout(models_dir: Path, top: Path) -> Path:
    """The demo model and avatar where the Go configs expect "sanders"; returns the models root."""
    root = top / "models"
    checkpoint = root / "sanders" / "checkpoint"
    frames = root / "sanders" / "frames"
    checkpoint.mkdir(parents=True)
    frames.mkdir(parents=True)
    shutil.copy(models_dir / "demo" / "model.onnx", checkpoint / "model_best.onnx")
    shutil.copy(models_dir / "demo" / "audio_encoder.onnx", top / "audio_encoder.onnx")  # models_root/../
    for i in range(FRAMES_ON_DISK):
        cv2.imwrite(str(frames / f"frame_{i:04d}.png"), avatar.draw_frame(i), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    (root / "sanders" / "crop_rects.json").write_text(json.dumps(avatar.crop_rects(FRAMES_ON_DISK)))
    return root


def go_config(name: str, dest: Path, **values: object) -> Path:
    text = (DATA / "go_configs" / name).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    assert "@" not in text.replace("# ", ""), "a placeholder was left"
    path = dest / name
    path.write_text(text)
    return path


def speech() -> np.ndarray:
    with wave.open(str(DATA / "speech_16k.wav")) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def replay_audio() -> list[np.ndarray]:
    """Five 960 ms chunks cut from real speech and silence: speech; speech then silence; silence;
    silence then speech; speech."""
    x = speech()

    def cut(start_s: float, samples: int) -> np.ndarray:
        return x[round(start_s * RATE) :][:samples]

    half, quiet = CHUNK // 2, np.zeros(CHUNK // 2, np.float32)
    chunks = [
        cut(0.08, CHUNK),
        np.concatenate([cut(1.20, half), quiet]),
        np.zeros(CHUNK, np.float32),
        np.concatenate([quiet, cut(3.20, half)]),
        cut(5.20, CHUNK),
    ]
    assert all(c.dtype == np.float32 and c.size == CHUNK for c in chunks)
    return chunks


def mouth_departure(jpeg: bytes, index: int, root: Path) -> float:
    """Mean absolute difference from the background over the box where the demo model draws its mouth."""
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    background = cv2.imread(str(root / "sanders" / "frames" / f"frame_{index:04d}.png"), cv2.IMREAD_COLOR)
    x1, y1, x2, _ = avatar.crop_rect(index)
    scale = (x2 - x1) / 328  # the rect is resized to 328x328 and the model sees its inner 320 (offset 4)
    cx, cy = (x1 + (talking.MOUTH_CENTER[0] + 4) * scale, y1 + (talking.MOUTH_CENTER[1] + 4) * scale)
    w, h = talking.MOUTH_HALF_WIDTH * scale, talking.MOUTH_MAX_HALF_HEIGHT * scale
    box = (slice(round(cy - h), round(cy + h)), slice(round(cx - w), round(cx + w)))
    return float(np.abs(frame[box].astype(np.int16) - background[box].astype(np.int16)).mean())


def replay(stub: compositing_pb2_grpc.CompositingServiceStub, root: Path) -> list[list[float]]:
    """The Go test client's calls, then the same audio with the crops left to the server; returns the mouth
    departures of the second pass, batch by batch."""
    health = stub.Health(pb.HealthRequest(), timeout=30)
    assert health.healthy and health.inference_server_healthy
    assert health.max_models == 11000

    # As the Go client sends them: random float32 visual frames (used as the model's input, as given).
    rng = np.random.default_rng(0)
    for batch, chunk in enumerate(replay_audio()):
        visual = (rng.random((BATCH, 6, 320, 320), dtype=np.float32) * 2 - 1).tobytes()
        response = stub.InferBatchComposite(
            pb.CompositeBatchRequest(
                model_id="sanders",
                visual_frames=visual,
                raw_audio=chunk.tobytes(),
                batch_size=BATCH,
                start_frame_idx=batch * BATCH,
            ),
            timeout=120,
        )
        assert response.success and not response.error and len(response.composited_frames) == BATCH
        assert response.inference_time_ms > 0 and response.total_time_ms > 0 and response.audio_processing_ms > 0

    departures = []
    for batch, chunk in enumerate(replay_audio()):
        request = pb.CompositeBatchRequest(
            model_id="sanders", raw_audio=chunk.tobytes(), batch_size=BATCH, start_frame_idx=batch * BATCH
        )
        response = stub.InferBatchComposite(request, timeout=120)
        assert response.success and len(response.composited_frames) == BATCH
        # 50 frames on disk, played ping-pong: 0..49, 48..1, 0, ...
        positions = range(batch * BATCH, (batch + 1) * BATCH)
        assert list(response.frame_indices) == [min(k % 98, 98 - k % 98) for k in positions]
        departures.append(
            [
                mouth_departure(jpeg, index, root)
                for jpeg, index in zip(response.composited_frames, response.frame_indices, strict=True)
            ]
        )
    for name in ("sanders1", "sanders2", "sanders3"):  # the file's other entries (num_frames: 2000)
        request = pb.CompositeBatchRequest(model_id=name, raw_audio=replay_audio()[0].tobytes(), batch_size=BATCH)
        response = stub.InferBatchComposite(request, timeout=120)
        assert response.success and len(response.composited_frames) == BATCH
    return departures


def test_go_configs_start_both_services_and_serve_the_go_test_client(models_dir: Path, tmp_path: Path) -> None:
    root = go_layout(models_dir, tmp_path / "go")
    inference_port, compositing_port = free_port(), free_port()
    ports = dict(MODELS_ROOT=root, INFERENCE_PORT=inference_port, COMPOSITING_PORT=compositing_port)
    inference_log, compositing_log = tmp_path / "inference.log", tmp_path / "compositing.log"
    inference_argv = [str(BIN / "lipsync-inference"), "--config", str(go_config("inference.yaml", tmp_path, **ports))]
    compositing_argv = [
        str(BIN / "lipsync-compositing"),
        "--config",
        str(go_config("compositing.yaml", tmp_path, **ports)),
    ]
    inference = ServiceProcess(inference_argv, inference_port, inference_log)
    with inference.wait_serving(120), ServiceProcess(compositing_argv, compositing_port, compositing_log) as comp:
        comp.wait_serving(120)
        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        with grpc.insecure_channel(f"localhost:{compositing_port}", options=options) as channel:
            departures = replay(compositing_pb2_grpc.CompositingServiceStub(channel), root)

    d = np.array(departures)
    print("mouth departure per frame (mean |composite - background| in the rect):")
    for row in d:
        print(" ".join(f"{v:5.1f}" for v in row))
    # A batch of silence never opens the mouth: what is left is JPEG noise (about 3.5 here), the quiet bound.
    closed = d[2]
    assert closed.max() < 6.0, closed
    quiet_bound = closed.max() + 1.0
    open_bound = 2 * quiet_bound  # an open mouth departs by 10-25
    speech_then_silence, silence_then_speech = d[1], d[3]
    # Speech opens the mouth in many frames (words have gaps); silence keeps it shut but for the frames next to
    # the speech (the audio window reaches about a frame either side).
    assert (d[0] > open_bound).sum() >= BATCH // 3 and (d[4] > open_bound).sum() >= BATCH // 3, d
    assert (speech_then_silence[:HALF] > open_bound).sum() >= HALF // 3, speech_then_silence
    assert (speech_then_silence[HALF + 2 :] < quiet_bound).all(), speech_then_silence
    assert (silence_then_speech[: HALF - 2] < quiet_bound).all(), silence_then_speech
    assert (silence_then_speech[HALF:] > open_bound).sum() >= HALF // 3, silence_then_speech

    inference_text = inference_log.read_text(errors="replace")
    assert "audio encoder for models that name none" in inference_text
    assert "models_root/../audio_encoder.onnx" in inference_text
    compositing_text = compositing_log.read_text(errors="replace")
    assert f"num_frames is 523 but it has {FRAMES_ON_DISK} background frames" in compositing_text
