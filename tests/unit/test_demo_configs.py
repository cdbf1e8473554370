"""The configs lipsync-models writes are data dumped as YAML, and both services' schemas accept them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compositing_service.config import load_config as load_compositing
from demo_models.export import HEADER, render_compositing_config, render_config
from inference_service.config import load_config as load_inference
from lipsync_protocol.geometry import GEOMETRIES


@pytest.mark.parametrize("include_unet328", [True, False])
def test_the_demo_configs_load_through_both_schemas(tmp_path: Path, include_unet328: bool) -> None:
    (tmp_path / "inference.yaml").write_text(render_config(tmp_path, include_unet328))
    (tmp_path / "compositing.yaml").write_text(render_compositing_config(tmp_path, include_unet328))
    names = {"demo", "demo160", *({"unet328"} if include_unet328 else set())}
    inference = load_inference(tmp_path / "inference.yaml", environ={})
    compositing = load_compositing(tmp_path / "compositing.yaml", environ={})
    assert set(inference.models) == names and set(compositing.models) == names
    assert inference.serving.plaintext and compositing.serving.plaintext and compositing.inference_tls is None
    assert inference.models["demo160"].geometry == GEOMETRIES["160"] and inference.models["demo"].geometry is None
    assert compositing.models["demo160"].geometry == GEOMETRIES["160"]
    assert compositing.inference_config == (tmp_path / "inference.yaml").resolve()
    assert inference.models_root == compositing.models_root == tmp_path.resolve()


def test_the_plaintext_decision_is_written_down_and_the_160_family_stays_a_string(tmp_path: Path) -> None:
    for text in (render_config(tmp_path), render_compositing_config(tmp_path)):
        assert text.startswith(HEADER) and "server.plaintext: true asks for plain text" in HEADER
        data = yaml.safe_load(text)
        assert data["server"]["plaintext"] is True
        assert data["models"]["demo160"]["geometry"] == "160"  # not the integer 160
    odd = tmp_path / "a: b #c"  # a dump quotes what string concatenation would have broken
    odd.mkdir()
    assert yaml.safe_load(render_config(odd))["models_root"] == str(odd.resolve())
