"""A tiny hand-written "talking" model pair with the UNet's I/O, for demos and end-to-end tests.

Why: a random-weight UNet produces noise, so nobody can see whether audio, frames and paste-back line up.
This pair makes lip-sync visible and checkable with no trained model: the mouth opens with loudness.

Audio encoder (`mel` [N,1,80,16] -> `embedding` [N,512]): all 512 values of a chunk's embedding are its
loudness

    m = mean of the chunk's mel values over all 80 bands and the central time columns 6..9
    loudness = clip((m + 4) / 8 * LOUDNESS_GAIN - LOUDNESS_OFFSET, 0, 1)

with LOUDNESS_GAIN = 8/3 and LOUDNESS_OFFSET = 2/3, i.e. loudness = clip((m + 2) / 3, 0, 1): silence
(mel -4, the floor of the normalised log-mel) and anything quieter than m = -2 give 0; ordinary speech
(m around -1..+1) gives about 0.33..1.0; m >= +1 saturates at 1.

Generator (`input` [B,6,320,320], `audio` [B,32,16,16] -> `output` [B,3,320,320]): the audio window holds
16 embeddings of 512 values in C order, so embedding 8 (the current frame) is channels 16 and 17:

    loudness = clip(mean(audio[:, 16:18]), 0, 1)
    half_height = loudness * MOUTH_MAX_HALF_HEIGHT
    output = reference crop (input channels 0-2) with a dark ellipse of half-width MOUTH_HALF_WIDTH and
             that half-height centred at MOUTH_CENTER (x, y) blended in with a EDGE_PX soft edge

A closed mouth (loudness 0) leaves the crop untouched; pixels outside the widest ellipse are always
returned unchanged. Only elementwise ONNX ops on constant coordinate maps, no loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from demo_models.graph import BATCH, make_model, value_info
from lipsync_protocol.geometry import GEOMETRIES, Geometry

IMAGE_SIZE = 320
MOUTH_CENTER = (160, 212)  # (x, y) in the 320x320 model crop
MOUTH_HALF_WIDTH = 44.0  # px
MOUTH_MAX_HALF_HEIGHT = 28.0  # px at loudness 1
EDGE_PX = 2.0  # width of the soft edge, inside the ellipse
MOUTH_COLOR_BGR = (0.10, 0.08, 0.25)
EMBEDDING_SIZE = 512
CENTER_EMBEDDING = 8  # index of the current frame's embedding in the 16-embedding window
MEL_COLUMNS = (6, 10)  # central time columns [start, end) of a 16-column mel chunk
LOUDNESS_GAIN = 8.0 / 3.0
LOUDNESS_OFFSET = 2.0 / 3.0


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


@dataclass(frozen=True)
class Mouth:
    """Where the demo generator draws the mouth in its input crop: the 328 family's numbers above, or their image
    in another family's crop of the same face rectangle (a 160 model's inner 160 of a 168 crop)."""

    size: int = IMAGE_SIZE
    center: tuple[float, float] = MOUTH_CENTER
    half_width: float = MOUTH_HALF_WIDTH
    max_half_height: float = MOUTH_MAX_HALF_HEIGHT

    @classmethod
    def for_geometry(cls, geometry: Geometry) -> Mouth:
        if geometry.input_size == IMAGE_SIZE:
            return cls()
        base = GEOMETRIES["328"]
        k = geometry.crop_size / base.crop_size  # the same rectangle, resized to the other crop

        def image(v: float) -> float:
            return (v + base.inner + 0.5) * k - 0.5 - geometry.inner

        return cls(
            geometry.input_size,
            (image(MOUTH_CENTER[0]), image(MOUTH_CENTER[1])),
            MOUTH_HALF_WIDTH * k,
            MOUTH_MAX_HALF_HEIGHT * k,
        )


def mouth_alpha(loudness: np.ndarray | float, mouth: Mouth = Mouth()) -> np.ndarray:
    """NumPy twin of the graph's mouth mask, [B,1,S,S]: for tests and for code that must agree."""
    lo = np.clip(np.asarray(loudness, dtype=np.float32).reshape(-1, 1, 1, 1), 0.0, 1.0)
    cols, rows = _coordinate_maps(mouth)
    half_h = lo * np.float32(mouth.max_half_height)
    return np.clip((half_h * cols - rows) / np.float32(EDGE_PX), 0.0, 1.0)


def _coordinate_maps(mouth: Mouth = Mouth()) -> tuple[np.ndarray, np.ndarray]:
    """sqrt(1 - u^2) per column (u = dx / half-width) and |dy| per row, broadcastable to [1,1,H,W].

    The ellipse's half-height at column x is half_h * sqrt(1 - u^2); a pixel is inside by
    (that - |dy|) px, which becomes the blend weight after scaling by the edge width. This form never
    divides by the half-height, so loudness 0 is well defined (weight 0 everywhere).
    """
    cx, cy = mouth.center
    size = mouth.size
    x = np.arange(size, dtype=np.float32)
    u = (x - np.float32(cx)) / np.float32(mouth.half_width)
    cols = np.sqrt(np.clip(1.0 - u * u, 0.0, None)).astype(np.float32).reshape(1, 1, 1, size)
    rows = np.abs(x - np.float32(cy)).astype(np.float32).reshape(1, 1, size, 1)
    return cols, rows


