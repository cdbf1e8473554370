"""The config keys both servers share for how they serve: TLS, auth, metrics, logs, overload and shutdown.

Files named here (certificates, keys, the tokens file) are read relative to the config file's folder: they are
the deployment's secrets, not the models' files under ``models_root``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .auth import AuthConfig
from .config_schema import From, Key, Values, choice, flag, ignored, integer, number, path, text
from .config_source import LOG_LEVELS, ConfigError, parse_listen_address, to_log_level
from .metrics import MetricsConfig
from .tls import ClientTls, ServerTls

LOOPBACK = ("127.0.0.1", "::1", "localhost")

# The Go system's logging keys, found in either service's file; what replaces them.
GO_LOGGING_KEYS = (
    "log_gpu_utilization",
    "log_cache_stats",
    "buffered_logging",
    "sample_rate",
    "auto_flush",
    "flush_interval_ms",
)
LEVEL_WORDS = tuple(LOG_LEVELS)
GO_LOGGING = "each request gets a structured log line (logging.requests), and Prometheus metrics exist (metrics.*)"


def server_keys(port: int) -> tuple[Key, ...]:
    """``server.*`` keys both services read the same way; ``port`` is the service's default port."""
    return (
        Key(
            "server.port", "address", f":{port}", '":N", "host:N" or N; 0 picks a free port', parse=parse_listen_address
        ),
        text("server.host", None, "the listen address (overrides the host in server.port)", shown="`0.0.0.0`"),
        integer(
            "server.max_message_size_mb", 64, "gRPC send and receive limit (a float32 batch of 24 is 59 MB)", 1, 2047
        ),
        number("server.grace_seconds", 10.0, "on SIGTERM, time for calls in flight to finish", 0.0),
        flag("server.tune_malloc", True, "glibc malloc settings for large messages (docs/decisions/0004)"),
        number(
            "server.max_connection_age_seconds",
            0.0,
            "close client connections after this age (with as much grace), so clients re-resolve DNS and reach "
            "new pods; 0: unbounded",
            0.0,
        ),
    )


def serving_keys(metrics_port: int, max_inflight: int, max_queued: int, inflight_doc: str) -> tuple[Key, ...]:
    """The keys every server reads, with the service's own defaults (its metrics port and overload bounds)."""
    return (
        flag("plaintext", False, "every hop without TLS configured runs plain text (the one line a Go config needs)"),
        flag("server.plaintext", From("plaintext"), "serve without TLS; required when server.tls is not set"),
        path("server.tls.cert_file", "the server's certificate (PEM; relative to the config file)"),
        path("server.tls.key_file", "its private key (PEM); required with cert_file"),
        path("server.tls.client_ca_file", "with it, clients need a certificate this CA signed (mutual TLS)"),
        integer("server.health_port", 0, "a plain-text port with only grpc.health.v1 (for probes); 0: none", 0, 65535),
        integer("server.max_inflight_requests", max_inflight, inflight_doc, 1, 10_000),
        integer(
            "server.max_queued_requests", max_queued, "calls waiting for a slot; beyond: RESOURCE_EXHAUSTED", 0, 100_000
        ),
        integer("server.max_concurrent_rpcs", 256, "gRPC's hard bound on handlers of any kind", 8, 100_000),
        number("server.shutdown_delay_seconds", 0.0, "on SIGTERM, NOT_SERVING this long before refusing calls", 0.0),
        flag("auth.enabled", False, "require tokens (docs/operations.md); LoadModel/UnloadModel need an admin one"),
        path("auth.tokens_file", "the tokens file (relative to the config file; re-read when it changes)"),
        text("auth.tokens_env", "", 'an environment variable holding "name:token[:admin],..."'),
        number("auth.requests_per_second", 0.0, "rate limit of tokens that set none; 0: unlimited", 0.0),
        integer("auth.burst", 0, "burst of tokens that set none", 0),
        integer("auth.max_sessions", 0, "streaming sessions of tokens that set none; 0: unlimited", 0),
        flag("metrics.enabled", False, "serve Prometheus metrics (--metrics-port N sets this and the port)"),
        text("metrics.host", None, "the metrics listen address", shown="as `server.host`"),
        integer("metrics.port", metrics_port, "the metrics port; 0 picks a free one", 0, 65535),
        Key("logging.level", "choice", "INFO", "in any case", choices=LEVEL_WORDS, parse=to_log_level),
        choice("logging.format", "text", "text json", "json: one object per line"),
        flag("logging.requests", True, "one line per request with id, model, frames and stage timings"),
        *(ignored(f"logging.{name}", GO_LOGGING) for name in GO_LOGGING_KEYS),
    )


