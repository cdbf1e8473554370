"""Add an imported model to ``inference.yaml`` and ``compositing.yaml`` of a models folder.

Why a text edit and not load-and-dump: operators comment their configs, and a dump would drop every comment
and reorder nothing but lose them all. The new entry is spliced into the ``models:`` block as text; the result
is parsed again and must equal the old config plus exactly that entry, else the file is rewritten from its
parsed form (comments lost, which is said on stderr).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from model_import.errors import ModelImportError

INFERENCE = "inference.yaml"
COMPOSITING = "compositing.yaml"
# Keys an import sets (or removes when they no longer apply); an entry's other keys survive a re-import.
MANAGED = ("model_path", "audio_encoder_path", "background_dir", "crop_rects_path", "num_frames", "geometry")
_TOP_MODELS = re.compile(r"^models:[ \t]*(#.*)?$", re.MULTILINE)
_EMPTY_FLOW = re.compile(r"^models:[ \t]*(\{\s*\}|null|~)?[ \t]*(#.*)?$", re.MULTILINE)


def inference_entry(model_id: str, variant: str, has_encoder: bool) -> dict[str, str]:
    entry = {"model_path": f"{model_id}/model.onnx"}
    if has_encoder:
        entry["audio_encoder_path"] = f"{model_id}/audio_encoder.onnx"
    if variant == "160":
        entry["geometry"] = "160"
    return entry


def compositing_entry(model_id: str, variant: str) -> dict[str, str]:
    entry = {
        "model_path": f"{model_id}/model.onnx",
        "background_dir": f"{model_id}/frames",
        "crop_rects_path": f"{model_id}/crop_rects.json",
    }
    if variant == "160":
        entry["geometry"] = "160"
    return entry


def _header(kind: str, models_root: Path) -> str:
    """What a service needs besides its models: the root, where to listen, and plain text asked for."""
    root = json.dumps(str(models_root.resolve()))  # a JSON string is a YAML double-quoted scalar
    lines = [
        "# Written by lipsync-import; add TLS and tokens for production (docs/operations.md).",
        f"models_root: {root}",
        "server:",
        f'  port: ":{50051 if kind == INFERENCE else 50052}"',
        "  plaintext: true",
    ]
    if kind == COMPOSITING:
        lines += [
            "inference_server:",
            '  url: "127.0.0.1:50051"',
            "  plaintext: true",
            "inference:",
            "  mode: remote",
            f"  config: {INFERENCE}",
        ]
    return "\n".join([*lines, "models:", ""])


def _scalar(text: str) -> str:
    """Plain when YAML reads it back as the same string, else double-quoted (``"160"``, ``"007"``)."""
    plain = re.fullmatch(r"[A-Za-z0-9_./-]+", text) is not None and yaml.safe_load(text) == text
    return text if plain else json.dumps(text)


def _render_entry(model_id: str, entry: dict[str, Any], indent: str) -> list[str]:
    lines = [f"{indent}{_scalar(model_id)}:"]
    for key, value in entry.items():
        if isinstance(value, str):
            lines.append(f"{indent}  {_scalar(key)}: {_scalar(value)}")
        else:  # an operator's own key kept from the old entry
            dumped = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False)
            lines += [f"{indent}  {line}" for line in dumped.splitlines()]
    return lines


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _splice(text: str, model_id: str, entry: dict[str, Any]) -> str | None:
    """``text`` with the entry in its ``models:`` block (replacing the model's old one); None if not block style."""
    lines = text.splitlines()
    match = _TOP_MODELS.search(text)
    if match is None:
        flow = _EMPTY_FLOW.search(text)
        if flow is None:
            if any(line.startswith("models:") for line in lines):
                return None  # a flow mapping with entries: leave it to the fallback
            return "\n".join([*lines, "models:", *_render_entry(model_id, entry, "  ")]) + "\n"
        start = text.count("\n", 0, flow.start())
        lines[start] = "models:"
    else:
        start = text.count("\n", 0, match.start())
    end = start + 1  # the block: up to the next top-level key
    while end < len(lines) and not (_is_content(lines[end]) and _indent(lines[end]) == 0):
        end += 1
    content = [i for i in range(start + 1, end) if _is_content(lines[i])]
    indent = " " * _indent(lines[content[0]]) if content else "  "
    own = re.compile(rf"^{indent}(['\"]?){re.escape(model_id)}\1:[ \t]*(#.*)?$")
    first = next((i for i in content if own.match(lines[i])), None)
    if first is None:
        at = (content[-1] + 1) if content else start + 1
        new = lines[:at] + _render_entry(model_id, entry, indent) + lines[at:]
    else:
        after = [i for i in content if i > first and _indent(lines[i]) <= len(indent)]
        stop = after[0] if after else (content[-1] + 1)
        while stop - 1 > first and not _is_content(lines[stop - 1]):
            stop -= 1  # comments and blank lines before the next entry stay with it
        new = lines[:first] + _render_entry(model_id, entry, indent) + lines[stop:]
    return "\n".join(new) + "\n"


def _merged(old: Any, ours: dict[str, str]) -> dict[str, Any]:
    keep = {k: v for k, v in old.items() if k not in MANAGED} if isinstance(old, dict) else {}
    return {**ours, **keep}


def add_model(path: Path, kind: str, model_id: str, ours: dict[str, str], warn: Callable[[str], None]) -> None:
    """Create ``path`` or add (replace) ``model_id``'s entry in it, keeping the other entries and comments."""
    models_root = path.parent
    if not path.exists() or not path.read_text().strip():
        text = _header(kind, models_root)
        data: dict[str, Any] = yaml.safe_load(text)
    else:
        text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ModelImportError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ModelImportError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
        if "models_root" in data and Path(str(data["models_root"])).expanduser().resolve() != models_root.resolve():
            warn(f"note: {path} has models_root {data['models_root']}; the new entry's paths are relative to it")
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise ModelImportError(f"{path}: models is not a mapping")
    entry = _merged(models.get(model_id), ours)
    expected = copy.deepcopy(data)
    expected["models"] = {**models, model_id: entry}

    spliced = _splice(text, model_id, entry)
    try:
        ok = spliced is not None and yaml.safe_load(spliced) == expected
    except yaml.YAMLError:
        ok = False
    if not ok:
        warn(f"note: rewrote {path} from its parsed content; its comments were not kept")
        spliced = yaml.safe_dump(expected, sort_keys=False, default_flow_style=False)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(spliced)
    os.replace(tmp, path)


def update_configs(
    models_root: Path, model_id: str, variant: str, has_encoder: bool, warn: Callable[[str], None]
) -> tuple[Path, Path]:
    """Both services' configs in ``models_root`` now list ``model_id``."""
    inference, compositing = models_root / INFERENCE, models_root / COMPOSITING
    add_model(inference, INFERENCE, model_id, inference_entry(model_id, variant, has_encoder), warn)
    add_model(compositing, COMPOSITING, model_id, compositing_entry(model_id, variant), warn)
    return inference, compositing
