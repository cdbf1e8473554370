"""Speech sent with a request: its encodings, and the cheap checks both sides can run before any work.

A batch names its utterance's length, the utterance sample its audio starts at, and the utterance frame of its
first output frame (lipsync_protocol.timing says which samples those frames need).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgument
from .timing import MAX_RATE, MIN_RATE, SAMPLE_RATE, plan_batch

# AudioEncoding (shared by both APIs) as RawAudio's names. Unset means float32: what the Go system's clients send
# and its inference server decoded.
AUDIO_ENCODING_UNSPECIFIED, AUDIO_PCM_S16LE, AUDIO_FLOAT32 = 0, 1, 2
ENCODINGS = {AUDIO_ENCODING_UNSPECIFIED: "f32le", AUDIO_PCM_S16LE: "s16le", AUDIO_FLOAT32: "f32le"}
ENCODING_ENUMS = {"s16le": AUDIO_PCM_S16LE, "f32le": AUDIO_FLOAT32}


def encoding_name(value: int) -> str:
    try:
        return ENCODINGS[value]
    except KeyError:
        raise InvalidArgument(f"audio_encoding: expected AUDIO_PCM_S16LE or AUDIO_FLOAT32, got {value}") from None


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
                "(see lipsync_protocol.timing.required_samples)"
            )

    @classmethod
    def of(cls, request: object) -> RawAudio | None:
        """The speech fields of an InferBatchRequest, CompositeBatchRequest (same names and meaning), or None."""
        data = request.raw_audio  # type: ignore[attr-defined]
        if not data:
            return None
        return cls(
            data=data,
            encoding=encoding_name(request.audio_encoding),  # type: ignore[attr-defined]
            sample_rate=request.sample_rate or SAMPLE_RATE,  # type: ignore[attr-defined]
            offset=request.audio_offset_samples,  # type: ignore[attr-defined]
            utterance_samples=request.utterance_samples,  # type: ignore[attr-defined]
            first_frame=request.first_frame,  # type: ignore[attr-defined]
        )
