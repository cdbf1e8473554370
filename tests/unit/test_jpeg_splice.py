"""Spliced JPEG encoding against the full encode of the composited frame, on real pixels.

The backgrounds are noise over gradients, so the entropy-coded data has stuffed 0xFF bytes (FF 00) and the
frames have every RST0..RST7; the patches are noise too. Every background frame is read-only, as in the cache,
so any write to it would raise.
"""

from __future__ import annotations

import io
from functools import cache

import av
import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from compositing_service.geometry import encode_image
from compositing_service.jpeg_splice import (
    SUBSAMPLINGS,
    FallbackReason,
    SplicedBackground,
    SpliceFallback,
    SpliceGeometry,
    SpliceSettings,
    encode_composite,
    encode_with_restarts,
    splice,
    splice_composite,
    tile_box,
)

# (height, width): the two production sizes, sizes that are not multiples of 16 or 8 (1277 and 642 px give a
# prime number of 4:2:0 MCUs per row: 1 MCU per interval for 642), and small frames of one or a few MCUs.
FRAME_SIZES = [(720, 1280), (1080, 1920), (719, 1277), (361, 642), (45, 37), (9, 17), (7, 5), (1, 1)]
QUALITIES = [10, 75, 95]


@cache
def background_frame(height: int, width: int) -> np.ndarray:
    """Gradients in each channel plus noise: busy enough for FF 00 stuffing in every interval."""
    rng = np.random.default_rng(height * 10007 + width)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (3 * xx + 5 * yy) % 256], axis=-1)
    frame = np.clip(base + rng.integers(-60, 61, (height, width, 3)), 0, 255).astype(np.uint8)
    frame.flags.writeable = False
    return frame


@cache
def background(height: int, width: int, quality: int, subsampling: str) -> SplicedBackground:
    return SplicedBackground.from_frame(background_frame(height, width), SpliceSettings(quality, subsampling))


def random_patch(rect, seed: int) -> np.ndarray:
    x1, y1, x2, y2 = rect
    return np.random.default_rng(seed).integers(0, 256, (y2 - y1, x2 - x1, 3), dtype=np.uint8)


