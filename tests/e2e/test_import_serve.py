"""Imported 328 and 160 models served by both services: frames equal SyncTalk_2D's inference written out here.

The test makes a small dataset (8 frames 640x480, landmark files of 110 points), imports a genuine
checkpoint (the fixture when present, else one written here with random weights), starts the inference and
compositing servers on the configs the import wrote, and compares the PNG frames they return with a
reference composite computed from the facts: landmark crop by numpy slice, resized to the family's crop (328
bicubic, 168 bilinear), the inner 320 or 160, the mask, the ONNX model on the same audio features, truncation
to uint8, resized back over the slice the same way.
"""

from __future__ import annotations

import wave
from pathlib import Path

import cv2
import grpc
import numpy as np
import onnxruntime as ort
import pytest
from support import ServerThread
from synctalk import fixtures_dir, random_state, write_checkpoint, write_lms

from compositing_service.config import load_config as load_compositing
from inference_service import audio as A
from inference_service.config import load_config as load_inference
from lipsync_protocol import speech as S
from model_import.cli import main
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc, inference_pb2

pytestmark = pytest.mark.slow  # the full-size UNets
# The facts of each family's inference script (inference_328.py, inference.py), independent of our code.
FAMILIES = {
    "328": {"crop": 328, "inner": 320, "mask": (5, 5, 310, 305), "resize": cv2.INTER_CUBIC},
    "160": {"crop": 168, "inner": 160, "mask": (5, 5, 150, 145), "resize": cv2.INTER_LINEAR},
}
SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech_16k.wav"
OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
FRAMES, WIDTH, HEIGHT = 8, 640, 480
BATCH, START, FIRST_FRAME = 10, 3, 30  # background frames 3..7 then back to 2: the ping-pong turns
# (x of point 1, y of point 52, x of point 31) per frame; 6 runs off the right edge, 7 off the bottom
LANDMARKS = [(220 + 3 * k, 120 + 2 * k, 420 + 3 * k) for k in range(6)] + [(500, 150, 700), (230, 400, 430)]


