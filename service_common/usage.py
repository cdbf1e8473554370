"""Use counts of loaded things (models, avatars), and the eviction order both registries take from them.

Least frequently used first, then least recently used. Entries serving a
request (``in_flight > 0``) are never candidates, which is why neither
registry can hand eviction to cachetools' LFUCache: it evicts inside
``__setitem__`` without knowing what is busy.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar


@dataclass(kw_only=True)
class Usage:
    usage_count: int = 0
    total_frames: int = 0
    total_inference_ms: float = 0.0
    last_used_unix_ms: int = 0
    # Order of last use; wall-clock ms cannot order uses within one millisecond.
    last_use_seq: int = 0
    in_flight: int = 0

    @property
    def mean_inference_ms(self) -> float:
        return self.total_inference_ms / self.usage_count if self.usage_count else 0.0


U = TypeVar("U", bound=Usage)


class UsageClock:
    """Records uses under the owner's lock, numbering them so recency is total."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._seq = itertools.count(1)

    def release(self, entry: Usage, frames: int = 0, inference_ms: float = 0.0) -> None:
        with self._lock:
            entry.in_flight -= 1
            if frames:
                entry.usage_count += 1
                entry.total_frames += frames
                entry.total_inference_ms += inference_ms
                entry.last_used_unix_ms = int(time.time() * 1000)
                entry.last_use_seq = next(self._seq)


def lfu_order(entries: Iterable[U]) -> list[U]:
    """Idle entries, first to evict first."""
    return sorted((e for e in entries if e.in_flight == 0), key=lambda e: (e.usage_count, e.last_use_seq))
