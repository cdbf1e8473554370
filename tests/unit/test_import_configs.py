"""Adding an imported model to inference.yaml and compositing.yaml: new files load, old entries survive."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compositing_service.config import load_config as load_compositing
from demo_models.export import render_compositing_config, render_config
from inference_service.config import load_config as load_inference
from model_import import ModelImportError
from model_import.configs import add_model, compositing_entry, inference_entry, update_configs


def quiet(_: str) -> None:
    pass


def test_created_files_load_in_both_services(tmp_path: Path) -> None:
    update_configs(tmp_path, "alice", "328", True, quiet)
    inference = load_inference(tmp_path / "inference.yaml", environ={})  # serving needs TLS or plaintext: true
    model = inference.models["alice"]
    assert model.model_path == tmp_path.resolve() / "alice" / "model.onnx"
    assert model.audio_encoder_path == tmp_path.resolve() / "alice" / "audio_encoder.onnx"
    compositing = load_compositing(tmp_path / "compositing.yaml", environ={})
    avatar = compositing.models["alice"]
    assert avatar.background == tmp_path.resolve() / "alice" / "frames"
    assert avatar.crop_rects_path == tmp_path.resolve() / "alice" / "crop_rects.json"
    assert avatar.model_path == "alice/model.onnx"
    assert compositing.inference_config == (tmp_path / "inference.yaml").resolve()
    for name in ("inference.yaml", "compositing.yaml"):
        assert "geometry" not in (tmp_path / name).read_text()  # 328 is the services' default


def test_160_entries_carry_the_geometry_key(tmp_path: Path) -> None:
    update_configs(tmp_path, "bob", "160", False, quiet)
    inference = yaml.safe_load((tmp_path / "inference.yaml").read_text())
    compositing = yaml.safe_load((tmp_path / "compositing.yaml").read_text())
    assert inference["models"]["bob"] == {"model_path": "bob/model.onnx", "geometry": "160"}
    assert compositing["models"]["bob"] == {
        "model_path": "bob/model.onnx",
        "background_dir": "bob/frames",
        "crop_rects_path": "bob/crop_rects.json",
        "geometry": "160",
    }
    assert compositing["server"]["plaintext"] is True and inference["server"]["plaintext"] is True
    for name in ("inference.yaml", "compositing.yaml"):
        assert '\n    geometry: "160"\n' in (tmp_path / name).read_text()


def test_existing_entries_and_comments_survive(tmp_path: Path) -> None:
    text = render_config(tmp_path).replace("models:\n", "# our models, keep this note\nmodels:\n")
    text = text.replace("  unet328:\n", "  # the big one\n  unet328:\n") + "# trailing remark\nwarmup: true\n"
    (tmp_path / "inference.yaml").write_text(text)
    (tmp_path / "compositing.yaml").write_text(render_compositing_config(tmp_path))
    before_inf = yaml.safe_load(text)
    before_comp = yaml.safe_load((tmp_path / "compositing.yaml").read_text())
    notes: list[str] = []
    update_configs(tmp_path, "carol", "328", True, notes.append)
    assert notes == []  # spliced as text, no rewrite
    after_text = (tmp_path / "inference.yaml").read_text()
    for line in text.splitlines():
        assert line in after_text.splitlines()  # every old line, comments included, is still there
    after_inf = yaml.safe_load(after_text)
    assert {k: v for k, v in after_inf["models"].items() if k != "carol"} == before_inf["models"]
    assert after_inf["models"]["carol"] == inference_entry("carol", "328", True)
    assert after_inf["warmup"] is True
    after_comp = yaml.safe_load((tmp_path / "compositing.yaml").read_text())
    assert after_comp["models"] == {**before_comp["models"], "carol": compositing_entry("carol", "328")}
    assert {k: v for k, v in after_comp.items() if k != "models"} == {
        k: v for k, v in before_comp.items() if k != "models"
    }
    # Both services still load the edited files, with every model.
    every = {"demo", "demo160", "unet328", "carol"}
    assert set(load_inference(tmp_path / "inference.yaml", environ={}).models) == every
    assert set(load_compositing(tmp_path / "compositing.yaml", environ={}).models) == every


def test_reimport_replaces_its_entry_and_keeps_the_operators_keys(tmp_path: Path) -> None:
    path = tmp_path / "inference.yaml"
    update_configs(tmp_path, "dave", "328", True, quiet)
    update_configs(tmp_path, "erin", "328", True, quiet)
    path.write_text(
        path.read_text().replace(
            "    model_path: dave/model.onnx\n", "    model_path: dave/model.onnx\n    preload: true  # warm\n"
        )
    )
    add_model(path, "inference.yaml", "dave", inference_entry("dave", "160", False), quiet)
    text = path.read_text()
    data = yaml.safe_load(text)
    assert data["models"]["dave"] == {"model_path": "dave/model.onnx", "geometry": "160", "preload": True}
    assert data["models"]["erin"] == inference_entry("erin", "328", True)
    assert text.count("dave:") == 1 and list(data["models"]) == ["dave", "erin"]


@pytest.mark.parametrize(
    "models_text",
    ["models: {}\n", "models:\n", "", "models:\n    zed:\n        model_path: zed.onnx\n"],
    ids=["empty-flow", "empty-block", "absent", "four-space-indent"],
)
def test_other_shapes_of_models_block(tmp_path: Path, models_text: str) -> None:
    path = tmp_path / "inference.yaml"
    head = f'models_root: "{tmp_path}"\nserver:\n  plaintext: true  # keep me\n'
    path.write_text(head + models_text)
    notes: list[str] = []
    add_model(path, "inference.yaml", "007", inference_entry("007", "328", False), notes.append)
    data = yaml.safe_load(path.read_text())
    assert data["models"]["007"] == {"model_path": "007/model.onnx"}  # the id stays a string, not 7
    assert "# keep me" in path.read_text() and notes == []
    if "zed" in models_text:
        assert data["models"]["zed"] == {"model_path": "zed.onnx"}
    assert "007" in load_inference(path, environ={}).models


def test_a_flow_mapping_is_rewritten_with_a_note(tmp_path: Path) -> None:
    path = tmp_path / "inference.yaml"
    path.write_text(
        f'models_root: "{tmp_path}"  # a comment\nserver: {{plaintext: true}}\nmodels: {{a: {{model_path: a.onnx}}}}\n'
    )
    notes: list[str] = []
    add_model(path, "inference.yaml", "b", inference_entry("b", "328", False), notes.append)
    data = yaml.safe_load(path.read_text())
    assert data["models"] == {"a": {"model_path": "a.onnx"}, "b": {"model_path": "b/model.onnx"}}
    assert len(notes) == 1 and "comments were not kept" in notes[0]


def test_bad_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "inference.yaml"
    path.write_text("models: [\n")
    with pytest.raises(ModelImportError, match=rf"{path}: not valid YAML"):
        add_model(path, "inference.yaml", "x", {}, quiet)
    path.write_text("- a\n- b\n")
    with pytest.raises(ModelImportError, match="expected a mapping"):
        add_model(path, "inference.yaml", "x", {}, quiet)
    path.write_text("models: [a, b]\n")
    with pytest.raises(ModelImportError, match="models is not a mapping"):
        add_model(path, "inference.yaml", "x", {}, quiet)


def test_a_foreign_models_root_is_noted(tmp_path: Path) -> None:
    path = tmp_path / "inference.yaml"
    path.write_text('models_root: "/somewhere/else"\nmodels:\n')
    notes: list[str] = []
    add_model(path, "inference.yaml", "x", inference_entry("x", "328", False), notes.append)
    assert len(notes) == 1 and "/somewhere/else" in notes[0]
