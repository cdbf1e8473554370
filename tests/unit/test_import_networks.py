"""The ONNX graphs built from checkpoints compute what the SyncTalk_2D networks compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from synctalk import random_state, require_fixtures

from model_import.checkpoint import read_state_dict
from model_import.networks import ENCODER, build_onnx, check_unet, encoder_state

TOLERANCE = 1e-4


@pytest.fixture()
def synctalk_fixtures() -> Path:
    return require_fixtures()


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


UNET328 = pytest.param("unet328", marks=pytest.mark.slow)  # the full-size UNet, run


@pytest.mark.parametrize("name", [UNET328, "unet160", "audio_encoder"])
def test_fixture_outputs_match_the_reference(synctalk_fixtures: Path, name: str) -> None:
    """Each genuine checkpoint (random weights, randomised BatchNorm statistics) gives SyncTalk_2D's own
    eval-mode output on the same inputs."""
    path = synctalk_fixtures / f"{name}_randbn.pth"
    state = read_state_dict(path)
    if name == "audio_encoder":
        network, feeds = ENCODER, {"mel": np.load(synctalk_fixtures / "audio_encoder_input.npy")}
        state = encoder_state(state, str(path))
    else:
        network = check_unet(state, "auto", str(path))
        assert network == name[-3:]
        feeds = {
            "input": np.load(synctalk_fixtures / f"{name}_input.npy"),
            "audio": np.load(synctalk_fixtures / f"{name}_audio.npy"),
        }
    (out,) = session(build_onnx(network, state, "test")).run(None, feeds)
    reference = np.load(synctalk_fixtures / f"{name}_randbn_output.npy")
    assert out.shape == reference.shape
    diff = float(np.abs(out - reference).max())
    print(f"{name}: max abs diff {diff:.3g}")
    assert diff <= TOLERANCE


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: tuple[int, int], pad: int) -> np.ndarray:
    """Plain NCHW convolution by sliding windows and one einsum (float64)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, :: stride[0], :: stride[1]]
    return np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]


ENCODER_LAYERS = [  # (stride, pad, residual): SyncTalk_2D's AudioEncoder
    ((1, 1), 1, False), ((1, 1), 1, True), ((1, 1), 1, True),
    ((3, 1), 1, False), ((1, 1), 1, True), ((1, 1), 1, True),
    ((3, 3), 1, False), ((1, 1), 1, True), ((1, 1), 1, True),
    ((3, 2), 1, False), ((1, 1), 1, True),
    ((1, 1), 0, False), ((1, 1), 0, False),
]  # fmt: skip


def test_encoder_matches_an_unfolded_numpy_forward() -> None:
    """Without the fixtures: BatchNorm applied as BatchNorm (not folded), written independently."""
    state = {k: v.astype(np.float64) for k, v in random_state(ENCODER, seed=5).items()}
    mel = np.random.default_rng(0).uniform(-4, 4, (3, 1, 80, 16))
    x = mel
    for i, (stride, pad, residual) in enumerate(ENCODER_LAYERS):
        conv, bn = f"{i}.conv_block.0", f"{i}.conv_block.1"
        y = _conv(x, state[f"{conv}.weight"], state[f"{conv}.bias"], stride, pad)
        mean, var = state[f"{bn}.running_mean"], state[f"{bn}.running_var"]
        y = (y - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) * state[f"{bn}.weight"][
            :, None, None
        ] + state[f"{bn}.bias"][:, None, None]
        x = np.maximum(y + x if residual else y, 0)
    reference = x.reshape(3, 512)
    model = build_onnx(ENCODER, random_state(ENCODER, seed=5), "test")
    (out,) = session(model).run(None, {"mel": mel.astype(np.float32)})
    assert float(np.abs(out - reference).max()) <= TOLERANCE * max(1.0, float(np.abs(reference).max()))
    assert float(np.abs(reference).max()) > 0.1  # not a trivially zero network


@pytest.mark.parametrize("variant,size", [("328", 320), ("160", 160)])
def test_unet_io_contract_and_dynamic_batch(variant: str, size: int) -> None:
    """What inference_service.engine expects: inputs `input` and `audio`, one output, a symbolic batch."""
    model = build_onnx(variant, random_state(variant, seed=2), "test")
    onnx.checker.check_model(model)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert dims == {"input": ["batch", 6, size, size], "audio": ["batch", 32, 16, 16]}
    assert [o.name for o in model.graph.output] == ["output"]
    assert not {n.op_type for n in model.graph.node} & {"BatchNormalization"}
    run = session(model)
    for batch in (1, 3):
        rng = np.random.default_rng(batch)
        feeds = {
            "input": rng.uniform(0, 1, (batch, 6, size, size)).astype(np.float32),
            "audio": rng.standard_normal((batch, 32, 16, 16)).astype(np.float32),
        }
        (out,) = run.run(None, feeds)
        assert out.shape == (batch, 3, size, size)
        assert out.min() > 0 and out.max() < 1 and out.std() > 1e-3  # a sigmoid of something that varies
