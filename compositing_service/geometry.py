"""The reference pipeline's image geometry (PIPELINE.md), with OpenCV as the reference used it.

Pillow's bicubic differs from OpenCV's INTER_CUBIC by up to 21 levels on these
crops, and a trained model only lip-syncs well on exactly what it saw in
training, so every resize here is cv2.resize with INTER_CUBIC.
"""

from __future__ import annotations

import cv2
import numpy as np

from .jpeg_splice import sampling_flag

CROP_SIZE = 328
INNER = slice(4, 324)  # the 320x320 model crop inside the 328 crop
MASK_ROWS = slice(5, 310)  # cv2.rectangle(img, (5, 5, 310, 305), 0, -1): rows 5..309
MASK_COLS = slice(5, 315)  # and columns 5..314

Rect = tuple[int, int, int, int]


def crop_328(frame: np.ndarray, rect: Rect) -> np.ndarray:
    """The face crop resized to 328x328; kept for the paste-back, whose border it supplies."""
    x1, y1, x2, y2 = rect
    return cv2.resize(frame[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)


def model_input(crop328: np.ndarray) -> np.ndarray:
    """uint8 [6, 320, 320]: the real crop then its masked copy, BGR, CHW (the server divides by 255)."""
    real = crop328[INNER, INNER]
    out = np.empty((6, 320, 320), np.uint8)
    out[:3] = real.transpose(2, 0, 1)
    out[3:] = out[:3]
    out[3:, MASK_ROWS, MASK_COLS] = 0
    return out


def draw_mouth(dst: np.ndarray, crop328: np.ndarray, mouth: np.ndarray, *, reuse_crop: bool = False) -> np.ndarray:
    """Draw into ``dst`` (the rectangle's view, [h, w, 3]) what the reference writes over ``frame[y1:y2, x1:x2]``
    for a generated crop (uint8 [3, 320, 320], already truncated).

    The 4-pixel border of the 328 crop keeps the original pixels; the whole 328 crop is resized back to the
    rectangle, with no feathering. ``reuse_crop`` writes the mouth into ``crop328`` itself (a request's own crop,
    used once) instead of a copy.
    """
    crop = crop328 if reuse_crop else crop328.copy()
    # cv2.merge interleaves the planes ~3x faster than assigning a transposed view (bench/README.md).
    crop[INNER, INNER] = cv2.merge((mouth[0], mouth[1], mouth[2]))
    h, w = dst.shape[:2]
    return cv2.resize(crop, (w, h), dst=dst, interpolation=cv2.INTER_CUBIC)


def paste_back(frame: np.ndarray, rect: Rect, crop328: np.ndarray, mouth: np.ndarray) -> None:
    """Write the generated crop over ``frame`` in place, as the reference does (see ``draw_mouth``)."""
    x1, y1, x2, y2 = rect
    draw_mouth(frame[y1:y2, x1:x2], crop328, mouth)


def encode_image(frame: np.ndarray, fmt: str, quality: int, subsampling: str = "420") -> bytes:
    """JPEG at ``quality`` (what clients get), or lossless PNG (for checking pixels end to end)."""
    if fmt == "png":
        ok, data = cv2.imencode(".png", frame, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling_flag(subsampling)]
        ok, data = cv2.imencode(".jpg", frame, params)
    if not ok:  # pragma: no cover - OpenCV only fails on invalid arrays, which never reach here
        raise RuntimeError(f"{fmt} encoding failed")
    return data.tobytes()


def frame_index(position: int, num_frames: int, order: str) -> int:
    """The background frame for output position ``position``.

    ``ping_pong`` plays 0, 1, ..., N-1, N-2, ..., 1, 0, 1, ... so a long
    utterance never jumps from the last frame to the first; ``loop`` wraps.
    """
    if num_frames <= 1:
        return 0
    if order == "loop":
        return position % num_frames
    period = 2 * (num_frames - 1)
    q = position % period
    return q if q < num_frames else period - q
