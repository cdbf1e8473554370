"""A tiny ONNX graph builder for conv nets with random, BatchNorm-folded weights.

The generated models stand in for trained SyncTalk_2D checkpoints: same topology, same tensor names and
shapes, same cost, but seeded random weights. Serving code, benchmarks and tests can then run on a machine
that has no trained checkpoint and no torch. Given a ``WeightSource`` instead of a seed, the same topology
code builds a real model from a checkpoint's tensors (``model_import``), so the architecture is written once.

Why the weights look the way they do:
- Convs get He-style scaling (std = gain * sqrt(2 / fan_in)) so a forward pass on image-like data keeps
  activations of order one through ~60 layers and the final sigmoid is not saturated.
- Every BatchNorm of the reference gets random inference statistics and is folded into the preceding conv
  (W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps)), as an exporter would do, so
  the ONNX graph is what a real, optimised export looks like: Conv (+bias) and Relu only.
- Parameters and MACs are counted while the graph is built, from the layer list itself, so the numbers
  can be compared with the reference's (thop-style) figures without a second implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # onnxruntime 1.17+ loads IR 9; opset 17 needs IR >= 8.
BATCH = "batch"
BN_EPS = 1e-5


@dataclass(frozen=True)
class Tensor:
    """A value in the graph plus its static per-sample shape (the batch dimension is dynamic)."""

    name: str
    c: int
    h: int
    w: int


@dataclass
class LayerStats:
    """Size and cost of a generated model, counted layer by layer as it is built."""

    params: int = 0  # as the unfolded PyTorch model counts them: conv weights + biases + BN gamma/beta
    params_folded: int = 0  # what the ONNX initializers hold after folding BN into the convs
    macs: int = 0  # multiply-accumulates of the convs for one sample
    layers: list[str] = field(default_factory=list)

    @property
    def gmac(self) -> float:
        return self.macs / 1e9


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def fold_batchnorm(
    weight: np.ndarray,
    bias: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float = BN_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode BatchNorm after a conv as the conv's own weight and bias, in the inputs' precision."""
    scale = gamma / np.sqrt(var + var.dtype.type(eps))
    return weight * scale[:, None, None, None], (bias - mean) * scale + beta


