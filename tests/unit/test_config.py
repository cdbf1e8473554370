"""Config: old keys, overrides, and start-time failures that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inference_service.config import load_config, parse_config
from service_common.config_source import ConfigError, env_overrides, parse_listen_address


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "a.onnx").write_bytes(b"")
    path = tmp_path / "inference.yaml"
    path.write_text(text)
    return path


OLD_STYLE = """
models_root: m
server:
  port: ":50061"
  max_message_size_mb: 32
  worker_count_per_gpu: 3
gpus:
  enabled: true
  count: 2
  memory_gb_per_gpu: 24
  assignment_strategy: round-robin
capacity:
  max_models: 5
  max_memory_gb: 1.5
  eviction_policy: lfu
onnx:
  library_path: /usr/lib/libonnxruntime.so
  intra_op_threads: 2
  inter_op_threads: 1
models:
  a:
    model_path: a.onnx
    preload: true
    preferred_gpu: 1
"""


def test_old_keys_are_read_and_relative_paths_resolve_against_models_root(tmp_path: Path) -> None:
    path = write(tmp_path, OLD_STYLE)
    # The old system served plain text silently; here it must be asked for (or TLS configured).
    with pytest.raises(ConfigError, match=r"^server\.tls: (?s:.*)\nplaintext: true\n.*server\.plaintext: true"):
        load_config(path, environ={})
    config = load_config(path, ["server.plaintext=true"], environ={})
    assert config.serving.plaintext and config.serving.tls is None
    assert config.models_root == (tmp_path / "m").resolve()
    assert (config.host, config.port) == ("0.0.0.0", 50061)
    assert config.max_message_bytes == 32 * 1024 * 1024
    assert config.worker_count_per_gpu == 3 and config.gpu_count == 2 and config.memory_gb_per_gpu == 24
    assert config.max_models == 5 and config.max_memory_bytes == int(1.5 * 1024**3)
    assert config.onnx.intra_op_threads == 2
    model = config.models["a"]
    assert model.model_path == (tmp_path / "m" / "a.onnx").resolve()
    assert model.preload and model.preferred_gpu == 1 and model.audio_encoder_path is None


def test_environment_then_set_overrides_win(tmp_path: Path) -> None:
    path = write(tmp_path, OLD_STYLE)
    env = {
        "LIPSYNC_CAPACITY__MAX_MODELS": "7",
        "LIPSYNC_SERVER__PORT": "127.0.0.1:6000",
        "LIPSYNC_SERVER__PLAINTEXT": "true",
        "OTHER": "x",
    }
    config = load_config(path, environ=env)
    assert config.max_models == 7 and (config.host, config.port) == ("127.0.0.1", 6000)
    config = load_config(path, ["capacity.max_models=9", "models.a.preload=false"], environ=env)
    assert config.max_models == 9 and not config.models["a"].preload
    assert env_overrides({"LIPSYNC_": "1"}) == {}


@pytest.mark.parametrize(
    "change, key",
    [
        ({"capacity": {"max_models": 0}}, "capacity.max_models"),
        ({"capacity": {"max_models": "many"}}, "capacity.max_models"),
        ({"capacity": {"eviction_policy": "lru"}}, "capacity.eviction_policy"),
        ({"server": {"port": "fifty"}}, "server.port"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"worker_count_per_gpu": -1}}, "server.worker_count_per_gpu"),
        ({"gpus": {"enabled": "maybe"}}, "gpus.enabled"),
        ({"gpus": {"assignment_strategy": "random"}}, "gpus.assignment_strategy"),
        ({"onnx": {"intra_op_threads": 1.5}}, "onnx.intra_op_threads"),
        ({"capacity": {"max_memory_gb": "lots"}}, "capacity.max_memory_gb"),
        ({"models": {"a": {"preload": True}}}, "models.a.model_path"),
        ({"models": {"../x": {"model_path": "a.onnx"}}}, "models.../x"),
        ({"models": {"a": "a.onnx"}}, "models.a"),
        ({"models_root": None}, "models_root"),
        ({"models_root": "/definitely/not/here"}, "models_root"),
        ({"server": "fast"}, "server"),
    ],
)
def test_invalid_values_fail_naming_the_key(tmp_path: Path, change: dict, key: str) -> None:
    raw = {"models_root": str(tmp_path), "models": {}}
    raw.update(change)
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(key), str(err.value)


def test_unreadable_or_non_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, environ={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(broken, environ={})
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["no-equals-sign"], environ={})


@pytest.mark.parametrize(
    "value, expected",
    [
        (":50051", ("0.0.0.0", 50051)),
        ("50051", ("0.0.0.0", 50051)),
        (50052, ("0.0.0.0", 50052)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:9", ("[::1]", 9)),
    ],
)
def test_listen_address_forms(value, expected) -> None:
    assert parse_listen_address(value, "server.port") == expected


def test_booleans_and_strings_accept_yaml_spellings(tmp_path: Path) -> None:
    config = parse_config(
        {"models_root": str(tmp_path), "server": {"plaintext": "yes"}, "gpus": {"enabled": "off", "required": "yes"}}
    )
    assert not config.gpus_enabled and config.gpus_required


def test_max_connection_age_becomes_a_server_option(tmp_path: Path) -> None:
    from service_common.grpc_glue import server_options

    config = parse_config(
        {"models_root": str(tmp_path), "server": {"max_connection_age_seconds": 60, "plaintext": True}}
    )
    options = dict(server_options(config.max_message_bytes, config.max_connection_age_s))
    assert options["grpc.max_connection_age_ms"] == 60_000 and options["grpc.max_connection_age_grace_ms"] == 60_000
    assert "grpc.max_connection_age_ms" not in dict(server_options(1 << 20))


def test_per_model_geometry_spinning_and_input_cache(tmp_path: Path) -> None:
    """models.<id>.geometry (a family or a mapping), models.<id>.allow_spinning over onnx.allow_spinning, and
    capacity.input_cache_mb."""
    from lipsync_protocol.geometry import GEOMETRIES

    config = load_config(
        write(tmp_path, OLD_STYLE),
        {
            "models.a.geometry": "160",
            "models.a.allow_spinning": True,
            "models.b.model_path": "a.onnx",
            "models.b.geometry": {"base": "328", "mask": [6, 6, 300, 300], "paste_interpolation": "linear"},
            "capacity.input_cache_mb": 64,
            "plaintext": True,
        },
        environ={},
    )
    a, b = config.models["a"], config.models["b"]
    assert a.geometry == GEOMETRIES["160"] and a.onnx_for(config.onnx).allow_spinning is True
    assert b.onnx_for(config.onnx) is config.onnx and config.onnx.allow_spinning is False  # inherits the default
    assert b.geometry.mask == (6, 6, 300, 300) and b.geometry.paste_interpolation == "linear"
    assert b.geometry.crop_size == 328 and config.input_cache_bytes == 64 << 20
    assert config.onnx.spin_between_runs is False  # runs stop their threads spinning when they return


@pytest.mark.parametrize(
    ("geometry", "names"),
    [
        ("170", "models.a.geometry: expected one of 328, 160"),
        ({"mask": [5, 5, 400, 10]}, "does not lie inside"),
        ({"crop_size": 100}, "smaller than inner"),
        ({"crop_interpolation": "nearest"}, "models.a.geometry.crop_interpolation"),
        ({"masks": [1, 1, 1, 1]}, "models.a.geometry.masks: unknown key"),
        ({"mask": [1, 2, 3]}, "models.a.geometry.mask: expected [x, y, w, h]"),
    ],
)
def test_bad_geometries_name_the_key(tmp_path: Path, geometry, names: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(names)):
        load_config(write(tmp_path, OLD_STYLE), {"models.a.geometry": geometry, "plaintext": True}, environ={})
