"""The background LRU cache: byte and per-avatar frame bounds, single-flight loads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from support import wait_until

from compositing_service.cache import BackgroundCache, CachedFrame

FRAME = np.zeros((10, 10, 3), np.uint8)  # 300 bytes


def loader(counter: list[int]):
    def load(index: int) -> np.ndarray:
        counter.append(index)
        return np.full_like(FRAME, index % 256)

    return load


def test_per_model_frame_bound_evicts_that_models_least_recent() -> None:
    cache = BackgroundCache(max_bytes=10**6, max_frames_per_model=3)
    loads: list[int] = []
    for i in (0, 1, 2):
        cache.get("a", i, loader(loads))
    cache.get("a", 0, loader(loads))  # 0 is now most recent
    cache.get("b", 0, loader(loads))
    cache.get("a", 3, loader(loads))  # evicts a/1
    assert sorted(cache.cached_indices("a")) == [0, 2, 3]
    assert cache.cached_indices("b") == [0]
    stats = cache.stats("a")
    assert (stats.hits, stats.misses, stats.frames, stats.evictions) == (1, 4, 3, 1)
    assert stats.bytes == 3 * FRAME.nbytes


def test_byte_bound_holds_across_models() -> None:
    cache = BackgroundCache(max_bytes=5 * FRAME.nbytes, max_frames_per_model=100)
    loads: list[int] = []
    for model in ("a", "b", "c"):
        for i in range(4):
            cache.get(model, i, loader(loads))
            assert cache.total_bytes <= 5 * FRAME.nbytes
    total = sum(cache.stats(m).frames for m in "abc")
    assert total == 5 and cache.total_bytes == 5 * FRAME.nbytes
    assert sum(cache.stats(m).bytes for m in "abc") == cache.total_bytes


def test_concurrent_misses_for_one_frame_load_it_once() -> None:
    cache = BackgroundCache(max_bytes=10**6, max_frames_per_model=10)
    loads: list[int] = []
    results = []
    barrier = threading.Barrier(8)

    def overlapping_load(index: int) -> np.ndarray:
        # The load lasts until all 8 requests have missed (the other 7 are then waiting for it): they overlap
        # for sure, however the threads are scheduled.
        loads.append(index)
        assert wait_until(lambda: cache.stats("a").misses == 8, timeout=30, interval=0.005)
        return np.full_like(FRAME, index % 256)

    def request() -> None:
        barrier.wait()
        results.append(cache.fetch("a", 7, overlapping_load))

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    assert loads == [7]
    assert all(frame is results[0][0] for frame, _ in results)
    assert not any(hit for _, hit in results)  # every one missed, and only one of them loaded


def test_cached_frames_are_read_only_and_failures_are_not_cached() -> None:
    cache = BackgroundCache(max_bytes=10**6, max_frames_per_model=10)
    cached = cache.get("a", 1, lambda i: CachedFrame.build(np.full((40, 40, 3), 9, np.uint8), (2, 2, 30, 30)))
    for array in (cached.frame, cached.crop):  # shared by every request: nobody may draw on them
        with pytest.raises(ValueError):
            array[0, 0, 0] = 1
    assert cached.crop.shape == (328, 328, 3)

    def broken(index: int) -> np.ndarray:
        raise OSError("disk gone")

    with pytest.raises(OSError):
        cache.get("a", 2, broken)
    assert cache.get("a", 2, loader([])) is not None


def test_drop_forgets_an_avatar() -> None:
    cache = BackgroundCache(max_bytes=10**6, max_frames_per_model=10)
    for i in range(3):
        cache.get("a", i, loader([]))
    cache.get("b", 0, loader([]))
    cache.drop("a")
    assert cache.cached_indices("a") == [] and cache.total_bytes == FRAME.nbytes
