"""The keys of how both services serve: TLS or explicit plain text, auth, metrics, logs, overload bounds."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from compositing_service.config import parse_config as parse_compositing
from inference_service.config import parse_config as parse_inference
from lipsync_protocol.channels import ClientTls, TlsError, channel_credentials, read_pem
from service_common.cli import overrides_from, parser_for
from service_common.config_source import ConfigError


def pems(tmp_path: Path) -> tuple[Path, Path, Path]:
    paths = []
    for name in ("cert.pem", "key.pem", "ca.pem"):
        path = tmp_path / name
        path.write_text(f"-----BEGIN {name}-----\nAAAA\n-----END {name}-----\n")
        paths.append(path)
    return paths[0], paths[1], paths[2]


def test_plain_text_must_be_asked_for_and_tls_files_must_exist(tmp_path: Path) -> None:
    root = {"models_root": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"^server\.tls: no TLS configured(?s:.*)\nplaintext: true\n"):
        parse_inference(dict(root), tmp_path)
    assert parse_inference({**root, "plaintext": True}, tmp_path).serving.plaintext  # the line the error shows
    cert, key, ca = pems(tmp_path)
    config = parse_inference({**root, "server": {"tls": {"cert_file": "cert.pem", "key_file": "key.pem"}}}, tmp_path)
    assert config.serving.tls is not None and config.serving.tls.cert_file == cert  # relative to the config's folder
    assert config.serving.tls.client_ca_file is None and not config.serving.plaintext
    # Top-level plain text covers the hops without TLS only: a configured certificate still wins.
    both = parse_inference(
        {**root, "plaintext": True, "server": {"tls": {"cert_file": "cert.pem", "key_file": "key.pem"}}}, tmp_path
    )
    assert both.serving.tls is not None and not both.serving.plaintext
    mutual = parse_inference(
        {**root, "server": {"tls": {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(ca)}}}
    )
    assert mutual.serving.tls is not None and mutual.serving.tls.client_ca_file == ca
    cases = [
        ({"tls": {"cert_file": "cert.pem"}}, r"server\.tls\.key_file: required"),
        ({"tls": {"cert_file": "nope.pem", "key_file": "key.pem"}}, r"server\.tls\.cert_file: .* is not a file"),
        ({"tls": {"cert_file": "cert.pem", "key_file": "key.pem", "ca": "x"}}, r"server\.tls\.ca: unknown key"),
        ({"tls": {"cert_file": "cert.pem", "key_file": "key.pem"}, "plaintext": True}, "conflicts"),
        ({"plaintext": "maybe"}, r"server\.plaintext: expected true or false"),
    ]
    for server, match in cases:
        with pytest.raises(ConfigError, match=match):
            parse_inference({**root, "server": server}, tmp_path)


def test_auth_metrics_logging_and_overload_keys(tmp_path: Path) -> None:
    base = {"models_root": str(tmp_path), "server": {"plaintext": True}}
    config = parse_inference(base, tmp_path)
    assert not config.serving.auth.enabled and not config.serving.metrics.enabled
    assert config.serving.metrics.port == 9091 and config.serving.log_format == "text"
    (tmp_path / "tokens.yaml").write_text("tokens: []\n")
    config = parse_inference(
        {
            **base,
            "auth": {"enabled": True, "tokens_file": "tokens.yaml", "requests_per_second": 3, "max_sessions": 2},
            "metrics": {"enabled": True, "port": 0, "host": "127.0.0.1"},
            "logging": {"format": "json", "requests": False},
            "server": {"plaintext": True, "max_inflight_requests": 3, "max_queued_requests": 0},
        },
        tmp_path,
    )
    serving = config.serving
    assert serving.auth.tokens_file == tmp_path / "tokens.yaml" and serving.auth.requests_per_second == 3
    assert (serving.metrics.enabled, serving.metrics.port, serving.metrics.host) == (True, 0, "127.0.0.1")
    assert serving.log_format == "json" and not serving.log_requests
    assert (serving.max_inflight_requests, serving.max_queued_requests) == (3, 0)
    for change, match in [
        ({"auth": {"enabled": True}}, r"auth\.enabled: true needs auth\.tokens_file or auth\.tokens_env"),
        ({"auth": {"enabled": True, "tokens_file": "missing.yaml"}}, r"auth\.tokens_file: .* is not a file"),
        ({"auth": {"token": "x"}}, r"auth\.token: unknown key"),
        ({"metrics": {"port": 70000}}, r"metrics\.port"),
        ({"logging": {"format": "xml"}}, r"logging\.format"),
        ({"server": {"plaintext": True, "max_inflight_requests": 0}}, r"server\.max_inflight_requests"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_inference({**base, **change}, tmp_path)


def test_the_hop_to_inference(models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {"models_root": str(models_dir), "server": {"plaintext": True}}
    with pytest.raises(ConfigError, match=r"^inference_server\.tls: no TLS configured"):
        parse_compositing(dict(raw), tmp_path)
    _cert, _key, ca = pems(tmp_path)
    config = parse_compositing(
        {**raw, "inference_server": {"tls": {"ca_file": "ca.pem", "server_name": "inf"}}}, tmp_path
    )
    assert config.inference_tls == ClientTls(ca, None, None, "inf")
    # In-process mode has no hop: nothing to configure.
    in_process = parse_compositing(
        {**raw, "inference": {"mode": "in_process", "config": str(models_dir / "inference.yaml")}}, tmp_path
    )
    assert in_process.inference_tls is None
    for remote, match in [
        ({"tls": {"ca_file": "ca.pem"}, "plaintext": True}, "conflicts"),
        ({"tls": {"cert_file": "cert.pem"}}, "give both"),
        ({"tls": {"ca_file": "missing.pem"}}, r"inference_server\.tls\.ca_file: .* is not a file"),
        ({"plaintext": True, "token_env": "NOT_SET_ANYWHERE_42"}, "NOT_SET_ANYWHERE_42 is empty or unset"),
        ({"plaintext": True, "token_file": "missing-token"}, r"inference_server\.token_file: cannot read"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_compositing({**raw, "inference_server": remote}, tmp_path)
    (tmp_path / "token").write_text("tok-123\n")
    config = parse_compositing({**raw, "inference_server": {"plaintext": True, "token_file": "token"}}, tmp_path)
    assert config.inference_token == "tok-123"
    monkeypatch.setenv("INF_TOKEN", "tok-env")
    config = parse_compositing({**raw, "inference_server": {"plaintext": True, "token_env": "INF_TOKEN"}}, tmp_path)
    assert config.inference_token == "tok-env"
    assert not config.serving.tls and config.serving.max_inflight_requests == 8


def test_cli_flags_become_overrides() -> None:
    parser = parser_for("x", None)
    args = parser.parse_args(["--metrics-port", "0", "--log-format", "json", "--port", "5"])
    assert overrides_from(args) == ["server.port=5", "metrics.enabled=true", "metrics.port=0", "logging.format=json"]
    assert (
        overrides_from(
            argparse.Namespace(set=[], models_root=None, port=None, host=None, metrics_port=None, log_format=None)
        )
        == []
    )


def test_pem_files_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(TlsError, match=r"x\.ca_file: .* is not a PEM file"):
        read_pem(bad, "x.ca_file")
    with pytest.raises(TlsError, match="cannot read"):
        read_pem(tmp_path / "missing.pem", "x.ca_file")
    cert, _, _ = pems(tmp_path)
    with pytest.raises(TlsError, match="give both"):
        channel_credentials(ClientTls(cert_file=cert))
