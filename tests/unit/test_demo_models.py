"""Tests of the generated ONNX models, run through real onnxruntime sessions."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import shape_inference

from demo_models import (
    build_audio_encoder,
    build_demo,
    build_demo_audio_encoder,
    build_unet328,
    write_all,
)
from demo_models.cli import main as cli_main
from demo_models.talking import (
    MOUTH_CENTER,
    MOUTH_HALF_WIDTH,
    MOUTH_MAX_HALF_HEIGHT,
    demo_loudness,
    mouth_alpha,
)

REF_PARAMS = 12.2e6  # SyncTalk_2D 328 UNet incl. BatchNorm (gamma/beta), as thop/torch count it
REF_GMAC = 4.9


def _session(path: Path | str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _unet_input(rng: np.random.Generator, batch: int) -> np.ndarray:
    """Smooth image-like crop plus its mouth-masked copy, as the reference preprocessing builds it."""
    yy, xx = np.mgrid[0:320, 0:320].astype(np.float32) / 320.0
    base = np.stack([0.3 + 0.4 * xx, 0.4 + 0.3 * yy, 0.5 + 0.2 * xx * yy])  # BGR in [0, 1]
    real = np.clip(base[None] + rng.normal(0, 0.05, (batch, 3, 320, 320)), 0, 1).astype(np.float32)
    masked = real.copy()
    masked[:, :, 5:310, 5:315] = 0.0
    return np.concatenate([real, masked], axis=1)


def _crop(value: float = 0.6, batch: int = 1) -> np.ndarray:
    """A flat grey crop (plus masked copy) so that any mouth pixel is easy to see."""
    x = np.full((batch, 6, 320, 320), value, dtype=np.float32)
    x[:, 3:, 5:310, 5:315] = 0.0
    return x


def _audio_window(loudness: float | list[float]) -> np.ndarray:
    """16 embeddings of 512 values in C order, every value being the loudness (as the demo encoder emits)."""
    lo = np.atleast_1d(np.asarray(loudness, dtype=np.float32))
    return np.broadcast_to(lo[:, None, None], (lo.size, 16, 512)).reshape(lo.size, 32, 16, 16).copy()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Everything written once through the CLI (the unet328 build is the only slow part)."""
    out = tmp_path_factory.mktemp("models")
    assert cli_main(["--out", str(out), "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def unet(models_dir: Path) -> ort.InferenceSession:
    return _session(models_dir / "unet328" / "model.onnx")


# -- files and config ------------------------------------------------------------------------------------
def test_cli_writes_all_files_and_a_parsable_config(models_dir: Path) -> None:
    for rel in ("demo/model.onnx", "demo/audio_encoder.onnx", "unet328/model.onnx", "unet328/audio_encoder.onnx"):
        path = models_dir / rel
        assert path.is_file(), rel
        onnx.checker.check_model(str(path))
    cfg = yaml.safe_load((models_dir / "inference.yaml").read_text())
    assert Path(cfg["models_root"]).is_absolute()
    assert Path(cfg["models_root"]) == models_dir.resolve()
    assert cfg["server"] == {"port": ":50051", "plaintext": True, "max_message_size_mb": 64, "worker_count_per_gpu": 2}
    assert cfg["gpus"] == {"enabled": False, "count": 0}
    assert cfg["capacity"] == {"max_models": 4, "max_memory_gb": 8, "eviction_policy": "lfu"}
    assert cfg["onnx"] == {"intra_op_threads": 0, "inter_op_threads": 1}
    assert cfg["models"]["demo"]["preload"] is True
    assert cfg["models"]["unet328"]["preload"] is False
    for entry in cfg["models"].values():
        assert (models_dir / entry["model_path"]).is_file()
        assert (models_dir / entry["audio_encoder_path"]).is_file()
    info = json.loads((models_dir / "unet328" / "model.json").read_text())
    assert info["inputs"]["input"]["shape"] == ["batch", 6, 320, 320]
    assert info["outputs"]["output"]["shape"] == ["batch", 3, 320, 320]


def test_skip_unet328_writes_the_demos_only_and_config_lists_only_them(tmp_path: Path) -> None:
    result = write_all(tmp_path, seed=3, include_unet328=False)
    assert not (tmp_path / "unet328").exists()
    assert "unet328" not in result
    cfg = yaml.safe_load((tmp_path / "inference.yaml").read_text())
    assert list(cfg["models"]) == ["demo", "demo160"]
    assert all((tmp_path / m["model_path"]).is_file() for m in cfg["models"].values())
    assert cfg["models"]["demo160"]["geometry"] == "160"  # a string: the family's name


def test_the_160_demo_draws_its_mouth_where_the_328_demo_does(tmp_path: Path) -> None:
    """The same face rectangle cropped for each family: the 160 model's mouth lands on the 328 model's."""
    from demo_models.talking import Mouth
    from lipsync_protocol.geometry import GEOMETRIES

    small = Mouth.for_geometry(GEOMETRIES["160"])
    assert small.size == 160
    to_rect = [(v + 4 + 0.5) / 328 for v in Mouth().center]  # 328 crop: inner offset 4, to [0, 1] of the rect
    back = [(v + 4 + 0.5) / 168 for v in small.center]
    assert np.allclose(to_rect, back)
    session = ort.InferenceSession(
        build_demo(0, GEOMETRIES["160"]).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    audio = np.zeros((1, 32, 16, 16), np.float32)
    audio[:, 16:18] = 1.0
    visual = np.full((1, 6, 160, 160), 0.8, np.float32)
    (out,) = session.run(None, {"input": visual, "audio": audio})
    cx, cy = (round(v) for v in small.center)
    assert out.shape == (1, 3, 160, 160) and out[0, :, cy, cx].max() < 0.3 and out[0, :, 5, 5].min() > 0.79


@pytest.mark.parametrize(
    "rel", ["demo/model.onnx", "demo/audio_encoder.onnx", "unet328/model.onnx", "unet328/audio_encoder.onnx"]
)
def test_models_declare_a_dynamic_batch_named_batch(models_dir: Path, rel: str) -> None:
    model = onnx.load(str(models_dir / rel), load_external_data=False)
    assert model.opset_import[0].version == 17
    assert model.ir_version in (8, 9)
    for v in [*model.graph.input, *model.graph.output]:
        assert v.type.tensor_type.shape.dim[0].dim_param == "batch", v.name


# -- unet328 ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # runs unet328
@pytest.mark.parametrize("batch", [1, 3])
def test_unet328_io_shapes(unet: ort.InferenceSession, batch: int) -> None:
    assert [i.name for i in unet.get_inputs()] == ["input", "audio"]
    assert [o.name for o in unet.get_outputs()] == ["output"]
    rng = np.random.default_rng(batch)
    audio = rng.uniform(0, 1, (batch, 32, 16, 16)).astype(np.float32)
    (out,) = unet.run(None, {"input": _unet_input(rng, batch), "audio": audio})
    assert out.shape == (batch, 3, 320, 320)
    assert out.dtype == np.float32


@pytest.mark.slow  # runs unet328
def test_unet328_output_in_unit_range_and_not_saturated(unet: ort.InferenceSession) -> None:
    rng = np.random.default_rng(7)
    audio = rng.uniform(0, 1, (1, 32, 16, 16)).astype(np.float32)
    (out,) = unet.run(None, {"input": _unet_input(rng, 1), "audio": audio})
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    assert out.std() > 0.01
    saturated = np.mean((out < 0.01) | (out > 0.99))
    assert saturated < 0.05, f"{saturated:.1%} of sigmoid outputs are saturated"


@pytest.mark.slow  # runs unet328
def test_unet328_output_depends_on_audio(unet: ort.InferenceSession) -> None:
    rng = np.random.default_rng(11)
    x = _unet_input(rng, 1)
    quiet = np.zeros((1, 32, 16, 16), dtype=np.float32)
    loud = rng.uniform(0, 1, (1, 32, 16, 16)).astype(np.float32)
    (a,) = unet.run(None, {"input": x, "audio": quiet})
    (b,) = unet.run(None, {"input": x, "audio": loud})
    assert np.abs(a - b).mean() > 1e-3


def _conv_macs(model: onnx.ModelProto) -> int:
    """MACs per sample recomputed from the saved graph: weight size x output pixels of every Conv."""
    inferred = shape_inference.infer_shapes(model)
    dims = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.output]
    }
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            out_h, out_w = dims[node.output[0]][2:]
            total += int(np.prod(weights[node.input[1]])) * out_h * out_w
    return total


def test_unet328_size_and_cost_match_the_reference(models_dir: Path) -> None:
    model = onnx.load(str(models_dir / "unet328" / "model.onnx"))
    info = json.loads((models_dir / "unet328" / "model.json").read_text())
    onnx_params = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    # The reference's 12.2 M counts BatchNorm gamma and beta. Folding BN leaves one bias per output channel
    # instead, so the ONNX initializers hold fewer numbers (~0.3% fewer; the extra 20 are Resize scales).
    # Both must be near the reference; the reported BN-included figure must be the larger one.
    assert abs(info["params"] - REF_PARAMS) / REF_PARAMS < 0.03
    assert abs(onnx_params - REF_PARAMS) / REF_PARAMS < 0.03
    assert 0 < info["params"] - info["params_onnx"] < 0.01 * info["params"]
    assert onnx_params - info["params_onnx"] == 5 * 4  # five Resize ops with 4 scales each
    # GMAC: convs only (BN is folded, ReLU/Resize/Add are negligible), recomputed from the ONNX graph.
    gmac = _conv_macs(model) / 1e9
    assert abs(gmac - REF_GMAC) / REF_GMAC < 0.05
    assert gmac == pytest.approx(info["gmac_per_frame"], abs=1e-3)
    size_mb = (models_dir / "unet328" / "model.onnx").stat().st_size / 2**20
    assert 44 < size_mb < 48  # ~46 MiB of fp32 weights


def test_builds_are_deterministic_per_seed(models_dir: Path) -> None:
    first = build_unet328(0).SerializeToString()
    assert first == build_unet328(0).SerializeToString()
    assert first == (models_dir / "unet328" / "model.onnx").read_bytes()
    assert first != build_unet328(1).SerializeToString()
    enc = build_audio_encoder(0).SerializeToString()
    assert enc == (models_dir / "unet328" / "audio_encoder.onnx").read_bytes()
    assert build_demo(0).SerializeToString() == (models_dir / "demo" / "model.onnx").read_bytes()
    assert build_demo_audio_encoder(0).SerializeToString() == build_demo_audio_encoder(0).SerializeToString()


# -- unet328 audio encoder -------------------------------------------------------------------------------
@pytest.mark.slow  # runs unet328's audio encoder
@pytest.mark.parametrize("batch", [1, 3])
def test_audio_encoder_io_shapes(models_dir: Path, batch: int) -> None:
    sess = _session(models_dir / "unet328" / "audio_encoder.onnx")
    assert [i.name for i in sess.get_inputs()] == ["mel"]
    assert [o.name for o in sess.get_outputs()] == ["embedding"]
    mel = np.random.default_rng(batch).uniform(-4, 4, (batch, 1, 80, 16)).astype(np.float32)
    (emb,) = sess.run(None, {"mel": mel})
    assert emb.shape == (batch, 512)
    assert emb.min() >= 0.0  # the reference ends with BN + ReLU
    assert 0.05 < emb.std() < 20.0
    if batch > 1:
        assert not np.allclose(emb[0], emb[1])


def test_audio_encoder_size(models_dir: Path) -> None:
    info = json.loads((models_dir / "unet328" / "model.json").read_text())["audio_encoder"]
    # Conv weights+biases and BN gamma/beta of the reference stack (see demo_models/audio_encoder.py).
    assert info["params"] == 2_812_672
    assert info["gmac_per_chunk"] == pytest.approx(0.0931, abs=1e-4)


# -- demo model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(models_dir: Path) -> ort.InferenceSession:
    return _session(models_dir / "demo" / "model.onnx")


@pytest.fixture(scope="module")
def demo_encoder(models_dir: Path) -> ort.InferenceSession:
    return _session(models_dir / "demo" / "audio_encoder.onnx")


@pytest.mark.parametrize("batch", [1, 3])
def test_demo_io_shapes(demo: ort.InferenceSession, batch: int) -> None:
    assert [i.name for i in demo.get_inputs()] == ["input", "audio"]
    (out,) = demo.run(None, {"input": _crop(0.6, batch), "audio": _audio_window([0.5] * batch)})
    assert out.shape == (batch, 3, 320, 320)
    assert out.dtype == np.float32


def _dark_pixels(out: np.ndarray) -> np.ndarray:
    """Per batch item: pixels clearly darker than the 0.6 grey crop."""
    return (out.max(axis=1) < 0.45).sum(axis=(1, 2))


def test_demo_mouth_grows_strictly_with_loudness(demo: ort.InferenceSession) -> None:
    levels = [0.0, 0.3, 0.6, 1.0]
    (out,) = demo.run(None, {"input": _crop(0.6, 4), "audio": _audio_window(levels)})
    counts = _dark_pixels(out)
    assert counts[0] == 0
    assert all(a < b for a, b in itertools.pairwise(counts)), counts
    # Fully open: about the ellipse area pi * a * b (minus the soft rim).
    full = np.pi * MOUTH_HALF_WIDTH * MOUTH_MAX_HALF_HEIGHT
    assert 0.8 * full < counts[-1] < 1.05 * full
    # Dark interior colour at the centre, BGR ~ (0.10, 0.08, 0.25).
    cx, cy = MOUTH_CENTER
    np.testing.assert_allclose(out[3, :, cy, cx], [0.10, 0.08, 0.25], atol=1e-6)
    # The NumPy twin predicts the graph exactly.
    expected = _crop(0.6, 4)[:, :3] + mouth_alpha(levels) * (
        np.array([0.10, 0.08, 0.25], dtype=np.float32).reshape(1, 3, 1, 1) - 0.6
    )
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_demo_leaves_the_crop_unchanged_away_from_the_mouth(demo: ort.InferenceSession) -> None:
    rng = np.random.default_rng(5)
    x = _unet_input(rng, 2)
    (out,) = demo.run(None, {"input": x, "audio": _audio_window([1.0, 0.0])})
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    cx, cy = MOUTH_CENTER
    far = np.ones((320, 320), dtype=bool)
    far[
        int(cy - MOUTH_MAX_HALF_HEIGHT) - 1 : int(cy + MOUTH_MAX_HALF_HEIGHT) + 2,
        int(cx - MOUTH_HALF_WIDTH) - 1 : int(cx + MOUTH_HALF_WIDTH) + 2,
    ] = False
    np.testing.assert_array_equal(out[0][:, far], x[0, :3][:, far])
    np.testing.assert_array_equal(out[1], x[1, :3])  # silent: the whole crop is untouched
    assert np.abs(out[0] - x[0, :3]).max() > 0.3  # loud: the mouth is there


def test_demo_uses_only_the_centre_embedding(demo: ort.InferenceSession) -> None:
    window = np.zeros((1, 16, 512), dtype=np.float32)
    window[0, [0, 7, 9, 15]] = 1.0  # loud neighbours, silent current frame
    (quiet,) = demo.run(None, {"input": _crop(0.6), "audio": window.reshape(1, 32, 16, 16)})
    assert _dark_pixels(quiet)[0] == 0
    window[0, 8] = 1.0
    (loud,) = demo.run(None, {"input": _crop(0.6), "audio": window.reshape(1, 32, 16, 16)})
    assert _dark_pixels(loud)[0] > 0


# -- demo audio encoder ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_demo_encoder_io_shapes(demo_encoder: ort.InferenceSession, batch: int) -> None:
    (emb,) = demo_encoder.run(None, {"mel": np.zeros((batch, 1, 80, 16), dtype=np.float32)})
    assert emb.shape == (batch, 512)


def test_demo_encoder_loudness_mapping(demo_encoder: ort.InferenceSession) -> None:
    levels = np.array([-4.0, -2.5, -1.0, 0.0, 1.0, 4.0], dtype=np.float32)
    mel = np.broadcast_to(levels[:, None, None, None], (levels.size, 1, 80, 16)).copy()
    (emb,) = demo_encoder.run(None, {"mel": mel})
    assert np.all(emb == emb[:, :1])  # all 512 values carry the loudness
    loud = emb[:, 0]
    assert loud[0] == pytest.approx(0.0, abs=1e-6)  # silence
    assert np.all(np.diff(loud[1:]) >= 0)
    assert 0.25 < loud[2] < 0.45  # quiet speech
    assert loud[4] > 0.9  # loud speech
    assert loud[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(loud, demo_loudness(mel), atol=1e-6)


def test_demo_encoder_reads_the_central_columns_only(demo_encoder: ort.InferenceSession) -> None:
    mel = np.full((1, 1, 80, 16), -4.0, dtype=np.float32)
    mel[..., :6] = 4.0
    mel[..., 10:] = 4.0
    (emb,) = demo_encoder.run(None, {"mel": mel})
    assert emb.max() == 0.0
    mel[..., 6:10] = 0.5
    (emb,) = demo_encoder.run(None, {"mel": mel})
    assert emb.min() > 0.5


def test_demo_pair_end_to_end(demo: ort.InferenceSession, demo_encoder: ort.InferenceSession) -> None:
    """Encoder embeddings, windowed as the pipeline does, open the mouth only for the loud chunk."""
    mel = np.full((16, 1, 80, 16), -4.0, dtype=np.float32)
    mel[8] = 0.5
    (emb,) = demo_encoder.run(None, {"mel": mel})
    window = emb.reshape(1, 32, 16, 16)
    (out,) = demo.run(None, {"input": _crop(0.6), "audio": window})
    assert _dark_pixels(out)[0] > 0.5 * np.pi * MOUTH_HALF_WIDTH * MOUTH_MAX_HALF_HEIGHT
