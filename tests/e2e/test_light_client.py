"""The light client distribution (clients/python) alone in a virtual environment renders through running services.

The environment gets the client's wheel and, for its dependencies, links to grpcio, protobuf, numpy, PyAV and
soxr from this one (no download): no server package can be imported there, and `lipsync-client render` and the
library both work against real inference and compositing servers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from support import ServerThread, make_compositing_config, make_config

REPO = Path(__file__).resolve().parents[2]
SPEECH = REPO / "tests" / "data" / "speech_16k.wav"
# grpcio, protobuf, numpy and what they need; PyAV and soxr for files (the [media] extra)
DEPENDENCIES = ("grpc", "typing_extensions", "google", "numpy", "numpy.libs", "av", "av.libs", "soxr")


@pytest.fixture(scope="module")
def client_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("light-client")
    source = root / "src"
    shutil.copytree(REPO / "clients" / "python", source, symlinks=False)  # the packages, not links to them
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    wheels = root / "wheels"  # built here (setuptools is in this environment), installed there
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([*build, str(source)], check=True, capture_output=True)
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    subprocess.run([*install, *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    ours = Path(sysconfig.get_paths()["purelib"])
    links = root / "dependencies"
    links.mkdir()
    wanted = {
        found
        for name in DEPENDENCIES
        for found in ours.glob(f"{name}*")
        if name in (found.name, found.stem) or found.name.endswith((".libs", ".dist-info"))
    }
    for found in wanted:
        (links / found.name).symlink_to(found)
    (site / "dependencies.pth").write_text(f"{links}\n")
    return env


@pytest.fixture(scope="module")
def services(models_dir: Path):
    inference = ServerThread(make_config(models_dir))
    compositing = ServerThread.compositing(make_compositing_config(models_dir, inference.address, warmup=False))
    yield compositing
    compositing.stop()
    inference.stop()


def run(env: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=env, env={"PATH": f"{env}/bin"})


def test_only_the_client_is_there(client_env: Path) -> None:
    probe = (
        "import importlib.util as u; print([m for m in ('inference_service', 'compositing_service', "
        "'service_common', 'onnxruntime', 'cv2') if u.find_spec(m)])"
    )
    found = run(client_env, str(client_env / "bin" / "python"), "-c", probe)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stderr


def test_the_light_client_renders_through_the_services(
    client_env: Path, services: ServerThread, tmp_path: Path
) -> None:
    out = tmp_path / "talking.mp4"
    cli = run(
        client_env,
        str(client_env / "bin" / "lipsync-client"),
        *("render", "--server", services.address, "--model", "demo", "--audio", str(SPEECH), "--out", str(out)),
        "--no-progress",
    )
    assert cli.returncode == 0, cli.stderr
    assert out.stat().st_size > 10_000
    script = (
        "import json, sys\n"
        "from lipsync_client import LipsyncClient\n"
        f"with LipsyncClient({services.address!r}) as client:\n"
        f"    result = client.render('demo', {str(SPEECH)!r}, frames_dir={str(tmp_path / 'frames')!r})\n"
        "print(json.dumps({'frames': result.frames, 'modules': sorted(m.split('.')[0] for m in sys.modules)}))\n"
    )
    library = run(client_env, str(client_env / "bin" / "python"), "-c", script)
    assert library.returncode == 0, library.stderr
    reply = json.loads(library.stdout)
    assert reply["frames"] == len(list((tmp_path / "frames").glob("*.jpg"))) > 25
    assert not {"inference_service", "compositing_service", "service_common", "onnxruntime", "cv2"} & set(
        reply["modules"]
    )
