"""Server TLS: credentials for a service's port, optionally requiring client certificates (the channel side is
lipsync_protocol.channels).

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

from lipsync_protocol.channels import ClientTls, TlsError, read_pem

log = logging.getLogger(__name__)

__all__ = ["ClientTls", "ServerTls", "TlsError", "read_pem", "server_credentials"]


@dataclass(frozen=True)
class ServerTls:
    cert_file: Path
    key_file: Path
    # With a CA file, clients must present a certificate it signed (mutual TLS).
    client_ca_file: Path | None = None


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
