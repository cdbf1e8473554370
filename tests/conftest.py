"""Shared fixtures: generated models on disk and real gRPC servers on loopback ports."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from support import ServerThread, make_config

import demo_models
from inference_service.config import InferenceConfig
from shared_proto import inference_pb2_grpc


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every generated model, once per test session (the unet328 build takes a few seconds)."""
    out = tmp_path_factory.mktemp("models")
    demo_models.write_all(out, seed=0, include_unet328=True)
    return out


@pytest.fixture()
def models_copy(models_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the models folder for tests that change files in it."""
    dest = tmp_path / "models"
    shutil.copytree(models_dir, dest)
    return dest


@pytest.fixture()
def start_inference() -> Iterator[Callable[[InferenceConfig], ServerThread]]:
    started: list[ServerThread] = []

    def start(config: InferenceConfig) -> ServerThread:
        server = ServerThread(config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def inference_server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[ServerThread]:
    """One server with demo preloaded and unet328 loadable, shared by a module's read-only tests."""
    server = ServerThread(make_config(models_dir))
    yield server
    server.stop()


@pytest.fixture()
def stub(inference_server: ServerThread) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    with grpc.insecure_channel(inference_server.address, options=options) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


# The folder a test lives in is its kind: `-m unit`, `-m "not e2e"`, ...
FOLDER_MARKERS = ("unit", "integration", "e2e")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(item.path).resolve()
        if path.is_relative_to(TESTS) and (folder := path.relative_to(TESTS).parts[0]) in FOLDER_MARKERS:
            item.add_marker(folder)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=float(os.environ.get("LIPSYNC_SOAK_SECONDS", "120")),
        help="length of the soak test (default 120 s, or LIPSYNC_SOAK_SECONDS)",
    )


@pytest.fixture()
def soak_seconds(request: pytest.FixtureRequest) -> float:
    return request.config.getoption("--soak-seconds")
