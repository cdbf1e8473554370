"""The config keys both servers share for how they serve: TLS, auth, metrics, logs, overload and shutdown.

Files named here (certificates, keys, the tokens file) are read relative to the config file's folder: they are
the deployment's secrets, not the models' files under ``models_root``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .auth import AuthConfig
from .config_source import ConfigError, Section
from .metrics import MetricsConfig
from .tls import ClientTls, ServerTls

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ServingConfig:
    tls: ServerTls | None = None
    plaintext: bool = False  # serving without TLS must be asked for
    auth: AuthConfig = field(default_factory=AuthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log_format: str = "text"
    log_requests: bool = True
    max_inflight_requests: int = 8  # heavy RPCs running at once on this replica
    max_queued_requests: int = 32  # and waiting for a slot; beyond: RESOURCE_EXHAUSTED
    max_concurrent_rpcs: int = 256  # gRPC's own hard bound on handlers (health checks included)
    shutdown_delay_s: float = 0.0  # NOT_SERVING this long before refusing calls (load balancers catch up)
    # A plain-text port with only grpc.health.v1 on it, for probes that cannot speak TLS (Kubernetes'). 0: none.
    health_port: int = 0


def file_under(base: Path, section: Section, name: str, *, required: bool = False) -> Path | None:
    value = section.str(name, None)
    if not value:
        if required:
            raise ConfigError(f"{section.key(name)}: required")
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(f"{section.key(name)}: {path} is not a file")
    return path


def parse_server_tls(server: Section, base: Path) -> ServerTls | None:
    tls = server.section("tls")
    if not tls.data:
        return None
    for key in tls.unknown_keys(["cert_file", "key_file", "client_ca_file"]):
        raise ConfigError(f"{key}: unknown key (expected cert_file, key_file, client_ca_file)")
    cert = file_under(base, tls, "cert_file", required=True)
    key = file_under(base, tls, "key_file", required=True)
    assert cert is not None and key is not None
    return ServerTls(cert, key, file_under(base, tls, "client_ca_file"))


def parse_client_tls(section: Section, base: Path) -> ClientTls | None:
    """``<section>.tls``: ca_file (default: system roots), cert_file + key_file (mutual TLS), server_name."""
    tls = section.section("tls")
    if not tls.data:
        return None
    for key in tls.unknown_keys(["ca_file", "cert_file", "key_file", "server_name", "enabled"]):
        raise ConfigError(f"{key}: unknown key (expected ca_file, cert_file, key_file, server_name)")
    if not tls.bool("enabled", True):
        return None
    cert = file_under(base, tls, "cert_file")
    key = file_under(base, tls, "key_file")
    if (cert is None) != (key is None):
        raise ConfigError(f"{tls.key('cert_file')} and {tls.key('key_file')}: give both for mutual TLS, or neither")
    return ClientTls(file_under(base, tls, "ca_file"), cert, key, tls.str("server_name", "") or "")


TLS_KEYS = {
    "server": "server.tls.cert_file and server.tls.key_file",
    "inference_server": "inference_server.tls.ca_file (with cert_file and key_file for mutual TLS)",
}


def plaintext_default(root: Section) -> bool:
    """Top-level ``plaintext: true``: every hop of this service without TLS configured runs plain text."""
    return root.bool("plaintext", False)


def needs_plaintext(section: Section, root: Section) -> bool:
    """Neither TLS nor plain text chosen for this hop."""
    return not section.data.get("tls") and not section.bool("plaintext", plaintext_default(root))


def plaintext_error(sections: tuple[str, ...]) -> ConfigError:
    """Plain text must be asked for (a security decision); the error shows the exact line that asks for it."""
    keys = ", ".join(f"{name}.plaintext: true" for name in sections)
    tls = " and ".join(TLS_KEYS[name] for name in sections)
    return ConfigError(
        f"{sections[0]}.tls: no TLS configured, and plain text must be asked for. To run without TLS as the Go "
        "system did, add this line at the top level of the config file:\n"
        "plaintext: true\n"
        f"(or, hop by hop, {keys}); for TLS, set {tls} (see docs/operations.md)"
    )


def parse_serving(
    root: Section,
    base: Path,
    host: str,
    default_metrics_port: int,
    *,
    required: bool = True,
    default_inflight: int = 8,
    default_queued: int = 32,
    plaintext_also: tuple[str, ...] = (),
) -> ServingConfig:
    """``required=False``: a config read by an engine that listens nowhere (TLS or plain text need not be set).
    ``plaintext_also``: other sections that lack TLS too, named in the same error so one edit fixes the file."""
    server = root.section("server")
    tls = parse_server_tls(server, base)
    if tls is not None and server.bool("plaintext", False):
        raise ConfigError("server.plaintext: true conflicts with server.tls; choose one")
    plaintext = tls is None and server.bool("plaintext", plaintext_default(root))
    if tls is None and not plaintext and required:
        raise plaintext_error(("server", *plaintext_also))

    auth_section = root.section("auth")
    for key in auth_section.unknown_keys(
        ["enabled", "tokens_file", "tokens_env", "requests_per_second", "burst", "max_sessions"]
    ):
        raise ConfigError(f"{key}: unknown key")
    enabled = auth_section.bool("enabled", False)
    auth = AuthConfig(
        enabled=enabled,
        tokens_file=file_under(base, auth_section, "tokens_file") if enabled else None,
        tokens_env=auth_section.str("tokens_env", "") or "",
        requests_per_second=auth_section.float("requests_per_second", 0.0, minimum=0.0),
        burst=auth_section.int("burst", 0, minimum=0),
        max_sessions=auth_section.int("max_sessions", 0, minimum=0),
    )
    if auth.enabled and auth.tokens_file is None and not auth.tokens_env:
        raise ConfigError("auth.enabled: true needs auth.tokens_file or auth.tokens_env")

    metrics_section = root.section("metrics")
    metrics = MetricsConfig(
        enabled=metrics_section.bool("enabled", False),
        host=metrics_section.str("host", host) or host,
        port=metrics_section.int("port", default_metrics_port, minimum=0, maximum=65535),
    )
    logging_section = root.section("logging")
    return ServingConfig(
        tls=tls,
        plaintext=plaintext,
        auth=auth,
        metrics=metrics,
        log_format=logging_section.str("format", "text", choices=["text", "json"]) or "text",
        log_requests=logging_section.bool("requests", True),
        max_inflight_requests=server.int("max_inflight_requests", default_inflight, minimum=1, maximum=10_000),
        max_queued_requests=server.int("max_queued_requests", default_queued, minimum=0, maximum=100_000),
        max_concurrent_rpcs=server.int("max_concurrent_rpcs", 256, minimum=8, maximum=100_000),
        shutdown_delay_s=server.float("shutdown_delay_seconds", 0.0, minimum=0.0),
        health_port=server.int("health_port", 0, minimum=0, maximum=65535),
    )
