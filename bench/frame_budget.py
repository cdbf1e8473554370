"""Where a separated frame's server CPU goes: each step the services take per frame, timed alone.

Why: the issue is not whether the split costs something but where each 0.1 ms of it goes. Every step below is the
services' own function on the demo avatar's 720p frames with the demo model's mouths, run alone in this process
(one thread, warm caches: a lower bound on what it costs inside a busy service), per frame of an 8-frame batch.
What the processes used beyond their sum is the cost of the machinery around the steps: gRPC's C core and its
Python glue, asyncio, thread hand-offs, and cache misses a step alone does not see.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from compositing_service.geometry import draw_mouth, real_crop
from compositing_service.jpeg_splice import SplicedBackground, SpliceSettings, encode_composite, fit_tile_width
from inference_service.inputs import crops_of, fill_from_crops
from inference_service.tensors import to_output_dtype
from lipsync_protocol.geometry import DEFAULT
from lipsync_protocol.wire import decode_batch_response, encode_batch_response
from shared_proto import compositing_pb2 as cpb
from shared_proto import inference_pb2 as pb

BATCH = 8


def per_frame_ms(step: Callable[[], Any], frames: int, seconds: float = 0.6) -> float:
    """CPU ms per frame of ``step`` (which handles ``frames`` frames), median of 3 timed runs."""
    for _ in range(3):
        step()
    results = []
    for _ in range(3):
        runs, started = 0, time.process_time()
        while runs < 3 or time.process_time() - started < seconds / 3:
            step()
            runs += 1
        results.append((time.process_time() - started) * 1000 / (runs * frames))
    return sorted(results)[1]


def hop_request(rng: np.random.Generator) -> pb.InferBatchRequest:
    """What the compositing service sends inference for a batch: the held crops by key, and the audio features."""
    features = rng.standard_normal((BATCH, 32, 16, 16)).astype(np.float32)
    return pb.InferBatchRequest(
        model_id="demo",
        visual_keys=[f"demo@0123456789abcdef/{i}" for i in range(BATCH)],
        visual_channels=3,
        audio_features=features.tobytes(),
        audio_features_shape=list(features.shape),
        batch_size=BATCH,
        output_dtype=pb.DTYPE_UINT8,
    )


def measure(
    frames: list[np.ndarray], rects: list[tuple[int, int, int, int]], crops: list[np.ndarray], mouths: np.ndarray
) -> dict[str, float]:
    """CPU ms per frame of each step, by name."""
    cv2.setNumThreads(1)  # as the compositing service runs OpenCV: one frame per pool thread
    rng = np.random.default_rng(0)
    idx = list(range(BATCH))
    reals = np.stack([real_crop(crops[i]) for i in idx])
    held = crops_of(reals)
    visual = np.empty((BATCH, 6, 320, 320), np.float32)
    fill_from_crops(visual, held, DEFAULT)
    output = rng.random((BATCH, 3, 320, 320), dtype=np.float32)
    u8 = mouths[idx]
    request = hop_request(rng)
    request_bytes = request.SerializeToString()
    head = pb.InferBatchResponse(inference_time_ms=1.0, success=True, device="cpu", batch_frames=BATCH)
    response_bytes = encode_batch_response(head, u8)
    settings = SpliceSettings(75, tile_width=fit_tile_width(frames[0].shape[1], np.array(rects)))
    backgrounds = [SplicedBackground.from_frame(frames[i], settings) for i in idx]
    scratch = np.empty_like(crops[0])
    decoded = decode_batch_response(response_bytes).outputs
    jpegs = [
        encode_composite(backgrounds[i], frames[i], rects[i], lambda d, i=i: draw_mouth(d, crops[i], decoded[i]))[0]
        for i in idx
    ]

    def draw_only() -> None:
        for i in idx:
            x1, y1, x2, y2 = rects[i]
            draw_mouth(np.empty((y2 - y1, x2 - x1, 3), np.uint8), crops[i], decoded[i], DEFAULT, scratch)

    def spliced() -> None:
        for i in idx:
            encode_composite(
                backgrounds[i],
                frames[i],
                rects[i],
                lambda d, i=i: draw_mouth(d, crops[i], decoded[i], DEFAULT, scratch),
            )

    steps = {
        "inference: parse the request (keys + audio features)": lambda: pb.InferBatchRequest.FromString(request_bytes),
        "inference: build the model input from held crops": lambda: fill_from_crops(visual, held, DEFAULT),
        "inference: mouths to uint8": lambda: to_output_dtype(output.copy(), np.uint8, owned=True),
        "inference: encode the response": lambda: encode_batch_response(head, u8),
        "compositing: build the request": lambda: request.SerializeToString(),
        "compositing: decode the response (views)": lambda: decode_batch_response(response_bytes),
        "compositing: draw the mouth into the box (merge + resize)": draw_only,
        "compositing: draw + encode the box + splice (the floor)": spliced,
        "compositing: the client's response": lambda: cpb.CompositeBatchResponse(
            composited_frames=jpegs
        ).SerializeToString(),
    }
    return {name: round(per_frame_ms(step, BATCH), 4) for name, step in steps.items()}
