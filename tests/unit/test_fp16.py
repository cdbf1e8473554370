"""lipsync-fp16: float16 weights, float32 I/O, close outputs; the converted file serves like the original."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from inference_service.config import OnnxConfig
from inference_service.devices import Device
from inference_service.engine import LipSyncModel
from inference_service.fp16 import convert, max_difference

BIN = Path(sys.executable).parent


def test_conversion_keeps_float32_io_and_close_outputs(models_dir: Path, tmp_path: Path) -> None:
    source = models_dir / "demo" / "model.onnx"
    result = convert(source, tmp_path / "demo16.onnx")
    model = onnx.load(str(result.path))
    kinds = {init.data_type for init in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.FLOAT not in kinds
    assert {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)} == {onnx.TensorProto.FLOAT}

    def weight_bytes(m: onnx.ModelProto) -> int:
        return sum(onnx.numpy_helper.to_array(init).nbytes for init in m.graph.initializer)

    assert weight_bytes(model) <= 0.55 * weight_bytes(onnx.load(str(source)))
    assert max_difference(source, result.path) < 5e-3
    # The service loads it as it is: same I/O contract.
    served = LipSyncModel("demo16", result.path, Device("cpu", -1, "cpu", 0, 1), OnnxConfig())
    out = served.run(np.zeros((2, 6, 320, 320), np.float32), np.zeros((2, 32, 16, 16), np.float32))
    assert out.shape == (2, 3, 320, 320) and out.dtype == np.float32


def test_cli(models_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            str(BIN / "lipsync-fp16"),
            str(models_dir / "demo" / "audio_encoder.onnx"),
            str(tmp_path / "e.onnx"),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "largest output difference" in done.stdout and (tmp_path / "e.onnx").is_file()
    missing = subprocess.run(
        [str(BIN / "lipsync-fp16"), str(tmp_path / "nope.onnx"), str(tmp_path / "x.onnx")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    bad = subprocess.run(
        [str(BIN / "lipsync-fp16"), str(broken), str(tmp_path / "y.onnx")], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "cannot convert" in bad.stderr
