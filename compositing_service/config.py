"""Compositing service configuration: its schema (the old system's YAML keys plus ours) and the dataclasses.

Every key is declared once in SCHEMA; validation and docs/configuration.md come from it. An invalid value or
an unknown key raises ConfigError naming its dotted key.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipsync_protocol.geometry import Geometry
from service_common.config_schema import (
    From,
    Key,
    Schema,
    Table,
    Values,
    choice,
    flag,
    ignored,
    integer,
    number,
    path,
    text,
)
from service_common.config_source import (
    ConfigError,
    models_root_dir,
    read_config,
    resolve_under,
    to_geometry,
    to_str,
    valid_model_id,
)
from service_common.serving_config import (
    ServingConfig,
    needs_plaintext,
    parse_client_tls,
    parse_serving,
    plaintext_error,
    server_keys,
    serving_keys,
)
from service_common.tls import ClientTls

MIB = 1024 * 1024
FRAME_ORDERS = ("ping_pong", "loop")


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


def output_format(value: Any, key: str) -> str:
    value = to_str(value, key).strip().lower()
    if value == "raw":
        # The Go server listed it but encoded JPEG regardless; a 24-frame batch of raw 720p BGR is 66 MB.
        raise ConfigError(
            f"{key}: raw is not served (the Go system listed it but always sent JPEG); "
            'use "jpeg" (the default, what old clients decode) or "png" (lossless)'
        )
    if value not in ("jpeg", "png"):
        raise ConfigError(f"{key}: expected jpeg or png, got {value!r}")
    return value


def engine_overrides(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(o, str) and "=" in o for o in value):
        raise ConfigError(f'{key}: expected a list of "key=value" strings')
    return tuple(value)


AVATAR_KEYS = (
    path("background_dir", "a folder of frames or a video file", required="a folder of frames or a video file"),
    path("crop_rects_path", "JSON, one [x1, y1, x2, y2] per frame", required="JSON, one [x1, y1, x2, y2] per frame"),
    integer("num_frames", 0, "use the first N frames; more than the avatar has: a warning, and all it has", 0),
    flag("preload_backgrounds", False, "load the avatar and its frames at start"),
    text("model_path", "", "shown in ListModels (the inference service resolves the model)"),
    text("inference_model", None, "the inference service's model id", shown="the avatar's id"),
    Key(
        "geometry",
        "geometry",
        "328",
        "the crop, input and paste geometry: a family's name or a mapping (see Types)",
        parse=to_geometry,
    ),
)

HOP = "inference_server"
SCHEMA = Schema(
    "compositing",
    (
        path("models_root", "the folder holding the avatars", required="the folder that holds the avatars"),
        flag("warmup", True, "one single-frame batch per preloaded avatar at start"),
        path(
            "frames_cache_dir",
            "where videos are decoded to (relative: to the working directory)",
            shown="`$TMPDIR/lipsync-frames`",
        ),
        *server_keys(50052),
        integer("server.max_batch_size", 64, "frames per request", 1, 4096),
        integer("server.composite_threads", 0, "threads compositing and encoding frames; 0: one per core", 0, 256),
        *serving_keys(9092, 8, 32, "InferBatchComposite calls running at once"),
        flag("logging.log_inference_times", False, "a line per batch with its stage timings"),
        flag("logging.log_compositing_times", False, "a line per batch with its stage timings"),
        Key(
            f"{HOP}.url",
            "targets",
            "127.0.0.1:50051",
            "host:port, a comma-separated list or YAML list of them, or dns:///name:port (round_robin)",
            aliases=("urls",),
            parse=parse_targets,
        ),
        number(f"{HOP}.timeout_seconds", 30.0, "deadline of each inference call", 0.001),
        integer(f"{HOP}.max_retries", 3, "retries of UNAVAILABLE, on the next target", 0, 20),
        number(f"{HOP}.retry_backoff_seconds", 0.1, "first backoff, doubling, at most 2 s", 0.0),
        flag(f"{HOP}.plaintext", From("plaintext"), "call inference without TLS (remote mode needs TLS or this)"),
        path(f"{HOP}.tls.ca_file", "CA of the inference servers' certificates", shown="the system's roots"),
        path(f"{HOP}.tls.cert_file", "client certificate, for mutual TLS (with key_file)"),
        path(f"{HOP}.tls.key_file", "its private key"),
        text(f"{HOP}.tls.server_name", "", "the name to check the certificate against, if not the target's"),
        flag(f"{HOP}.tls.enabled", True, "false: the tls keys are kept but not used"),
        text(f"{HOP}.token_env", "", "a variable holding the token sent to an inference service with auth"),
        path(f"{HOP}.token_file", "a file holding that token (relative to the config file)"),
        choice("inference.mode", "remote", "remote in_process", "inference over gRPC, or its engine in this process"),
        path("inference.config", "the inference config for in_process mode (relative to models_root)"),
        Key(
            "inference.overrides",
            "list",
            [],
            "key=value overrides of that config (the environment is not applied to it)",
            parse=engine_overrides,
        ),
        integer("capacity.max_models", 8, "avatars loaded at once (LFU eviction)", 1),
        integer("capacity.background_cache_frames", 600, "cached background frames per avatar", 1),
        number("capacity.background_cache_mb", 2048, "cached background bytes in all", 1),
        choice("capacity.eviction_policy", "lfu", "lfu", "the only policy"),
        ignored("capacity.idle_timeout_minutes", "eviction is LFU, by count and memory"),
        Key(
            "output.format",
            "choice",
            "jpeg",
            "png: lossless; the Go value raw is refused",
            choices=("jpeg", "png"),
            parse=output_format,
        ),
        integer("output.jpeg_quality", 75, "JPEG quality", 1, 100),
        flag(
            "output.jpeg_splicing", True, "re-encode only the restart intervals under the mouth (docs/decisions/0007)"
        ),
        choice("output.jpeg_subsampling", "420", "420 422 444", "JPEG chroma subsampling"),
        integer("output.jpeg_tile_width", 0, "pixels per restart interval; 0: fitted to each avatar", 0, 65536),
        choice("output.frame_order", "ping_pong", " ".join(FRAME_ORDERS), "frames past the avatar's end"),
        integer("session.max_batch_frames", 8, "largest internal batch of a streaming session", 1, 64),
        integer("session.buffer_frames", 100, "frames a session holds for a slow reader", 1, 10_000),
        number("session.max_audio_ahead_seconds", 10.0, "audio accepted ahead of the frames being made", 1.0),
        integer("session.max_sessions", 32, "streaming sessions per replica (RESOURCE_EXHAUSTED beyond)", 1),
        Table("models", AVATAR_KEYS, valid_model_id, "invalid model id (expected letters, digits, '.', '_' or '-')"),
    ),
)


@dataclass(frozen=True)
class AvatarConfig:
    model_id: str
    model_path: str  # as configured; the inference service resolves it
    inference_model: str  # the inference service's model id (default: the avatar's id)
    background: Path  # a folder of images or a video file
    crop_rects_path: Path
    num_frames: int  # 0 = as many as there are
    preload_backgrounds: bool
    geometry: Geometry  # how frames become the model's input and back


@dataclass(frozen=True)
class CompositingConfig:
    """Built only by parse_config: every default is SCHEMA's."""

    models_root: Path
    host: str
    port: int
    max_message_size_mb: int
    max_batch_size: int
    inference_targets: tuple[str, ...]
    inference_timeout_s: float
    inference_max_retries: int
    inference_retry_backoff_s: float
    inference_mode: str
    inference_config: Path | None
    # --set style overrides for the in-process engine's config (the process environment is not applied to it)
    inference_overrides: tuple[str, ...]
    warmup: bool
    max_models: int
    background_cache_frames: int
    background_cache_bytes: int
    frames_cache_dir: Path
    output_format: str
    jpeg_quality: int
    # Re-encode only the restart intervals under the mouth (jpeg_splice.py); the same bytes as a full encode
    # with restart markers. Off: the plain full-frame encode.
    jpeg_splicing: bool
    jpeg_subsampling: str
    jpeg_tile_width: int  # pixels per restart interval; 0: fitted to each avatar's rectangles
    frame_order: str
    composite_threads: int  # 0 = one per core
    models: Mapping[str, AvatarConfig]
    log_inference_times: bool
    log_compositing_times: bool
    log_level: str
    grace_seconds: float
    session_max_batch_frames: int
    session_buffer_frames: int
    session_max_audio_ahead_s: float
    max_sessions: int
    tune_malloc: bool
    # Clients re-resolve DNS when a connection ends: bounding a connection's age lets
    # new pods behind a headless Service get traffic. 0 = unbounded.
    max_connection_age_s: float
    serving: ServingConfig
    # The hop to inference: TLS (None: plain text, which must be configured), and a token for its auth.
    inference_tls: ClientTls | None
    inference_token: str

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
    return parse_config(*read_config(path, overrides, environ, SCHEMA))


