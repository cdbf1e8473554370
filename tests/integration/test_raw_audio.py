"""Speech in over gRPC: raw_audio on InferBatch (any common rate) and InferBatchComposite (batched with context)."""

from __future__ import annotations

import wave
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import soxr
from support import ServerThread, make_compositing_config

from inference_service import audio as A
from lipsync_protocol import speech as S
from lipsync_protocol import timing as T
from shared_proto import compositing_pb2, compositing_pb2_grpc
from shared_proto import inference_pb2 as pb

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech_16k.wav"


def speech() -> np.ndarray:
    with wave.open(str(SPEECH)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_infer_batch_accepts_common_rates(stub, rate: int) -> None:
    x = speech()
    data = soxr.resample(x, 16000, rate, quality="HQ") if rate != 16000 else x
    pcm = np.clip(np.round(data * 32768), -32768, 32767).astype("<i2")
    visual = np.zeros((4, 6, 320, 320), np.uint8)
    response = stub.InferBatch(
        pb.InferBatchRequest(
            model_id="demo",
            visual_frames=visual.tobytes(),
            visual_dtype=pb.DTYPE_UINT8,
            raw_audio=pcm.tobytes(),
            audio_encoding=pb.AUDIO_PCM_S16LE,
            sample_rate=rate,
            batch_size=4,
            first_frame=40,
        )
    )
    assert response.success and len(response.outputs) == 4
    assert response.audio_processing_ms > 0
    assert abs(response.utterance_frames - T.utterance_frames(len(x))) <= 1


def test_float32_raw_audio_equals_precomputed_features(stub, models_dir: Path) -> None:
    x = speech()
    session = ort.InferenceSession(str(models_dir / "demo" / "audio_encoder.onnx"), providers=["CPUExecutionProvider"])
    windows, _ = A.batch_features(
        S.RawAudio(x.tobytes(), "f32le", first_frame=60), 3, lambda c: session.run(None, {"mel": c})[0]
    )
    visual = np.random.default_rng(0).integers(0, 256, (3, 6, 320, 320), dtype=np.uint8)
    common = dict(model_id="demo", visual_frames=visual.tobytes(), visual_dtype=pb.DTYPE_UINT8, batch_size=3)
    by_features = stub.InferBatch(pb.InferBatchRequest(audio_features=windows.tobytes(), **common))
    lo, hi = T.required_samples(60, 3, len(x))
    by_speech = stub.InferBatch(
        pb.InferBatchRequest(
            raw_audio=x[lo:hi].tobytes(),
            audio_encoding=pb.AUDIO_FLOAT32,
            audio_offset_samples=lo,
            utterance_samples=len(x),
            first_frame=60,
            **common,
        )
    )
    assert [o.data for o in by_speech.outputs] == [o.data for o in by_features.outputs]


def test_composite_batches_with_context_equal_one_whole_request(models_dir: Path, inference_server) -> None:
    compositing = ServerThread.compositing(make_compositing_config(models_dir, inference_server.address))
    x = speech()
    pcm = (x * 32768).astype("<i2")
    try:
        with grpc.insecure_channel(compositing.address, options=[("grpc.max_receive_message_length", 1 << 28)]) as ch:
            stub = compositing_pb2_grpc.CompositingServiceStub(ch)
            whole = stub.InferBatchComposite(
                compositing_pb2.CompositeBatchRequest(
                    model_id="demo",
                    raw_audio=pcm.tobytes(),
                    audio_encoding=pb.AUDIO_PCM_S16LE,
                    sample_rate=16000,
                    batch_size=12,
                    start_frame_idx=30,
                )
            )
            assert whole.utterance_frames == T.utterance_frames(len(x))
            frames = []
            for first in range(0, 12, 5):
                count = min(5, 12 - first)
                lo, hi = T.required_samples(first, count, len(x))
                part = stub.InferBatchComposite(
                    compositing_pb2.CompositeBatchRequest(
                        model_id="demo",
                        raw_audio=pcm[lo:hi].tobytes(),
                        audio_encoding=pb.AUDIO_PCM_S16LE,
                        sample_rate=16000,
                        audio_offset_samples=lo,
                        utterance_samples=len(x),
                        first_frame=first,
                        batch_size=count,
                        start_frame_idx=30 + first,
                    )
                )
                frames.extend(part.composited_frames)
            assert frames == list(whole.composited_frames)
    finally:
        compositing.stop()
