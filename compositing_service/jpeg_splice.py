"""Spliced JPEG encoding: re-encode only the tiles a pasted mouth changed, reuse the background's bytes.

A baseline JPEG with restart markers resets DC prediction and byte-aligns the entropy coder at every restart
interval, so an interval's entropy-coded bytes depend only on the pixels of its own MCUs. With the same quality,
sampling and the standard Huffman tables (libjpeg's default: OpenCV optimizes only when asked), an image made of
whole intervals of a frame encodes those intervals to exactly the bytes the frame's encode has for them. So the
JPEG of a composited frame is the background's cached encode with the intervals under the changed rectangle
swapped for those of a small encode of just that box, byte-identical to encoding the whole composited frame.

Two rules keep that true, and this module enforces both:
- the restart interval divides the MCUs per row, so no interval wraps into the next MCU row and a box of whole
  intervals is a rectangle;
- boxes start on MCU boundaries (so chroma downsampling pairs the same pixels with the same rounding bias) and
  end on interval boundaries or on the frame's own right/bottom edge (so edge padding is the same).

Typical use, once per cached background frame and settings::

    background = SplicedBackground.from_frame(frame, SpliceSettings(quality=75))

and per output frame (``frame`` read-only, ``patch`` the resized crop written over ``frame[y1:y2, x1:x2]``)::

    jpeg, fallback = encode_composite(background, frame, rect, patch)

which equals ``encode_with_restarts(composited frame, settings)`` byte for byte; ``fallback`` names why it had to
encode the whole frame instead, or is None.
"""

from __future__ import annotations

import enum
import re
import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 (end-exclusive), as compositing_service.geometry.Rect
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (end-exclusive), aligned to the splice tiles

# The luma sampling factors (h, v) of each mode; chroma is always 1x1. OpenCV's encoder default is 4:2:0.
_SAMPLING: dict[str, tuple[int, int, int]] = {
    "444": (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, 1, 1),
    "422": (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422, 2, 1),
    "420": (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, 2, 2),
    "440": (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440, 1, 2),
    "411": (cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411, 4, 1),
}
SUBSAMPLINGS = tuple(_SAMPLING)


def sampling_flag(subsampling: str) -> int:
    """OpenCV's IMWRITE_JPEG_SAMPLING_FACTOR value for "420", "422", "444", "440" or "411"."""
    return _SAMPLING[subsampling][0]


# Entropy-coded data stuffs every 0xFF as FF 00, so FF D0..FF D7 in a scan can only be a restart marker.
_RST = re.compile(rb"\xff[\xd0-\xd7]")
_RST_MARKERS = tuple(bytes((0xFF, 0xD0 + i)) for i in range(8))
_EOI = b"\xff\xd9"


class FallbackReason(enum.StrEnum):
    """Why a frame could not be spliced; the values are stable, for stats and metric labels."""

    UNSUPPORTED_FRAME = "unsupported_frame"  # not an HxWx3 uint8 frame
    BACKGROUND_LAYOUT = "background_layout"  # the background's JPEG is not the baseline restart layout expected
    WHOLE_FRAME = "whole_frame"  # the box covers the whole frame: a full encode costs the same
    ENCODE_FAILED = "encode_failed"  # cv2.imencode refused the box
    TILE_HEADER = "tile_header"  # the box's encode has other headers/tables than the background's
    TILE_SEGMENTS = "tile_segments"  # the box's encode has another number of restart intervals than expected


