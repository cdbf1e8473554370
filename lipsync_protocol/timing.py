"""Audio and video timing both sides agree on: what a batch of frames needs from its utterance, in samples.

The reference renders video frame k (25 fps) from mel chunk ``[int(80 * k / 25), +16)`` (80 mel frames a second,
hop 200 at 16 kHz), pads the list of encoder outputs by repeating its first and last entry, and gives frame i the
window of entries i-8 .. i+7. A client that sends an utterance in batches sends, with each batch, exactly the
samples ``required_samples`` names, and gets exactly the features of processing the whole utterance at once;
a streaming session makes frame k as soon as ``plan_batch(k, 1, UNBOUNDED).sample_hi`` samples have arrived.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgument

SAMPLE_RATE = 16_000
FPS = 25
N_FFT = 800
HOP = 200
MEL_STEP = 16  # mel frames per chunk
WINDOW_HALF = 8  # frame i reads embeddings i-8 .. i+7
EMBEDDING = 512
AUDIO_SHAPE = (2 * WINDOW_HALF * EMBEDDING // (16 * 16), 16, 16)  # one frame's window: [32, 16, 16]
MIN_SAMPLES = (MEL_STEP - 1) * HOP  # shortest utterance with one full chunk (16 mel frames)
MIN_RATE, MAX_RATE = 8_000, 192_000  # sample rates a request may send (resampled to 16 kHz)
UNBOUNDED = 10**12  # an utterance length no frame's plan can reach: "more audio may come"


def mel_frame_count(utterance_samples: int) -> int:
    return 1 + utterance_samples // HOP


def chunk_count(utterance_samples: int) -> int:
    """Encoder inputs for an utterance: ``int((mel_frames - 16) / 80 * 25) + 2``."""
    return int((mel_frame_count(utterance_samples) - MEL_STEP) / 80.0 * FPS) + 2


def utterance_frames(utterance_samples: int) -> int:
    """Video frames the reference renders for an utterance: one per padded embedding."""
    return chunk_count(utterance_samples) + 2


def chunk_starts(chunks: np.ndarray, mel_frames: int) -> np.ndarray:
    """First mel frame of each chunk, computed as the reference does (float, then int), slid back at the end."""
    starts = (80.0 * (chunks / float(FPS))).astype(np.int64)
    return np.minimum(starts, mel_frames - MEL_STEP)


@dataclass(frozen=True)
class BatchPlan:
    first_frame: int
    count: int
    utterance_samples: int
    chunk_lo: int  # encoder inputs needed: [chunk_lo, chunk_hi)
    chunk_hi: int
    mel_lo: int  # mel frames needed: [mel_lo, mel_hi)
    mel_hi: int
    sample_lo: int  # utterance samples needed: [sample_lo, sample_hi)
    sample_hi: int


def plan_batch(first_frame: int, count: int, utterance_samples: int) -> BatchPlan:
    if utterance_samples < MIN_SAMPLES:
        raise InvalidArgument(
            f"raw_audio: the utterance needs at least {MIN_SAMPLES} samples at 16 kHz "
            f"({MIN_SAMPLES / SAMPLE_RATE:.4f} s), got {utterance_samples}"
        )
    if first_frame < 0 or count < 1:
        raise InvalidArgument(f"first_frame: expected >= 0 with a batch of at least 1, got {first_frame}, {count}")
    n_chunks = chunk_count(utterance_samples)
    total = n_chunks + 2
    lo = max(0, first_frame - WINDOW_HALF)
    hi = min(total, first_frame + count + WINDOW_HALF - 1)  # padded entries [lo, hi) are read
    if lo >= hi:  # every window lies past the end: all zeros
        return BatchPlan(first_frame, count, utterance_samples, 0, 0, 0, 0, 0, 0)
    chunk_lo = int(np.clip(lo - 1, 0, n_chunks - 1))
    chunk_hi = int(np.clip(hi - 2, 0, n_chunks - 1)) + 1
    mel_frames = mel_frame_count(utterance_samples)
    starts = chunk_starts(np.array([chunk_lo, chunk_hi - 1]), mel_frames)
    mel_lo, mel_hi = int(starts[0]), int(starts[1]) + MEL_STEP
    sample_lo = max(0, mel_lo * HOP - N_FFT // 2 - 1)  # one more for the pre-emphasis
    sample_hi = min(utterance_samples, (mel_hi - 1) * HOP + N_FFT // 2)
    return BatchPlan(first_frame, count, utterance_samples, chunk_lo, chunk_hi, mel_lo, mel_hi, sample_lo, sample_hi)


def required_samples(first_frame: int, count: int, utterance_samples: int) -> tuple[int, int]:
    """The utterance samples ``[start, end)`` a batch of frames depends on: what a client sends."""
    plan = plan_batch(first_frame, count, utterance_samples)
    return plan.sample_lo, plan.sample_hi


def frames_to_cover(samples: int, fps: float = FPS) -> int:
    """Frames a session renders for an utterance of ``samples``: the reference's count, then enough to cover
    the audio (silent frames until the video is as long as the speech)."""
    return max(utterance_frames(max(samples, MIN_SAMPLES)), math.ceil(samples * fps / SAMPLE_RATE))


def frame_time(frame_index: int, fps: float = FPS) -> float:
    """A frame's timestamp: it follows the audio clock, not the wall clock."""
    return frame_index / fps
