"""Compositing config: the old keys, inference targets, and failures that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from compositing_service.config import load_config, parse_config, parse_targets
from service_common.config_source import ConfigError


def test_generated_config_reads_with_old_keys(models_dir: Path) -> None:
    config = load_config(models_dir / "compositing.yaml", environ={})
    assert config.port == 50052 and config.inference_targets == ("127.0.0.1:50051",)
    assert config.inference_timeout_s == 30 and config.inference_max_retries == 3
    assert config.jpeg_quality == 75 and config.frame_order == "ping_pong" and config.output_format == "jpeg"
    demo = config.models["demo"]
    assert demo.background == (models_dir / "avatar" / "background.mp4").resolve()
    assert demo.crop_rects_path == (models_dir / "avatar" / "crop_rects.json").resolve()
    assert demo.num_frames == 125 and demo.preload_backgrounds and demo.inference_model == "demo"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("a:1", ("a:1",)),
        ("a:1, b:2", ("a:1", "b:2")),
        (["a:1", "b:2"], ("a:1", "b:2")),
        ("dns:///inference.svc:50051", ("dns:///inference.svc:50051",)),
    ],
)
def test_targets(value, expected) -> None:
    assert parse_targets(value, "inference_server.url") == expected


@pytest.mark.parametrize("value", ["", "nohost", "a:b", "a:0", ["dns:///x:1", "a:1"], [], "a:99999"])
def test_bad_targets(value) -> None:
    with pytest.raises(ConfigError, match=r"inference_server\.url"):
        parse_targets(value, "inference_server.url")


@pytest.mark.parametrize(
    "change, key",
    [
        ({"output": {"jpeg_quality": 0}}, "output.jpeg_quality"),
        ({"output": {"format": "gif"}}, "output.format"),
        ({"output": {"frame_order": "random"}}, "output.frame_order"),
        ({"capacity": {"background_cache_frames": 0}}, "capacity.background_cache_frames"),
        ({"capacity": {"eviction_policy": "fifo"}}, "capacity.eviction_policy"),
        ({"inference": {"mode": "remote-ish"}}, "inference.mode"),
        ({"inference": {"mode": "in_process"}}, "inference.config"),
        ({"inference_server": {"timeout_seconds": 0}}, "inference_server.timeout_seconds"),
        ({"models": {"a": {"crop_rects_path": "r.json"}}}, "models.a.background_dir"),
        ({"models": {"a": {"background_dir": "f"}}}, "models.a.crop_rects_path"),
        ({"models": {"a/b": {"background_dir": "f", "crop_rects_path": "r"}}}, "models.a/b"),
        ({"models_root": None}, "models_root"),
    ],
)
def test_invalid_values_fail_naming_the_key(tmp_path: Path, change: dict, key: str) -> None:
    raw = {"models_root": str(tmp_path)}
    raw.update(change)
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(key), str(err.value)


def test_in_process_engine_takes_its_own_overrides_not_the_environment(models_dir: Path, monkeypatch) -> None:
    from compositing_service.inference_client import InProcessInference

    monkeypatch.setenv("LIPSYNC_CAPACITY__MAX_MODELS", "2")
    config = load_config(
        models_dir / "compositing.yaml",
        {
            "inference.mode": "in_process",
            "inference.config": "inference.yaml",
            "inference.overrides": ["capacity.max_models=3"],
        },
    )
    assert config.max_models == 2 and config.inference_overrides == ("capacity.max_models=3",)
    engine = InProcessInference(config)
    try:
        assert engine.core.config.max_models == 3 and not engine.core.config.onnx.allow_spinning
    finally:
        engine.core.close()
    with pytest.raises(ConfigError, match=r"inference\.overrides"):
        parse_config({"models_root": str(models_dir), "inference": {"overrides": "x=1"}})


def test_an_avatars_geometry_defaults_to_328_and_takes_a_family(models_dir: Path) -> None:
    from lipsync_protocol.geometry import GEOMETRIES

    config = load_config(models_dir / "compositing.yaml", {"models.unet328.geometry": "160"}, environ={})
    assert config.models["demo"].geometry == GEOMETRIES["328"]
    assert config.models["unet328"].geometry == GEOMETRIES["160"]
    with pytest.raises(ConfigError, match=r"models\.demo\.geometry: expected one of"):
        load_config(models_dir / "compositing.yaml", {"models.demo.geometry": 320}, environ={})
