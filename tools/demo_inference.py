"""`make demo` (for now): start the inference service, make the demo model talk, save what it drew.

Starts `lipsync-inference` on a free loopback port, sends one batch of face
crops whose audio windows go from silence to loud, and writes the returned
mouth regions side by side to out/demo_inference.png with a timing summary.
The full speech-to-video demo goes through the compositing service once it
exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import grpc
import numpy as np

from service_common.processes import ServiceProcess, free_port
from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc

FRAMES = 8


def synthetic_face_crop(size: int = 320) -> np.ndarray:
    """A drawn lower face (BGR uint8) whose mouth sits where the demo model draws it."""
    img = np.full((size, size, 3), (60, 90, 130), np.uint8)
    cv2.ellipse(img, (160, 150), (150, 190), 0, 0, 360, (120, 160, 215), -1, cv2.LINE_AA)
    cv2.ellipse(img, (160, 120), (18, 40), 0, 0, 360, (100, 140, 200), -1, cv2.LINE_AA)
    cv2.ellipse(img, (160, 212), (48, 10), 0, 0, 360, (90, 90, 170), -1, cv2.LINE_AA)
    return img


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("out/demo_inference.png"))
    args = parser.parse_args(argv)
    config = args.models_dir / "inference.yaml"
    if not config.is_file():
        print(f"demo: {config} missing; run `make models` first", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    crop = synthetic_face_crop()
    chw = crop.transpose(2, 0, 1)
    masked = chw.copy()
    masked[:, 5:310, 5:315] = 0  # the reference's mouth mask (rows 5..309, cols 5..314)
    visual = np.repeat(np.concatenate([chw, masked])[None], FRAMES, axis=0)
    loudness = np.linspace(0.0, 1.0, FRAMES, dtype=np.float32)
    audio = np.repeat(loudness[:, None], 32 * 16 * 16, axis=1).reshape(FRAMES, 32, 16, 16)

    port = free_port()
    bin_dir = Path(sys.executable).parent
    argv_ = [str(bin_dir / "lipsync-inference"), "--config", str(config), "--port", str(port), "--host", "127.0.0.1"]
    started = time.perf_counter()
    with ServiceProcess(argv_, port, args.out.parent / "inference.log").wait_serving(120) as service:
        ready_s = time.perf_counter() - started
        with grpc.insecure_channel(service.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = pb.InferBatchRequest(
                model_id="demo",
                visual_frames=visual.tobytes(),
                visual_dtype=pb.DTYPE_UINT8,
                audio_features=audio.tobytes(),
                batch_size=FRAMES,
                output_dtype=pb.DTYPE_UINT8,
            )
            t0 = time.perf_counter()
            response = stub.InferBatch(request, timeout=60)
            call_ms = (time.perf_counter() - t0) * 1000
    mouths = [np.frombuffer(o.data, np.uint8).reshape(3, 320, 320).transpose(1, 2, 0) for o in response.outputs]
    sheet = np.concatenate(mouths, axis=1)
    cv2.imwrite(str(args.out), sheet)
    print(f"service ready in {ready_s:.1f} s on {response.device}")
    print(
        f"{FRAMES} frames: call {call_ms:.1f} ms, inference {response.inference_time_ms:.1f} ms, "
        f"queue {response.queue_time_ms:.1f} ms"
    )
    print(f"mouth regions, silent to loud, written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
