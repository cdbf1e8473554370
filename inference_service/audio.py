"""The reference audio features (PIPELINE.md), vectorized numpy: speech in, [32, 16, 16] per video frame out.

Pipeline: 16 kHz mono, pre-emphasis 0.97, STFT (n_fft 800, hop 200, Hann,
centred with zeros), magnitude, 80 Slaney mel bands 55-7600 Hz, dB with a
1e-5 floor minus 20, scaled to [-4, 4]. Video frame k (25 fps) takes mel
frames ``[int(80 * (k / 25)), +16)``, slid back at the end; the audio encoder
turns each chunk into 512 values; the list is padded by repeating its first
and last entry, and frame i reads entries i-8 .. i+7 (zeros off either end).

Alignment, so that an utterance sent in consecutive batches gives exactly the
features of the whole: ``lipsync_protocol.timing.plan_batch`` says which
samples a batch's frames depend on (each mel frame reads the same samples
whichever batch computes it). Every per-frame computation here is independent
of how many frames are computed together (row-wise FFT, einsum rather than
BLAS), so the equality is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from lipsync_protocol.errors import InvalidArgument
from lipsync_protocol.speech import RawAudio, decode_pcm
from lipsync_protocol.timing import (
    EMBEDDING,
    HOP,
    MAX_RATE,
    MEL_STEP,
    MIN_RATE,
    N_FFT,
    SAMPLE_RATE,
    WINDOW_HALF,
    BatchPlan,
    chunk_count,
    chunk_starts,
    mel_frame_count,
    plan_batch,
    utterance_frames,
)

N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97


# -- mel filter bank (librosa's Slaney scale and normalization) ---------------------------------


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    mels = hz / f_sp
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


@lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """[401, 80] float64: ``librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)``, transposed."""
    fft_freqs = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(np.array(FMIN)), _hz_to_mel(np.array(FMAX)), N_MELS + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return np.ascontiguousarray(weights.T)


@lru_cache(maxsize=1)
def hann_window() -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)


# -- features ----------------------------------------------------------------------------------


def log_mel(audio: np.ndarray, offset: int, utterance_samples: int, mel_lo: int, mel_hi: int) -> np.ndarray:
    """Normalized log-mel frames ``[mel_lo, mel_hi)`` as [frames, 80] float32.

    ``audio`` holds utterance samples ``[offset, offset + len)`` and must cover
    what those frames read; outside the utterance the signal is zero (librosa's
    centred, zero-padded STFT).
    """
    x = np.asarray(audio, dtype=np.float64)
    start = mel_lo * HOP - N_FFT // 2  # first sample the first frame reads
    stop = (mel_hi - 1) * HOP + N_FFT // 2  # one past the last
    padded = np.zeros(stop - start, np.float64)
    lo, hi = max(start, 0), min(stop, utterance_samples)
    if hi > lo:
        segment = x[lo - offset : hi - offset]
        emphasized = segment.copy()
        emphasized[1:] -= PREEMPHASIS * segment[:-1]
        if lo > 0:
            emphasized[0] -= PREEMPHASIS * x[lo - 1 - offset]
        padded[lo - start : hi - start] = emphasized
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    magnitude = np.abs(np.fft.rfft(frames * hann_window(), axis=1))
    mel = np.einsum("tf,fm->tm", magnitude, mel_basis(), optimize=False)
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - 20.0
    return np.clip(8.0 * (db + 100.0) / 100.0 - 4.0, -4.0, 4.0).astype(np.float32)


def mel_chunks(mel: np.ndarray, mel_lo: int, chunk_lo: int, chunk_hi: int, utterance_samples: int) -> np.ndarray:
    """Encoder inputs [N, 1, 80, 16] for chunks ``[chunk_lo, chunk_hi)``; ``mel`` starts at frame ``mel_lo``."""
    starts = chunk_starts(np.arange(chunk_lo, chunk_hi), mel_frame_count(utterance_samples)) - mel_lo
    index = starts[:, None] + np.arange(MEL_STEP)[None, :]
    return np.ascontiguousarray(mel[index].transpose(0, 2, 1)[:, None])  # [N, 1, 80, 16]


def frame_windows(embeddings: np.ndarray, plan: BatchPlan) -> np.ndarray:
    """[count, 32, 16, 16] windows from the embeddings of chunks ``[chunk_lo, chunk_hi)``."""
    out = np.zeros((plan.count, 2 * WINDOW_HALF, EMBEDDING), np.float32)
    if plan.chunk_hi > plan.chunk_lo:
        n_chunks = chunk_count(plan.utterance_samples)
        total = n_chunks + 2
        frames = plan.first_frame + np.arange(plan.count)
        padded = frames[:, None] + np.arange(-WINDOW_HALF, WINDOW_HALF)[None, :]  # padded-list indices
        valid = (padded >= 0) & (padded < total)
        chunk = np.clip(padded - 1, 0, n_chunks - 1) - plan.chunk_lo
        out[valid] = embeddings[chunk[valid]]
    return out.reshape(plan.count, 32, 16, 16)


# -- a request's speech, at 16 kHz --------------------------------------------------------------


def resample_to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """soxr at high quality: the resampler librosa.load uses by default (``soxr_hq``), i.e. the reference's."""
    if rate == SAMPLE_RATE:
        return samples
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidArgument(f"sample_rate: expected {MIN_RATE}..{MAX_RATE} Hz (0 means 16000), got {rate}")
    import soxr

    return soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


def samples_16k(raw: RawAudio) -> tuple[np.ndarray, int, int]:
    """(samples, offset, utterance length), all at 16 kHz."""
    samples = decode_pcm(raw.data, raw.encoding)
    if raw.sample_rate != SAMPLE_RATE:
        samples = resample_to_16k(samples, raw.sample_rate)
        return samples, 0, len(samples)
    return samples, raw.offset, raw.utterance_samples or len(samples)


def batch_features(raw: RawAudio, count: int, encode: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, int]:
    """[count, 32, 16, 16] windows for the batch and the utterance's frame count (blocking: runs the encoder)."""
    samples, offset, utterance = samples_16k(raw)
    plan = plan_batch(raw.first_frame, count, utterance)
    if plan.chunk_hi == plan.chunk_lo:
        return frame_windows(np.zeros((0, EMBEDDING), np.float32), plan), utterance_frames(utterance)
    mel = log_mel(samples, offset, utterance, plan.mel_lo, plan.mel_hi)
    chunks = mel_chunks(mel, plan.mel_lo, plan.chunk_lo, plan.chunk_hi, utterance)
    embeddings = encode(chunks)
    if embeddings.shape != (len(chunks), EMBEDDING):
        raise InvalidArgument(f"audio encoder returned {list(embeddings.shape)}, expected [{len(chunks)}, {EMBEDDING}]")
    return frame_windows(embeddings, plan), utterance_frames(utterance)
