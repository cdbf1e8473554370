"""Each step of a demo InferBatch timed alone in this process, with the service's own functions (ms per batch).

Why: the profile says which kind of work the server's time goes to; this says what each step costs by itself, so
that a proposed change (read a field once, skip a conversion) can be priced before it is made.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from shared_proto import inference_pb2 as pb

from .harness import median
from .inference_calls import AUDIO_SHAPE, VISUAL_SHAPE, Inputs, bare_session, make_request

VISUAL_READ = "server: request.visual_frames read (copy; servicer reads it twice)"


def time_step(fn: Callable[[], Any], budget: float = 0.25, min_reps: int = 5) -> float:
    """Median ms of one call, after one untimed call."""
    fn()
    times = []
    end = time.perf_counter() + budget
    while time.perf_counter() < end or len(times) < min_reps:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times) * 1000.0


def steps(session: ort.InferenceSession, inputs: Inputs, dtype: str) -> dict[str, Callable[[], Any] | None]:
    """The steps of one InferBatch in ``dtype``, client and server, each a call on ready inputs."""
    from inference_service.tensors import to_model_input, to_output_dtype
    from lipsync_protocol.tensors import audio_windows, batch_of, frombuffer

    batch = len(inputs.audio)
    request = make_request("demo", inputs, dtype)
    wire = request.SerializeToString()
    parsed = pb.InferBatchRequest.FromString(wire)
    np_dtype = np.float32 if dtype == "float32" else np.uint8
    pb_dtype = pb.DTYPE_FLOAT32 if dtype == "float32" else pb.DTYPE_UINT8
    visual_bytes = parsed.visual_frames
    visual = batch_of(frombuffer(visual_bytes, np_dtype, "v"), VISUAL_SHAPE, batch, "v")
    audio = audio_windows(frombuffer(parsed.audio_features, np.float32, "a"), AUDIO_SHAPE, batch)
    feeds = {"input": to_model_input(visual), "audio": np.ascontiguousarray(audio, dtype=np.float32)}
    (raw_out,) = session.run(None, feeds)
    result = to_output_dtype(raw_out, np_dtype)

    def build() -> pb.InferBatchResponse:
        return pb.InferBatchResponse(
            outputs=[pb.RawMouthRegion(data=f.tobytes(), dtype=pb_dtype, shape=list(f.shape)) for f in result],
            success=True,
        )

    reply = build()
    reply_wire = reply.SerializeToString()
    return {
        "client: request SerializeToString": request.SerializeToString,
        "server: request parse (FromString)": lambda: pb.InferBatchRequest.FromString(wire),
        VISUAL_READ: lambda: parsed.visual_frames,
        "server: frombuffer/reshape + audio read/isfinite": lambda: (
            batch_of(frombuffer(visual_bytes, np_dtype, "v"), VISUAL_SHAPE, batch, "v"),
            audio_windows(frombuffer(parsed.audio_features, np.float32, "a"), AUDIO_SHAPE, batch),
        ),
        "server: isfinite(visual)": (lambda: np.isfinite(visual).all()) if dtype == "float32" else None,
        "server: to_model_input": lambda: to_model_input(visual),
        "server: ORT run": lambda: session.run(None, feeds),
        "server: to_output_dtype": lambda: to_output_dtype(raw_out, np_dtype),
        "server: build reply (tobytes + RawMouthRegion)": build,
        "server: reply SerializeToString": reply.SerializeToString,
        "client: reply parse (FromString)": lambda: pb.InferBatchResponse.FromString(reply_wire),
    }


def measure(models_dir: Path, threads: int, batch: int) -> dict[str, Any]:
    session = bare_session(models_dir / "demo" / "model.onnx", threads)
    inputs = Inputs.make(batch)
    out: dict[str, Any] = {"batch_size": batch, "unit": "ms per batch (median); per_frame = /batch"}
    for dtype in ("float32", "uint8"):
        timings = {}
        for name, fn in steps(session, inputs, dtype).items():
            if fn is not None:
                ms = time_step(fn)
                timings[name] = {"ms": round(ms, 3), "per_frame_ms": round(ms / batch, 4)}
        # The servicer reads visual_frames twice (`if not request.visual_frames` and frombuffer(...)).
        server_ms = sum(v["ms"] for k, v in timings.items() if k.startswith("server:")) + timings[VISUAL_READ]["ms"]
        out[dtype] = {
            "steps": timings,
            "server_steps_total_ms": round(server_ms, 3),
            "server_steps_total_per_frame_ms": round(server_ms / batch, 4),
        }
    return out
