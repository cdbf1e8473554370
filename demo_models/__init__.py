"""ONNX models generated with onnx + numpy only: a visible "talking" demo and random-weight stand-ins.

Why: the inference service, benchmarks and tests need loadable models with the real I/O contract on any
machine, without trained checkpoints and without torch. A synthetic cartoon avatar (background video and
crop rectangles) matching the demo model's mouth position comes with them for the compositing service.
"""

from demo_models.audio_encoder import build_audio_encoder, build_audio_encoder_with_stats
from demo_models.avatar import crop_rect, draw_frame, mouth_center_in_frame, write_avatar
from demo_models.export import render_compositing_config, render_config, write_all
from demo_models.graph import LayerStats
from demo_models.talking import build_demo, build_demo_audio_encoder
from demo_models.unet328 import build_unet328, build_unet328_with_stats

__all__ = [
    "LayerStats",
    "build_audio_encoder",
    "build_audio_encoder_with_stats",
    "build_demo",
    "build_demo_audio_encoder",
    "build_unet328",
    "build_unet328_with_stats",
    "crop_rect",
    "draw_frame",
    "mouth_center_in_frame",
    "render_compositing_config",
    "render_config",
    "write_all",
    "write_avatar",
]
