"""Both console scripts as an operator runs them: inference, then compositing in front of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import grpc
import numpy as np

from service_common.processes import ServiceProcess, free_port
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc

BIN = Path(sys.executable).parent


def test_two_processes_serve_jpeg_frames_and_stop_on_sigterm(models_dir: Path, tmp_path: Path) -> None:
    inference_port, compositing_port = free_port(), free_port()
    inference = ServiceProcess(
        [
            str(BIN / "lipsync-inference"),
            "--config",
            str(models_dir / "inference.yaml"),
            "--port",
            str(inference_port),
            "--host",
            "127.0.0.1",
        ],
        inference_port,
        tmp_path / "inference.log",
    ).wait_serving(60)
    try:
        compositing = ServiceProcess(
            [
                str(BIN / "lipsync-compositing"),
                "--config",
                str(models_dir / "compositing.yaml"),
                "--port",
                str(compositing_port),
                "--host",
                "127.0.0.1",
                "--inference-url",
                f"127.0.0.1:{inference_port}",
                "--set",
                f"frames_cache_dir={tmp_path / 'frames'}",
                "--set",
                "models.unet328.preload_backgrounds=false",
            ],
            compositing_port,
            tmp_path / "compositing.log",
        ).wait_serving(120)
        with (
            compositing,
            grpc.insecure_channel(
                compositing.address, options=[("grpc.max_receive_message_length", 64 << 20)]
            ) as channel,
        ):
            stub = compositing_pb2_grpc.CompositingServiceStub(channel)
            response = stub.InferBatchComposite(
                pb.CompositeBatchRequest(
                    model_id="demo",
                    audio_features=np.full((32, 16, 16), 0.9, np.float32).tobytes(),
                    batch_size=4,
                    start_frame_idx=0,
                ),
                timeout=60,
            )
            assert len(response.composited_frames) == 4
            first = cv2.imdecode(np.frombuffer(response.composited_frames[0], np.uint8), cv2.IMREAD_COLOR)
            assert first.shape == (720, 1280, 3)
            assert response.composited_frames[0][:2] == b"\xff\xd8"  # JPEG
            assert compositing.stop() == 0
    finally:
        assert inference.stop() == 0
    assert "compositing service listening" in (tmp_path / "compositing.log").read_text()


def test_invalid_compositing_config_names_the_key(models_dir: Path) -> None:
    result = subprocess.run(
        [
            str(BIN / "lipsync-compositing"),
            "--config",
            str(models_dir / "compositing.yaml"),
            "--set",
            "output.jpeg_quality=101",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "output.jpeg_quality" in result.stderr