def composite(frame: np.ndarray, rect, patch: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = rect
    out = frame.copy()
    out[y1:y2, x1:x2] = patch
    return out


def spans(n: int) -> st.SearchStrategy[tuple[int, int]]:
    """(start, end) in [0, n]: 1 px, mouth-sized, any or the full length, at 0, at the far edge or anywhere."""

    @st.composite
    def span(draw) -> tuple[int, int]:
        length = min(n, draw(st.one_of(st.just(1), st.integers(150, 260), st.integers(1, n), st.just(n))))
        start = draw(st.one_of(st.just(0), st.just(n - length), st.integers(0, n - length)))
        return start, start + length

    return span()


@st.composite
def cases(draw):
    height, width = draw(st.sampled_from(FRAME_SIZES))
    x1, x2 = draw(spans(width))
    y1, y2 = draw(spans(height))
    return (
        height,
        width,
        draw(st.sampled_from(QUALITIES)),
        draw(st.sampled_from(SUBSAMPLINGS)),
        (x1, y1, x2, y2),
        draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_spliced_jpeg_is_byte_identical_to_the_full_encode(case) -> None:
    height, width, quality, subsampling, rect, seed = case
    bg = background(height, width, quality, subsampling)
    frame = background_frame(height, width)
    patch = random_patch(rect, seed)
    expected = encode_with_restarts(composite(frame, rect, patch), bg.settings)

    data, reason = encode_composite(bg, frame, rect, patch)

    assert data == expected
    box = tile_box(rect, bg)
    whole = box == (0, 0, width, height)
    assert reason == (FallbackReason.WHOLE_FRAME if whole else None)
    event(f"{width}x{height}")
    event("whole frame" if whole else "spliced")
    if not whole:
        x0, y0, x1, y1 = box
        event(f"box touches the right edge: {x1 == width}, the bottom edge: {y1 == height}")
        assert splice(bg, box, composite(frame, rect, patch)[y0:y1, x0:x1]) == expected


def test_the_texture_has_stuffing_and_every_restart_marker() -> None:
    bg = background(720, 1280, 75, "420")
    scan = bg.jpeg[len(bg.header) : -2]
    assert bg.geometry.intervals == 10 * 45
    assert all(bytes((0xFF, 0xD0 + i)) in scan for i in range(8))
    stuffed = [k for k in range(bg.geometry.intervals) if b"\xff\x00" in bg.segment(k)]
    assert len(stuffed) > bg.geometry.intervals * 0.9
    # And the segments with their markers are the scan.
    markers = [bytes((0xFF, 0xD0 + k % 8)) for k in range(bg.geometry.intervals - 1)] + [b""]
    rebuilt = b"".join(bg.segment(k) + m for k, m in enumerate(markers))
    assert bg.header + rebuilt + b"\xff\xd9" == bg.jpeg


def ffmpeg_planes(data: bytes) -> list[np.ndarray]:
    """FFmpeg's decode (PyAV, the mjpeg demuxer) as its raw Y, Cb, Cr planes: no colour conversion involved."""
    with av.open(io.BytesIO(data), format="mjpeg") as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 1
    planes = []
    for plane in frames[0].planes:
        rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
        planes.append(rows[:, : plane.width].copy())
    return planes


@pytest.mark.parametrize("subsampling", ["420", "422", "444"])
@pytest.mark.parametrize(("size", "rect"), [((720, 1280), (537, 301, 747, 511)), ((719, 1277), (1100, 530, 1277, 719))])
def test_decoders_read_the_spliced_jpeg_as_the_full_encode(size, rect, subsampling) -> None:
    height, width = size
    bg = background(height, width, 75, subsampling)
    frame = background_frame(height, width)
    x1, y1, x2, y2 = rect
    patch = np.full((y2 - y1, x2 - x1, 3), (40, 200, 90), np.uint8)  # smooth, to see it survive the JPEG
    data = splice_composite(bg, frame, rect, patch)
    full = composite(frame, rect, patch)
    with_restarts = encode_with_restarts(full, bg.settings)
    # What the service sends today: no restart markers, 4:2:0. Restart markers change no pixel.
    plain = encode_image(full, "jpeg", 75) if subsampling == "420" else None

    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (height, width, 3)
    np.testing.assert_array_equal(decoded, cv2.imdecode(np.frombuffer(with_restarts, np.uint8), cv2.IMREAD_COLOR))
    # It is the picture, not just any decodable bytes: the rect shows the patch (away from its ringing edges).
    assert np.abs(decoded[y1 + 16 : y2 - 16, x1 + 16 : x2 - 16].astype(int) - patch[16:-16, 16:-16]).mean() < 2
    planes = ffmpeg_planes(data)
    for got, want in zip(planes, ffmpeg_planes(with_restarts), strict=True):
        np.testing.assert_array_equal(got, want)
    if plain is not None:
        np.testing.assert_array_equal(decoded, cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_COLOR))
        for got, want in zip(planes, ffmpeg_planes(plain), strict=True):
            np.testing.assert_array_equal(got, want)


def test_restart_markers_make_the_file_slightly_larger() -> None:
    frame = background_frame(720, 1280)
    plain = encode_image(frame, "jpeg", 75)
    with_restarts = encode_with_restarts(frame, SpliceSettings(75))
    assert len(plain) < len(with_restarts) < len(plain) * 1.02


def test_a_box_over_the_whole_frame_falls_back() -> None:
    bg = background(720, 1280, 75, "420")
    frame = background_frame(720, 1280)
    rect = (5, 10, 1275, 715)  # inside the frame, but it touches every tile
    patch = random_patch(rect, 2)
    with pytest.raises(SpliceFallback) as info:
        splice_composite(bg, frame, rect, patch)
    assert info.value.reason is FallbackReason.WHOLE_FRAME
    with pytest.raises(SpliceFallback):
        splice(bg, (0, 0, 1280, 720), composite(frame, rect, patch))
    data, reason = encode_composite(bg, frame, rect, patch)
    assert reason is FallbackReason.WHOLE_FRAME
    assert data == encode_with_restarts(composite(frame, rect, patch), bg.settings)
    # A frame of one MCU is always whole.
    tiny = background(9, 17, 75, "420")
    assert tiny.geometry.intervals == 1
    one_px = (3, 3, 4, 4)
    assert encode_composite(tiny, background_frame(9, 17), one_px, random_patch(one_px, 3))[1] == "whole_frame"


def test_frames_other_than_bgr_uint8_are_unsupported() -> None:
    for frame in (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64, 3), np.uint16)):
        with pytest.raises(SpliceFallback) as info:
            SplicedBackground.from_frame(frame, SpliceSettings(75))
        assert info.value.reason is FallbackReason.UNSUPPORTED_FRAME


