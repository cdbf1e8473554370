"""Dynamic batching through the inference service's gRPC API: concurrent clients share passes, same frames."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from support import ServerThread, make_config

from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc


def request(frames: int, seed: int) -> pb.InferBatchRequest:
    rng = np.random.default_rng(seed)
    return pb.InferBatchRequest(
        model_id="demo",
        visual_frames=rng.integers(0, 256, (frames, 6, 320, 320), np.uint8).tobytes(),
        visual_dtype=pb.DTYPE_UINT8,
        audio_features=rng.uniform(0, 1, (frames, 32, 16, 16)).astype(np.float32).tobytes(),
        audio_features_shape=[frames, 32, 16, 16],
        batch_size=frames,
        output_dtype=pb.DTYPE_UINT8,
    )


def test_concurrent_clients_share_passes_and_get_the_unbatched_frames(models_dir: Path) -> None:
    batched = ServerThread(
        make_config(
            models_dir,
            **{
                "models.demo.batching.enabled": True,
                "models.demo.batching.max_queue_delay_ms": 20,
                "metrics.enabled": True,
                "metrics.port": 0,
            },
        )
    )
    plain = ServerThread(make_config(models_dir))
    try:
        requests = [request(1 + i % 3, i) for i in range(12)]
        with grpc.insecure_channel(batched.address) as a, grpc.insecure_channel(plain.address) as b:
            batched_stub = inference_pb2_grpc.InferenceServiceStub(a)
            plain_stub = inference_pb2_grpc.InferenceServiceStub(b)

            def call(i: int) -> pb.InferBatchResponse:
                return batched_stub.InferBatch(requests[i], timeout=30, metadata=[("x-client-id", f"client-{i % 4}")])

            with ThreadPoolExecutor(12) as pool:
                responses = list(pool.map(call, range(12)))
            for req, got in zip(requests, responses, strict=True):
                want = plain_stub.InferBatch(req, timeout=30)
                assert want.batch_requests == 1 and want.batch_frames == req.batch_size
                assert got.batch_frames >= req.batch_size and got.batch_frames <= 16
                assert [o.data for o in got.outputs] == [o.data for o in want.outputs]
                assert got.queue_time_ms >= 0 and got.inference_time_ms > 0
            assert max(r.batch_requests for r in responses) > 1, [r.batch_requests for r in responses]
        port = batched.running.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text = page.read().decode()
        passes = next(line for line in text.splitlines() if line.startswith("lipsync_batcher_passes_total{"))
        frames = next(line for line in text.splitlines() if line.startswith("lipsync_batcher_frames_total{"))
        assert 'model="demo"' in passes and 0 < float(passes.split()[-1]) < 12
        assert float(frames.split()[-1]) == sum(r.batch_size for r in requests)
    finally:
        batched.stop()
        plain.stop()