def inference_hop_tls(values: Values, base: Path, mode: str) -> ClientTls | None:
    """TLS towards inference, or None for plain text, which must be asked for (remote mode only)."""
    tls = parse_client_tls(values, HOP, base)
    plaintext = values[f"{HOP}.plaintext"] and tls is None
    if mode == "remote" and tls is None and not plaintext:
        raise plaintext_error((HOP,))
    if tls is not None and values.given(f"{HOP}.plaintext") and values[f"{HOP}.plaintext"]:
        raise ConfigError(f"{HOP}.plaintext: true conflicts with {HOP}.tls; choose one")
    return tls


def inference_token(values: Values, base: Path) -> str:
    """``inference_server.token_env`` (a variable's name) or ``token_file``: the token sent to an inference
    service that has auth enabled (it must be an admin token for LoadModel and UnloadModel to pass through)."""
    env_name = values[f"{HOP}.token_env"]
    if env_name:
        value = os.environ.get(env_name, "").strip()
        if not value:
            raise ConfigError(f"{HOP}.token_env: the environment variable {env_name} is empty or unset")
        return value
    name = values[f"{HOP}.token_file"]
    if not name:
        return ""
    file = Path(name).expanduser()
    file = file if file.is_absolute() else base / file
    try:
        value = file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{HOP}.token_file: cannot read {file} ({exc.strerror})") from None
    if not value:
        raise ConfigError(f"{HOP}.token_file: {file} is empty")
    return value