@dataclass(frozen=True)
class ServingConfig:
    tls: ServerTls | None
    plaintext: bool  # serving without TLS must be asked for
    auth: AuthConfig
    metrics: MetricsConfig
    log_format: str
    log_requests: bool
    max_inflight_requests: int  # heavy RPCs running at once on this replica
    max_queued_requests: int  # and waiting for a slot; beyond: RESOURCE_EXHAUSTED
    max_concurrent_rpcs: int  # gRPC's own hard bound on handlers (health checks included)
    shutdown_delay_s: float  # NOT_SERVING this long before refusing calls (load balancers catch up)
    # A plain-text port with only grpc.health.v1 on it, for probes that cannot speak TLS (Kubernetes'). 0: none.
    health_port: int


def file_under(base: Path, values: Values, name: str, *, required: bool = False) -> Path | None:
    value = values[name]
    if not value:
        if required:
            raise ConfigError(f"{values.key(name)}: required")
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(f"{values.key(name)}: {path} is not a file")
    return path


def parse_server_tls(values: Values, base: Path) -> ServerTls | None:
    if not values.given_under("server.tls"):
        return None
    cert = file_under(base, values, "server.tls.cert_file", required=True)
    key = file_under(base, values, "server.tls.key_file", required=True)
    assert cert is not None and key is not None
    return ServerTls(cert, key, file_under(base, values, "server.tls.client_ca_file"))


def parse_client_tls(values: Values, section: str, base: Path) -> ClientTls | None:
    """``<section>.tls``: ca_file (default: system roots), cert_file + key_file (mutual TLS), server_name."""
    tls = f"{section}.tls"
    if not values.given_under(tls) or not values[f"{tls}.enabled"]:
        return None
    cert = file_under(base, values, f"{tls}.cert_file")
    key = file_under(base, values, f"{tls}.key_file")
    if (cert is None) != (key is None):
        raise ConfigError(f"{tls}.cert_file and {tls}.key_file: give both for mutual TLS, or neither")
    return ClientTls(file_under(base, values, f"{tls}.ca_file"), cert, key, values[f"{tls}.server_name"] or "")


TLS_KEYS = {
    "server": "server.tls.cert_file and server.tls.key_file",
    "inference_server": "inference_server.tls.ca_file (with cert_file and key_file for mutual TLS)",
}


def needs_plaintext(values: Values, section: str) -> bool:
    """Neither TLS nor plain text chosen for this hop (``<section>.plaintext`` defaults to ``plaintext``)."""
    return not values.given_under(f"{section}.tls") and not values[f"{section}.plaintext"]


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


def parse_auth(values: Values, base: Path) -> AuthConfig:
    enabled = values["auth.enabled"]
    auth = AuthConfig(
        enabled=enabled,
        tokens_file=file_under(base, values, "auth.tokens_file") if enabled else None,
        tokens_env=values["auth.tokens_env"] or "",
        requests_per_second=values["auth.requests_per_second"],
        burst=values["auth.burst"],
        max_sessions=values["auth.max_sessions"],
    )
    if auth.enabled and auth.tokens_file is None and not auth.tokens_env:
        raise ConfigError("auth.enabled: true needs auth.tokens_file or auth.tokens_env")
    return auth


def parse_serving(
    values: Values, base: Path, host: str, *, required: bool = True, plaintext_also: tuple[str, ...] = ()
) -> ServingConfig:
    """``required=False``: a config read by an engine that listens nowhere (TLS or plain text need not be set).
    ``plaintext_also``: other sections that lack TLS too, named in the same error so one edit fixes the file."""
    tls = parse_server_tls(values, base)
    if tls is not None and values.given("server.plaintext") and values["server.plaintext"]:
        raise ConfigError("server.plaintext: true conflicts with server.tls; choose one")
    plaintext = tls is None and values["server.plaintext"]
    if tls is None and not plaintext and required:
        raise plaintext_error(("server", *plaintext_also))
    metrics = MetricsConfig(
        enabled=values["metrics.enabled"], host=values["metrics.host"] or host, port=values["metrics.port"]
    )
    return ServingConfig(
        tls=tls,
        plaintext=plaintext,
        auth=parse_auth(values, base),
        metrics=metrics,
        log_format=values["logging.format"],
        log_requests=values["logging.requests"],
        max_inflight_requests=values["server.max_inflight_requests"],
        max_queued_requests=values["server.max_queued_requests"],
        max_concurrent_rpcs=values["server.max_concurrent_rpcs"],
        shutdown_delay_s=values["server.shutdown_delay_seconds"],
        health_port=values["server.health_port"],
    )
