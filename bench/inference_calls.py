"""The inference benchmark's inputs, modes and blocks: what both sides run, and one timed block of each side.

Why here, apart from bench/inference.py: the gRPC floor (bench/inference_floor.py), the per-step timings
(bench/inference_steps.py) and the profiles (bench/inference_profile.py) send the same requests in the same modes,
and their figures are set against the main run's, so they must be built the one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc as pb_grpc

from .harness import Meter, closed_loop, throughput

VISUAL_SHAPE = (6, 320, 320)
AUDIO_SHAPE = (32, 16, 16)
OUTPUT_SHAPE = (3, 320, 320)


@dataclass(frozen=True)
class Mode:
    """One way of calling the service: wire dtypes and how many requests the client keeps in flight."""

    name: str
    dtype: str  # "float32": old contract, float32 in and out; "uint8": uint8 pixels in, uint8 out
    in_flight: int


F32_2 = Mode("float32_in_flight_2", "float32", 2)
U8_2 = Mode("uint8_in_flight_2", "uint8", 2)
F32_1 = Mode("float32_in_flight_1", "float32", 1)
U8_1 = Mode("uint8_in_flight_1", "uint8", 1)
MODES = {m.name: m for m in (F32_2, U8_2, F32_1, U8_1)}


@dataclass
class Inputs:
    visual_u8: np.ndarray
    visual_f32: np.ndarray
    audio: np.ndarray

    @classmethod
    def make(cls, batch: int, seed: int = 0) -> Inputs:
        rng = np.random.default_rng(seed)
        visual_u8 = rng.integers(0, 256, (batch, *VISUAL_SHAPE), dtype=np.uint8)
        visual_f32 = np.divide(visual_u8, np.float32(255.0), dtype=np.float32)  # what the server makes of uint8
        audio = rng.standard_normal((batch, *AUDIO_SHAPE), dtype=np.float32)
        return cls(visual_u8, visual_f32, audio)

    @property
    def feeds(self) -> dict[str, np.ndarray]:
        return {"input": self.visual_f32, "audio": self.audio}


def make_request(model_id: str, inputs: Inputs, dtype: str) -> pb.InferBatchRequest:
    batch = len(inputs.audio)
    if dtype == "float32":
        # The old client: no dtype fields, audio shape inferred from its length (one window per frame).
        return pb.InferBatchRequest(
            model_id=model_id,
            visual_frames=inputs.visual_f32.tobytes(),
            audio_features=inputs.audio.tobytes(),
            batch_size=batch,
        )
    return pb.InferBatchRequest(
        model_id=model_id,
        visual_frames=inputs.visual_u8.tobytes(),
        audio_features=inputs.audio.tobytes(),
        batch_size=batch,
        visual_dtype=pb.DTYPE_UINT8,
        output_dtype=pb.DTYPE_UINT8,
        audio_features_shape=[batch, *AUDIO_SHAPE],
    )


def session_settings(threads: int) -> dict[str, Any]:
    return {
        "intra_op_threads": threads,
        "inter_op_threads": 1,
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "execution_mode": "ORT_SEQUENTIAL",
        "allow_spinning": False,  # the service's CPU default (docs/decisions/0010), both sides
        "providers": ["CPUExecutionProvider"],
    }


def bare_session(path: Path, threads: int) -> ort.InferenceSession:
    """The bare side: plain ORT with the settings the server is started with (see server_args)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # The service's defaults (inference_service.devices.session_options): no spinning on the CPU.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def server_args(models_dir: Path, threads: int) -> list[str]:
    """``lipsync-inference`` with one worker and the bare side's ORT settings, both models loaded before serving."""
    settings = [
        "server.cpu_workers=1",
        f"onnx.intra_op_threads={threads}",
        "onnx.inter_op_threads=1",
        "onnx.graph_optimization=all",
        "gpus.enabled=false",
        "models.demo.preload=true",
        "models.unet328.preload=true",
    ]
    return ["--config", str(models_dir / "inference.yaml"), *[a for kv in settings for a in ("--set", kv)]]


def bare_block(session: ort.InferenceSession, inputs: Inputs, seconds: float, meter: Meter) -> dict[str, Any]:
    feeds = inputs.feeds
    start = meter.snapshot()
    stamps = closed_loop(lambda: session.run(None, feeds), seconds).stamps
    usage = Meter.percent(start, meter.snapshot())
    return {
        "kind": "bare",
        "fps": round(throughput(stamps, len(inputs.audio)), 3),
        "iterations": len(stamps),
        "seconds": round(stamps[-1] - stamps[0], 3),
        **usage,
    }


def service_block(
    stub: pb_grpc.InferenceServiceStub, request: pb.InferBatchRequest, mode: Mode, seconds: float, meter: Meter
) -> dict[str, Any]:
    """``mode.in_flight`` client threads doing blocking InferBatch calls; the server's own run and queue times."""
    start = meter.snapshot()
    done = closed_loop(lambda: stub.InferBatch(request, timeout=120), seconds, mode.in_flight)
    usage = Meter.percent(start, meter.snapshot())
    stamps, replies = done.stamps, done.replies
    return {
        "kind": mode.name,
        "fps": round(throughput(stamps, request.batch_size), 3),
        "iterations": len(done),
        "seconds": round(max(stamps) - min(stamps), 3),
        "server_run_ms_mean": round(float(np.mean([r.inference_time_ms for r in replies])), 2),
        "server_queue_ms_mean": round(float(np.mean([r.queue_time_ms for r in replies])), 2),
        **usage,
    }


def bytes_per_frame(
    requests: dict[str, pb.InferBatchRequest], replies: dict[str, pb.InferBatchResponse], batch: int
) -> dict[str, Any]:
    """Serialized sizes (ByteSize) of the real messages, per frame."""
    req = {k: round(v.ByteSize() / batch, 1) for k, v in requests.items()}
    rep = {k: round(v.ByteSize() / batch, 1) for k, v in replies.items()}
    return {
        "request": {"float32_visual": req["float32"], "uint8_visual": req["uint8"]},
        "response": {"float32_output": rep["float32"], "uint8_output": rep["uint8"]},
        "round_trip": {
            "float32_in_float32_out": round(req["float32"] + rep["float32"], 1),
            "uint8_in_uint8_out": round(req["uint8"] + rep["uint8"], 1),
        },
        "payload_reference": {
            "visual_float32": int(np.prod(VISUAL_SHAPE)) * 4,
            "visual_uint8": int(np.prod(VISUAL_SHAPE)),
            "audio_float32": int(np.prod(AUDIO_SHAPE)) * 4,
            "output_float32": int(np.prod(OUTPUT_SHAPE)) * 4,
            "output_uint8": int(np.prod(OUTPUT_SHAPE)),
        },
    }


def check_outputs(bare_out: np.ndarray, replies: dict[str, pb.InferBatchResponse]) -> dict[str, float]:
    """Service outputs versus the bare session's for the same inputs (a sanity check, not a benchmark)."""
    f32 = np.stack([np.frombuffer(o.data, np.float32).reshape(OUTPUT_SHAPE) for o in replies["float32"].outputs])
    u8 = np.stack([np.frombuffer(o.data, np.uint8).reshape(OUTPUT_SHAPE) for o in replies["uint8"].outputs])
    expected_u8 = np.clip(bare_out * np.float32(255.0), 0.0, 255.0).astype(np.uint8)
    return {
        "float32_max_abs_diff": float(np.max(np.abs(f32 - bare_out))),
        "uint8_max_abs_diff": int(np.max(np.abs(u8.astype(np.int16) - expected_u8.astype(np.int16)))),
    }
