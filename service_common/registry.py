"""Loaded things by id (models, avatars): one load at a time, least-frequently-used eviction, checkouts.

Both services keep what they load in one of these: the inference service its models, the compositing service
its avatars. The lifecycle is the same: a load builds the entry off the lock, then makes room by evicting idle
entries (least frequently used first, then least recently used; ``service_common.usage``), and replaces an older
entry of the same id; a request checks an entry out (loading it when missing) and releases it with its use, and an
entry serving requests is never evicted. What differs is what a load builds, what counts against capacity, and
what leaving means (a subclass's ``_fits``, ``_size`` and ``_removed``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from lipsync_protocol.errors import NotFound, ResourceExhausted

from .metrics import NullEvents
from .usage import Usage, UsageClock, lfu_order

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Loaded(Usage):
    """What every entry has: its use counts, and when and how long its load took (set by the registry)."""

    loaded_unix_ms: int = 0
    load_time_ms: float = 0.0

    @property
    def key(self) -> str:
        raise NotImplementedError


class RegistryEvents(Protocol):
    """Who hears of loads and evictions (the service's metrics; NullEvents when nobody listens)."""

    def model_loaded(self, model_id: str, seconds: float) -> None: ...
    def model_load_failed(self, model_id: str) -> None: ...
    def model_evicted(self, model_id: str) -> None: ...


E = TypeVar("E", bound=Loaded)
T = TypeVar("T")


class LfuRegistry(Generic[E]):
    noun = "entry"  # in messages: "model", "avatar"
    limit = ""  # the config key that bounds the count, for messages

    def __init__(self, events: RegistryEvents | None = None) -> None:
        self._entries: dict[str, E] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._usage = UsageClock(self._lock)
        self.evictions = 0
        self.events: RegistryEvents = events or NullEvents()

    # -- what a subclass says ------------------------------------------------------------------------------

    def _fits(self, remaining: list[E], new_size: int) -> bool:
        """Whether one more entry of ``new_size`` fits beside ``remaining`` (lock held)."""
        raise NotImplementedError

    def _size(self, entry: E) -> int:
        """What an entry counts against capacity beside its count (models: their bytes)."""
        return 0

    def _removed(self, entry: E, evicted: bool) -> None:
        """After an entry left (evicted, replaced or unloaded), outside the lock: drop what hangs on it."""

    # -- reading -------------------------------------------------------------------------------------------

    def get(self, key: str) -> E | None:
        with self._lock:
            return self._entries.get(key)

    def entries(self) -> list[E]:
        with self._lock:
            return list(self._entries.values())

    # -- loading -------------------------------------------------------------------------------------------

    def _load(
        self,
        key: str,
        create: Callable[[], E],
        *,
        force: bool = False,
        keep: Callable[[E], bool] = lambda entry: True,
        estimate: int = 0,
    ) -> tuple[E, bool, list[str]]:
        """(entry, whether this call built it, ids evicted for it). ``keep(current)`` says whether an entry
        already loaded serves this load; ``estimate`` is the new entry's size for failing before the build."""
        with self._load_lock:
            with self._lock:
                current = self._entries.get(key)
                if current is not None and not force and keep(current):
                    return current, False, []
                self._victims(key, estimate)  # no room at all: say so before the heavy part
            started = time.perf_counter()
            try:
                entry = create()
            except BaseException:
                self.events.model_load_failed(key)
                raise
            entry.load_time_ms = (time.perf_counter() - started) * 1000.0
            entry.loaded_unix_ms = int(time.time() * 1000)
            self.events.model_loaded(key, entry.load_time_ms / 1000.0)
            with self._lock:
                victims = self._victims(key, self._size(entry))
                for victim in victims:
                    del self._entries[victim.key]
                    self.evictions += 1
                previous = self._entries.pop(key, None)
                self._entries[key] = entry
            for victim in victims:
                self._removed(victim, evicted=True)
                self.events.model_evicted(victim.key)
                log.info("evicted %s %s (used %d times)", self.noun, victim.key, victim.usage_count)
            if previous is not None:
                self._removed(previous, evicted=False)
            return entry, True, [v.key for v in victims]

    def _victims(self, key: str, new_size: int) -> list[E]:
        """Idle entries to evict, least frequently used first, so that one more fits (lock held)."""
        others = [e for k, e in self._entries.items() if k != key]
        remaining = list(others)
        victims: list[E] = []
        for entry in lfu_order(others):
            if self._fits(remaining, new_size):
                break
            victims.append(entry)
            remaining.remove(entry)
        if not self._fits(remaining, new_size):
            raise ResourceExhausted(
                f"no room for another {self.noun}: {len(others)} loaded ({self.limit}) and every candidate for "
                "eviction is serving requests; retry later",
                retry_after_ms=500,
            )
        return victims

    def _unload(self, key: str) -> E:
        with self._load_lock:
            with self._lock:
                entry = self._entries.pop(key, None)
            if entry is None:
                raise NotFound(f"model_id: {self.noun} {key!r} is not loaded")
            self._removed(entry, evicted=False)
        log.info("unloaded %s %s", self.noun, key)
        return entry

    # -- use -----------------------------------------------------------------------------------------------

    def try_checkout(self, key: str) -> E | None:
        """Non-blocking: the loaded entry with its in-flight count raised, or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.in_flight += 1
            return entry

    def _checkout(self, key: str, load: Callable[[], T]) -> tuple[E, T | None]:
        """The entry for a request, loading it first if needed (blocking), and what the load said."""
        outcome: T | None = None
        for _ in range(3):
            entry = self.try_checkout(key)
            if entry is not None:
                return entry, outcome
            outcome = load()
        raise ResourceExhausted(
            f"model_id: {self.noun} {key!r} was evicted while loading; retry later", retry_after_ms=200
        )

    def release(self, entry: E, frames: int = 0, inference_ms: float = 0.0) -> None:
        self._usage.release(entry, frames, inference_ms)
