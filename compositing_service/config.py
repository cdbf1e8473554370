"""Compositing service configuration: the old system's YAML keys plus our additions.

Validated at start; an invalid value raises ConfigError naming its dotted key.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipsync_protocol.geometry import DEFAULT as DEFAULT_GEOMETRY
from lipsync_protocol.geometry import Geometry
from service_common.config_source import (
    ConfigError,
    Section,
    parse_geometry,
    parse_listen_address,
    parse_log_level,
    read_config,
    resolve_under,
    valid_model_id,
)
from service_common.serving_config import (
    ServingConfig,
    needs_plaintext,
    parse_client_tls,
    parse_serving,
    plaintext_default,
    plaintext_error,
)
from service_common.tls import ClientTls

log = logging.getLogger(__name__)

MIB = 1024 * 1024
FRAME_ORDERS = ("ping_pong", "loop")


@dataclass(frozen=True)
class AvatarConfig:
    model_id: str
    model_path: str  # as configured; the inference service resolves it
    inference_model: str  # the inference service's model id (default: the avatar's id)
    background: Path  # a folder of images or a video file
    crop_rects_path: Path
    num_frames: int = 0  # 0 = as many as there are
    preload_backgrounds: bool = False
    geometry: Geometry = DEFAULT_GEOMETRY  # how frames become the model's input and back


@dataclass(frozen=True)
class CompositingConfig:
    models_root: Path
    host: str = "0.0.0.0"
    port: int = 50052
    max_message_size_mb: int = 64
    max_batch_size: int = 64
    inference_targets: tuple[str, ...] = ("127.0.0.1:50051",)
    inference_timeout_s: float = 30.0
    inference_max_retries: int = 3
    inference_retry_backoff_s: float = 0.1
    inference_mode: str = "remote"
    inference_config: Path | None = None
    # --set style overrides for the in-process engine's config (the process environment is not applied to it)
    inference_overrides: tuple[str, ...] = ()
    warmup: bool = True
    max_models: int = 8
    background_cache_frames: int = 600
    background_cache_bytes: int = 2048 * MIB
    frames_cache_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "lipsync-frames")
    output_format: str = "jpeg"
    jpeg_quality: int = 75
    # Re-encode only the restart intervals under the mouth (jpeg_splice.py); the same bytes as a full encode
    # with restart markers. Off: the plain full-frame encode.
    jpeg_splicing: bool = True
    jpeg_subsampling: str = "420"
    jpeg_tile_width: int = 0  # pixels per restart interval; 0: fitted to each avatar's rectangles
    frame_order: str = "ping_pong"
    composite_threads: int = 0  # 0 = one per core
    models: Mapping[str, AvatarConfig] = field(default_factory=dict)
    log_inference_times: bool = False
    log_compositing_times: bool = False
    log_level: str = "INFO"
    grace_seconds: float = 10.0
    session_max_batch_frames: int = 8
    session_buffer_frames: int = 100
    session_max_audio_ahead_s: float = 10.0
    max_sessions: int = 32
    tune_malloc: bool = True
    # Clients re-resolve DNS when a connection ends: bounding a connection's age lets
    # new pods behind a headless Service get traffic. 0 = unbounded.
    max_connection_age_s: float = 0.0
    serving: ServingConfig = field(default_factory=ServingConfig)
    # The hop to inference: TLS (None: plain text, which must be configured), and a token for its auth.
    inference_tls: ClientTls | None = None
    inference_token: str = ""

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_size_mb * MIB

    @property
    def inference_url(self) -> str:
        return ",".join(self.inference_targets)


def load_config(
    path: Path | str | None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    environ: Mapping[str, str] | None = None,
) -> CompositingConfig:
    return parse_config(*read_config(path, overrides, environ))


def parse_targets(value: Any, key: str) -> tuple[str, ...]:
    """``host:port``, ``"a:1,b:2"``, a list of those, or one ``dns:///name:port`` target."""
    items = value if isinstance(value, list) else str(value).split(",") if value is not None else []
    targets = tuple(str(t).strip() for t in items if str(t).strip())
    if not targets:
        raise ConfigError(f"{key}: expected host:port, a list of them, or dns:///name:port")
    for target in targets:
        if target.startswith("dns:"):
            if len(targets) > 1:
                raise ConfigError(f"{key}: a dns: target balances by itself; give it alone")
            continue
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{key}: expected host:port, got {target!r}")
    return targets


