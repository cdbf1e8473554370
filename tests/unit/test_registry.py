"""Model registry: LFU eviction, capacity by count and memory, safe loads, paths kept inside models_root."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from inference_service.config import parse_config
from inference_service.devices import select_devices
from inference_service.registry import ModelRegistry
from lipsync_protocol.errors import InvalidArgument, NotFound, ResourceExhausted


def registry_for(root: Path, **capacity) -> ModelRegistry:
    config = parse_config({"models_root": str(root), "capacity": capacity, "warmup": False}, serving=False)
    return ModelRegistry(config, select_devices(config, ["CPUExecutionProvider"], []))


@pytest.fixture()
def root(models_dir: Path, tmp_path: Path) -> Path:
    """models_root with five copies of the demo model under the folder convention."""
    for name in ("m1", "m2", "m3", "m4", "m5"):
        (tmp_path / name).mkdir()
        shutil.copy(models_dir / "demo" / "model.onnx", tmp_path / name / "model.onnx")
    shutil.copy(models_dir / "demo" / "audio_encoder.onnx", tmp_path / "m1" / "audio_encoder.onnx")
    return tmp_path


def use(registry: ModelRegistry, model_id: str, times: int) -> None:
    for _ in range(times):
        entry, _ = registry.checkout(model_id)
        registry.release(entry, frames=1, inference_ms=1.0)


def test_least_frequently_used_goes_first(root: Path) -> None:
    registry = registry_for(root, max_models=3)
    for model_id, uses in (("m1", 5), ("m2", 1), ("m3", 3)):
        registry.load(model_id)
        use(registry, model_id, uses)
    outcome = registry.load("m4")
    assert outcome.evicted == ["m2"]
    use(registry, "m4", 4)
    assert registry.load("m5").evicted == ["m3"]
    assert sorted(e.model_id for e in registry.entries()) == ["m1", "m4", "m5"]
    assert registry.evictions == 2


def test_ties_go_to_the_least_recently_used(root: Path) -> None:
    registry = registry_for(root, max_models=2)
    registry.load("m1")
    registry.load("m2")
    use(registry, "m2", 1)
    use(registry, "m1", 1)
    assert registry.load("m3").evicted == ["m2"]


def test_memory_capacity_evicts_until_the_new_model_fits(root: Path) -> None:
    size = (root / "m2" / "model.onnx").stat().st_size
    registry = registry_for(root, max_models=10, max_memory_gb=(2.5 * size) / 1024**3)
    registry.load("m2")
    registry.load("m3")
    use(registry, "m3", 2)
    assert registry.load("m4").evicted == ["m2"]
    too_big = registry_for(root, max_models=10, max_memory_gb=(0.5 * size) / 1024**3)
    with pytest.raises(ResourceExhausted, match="max_memory_gb"):
        too_big.load("m2")


def test_a_model_serving_a_request_is_never_evicted(root: Path) -> None:
    registry = registry_for(root, max_models=2)
    busy1, _ = registry.checkout("m1")
    busy2, _ = registry.checkout("m2")
    with pytest.raises(ResourceExhausted, match="serving requests"):
        registry.load("m3")
    registry.release(busy2)
    assert registry.load("m3").evicted == ["m2"]
    assert busy1.resident and not busy2.resident
    # An unloaded model keeps its session until the request holding it ends.
    registry.unload("m1")
    assert busy1.model.session.run(None, _zeros(busy1)) is not None
    registry.release(busy1)


def _zeros(entry):
    import numpy as np

    return {"input": np.zeros((1, 6, 320, 320), np.float32), "audio": np.zeros((1, 32, 16, 16), np.float32)}


def test_failed_reload_leaves_the_previous_model_serving(root: Path) -> None:
    registry = registry_for(root, max_models=3)
    first = registry.load("m1").entry
    (root / "m1" / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(InvalidArgument, match="ONNX Runtime could not load"):
        registry.load("m1", force_reload=True)
    assert registry.get("m1") is first and first.resident


def test_force_reload_replaces_the_entry(root: Path) -> None:
    registry = registry_for(root, max_models=2)
    first = registry.load("m1").entry
    second = registry.load("m1", force_reload=True)
    assert not second.already_loaded and second.entry is not first and not first.resident
    assert registry.load("m1").already_loaded


def test_load_by_path_stays_inside_models_root(root: Path, tmp_path_factory) -> None:
    registry = registry_for(root, max_models=3)
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(root / "m1" / "model.onnx", outside / "model.onnx")
    (root / "link").symlink_to(outside)
    for bad in ("../outside/model.onnx", str(outside / "model.onnx"), "link/model.onnx", "m1/../../x.onnx"):
        with pytest.raises(InvalidArgument, match="model_path"):
            registry.load("x", model_path=bad)
    with pytest.raises(NotFound):
        registry.load("x", model_path="m1/missing.onnx")
    outcome = registry.load("extra", model_path="m2/model.onnx")
    assert outcome.entry.spec.model_path == (root / "m2" / "model.onnx").resolve()
    assert "extra" in registry.known_ids()
    # Once known, the id loads again without the path.
    registry.unload("extra")
    assert registry.load("extra").entry.model_id == "extra"


def test_audio_encoder_is_found_beside_the_model(root: Path) -> None:
    registry = registry_for(root)
    entry = registry.load("m1").entry
    assert entry.model.encoder is not None
    assert entry.memory_bytes == sum(p.stat().st_size for p in (root / "m1").iterdir())


def test_concurrent_requests_for_an_unloaded_model_load_it_once(root: Path) -> None:
    registry = registry_for(root, max_models=3)
    loads = []
    barrier = threading.Barrier(6)

    def request() -> None:
        barrier.wait()
        entry, outcome = registry.checkout("m3")
        if outcome is not None and not outcome.already_loaded:
            loads.append(outcome)
        registry.release(entry, 1, 1.0)

    threads = [threading.Thread(target=request) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1
    assert registry.get("m3").usage_count == 6


def test_unknown_and_invalid_ids(root: Path) -> None:
    registry = registry_for(root)
    with pytest.raises(NotFound, match="unknown model"):
        registry.load("m9")
    for bad in ("", "../m1", "a/b", "..", ".hidden", "x" * 200):
        with pytest.raises(InvalidArgument, match="model_id"):
            registry.load(bad)
    with pytest.raises(NotFound):
        registry.unload("m1")
