"""A SyncTalk_2D dataset folder (frames and landmarks) as an avatar: frames plus one crop rectangle each.

Why every frame is decoded once here: the compositing service needs every frame readable and of one size,
and the rectangles are clipped to that size; a broken frame is better named now than at the first request.
The frames are copied byte for byte, so the service decodes exactly the pixels SyncTalk_2D decodes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from model_import.errors import ModelImportError

FRAMES = "full_body_img"
LANDMARKS = "landmarks"
MIN_POINTS = 53  # landmark 52 is the last one the crop reads
_FRAME = re.compile(r"([0-9]+)\.jpg")
_LMS = re.compile(r"([0-9]+)\.lms")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Avatar:
    frames: list[Path]  # in numeric order of their index k
    rects: np.ndarray  # int32 [N, 4]: x1, y1, x2, y2, as the reference's slice takes the crop
    size: tuple[int, int]  # (width, height) of every frame


def _numbered(folder: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    if not folder.is_dir():
        raise ModelImportError(f"{folder}: no such folder (a SyncTalk_2D dataset has {FRAMES}/ and {LANDMARKS}/)")
    return {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.fullmatch(p.name))}


def pair_files(dataset: Path, limit: int | None = None) -> list[tuple[Path, Path]]:
    """(frame, landmarks) of the first ``limit`` indices k, in numeric order; a file without its twin is an error."""
    frames = _numbered(dataset / FRAMES, _FRAME)
    marks = _numbered(dataset / LANDMARKS, _LMS)
    keys = sorted(frames.keys() | marks.keys())[:limit]
    if not keys:
        raise ModelImportError(f"{dataset / FRAMES}: no frames (<k>.jpg) to import")
    for k in keys:
        if k not in frames:
            raise ModelImportError(f"{marks[k]}: no frame {dataset / FRAMES / f'{k}.jpg'} for this landmark file")
        if k not in marks:
            raise ModelImportError(f"{frames[k]}: no landmark file {dataset / LANDMARKS / f'{k}.lms'} for this frame")
    return [(frames[k], marks[k]) for k in keys]


def read_landmarks(path: Path) -> np.ndarray:
    """int32 [n, 2] (x, y): parsed as float32 and truncated to int32, as SyncTalk_2D reads them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy warns on an empty file; the check below says more
            points = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelImportError(f"{path}: not a readable landmark file (lines of 'x y'): {exc}") from None
    if points.size == 0:
        points = points.reshape(0, 2)
    if points.shape[1:] != (2,) or not np.isfinite(points).all():
        raise ModelImportError(f"{path}: not a landmark file (expected lines of 'x y', got {points.shape[1]} columns)")
    if len(points) < MIN_POINTS:
        raise ModelImportError(
            f"{path}: {len(points)} landmarks, need at least {MIN_POINTS} (points 1, 31 and 52 place the crop)"
        )
    return points.astype(np.int32)


def _slice_bounds(start: np.ndarray, stop: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy's own bounds of ``a[start:stop]`` on an axis of ``length`` (negatives count from the end)."""

    def clip(v: np.ndarray) -> np.ndarray:
        return np.where(v < 0, np.maximum(v + length, 0), np.minimum(v, length))

    return clip(start), clip(stop)


def crop_rects(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[N, 4] rectangles from landmark points [N, 3] = (x of point 1, y of point 52, x of point 31).

    A square of side x31 - x1 whose top is y52, then what ``img[y1:y2, x1:x2]`` really takes of the frame.
    """
    width, height = size
    x1, y1, x2 = points[:, 0], points[:, 1], points[:, 2]
    y2 = y1 + (x2 - x1)
    x1, x2 = _slice_bounds(x1, x2, width)
    y1, y2 = _slice_bounds(y1, y2, height)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.int32)


def _frame_size(path: Path) -> tuple[int, int]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ModelImportError(f"{path}: cannot decode this frame")
    return image.shape[1], image.shape[0]


def frame_sizes(frames: list[Path], progress: Progress) -> tuple[int, int]:
    """The one (width, height) of all frames, decoding each (OpenCV releases the GIL: one thread per core)."""
    size: tuple[int, int] | None = None
    step = max(100, len(frames) // 10)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for i, (path, got) in enumerate(zip(frames, pool.map(_frame_size, frames), strict=True), start=1):
            if size is None:
                size = got
            elif got != size:
                raise ModelImportError(f"{path}: {got[0]}x{got[1]}, but the first frame is {size[0]}x{size[1]}")
            if i % step == 0 or i == len(frames):
                progress(f"frames decoded: {i}/{len(frames)}")
    assert size is not None
    return size


def load_avatar(dataset: Path, limit: int | None, progress: Progress) -> Avatar:
    """Check the dataset and compute the rectangles; nothing is written yet."""
    pairs = pair_files(dataset, limit)
    progress(f"dataset: {len(pairs)} frames with landmarks in {dataset}")
    points = np.array([(p[1, 0], p[52, 1], p[31, 0]) for p in (read_landmarks(lms) for _, lms in pairs)], np.int64)
    frames = [frame for frame, _ in pairs]
    size = frame_sizes(frames, progress)
    rects = crop_rects(points, size)
    bad = np.flatnonzero((rects[:, 2] - rects[:, 0] < 2) | (rects[:, 3] - rects[:, 1] < 2))
    if bad.size:
        i = int(bad[0])
        x1, y1, x2 = (int(v) for v in points[i])
        raise ModelImportError(
            f"{pairs[i][1]}: its crop [{x1}, {y1}, {x2}, {y1 + x2 - x1}] (x1, y1, x2, y2) is outside the "
            f"{size[0]}x{size[1]} frame or empty after clipping to it; {bad.size} such frames in all"
        )
    return Avatar(frames=frames, rects=rects, size=size)


def write_avatar(avatar: Avatar, dest: Path, progress: Progress) -> tuple[Path, Path]:
    """``dest/frames/<k>.jpg`` (copies) and ``dest/crop_rects.json`` (one [x1, y1, x2, y2] per frame)."""
    frames_dir = dest / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    step = max(100, len(avatar.frames) // 10)
    for i, frame in enumerate(avatar.frames, start=1):
        shutil.copyfile(frame, frames_dir / frame.name)
        if i % step == 0 or i == len(avatar.frames):
            progress(f"frames copied: {i}/{len(avatar.frames)}")
    rects_path = dest / "crop_rects.json"
    rects_path.write_text(json.dumps(avatar.rects.tolist()) + "\n")
    return frames_dir, rects_path