class WeightSource(Protocol):
    """Where a builder takes real weights from, by the module paths of the original network."""

    def conv(
        self, key: str, shape: tuple[int, int, int, int], bias: bool, bn_key: str | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """float32 weight ``shape`` and bias [cout] of conv ``key``, with BatchNorm ``bn_key`` folded in."""
        ...


def value_info(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    """Declare a float32 graph input/output; string dims become symbolic (the dynamic batch)."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


class GraphBuilder:
    """Accumulates nodes and initializers; every method returns the new output tensor.

    With ``weights`` every conv takes its parameters from that source (by ``key``) instead of the seeded RNG.
    """

    def __init__(self, seed: int, name: str, weights: WeightSource | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.stats = LayerStats()
        self._inputs: list[onnx.ValueInfoProto] = []
        self._outputs: list[onnx.ValueInfoProto] = []
        self._counter = 0

    # -- naming and constants ------------------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], prefix: str | None = None, **attrs: object) -> str:
        out = self.fresh(prefix or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    # -- graph I/O -----------------------------------------------------------------------------------
    def input(self, name: str, c: int, h: int, w: int) -> Tensor:
        self._inputs.append(value_info(name, [BATCH, c, h, w]))
        return Tensor(name, c, h, w)

    def output(self, x: Tensor | str, name: str, shape: Sequence[int | str]) -> None:
        src = x.name if isinstance(x, Tensor) else x
        self.nodes.append(helper.make_node("Identity", [src], [name], name=f"{name}_identity"))
        self._outputs.append(value_info(name, [BATCH, *shape]))

    # -- layers --------------------------------------------------------------------------------------
    def conv(
        self,
        x: Tensor,
        cout: int,
        k: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        pad: int | tuple[int, int] = 0,
        groups: int = 1,
        bias: bool = False,
        bn: bool = True,
        relu: bool = True,
        gain: float | None = None,
        bn_gamma: float = 1.0,
        key: str = "",
        bn_key: str = "",
    ) -> Tensor:
        """Conv2d [+ BatchNorm2d folded] [+ ReLU], counting params and MACs of the unfolded layer.

        Weight std is sqrt(2 / fan_in) when a ReLU follows (He) and sqrt(1 / fan_in) when it does not, so
        the second moment of the signal neither grows nor shrinks from block to block. `gain` overrides
        that factor (2 or 1) and `bn_gamma` scales the BN; both only shape the random activations (e.g.
        damping residual branches), they change neither the cost nor the topology. `key` and `bn_key` are
        the conv's and the BatchNorm's module paths in the original network, used only with ``weights``.
        """
        kh, kw = _pair(k)
        sh, sw = _pair(stride)
        ph, pw = _pair(pad)
        cin_g = x.c // groups
        fan_in = cin_g * kh * kw
        hout = (x.h + 2 * ph - kh) // sh + 1
        wout = (x.w + 2 * pw - kw) // sw + 1
        n_params = cout * fan_in + (cout if bias else 0) + (2 * cout if bn else 0)  # BN: gamma and beta
        if self.weights is not None:
            weight, b = self.weights.conv(key, (cout, cin_g, kh, kw), bias, bn_key if bn else None)
            if weight.shape != (cout, cin_g, kh, kw) or b.shape != (cout,):
                raise ValueError(f"{key}: weights {weight.shape} and bias {b.shape} do not fit the layer")
        else:
            weight, b = self._random_conv(cout, cin_g, kh, kw, fan_in, bias, bn, relu, gain, bn_gamma)
        self.stats.params += n_params
        self.stats.params_folded += weight.size + cout
        self.stats.macs += cout * hout * wout * fan_in
        self.stats.layers.append(f"conv {x.c}->{cout} k{kh}x{kw} s{sh}x{sw} g{groups} @{hout}x{wout}")

        w_name = self.const("w", weight.astype(np.float32))
        b_name = self.const("b", b.astype(np.float32))
        out = self.node(
            "Conv",
            [x.name, w_name, b_name],
            prefix="conv",
            kernel_shape=[kh, kw],
            strides=[sh, sw],
            pads=[ph, pw, ph, pw],
            group=groups,
            dilations=[1, 1],
        )
        y = Tensor(out, cout, hout, wout)
        return self.relu(y) if relu else y

    def _random_conv(
        self,
        cout: int,
        cin_g: int,
        kh: int,
        kw: int,
        fan_in: int,
        bias: bool,
        bn: bool,
        relu: bool,
        gain: float | None,
        bn_gamma: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Seeded weights (and random BN statistics folded in); the draw order is part of the demo's bytes."""
        if gain is None:
            gain = 2.0 if relu else 1.0
        std = np.sqrt(gain / fan_in)
        weight = self.rng.standard_normal((cout, cin_g, kh, kw), dtype=np.float32) * np.float32(std)
        b = self.rng.uniform(-0.02, 0.02, cout).astype(np.float32) if bias else np.zeros(cout, dtype=np.float32)
        if bn:
            gamma = (bn_gamma * self.rng.uniform(0.9, 1.1, cout)).astype(np.float32)
            beta = self.rng.normal(0.0, 0.02, cout).astype(np.float32)
            mean = self.rng.normal(0.0, 0.02, cout).astype(np.float32)
            var = self.rng.uniform(0.9, 1.1, cout).astype(np.float32)
            weight, b = fold_batchnorm(weight, b, gamma, beta, mean, var)
        return weight, b

    def relu(self, x: Tensor) -> Tensor:
        return Tensor(self.node("Relu", [x.name]), x.c, x.h, x.w)

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        if (a.c, a.h, a.w) != (b.c, b.h, b.w):
            raise ValueError(f"residual shapes differ: {a} vs {b}")
        return Tensor(self.node("Add", [a.name, b.name]), a.c, a.h, a.w)

    def concat(self, parts: Sequence[Tensor]) -> Tensor:
        if len({(p.h, p.w) for p in parts}) != 1:
            raise ValueError(f"concat needs equal spatial sizes: {parts}")
        out = self.node("Concat", [p.name for p in parts], axis=1)
        return Tensor(out, sum(p.c for p in parts), parts[0].h, parts[0].w)

    def upsample2x(self, x: Tensor) -> Tensor:
        """nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)."""
        scales = self.const("scales", np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32))
        out = self.node(
            "Resize",
            [x.name, "", scales],
            mode="linear",
            coordinate_transformation_mode="align_corners",
        )
        return Tensor(out, x.c, 2 * x.h, 2 * x.w)

    def pad_to(self, x: Tensor, ref: Tensor) -> Tensor:
        """F.pad(x, [dx//2, dx - dx//2, dy//2, dy - dy//2]) so x matches ref spatially (no-op if equal)."""
        dy, dx = ref.h - x.h, ref.w - x.w
        if dy == 0 and dx == 0:
            return x
        pads = np.array([0, 0, dy // 2, dx // 2, 0, 0, dy - dy // 2, dx - dx // 2], dtype=np.int64)
        out = self.node("Pad", [x.name, self.const("pads", pads)], mode="constant")
        return Tensor(out, x.c, ref.h, ref.w)

    def sigmoid(self, x: Tensor) -> Tensor:
        return Tensor(self.node("Sigmoid", [x.name]), x.c, x.h, x.w)

    # -- finish --------------------------------------------------------------------------------------
    def model(self, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self._inputs, self._outputs, initializer=self.initializers)
        return make_model(graph, doc)


def make_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    """Pin opset/IR/producer so the bytes depend on nothing but the graph (determinism)."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="lipsync-demo-models",
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    return model
