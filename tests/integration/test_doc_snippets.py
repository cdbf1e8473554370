"""The Python blocks of README.md and docs/*.md, run as a user would run them, against real services.

Each block runs as written, in a folder holding what the docs assume a user has: `speech.wav` (two seconds of
the committed speech sample) and `models/` (what `make models` writes). Only the compositing address the docs
name (`make run`'s 127.0.0.1:8080, or the service's own 127.0.0.1:50052) is replaced by the test server's. A
block that raises fails its test, and so does one that writes none of the files it names.
"""

from __future__ import annotations

import re
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ServerThread, make_compositing_config

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
ADDRESSES = ("127.0.0.1:8080", "127.0.0.1:50052")
SPEECH = ROOT / "tests" / "data" / "speech_16k.wav"
SPEECH_SECONDS = 2.0


def python_blocks() -> list:
    blocks = []
    for path in DOCUMENTS:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 2  # the block's first line of code
            name = f"{path.relative_to(ROOT)}:{line}"
            blocks.append(pytest.param(name, match.group(1), id=name))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_a_python_example() -> None:
    names = [block.values[0] for block in BLOCKS]
    assert any(name.startswith("README.md:") for name in names), names


@pytest.fixture(scope="module")
def compositing(models_dir: Path, inference_server: ServerThread) -> Iterator[ServerThread]:
    server = ServerThread.compositing(make_compositing_config(models_dir, inference_server.address))
    yield server
    server.stop()


@pytest.fixture()
def user_folder(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    with wave.open(str(SPEECH)) as source, wave.open(str(tmp_path / "speech.wav"), "wb") as out:
        out.setparams(source.getparams())
        out.writeframes(source.readframes(int(SPEECH_SECONDS * source.getframerate())))
    (tmp_path / "models").symlink_to(models_dir)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("name", "code"), BLOCKS)
def test_python_block_runs(
    name: str, code: str, compositing: ServerThread, user_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    for address in ADDRESSES:
        code = code.replace(address, compositing.address)
    exec(compile(code, name, "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip(), f"{name} printed nothing"
    for video in re.findall(r"""["']([\w./-]+\.mp4)["']""", code):
        assert (user_folder / video).stat().st_size > 0, f"{name}: {video} is empty"
    for folder in re.findall(r"""frames_dir=["']([\w./-]+)["']""", code):
        assert any((user_folder / folder).glob("*.jpg")), f"{name}: no frames in {folder}"