def inference_hop_tls(remote: Section, base: Path, mode: str, default_plaintext: bool = False) -> ClientTls | None:
    """TLS towards inference, or None for plain text, which must be asked for (remote mode only)."""
    tls = parse_client_tls(remote, base)
    plaintext = remote.bool("plaintext", default_plaintext and tls is None)
    if mode == "remote" and tls is None and not plaintext:
        raise plaintext_error(("inference_server",))
    if tls is not None and plaintext:
        raise ConfigError("inference_server.plaintext: true conflicts with inference_server.tls; choose one")
    return tls


def inference_token(remote: Section, base: Path) -> str:
    """``inference_server.token_env`` (a variable's name) or ``token_file``: the token sent to an inference
    service that has auth enabled (it must be an admin token for LoadModel and UnloadModel to pass through)."""
    env_name = remote.str("token_env", "") or ""
    if env_name:
        value = os.environ.get(env_name, "").strip()
        if not value:
            raise ConfigError(f"inference_server.token_env: the environment variable {env_name} is empty or unset")
        return value
    path = remote.str("token_file", "") or ""
    if path:
        file = Path(path).expanduser()
        file = file if file.is_absolute() else base / file
        try:
            value = file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"inference_server.token_file: cannot read {file} ({exc.strerror})") from None
        if not value:
            raise ConfigError(f"inference_server.token_file: {file} is empty")
        return value
    return ""


def output_format(output: Section) -> str:
    value = (output.str("format", "jpeg") or "jpeg").strip().lower()
    if value == "raw":
        # The Go server listed it but encoded JPEG regardless; a 24-frame batch of raw 720p BGR is 66 MB.
        raise ConfigError(
            "output.format: raw is not served (the Go system listed it but always sent JPEG); "
            'use "jpeg" (the default, what old clients decode) or "png" (lossless)'
        )
    if value not in ("jpeg", "png"):
        raise ConfigError(f"{output.key('format')}: expected jpeg or png, got {value!r}")
    return value


