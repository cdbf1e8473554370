"""The demo avatar as the compositing benchmarks use it: its frames, crop rectangles, crops and moving mouths.

Why: per-frame costs depend on what is in the frame (a flat cartoon encodes faster than video) and where the mouth
is, so the image benchmarks run on the avatar the services serve, with the demo model's own mouths opening and
closing as in speech rather than a constant patch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from compositing_service.geometry import crop_face, model_input

AUDIO_SHAPE = (32, 16, 16)
MOUTH_SHAPE = (3, 320, 320)


@dataclass
class Avatar:
    label: str
    frames: list[np.ndarray]  # BGR uint8 [H, W, 3], as the cache holds them
    rects: list[tuple[int, int, int, int]]
    crops: list[np.ndarray]  # the 328 crops (what prepare() keeps for the paste-back)
    mouths: np.ndarray  # uint8 [N, 3, 320, 320], the demo model's output for each crop

    @property
    def size(self) -> str:
        height, width = self.frames[0].shape[:2]
        return f"{width}x{height}"


def loudness_audio(count: int, phase: int = 0, step: float = 0.4) -> np.ndarray:
    """float32 [count, 32, 16, 16] windows whose loudness cycles 0..1 by ``step`` radians a frame.

    The demo model reads channels 16-17 (the current frame's embedding), so its mouths open and close as in speech.
    """
    level = (0.5 + 0.5 * np.sin((np.arange(count) + phase) * step)).astype(np.float32)
    audio = np.zeros((count, *AUDIO_SHAPE), np.float32)
    audio[:, 16:18] = level[:, None, None, None]
    return audio


def demo_mouths(models_dir: Path, crops: Sequence[np.ndarray]) -> np.ndarray:
    """The demo model's mouths for these crops, truncated to uint8 as the inference side returns them."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(models_dir / "demo" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    out = np.empty((len(crops), *MOUTH_SHAPE), np.uint8)
    for start in range(0, len(crops), 25):
        chunk = crops[start : start + 25]
        visual = np.stack([model_input(c) for c in chunk]).astype(np.float32) / np.float32(255.0)
        (mouth,) = session.run(None, {"input": visual, "audio": loudness_audio(len(chunk), start, 0.7)})
        out[start : start + len(chunk)] = (np.clip(mouth, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def load_avatar(models_dir: Path) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    """The background video's frames (decoded with PyAV) and their crop rectangles."""
    import av

    rects = [tuple(int(v) for v in r) for r in json.loads((models_dir / "avatar" / "crop_rects.json").read_text())]
    with av.open(str(models_dir / "avatar" / "background.mp4")) as container:
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    count = min(len(frames), len(rects))
    return frames[:count], rects[:count]  # type: ignore[return-value]


def build_avatar(
    models_dir: Path, frames: list[np.ndarray], rects: list[tuple[int, int, int, int]], label: str, scale: float
) -> Avatar:
    """The avatar at ``scale`` times its size (1.5: 1920x1080), with crops and mouths made for that size."""
    if scale != 1.0:
        height, width = frames[0].shape[:2]
        size = (round(width * scale), round(height * scale))
        frames = [cv2.resize(f, size, interpolation=cv2.INTER_CUBIC) for f in frames]
        rects = [
            (round(x1 * scale), round(y1 * scale), round(x2 * scale), round(y2 * scale)) for x1, y1, x2, y2 in rects
        ]
    crops = [crop_face(f, r) for f, r in zip(frames, rects, strict=True)]
    return Avatar(label, frames, rects, crops, demo_mouths(models_dir, crops))
