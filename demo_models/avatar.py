"""A synthetic cartoon avatar (background video + per-frame crop rectangles) that fits the demo model.

Why: the compositing service needs a background video and one face crop rectangle per frame, as the
reference avatar preparation stores them. Real footage is not available in a fresh checkout, so this module
draws a simple, deterministic cartoon head with gentle motion. Its closed lips sit exactly where the demo
ONNX model (demo_models.talking) draws its opening mouth once the frame is cropped the reference way
(`frame[y1:y2, x1:x2]` -> 328x328 INTER_CUBIC -> inner [4:324, 4:324]), so a composited demo clip shows a
mouth that opens on the lips and not somewhere else on the face.

Geometry: everything is anchored on the mouth. Per frame a head pose (dx, dy, scale) gives an ideal mouth
position and a rect side; the integer rect is placed so that its mouth point is the ideal one, and the face
is then drawn around `mouth_center_in_frame(rect)` (the exact, sub-pixel image of the model's MOUTH_CENTER),
so the integer rounding of the rect never shifts the lips relative to the crop.
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

import av
import cv2
import numpy as np

from demo_models.talking import MOUTH_CENTER, MOUTH_HALF_WIDTH

FRAME_WIDTH = 1280
FRAME_HEIGHT = 720
FPS = 25
NUM_FRAMES = 125  # 5 s
CROP_SIZE = 328  # the reference resizes the rect to 328x328 ...
CROP_BORDER = 4  # ... and feeds the inner [4:324, 4:324] (320x320) to the model
BASE_SIDE = 268  # rect side in px at scale 1
BASE_MOUTH = (640.0, 470.0)  # (x, y) of the lips' centre in the frame at rest
MOTION_PX = (12.0, 8.0)  # amplitude of the sinusoidal head translation in x and y
SCALE_AMPLITUDE = 0.02  # head scale 1 +- 2 %
LIP_HALF_WIDTH_CROP = MOUTH_HALF_WIDTH + 2.0  # in 320-crop px: the opened mouth sits just inside the lips
LIP_HALF_HEIGHT_CROP = 13.0  # in 320-crop px, closed lips (both lips together)

SUBPIXEL_BITS = 4  # cv2 drawing `shift`: coordinates in 1/16 px
_ONE = 1 << SUBPIXEL_BITS
AA = cv2.LINE_AA

# Colours, BGR.
BG_TOP = (150, 132, 112)
BG_BOTTOM = (88, 74, 60)
SHIRT = (140, 92, 52)
SHIRT_SHADE = (112, 72, 40)
SKIN = (160, 194, 241)
SKIN_SHADE = (128, 160, 214)
HAIR = (34, 46, 76)
EYE_WHITE = (245, 245, 245)
IRIS = (110, 80, 40)
PUPIL = (20, 20, 20)
LIPS = (80, 70, 190)
LIP_LINE = (45, 35, 110)


# -- pose and rectangles ---------------------------------------------------------------------------------
def head_pose(index: int) -> tuple[float, float, float]:
    """(dx, dy, scale) of frame `index`: smooth sinusoids, x once and y twice over the clip."""
    t = 2.0 * math.pi * index / NUM_FRAMES
    dx = MOTION_PX[0] * math.sin(t)
    dy = MOTION_PX[1] * math.sin(2.0 * t + math.pi / 3.0)
    scale = 1.0 + SCALE_AMPLITUDE * math.sin(t + math.pi / 2.0)
    return dx, dy, scale


def _mouth_offset(side: float) -> tuple[float, float]:
    """Offset of the model's MOUTH_CENTER from the rect's top-left corner, in frame px.

    cv2.resize maps destination pixel u to source position (u + 0.5) * side / 328 - 0.5 (pixel centres
    at integers), and inner-crop pixel c is 328-crop pixel c + 4.
    """
    k = side / CROP_SIZE
    return (
        (MOUTH_CENTER[0] + CROP_BORDER + 0.5) * k - 0.5,
        (MOUTH_CENTER[1] + CROP_BORDER + 0.5) * k - 0.5,
    )


def mouth_center_in_frame(rect: tuple[int, int, int, int] | list[int]) -> tuple[float, float]:
    """Frame position (x, y) that the reference crop of `rect` maps to MOUTH_CENTER of the 320x320 crop."""
    x1, y1, x2, _ = rect
    ox, oy = _mouth_offset(float(x2 - x1))
    return x1 + ox, y1 + oy


def crop_rect(index: int) -> tuple[int, int, int, int]:
    """Square (x1, y1, x2, y2) of frame `index`, from just below the eyes to below the chin."""
    dx, dy, scale = head_pose(index)
    side = round(BASE_SIDE * scale)
    ox, oy = _mouth_offset(side)
    x1 = round(BASE_MOUTH[0] + dx - ox)
    y1 = round(BASE_MOUTH[1] + dy - oy)
    return x1, y1, x1 + side, y1 + side


def crop_rects(num_frames: int = NUM_FRAMES) -> list[list[int]]:
    return [list(crop_rect(i)) for i in range(num_frames)]


# -- drawing ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _background() -> np.ndarray:
    """Vertical studio gradient with a soft light behind the head; drawn once, copied per frame."""
    yy = np.linspace(0.0, 1.0, FRAME_HEIGHT, dtype=np.float32)[:, None, None]
    top = np.array(BG_TOP, dtype=np.float32)
    bottom = np.array(BG_BOTTOM, dtype=np.float32)
    img = top + (bottom - top) * yy
    xs = (np.arange(FRAME_WIDTH, dtype=np.float32) - FRAME_WIDTH / 2) / (FRAME_WIDTH * 0.45)
    ys = (np.arange(FRAME_HEIGHT, dtype=np.float32) - FRAME_HEIGHT * 0.4) / (FRAME_HEIGHT * 0.6)
    glow = np.exp(-(xs[None, :] ** 2 + ys[:, None] ** 2))[:, :, None]
    img = img * (0.85 + 0.25 * glow)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    img.flags.writeable = False
    return img


class _Pen:
    """Anti-aliased, sub-pixel cv2 drawing in a face frame: origin at the mouth, lengths times `scale`."""

    def __init__(self, img: np.ndarray, origin: tuple[float, float], scale: float) -> None:
        self.img = img
        self.ox, self.oy = origin
        self.s = scale

    def pt(self, x: float, y: float) -> tuple[int, int]:
        return round((self.ox + x * self.s) * _ONE), round((self.oy + y * self.s) * _ONE)

    def axes(self, a: float, b: float) -> tuple[int, int]:
        return round(a * self.s * _ONE), round(b * self.s * _ONE)

    def ellipse(self, center, axes, color, start=0.0, end=360.0, thickness=-1) -> None:
        th = thickness if thickness < 0 else max(1, round(thickness * self.s))
        cv2.ellipse(self.img, self.pt(*center), self.axes(*axes), 0.0, start, end, color, th, AA, SUBPIXEL_BITS)

    def poly(self, points, color) -> None:
        pts = np.array([self.pt(x, y) for x, y in points], dtype=np.int32)
        cv2.fillPoly(self.img, [pts], color, AA, SUBPIXEL_BITS)

    def line(self, p, q, color, thickness) -> None:
        cv2.line(self.img, self.pt(*p), self.pt(*q), color, max(1, round(thickness * self.s)), AA, SUBPIXEL_BITS)


def draw_frame(index: int, out: np.ndarray | None = None) -> np.ndarray:
    """Frame `index` as drawn (before encoding): BGR uint8, FRAME_HEIGHT x FRAME_WIDTH x 3.

    `out` (same shape and dtype) is reused when given: the encoder draws every frame into one buffer.
    """
    if out is None:
        img = _background().copy()
    else:
        img = out
        np.copyto(img, _background())
    dx, dy, scale = head_pose(index)
    rect = crop_rect(index)
    mouth = mouth_center_in_frame(rect)
    side = rect[2] - rect[0]

    # Body: follows the head at half the amplitude (a head nods more than the shoulders move).
    body = _Pen(img, (BASE_MOUTH[0] + 0.5 * dx, BASE_MOUTH[1] + 0.5 * dy), 1.0)
    body.poly([(-62, 20), (62, 20), (68, 150), (-68, 150)], SKIN_SHADE)  # neck
    body.ellipse((0, 300), (370, 180), SHIRT)  # shoulders / torso
    for sx in (-1, 1):
        body.line((sx * 150, 175), (sx * 185, 250), SHIRT_SHADE, 5)  # shirt seams
    body.poly([(-68, 128), (68, 128), (0, 215)], SKIN_SHADE)  # v-neck
    body.ellipse((0, 129), (68, 12), SKIN_SHADE)

    # Head: drawn around the lips' exact centre.
    head = _Pen(img, mouth, scale)
    head.ellipse((0, -175), (180, 215), HAIR)  # back hair
    for sx in (-1, 1):  # ears
        head.ellipse((sx * 160, -175), (22, 40), SKIN_SHADE)
        head.ellipse((sx * 162, -175), (11, 24), SKIN, 0, 360)
    head.ellipse((0, -145), (165, 225), SKIN)  # face, chin at y = +80
    head.ellipse((0, -312), (166, 78), HAIR, 180, 360)  # fringe
    head.poly([(-166, -312), (166, -312), (120, -280), (40, -296), (-30, -282), (-110, -292)], HAIR)
    for sx in (-1, 1):
        ex = sx * 62
        head.ellipse((ex, -196), (30, 14), EYE_WHITE)
        head.ellipse((ex + 3, -196), (11, 11), IRIS)
        head.ellipse((ex + 3, -196), (5, 5), PUPIL)
        head.ellipse((ex + 7, -200), (2.5, 2.5), EYE_WHITE)
        head.ellipse((ex, -196), (30, 14), SKIN_SHADE, 180, 360, 3)  # upper lid
        head.ellipse((ex, -228), (34, 9), HAIR, 195, 345, 7)  # eyebrow
    head.line((0, -175), (-6, -92), SKIN_SHADE, 4)  # nose bridge
    head.ellipse((0, -84), (20, 10), SKIN_SHADE, 10, 170, 4)  # nose tip
    for sx in (-1, 1):
        head.ellipse((sx * 13, -86), (5, 3.5), SKIN_SHADE)  # nostrils
    head.ellipse((0, 38), (18, 6), SKIN_SHADE, 30, 150, 3)  # shadow under the lower lip

    # Lips: sized in crop units so they match the model's mouth for any rect side; symmetric about the
    # centre line so their centroid is the mouth centre.
    k = side / CROP_SIZE
    lips = _Pen(img, mouth, 1.0)
    lips.ellipse((0, 0), (LIP_HALF_WIDTH_CROP * k, LIP_HALF_HEIGHT_CROP * k), LIPS)
    hw = LIP_HALF_WIDTH_CROP * k
    lips.line((-0.92 * hw, 0), (0.92 * hw, 0), LIP_LINE, 2)
    return img


# -- writing ---------------------------------------------------------------------------------------------
ENCODERS = ("libx264", "h264", "mpeg4")
_AVCOL_SMPTE170M = 6  # AVColorSpace / AVColorPrimaries / AVColorTransferCharacteristic: BT.601 (525)
_AVCOL_RANGE_MPEG = 1  # limited range, 16..235


# BT.601 limited-range chroma rows (U, V) over (B, G, R, 1): the standard of OpenCV's BGR2YUV_I420 luma.
_CHROMA_601 = np.array([[0.439, -0.291, -0.148, 128.0], [-0.071, -0.368, 0.439, 128.0]], dtype=np.float32)


def bgr_to_i420(img: np.ndarray) -> np.ndarray:
    """BGR uint8 -> planar yuv420p (I420) as [H*3/2, W] uint8, BT.601 limited range, rounded.

    Luma comes from OpenCV (correctly rounded; swscale's default bgr24->yuv420p path is biased by about
    -2 levels in B and R after a round trip). Chroma is the exact 2x2 mean, i.e. centred between the four
    pixels it stands for, so decoded colour edges are not shifted (cv2's own I420 chroma moved the decoded
    lips by about +0.5 px in x and y), which keeps the lips' decoded centre on the drawn one.
    """
    h, w = img.shape[:2]
    out = cv2.cvtColor(img, cv2.COLOR_BGR2YUV_I420)
    half = cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA)  # exact 2x2 mean, rounded
    uv = cv2.transform(half, _CHROMA_601)  # uint8 in, uint8 out (rounded, saturated)
    q = (h // 2) * (w // 2)
    flat = out.reshape(-1)
    flat[h * w : h * w + q] = uv[..., 0].reshape(-1)
    flat[h * w + q : h * w + 2 * q] = uv[..., 1].reshape(-1)
    return out


def pick_encoder() -> str:
    """The first encoder of ENCODERS that this PyAV build can open for writing."""
    for name in ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except ValueError:  # av.codec.codec.UnknownCodecError
            continue
        return name
    raise RuntimeError(f"PyAV has none of the encoders {ENCODERS}")


def encode_video(path: Path, frames, num_frames: int, encoder: str | None = None) -> str:
    """Encode BGR frames to `path` (mp4, yuv420p, FPS); H.264 at crf 18, or high-bitrate MPEG-4 Part 2."""
    encoder = encoder or pick_encoder()
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        if encoder in ("libx264", "h264"):
            stream = container.add_stream(encoder, rate=FPS, options={"crf": "18", "preset": "fast"})
        else:
            stream = container.add_stream(encoder, rate=FPS)
            stream.bit_rate = 12_000_000
            stream.codec_context.qmin = 1
            stream.codec_context.qmax = 3
        stream.width = FRAME_WIDTH
        stream.height = FRAME_HEIGHT
        stream.pix_fmt = "yuv420p"
        ctx = stream.codec_context
        # Tag what the pixels are (BT.601, limited range), so HD-aware players do not assume BT.709.
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = _AVCOL_SMPTE170M
        ctx.color_range = _AVCOL_RANGE_MPEG
        for i, img in zip(range(num_frames), frames, strict=True):
            frame = av.VideoFrame.from_ndarray(bgr_to_i420(img), format="yuv420p")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return encoder


def write_avatar(out_dir: Path, num_frames: int = NUM_FRAMES) -> dict:
    """Write `background.mp4` and `crop_rects.json` into out_dir; return paths, encoder and timing."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    video = out_dir / "background.mp4"
    buffer = np.empty((FRAME_HEIGHT, FRAME_WIDTH, 3), dtype=np.uint8)
    encoder = encode_video(video, (draw_frame(i, buffer) for i in range(num_frames)), num_frames)
    rects_path = out_dir / "crop_rects.json"
    rects_path.write_text(json.dumps(crop_rects(num_frames)) + "\n")
    return {
        "avatar_video": str(video),
        "crop_rects_path": str(rects_path),
        "num_frames": num_frames,
        "encoder": encoder,
        "seconds": round(time.perf_counter() - t0, 3),
    }


__all__ = [
    "FPS",
    "FRAME_HEIGHT",
    "FRAME_WIDTH",
    "NUM_FRAMES",
    "bgr_to_i420",
    "crop_rect",
    "crop_rects",
    "draw_frame",
    "head_pose",
    "mouth_center_in_frame",
    "pick_encoder",
    "write_avatar",
]
