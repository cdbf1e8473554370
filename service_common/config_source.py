"""Reading a service's YAML config with environment and command-line overrides.

Both services take the old system's YAML keys. Overrides are applied to the
raw mapping before validation, so an override is checked exactly like a key
in the file and a bad value fails at start with the key's dotted name.

Precedence (last wins): file, environment (``LIPSYNC_<KEY>`` with ``__``
between levels, e.g. ``LIPSYNC_CAPACITY__MAX_MODELS=2``), ``--set key=value``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

from lipsync_protocol.geometry import GEOMETRIES, INTERPOLATIONS, Geometry

ENV_PREFIX = "LIPSYNC_"


class ConfigError(ValueError):
    """An invalid config; the message starts with the offending key."""


def load_yaml(path: Path | str | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


class EnvironmentFilter(Protocol):
    """What read_config asks of a schema (config_schema.Schema), without importing it."""

    def from_environment(self, overrides: dict[str, Any]) -> dict[str, Any]: ...


def read_config(
    path: Path | str | None,
    overrides: Mapping[str, Any] | Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    schema: EnvironmentFilter | None = None,
) -> tuple[dict[str, Any], Path]:
    """The raw mapping with every override applied, and the folder relative paths start from.

    ``schema`` keeps the environment variables that name its keys: the ``LIPSYNC_`` prefix is shared by both
    services and the client (``LIPSYNC_TOKEN``), so one process's environment may hold the other's keys."""
    raw = load_yaml(path)
    env = env_overrides(environ)
    apply_overrides(raw, schema.from_environment(env) if schema is not None else env)
    apply_overrides(raw, overrides)
    return raw, Path(path).resolve().parent if path else Path.cwd()


def env_name(dotted: str) -> str:
    """``capacity.max_models`` -> ``LIPSYNC_CAPACITY__MAX_MODELS``."""
    return ENV_PREFIX + "__".join(part.upper() for part in dotted.split("."))


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating levels as needed."""
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"override {dotted!r}: empty key")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_scalar(text: str) -> Any:
    """YAML scalar parsing so ``2``, ``true`` and ``":50051"`` mean what they do in the file."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or len(key) == len(ENV_PREFIX):
            continue
        dotted = ".".join(p.lower() for p in key[len(ENV_PREFIX) :].split("__"))
        out[dotted] = parse_scalar(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """Apply ``{dotted: value}`` or ``["dotted=value", ...]`` to ``raw`` in place."""
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value")
            key, value = item.split("=", 1)
            items.append((key.strip(), parse_scalar(value)))
    for key, value in items:
        set_path(raw, key, value)
    return raw


def to_int(value: Any, key: str, minimum: float | None = None, maximum: float | None = None) -> int:
    """An integer, or its digits in a string (environment values and ``--set`` arrive as text)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            value = int(value)
        else:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key}: expected an integer <= {maximum}, got {value}")
    return value


def to_float(value: Any, key: str, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    value = float(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}: expected a number >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key}: expected a number <= {maximum}, got {value}")
    return value


TRUE_WORDS = {"true", "yes", "on", "1"}
FALSE_WORDS = {"false", "no", "off", "0"}


def to_bool(value: Any, key: str) -> bool:
    """YAML's spellings too, so ``yes`` and ``off`` mean what they do in the file."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def to_str(value: Any, key: str, choices: Iterable[str] | None = None) -> str:
    """Numbers become their text (``jpeg_subsampling: 420``); mappings and lists are refused."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    value = str(value)
    if choices is not None:
        allowed = list(choices)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def unknown_key(key: str, suggestion: str | None, expected: Iterable[str] = ()) -> ConfigError:
    """An unknown key names the likeliest intended key, or else the keys that may stand there."""
    if suggestion:
        return ConfigError(f"{key}: unknown key (did you mean {suggestion}?)")
    names = sorted(expected)
    return ConfigError(f"{key}: unknown key" + (f" (expected one of {', '.join(names)})" if names else ""))


