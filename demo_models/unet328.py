"""The SyncTalk_2D "328" UNet ("ave" audio mode) as an ONNX graph with seeded random weights.

Why: benchmarks and capacity planning need a model with the real topology, tensor names, parameter
count (~12.2 M with BatchNorm) and cost (~4.9 GMAC per 320x320 frame), but no trained checkpoint and no
torch. The layer list mirrors `unet_328.py` of SyncTalk_2D (class `Model(n_channels=6, mode='ave')`):
InvertedResidual (1x1 expand, 3x3 depthwise, 1x1 project, BN each, ReLU after the first two, optional
residual), DoubleConvDW, InConvDw, Down, Up (bilinear x2 align_corners + pad + concat), AudioConvAve,
fuse_conv, OutConv and a sigmoid. BatchNorm is folded into the convs.

The same code describes the smaller "160" UNet (`unet.py`: four Downs, four Ups) through a `UNetSpec`, and
names every conv by its module path in the original network, so `model_import` builds both from a real
checkpoint with this one description (GraphBuilder with a WeightSource).

Residual branches get a damped BN scale so that random weights do not blow activations up along the
~60-layer path; this changes values only, never the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from demo_models.graph import GraphBuilder, LayerStats, Tensor

CHANNELS = (32, 64, 128, 256, 512)
IMAGE_SIZE = 320
AUDIO_SHAPE = [32, 16, 16]
INPUTS = {"input": [6, IMAGE_SIZE, IMAGE_SIZE], "audio": AUDIO_SHAPE}
OUTPUTS = {"output": [3, IMAGE_SIZE, IMAGE_SIZE]}
RESIDUAL_BN_GAMMA = 0.5


@dataclass(frozen=True)
class UNetSpec:
    """What differs between the 328 and the 160 UNet: image size and the widths of the Down and Up stages."""

    name: str
    image_size: int
    downs: tuple[int, ...]  # output channels of down1, down2, ...
    ups: tuple[int, ...]  # output channels of up1, up2, ...

    @property
    def inputs(self) -> dict[str, list[int]]:
        return {"input": [6, self.image_size, self.image_size], "audio": AUDIO_SHAPE}

    @property
    def outputs(self) -> dict[str, list[int]]:
        return {"output": [3, self.image_size, self.image_size]}


UNET328 = UNetSpec("synctalk2d_unet328_ave", 320, (32, 64, 128, 256, 512), (128, 64, 32, 32, 16))
UNET160 = UNetSpec("synctalk2d_unet160_ave", 160, (64, 128, 256, 512), (128, 64, 32, 32))


def _sub(key: str, suffix: str) -> str:
    return f"{key}.{suffix}" if key else ""


def inverted_residual(
    g: GraphBuilder,
    x: Tensor,
    oup: int,
    stride: int,
    use_res_connect: bool,
    expand_ratio: int = 6,
    key: str = "",
) -> Tensor:
    """MobileNetV2 block: linear bottleneck (no ReLU after the projection). Modules `key`.conv.0 .. 7."""
    hidden = x.c * expand_ratio
    y = g.conv(x, hidden, 1, key=_sub(key, "conv.0"), bn_key=_sub(key, "conv.1"))
    y = g.conv(y, hidden, 3, stride=stride, pad=1, groups=hidden, key=_sub(key, "conv.3"), bn_key=_sub(key, "conv.4"))
    y = g.conv(
        y,
        oup,
        1,
        relu=False,
        bn_gamma=RESIDUAL_BN_GAMMA if use_res_connect else 1.0,
        key=_sub(key, "conv.6"),
        bn_key=_sub(key, "conv.7"),
    )
    return g.add(x, y) if use_res_connect else y


def double_conv_dw(g: GraphBuilder, x: Tensor, out_channels: int, stride: int = 2, key: str = "") -> Tensor:
    x = inverted_residual(g, x, out_channels, stride, False, 2, _sub(key, "double_conv.0"))
    return inverted_residual(g, x, out_channels, 1, True, 2, _sub(key, "double_conv.1"))


def up(g: GraphBuilder, x1: Tensor, x2: Tensor, out_channels: int, key: str = "") -> Tensor:
    x1 = g.pad_to(g.upsample2x(x1), x2)
    return double_conv_dw(g, g.concat([x1, x2]), out_channels, stride=1, key=_sub(key, "conv"))


def audio_conv_ave(g: GraphBuilder, a: Tensor, key: str = "") -> Tensor:
    """[32,16,16] audio window -> [512,10,10], the size of the deepest image features."""
    ch = CHANNELS
    a = inverted_residual(g, a, ch[1], 1, False, 2, _sub(key, "conv1"))
    a = inverted_residual(g, a, ch[2], 1, False, 2, _sub(key, "conv2"))
    a = g.conv(a, ch[3], 3, stride=1, pad=1, bias=True, key=_sub(key, "conv3"), bn_key=_sub(key, "bn3"))
    a = inverted_residual(g, a, ch[3], 1, True, 2, _sub(key, "conv4"))
    a = g.conv(a, ch[4], 3, stride=2, pad=3, bias=True, key=_sub(key, "conv5"), bn_key=_sub(key, "bn5"))
    a = inverted_residual(g, a, ch[4], 1, True, 2, _sub(key, "conv6"))
    return inverted_residual(g, a, ch[4], 1, True, 2, _sub(key, "conv7"))


def build_unet(g: GraphBuilder, spec: UNetSpec) -> None:
    """Add the UNet of ``spec`` (inputs, layers, output) to ``g``; module paths as in SyncTalk_2D's state_dict."""
    ch = CHANNELS
    x = g.input("input", *spec.inputs["input"])
    audio = g.input("audio", *spec.inputs["audio"])

    skips = [inverted_residual(g, x, ch[0], 1, False, 2, "inc.inconv.0")]  # InConvDw
    for i, width in enumerate(spec.downs, start=1):
        skips.append(double_conv_dw(g, skips[-1], width, key=f"down{i}.maxpool_conv.0"))

    a = audio_conv_ave(g, audio, "audio_model")
    y = g.concat([skips.pop(), a])  # the image features first
    y = double_conv_dw(g, y, ch[4], stride=1, key="fuse_conv.0")
    y = double_conv_dw(g, y, ch[3], stride=1, key="fuse_conv.1")

    for i, width in enumerate(spec.ups, start=1):
        y = up(g, y, skips.pop(), width, key=f"up{i}")
    y = g.conv(y, 3, 1, bias=True, bn=False, relu=False, key="outc.conv")  # OutConv
    g.output(g.sigmoid(y), "output", spec.outputs["output"])


def build_unet328_with_stats(seed: int = 0) -> tuple[onnx.ModelProto, LayerStats]:
    """Build the graph and return it with the parameter/MAC counts of the unfolded reference model."""
    g = GraphBuilder(seed, UNET328.name)
    build_unet(g, UNET328)
    doc = f"SyncTalk_2D 328 UNet (ave audio mode), random weights (seed {seed}), BatchNorm folded; not a trained model."
    return g.model(doc), g.stats


def build_unet328(seed: int = 0) -> onnx.ModelProto:
    """The stand-in UNet; same seed, same bytes."""
    return build_unet328_with_stats(seed)[0]