def speech_pcm() -> np.ndarray:
    with wave.open(str(SPEECH)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def make_dataset(root: Path) -> Path:
    (root / "full_body_img").mkdir(parents=True)
    (root / "landmarks").mkdir()
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for k, (x1, y52, x31) in enumerate(LANDMARKS):
        base = np.stack([xx * 255 // WIDTH, yy * 255 // HEIGHT, (xx + 2 * yy + 9 * k) % 256], -1).astype(np.int16)
        image = np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)
        cv2.ellipse(image, (x1 + (x31 - x1) // 2, y52 + (x31 - x1) // 2), (80, 100), 0, 0, 360, (90, 140, 200), -1)
        cv2.imwrite(str(root / "full_body_img" / f"{k}.jpg"), image)
        write_lms(root / "landmarks" / f"{k}.lms", x1, y52, x31)
    return root


@pytest.fixture(scope="module", params=["328", "160"])
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, variant: str) -> tuple[Path, Path]:
    """(models folder, dataset): the import run by its CLI, from a checkpoint folder as a trainer leaves it."""
    root = tmp_path_factory.mktemp(f"import{variant}")
    dataset = make_dataset(root / "dataset" / "alice")
    run_dir = root / "checkpoint" / "alice"
    run_dir.mkdir(parents=True)
    fixtures = fixtures_dir()
    if (fixtures / f"unet{variant}_randbn.pth").is_file():
        (run_dir / "99.pth").write_bytes((fixtures / f"unet{variant}_randbn.pth").read_bytes())
        encoder = fixtures / "audio_encoder_randbn.pth"
    else:
        write_checkpoint(run_dir / "99.pth", random_state(variant, seed=9), location="cuda:0")
        encoder = write_checkpoint(root / "audio_visual_encoder.pth", random_state("audio_encoder", seed=9))
    other = "160" if variant == "328" else "328"
    write_checkpoint(run_dir / "4.pth", random_state(other))  # an earlier epoch: not the one taken
    models = root / "models"
    args = ["synctalk2d", "--checkpoint", str(run_dir), "--dataset", str(dataset), "--name", "alice"]
    assert main([*args, "--models-dir", str(models), "--audio-encoder", str(encoder)]) == 0
    return models, dataset


@pytest.fixture(scope="module")
def servers(imported: tuple[Path, Path]):
    models, _ = imported
    local = {"server.port": 0, "server.host": "127.0.0.1"}
    inference = ServerThread(load_inference(models / "inference.yaml", local, environ={}))
    try:
        config = load_compositing(
            models / "compositing.yaml",
            {
                **local,
                "inference_server.url": inference.address,
                "output.format": "png",
                "frames_cache_dir": str(models.parent / "frames-cache"),
            },
            environ={},
        )
        compositing = ServerThread.compositing(config)
        try:
            yield compositing
        finally:
            compositing.stop()
    finally:
        inference.stop()


def decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def reference_frames(
    models: Path, dataset: Path, indices: list[int], windows: np.ndarray, variant: str
) -> list[np.ndarray]:
    """SyncTalk_2D's inference steps for the family, frame by frame, from the dataset's own files."""
    family = FAMILIES[variant]
    size, inner, resize = family["crop"], family["inner"], family["resize"]
    unet = ort.InferenceSession(str(models / "alice" / "model.onnx"), providers=["CPUExecutionProvider"])
    frames, crops, places, inputs = [], [], [], []
    for index in indices:
        frame = cv2.imread(str(dataset / "full_body_img" / f"{index}.jpg"))
        lms = np.array(np.loadtxt(dataset / "landmarks" / f"{index}.lms", dtype=np.float32), dtype=np.int32)
        xmin, ymin, xmax = lms[1][0], lms[52][1], lms[31][0]
        ymax = ymin + (xmax - xmin)
        crop = frame[ymin:ymax, xmin:xmax]
        h, w = crop.shape[:2]
        crop = cv2.resize(crop, (size, size), interpolation=resize)
        real = crop[4 : 4 + inner, 4 : 4 + inner].copy()
        masked = cv2.rectangle(real.copy(), family["mask"], (0, 0, 0), -1)
        inputs.append(np.concatenate([real.transpose(2, 0, 1), masked.transpose(2, 0, 1)]).astype(np.float32) / 255.0)
        frames.append(frame)
        crops.append(crop)
        places.append((ymin, ymax, xmin, xmax, w, h))
    (preds,) = unet.run(None, {"input": np.stack(inputs), "audio": windows})
    out = []
    for frame, crop, pred, (ymin, ymax, xmin, xmax, w, h) in zip(frames, crops, preds, places, strict=True):
        crop[4 : 4 + inner, 4 : 4 + inner] = np.array(pred.transpose(1, 2, 0) * 255, dtype=np.uint8)
        frame[ymin:ymax, xmin:xmax] = cv2.resize(crop, (w, h), interpolation=resize)
        out.append(frame)
    return out


def test_served_frames_equal_the_reference_composite(servers, imported: tuple[Path, Path], variant: str) -> None:
    models, dataset = imported
    pcm = speech_pcm()
    encoder = ort.InferenceSession(str(models / "alice" / "audio_encoder.onnx"), providers=["CPUExecutionProvider"])
    raw = S.RawAudio(data=pcm.tobytes(), encoding="s16le", first_frame=FIRST_FRAME)
    windows, _ = A.batch_features(raw, BATCH, lambda chunks: encoder.run(None, {"mel": chunks})[0])
    assert windows.shape == (BATCH, 32, 16, 16) and float(np.abs(windows).max()) > 0
    with grpc.insecure_channel(servers.address, options=OPTIONS) as channel:
        stub = compositing_pb2_grpc.CompositingServiceStub(channel)
        response = stub.InferBatchComposite(
            pb.CompositeBatchRequest(
                model_id="alice",
                audio_features=windows.tobytes(),
                audio_features_shape=list(windows.shape),
                batch_size=BATCH,
                start_frame_idx=START,
            )
        )
        speech = stub.InferBatchComposite(  # the same frames from speech: the imported encoder serves
            pb.CompositeBatchRequest(
                model_id="alice",
                raw_audio=pcm.tobytes(),
                audio_encoding=inference_pb2.AUDIO_PCM_S16LE,
                sample_rate=16000,
                utterance_samples=len(pcm),
                first_frame=FIRST_FRAME,
                batch_size=BATCH,
                start_frame_idx=START,
            )
        )
        listed = {m.model_id: m for m in stub.ListModels(pb.ListModelsRequest()).models}["alice"]
        assert (listed.frame_width, listed.frame_height, listed.num_frames) == (WIDTH, HEIGHT, FRAMES)
    indices = list(response.frame_indices)
    assert indices == [3, 4, 5, 6, 7, 6, 5, 4, 3, 2]
    expected = reference_frames(models, dataset, indices, windows, variant)
    for got_png, speech_png, want, index in zip(
        response.composited_frames, speech.composited_frames, expected, indices, strict=True
    ):
        got = decode(got_png)
        assert got.shape == (HEIGHT, WIDTH, 3)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert int(diff.max()) <= 1, f"frame {index}: max difference {int(diff.max())}"
        assert float((diff == 0).mean()) > 0.999
        # Only the rectangle changed, and it did change.
        background = cv2.imread(str(dataset / "full_body_img" / f"{index}.jpg"))
        x1, y52, x31 = LANDMARKS[index]
        outside = np.ones((HEIGHT, WIDTH), bool)
        outside[y52 : y52 + x31 - x1, x1:x31] = False
        np.testing.assert_array_equal(got[outside], background[outside])
        assert int(np.abs(got[~outside].astype(int) - background[~outside].astype(int)).max()) > 40
        assert int(np.abs(decode(speech_png).astype(int) - got.astype(int)).max()) <= 1
