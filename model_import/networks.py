"""The three SyncTalk_2D networks: their expected state_dict tables, and ONNX graphs built from real weights.

Why the tables come from the graph code: the topology in demo_models (GraphBuilder + unet328 / audio_encoder)
names each conv and BatchNorm by its module path, so running it with a recording WeightSource lists every key
and shape the checkpoint must hold. The check and the graph can then never disagree, and nothing is pasted.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from demo_models import audio_encoder as encoder_graph
from demo_models import unet328 as unet_graph
from demo_models.graph import BN_EPS, GraphBuilder, fold_batchnorm
from model_import.errors import ModelImportError

# key -> (shape, dtype); num_batches_tracked is the only int64 entry
Table = dict[str, tuple[tuple[int, ...], str]]
BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
UNET_SPECS = {"328": unet_graph.UNET328, "160": unet_graph.UNET160}
ENCODER = "audio_encoder"
LISTED = 6  # problems named per kind in an error message


class _Recorder:
    """A WeightSource that notes which keys (and shapes) the graph asks for and returns zeros."""

    def __init__(self) -> None:
        self.table: Table = {}

    def conv(
        self, key: str, shape: tuple[int, int, int, int], bias: bool, bn_key: str | None
    ) -> tuple[np.ndarray, np.ndarray]:
        cout = shape[0]
        self.table[f"{key}.weight"] = (shape, "float32")
        if bias:
            self.table[f"{key}.bias"] = ((cout,), "float32")
        if bn_key:
            for name in BN_PARAMS:
                self.table[f"{bn_key}.{name}"] = ((cout,), "float32")
            self.table[f"{bn_key}.num_batches_tracked"] = ((), "int64")
        return np.zeros(shape, np.float32), np.zeros(cout, np.float32)


class _StateDict:
    """A WeightSource over a checkpoint already checked against its table; folds BatchNorm in float64."""

    def __init__(self, state: Mapping[str, np.ndarray]) -> None:
        self.state = state

    def conv(
        self, key: str, shape: tuple[int, int, int, int], bias: bool, bn_key: str | None
    ) -> tuple[np.ndarray, np.ndarray]:
        weight = self.state[f"{key}.weight"].astype(np.float64)
        b = self.state[f"{key}.bias"].astype(np.float64) if bias else np.zeros(shape[0])
        if bn_key:
            gamma, beta, mean, var = (self.state[f"{bn_key}.{name}"].astype(np.float64) for name in BN_PARAMS)
            weight, b = fold_batchnorm(weight, b, gamma, beta, mean, var, BN_EPS)
        return weight.astype(np.float32), b.astype(np.float32)


def _build(network: str, weights: _Recorder | _StateDict) -> GraphBuilder:
    if network == ENCODER:
        g = GraphBuilder(0, "synctalk2d_ave_audio_encoder", weights=weights)
        encoder_graph.build_encoder(g)
    else:
        spec = UNET_SPECS[network]
        g = GraphBuilder(0, spec.name, weights=weights)
        unet_graph.build_unet(g, spec)
    return g


@functools.cache
def expected_table(network: str) -> Table:
    """Every state_dict key of ``network`` ("328", "160" or "audio_encoder", as its file stores it)."""
    recorder = _Recorder()
    _build(network, recorder)
    return recorder.table


def describe(network: str) -> str:
    return "the SyncTalk_2D ave audio encoder" if network == ENCODER else f"a SyncTalk_2D {network} UNet ('ave')"


def detect_variant(state: Mapping[str, np.ndarray]) -> str:
    """328 models have a fifth Down stage; 160 models do not."""
    return "328" if any(k.startswith("down5.") for k in state) else "160"


@dataclass
class Mismatch:
    missing: list[str]
    unexpected: list[str]
    wrong: list[str]  # "key: expected [..] float32, found [..] int64"

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong)

    def summary(self) -> str:
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", self.wrong)):
            if items:
                more = f", ... and {len(items) - LISTED} more" if len(items) > LISTED else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:LISTED])}{more}")
        return "; ".join(parts)


def compare(state: Mapping[str, np.ndarray], network: str) -> Mismatch:
    table = expected_table(network)
    wrong = []
    for key, (shape, dtype) in table.items():
        if key in state and (state[key].shape != shape or state[key].dtype != np.dtype(dtype)):
            found = state[key]
            wrong.append(f"{key} (expected {list(shape)} {dtype}, found {list(found.shape)} {found.dtype})")
    return Mismatch(
        missing=[k for k in table if k not in state],
        unexpected=[k for k in state if k not in table],
        wrong=wrong,
    )


def check_unet(state: Mapping[str, np.ndarray], variant: str, source: str) -> str:
    """The variant ("328" or "160") of a UNet checkpoint, or an error naming what does not fit."""
    if variant == "auto":
        if any(k.startswith(("0.conv_block.", "audio_encoder.0.")) for k in state):
            raise ModelImportError(f"{source}: this is an audio encoder checkpoint; pass it as --audio-encoder")
        variant = detect_variant(state)
    mismatch = compare(state, variant)
    if mismatch:
        raise ModelImportError(f"{source}: not {describe(variant)} checkpoint: {mismatch.summary()}")
    return variant


def encoder_state(state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """The encoder's tensors under the file's own keys (the module's ``audio_encoder.`` prefix is dropped)."""
    prefix = "audio_encoder."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    mismatch = compare(state, ENCODER)
    if mismatch:
        raise ModelImportError(f"{source}: not {describe(ENCODER)} checkpoint: {mismatch.summary()}")
    return dict(state)


def build_onnx(network: str, state: Mapping[str, np.ndarray], doc: str) -> onnx.ModelProto:
    """The network as ONNX (BatchNorm folded, dynamic batch) with the checkpoint's weights."""
    g = _build(network, _StateDict(state))
    model = g.model(doc)
    model.producer_name = "lipsync-import"
    return model
