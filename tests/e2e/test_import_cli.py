"""`lipsync-import synctalk2d` as a user runs it: what it writes, and exit 2 naming the file for bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from synctalk import make_dataset, random_state, write_checkpoint, write_lms

from compositing_service.frames import ImageFolder, check_rects, load_rects
from model_import.cli import main

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run's checkpoint folder (160 model, epochs 0 and 95) and an audio encoder file."""
    folder = tmp_path_factory.mktemp("run")
    write_checkpoint(folder / "0.pth", random_state("audio_encoder"))  # refused if it were the one taken
    write_checkpoint(folder / "95.pth", random_state("160", seed=4), location="cuda:0")
    write_checkpoint(folder.parent / "audio_visual_encoder.pth", random_state("audio_encoder", seed=6))
    return folder


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def cli(checkpoint: Path, dataset: Path, models: Path, *extra: str, name: str = "bob") -> list[str]:
    paths = ["--checkpoint", str(checkpoint), "--dataset", str(dataset), "--models-dir", str(models)]
    return ["synctalk2d", *paths, "--name", name, *extra]


def test_a_160_import_writes_model_avatar_card_and_configs(
    checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = make_dataset(tmp_path / "dataset" / "bob", 6, size=(320, 240))
    models = tmp_path / "models"
    encoder = checkpoints.parent / "audio_visual_encoder.pth"
    code, out, err = run(cli(checkpoints, dataset, models, "--audio-encoder", str(encoder), "--frames", "5"), capsys)
    assert code == 0, err
    assert "a SyncTalk_2D 160 UNet, 484 tensors, 12,163,591 parameters" in err and "frames copied: 5/5" in err
    card = json.loads(out)
    assert card == json.loads((models / "bob" / "model_card.json").read_text())
    assert card["variant"] == "160" and card["source"]["checkpoint"].endswith("95.pth")
    assert card["geometry"]["crop_size"] == 168 and card["geometry"]["input_size"] == 160
    assert card["geometry"]["crop_interpolation"] == "INTER_LINEAR"
    assert card["avatar"]["frame_count"] == 5 and card["avatar"]["last_frame"] == "4.jpg"
    assert (card["avatar"]["frame_width"], card["avatar"]["frame_height"]) == (320, 240)
    assert card["audio_encoder"]["source"] == str(encoder.resolve()) and len(card["audio_encoder"]["sha256"]) == 64
    assert card["importer"]["name"] == "lipsync-import" and card["imported_at"].endswith("Z")

    session = ort.InferenceSession(str(models / "bob" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name: i.shape for i in session.get_inputs()} == {
        "input": ["batch", 6, 160, 160],
        "audio": ["batch", 32, 16, 16],
    }
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("output", ["batch", 3, 160, 160])]
    encoder_session = ort.InferenceSession(
        str(models / "bob" / "audio_encoder.onnx"), providers=["CPUExecutionProvider"]
    )
    assert encoder_session.run(None, {"mel": np.zeros((2, 1, 80, 16), np.float32)})[0].shape == (2, 512)

    folder = ImageFolder(models / "bob" / "frames")
    rects = load_rects(models / "bob" / "crop_rects.json")
    check_rects(rects, folder.shape, models / "bob" / "crop_rects.json")
    assert folder.count == len(rects) == 5
    inference = yaml.safe_load((models / "inference.yaml").read_text())["models"]["bob"]
    compositing = yaml.safe_load((models / "compositing.yaml").read_text())["models"]["bob"]
    assert inference == {
        "model_path": "bob/model.onnx",
        "audio_encoder_path": "bob/audio_encoder.onnx",
        "geometry": "160",
    }
    assert compositing == {
        "model_path": "bob/model.onnx",
        "background_dir": "bob/frames",
        "crop_rects_path": "bob/crop_rects.json",
        "geometry": "160",
    }

    # Again, without an encoder and with all frames: the folder and the entries are replaced, not doubled.
    code, out, err = run(cli(checkpoints / "95.pth", dataset, models, "--variant", "160"), capsys)
    assert code == 0, err
    assert folder.count == 5 and ImageFolder(models / "bob" / "frames").count == 6
    assert not (models / "bob" / "audio_encoder.onnx").exists()
    assert json.loads(out)["audio_encoder"]["source"] is None
    assert yaml.safe_load((models / "inference.yaml").read_text())["models"]["bob"] == {
        "model_path": "bob/model.onnx",
        "geometry": "160",
    }
    assert sorted(p.name for p in models.iterdir()) == ["bob", "compositing.yaml", "inference.yaml"]


Breaker = Callable[[Path], Path]  # spoils a dataset; returns the file the message must name


def _missing_frame(ds: Path) -> Path:
    (ds / "full_body_img" / "3.jpg").unlink()
    return ds / "landmarks" / "3.lms"


def _missing_landmarks(ds: Path) -> Path:
    (ds / "landmarks" / "2.lms").unlink()
    return ds / "full_body_img" / "2.jpg"


def _unreadable_landmarks(ds: Path) -> Path:
    (ds / "landmarks" / "1.lms").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return ds / "landmarks" / "1.lms"


def _too_few_points(ds: Path) -> Path:
    write_lms(ds / "landmarks" / "4.lms", 10, 10, 60, points=52)
    return ds / "landmarks" / "4.lms"


def _outside(ds: Path) -> Path:
    write_lms(ds / "landmarks" / "0.lms", 330, 20, 400)  # the frame is 320 wide
    return ds / "landmarks" / "0.lms"


def _empty_after_clipping(ds: Path) -> Path:
    write_lms(ds / "landmarks" / "5.lms", 100, 239, 150)  # 50 wide, but 1 row left at the bottom
    return ds / "landmarks" / "5.lms"


def _undecodable_frame(ds: Path) -> Path:
    (ds / "full_body_img" / "2.jpg").write_bytes(b"not a jpeg")
    return ds / "full_body_img" / "2.jpg"


@pytest.mark.parametrize(
    "breaker",
    [
        _missing_frame,
        _missing_landmarks,
        _unreadable_landmarks,
        _too_few_points,
        _outside,
        _empty_after_clipping,
        _undecodable_frame,
    ],
)
def test_bad_datasets_exit_2_naming_the_file(
    breaker: Breaker, checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = make_dataset(tmp_path / "ds", 6)
    named = breaker(dataset)
    models = tmp_path / "models"
    code, out, err = run(cli(checkpoints, dataset, models), capsys)
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith(f"lipsync-import: error: {named}")
    assert "Traceback" not in err
    assert not models.exists() or not any(models.iterdir())  # nothing written


def test_bad_checkpoints_exit_2_naming_the_file(
    checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = make_dataset(tmp_path / "ds", 2)
    whole = (checkpoints / "95.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    code, _, err = run(cli(cut, dataset, tmp_path / "m"), capsys)
    assert code == 2 and f"error: {cut}: the zip archive is truncated or corrupt" in err
    code, _, err = run(cli(checkpoints / "0.pth", dataset, tmp_path / "m"), capsys)
    assert code == 2 and "audio encoder checkpoint; pass it as --audio-encoder" in err
    code, _, err = run(cli(checkpoints, dataset, tmp_path / "m", "--variant", "328"), capsys)
    assert code == 2 and "not a SyncTalk_2D 328 UNet" in err and "missing: down5." in err
    code, _, err = run(
        cli(checkpoints, dataset, tmp_path / "m", "--audio-encoder", str(checkpoints / "95.pth")), capsys
    )
    assert code == 2 and f"{checkpoints / '95.pth'}: not the SyncTalk_2D ave audio encoder" in err
    code, _, err = run(cli(checkpoints, dataset, tmp_path / "m", "--audio-encoder", str(tmp_path / "no.pth")), capsys)
    assert code == 2 and "no such audio encoder checkpoint" in err


def test_a_foreign_folder_and_a_bad_name_are_refused(
    checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = make_dataset(tmp_path / "ds", 2)
    models = tmp_path / "models"
    (models / "demo").mkdir(parents=True)
    (models / "demo" / "model.onnx").write_bytes(b"someone's model")
    code, _, err = run(cli(checkpoints, dataset, models, name="demo"), capsys)
    assert code == 2 and "was not written by lipsync-import" in err
    assert (models / "demo" / "model.onnx").read_bytes() == b"someone's model"
    code, _, err = run(cli(checkpoints, dataset, models, name="../up"), capsys)
    assert code == 2 and "--name '../up'" in err


def test_the_console_script_exits_2_without_a_traceback(checkpoints: Path, tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "ds", 3)
    shutil.rmtree(dataset / "landmarks")
    result = subprocess.run(
        [str(BIN / "lipsync-import"), *cli(checkpoints, dataset, tmp_path / "models")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"{dataset / 'landmarks'}: no such folder (a SyncTalk_2D dataset has full_body_img/ and landmarks/)"
    )
    assert "Traceback" not in result.stderr
    usage = subprocess.run([str(BIN / "lipsync-import"), "synctalk2d"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "--checkpoint" in usage.stderr


def test_frames_must_be_positive(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(cli(tmp_path, tmp_path, tmp_path, "--frames", "0"))
    assert info.value.code == 2 and "positive number of frames" in capsys.readouterr().err
