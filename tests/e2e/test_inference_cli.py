"""The `lipsync-inference` console script as an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np

from service_common.processes import ServiceProcess, free_port
from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc

BIN = Path(sys.executable).parent


def test_serves_then_stops_cleanly_on_sigterm(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    argv = [
        str(BIN / "lipsync-inference"),
        "--config",
        str(models_dir / "inference.yaml"),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--set",
        "models.unet328.preload=false",
    ]
    with ServiceProcess(argv, port, tmp_path / "inference.log").wait_serving(60) as service:
        with grpc.insecure_channel(service.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            response = stub.InferBatch(
                pb.InferBatchRequest(
                    model_id="demo",
                    visual_frames=np.zeros((2, 6, 320, 320), np.uint8).tobytes(),
                    visual_dtype=pb.DTYPE_UINT8,
                    audio_features=np.zeros((32, 16, 16), np.float32).tobytes(),
                    batch_size=2,
                ),
                timeout=30,
            )
            assert response.success and len(response.outputs) == 2
        assert service.stop() == 0
    log = (tmp_path / "inference.log").read_text()
    assert "listening on 127.0.0.1" in log and "shutting down" in log


def test_invalid_config_fails_at_start_naming_the_key(models_dir: Path) -> None:
    result = subprocess.run(
        [
            str(BIN / "lipsync-inference"),
            "--config",
            str(models_dir / "inference.yaml"),
            "--set",
            "capacity.max_models=0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "capacity.max_models" in result.stderr


def test_gpus_required_on_a_cpu_machine_fails_at_start(models_dir: Path) -> None:
    result = subprocess.run(
        [
            str(BIN / "lipsync-inference"),
            "--config",
            str(models_dir / "inference.yaml"),
            "--port",
            "0",
            "--set",
            "gpus.required=true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "gpus.required" in result.stderr
