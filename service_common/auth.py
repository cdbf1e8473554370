"""Token authentication, per-token rate limits and per-token session limits.

Clients send ``authorization: Bearer <token>`` in the call metadata. Tokens come from a YAML file (hashes or
plain values) and/or an environment variable; the presented token is hashed and compared with every known
digest in constant time (``hmac.compare_digest``, no early exit), so timing tells nothing about which token or
how much of it matched. The file is re-read when it changes, so tokens can be added or revoked without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lipsync_protocol.errors import PermissionDenied, ResourceExhausted, Unauthenticated

log = logging.getLogger(__name__)

RELOAD_CHECK_S = 2.0


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to, and what it may do."""

    name: str
    admin: bool = False
    requests_per_second: float = 0.0  # 0: unlimited
    burst: int = 0
    max_sessions: int = 0  # concurrent streaming sessions; 0: unlimited


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = False
    tokens_file: Path | None = None
    tokens_env: str = ""  # an environment variable holding "name:token[:admin],..."
    requests_per_second: float = 0.0  # defaults for tokens that set none
    burst: int = 0
    max_sessions: int = 0
    environ: Mapping[str, str] | None = field(default=None, compare=False)  # tests pass their own


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _principal(item: Any, where: str, defaults: AuthConfig) -> tuple[bytes, Principal]:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a mapping with name and token (or token_sha256)")
    name = str(item.get("name") or "").strip()
    if not name:
        raise ValueError(f"{where}.name: required")
    if item.get("token"):
        token_digest = digest(str(item["token"]))
    elif item.get("token_sha256"):
        try:
            token_digest = bytes.fromhex(str(item["token_sha256"]))
        except ValueError:
            token_digest = b""
        if len(token_digest) != 32:
            raise ValueError(f"{where}.token_sha256: expected 64 hex digits (sha256 of the token)")
    else:
        raise ValueError(f"{where}: token or token_sha256 required")
    try:
        rps = float(item.get("requests_per_second", defaults.requests_per_second))
        burst = int(item.get("burst", defaults.burst))
        sessions = int(item.get("max_sessions", defaults.max_sessions))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: requests_per_second, burst and max_sessions must be numbers") from None
    if rps < 0 or burst < 0 or sessions < 0:
        raise ValueError(f"{where}: requests_per_second, burst and max_sessions must be >= 0")
    return token_digest, Principal(name, bool(item.get("admin", False)), rps, burst, sessions)


def parse_tokens_file(path: Path, defaults: AuthConfig) -> list[tuple[bytes, Principal]]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"auth.tokens_file: cannot read {path} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"auth.tokens_file: {path} is not valid YAML ({exc})") from None
    items = (data or {}).get("tokens") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"auth.tokens_file: {path} must hold 'tokens:', a list of {{name, token, admin, ...}}")
    return [_principal(item, f"{path.name}: tokens[{i}]", defaults) for i, item in enumerate(items)]


def parse_tokens_env(value: str, variable: str, defaults: AuthConfig) -> list[tuple[bytes, Principal]]:
    """``name:token[:admin]`` entries separated by commas."""
    out = []
    for i, entry in enumerate(p.strip() for p in value.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1] or (len(parts) == 3 and parts[2] != "admin"):
            raise ValueError(f"{variable}: entry {i} must be name:token or name:token:admin")
        out.append(_principal({"name": parts[0], "token": parts[1], "admin": len(parts) == 3}, variable, defaults))
    return out


class TokenStore:
    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._env_entries: list[tuple[bytes, Principal]] = []
        if config.tokens_env:
            environ = os.environ if config.environ is None else config.environ
            value = environ.get(config.tokens_env, "")
            if not value:
                raise ValueError(f"auth.tokens_env: the environment variable {config.tokens_env} is empty or unset")
            self._env_entries = parse_tokens_env(value, config.tokens_env, config)
        self._file_entries: list[tuple[bytes, Principal]] = []
        self._file_stamp: int | None = None
        self._checked = 0.0
        if config.tokens_file is not None:
            self._file_entries = parse_tokens_file(config.tokens_file, config)
            self._file_stamp = self._stamp()
        if not self._env_entries and not self._file_entries:
            raise ValueError("auth: enabled but no tokens (set auth.tokens_file or auth.tokens_env)")

    def _stamp(self) -> int | None:
        assert self.config.tokens_file is not None
        try:
            return self.config.tokens_file.stat().st_mtime_ns
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        if self.config.tokens_file is None:
            return
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        stamp = self._stamp()
        if stamp is None or stamp == self._file_stamp:
            return
        try:
            entries = parse_tokens_file(self.config.tokens_file, self.config)
        except ValueError as exc:
            log.error("tokens file changed but is invalid, keeping the previous tokens: %s", exc)
            return
        self._file_entries, self._file_stamp = entries, stamp
        log.info("tokens reloaded from %s (%d tokens)", self.config.tokens_file, len(entries))

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthenticated("authorization: expected metadata 'authorization: Bearer <token>'")
        presented = digest(token)
        with self._lock:
            self._maybe_reload()
            entries = self._env_entries + self._file_entries
        found: Principal | None = None
        for known, principal in entries:  # every entry is compared: no early exit
            if hmac.compare_digest(known, presented) and found is None:
                found = principal
        if found is None:
            raise Unauthenticated("authorization: unknown token")
        return found


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class TokenBucket:
    """``rate`` requests per second with bursts of ``burst`` (at least 1)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.capacity = float(max(burst, 1, int(rate)))
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0.0 when a request may go now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Limits:
    """Per-principal request rate and concurrent sessions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self._sessions: dict[str, int] = {}

    def check_rate(self, principal: Principal) -> None:
        if principal.requests_per_second <= 0:
            return
        with self._lock:
            bucket = self._buckets.get(principal.name)
            if bucket is None or bucket.rate != principal.requests_per_second:
                bucket = self._buckets[principal.name] = TokenBucket(principal.requests_per_second, principal.burst)
            wait = bucket.take()
        if wait > 0:
            raise ResourceExhausted(
                f"rate limit: token {principal.name!r} is limited to {principal.requests_per_second:g} "
                "requests per second; retry later",
                retry_after_ms=max(1, int(wait * 1000)),
                reason="rate_limited",
            )

    def open_session(self, principal: Principal) -> None:
        with self._lock:
            open_now = self._sessions.get(principal.name, 0)
            if principal.max_sessions and open_now >= principal.max_sessions:
                raise ResourceExhausted(
                    f"sessions: token {principal.name!r} already has {open_now} open (its max_sessions); "
                    "close one or retry later",
                    retry_after_ms=1000,
                    reason="sessions",
                )
            self._sessions[principal.name] = open_now + 1

    def close_session(self, principal: Principal) -> None:
        with self._lock:
            self._sessions[principal.name] = max(0, self._sessions.get(principal.name, 1) - 1)

    def sessions(self, name: str) -> int:
        with self._lock:
            return self._sessions.get(name, 0)


def require_admin(principal: Principal | None, method: str) -> None:
    if principal is not None and not principal.admin:
        raise PermissionDenied(f"{method}: needs an admin token (token {principal.name!r} is not admin)")
