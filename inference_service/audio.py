"""The reference audio features (PIPELINE.md), vectorized numpy: speech in, [32, 16, 16] per video frame out.

Pipeline: 16 kHz mono, pre-emphasis 0.97, STFT (n_fft 800, hop 200, Hann,
centred with zeros), magnitude, 80 Slaney mel bands 55-7600 Hz, dB with a
1e-5 floor minus 20, scaled to [-4, 4]. Video frame k (25 fps) takes mel
frames ``[int(80 * (k / 25)), +16)``, slid back at the end; the audio encoder
turns each chunk into 512 values; the list is padded by repeating its first
and last entry, and frame i reads entries i-8 .. i+7 (zeros off either end).

Alignment, so that an utterance sent in consecutive batches gives exactly the
features of the whole: a batch names its utterance's length, the utterance
sample its audio starts at, and the utterance frame of its first output frame.
``plan_batch`` says which samples those frames depend on (each mel frame reads
the same samples whichever batch computes it), and ``required_samples`` tells
a client what to send. Every per-frame computation here is independent of how
many frames are computed together (row-wise FFT, einsum rather than BLAS), so
the equality is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from service_common.errors import InvalidArgument

SAMPLE_RATE = 16_000
N_FFT = 800
HOP = 200
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
MEL_STEP = 16  # mel frames per chunk
FPS = 25
WINDOW_HALF = 8  # frame i reads embeddings i-8 .. i+7
EMBEDDING = 512
MIN_SAMPLES = (MEL_STEP - 1) * HOP  # shortest utterance with one full chunk (16 mel frames)
MIN_RATE, MAX_RATE = 8_000, 192_000


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


# -- counts and alignment ----------------------------------------------------------------------


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


# -- raw audio decoding ------------------------------------------------------------------------


def decode_pcm(data: bytes, encoding: str) -> np.ndarray:
    """float32 samples from little-endian PCM: ``s16le`` (scaled by 1/32768, as librosa loads) or ``f32le``."""
    if not data:
        raise InvalidArgument("raw_audio: empty")
    if encoding == "s16le":
        if len(data) % 2:
            raise InvalidArgument(f"raw_audio: {len(data)} bytes is not whole 16-bit samples (PCM_S16LE)")
        return np.frombuffer(data, "<i2").astype(np.float32) / np.float32(32768.0)
    if encoding == "f32le":
        if len(data) % 4:
            raise InvalidArgument(f"raw_audio: {len(data)} bytes is not whole float32 samples (FLOAT32)")
        samples = np.frombuffer(data, "<f4")
        if not np.isfinite(samples).all():
            raise InvalidArgument("raw_audio: contains NaN or infinity")
        return samples
    raise InvalidArgument(f"audio_encoding: expected PCM_S16LE or FLOAT32, got {encoding}")


def resample_to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """soxr at high quality: the resampler librosa.load uses by default (``soxr_hq``), i.e. the reference's."""
    if rate == SAMPLE_RATE:
        return samples
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidArgument(f"sample_rate: expected {MIN_RATE}..{MAX_RATE} Hz (0 means 16000), got {rate}")
    import soxr

    return soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


# -- a request's raw audio ---------------------------------------------------------------------


MAX_UTTERANCE_SAMPLES = SAMPLE_RATE * 24 * 3600  # an utterance's frame count must fit the API's int32 fields


