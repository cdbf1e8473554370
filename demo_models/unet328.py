"""The SyncTalk_2D "328" UNet ("ave" audio mode) as an ONNX graph with seeded random weights.

Why: benchmarks and capacity planning need a model with the real topology, tensor names, parameter
count (~12.2 M with BatchNorm) and cost (~4.9 GMAC per 320x320 frame), but no trained checkpoint and no
torch. The layer list mirrors `unet_328.py` of SyncTalk_2D (class `Model(n_channels=6, mode='ave')`):
InvertedResidual (1x1 expand, 3x3 depthwise, 1x1 project, BN each, ReLU after the first two, optional
residual), DoubleConvDW, InConvDw, Down, Up (bilinear x2 align_corners + pad + concat), AudioConvAve,
fuse_conv, OutConv and a sigmoid. BatchNorm is folded into the convs.

Residual branches get a damped BN scale so that random weights do not blow activations up along the
~60-layer path; this changes values only, never the graph.
"""

from __future__ import annotations

import onnx

from demo_models.graph import GraphBuilder, LayerStats, Tensor

CHANNELS = (32, 64, 128, 256, 512)
IMAGE_SIZE = 320
INPUTS = {"input": [6, IMAGE_SIZE, IMAGE_SIZE], "audio": [32, 16, 16]}
OUTPUTS = {"output": [3, IMAGE_SIZE, IMAGE_SIZE]}
RESIDUAL_BN_GAMMA = 0.5


def inverted_residual(
    g: GraphBuilder, x: Tensor, oup: int, stride: int, use_res_connect: bool, expand_ratio: int = 6
) -> Tensor:
    """MobileNetV2 block: linear bottleneck (no ReLU after the projection)."""
    hidden = x.c * expand_ratio
    y = g.conv(x, hidden, 1)
    y = g.conv(y, hidden, 3, stride=stride, pad=1, groups=hidden)
    y = g.conv(y, oup, 1, relu=False, bn_gamma=RESIDUAL_BN_GAMMA if use_res_connect else 1.0)
    return g.add(x, y) if use_res_connect else y


def double_conv_dw(g: GraphBuilder, x: Tensor, out_channels: int, stride: int = 2) -> Tensor:
    x = inverted_residual(g, x, out_channels, stride, use_res_connect=False, expand_ratio=2)
    return inverted_residual(g, x, out_channels, 1, use_res_connect=True, expand_ratio=2)


def up(g: GraphBuilder, x1: Tensor, x2: Tensor, out_channels: int) -> Tensor:
    x1 = g.pad_to(g.upsample2x(x1), x2)
    return double_conv_dw(g, g.concat([x1, x2]), out_channels, stride=1)


def audio_conv_ave(g: GraphBuilder, a: Tensor) -> Tensor:
    """[32,16,16] audio window -> [512,10,10], the size of the deepest image features."""
    ch = CHANNELS
    a = inverted_residual(g, a, ch[1], 1, use_res_connect=False, expand_ratio=2)
    a = inverted_residual(g, a, ch[2], 1, use_res_connect=False, expand_ratio=2)
    a = g.conv(a, ch[3], 3, stride=1, pad=1, bias=True)
    a = inverted_residual(g, a, ch[3], 1, use_res_connect=True, expand_ratio=2)
    a = g.conv(a, ch[4], 3, stride=2, pad=3, bias=True)
    a = inverted_residual(g, a, ch[4], 1, use_res_connect=True, expand_ratio=2)
    return inverted_residual(g, a, ch[4], 1, use_res_connect=True, expand_ratio=2)


def build_unet328_with_stats(seed: int = 0) -> tuple[onnx.ModelProto, LayerStats]:
    """Build the graph and return it with the parameter/MAC counts of the unfolded reference model."""
    ch = CHANNELS
    g = GraphBuilder(seed, "synctalk2d_unet328_ave")
    x = g.input("input", *INPUTS["input"])
    audio = g.input("audio", *INPUTS["audio"])

    x1 = inverted_residual(g, x, ch[0], 1, use_res_connect=False, expand_ratio=2)  # InConvDw
    x2 = double_conv_dw(g, x1, ch[0])
    x3 = double_conv_dw(g, x2, ch[1])
    x4 = double_conv_dw(g, x3, ch[2])
    x5 = double_conv_dw(g, x4, ch[3])
    x6 = double_conv_dw(g, x5, ch[4])

    a = audio_conv_ave(g, audio)
    y = g.concat([x6, a])
    y = double_conv_dw(g, y, ch[4], stride=1)  # fuse_conv
    y = double_conv_dw(g, y, ch[3], stride=1)

    y = up(g, y, x5, ch[3] // 2)
    y = up(g, y, x4, ch[2] // 2)
    y = up(g, y, x3, ch[1] // 2)
    y = up(g, y, x2, ch[0])
    y = up(g, y, x1, ch[0] // 2)
    y = g.conv(y, 3, 1, bias=True, bn=False, relu=False)  # OutConv
    g.output(g.sigmoid(y), "output", OUTPUTS["output"])

    doc = f"SyncTalk_2D 328 UNet (ave audio mode), random weights (seed {seed}), BatchNorm folded; not a trained model."
    return g.model(doc), g.stats


def build_unet328(seed: int = 0) -> onnx.ModelProto:
    """The stand-in UNet; same seed, same bytes."""
    return build_unet328_with_stats(seed)[0]
