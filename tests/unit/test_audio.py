"""Audio features: librosa parity, the reference's frame counts and windows, and batched == whole."""

from __future__ import annotations

import wave
from pathlib import Path

import librosa
import numpy as np
import onnxruntime as ort
import pytest
import soxr

from inference_service import audio as A
from lipsync_protocol import speech as S
from lipsync_protocol import timing as T
from lipsync_protocol.errors import InvalidArgument

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech_16k.wav"


def speech() -> np.ndarray:
    with wave.open(str(SPEECH)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def librosa_mel(wav: np.ndarray) -> np.ndarray:
    """The reference (Wav2Lip/SyncTalk audio.py) written with librosa: [80, T]."""
    y = np.append(wav[0], wav[1:] - 0.97 * wav[:-1]).astype(np.float32)
    spec = np.abs(librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800))
    mel = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ spec
    db = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


def reference_windows(embeddings: np.ndarray) -> np.ndarray:
    """SyncTalk_2D inference: pad by repeating first/last, then get_audio_features for every frame."""
    padded = np.concatenate([embeddings[:1], embeddings, embeddings[-1:]])
    out = []
    for index in range(len(padded)):
        left, right = index - 8, index + 8
        pad_left = max(0, -left)
        pad_right = max(0, right - len(padded))
        window = padded[max(left, 0) : min(right, len(padded))]
        window = np.concatenate([np.zeros((pad_left, 512)), window, np.zeros((pad_right, 512))])
        out.append(window.reshape(32, 16, 16))
    return np.stack(out).astype(np.float32)


def reference_chunks(mel_t: np.ndarray) -> np.ndarray:
    """SyncTalk_2D AudDataset: int((T-16)/80*25)+2 chunks, start int(80*(k/25)), slid back at the end."""
    count = int((mel_t.shape[0] - 16) / 80.0 * 25) + 2
    chunks = []
    for k in range(count):
        start = int(80.0 * (k / 25.0))
        end = start + 16
        if end > mel_t.shape[0]:
            end = mel_t.shape[0]
            start = end - 16
        chunks.append(mel_t[start:end].T[None])
    return np.stack(chunks)


def test_mel_matches_librosa_on_real_speech() -> None:
    x = speech()
    reference = librosa_mel(x)
    mel = A.log_mel(x, 0, len(x), 0, T.mel_frame_count(len(x)))
    assert mel.shape == reference.T.shape == (T.mel_frame_count(len(x)), 80)
    assert float(np.abs(mel - reference.T).max()) <= 1e-3


def test_mel_basis_is_librosas() -> None:
    expected = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    np.testing.assert_allclose(A.mel_basis().T, expected, atol=1e-7)


def test_a_range_of_mel_frames_equals_the_same_frames_of_the_whole() -> None:
    x = speech()
    whole = A.log_mel(x, 0, len(x), 0, T.mel_frame_count(len(x)))
    for lo, hi in [(0, 5), (37, 90), (600, T.mel_frame_count(len(x)))]:
        start, stop = max(0, lo * 200 - 401), min(len(x), (hi - 1) * 200 + 400)
        part = A.log_mel(x[start:stop], start, len(x), lo, hi)
        np.testing.assert_array_equal(part, whole[lo:hi])


def test_counts_and_chunks_follow_the_reference() -> None:
    x = speech()
    mel_t = librosa_mel(x).T
    expected_chunks = reference_chunks(mel_t)
    assert T.chunk_count(len(x)) == len(expected_chunks)
    assert T.utterance_frames(len(x)) == len(expected_chunks) + 2
    mel = A.log_mel(x, 0, len(x), 0, T.mel_frame_count(len(x)))
    chunks = A.mel_chunks(mel, 0, 0, T.chunk_count(len(x)), len(x))
    assert chunks.shape == (len(expected_chunks), 1, 80, 16)
    assert float(np.abs(chunks - expected_chunks).max()) <= 1e-3


# unet328's audio encoder is the reference's, full size: its tests are slow; the demo's is a cheap stand-in.
ENCODERS = ["demo", pytest.param("unet328", marks=pytest.mark.slow)]