@dataclass(frozen=True)
class RawAudio:
    """Speech sent with a batch, and the batch's place in its utterance (see the module docstring)."""

    data: bytes
    encoding: str = "s16le"  # or "f32le"
    sample_rate: int = SAMPLE_RATE
    offset: int = 0  # utterance sample of data[0]
    utterance_samples: int = 0  # 0: data is the whole utterance
    first_frame: int = 0  # utterance frame of the batch's first frame

    @property
    def sample_count(self) -> int:
        return len(self.data) // (2 if self.encoding == "s16le" else 4)

    def check(self, count: int) -> None:
        """Cheap checks before any work is queued."""
        if self.encoding not in ("s16le", "f32le"):
            raise InvalidArgument(f"audio_encoding: expected AUDIO_PCM_S16LE or AUDIO_FLOAT32, got {self.encoding}")
        if not self.data:
            raise InvalidArgument("raw_audio: empty")
        width = 2 if self.encoding == "s16le" else 4
        if len(self.data) % width:
            name = "16-bit samples (AUDIO_PCM_S16LE)" if width == 2 else "float32 samples (AUDIO_FLOAT32)"
            raise InvalidArgument(f"raw_audio: {len(self.data)} bytes is not whole {name}")
        if self.offset < 0 or self.utterance_samples < 0 or self.first_frame < 0:
            raise InvalidArgument(
                "audio_offset_samples, utterance_samples, first_frame: expected >= 0, got "
                f"{self.offset}, {self.utterance_samples}, {self.first_frame}"
            )
        if self.utterance_samples > MAX_UTTERANCE_SAMPLES or self.offset > MAX_UTTERANCE_SAMPLES:
            raise InvalidArgument(
                f"utterance_samples, audio_offset_samples: expected at most {MAX_UTTERANCE_SAMPLES} "
                f"(24 hours at 16 kHz), got {self.utterance_samples}, {self.offset}"
            )
        if self.sample_rate != SAMPLE_RATE:
            if not MIN_RATE <= self.sample_rate <= MAX_RATE:
                raise InvalidArgument(
                    f"sample_rate: expected {MIN_RATE}..{MAX_RATE} Hz (0 means 16000), got {self.sample_rate}"
                )
            if self.offset or self.utterance_samples not in (0, self.sample_count):
                raise InvalidArgument(
                    "sample_rate: an utterance sent in batches (audio_offset_samples, utterance_samples) must be "
                    f"16000 Hz so every batch sees the same samples; got {self.sample_rate} (resample it once first)"
                )
            return
        utterance = self.utterance_samples or self.sample_count
        if self.offset + self.sample_count > utterance:
            raise InvalidArgument(
                f"raw_audio: samples {self.offset}..{self.offset + self.sample_count} run past utterance_samples "
                f"{utterance}"
            )
        plan = plan_batch(self.first_frame, count, utterance)
        if plan.sample_hi > plan.sample_lo and (
            self.offset > plan.sample_lo or self.offset + self.sample_count < plan.sample_hi
        ):
            raise InvalidArgument(
                f"raw_audio: frames {self.first_frame}..{self.first_frame + count - 1} need utterance samples "
                f"{plan.sample_lo}..{plan.sample_hi}; got {self.offset}..{self.offset + self.sample_count} "
                "(see inference_service.audio.required_samples)"
            )

    def samples_16k(self) -> tuple[np.ndarray, int, int]:
        """(samples, offset, utterance length), all at 16 kHz."""
        samples = decode_pcm(self.data, self.encoding)
        if self.sample_rate != SAMPLE_RATE:
            samples = resample_to_16k(samples, self.sample_rate)
            return samples, 0, len(samples)
        return samples, self.offset, self.utterance_samples or len(samples)


def batch_features(raw: RawAudio, count: int, encode: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, int]:
    """[count, 32, 16, 16] windows for the batch and the utterance's frame count (blocking: runs the encoder)."""
    samples, offset, utterance = raw.samples_16k()
    plan = plan_batch(raw.first_frame, count, utterance)
    if plan.chunk_hi == plan.chunk_lo:
        return frame_windows(np.zeros((0, EMBEDDING), np.float32), plan), utterance_frames(utterance)
    mel = log_mel(samples, offset, utterance, plan.mel_lo, plan.mel_hi)
    chunks = mel_chunks(mel, plan.mel_lo, plan.chunk_lo, plan.chunk_hi, utterance)
    embeddings = encode(chunks)
    if embeddings.shape != (len(chunks), EMBEDDING):
        raise InvalidArgument(f"audio encoder returned {list(embeddings.shape)}, expected [{len(chunks)}, {EMBEDDING}]")
    return frame_windows(embeddings, plan), utterance_frames(utterance)
