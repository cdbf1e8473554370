"""Channels to a service: plain text or TLS (optionally with a client certificate), sync or asyncio.

Every caller of the API uses these: the client library, the gateway, and the compositing service on its hop to
inference. A certificate or key that cannot be read fails with the config key or option that named it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsError(ValueError):
    """A certificate or key that cannot be read; the message names the config key."""


@dataclass(frozen=True)
class ClientTls:
    ca_file: Path | None = None  # None: the system's roots
    cert_file: Path | None = None  # a client certificate for mutual TLS
    key_file: Path | None = None
    server_name: str = ""  # overrides the name checked in the server's certificate


def read_pem(path: Path, key: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{key}: cannot read {path} ({exc.strerror})") from None
    if b"-----BEGIN" not in data:
        raise TlsError(f"{key}: {path} is not a PEM file")
    return data


def channel_credentials(tls: ClientTls, prefix: str = "tls") -> grpc.ChannelCredentials:
    roots = read_pem(tls.ca_file, f"{prefix}.ca_file") if tls.ca_file else None
    if (tls.cert_file is None) != (tls.key_file is None):
        raise TlsError(f"{prefix}.cert_file and {prefix}.key_file: give both for mutual TLS, or neither")
    key = read_pem(tls.key_file, f"{prefix}.key_file") if tls.key_file else None
    cert = read_pem(tls.cert_file, f"{prefix}.cert_file") if tls.cert_file else None
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert)


def channel_options(tls: ClientTls | None) -> list[tuple[str, str]]:
    """The name override that lets a client reach a server by IP while checking the certificate's name."""
    if tls is not None and tls.server_name:
        return [("grpc.ssl_target_name_override", tls.server_name)]
    return []


def aio_channel(target: str, tls: ClientTls | None, options: list[tuple[str, object]]) -> grpc.aio.Channel:
    """An asyncio channel: TLS when ``tls`` is given, plain text otherwise (the caller checked it was configured)."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=[*options, *channel_options(tls)])


def sync_channel(target: str, tls: ClientTls | None, options: list[tuple[str, object]]) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, channel_credentials(tls), options=[*options, *channel_options(tls)])
