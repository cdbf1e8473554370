"""The eviction order both registries use: least frequently used first, then least recently used.

Entries serving a request (``in_flight > 0``) are never candidates, which is
why neither registry can hand eviction to cachetools' LFUCache: it evicts
inside ``__setitem__`` without knowing what is busy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar


class Evictable(Protocol):
    usage_count: int
    last_use_seq: int
    in_flight: int


E = TypeVar("E", bound=Evictable)


def lfu_order(entries: Iterable[E]) -> list[E]:
    """Idle entries, first to evict first."""
    return sorted((e for e in entries if e.in_flight == 0), key=lambda e: (e.usage_count, e.last_use_seq))
