"""A 160-family model through the whole path: the demo generator at 160, served separated and in process.

The avatar's geometry (models.demo160.geometry: "160") shapes the crop (168, bilinear), the model input (inner
160, the 160 mask, built by the inference service from the real crop it was sent), the paste-back (bilinear)
and the spliced JPEG; the frames are checked against a composite written here from the family's facts, and the
two modes, the spliced and the whole-frame encode, and a session agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnxruntime as ort
import pytest
from support import ServerThread, make_compositing_config, make_config

from compositing_service.avatars import open_avatar
from lipsync_client.api import LipsyncClient
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc

OPTIONS = [("grpc.max_receive_message_length", 256 << 20)]
BATCH, START = 6, 120  # background frames 120..124 then back to 123: the ping-pong turns


def loud(batch: int) -> np.ndarray:
    audio = np.zeros((batch, 32, 16, 16), np.float32)
    audio[:, 16:18] = np.linspace(0.3, 1.0, batch, dtype=np.float32)[:, None, None, None]
    return audio


def request() -> pb.CompositeBatchRequest:
    audio = loud(BATCH)
    return pb.CompositeBatchRequest(
        model_id="demo160",
        audio_features=audio.tobytes(),
        audio_features_shape=list(audio.shape),
        batch_size=BATCH,
        start_frame_idx=START,
    )


@pytest.fixture(scope="module")
def servers(models_dir: Path):
    inference = ServerThread(make_config(models_dir, **{"models.demo160.preload": True}))
    overrides = {"warmup": False}
    png = ServerThread.compositing(
        make_compositing_config(models_dir, inference.address, **overrides, **{"output.format": "png"})
    )
    jpeg = ServerThread.compositing(make_compositing_config(models_dir, inference.address, **overrides))
    whole = ServerThread.compositing(
        make_compositing_config(models_dir, inference.address, **overrides, **{"output.jpeg_splicing": False})
    )
    in_process = ServerThread.compositing(
        make_compositing_config(
            models_dir,
            "127.0.0.1:1",
            **overrides,
            **{"inference.mode": "in_process", "inference.config": str(models_dir / "inference.yaml")},
        )
    )
    yield {"png": png, "jpeg": jpeg, "whole": whole, "in_process": in_process}
    for server in (in_process, whole, jpeg, png):
        server.stop()
    inference.stop()


def call(server: ServerThread) -> pb.CompositeBatchResponse:
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        return compositing_pb2_grpc.CompositingServiceStub(channel).InferBatchComposite(request(), timeout=60)


def reference(models_dir: Path, config, indices: list[int]) -> list[np.ndarray]:
    """The 160 family's inference steps (inference.py of SyncTalk_2D) on our demo generator."""
    rects = json.loads((models_dir / "avatar" / "crop_rects.json").read_text())
    avatar = open_avatar(config.models["demo160"], config)
    model = ort.InferenceSession(str(models_dir / "demo160" / "model.onnx"), providers=["CPUExecutionProvider"])
    frames, crops, inputs = [], [], []
    for index in indices:
        frame = avatar.read_frame(index).copy()
        x1, y1, x2, y2 = rects[index]
        crop = cv2.resize(frame[y1:y2, x1:x2], (168, 168), interpolation=cv2.INTER_LINEAR)
        real = crop[4:164, 4:164].copy()
        masked = cv2.rectangle(real.copy(), (5, 5, 150, 145), (0, 0, 0), -1)
        inputs.append(np.concatenate([real.transpose(2, 0, 1), masked.transpose(2, 0, 1)]).astype(np.float32) / 255)
        frames.append(frame)
        crops.append(crop)
    (preds,) = model.run(None, {"input": np.stack(inputs), "audio": loud(len(indices))})
    out = []
    for frame, crop, pred, index in zip(frames, crops, preds, indices, strict=True):
        x1, y1, x2, y2 = rects[index]
        crop[4:164, 4:164] = np.array(pred.transpose(1, 2, 0) * 255, dtype=np.uint8)
        frame[y1:y2, x1:x2] = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
        out.append(frame)
    return out


def test_160_frames_equal_the_familys_reference_in_every_mode(servers, models_dir: Path) -> None:
    png = call(servers["png"])
    indices = list(png.frame_indices)
    assert indices == [120, 121, 122, 123, 124, 123]
    expected = reference(models_dir, servers["png"].config, indices)
    for data, want in zip(png.composited_frames, expected, strict=True):
        got = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(got, want)
    spliced, whole, in_process = (call(servers[m]) for m in ("jpeg", "whole", "in_process"))
    assert spliced.spliced_frames == BATCH and whole.spliced_frames == 0
    assert list(in_process.composited_frames) == list(spliced.composited_frames)
    for a, b in zip(spliced.composited_frames, whole.composited_frames, strict=True):  # same pixels, other encode
        decoded = [cv2.imdecode(np.frombuffer(x, np.uint8), cv2.IMREAD_COLOR).astype(int) for x in (a, b)]
        assert np.abs(decoded[0] - decoded[1]).mean() < 1.0


def test_a_160_session_streams_the_batch_frames(servers) -> None:
    with LipsyncClient(servers["jpeg"].address) as client, client.session("demo160", start_frame=0) as session:
        assert (session.info.frame_width, session.info.frame_height) == (1280, 720)
        speech = np.sin(np.linspace(0, 2000, 16000 * 2)).astype(np.float32) * 0.5
        session.feed(speech, chunk_ms=40, realtime=False)
        frames = list(session.frames())
    assert len(frames) >= 50 and all(f.image[:2] == b"\xff\xd8" for f in frames)
