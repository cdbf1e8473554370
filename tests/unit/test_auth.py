"""Tokens (file, environment, hashes, reload), rate buckets and session counts."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import yaml

from lipsync_protocol.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from service_common import auth
from service_common.auth import AuthConfig, Limits, Principal, TokenBucket, TokenStore, bearer_token


def write_tokens(path: Path, tokens: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"tokens": tokens}))
    return path


def test_file_tokens_plain_and_hashed_with_defaults(tmp_path: Path) -> None:
    path = write_tokens(
        tmp_path / "t.yaml",
        [
            {"name": "a", "token": "plain-secret"},
            {"name": "b", "token_sha256": hashlib.sha256(b"hashed-secret").hexdigest(), "admin": True, "burst": 3},
        ],
    )
    store = TokenStore(AuthConfig(enabled=True, tokens_file=path, requests_per_second=2.5, max_sessions=4))
    a = store.authenticate("plain-secret")
    assert a == Principal("a", False, 2.5, 0, 4)
    b = store.authenticate("hashed-secret")
    assert b.name == "b" and b.admin and b.burst == 3
    for wrong in ("", None, "plain-secreT", "plain-secret ", "x" * 1000):
        with pytest.raises(Unauthenticated):
            store.authenticate(wrong)


def test_environment_tokens(tmp_path: Path) -> None:
    config = AuthConfig(enabled=True, tokens_env="T", environ={"T": "svc:s3cr3t, ops:root-pw:admin"})
    store = TokenStore(config)
    assert store.authenticate("s3cr3t").name == "svc" and store.authenticate("root-pw").admin
    for bad in ("nocolon", "a:b:root", ":tok"):
        with pytest.raises(ValueError, match="T: entry 0"):
            TokenStore(AuthConfig(enabled=True, tokens_env="T", environ={"T": bad}))
    with pytest.raises(ValueError, match="empty or unset"):
        TokenStore(AuthConfig(enabled=True, tokens_env="T", environ={}))


@pytest.mark.parametrize(
    "content, match",
    [
        ("tokens: 3", "must hold 'tokens:'"),
        ("[1, 2]", "must hold 'tokens:'"),
        ("tokens: [{token: x}]", r"tokens\[0\].name: required"),
        ("tokens: [{name: a}]", "token or token_sha256 required"),
        ("tokens: [{name: a, token_sha256: abc}]", "64 hex digits"),
        ("tokens: [{name: a, token: x, requests_per_second: fast}]", "must be numbers"),
        ("tokens: [{name: a, token: x, max_sessions: -1}]", ">= 0"),
        ("tokens: [unclosed", "not valid YAML"),
        ("tokens: []", "no tokens"),
    ],
)
def test_bad_token_files_say_what_is_wrong(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        TokenStore(AuthConfig(enabled=True, tokens_file=path))


def test_tokens_file_is_reloaded_and_a_broken_edit_keeps_the_old_tokens(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = write_tokens(tmp_path / "t.yaml", [{"name": "old", "token": "one"}])
    store = TokenStore(AuthConfig(enabled=True, tokens_file=path))
    assert store.authenticate("one").name == "old"
    write_tokens(path, [{"name": "new", "token": "two"}])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert store.authenticate("two").name == "new"
    with pytest.raises(Unauthenticated):
        store.authenticate("one")  # revoked
    path.write_text("tokens: [broken")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert store.authenticate("two").name == "new"


def test_bearer_header_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x", "y"), ("authorization", b"bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([]) is None and bearer_token(None) is None


def test_token_bucket_allows_bursts_then_the_rate(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take()
    assert wait == pytest.approx(0.5)
    now[0] += 0.5
    assert bucket.take() == 0.0 and bucket.take() > 0


def test_limits_rate_sessions_and_admin() -> None:
    limits = Limits()
    alice = Principal("alice", requests_per_second=1.0, burst=1, max_sessions=2)
    limits.check_rate(alice)
    with pytest.raises(ResourceExhausted, match="rate limit") as err:
        limits.check_rate(alice)
    assert 0 < err.value.retry_after_ms <= 1000
    limits.check_rate(Principal("unlimited"))  # rate 0: no bucket at all
    limits.open_session(alice)
    limits.open_session(alice)
    with pytest.raises(ResourceExhausted, match="sessions: token 'alice'"):
        limits.open_session(alice)
    limits.close_session(alice)
    assert limits.sessions("alice") == 1
    limits.open_session(alice)
    with pytest.raises(PermissionDenied, match="LoadModel: needs an admin token"):
        auth.require_admin(alice, "LoadModel")
    auth.require_admin(Principal("ops", admin=True), "LoadModel")
    auth.require_admin(None, "LoadModel")  # auth disabled
