"""Reading speech files and writing MP4s, with PyAV (FFmpeg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lipsync_protocol.timing import FPS, SAMPLE_RATE


class MediaError(ValueError):
    """An audio file that cannot be read, or a video that cannot be written."""


def read_speech(path: Path | str, name: str = "") -> np.ndarray:
    """Any common audio file (WAV, FLAC, MP3, OGG, M4A...) as 16 kHz mono float32.

    Resampled with soxr HQ, the resampler librosa.load uses, so the features
    match the reference's for files at other rates. Errors name the ``audio``
    parameter and the file as ``name`` (default: its file name).
    """
    import av  # decoding a file needs PyAV and soxr; the rest of the client does not
    import soxr

    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise MediaError(f"audio: {name or path} does not exist")
    chunks: list[np.ndarray] = []
    rate = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"audio: {name} has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp", layout="mono")  # mixdown only; rate unchanged
            for frame in container.decode(stream):
                rate = frame.sample_rate
                for mono in resampler.resample(frame):
                    chunks.append(mono.to_ndarray()[0])
            for mono in resampler.resample(None):
                chunks.append(mono.to_ndarray()[0])
    except av.error.FFmpegError as exc:
        raise MediaError(f"audio: cannot decode {name} ({exc.strerror or type(exc).__name__})") from exc
    if not chunks or not rate:
        raise MediaError(f"audio: {name} holds no samples")
    samples = np.concatenate(chunks).astype(np.float32)
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return samples


class Mp4Writer:
    """H.264 video at 25 fps from JPEG frames (decoded by PyAV's MJPEG decoder), with the speech muxed in as AAC."""

    def __init__(self, path: Path | str, audio: np.ndarray | None, crf: int = 20) -> None:
        import av

        self.av = av
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), mode="w")
        self.jpeg = av.CodecContext.create("mjpeg", "r")
        self.video = None
        self.crf = crf
        self.audio = audio
        self.audio_stream = None
        self.frames = 0

    def _open_video(self, width: int, height: int) -> None:
        codec = "libx264" if "libx264" in self.av.codecs_available else "h264"
        self.video = self.container.add_stream(codec, rate=FPS)
        self.video.width, self.video.height = width - width % 2, height - height % 2
        self.video.pix_fmt = "yuv420p"
        self.video.options = {"crf": str(self.crf), "preset": "veryfast"}
        if self.audio is not None and len(self.audio):  # every stream exists before the first packet
            self.audio_stream = self.container.add_stream("aac", rate=SAMPLE_RATE)
            self.audio_stream.layout = "mono"

    def add_jpeg(self, data: bytes) -> None:
        try:
            decoded = self.jpeg.decode(self.av.Packet(data))
        except self.av.error.FFmpegError:
            decoded = []
        if not decoded:
            raise MediaError(f"frame {self.frames}: the server sent bytes that are not an image")
        image = decoded[0].to_ndarray(format="bgr24")
        if self.video is None:
            self._open_video(image.shape[1], image.shape[0])
        assert self.video is not None
        image = image[: self.video.height, : self.video.width]
        frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
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
            frame = self.av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
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
