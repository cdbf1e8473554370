"""Reading speech files and writing MP4s, with PyAV (FFmpeg)."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import soxr

from inference_service.audio import SAMPLE_RATE

FPS = 25


class MediaError(ValueError):
    """An audio file that cannot be read, or a video that cannot be written."""


def read_speech(path: Path | str) -> np.ndarray:
    """Any common audio file (WAV, FLAC, MP3, OGG, M4A...) as 16 kHz mono float32.

    Resampled with soxr HQ, the resampler librosa.load uses, so the features
    match the reference's for files at other rates.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"--audio: {path} does not exist")
    chunks: list[np.ndarray] = []
    rate = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"--audio: {path.name} has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp", layout="mono")  # mixdown only; rate unchanged
            for frame in container.decode(stream):
                rate = frame.sample_rate
                for mono in resampler.resample(frame):
                    chunks.append(mono.to_ndarray()[0])
            for mono in resampler.resample(None):
                chunks.append(mono.to_ndarray()[0])
    except av.error.FFmpegError as exc:
        raise MediaError(f"--audio: cannot decode {path.name} ({exc})") from exc
    if not chunks or not rate:
        raise MediaError(f"--audio: {path.name} holds no samples")
    samples = np.concatenate(chunks).astype(np.float32)
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return samples


class Mp4Writer:
    """H.264 video at 25 fps from JPEG frames, with the speech muxed in as AAC."""

    def __init__(self, path: Path | str, audio: np.ndarray | None, crf: int = 20) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), mode="w")
        self.video = None
        self.crf = crf
        self.audio = audio
        self.audio_stream = None
        self.frames = 0

    def _open_video(self, width: int, height: int) -> None:
        codec = "libx264" if "libx264" in av.codecs_available else "h264"
        self.video = self.container.add_stream(codec, rate=FPS)
        self.video.width, self.video.height = width - width % 2, height - height % 2
        self.video.pix_fmt = "yuv420p"
        self.video.options = {"crf": str(self.crf), "preset": "veryfast"}
        if self.audio is not None and len(self.audio):  # every stream exists before the first packet
            self.audio_stream = self.container.add_stream("aac", rate=SAMPLE_RATE)
            self.audio_stream.layout = "mono"

    def add_jpeg(self, data: bytes) -> None:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise MediaError(f"frame {self.frames}: the server sent bytes that are not an image")
        if self.video is None:
            self._open_video(image.shape[1], image.shape[0])
        assert self.video is not None
        image = image[: self.video.height, : self.video.width]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        frame.pts = self.frames
        for packet in self.video.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def _write_audio(self) -> None:
        stream = self.audio_stream
        if stream is None or self.audio is None:
            return
        samples = self.audio.astype(np.float32)
        step = 1024
        for start in range(0, len(samples), step):
            chunk = samples[start : start + step]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = start
            for packet in stream.encode(frame):
                self.container.mux(packet)
        for packet in stream.encode(None):
            self.container.mux(packet)

    def close(self) -> None:
        if self.video is not None:
            for packet in self.video.encode(None):
                self.container.mux(packet)
        self._write_audio()
        self.container.close()
