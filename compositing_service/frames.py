"""Where an avatar's background frames come from: a folder of images, or a video decoded once.

A video is decoded once with PyAV into raw frames under ``frames_cache_dir``
(keyed by the file's path, size and modification time), so evicted frames are
re-read in about a millisecond instead of re-decoding from the last keyframe,
and replicas on one host share the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}


class AvatarError(ValueError):
    """A broken avatar on disk; the message says what and where."""


def _natural_key(path: Path) -> list[object]:
    """0.jpg, 1.jpg, 2.jpg, ..., 10.jpg, as the reference names frames (not 0, 1, 10, 100, 2)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


class FrameSource:
    """Reads background frame ``index`` as BGR uint8 [H, W, 3]."""

    count: int
    shape: tuple[int, int]  # (height, width)
    identity: str  # changes whenever the frames on disk change

    def read(self, index: int) -> np.ndarray:
        raise NotImplementedError


class ImageFolder(FrameSource):
    def __init__(self, folder: Path) -> None:
        self.files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        if not self.files:
            raise AvatarError(f"background_dir: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
        self.count = len(self.files)
        stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
        self.identity = hashlib.sha256(f"{folder.resolve()}|{stats}".encode()).hexdigest()[:24]
        first = self._imread(0)
        self.shape = first.shape[:2]

    def _imread(self, index: int) -> np.ndarray:
        path = self.files[index]
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise AvatarError(f"background_dir: cannot decode {path.name}")
        return frame

    def read(self, index: int) -> np.ndarray:
        frame = self._imread(index)
        if frame.shape[:2] != self.shape:
            raise AvatarError(
                f"background_dir: {self.files[index].name} is {frame.shape[1]}x{frame.shape[0]}, "
                f"expected {self.shape[1]}x{self.shape[0]} like the first frame"
            )
        return frame


_decode_locks: dict[str, threading.Lock] = {}
_decode_locks_guard = threading.Lock()


class DecodedVideo(FrameSource):
    def __init__(self, video: Path, cache_root: Path) -> None:
        stat = video.stat()
        key = hashlib.sha256(f"{video.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
        self.folder = cache_root / key
        self.identity = key
        with _decode_locks_guard:
            lock = _decode_locks.setdefault(key, threading.Lock())
        with lock:
            meta_path = self.folder / "frames.json"
            if not meta_path.is_file():
                self._decode(video)
            meta = json.loads(meta_path.read_text())
        self.count = int(meta["count"])
        self.shape = (int(meta["height"]), int(meta["width"]))

    def _decode(self, video: Path) -> None:
        import av  # imported here: only avatars given as video need it

        tmp = self.folder.with_name(self.folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        count = 0
        shape = None
        try:
            with av.open(str(video)) as container:
                for frame in container.decode(video=0):
                    image = frame.to_ndarray(format="bgr24")
                    if shape is None:
                        shape = image.shape[:2]
                    np.save(tmp / f"{count:06d}.npy", image)
                    count += 1
        except Exception as exc:
            raise AvatarError(f"background_dir: cannot decode video {video.name} ({exc})") from exc
        if not count or shape is None:
            raise AvatarError(f"background_dir: video {video.name} has no frames")
        (tmp / "frames.json").write_text(
            json.dumps({"count": count, "height": shape[0], "width": shape[1], "source": str(video)})
        )
        if self.folder.exists():  # another process finished first
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()
        else:
            tmp.rename(self.folder)
        log.info("decoded %d frames of %s into %s", count, video.name, self.folder)

    def read(self, index: int) -> np.ndarray:
        return np.load(self.folder / f"{index:06d}.npy")


def open_source(path: Path, cache_root: Path) -> FrameSource:
    if path.is_dir():
        return ImageFolder(path)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return DecodedVideo(path, cache_root)
    if path.is_file():
        raise AvatarError(f"background_dir: {path.name} is neither a folder nor a video ({', '.join(VIDEO_SUFFIXES)})")
    raise AvatarError(f"background_dir: {path} does not exist")


def load_rects(path: Path) -> np.ndarray:
    """[N, 4] int32 rectangles (x1, y1, x2, y2) from a JSON list."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AvatarError(f"crop_rects_path: {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise AvatarError(f"crop_rects_path: {path.name} is not valid JSON ({exc})") from exc
    try:
        rects = np.asarray(data, dtype=np.int64)
    except (TypeError, ValueError):
        raise AvatarError(f"crop_rects_path: {path.name} must hold a list of [x1, y1, x2, y2] integers") from None
    if rects.ndim != 2 or rects.shape[1] != 4 or len(rects) == 0:
        raise AvatarError(
            f"crop_rects_path: {path.name} must hold a list of [x1, y1, x2, y2], got shape {list(rects.shape)}"
        )
    return rects.astype(np.int32)


def check_rects(rects: np.ndarray, shape: tuple[int, int], path: Path) -> None:
    height, width = shape
    x1, y1, x2, y2 = rects.T
    bad = np.flatnonzero((x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height) | (x2 - x1 < 2) | (y2 - y1 < 2))
    if bad.size:
        i = int(bad[0])
        raise AvatarError(
            f"crop_rects_path: rect {i} {rects[i].tolist()} of {path.name} is not inside the {width}x{height} "
            f"frame (or is empty); {bad.size} bad rects in all"
        )
