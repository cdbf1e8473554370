"""The SyncTalk_2D "ave" audio encoder (Wav2Lip/SyncNet style) with seeded random weights.

Why: the serving path runs this encoder once per 16-frame mel chunk before the UNet, so a stand-in with
the reference topology gives realistic timing and memory without a checkpoint. It mirrors
`AudioEncoder` of SyncTalk_2D's `data_utils/ave/models/audioEnc.py`: blocks of Conv2d + BatchNorm2d
(+ identity residual) + ReLU, strides 1, (3,1), 3, (3,2), then a 3x3 valid conv to 512 and a 1x1 conv
(both also followed by BN + ReLU), and the [N,512,1,1] map flattened to [N,512].
Mel chunk [N,1,80,16] -> 80x16 -> 27x16 -> 9x6 -> 3x3 -> 1x1.

Block i's conv and BatchNorm are named `<i>.conv_block.0` and `<i>.conv_block.1`, the keys of the
pretrained encoder file, so `model_import` builds the real encoder from this description.
"""

from __future__ import annotations

import onnx

from demo_models.graph import GraphBuilder, LayerStats, Tensor

INPUTS = {"mel": [1, 80, 16]}
OUTPUTS = {"embedding": [512]}
RESIDUAL_BN_GAMMA = 0.5
# Mel values span [-4, 4] (second moment ~5), not unit scale: the first conv is scaled down so that the
# embedding, which the UNet's audio branch consumes, is of order one instead of ~6.
FIRST_CONV_GAIN = 0.05

# (cout, stride, residual); every conv is 3x3 with padding 1 except the last two.
_BLOCKS: tuple[tuple[int, int | tuple[int, int], bool], ...] = (
    (32, 1, False),
    (32, 1, True),
    (32, 1, True),
    (64, (3, 1), False),
    (64, 1, True),
    (64, 1, True),
    (128, 3, False),
    (128, 1, True),
    (128, 1, True),
    (256, (3, 2), False),
    (256, 1, True),
)


def _block(
    g: GraphBuilder,
    x: Tensor,
    cout: int,
    stride: int | tuple[int, int],
    residual: bool,
    gain: float | None = None,
    index: int = 0,
) -> Tensor:
    """relu(bn(conv(x)) [+ x]): the ReLU comes after the residual sum, as in the reference."""
    names = {"key": f"{index}.conv_block.0", "bn_key": f"{index}.conv_block.1"}
    if not residual:
        return g.conv(x, cout, 3, stride=stride, pad=1, bias=True, gain=gain, **names)
    # The branch input is post-ReLU, so He gain 2 keeps its scale; a damped BN keeps the sum bounded.
    y = g.conv(x, cout, 3, stride=stride, pad=1, bias=True, relu=False, gain=2.0, bn_gamma=RESIDUAL_BN_GAMMA, **names)
    return g.relu(g.add(x, y))


def build_encoder(g: GraphBuilder) -> None:
    """Add the encoder (input `mel`, output `embedding`) to ``g``."""
    x = g.input("mel", *INPUTS["mel"])
    for i, (cout, stride, residual) in enumerate(_BLOCKS):
        x = _block(g, x, cout, stride, residual, gain=FIRST_CONV_GAIN if i == 0 else None, index=i)
    n = len(_BLOCKS)
    x = g.conv(x, 512, 3, stride=1, pad=0, bias=True, key=f"{n}.conv_block.0", bn_key=f"{n}.conv_block.1")
    x = g.conv(x, 512, 1, stride=1, pad=0, bias=True, key=f"{n + 1}.conv_block.0", bn_key=f"{n + 1}.conv_block.1")
    if (x.h, x.w) != (1, 1):
        raise AssertionError(f"encoder should reduce the mel chunk to 1x1, got {x.h}x{x.w}")
    flat = g.node("Flatten", [x.name], axis=1)
    g.output(flat, "embedding", OUTPUTS["embedding"])


def build_audio_encoder_with_stats(seed: int = 0) -> tuple[onnx.ModelProto, LayerStats]:
    """Build the encoder and return it with the param/MAC counts of the unfolded reference model."""
    g = GraphBuilder(seed, "synctalk2d_ave_audio_encoder")
    build_encoder(g)
    doc = f"SyncTalk_2D ave audio encoder, random weights (seed {seed}), BatchNorm folded; not trained."
    return g.model(doc), g.stats


def build_audio_encoder(seed: int = 0) -> onnx.ModelProto:
    """The stand-in audio encoder for unet328; same seed, same bytes."""
    return build_audio_encoder_with_stats(seed)[0]