@pytest.mark.parametrize("model", ENCODERS)
def test_windows_and_encoder_shapes_match_the_reference(models_dir: Path, model: str) -> None:
    x = speech()
    session = ort.InferenceSession(str(models_dir / model / "audio_encoder.onnx"), providers=["CPUExecutionProvider"])

    def encode(chunks: np.ndarray) -> np.ndarray:
        return session.run(None, {session.get_inputs()[0].name: chunks})[0]

    total = T.utterance_frames(len(x))
    raw = S.RawAudio(x.tobytes(), "f32le")
    windows, frames = A.batch_features(raw, total, encode)
    assert frames == total and windows.shape == (total, 32, 16, 16)
    mel = A.log_mel(x, 0, len(x), 0, T.mel_frame_count(len(x)))
    embeddings = encode(A.mel_chunks(mel, 0, 0, T.chunk_count(len(x)), len(x)))
    assert embeddings.shape == (T.chunk_count(len(x)), 512)
    np.testing.assert_array_equal(windows, reference_windows(embeddings))


@pytest.mark.parametrize("model", ENCODERS)
@pytest.mark.parametrize("batch", [1, 5, 24])
def test_batched_processing_equals_the_whole_utterance(models_dir: Path, model: str, batch: int) -> None:
    x = speech()
    session = ort.InferenceSession(str(models_dir / model / "audio_encoder.onnx"), providers=["CPUExecutionProvider"])

    def encode(chunks: np.ndarray) -> np.ndarray:
        return session.run(None, {session.get_inputs()[0].name: chunks})[0]

    total = T.utterance_frames(len(x))
    whole, _ = A.batch_features(S.RawAudio(x.tobytes(), "f32le"), total, encode)
    pcm = (x * 32768).astype("<i2")  # the s16le path too
    whole_s16, _ = A.batch_features(S.RawAudio(pcm.tobytes(), "s16le"), total, encode)
    parts, parts_s16 = [], []
    for first in range(0, total + 3, batch):  # a little past the end: silent windows
        lo, hi = T.required_samples(first, batch, len(x))
        for target, data, enc in ((parts, x, "f32le"), (parts_s16, pcm, "s16le")):
            raw = S.RawAudio(data[lo:hi].tobytes(), enc, offset=lo, utterance_samples=len(x), first_frame=first)
            raw.check(batch)
            target.append(A.batch_features(raw, batch, encode)[0])
    batched = np.concatenate(parts)
    np.testing.assert_array_equal(batched[:total], whole)
    np.testing.assert_array_equal(np.concatenate(parts_s16)[:total], whole_s16)
    assert not batched[total + 8 :].any()  # past the end plus the look-back: nothing but zeros


def test_window_that_misses_samples_is_refused() -> None:
    x = speech()
    lo, hi = T.required_samples(50, 8, len(x))
    assert 0 < lo < hi < len(x)
    raw = S.RawAudio(x[lo + 200 : hi].tobytes(), "f32le", offset=lo + 200, utterance_samples=len(x), first_frame=50)
    with pytest.raises(InvalidArgument, match="need utterance samples"):
        raw.check(8)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_rates_are_resampled_like_librosa_load(rate: int) -> None:
    x = speech()
    resampled_in = soxr.resample(x, 16000, rate, quality="HQ").astype(np.float32)
    raw = S.RawAudio(resampled_in.tobytes(), "f32le", sample_rate=rate)
    raw.check(1)
    samples, offset, length = A.samples_16k(raw)
    expected = librosa.resample(resampled_in, orig_sr=rate, target_sr=16000, res_type="soxr_hq")
    np.testing.assert_allclose(samples, expected, atol=1e-6)
    assert offset == 0 and abs(length - len(x)) <= 2


def test_decode_pcm_scaling() -> None:
    pcm = np.array([-32768, 0, 16384, 32767], "<i2")
    np.testing.assert_array_equal(S.decode_pcm(pcm.tobytes(), "s16le"), pcm / np.float32(32768))
    with pytest.raises(InvalidArgument, match="empty"):
        S.decode_pcm(b"", "s16le")
    with pytest.raises(InvalidArgument, match="audio_encoding"):
        S.decode_pcm(b"\0\0", "u8")
