"""nginx in front of the compositing replicas: gRPC over HTTP/2 with upstream keepalive.

The same settings as deploy/nginx/nginx.conf (docker compose), rendered for
loopback ports and a private prefix directory so several clusters (and the
tests) can run side by side without root paths.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Sequence
from pathlib import Path

TEMPLATE = """\
# Rendered by lipsync-cluster; see deploy/nginx/nginx.conf for the container version.
{user_line}
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

# A reload's old workers finish their calls, then exit; a call still open after this long is cut.
worker_shutdown_timeout 60s;

events {{
    worker_connections 1024;
}}

http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    http2_recv_buffer_size 1m;

    upstream compositing {{
{servers}
        keepalive 32;
        keepalive_timeout 300s;
    }}

    server {{
        listen {host}:{port} http2;

        # The largest batch: 64 frames of old float32 visuals is ~160 MB; the service limit is what counts.
        client_max_body_size {max_body_mb}m;
        client_body_buffer_size 1m;
        http2_max_concurrent_streams 256;

        # Long batches on a slow device, and streaming sessions that stay open.
        grpc_connect_timeout 5s;
        grpc_send_timeout 600s;
        grpc_read_timeout 600s;
        grpc_buffer_size 1m;
        grpc_socket_keepalive on;

        # A replica that is down or refuses (UNAVAILABLE) is skipped for the next one.
        grpc_next_upstream error timeout non_idempotent;
        grpc_next_upstream_tries 3;

        location / {{
            grpc_pass grpc://compositing;
        }}

        # nginx's own 502/503/504 (a replica died with the call in flight, or none is up) as gRPC UNAVAILABLE in a
        # Trailers-Only answer, which gRPC clients retry; a plain 502 with a body commits the call before they see it.
        error_page 502 503 504 = @unavailable;
        location @unavailable {{
            default_type application/grpc;
            add_header grpc-status 14 always;
            add_header grpc-message "no compositing replica answered the call" always;
            return 204;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def install_hint() -> str:
    return "nginx is not installed: run `sudo apt-get install -y nginx-light` (Debian/Ubuntu)"


def render(prefix: Path, host: str, port: int, upstreams: Sequence[str], max_body_mb: int = 256) -> str:
    servers = "\n".join(f"        server {address} max_fails=1 fail_timeout=2s;" for address in upstreams)
    user_line = "user nobody nogroup;" if os.geteuid() == 0 else "# not root: workers run as the current user"
    return TEMPLATE.format(
        prefix=prefix, host=host, port=port, servers=servers, max_body_mb=max_body_mb, user_line=user_line
    )


def prepare_prefix(prefix: Path) -> None:
    """Temp folders nginx's workers can write (as root, workers run as nobody)."""
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        path = prefix / "tmp" / name
        path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        prefix.chmod(0o755)
        for path in [prefix / "tmp", *(prefix / "tmp").iterdir()]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)


def workers(master: int) -> list[int]:
    """The worker processes of the nginx master ``master`` (from /proc: children whose parent it is)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == master:
            found.append(int(stat.parent.name))
    return found


def command(binary: str, prefix: Path) -> list[str]:
    return [
        binary,
        "-p",
        str(prefix),
        "-c",
        str(prefix / "nginx.conf"),
        "-e",
        str(prefix / "error.log"),
        "-g",
        "daemon off;",
    ]