def parse_config(raw: dict[str, Any], base_dir: Path | None = None) -> CompositingConfig:
    root = Section(raw)
    for key in root.unknown_keys(
        [
            "models_root",
            "session",
            "server",
            "inference_server",
            "inference",
            "capacity",
            "output",
            "models",
            "logging",
            "warmup",
            "frames_cache_dir",
            "auth",
            "metrics",
            "plaintext",
        ]
    ):
        log.warning("config: unknown key %s ignored", key)
    root_value = root.str("models_root", None)
    if not root_value:
        raise ConfigError("models_root: required (the folder that holds the avatars)")
    base = base_dir or Path.cwd()
    models_root = Path(root_value).expanduser()
    models_root = (models_root if models_root.is_absolute() else base / models_root).resolve()
    if not models_root.is_dir():
        raise ConfigError(f"models_root: {models_root} is not a directory")

    server = root.section("server")
    host, port = parse_listen_address(server.data.get("port", ":50052"), server.key("port"))
    if server.has("host"):
        host = server.str("host", host) or host

    remote = root.section("inference_server")
    targets = parse_targets(
        remote.data.get("urls", remote.data.get("url", "127.0.0.1:50051")),
        remote.key("urls" if remote.has("urls") else "url"),
    )
    inference = root.section("inference")
    mode = inference.str("mode", "remote", choices=["remote", "in_process"]) or "remote"
    inference_config = None
    if inference.has("config"):
        inference_config = Path(inference.str("config", "") or "").expanduser()
        if not inference_config.is_absolute():
            inference_config = (models_root / inference_config).resolve()
    if mode == "in_process" and (inference_config is None or not inference_config.is_file()):
        raise ConfigError(
            f"inference.config: in_process mode needs the inference service's config file, got {inference_config}"
        )

    overrides = inference.data.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f'{inference.key("overrides")}: expected a list of "key=value" strings')

    capacity = root.section("capacity")
    capacity.str("eviction_policy", "lfu", choices=["lfu"])
    output = root.section("output")

    models: dict[str, AvatarConfig] = {}
    section = root.section("models")
    for model_id, spec in section.data.items():
        model_id = str(model_id)
        key = section.key(model_id)
        if not valid_model_id(model_id):
            raise ConfigError(f"{key}: invalid model id (expected letters, digits, '.', '_' or '-')")
        avatar = Section(spec, key)
        background = avatar.str("background_dir", None)
        rects = avatar.str("crop_rects_path", None)
        if not background:
            raise ConfigError(f"{key}.background_dir: required (a folder of frames or a video file)")
        if not rects:
            raise ConfigError(f"{key}.crop_rects_path: required (JSON, one [x1, y1, x2, y2] per frame)")
        models[model_id] = AvatarConfig(
            model_id=model_id,
            model_path=avatar.str("model_path", "") or "",
            inference_model=avatar.str("inference_model", model_id) or model_id,
            background=resolve_under(models_root, background, avatar.key("background_dir")),
            crop_rects_path=resolve_under(models_root, rects, avatar.key("crop_rects_path")),
            num_frames=avatar.int("num_frames", 0, minimum=0),
            preload_backgrounds=avatar.bool("preload_backgrounds", False),
            geometry=parse_geometry(avatar) if avatar.has("geometry") else DEFAULT_GEOMETRY,
        )

    session = root.section("session")
    logging_section = root.section("logging")
    cache_dir = root.str("frames_cache_dir", None)
    return CompositingConfig(
        models_root=models_root,
        host=host,
        port=port,
        max_message_size_mb=server.int("max_message_size_mb", 64, minimum=1, maximum=2047),
        max_batch_size=server.int("max_batch_size", 64, minimum=1, maximum=4096),
        grace_seconds=server.float("grace_seconds", 10.0, minimum=0.0),
        tune_malloc=server.bool("tune_malloc", True),
        session_max_batch_frames=session.int("max_batch_frames", 8, minimum=1, maximum=64),
        session_buffer_frames=session.int("buffer_frames", 100, minimum=1, maximum=10_000),
        session_max_audio_ahead_s=session.float("max_audio_ahead_seconds", 10.0, minimum=1.0),
        max_sessions=session.int("max_sessions", 32, minimum=1),
        max_connection_age_s=server.float("max_connection_age_seconds", 0.0, minimum=0.0),
        composite_threads=server.int("composite_threads", 0, minimum=0, maximum=256),
        inference_targets=targets,
        inference_timeout_s=remote.float("timeout_seconds", 30.0, minimum=0.001),
        inference_max_retries=remote.int("max_retries", 3, minimum=0, maximum=20),
        inference_retry_backoff_s=remote.float("retry_backoff_seconds", 0.1, minimum=0.0),
        inference_mode=mode,
        inference_config=inference_config,
        inference_overrides=tuple(overrides),
        warmup=root.bool("warmup", True),
        max_models=capacity.int("max_models", 8, minimum=1),
        background_cache_frames=capacity.int("background_cache_frames", 600, minimum=1),
        background_cache_bytes=int(capacity.float("background_cache_mb", 2048, minimum=1) * MIB),
        frames_cache_dir=Path(cache_dir).expanduser() if cache_dir else Path(tempfile.gettempdir()) / "lipsync-frames",
        output_format=output_format(output),
        jpeg_quality=output.int("jpeg_quality", 75, minimum=1, maximum=100),
        jpeg_splicing=output.bool("jpeg_splicing", True),
        jpeg_subsampling=output.str("jpeg_subsampling", "420", choices=["420", "422", "444"]) or "420",
        jpeg_tile_width=output.int("jpeg_tile_width", 0, minimum=0, maximum=65536),
        frame_order=output.str("frame_order", "ping_pong", choices=FRAME_ORDERS) or "ping_pong",
        models=models,
        log_inference_times=logging_section.bool("log_inference_times", False),
        log_compositing_times=logging_section.bool("log_compositing_times", False),
        log_level=parse_log_level(logging_section),
        # How to serve and how to reach inference last, so a config's other mistakes are named first.
        serving=parse_serving(
            root,
            base,
            host,
            default_metrics_port=9092,
            plaintext_also=("inference_server",) if mode == "remote" and needs_plaintext(remote, root) else (),
        ),
        inference_tls=inference_hop_tls(remote, base, mode, plaintext_default(root)),
        inference_token=inference_token(remote, base),
    )