def close_match(name: str, candidates: Iterable[str]) -> str | None:
    """A typo's likeliest intended name, or the one candidate the name begins (``ca`` for ``ca_file``)."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if matches:
        return matches[0]
    longer = [c for c in candidates if len(name) >= 2 and c.startswith(name)]
    return longer[0] if len(longer) == 1 else None


class Section:
    """Typed reads from one mapping of a raw config, naming the full key on error (what parse_geometry reads;
    the services' keys go through their schemas)."""

    def __init__(self, data: Any, prefix: str = "") -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {type(data).__name__}")
        self.data = data
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def section(self, name: str) -> Section:
        return Section(self.data.get(name), self.key(name))

    def has(self, name: str) -> bool:
        return name in self.data and self.data[name] is not None

    def _get(self, name: str, default: Any) -> Any:
        value = self.data.get(name, default)
        return default if value is None else value

    def int(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        return to_int(self._get(name, default), self.key(name), minimum, maximum)

    def str(self, name: str, default: str | None, *, choices: Iterable[str] | None = None) -> str | None:
        value = self._get(name, default)
        return None if value is None else to_str(value, self.key(name), choices)


def parse_listen_address(value: Any, key: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """Accept the old ``":50051"`` form, ``"host:port"`` or a bare integer."""
    if isinstance(value, bool):
        raise ConfigError(f'{key}: expected a port like ":50051" or 50051, got {value!r}')
    if isinstance(value, int):
        host, port = default_host, value
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+", text):
            host, port = default_host, int(text)
        else:
            match = re.fullmatch(r"(\[[^\]]*\]|[^:]*):(\d+)", text)
            if not match:
                raise ConfigError(f'{key}: expected a port like ":50051" or "host:50051", got {value!r}')
            host = match.group(1) or default_host
            port = int(match.group(2))
    else:
        raise ConfigError(f'{key}: expected a port like ":50051" or 50051, got {value!r}')
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key}: expected a port in 0..65535, got {port}")
    return host, port


def models_root_dir(value: str, base: Path) -> Path:
    """``models_root``: relative to the config file's folder, and it must exist."""
    root = Path(value).expanduser()
    root = (root if root.is_absolute() else base / root).resolve()
    if not root.is_dir():
        raise ConfigError(f"models_root: {root} is not a directory")
    return root


def resolve_under(root: Path, value: str, key: str) -> Path:
    """Resolve a configured path; relative paths are taken against ``models_root``."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = root / path
    return path.resolve()


# logging.level in any case; the Go system's files say "info" and list "warn".
LOG_LEVELS = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING", "warning": "WARNING", "error": "ERROR"}


def to_log_level(value: Any, key: str) -> str:
    try:
        return LOG_LEVELS[to_str(value, key).strip().lower()]
    except KeyError:
        raise ConfigError(f"{key}: expected debug, info, warn(ing) or error (any case), got {value!r}") from None


MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def valid_model_id(model_id: str) -> bool:
    return bool(MODEL_ID_PATTERN.fullmatch(model_id)) and ".." not in model_id


GEOMETRY_KEYS = ("base", "crop_size", "inner", "input_size", "mask", "crop_interpolation", "paste_interpolation")


def to_geometry(value: Any, key: str) -> Geometry:
    """A ``geometry`` key's value anywhere (``models.<id>.geometry``), read by parse_geometry."""
    prefix, _, name = key.rpartition(".")
    assert name == "geometry", key
    return parse_geometry(Section({name: value}, prefix))


def parse_geometry(model: Section) -> Geometry:
    """``models.<id>.geometry``: a family's name ("328", "160"), or a mapping of the family's fields to change
    (``base``: the family to start from, default 328; crop_size, inner, input_size, mask [x, y, w, h],
    crop_interpolation, paste_interpolation)."""
    key = model.key("geometry")
    value = model.data.get("geometry")
    if not isinstance(value, dict):
        name = str(value)
        if name not in GEOMETRIES:
            raise ConfigError(f"{key}: expected one of {', '.join(GEOMETRIES)} or a mapping, got {value!r}")
        return GEOMETRIES[name]
    section = model.section("geometry")
    for name in section.data:
        if name not in GEOMETRY_KEYS:
            guess = close_match(str(name), GEOMETRY_KEYS)
            raise unknown_key(section.key(name), guess and section.key(guess), GEOMETRY_KEYS)
    base = GEOMETRIES[section.str("base", "328", choices=list(GEOMETRIES)) or "328"]
    mask = section.data.get("mask", list(base.mask))
    if not (
        isinstance(mask, list) and len(mask) == 4 and all(isinstance(v, int) and not isinstance(v, bool) for v in mask)
    ):
        raise ConfigError(f"{section.key('mask')}: expected [x, y, w, h] integers, got {mask!r}")
    geometry = Geometry(
        name=f"{base.name}-custom",
        crop_size=section.int("crop_size", base.crop_size, minimum=1, maximum=4096),
        inner=section.int("inner", base.inner, minimum=0),
        input_size=section.int("input_size", base.input_size, minimum=1, maximum=4096),
        mask=(mask[0], mask[1], mask[2], mask[3]),
        crop_interpolation=section.str("crop_interpolation", base.crop_interpolation, choices=INTERPOLATIONS) or "",
        paste_interpolation=section.str("paste_interpolation", base.paste_interpolation, choices=INTERPOLATIONS) or "",
    )
    try:
        geometry.check()
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return geometry