def build_demo(seed: int = 0, geometry: Geometry = GEOMETRIES["328"]) -> onnx.ModelProto:
    """The demo generator for a family's input size (320, or 160 for the 160 family); `seed` is accepted for a
    uniform builder API and has no effect."""
    del seed
    mouth = Mouth.for_geometry(geometry)
    size = mouth.size
    cols, rows = _coordinate_maps(mouth)
    inits = [
        _init("ch_start", np.array([2 * CENTER_EMBEDDING], dtype=np.int64)),
        _init("ch_end", np.array([2 * CENTER_EMBEDDING + 2], dtype=np.int64)),
        _init("ref_start", np.array([0], dtype=np.int64)),
        _init("ref_end", np.array([3], dtype=np.int64)),
        _init("axis_c", np.array([1], dtype=np.int64)),
        _init("zero", np.array(0.0, dtype=np.float32)),
        _init("one", np.array(1.0, dtype=np.float32)),
        _init("max_half_height", np.array(mouth.max_half_height, dtype=np.float32)),
        _init("inv_edge", np.array(1.0 / EDGE_PX, dtype=np.float32)),
        _init("ellipse_cols", cols),
        _init("abs_dy", rows),
        _init("mouth_color", np.array(MOUTH_COLOR_BGR, dtype=np.float32).reshape(1, 3, 1, 1)),
    ]
    n = helper.make_node
    nodes = [
        n("Slice", ["audio", "ch_start", "ch_end", "axis_c"], ["center_emb"], name="center_emb"),
        n("ReduceMean", ["center_emb"], ["mean_emb"], name="mean_emb", axes=[1, 2, 3], keepdims=1),
        n("Clip", ["mean_emb", "zero", "one"], ["loudness"], name="loudness"),
        n("Mul", ["loudness", "max_half_height"], ["half_height"], name="half_height"),
        n("Mul", ["half_height", "ellipse_cols"], ["col_half_height"], name="col_half_height"),
        n("Sub", ["col_half_height", "abs_dy"], ["inside_px"], name="inside_px"),
        n("Mul", ["inside_px", "inv_edge"], ["alpha_raw"], name="alpha_raw"),
        n("Clip", ["alpha_raw", "zero", "one"], ["alpha"], name="alpha"),
        n("Slice", ["input", "ref_start", "ref_end", "axis_c"], ["reference"], name="reference"),
        n("Sub", ["mouth_color", "reference"], ["to_mouth"], name="to_mouth"),
        n("Mul", ["alpha", "to_mouth"], ["delta"], name="delta"),
        n("Add", ["reference", "delta"], ["blended"], name="blended"),
        n("Clip", ["blended", "zero", "one"], ["output"], name="output"),
    ]
    graph = helper.make_graph(
        nodes,
        "talking_demo",
        [value_info("input", [BATCH, 6, size, size]), value_info("audio", [BATCH, 32, 16, 16])],
        [value_info("output", [BATCH, 3, size, size])],
        initializer=inits,
    )
    return make_model(graph, "Demo talking model: reference crop with a loudness-driven dark mouth.")


def demo_loudness(mel: np.ndarray) -> np.ndarray:
    """NumPy twin of the demo encoder's per-chunk value, [N] for mel [N,1,80,16]."""
    m = np.asarray(mel, dtype=np.float32)[..., MEL_COLUMNS[0] : MEL_COLUMNS[1]].mean(axis=(1, 2, 3))
    return np.clip((m + 4.0) / 8.0 * LOUDNESS_GAIN - LOUDNESS_OFFSET, 0.0, 1.0).astype(np.float32)


def build_demo_audio_encoder(seed: int = 0) -> onnx.ModelProto:
    """The demo encoder; `seed` is accepted for a uniform builder API and has no effect."""
    del seed
    inits = [
        _init("col_start", np.array([MEL_COLUMNS[0]], dtype=np.int64)),
        _init("col_end", np.array([MEL_COLUMNS[1]], dtype=np.int64)),
        _init("axis_t", np.array([3], dtype=np.int64)),
        _init("scale", np.array(LOUDNESS_GAIN / 8.0, dtype=np.float32)),
        _init("shift", np.array(4.0 * LOUDNESS_GAIN / 8.0 - LOUDNESS_OFFSET, dtype=np.float32)),
        _init("zero", np.array(0.0, dtype=np.float32)),
        _init("one", np.array(1.0, dtype=np.float32)),
        _init("ones_row", np.ones((1, EMBEDDING_SIZE), dtype=np.float32)),
    ]
    n = helper.make_node
    nodes = [
        n("Slice", ["mel", "col_start", "col_end", "axis_t"], ["central"], name="central"),
        n("ReduceMean", ["central"], ["mel_mean"], name="mel_mean", axes=[1, 2, 3], keepdims=1),
        n("Flatten", ["mel_mean"], ["mel_mean_2d"], name="mel_mean_2d", axis=1),
        n("Mul", ["mel_mean_2d", "scale"], ["scaled"], name="scaled"),
        n("Add", ["scaled", "shift"], ["shifted"], name="shifted"),
        n("Clip", ["shifted", "zero", "one"], ["level"], name="level"),
        n("Mul", ["level", "ones_row"], ["embedding"], name="embedding"),
    ]
    graph = helper.make_graph(
        nodes,
        "talking_demo_audio_encoder",
        [value_info("mel", [BATCH, 1, 80, 16])],
        [value_info("embedding", [BATCH, EMBEDDING_SIZE])],
        initializer=inits,
    )
    return make_model(graph, "Demo audio encoder: every embedding value is the chunk's loudness in [0, 1].")
