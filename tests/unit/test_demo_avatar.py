"""Tests of the generated demo avatar: real files, decoded with PyAV, cropped exactly as the reference does."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
import onnxruntime as ort
import pytest
import yaml

from demo_models import avatar, write_all
from demo_models.avatar import FRAME_HEIGHT, FRAME_WIDTH, crop_rect, draw_frame, mouth_center_in_frame
from demo_models.cli import main as cli_main
from demo_models.talking import MOUTH_CENTER, MOUTH_HALF_WIDTH

SAMPLE_FRAMES = (0, 31, 62, 93, 124)  # decoded frames kept for the crop and model tests


def reference_crop(frame: np.ndarray, rect: list[int] | tuple[int, ...]) -> np.ndarray:
    """The 320x320 model crop of the reference pipeline: crop, resize to 328 (INTER_CUBIC), inner [4:324]."""
    x1, y1, x2, y2 = rect
    crop328 = cv2.resize(frame[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    return crop328[4:324, 4:324]


def lips_mask(crop: np.ndarray) -> np.ndarray:
    """Red lip pixels: skin, hair, background, shirt and nose all have R - G well below 70."""
    c = crop.astype(np.int16)
    return (c[..., 2] - c[..., 1] > 70) & (c[..., 2] > 120)


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    assert xs.size > 0
    return float(xs.mean()), float(ys.mean())


@dataclass
class Decoded:
    count: int = 0
    shapes: set = field(default_factory=set)
    mean_abs_diff: list[float] = field(default_factory=list)
    lips_centroids: list[tuple[float, float]] = field(default_factory=list)
    samples: dict[int, np.ndarray] = field(default_factory=dict)
    codec: str = ""
    pix_fmt: str = ""
    rate: float = 0.0


@pytest.fixture(scope="module")
def avatar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("avatar_models")
    result = write_all(out, include_unet328=False)
    assert Path(result["avatar_video"]) == out / "avatar" / "background.mp4"
    assert Path(result["crop_rects_path"]) == out / "avatar" / "crop_rects.json"
    assert Path(result["compositing_config_path"]) == out / "compositing.yaml"
    return out


@pytest.fixture(scope="module")
def rects(avatar_dir: Path) -> list[list[int]]:
    return json.loads((avatar_dir / "avatar" / "crop_rects.json").read_text())


@pytest.fixture(scope="module")
def decoded(avatar_dir: Path, rects: list[list[int]]) -> Decoded:
    """One decoding pass that keeps per-frame measurements and a few frames (the whole clip is ~350 MB)."""
    d = Decoded()
    with av.open(str(avatar_dir / "avatar" / "background.mp4")) as container:
        stream = container.streams.video[0]
        d.codec = stream.codec_context.name
        d.pix_fmt = stream.codec_context.pix_fmt
        d.rate = float(stream.average_rate)
        for i, frame in enumerate(container.decode(stream)):
            img = frame.to_ndarray(format="bgr24")
            d.count += 1
            d.shapes.add(img.shape)
            d.mean_abs_diff.append(float(np.abs(img.astype(np.int16) - draw_frame(i)).mean()))
            if i < len(rects):
                d.lips_centroids.append(centroid(lips_mask(reference_crop(img, rects[i]))))
            if i in SAMPLE_FRAMES:
                d.samples[i] = img
    return d


# -- video -----------------------------------------------------------------------------------------------
def test_video_decodes_to_enough_720p_frames_at_25_fps(decoded: Decoded) -> None:
    assert decoded.count >= 100
    assert decoded.count == avatar.NUM_FRAMES
    assert decoded.shapes == {(FRAME_HEIGHT, FRAME_WIDTH, 3)}
    assert decoded.rate == 25.0
    assert decoded.pix_fmt == "yuv420p"
    assert decoded.codec in ("h264", "mpeg4")


def test_decoded_frames_are_close_to_the_drawn_ones(decoded: Decoded) -> None:
    assert max(decoded.mean_abs_diff) < 3.0


def test_drawing_is_deterministic_and_the_head_moves() -> None:
    a, b = draw_frame(40), draw_frame(40)
    assert a.shape == (FRAME_HEIGHT, FRAME_WIDTH, 3)
    assert a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(draw_frame(0), draw_frame(20))
    assert a.std() > 20  # a picture, not a flat frame


# -- crop rectangles -------------------------------------------------------------------------------------
def test_rects_are_squares_inside_the_frame_one_per_frame_and_move(rects: list[list[int]], decoded: Decoded) -> None:
    assert len(rects) == decoded.count
    for i, r in enumerate(rects):
        assert all(isinstance(v, int) for v in r)
        x1, y1, x2, y2 = r
        assert x2 - x1 == y2 - y1, i
        assert 256 <= x2 - x1 <= 280, i
        assert 0 <= x1 < x2 <= FRAME_WIDTH
        assert 0 <= y1 < y2 <= FRAME_HEIGHT
        assert tuple(r) == crop_rect(i)
    assert len({tuple(r) for r in rects}) > len(rects) // 2
    xs = [r[0] for r in rects]
    ys = [r[1] for r in rects]
    assert max(xs) - min(xs) >= 10
    assert max(ys) - min(ys) >= 6


def test_rects_cover_the_lower_face_below_the_eyes(rects: list[list[int]]) -> None:
    for i in (0, 50, 100):
        x1, y1, x2, y2 = rects[i]
        frame = draw_frame(i)
        crop = frame[y1:y2, x1:x2]
        assert not (crop.min(axis=2) > 230).any(), "eye whites inside the crop"
        above = frame[max(0, y1 - 60) : y1, x1:x2]
        assert (above.min(axis=2) > 230).any(), "the eyes should be just above the crop"
        assert lips_mask(crop).any()


def test_mouth_centre_in_frame_follows_the_head_pose() -> None:
    for i in range(0, avatar.NUM_FRAMES, 7):
        dx, dy, _ = avatar.head_pose(i)
        mx, my = mouth_center_in_frame(crop_rect(i))
        assert abs(mx - (avatar.BASE_MOUTH[0] + dx)) <= 1.0
        assert abs(my - (avatar.BASE_MOUTH[1] + dy)) <= 1.0


def test_drawn_lips_map_to_the_demo_mouth_centre(rects: list[list[int]]) -> None:
    for i in (0, 17, 64, 111):
        cx, cy = centroid(lips_mask(reference_crop(draw_frame(i), rects[i])))
        assert abs(cx - MOUTH_CENTER[0]) <= 1.0, i
        assert abs(cy - MOUTH_CENTER[1]) <= 1.0, i


def test_decoded_lips_map_to_the_demo_mouth_centre_in_every_frame(decoded: Decoded) -> None:
    c = np.array(decoded.lips_centroids)
    assert len(c) == decoded.count
    assert np.abs(c[:, 0] - MOUTH_CENTER[0]).max() <= 2.0
    assert np.abs(c[:, 1] - MOUTH_CENTER[1]).max() <= 2.0
    # No systematic offset (chroma subsampling done with the wrong siting shifts red edges by ~0.5 px).
    assert abs(c[:, 0].mean() - MOUTH_CENTER[0]) < 0.3
    assert abs(c[:, 1].mean() - MOUTH_CENTER[1]) < 0.3


def test_lips_width_matches_the_demo_mouth(decoded: Decoded, rects: list[list[int]]) -> None:
    for i, frame in decoded.samples.items():
        cols = np.nonzero(lips_mask(reference_crop(frame, rects[i])).any(axis=0))[0]
        width = cols.max() - cols.min() + 1
        assert abs(width - 2 * MOUTH_HALF_WIDTH) <= 10, (i, width)


# -- demo model on the avatar ----------------------------------------------------------------------------
def test_demo_model_opens_the_mouth_on_the_drawn_lips(avatar_dir: Path, decoded: Decoded, rects) -> None:
    idx = sorted(decoded.samples)
    real = np.stack([reference_crop(decoded.samples[i], rects[i]) for i in idx])  # [B,320,320,3] BGR
    masked = real.copy()
    masked[:, 5:310, 5:315] = 0  # cv2.rectangle(x=5, y=5, w=310, h=305, filled)
    visual = np.concatenate([real, masked], axis=3).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    audio = np.ones((len(idx), 32, 16, 16), dtype=np.float32)
    session = ort.InferenceSession(str(avatar_dir / "demo" / "model.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(["output"], {"input": visual, "audio": audio})
    assert out.shape == (len(idx), 3, 320, 320)
    for b, i in enumerate(idx):
        ref = visual[b, :3]
        opened = np.abs(out[b] - ref).sum(axis=0) > 0.3  # the dark mouth
        lips = lips_mask(real[b])
        assert opened.sum() > 3000, i
        coverage = (opened & lips).sum() / lips.sum()
        assert coverage > 0.8, (i, coverage)
        mx, my = centroid(opened)
        lx, ly = centroid(lips)
        assert abs(mx - lx) <= 2.0 and abs(my - ly) <= 2.0, i
        # The opened mouth lies on the face (skin or lips: R clearly above B), not on background or hair.
        under = real[b][opened].astype(np.int16)
        on_face = (under[:, 2] - under[:, 0] > 40).mean()
        assert on_face > 0.99, (i, on_face)


# -- configs ---------------------------------------------------------------------------------------------
def _check_compositing_config(root: Path, models: list[str]) -> dict:
    cfg = yaml.safe_load((root / "compositing.yaml").read_text())
    assert Path(cfg["models_root"]) == root.resolve()
    assert cfg["server"] == {"port": ":50052", "plaintext": True, "max_message_size_mb": 64}
    assert cfg["inference_server"] == {
        "url": "127.0.0.1:50051",
        "plaintext": True,
        "timeout_seconds": 30,
        "max_retries": 3,
    }
    assert cfg["inference"] == {"mode": "remote", "config": "inference.yaml"}
    assert (root / cfg["inference"]["config"]).is_file()
    assert cfg["capacity"] == {
        "max_models": 4,
        "background_cache_frames": 250,
        "background_cache_mb": 2048,
        "eviction_policy": "lfu",
    }
    assert cfg["output"] == {"format": "jpeg", "jpeg_quality": 75, "frame_order": "ping_pong"}
    assert list(cfg["models"]) == models
    for name, entry in cfg["models"].items():
        assert entry["model_path"] == f"{name}/model.onnx"
        assert entry["background_dir"] == "avatar/background.mp4"
        assert entry["crop_rects_path"] == "avatar/crop_rects.json"
        assert entry["num_frames"] == avatar.NUM_FRAMES
        assert entry["preload_backgrounds"] is (name == "demo")
        for key in ("model_path", "background_dir", "crop_rects_path"):
            assert (root / entry[key]).is_file(), (name, key)
        assert len(json.loads((root / entry["crop_rects_path"]).read_text())) == entry["num_frames"]
    inference = yaml.safe_load((root / "inference.yaml").read_text())
    assert list(inference["models"]) == models
    return cfg


def test_compositing_config_without_unet328_lists_only_the_demos(avatar_dir: Path) -> None:
    _check_compositing_config(avatar_dir, ["demo", "demo160"])


def test_compositing_config_with_unet328_lists_every_model(models_dir: Path) -> None:
    _check_compositing_config(models_dir, ["demo", "demo160", "unet328"])


def test_skip_avatar_writes_neither_avatar_nor_compositing_config(tmp_path: Path) -> None:
    assert cli_main(["--out", str(tmp_path), "--skip-unet328", "--skip-avatar"]) == 0
    assert (tmp_path / "inference.yaml").is_file()
    assert not (tmp_path / "avatar").exists()
    assert not (tmp_path / "compositing.yaml").exists()
    result = write_all(tmp_path / "again", include_unet328=False, include_avatar=False)
    assert "avatar_video" not in result
    assert "compositing_config_path" not in result
