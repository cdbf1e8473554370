"""TLS for both hops: server credentials (optionally requiring client certificates) and channel credentials.

Server certificates are re-read when their files change (checked at each new connection's handshake), so a
rotated certificate (cert-manager, a renewed Let's Encrypt pair) takes effect without a restart; a pair that
fails to load keeps the previous one serving and is logged.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class TlsError(ValueError):
    """A certificate or key that cannot be read; the message names the config key."""


@dataclass(frozen=True)
class ServerTls:
    cert_file: Path
    key_file: Path
    # With a CA file, clients must present a certificate it signed (mutual TLS).
    client_ca_file: Path | None = None


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


class _CertificateReloader:
    """grpc's dynamic credentials fetcher: a new configuration when the files' mtimes change."""

    def __init__(self, tls: ServerTls, prefix: str) -> None:
        self.tls = tls
        self.prefix = prefix
        self._lock = threading.Lock()
        self._stamp = self._mtimes()

    def _mtimes(self) -> tuple[float, ...]:
        files = [self.tls.cert_file, self.tls.key_file, *([self.tls.client_ca_file] if self.tls.client_ca_file else [])]
        try:
            return tuple(f.stat().st_mtime_ns for f in files)
        except OSError:
            return ()

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = (
            read_pem(self.tls.key_file, f"{self.prefix}.key_file"),
            read_pem(self.tls.cert_file, f"{self.prefix}.cert_file"),
        )
        roots = read_pem(self.tls.client_ca_file, f"{self.prefix}.client_ca_file") if self.tls.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            stamp = self._mtimes()
            if not stamp or stamp == self._stamp:
                return None  # unchanged (or mid-rotation): keep serving the current pair
            try:
                config = self.configuration()
            except TlsError as exc:
                log.error("TLS files changed but cannot be loaded, keeping the previous certificate: %s", exc)
                return None
            self._stamp = stamp
            log.info("TLS certificate reloaded from %s", self.tls.cert_file)
            return config


def server_credentials(tls: ServerTls, prefix: str = "server.tls") -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port``; reads (and so checks) the files now, at start."""
    reloader = _CertificateReloader(tls, prefix)
    return grpc.dynamic_ssl_server_credentials(
        reloader.configuration(),
        reloader,
        require_client_authentication=tls.client_ca_file is not None,
    )


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
