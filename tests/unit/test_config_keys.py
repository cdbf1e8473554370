"""Both services' schemas: unknown keys at every level, bounds, choices, defaults, variables, the Go files."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from compositing_service import config as compositing
from inference_service import config as inference
from service_common.config_source import ConfigError, env_name, set_path

DATA = Path(__file__).resolve().parents[1] / "data"
SERVICES = {"inference": inference, "compositing": compositing}
ENTRY = {
    "inference": {"model_path": "a.onnx"},
    "compositing": {"background_dir": "frames", "crop_rects_path": "rects.json"},
}


def base(service: str, root: Path) -> dict[str, Any]:
    return {"models_root": str(root), "plaintext": True, "models": {"a": dict(ENTRY[service])}}


def parse(service: str, root: Path, changes: dict[str, Any]) -> Any:
    raw = base(service, root)
    for dotted, value in changes.items():
        set_path(raw, dotted, value)
    return SERVICES[service].parse_config(raw, root)


@pytest.mark.parametrize(
    ("service", "key", "meant"),
    [
        ("inference", "onnx.intra_op_thread", "onnx.intra_op_threads"),
        ("inference", "model_root", "models_root"),
        ("inference", "sever", "server"),
        ("inference", "server.max_batch", "server.max_batch_size"),
        ("inference", "server.max_models", "capacity.max_models"),
        ("inference", "gpus.enable", "gpus.enabled"),
        ("inference", "capacity.input_cache", "capacity.input_cache_mb"),
        ("inference", "batching.max_batch_frame", "batching.max_batch_frames"),
        ("inference", "logging.levels", "logging.level"),
        ("inference", "metrics.prot", "metrics.port"),
        ("inference", "auth.token_file", "auth.tokens_file"),
        ("inference", "server.tls.cert", "server.tls.cert_file"),
        ("inference", "models.a.preloads", "models.a.preload"),
        ("inference", "models.a.batching.enable", "models.a.batching.enabled"),
        ("inference", "models.a.intra_op_threads", None),  # a service-wide key: not offered inside a model
        ("compositing", "output.jpeg_qualty", "output.jpeg_quality"),
        ("compositing", "session.max_session", "session.max_sessions"),
        ("compositing", "inference_server.timeout", "inference_server.timeout_seconds"),
        ("compositing", "inference_server.tls.ca", "inference_server.tls.ca_file"),
        ("compositing", "inference.override", "inference.overrides"),
        ("compositing", "capacity.background_cache_frame", "capacity.background_cache_frames"),
        ("compositing", "frame_cache_dir", "frames_cache_dir"),
        ("compositing", "models.a.num_frame", "models.a.num_frames"),
        ("compositing", "models.a.preload", "models.a.preload_backgrounds"),
    ],
)
def test_an_unknown_key_at_any_level_fails_naming_the_likely_one(
    service: str, key: str, meant: str | None, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        parse(service, tmp_path, {key: 1})
    message = str(err.value)
    assert message.startswith(f"{key}: unknown key"), message
    if meant:
        assert message.endswith(f"(did you mean {meant}?)"), message
    else:
        assert "(expected one of " in message, message


def bounded(service: str) -> list[tuple[str, str, Any]]:
    """Every key with a bound: (service, its dotted name with model id a, a value past the bound)."""
    cases = []
    for name, key in SERVICES[service].SCHEMA.rows():
        step = 1 if key.kind == "int" else 0.5
        dotted = name.replace("<id>", "a")
        if key.minimum is not None:
            cases.append((service, dotted, key.minimum - step))
        if key.maximum is not None:
            cases.append((service, dotted, key.maximum + step))
    return cases


@pytest.mark.parametrize(("service", "key", "value"), [*bounded("inference"), *bounded("compositing")])
def test_every_bound_is_enforced(service: str, key: str, value: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected an? (integer|number) [<>]= "):
        parse(service, tmp_path, {key: value})


def choices(service: str) -> list[tuple[str, str]]:
    return [(service, name) for name, key in SERVICES[service].SCHEMA.rows() if key.choices and "<id>" not in name]


@pytest.mark.parametrize(("service", "key"), [*choices("inference"), *choices("compositing")])
def test_every_choice_refuses_other_words(service: str, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected "):
        parse(service, tmp_path, {key: "surely-not-a-choice"})


def test_inference_defaults_are_the_schemas(tmp_path: Path) -> None:
    config = parse("inference", tmp_path, {})
    default = inference.SCHEMA.default
    assert (config.host, config.port) == ("0.0.0.0", 50051) and default("server.port") == ("0.0.0.0", 50051)
    assert config.serving.metrics.port == 9091 and config.serving.metrics.host == "0.0.0.0"
    assert (config.serving.max_inflight_requests, config.serving.max_queued_requests) == (64, 64)
    assert config.input_cache_bytes == 1024 << 20 and config.max_models == 8 and config.log_level == "INFO"
    assert config.onnx == dataclasses.replace(inference.OnnxConfig(), tensorrt_cache_dir=tmp_path / ".trt-cache")
    model = config.models["a"]
    assert model == inference.ModelConfig("a", tmp_path / "a.onnx")  # the dataclass defaults are the schema's
    assert model.batching == inference.BatchingConfig() and model.allow_spinning is None
    for field in dataclasses.fields(inference.OnnxConfig):
        if field.name != "tensorrt_cache_dir":
            assert field.default == default(f"onnx.{field.name}"), field.name


def test_compositing_defaults_are_the_schemas(tmp_path: Path) -> None:
    from lipsync_protocol.geometry import DEFAULT

    config = parse("compositing", tmp_path, {})
    assert (config.port, config.serving.metrics.port) == (50052, 9092)
    assert (config.serving.max_inflight_requests, config.serving.max_queued_requests) == (8, 32)
    assert config.inference_targets == ("127.0.0.1:50051",) and config.inference_overrides == ()
    assert (config.output_format, config.jpeg_subsampling, config.frame_order) == ("jpeg", "420", "ping_pong")
    assert config.background_cache_bytes == 2048 << 20 and config.session_max_audio_ahead_s == 10.0
    avatar = config.models["a"]
    assert avatar.geometry == DEFAULT and avatar.inference_model == "a" and avatar.model_path == ""


def test_variables_are_named_from_the_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "inference.yaml").write_text(f"models_root: {tmp_path}\nplaintext: true\n")
    env = {
        env_name("onnx.intra_op_threads"): "3",
        env_name("models.a.model_path"): "b.onnx",
        env_name("models.a.batching.max_batch_frames"): "4",
        env_name("server.composite_threads"): "2",  # the compositing service's key
    }
    assert env_name("models.<id>.batching.max_batch_frames") == "LIPSYNC_MODELS__<ID>__BATCHING__MAX_BATCH_FRAMES"
    with caplog.at_level(logging.WARNING):
        config = inference.load_config(tmp_path / "inference.yaml", environ=env)
    assert config.onnx.intra_op_threads == 3 and config.models["a"].batching.max_batch_frames == 4
    assert config.models["a"].model_path == tmp_path / "b.onnx"
    assert "LIPSYNC_SERVER__COMPOSITE_THREADS names no key of the inference service; ignored" in caplog.text
    composited = compositing.load_config(
        None, {"models_root": str(tmp_path), "plaintext": True}, {"LIPSYNC_SERVER__COMPOSITE_THREADS": "2"}
    )
    assert composited.composite_threads == 2


def go_config(name: str, root: Path) -> dict[str, Any]:
    import yaml

    text = (DATA / "go_configs" / name).read_text()
    text = text.replace("@MODELS_ROOT@", str(root)).replace("@INFERENCE_PORT@", "50061")
    return yaml.safe_load(text.replace("@COMPOSITING_PORT@", "50062"))


def test_the_go_files_load_and_their_dead_keys_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        inf = inference.parse_config(go_config("inference.yaml", tmp_path), tmp_path)
        comp = compositing.parse_config(go_config("compositing.yaml", tmp_path), tmp_path)
    assert inf.onnx.intra_op_threads == 4 and inf.worker_count_per_gpu == 8 and len(inf.models) == 4
    assert comp.models["sanders"].num_frames == 523 and comp.inference_timeout_s == 10
    for key in (
        "server.queue_size",
        "gpus.allow_multi_gpu_models",
        "capacity.idle_timeout_minutes",
        "onnx.library_path",
        "onnx.cuda_streams_per_worker",
        "logging.log_inference_times",
        "logging.log_gpu_utilization",
        "logging.buffered_logging",
        "logging.flush_interval_ms",
    ):
        assert f"config: {key} is ignored (" in caplog.text, key
    assert "unknown key" not in caplog.text
    raw = go_config("inference.yaml", tmp_path)
    raw["onnx"]["intra_op_thread"] = 2  # what used to pass silently
    with pytest.raises(ConfigError, match=r"^onnx\.intra_op_thread: unknown key \(did you mean onnx\.intra_op_threads"):
        inference.parse_config(raw, tmp_path)


def test_two_spellings_of_the_inference_targets(tmp_path: Path) -> None:
    assert parse("compositing", tmp_path, {"inference_server.urls": ["a:1", "b:2"]}).inference_targets == (
        "a:1",
        "b:2",
    )
    with pytest.raises(ConfigError, match=r"inference_server\.url and inference_server\.urls: two spellings"):
        parse("compositing", tmp_path, {"inference_server.url": "a:1", "inference_server.urls": ["b:2"]})


def test_models_added_after_start_batch_as_the_top_level_says(tmp_path: Path) -> None:
    from inference_service.devices import cpu_device
    from inference_service.registry import ModelRegistry

    config = parse("inference", tmp_path, {"batching.enabled": True, "batching.max_batch_frames": 24})
    assert config.models["a"].batching == config.batching  # a configured model without its own batching.*
    (tmp_path / "late").mkdir()
    (tmp_path / "late" / "model.onnx").write_bytes(b"x")
    (tmp_path / "loose.onnx").write_bytes(b"x")
    registry = ModelRegistry(config, [cpu_device(config)])
    for spec in (registry.spec_for("late"), registry.spec_for("loose", "loose.onnx")):
        assert spec.batching.enabled and spec.batching.max_batch_frames == 24