def engine_config(values: Values, models_root: Path) -> tuple[str, Path | None]:
    """``inference.mode`` and, for in_process, the inference service's config file it runs."""
    mode = values["inference.mode"]
    config = None
    if values.given("inference.config"):
        config = Path(values["inference.config"]).expanduser()
        if not config.is_absolute():
            config = (models_root / config).resolve()
    if mode == "in_process" and (config is None or not config.is_file()):
        raise ConfigError(f"inference.config: in_process mode needs the inference service's config file, got {config}")
    return mode, config


def avatar_config(model_id: str, avatar: Values, models_root: Path) -> AvatarConfig:
    return AvatarConfig(
        model_id=model_id,
        model_path=avatar["model_path"] or "",
        inference_model=avatar["inference_model"] or model_id,
        background=resolve_under(models_root, avatar["background_dir"], avatar.key("background_dir")),
        crop_rects_path=resolve_under(models_root, avatar["crop_rects_path"], avatar.key("crop_rects_path")),
        num_frames=avatar["num_frames"],
        preload_backgrounds=avatar["preload_backgrounds"],
        geometry=avatar["geometry"],
    )


def parse_config(raw: dict[str, Any], base_dir: Path | None = None) -> CompositingConfig:
    values = SCHEMA.check(raw)
    base = base_dir or Path.cwd()
    models_root = models_root_dir(values["models_root"], base)
    host, port = values["server.port"]
    host = values["server.host"] or host
    mode, inference_config = engine_config(values, models_root)
    cache_dir = values["frames_cache_dir"]
    return CompositingConfig(
        models_root=models_root,
        host=host,
        port=port,
        max_message_size_mb=values["server.max_message_size_mb"],
        max_batch_size=values["server.max_batch_size"],
        grace_seconds=values["server.grace_seconds"],
        tune_malloc=values["server.tune_malloc"],
        max_connection_age_s=values["server.max_connection_age_seconds"],
        composite_threads=values["server.composite_threads"],
        session_max_batch_frames=values["session.max_batch_frames"],
        session_buffer_frames=values["session.buffer_frames"],
        session_max_audio_ahead_s=values["session.max_audio_ahead_seconds"],
        max_sessions=values["session.max_sessions"],
        inference_targets=values[f"{HOP}.url"],
        inference_timeout_s=values[f"{HOP}.timeout_seconds"],
        inference_max_retries=values[f"{HOP}.max_retries"],
        inference_retry_backoff_s=values[f"{HOP}.retry_backoff_seconds"],
        inference_mode=mode,
        inference_config=inference_config,
        inference_overrides=values["inference.overrides"],
        warmup=values["warmup"],
        max_models=values["capacity.max_models"],
        background_cache_frames=values["capacity.background_cache_frames"],
        background_cache_bytes=int(values["capacity.background_cache_mb"] * MIB),
        frames_cache_dir=Path(cache_dir).expanduser() if cache_dir else Path(tempfile.gettempdir()) / "lipsync-frames",
        output_format=values["output.format"],
        jpeg_quality=values["output.jpeg_quality"],
        jpeg_splicing=values["output.jpeg_splicing"],
        jpeg_subsampling=values["output.jpeg_subsampling"],
        jpeg_tile_width=values["output.jpeg_tile_width"],
        frame_order=values["output.frame_order"],
        models={mid: avatar_config(mid, avatar, models_root) for mid, avatar in values.entries("models").items()},
        log_inference_times=values["logging.log_inference_times"],
        log_compositing_times=values["logging.log_compositing_times"],
        log_level=values["logging.level"],
        # How to serve and how to reach inference last, so a config's other mistakes are named first.
        serving=parse_serving(
            values, base, host, plaintext_also=(HOP,) if mode == "remote" and needs_plaintext(values, HOP) else ()
        ),
        inference_tls=inference_hop_tls(values, base, mode),
        inference_token=inference_token(values, base),
    )
