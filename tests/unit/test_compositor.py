"""The compositor's JPEG paths: spliced, whole when splicing cannot apply (counted), and splicing off."""

from __future__ import annotations

import asyncio

import cv2
import numpy as np

from compositing_service.cache import BackgroundCache, CachedFrame
from compositing_service.compositor import Compositor, Prepared
from compositing_service.geometry import paste_back
from compositing_service.jpeg_splice import SpliceSettings, encode_with_restarts
from lipsync_protocol.geometry import DEFAULT


def prepared(cache: BackgroundCache, frame: np.ndarray, rect, index: int) -> Prepared:
    cached = cache.get("m", index, lambda _: CachedFrame.build(frame, rect))

    def encoded(quality: int):
        return cache.encoded("m", index, cached, SpliceSettings(quality))

    return Prepared(cached, rect, DEFAULT, True, encoded)


def test_spliced_whole_frame_fallback_and_disabled() -> None:
    rng = np.random.default_rng(3)
    big = cv2.GaussianBlur(rng.integers(0, 256, (360, 640, 3), np.uint8), (5, 5), 0)
    small = big[:64, :96].copy()
    cache = BackgroundCache(64 << 20, 100)
    items = [prepared(cache, big, (200, 100, 380, 280), 0), prepared(cache, small, (0, 0, 96, 64), 1)]
    mouths = rng.integers(0, 256, (2, 3, 320, 320), np.uint8)
    loop = asyncio.new_event_loop()
    compositor = Compositor(2, "jpeg", 80)
    try:
        jpegs, _, spliced = loop.run_until_complete(compositor.composite(items, mouths))
        assert spliced == 1
        assert compositor.counts.spliced == 1 and compositor.counts.full == 1
        assert compositor.counts.fallbacks == {"whole_frame": 1}  # the rect covers every tile of the small frame
        for item, mouth, data in zip(items, mouths, jpegs, strict=True):
            full = item.frame.copy()
            paste_back(full, item.rect, item.cached.crop, mouth)
            assert data == encode_with_restarts(full, SpliceSettings(80))
        assert cache.stats("m").encoded_bytes > 0
        _png, _, spliced = loop.run_until_complete(compositor.composite(items, mouths, "png"))
        assert spliced == 0 and compositor.counts.full == 1  # PNG is not counted as JPEG
    finally:
        compositor.close()
    off = Compositor(1, "jpeg", 80, splicing=False)
    try:
        jpegs, _, spliced = loop.run_until_complete(off.composite(items, mouths))
        assert spliced == 0 and off.counts.fallbacks == {"disabled": 2}
        assert b"\xff\xdd" not in jpegs[0][:600]  # no DRI: the plain encode
    finally:
        off.close()
        loop.close()


def test_encodes_leave_with_their_frame() -> None:
    frame = np.full((48, 64, 3), 120, np.uint8)
    size = CachedFrame.build(frame, (0, 0, 8, 8)).nbytes
    cache = BackgroundCache(size * 2, 2)  # room for two frames
    for index in range(2):
        cached = cache.get("m", index, lambda _: CachedFrame.build(frame.copy(), (0, 0, 8, 8)))
        cache.encoded("m", index, cached, SpliceSettings(75))
        cache.encoded("m", index, cached, SpliceSettings(90))
    assert cache.stats("m").encoded_bytes > 0
    before = cache.stats("m").encoded_bytes
    cache.get("m", 2, lambda _: CachedFrame.build(frame.copy(), (0, 0, 8, 8)))  # evicts frame 0 and its encodes
    assert 0 < cache.stats("m").encoded_bytes < before
    cache.drop("m")
    assert cache.stats("m").encoded_bytes == 0
    # A frame that is not cached (too large) is encoded but not kept.
    tiny = BackgroundCache(10, 1)
    uncached = tiny.get("x", 0, lambda _: CachedFrame.build(frame.copy(), (0, 0, 8, 8)))
    assert tiny.encoded("x", 0, uncached, SpliceSettings(75)).geometry.width == 64
    assert tiny.stats("x").encoded_bytes == 0