class SpliceFallback(Exception):
    """Splicing does not apply to this frame; encode the composited frame whole instead (``reason`` says why)."""

    def __init__(self, reason: FallbackReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SpliceSettings:
    """What must be the same for the background, the box and the reference encode.

    ``tile_width`` is the target width in pixels of a restart interval: narrower tiles re-encode fewer pixels
    around a rectangle, but every interval adds a 2-byte marker, up to 7 padding bits and DC values coded from
    zero to every frame (+0.8% at 128 px on a detailed 720p frame, +7.6% on a flat cartoon).
    """

    quality: int
    subsampling: str = "420"
    tile_width: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise ValueError(f"quality: expected an int in 1..100, got {self.quality!r}")
        if self.subsampling not in _SAMPLING:
            raise ValueError(f"subsampling: expected one of {', '.join(SUBSAMPLINGS)}, got {self.subsampling!r}")
        if not isinstance(self.tile_width, int) or self.tile_width < 1:
            raise ValueError(f"tile_width: expected a positive int, got {self.tile_width!r}")

    @property
    def luma_sampling(self) -> tuple[int, int]:
        """The luma (h, v) sampling factors, as they appear in the SOF segment."""
        _, h, v = _SAMPLING[self.subsampling]
        return h, v

    @property
    def mcu_size(self) -> tuple[int, int]:
        """(width, height) of an MCU in pixels: 8 times the luma sampling factors."""
        h, v = self.luma_sampling
        return 8 * h, 8 * v

    def restart_interval(self, width: int) -> int:
        """MCUs per restart interval for a frame ``width`` px wide.

        It is the divisor of the MCUs per row nearest ``tile_width`` (the wider on a tie), so intervals never
        wrap across MCU rows. A prime number of MCUs per row leaves 1 MCU or the whole row; the nearer wins.
        """
        mcu_w = self.mcu_size[0]
        per_row = -(-width // mcu_w)
        target = max(1, round(self.tile_width / mcu_w))
        divisors = [d for d in range(1, per_row + 1) if per_row % d == 0]
        return min(divisors, key=lambda d: (abs(d - target), -d))

    def encode_params(self, restart_interval: int) -> list[int]:
        """cv2.imencode parameters; Huffman optimization and progressive stay off (their defaults)."""
        return [
            cv2.IMWRITE_JPEG_QUALITY,
            self.quality,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            sampling_flag(self.subsampling),
            cv2.IMWRITE_JPEG_RST_INTERVAL,
            restart_interval,
        ]


MIN_FITTED_TILE = 64  # narrower tiles cost more in markers and DC resets than they save in pixels


def fit_tile_width(width: int, rects: np.ndarray | list, subsampling: str = "420") -> int:
    """The tile width (a whole restart interval) that makes the boxes around an avatar's rectangles smallest.

    Tiles start at x = 0 and are a divisor of the MCUs per row wide, so how well a grid fits depends on where
    the avatar's mouth sits: a 273 px rectangle at x = 504 needs 4 tiles of 128 px (512 px) but 2 of 160 px
    (320 px). Among widths from MIN_FITTED_TILE up to half the frame, the one with the smallest mean box width
    wins; within 5 % of it, the widest (fewest markers). Box heights do not depend on the width.
    """
    settings = SpliceSettings(75, subsampling)
    mcu_w = settings.mcu_size[0]
    per_row = -(-width // mcu_w)
    x = np.asarray(rects, dtype=np.int64).reshape(-1, 4)[:, [0, 2]]
    if not len(x):
        return settings.tile_width
    candidates = [d * mcu_w for d in range(1, per_row + 1) if per_row % d == 0]
    usable = [t for t in candidates if MIN_FITTED_TILE <= t <= max(width // 2, MIN_FITTED_TILE)] or candidates
    mean_box = {t: float(np.mean(np.minimum(-(-x[:, 1] // t) * t, width) - x[:, 0] // t * t)) for t in usable}
    best = min(mean_box.values())
    return max(t for t, w in mean_box.items() if w <= best * 1.05)


@dataclass(frozen=True, slots=True)
class SpliceGeometry:
    """The restart-interval grid of a frame: every tile is one interval, ``tile_width`` x one MCU row."""

    width: int
    height: int
    mcu_width: int
    mcu_height: int
    restart_interval: int  # MCUs per interval

    @classmethod
    def for_frame(cls, width: int, height: int, settings: SpliceSettings) -> SpliceGeometry:
        if width < 1 or height < 1:
            raise ValueError(f"frame size: expected positive, got {width}x{height}")
        mcu_w, mcu_h = settings.mcu_size
        return cls(width, height, mcu_w, mcu_h, settings.restart_interval(width))

    @property
    def tile_width(self) -> int:
        return self.mcu_width * self.restart_interval

    @property
    def tile_height(self) -> int:
        return self.mcu_height

    @property
    def tile_cols(self) -> int:
        """Restart intervals per MCU row (the last one may be narrower: it holds the right edge)."""
        return -(-self.width // self.tile_width)

    @property
    def tile_rows(self) -> int:
        return -(-self.height // self.mcu_height)

    @property
    def intervals(self) -> int:
        return self.tile_cols * self.tile_rows

    def tile_box(self, rect: Rect) -> Box:
        """The smallest box of whole tiles covering ``rect`` (x1, y1, x2, y2), its right/bottom clipped to the frame."""
        x1, y1, x2, y2 = (int(v) for v in rect)
        if not (0 <= x1 < x2 <= self.width and 0 <= y1 < y2 <= self.height):
            raise ValueError(f"rect {rect} is empty or not inside the {self.width}x{self.height} frame")
        tw, th = self.tile_width, self.tile_height
        return (
            x1 // tw * tw,
            y1 // th * th,
            min(-(-x2 // tw) * tw, self.width),
            min(-(-y2 // th) * th, self.height),
        )

    def check_box(self, box: Box) -> None:
        """Raise ValueError unless ``box`` is made of whole tiles (as ``tile_box`` returns)."""
        x0, y0, x1, y1 = box
        tw, th = self.tile_width, self.tile_height
        ok = (
            0 <= x0 < x1 <= self.width
            and 0 <= y0 < y1 <= self.height
            and x0 % tw == 0
            and y0 % th == 0
            and (x1 % tw == 0 or x1 == self.width)
            and (y1 % th == 0 or y1 == self.height)
        )
        if not ok:
            raise ValueError(f"box {box} is not made of whole {tw}x{th} tiles of the {self.width}x{self.height} frame")


def _check_frame(frame: np.ndarray) -> None:
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise SpliceFallback(FallbackReason.UNSUPPORTED_FRAME, f"expected HxWx3 uint8, got {frame.shape} {frame.dtype}")


def _encode(image: np.ndarray, settings: SpliceSettings, restart_interval: int) -> np.ndarray | None:
    ok, data = cv2.imencode(".jpg", image, settings.encode_params(restart_interval))
    return data if ok else None


def encode_with_restarts(frame: np.ndarray, settings: SpliceSettings) -> bytes:
    """The full-frame encode with restart markers: what a spliced frame equals byte for byte.

    It decodes to the same pixels as the plain ``cv2.imencode`` at the same quality and sampling (only the
    entropy coding is cut into intervals); it is a little larger (the markers and byte padding).
    """
    _check_frame(frame)
    data = _encode(frame, settings, settings.restart_interval(frame.shape[1]))
    if data is None:  # pragma: no cover - OpenCV only fails on invalid arrays, which _check_frame rejects
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


@dataclass(frozen=True, slots=True)
class _Header:
    length: int  # bytes up to and including the SOS segment
    sof_dims: int  # offset of the SOF's height and width (2 bytes each, big-endian)
    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # per component (h, v)
    restart_interval: int


def _parse_header(data: bytes) -> _Header:
    """Walk the marker segments up to SOS; raise SpliceFallback unless it is a 3-component baseline scan."""
    try:
        header = _walk_header(data)
    except (IndexError, struct.error) as exc:  # truncated inside a segment
        raise SpliceFallback(FallbackReason.BACKGROUND_LAYOUT, f"truncated header ({exc})") from None
    if header.width < 1 or header.height < 1:
        raise SpliceFallback(FallbackReason.BACKGROUND_LAYOUT, f"image size {header.width}x{header.height}")
    return header


def _walk_header(data: bytes) -> _Header:
    def bad(detail: str) -> SpliceFallback:
        return SpliceFallback(FallbackReason.BACKGROUND_LAYOUT, detail)

    if data[:2] != b"\xff\xd8":
        raise bad("no SOI")
    pos, sof, dri = 2, None, 0
    while True:
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise bad(f"no marker at {pos}")
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in (0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            raise bad(f"not baseline (SOF marker {marker:#x})")
        if marker == 0xC0:
            sof = pos
        elif marker == 0xDD:
            (dri,) = struct.unpack_from(">H", data, pos + 4)
        elif marker == 0xDA:
            break
        pos += 2 + length
    if sof is None:
        raise bad("no SOF0")
    height, width, ncomp = struct.unpack_from(">HHB", data, sof + 5)
    sampling = tuple((data[sof + 11 + 3 * i] >> 4, data[sof + 11 + 3 * i] & 15) for i in range(ncomp))
    if ncomp != 3 or data[pos + 4] != 3:
        raise bad(f"{ncomp} components, {data[pos + 4]} in the scan: expected one interleaved scan of 3")
    return _Header(pos + 2 + length, sof + 5, width, height, sampling, dri)


class SplicedBackground:
    """A background frame's encode with restart markers, split into its header and interval segments.

    Built once per cached background frame and settings, and immutable (safe to share between threads). It keeps
    only the JPEG (1-7% of the raw frame in bench/splice_micro.py) and 4 bytes per interval, not the pixels:
    the caller keeps the frame, which splicing reads the box from.
    """

    __slots__ = ("_header", "_starts", "_view", "geometry", "jpeg", "settings")

    def __init__(self, jpeg: bytes, settings: SpliceSettings) -> None:
        """Parse ``jpeg``, which must be ``encode_with_restarts`` of the background with ``settings``.

        Raises SpliceFallback(BACKGROUND_LAYOUT) if it is not laid out as those settings encode.
        """
        jpeg = bytes(jpeg)
        header = _parse_header(jpeg)
        geometry = SpliceGeometry.for_frame(header.width, header.height, settings)
        expected_sampling = (settings.luma_sampling, (1, 1), (1, 1))
        if header.sampling != expected_sampling or header.restart_interval != geometry.restart_interval:
            raise SpliceFallback(
                FallbackReason.BACKGROUND_LAYOUT,
                f"sampling {header.sampling}, restart interval {header.restart_interval}: expected "
                f"{expected_sampling}, {geometry.restart_interval}",
            )
        if jpeg[-2:] != _EOI:
            raise SpliceFallback(FallbackReason.BACKGROUND_LAYOUT, "does not end with EOI")
        markers = [m.start() for m in _RST.finditer(jpeg, header.length, len(jpeg) - 2)]
        if len(markers) != geometry.intervals - 1:
            raise SpliceFallback(
                FallbackReason.BACKGROUND_LAYOUT, f"{len(markers) + 1} intervals, expected {geometry.intervals}"
            )
        if any(jpeg[p + 1] != 0xD0 + k % 8 for k, p in enumerate(markers)):
            raise SpliceFallback(FallbackReason.BACKGROUND_LAYOUT, "restart markers out of sequence")
        # _starts[k]: where interval k's data begins; _starts[n]: the EOI. Interval k < n-1 ends 2 bytes (its
        # RST marker) before _starts[k + 1].
        starts = array("I", [header.length])
        starts.extend(p + 2 for p in markers)
        starts.append(len(jpeg) - 2)
        self.jpeg = jpeg
        self.settings = settings
        self.geometry = geometry
        self._header = header
        self._starts = starts
        self._view = memoryview(jpeg)

    @classmethod
    def from_frame(cls, frame: np.ndarray, settings: SpliceSettings) -> SplicedBackground:
        """Encode ``frame`` with restart markers and parse it (one full encode, about 2.5 ms at 720p)."""
        return cls(encode_with_restarts(frame, settings), settings)

    @property
    def header(self) -> bytes:
        """Everything up to and including the SOS segment."""
        return self.jpeg[: self._header.length]

    @property
    def nbytes(self) -> int:
        """Memory held (the JPEG and the offsets), for a cache sized in bytes."""
        return len(self.jpeg) + self._starts.itemsize * len(self._starts)

    def segment(self, index: int) -> bytes:
        """Interval ``index``'s entropy-coded bytes, without its RST marker (for inspection and tests)."""
        if not 0 <= index < self.geometry.intervals:
            raise IndexError(index)
        end = self._starts[index + 1] - (2 if index < self.geometry.intervals - 1 else 0)
        return self.jpeg[self._starts[index] : end]


def tile_box(rect: Rect, background: SplicedBackground) -> Box:
    """The smallest box of whole restart intervals covering ``rect``, clipped to the frame (see SpliceGeometry)."""
    return background.geometry.tile_box(rect)


def splice(background: SplicedBackground, box: Box, pixels: np.ndarray) -> bytes:
    """The complete JPEG of the background with ``box`` (from ``tile_box``) replaced by ``pixels``.

    ``pixels`` is the box's full content (the background's pixels there with the mouth pasted in), shape
    (y1 - y0, x1 - x0, 3) uint8. Only the box is encoded; its intervals go between the background's, with the
    RST markers numbered by their index in the frame. Raises SpliceFallback when splicing does not apply,
    ValueError on a box or pixels that do not fit the frame (a caller's bug).
    """
    g = background.geometry
    g.check_box(box)
    x0, y0, x1, y1 = box
    if box == (0, 0, g.width, g.height):
        raise SpliceFallback(FallbackReason.WHOLE_FRAME)
    if pixels.shape != (y1 - y0, x1 - x0, 3) or pixels.dtype != np.uint8:
        raise ValueError(f"pixels: expected {(y1 - y0, x1 - x0, 3)} uint8 for box {box}, got {pixels.shape}")
    encoded = _encode(pixels, background.settings, g.restart_interval)
    if encoded is None:  # pragma: no cover - OpenCV only fails on invalid arrays, which are rejected above
        raise SpliceFallback(FallbackReason.ENCODE_FAILED)
    tile = encoded.tobytes()

    # Its header must be the background's but for the image size in SOF: same tables, sampling and interval.
    bg, h = background.jpeg, background._header
    d = h.sof_dims
    if (
        tile[:d] != bg[:d]
        or tile[d + 4 : h.length] != bg[d + 4 : h.length]
        or tile[d : d + 4] != struct.pack(">HH", y1 - y0, x1 - x0)
        or tile[-2:] != _EOI
    ):
        raise SpliceFallback(FallbackReason.TILE_HEADER)
    cols = -(-(x1 - x0) // g.tile_width)
    rows = -(-(y1 - y0) // g.tile_height)
    segments = _RST.split(memoryview(tile)[h.length : -2])
    if len(segments) != rows * cols:
        raise SpliceFallback(FallbackReason.TILE_SEGMENTS, f"{len(segments)} intervals, expected {rows * cols}")

    view, starts, last = background._view, background._starts, g.intervals - 1
    per_row, c0 = g.tile_cols, x0 // g.tile_width
    r0 = y0 // g.tile_height
    first = r0 * per_row + c0
    pieces: list[bytes | memoryview] = [view[: starts[first]]]  # header, intervals before, and first's RST
    seg = iter(segments)
    for r in range(r0, r0 + rows):
        row_first = r * per_row + c0
        row_last = row_first + cols - 1
        for k in range(row_first, row_last + 1):
            pieces.append(next(seg))
            if k < last:
                pieces.append(_RST_MARKERS[k % 8])
        # Then the background from after the row's last replaced interval and its marker (or from the EOI)
        # up to the next row's first replaced interval, or to the end.
        stop = starts[row_first + per_row] if r + 1 < r0 + rows else len(view)
        pieces.append(view[starts[row_last + 1] : stop])
    return b"".join(pieces)


Patch = np.ndarray | Callable[[np.ndarray], object]


def _write_patch(dst: np.ndarray, rect: Rect, patch: Patch) -> None:
    """``patch`` is the pixels, or a function that draws them into ``dst`` (the rect's view) in place."""
    if callable(patch):
        patch(dst)
        return
    rx1, ry1, rx2, ry2 = rect
    if patch.shape != (ry2 - ry1, rx2 - rx1, 3):
        raise ValueError(f"patch: expected {(ry2 - ry1, rx2 - rx1, 3)} for rect {rect}, got {patch.shape}")
    dst[...] = patch


def _box_pixels(frame: np.ndarray, box: Box, rect: Rect, patch: Patch) -> np.ndarray:
    x0, y0, x1, y1 = box
    rx1, ry1, rx2, ry2 = rect
    pixels = frame[y0:y1, x0:x1].copy()
    _write_patch(pixels[ry1 - y0 : ry2 - y0, rx1 - x0 : rx2 - x0], rect, patch)
    return pixels


def splice_composite(background: SplicedBackground, frame: np.ndarray, rect: Rect, patch: Patch) -> bytes:
    """The JPEG of ``frame`` with ``patch`` written over ``rect``, by splicing; ``frame`` is never written.

    ``frame`` is the background ``background`` was built from (only its shape is checked), ``rect`` is
    (x1, y1, x2, y2) and ``patch`` the (y2 - y1, x2 - x1, 3) uint8 pixels that go there, or a function that
    draws them into the view it is given (so they are made straight in the box, with no copy). Only the tile
    box's pixels are copied. Raises SpliceFallback when splicing does not apply.
    """
    g = background.geometry
    if frame.shape != (g.height, g.width, 3):
        raise ValueError(f"frame: expected {(g.height, g.width, 3)} like the background, got {frame.shape}")
    box = g.tile_box(rect)
    if box == (0, 0, g.width, g.height):
        raise SpliceFallback(FallbackReason.WHOLE_FRAME)  # before copying the whole frame as the "box"
    return splice(background, box, _box_pixels(frame, box, rect, patch))


def encode_composite(
    background: SplicedBackground, frame: np.ndarray, rect: Rect, patch: Patch
) -> tuple[bytes, FallbackReason | None]:
    """``splice_composite``, or the whole composited frame encoded with restarts when splicing does not apply.

    Either way the bytes equal ``encode_with_restarts`` of the composited frame; the reason is None when
    spliced, so the caller can count fallbacks.
    """
    try:
        return splice_composite(background, frame, rect, patch), None
    except SpliceFallback as exc:
        x1, y1, x2, y2 = rect
        full = frame.copy()
        _write_patch(full[y1:y2, x1:x2], rect, patch)
        return encode_with_restarts(full, background.settings), exc.reason