def test_a_background_jpeg_not_encoded_with_the_settings_is_refused() -> None:
    frame = background_frame(361, 642)
    settings_ = SpliceSettings(75)
    encode = [
        encode_image(frame, "jpeg", 75),  # no restart markers
        cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 75, cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
        encode_with_restarts(frame, SpliceSettings(75, "444")),  # other sampling (and interval)
        encode_with_restarts(frame, SpliceSettings(75))[:-2],  # truncated
        encode_with_restarts(frame, SpliceSettings(75))[:150],  # truncated in the header
        b"not a jpeg",
    ]
    for data in encode:
        with pytest.raises(SpliceFallback) as info:
            SplicedBackground(data, settings_)
        assert info.value.reason is FallbackReason.BACKGROUND_LAYOUT


def test_a_background_with_other_tables_falls_back_on_the_tile_header() -> None:
    # Same layout, other quality: the quantization tables differ, which only the box's encode shows.
    frame = background_frame(361, 642)
    bg = SplicedBackground(encode_with_restarts(frame, SpliceSettings(50)), SpliceSettings(75))
    rect = (100, 100, 310, 310)
    patch = random_patch(rect, 4)
    with pytest.raises(SpliceFallback) as info:
        splice_composite(bg, frame, rect, patch)
    assert info.value.reason is FallbackReason.TILE_HEADER
    data, reason = encode_composite(bg, frame, rect, patch)
    assert reason is FallbackReason.TILE_HEADER
    assert data == encode_with_restarts(composite(frame, rect, patch), SpliceSettings(75))


def test_restart_interval_divides_the_mcus_per_row() -> None:
    for subsampling in SUBSAMPLINGS:
        s = SpliceSettings(75, subsampling)
        mcu_w, _ = s.mcu_size
        for width in range(1, 2000):
            per_row = -(-width // mcu_w)
            assert per_row % s.restart_interval(width) == 0
    assert SpliceSettings(75).restart_interval(1280) == 8  # 128 px tiles
    assert SpliceSettings(75).restart_interval(1920) == 8
    assert SpliceSettings(75, "444").restart_interval(1280) == 16
    assert SpliceSettings(75).restart_interval(642) == 1  # 41 MCUs, a prime: 16 px beats 656 px
    assert SpliceSettings(75, tile_width=64).restart_interval(1280) == 4


def test_tile_box_aligns_and_clips() -> None:
    g = SpliceGeometry.for_frame(1277, 719, SpliceSettings(75))  # 4:2:0: 128x16 tiles, 80 MCUs per row
    assert (g.tile_width, g.tile_height, g.tile_cols, g.tile_rows) == (128, 16, 10, 45)
    assert g.tile_box((0, 0, 1, 1)) == (0, 0, 128, 16)
    assert g.tile_box((127, 15, 129, 17)) == (0, 0, 256, 32)
    assert g.tile_box((1276, 718, 1277, 719)) == (1152, 704, 1277, 719)  # the clipped corner tile
    assert g.tile_box((0, 300, 1277, 301)) == (0, 288, 1277, 304)
    assert g.tile_box((537, 301, 747, 511)) == (512, 288, 768, 512)
    assert g.tile_box((1, 1, 1276, 718)) == (0, 0, 1277, 719)
    for bad in [(0, 0, 0, 5), (5, 5, 4, 9), (-1, 0, 10, 10), (0, 0, 1278, 10), (0, 0, 10, 720)]:
        with pytest.raises(ValueError):
            g.tile_box(bad)


def test_splice_refuses_boxes_and_pixels_that_do_not_fit() -> None:
    bg = background(720, 1280, 75, "420")
    frame = background_frame(720, 1280)
    with pytest.raises(ValueError):
        splice(bg, (64, 0, 256, 16), frame[0:16, 64:256])  # not on a tile boundary
    with pytest.raises(ValueError):
        splice(bg, (0, 0, 128, 16), frame[0:16, 0:120])
    with pytest.raises(ValueError):
        splice_composite(bg, frame[:, :640], (0, 0, 10, 10), random_patch((0, 0, 10, 10), 5))
    with pytest.raises(ValueError):
        splice_composite(bg, frame, (0, 0, 10, 10), random_patch((0, 0, 11, 10), 5))


def test_the_cached_background_is_small() -> None:
    bg = background(1080, 1920, 75, "420")
    frame = background_frame(1080, 1920)
    # This noise is much harder to compress than video; it is still a seventh of the raw frame.
    assert bg.nbytes < frame.nbytes / 5
    assert bg.nbytes == len(bg.jpeg) + 4 * (bg.geometry.intervals + 1)  # the JPEG and one offset per interval


def test_settings_are_checked() -> None:
    for bad in [
        {"quality": 0},
        {"quality": 101},
        {"quality": 75, "subsampling": "410"},
        {"quality": 75, "tile_width": 0},
    ]:
        with pytest.raises(ValueError):
            SpliceSettings(**bad)
