"""The reference pipeline's image geometry (PIPELINE.md), with OpenCV as the reference used it.

Pillow's bicubic differs from OpenCV's INTER_CUBIC by up to 21 levels on these
crops, and a trained model only lip-syncs well on exactly what its reference
inference feeds it, so every resize here is cv2.resize with the interpolation
its family's inference uses (lipsync_protocol.geometry: bicubic for 328 models,
bilinear for 160 models).
"""

from __future__ import annotations

import cv2
import numpy as np

from lipsync_protocol.geometry import DEFAULT, Geometry

from .jpeg_splice import sampling_flag

# The 328 family's numbers, for the tests and benchmarks that name them.
CROP_SIZE = DEFAULT.crop_size
INNER = DEFAULT.inner_slice  # the 320x320 model crop inside the 328 crop
MASK_ROWS = DEFAULT.mask_rows  # cv2.rectangle(img, (5, 5, 310, 305), 0, -1): rows 5..309
MASK_COLS = DEFAULT.mask_cols  # and columns 5..314

INTERPOLATION = {"cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR}

Rect = tuple[int, int, int, int]


def crop_face(frame: np.ndarray, rect: Rect, geometry: Geometry = DEFAULT) -> np.ndarray:
    """The face rectangle resized to the family's crop (328 or 168); kept for the paste-back, whose border it
    supplies. Deterministic per background frame, so the cache keeps it beside the frame."""
    x1, y1, x2, y2 = rect
    size = (geometry.crop_size, geometry.crop_size)
    return cv2.resize(frame[y1:y2, x1:x2], size, interpolation=INTERPOLATION[geometry.crop_interpolation])


def real_crop(crop: np.ndarray, geometry: Geometry = DEFAULT) -> np.ndarray:
    """uint8 [3, S, S] C-contiguous: the model input's real half (BGR, CHW), what the inference hop carries."""
    inner = geometry.inner_slice
    return np.ascontiguousarray(crop[inner, inner].transpose(2, 0, 1))


def model_input(crop: np.ndarray, geometry: Geometry = DEFAULT) -> np.ndarray:
    """uint8 [6, S, S]: the real crop then its masked copy (the server divides by 255)."""
    real = real_crop(crop, geometry)
    out = np.concatenate([real, real])
    out[3:, geometry.mask_rows, geometry.mask_cols] = 0
    return out


def draw_mouth(
    dst: np.ndarray,
    crop: np.ndarray,
    mouth: np.ndarray,
    geometry: Geometry = DEFAULT,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """Draw into ``dst`` (the rectangle's view, [h, w, 3]) what the reference writes over ``frame[y1:y2, x1:x2]``
    for a generated crop (uint8 [3, S, S], already truncated).

    The border of the crop around the inner square keeps the original pixels; the whole crop is resized back to
    the rectangle, with no feathering. ``crop`` is the cached one and is never written: the generated crop is
    assembled in ``scratch`` (a buffer of the crop's shape the caller reuses), else in a copy.
    """
    work = np.empty_like(crop) if scratch is None else scratch
    inner, lo, hi = geometry.inner_slice, geometry.inner, geometry.inner + geometry.input_size
    work[:lo] = crop[:lo]  # the border strips only: the inner square is overwritten next
    work[hi:] = crop[hi:]
    work[lo:hi, :lo] = crop[lo:hi, :lo]
    work[lo:hi, hi:] = crop[lo:hi, hi:]
    # cv2.merge interleaves the planes ~3x faster than assigning a transposed view (bench/README.md).
    work[inner, inner] = cv2.merge((mouth[0], mouth[1], mouth[2]))
    h, w = dst.shape[:2]
    return cv2.resize(work, (w, h), dst=dst, interpolation=INTERPOLATION[geometry.paste_interpolation])


def paste_back(
    frame: np.ndarray, rect: Rect, crop: np.ndarray, mouth: np.ndarray, geometry: Geometry = DEFAULT
) -> None:
    """Write the generated crop over ``frame`` in place, as the reference does (see ``draw_mouth``)."""
    x1, y1, x2, y2 = rect
    draw_mouth(frame[y1:y2, x1:x2], crop, mouth, geometry)


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
