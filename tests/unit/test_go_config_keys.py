"""The Go system's config values that both services read as the Go system did (or refuse saying what to use)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from support import write_small_avatar

from compositing_service.avatars import open_avatar
from compositing_service.config import parse_config as parse_compositing
from inference_service.config import GO_ENCODER_PLACES
from inference_service.config import parse_config as parse_inference
from inference_service.devices import cpu_device
from inference_service.registry import ModelRegistry
from service_common.cli import log_level_arg
from service_common.config_source import ConfigError


def inference_raw(root: Path, **extra: object) -> dict:
    return {"models_root": str(root), "plaintext": True, **extra}


@pytest.mark.parametrize(
    "value, level", [("info", "INFO"), ("INFO", "INFO"), ("Debug", "DEBUG"), ("warn", "WARNING"), ("error", "ERROR")]
)
def test_log_level_in_any_case_and_the_go_spelling_warn(tmp_path: Path, value: str, level: str) -> None:
    assert parse_inference(inference_raw(tmp_path, logging={"level": value})).log_level == level
    compositing = parse_compositing({"models_root": str(tmp_path), "plaintext": True, "logging": {"level": value}})
    assert compositing.log_level == level
    assert log_level_arg(value) == level


def test_an_unknown_log_level_names_the_key_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^logging\.level: expected debug, info, warn\(ing\) or error"):
        parse_inference(inference_raw(tmp_path, logging={"level": "verbose"}))


def test_top_level_audio_encoder_serves_every_model_that_names_none(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "shared.onnx").write_bytes(b"x")
    (root / "own.onnx").write_bytes(b"x")
    config = parse_inference(
        inference_raw(
            root,
            audio_encoder_path="shared.onnx",
            models={"a": {"model_path": "a.onnx"}, "b": {"model_path": "b.onnx", "audio_encoder_path": "own.onnx"}},
        )
    )
    assert config.models["a"].audio_encoder_path == root / "shared.onnx"
    assert config.models["b"].audio_encoder_path == root / "own.onnx"
    assert config.audio_encoder_origin == "audio_encoder_path"
    with pytest.raises(ConfigError, match=r"^audio_encoder_path: .*missing\.onnx is not a file"):
        parse_inference(inference_raw(root, audio_encoder_path="missing.onnx"))


@pytest.mark.parametrize("place", GO_ENCODER_PLACES)
def test_without_a_configured_encoder_the_go_places_are_searched(tmp_path: Path, place: str) -> None:
    root = tmp_path / "a" / "b" / "models"
    root.mkdir(parents=True)
    found = (root / place).resolve()
    found.parent.mkdir(parents=True, exist_ok=True)
    found.write_bytes(b"x")
    config = parse_inference(inference_raw(root, models={"m": {"model_path": "m.onnx"}}))
    assert config.models["m"].audio_encoder_path == found
    assert config.audio_encoder_origin == f"found at models_root/{place}, where the Go system looked"
    # A model added after start (models_root/<id>/model.onnx) with no encoder of its own uses it too.
    (root / "late").mkdir()
    (root / "late" / "model.onnx").write_bytes(b"x")
    assert ModelRegistry(config, [cpu_device(config)]).spec_for("late").audio_encoder_path == found


def test_the_first_go_place_wins_and_none_found_means_none(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "models"
    (root / "model").mkdir(parents=True)
    assert parse_inference(inference_raw(root)).audio_encoder_path is None
    for place in reversed(GO_ENCODER_PLACES):
        (root / place).resolve().write_bytes(b"x")
    assert parse_inference(inference_raw(root)).audio_encoder_path == (root / GO_ENCODER_PLACES[0]).resolve()


def test_output_format_raw_is_refused_saying_what_to_use(tmp_path: Path) -> None:
    base = {"models_root": str(tmp_path), "plaintext": True}
    with pytest.raises(ConfigError, match=r'^output\.format: raw is not served .* use "jpeg" .* or "png"'):
        parse_compositing({**base, "output": {"format": "raw"}})
    assert parse_compositing({**base, "output": {"format": "JPEG"}}).output_format == "jpeg"
    with pytest.raises(ConfigError, match=r"^output\.format: expected jpeg or png, got 'gif'"):
        parse_compositing({**base, "output": {"format": "gif"}})


def test_num_frames_past_the_avatar_warns_and_serves_the_real_count(tmp_path: Path, caplog) -> None:
    frames, rects = write_small_avatar(tmp_path / "small", frames=6, size=(320, 240))
    spec = {"background_dir": str(frames), "crop_rects_path": str(rects)}
    config = parse_compositing(
        {
            "models_root": str(tmp_path),
            "plaintext": True,
            "models": {"big": {**spec, "num_frames": 2000}, "fewer": {**spec, "num_frames": 4}},
        }
    )
    with caplog.at_level(logging.WARNING, logger="compositing_service.avatars"):
        big = open_avatar(config.models["big"], config)
    assert big.num_frames == 6 and len(big.rects) == 6
    assert "models.big.num_frames is 2000 but it has 6 background frames and 6 rects; serving 6" in caplog.text
    assert open_avatar(config.models["fewer"], config).num_frames == 4  # fewer than there are: as configured
    assert np.array_equal(big.rects, np.array(json.loads(rects.read_text())))
