"""The Python API the `lipsync-client` command is a thin layer over."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from lipsync_protocol.channels import ClientTls, TlsError, sync_channel
from lipsync_protocol.timing import SAMPLE_RATE, required_samples, utterance_frames
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc, inference_pb2

from .media import MediaError, Mp4Writer, read_speech
from .retry import REASKS, cut_in_transit, retrying

if TYPE_CHECKING:
    from .session import LipsyncSession, StreamResult

MAX_MESSAGE = 256 * 1024 * 1024


class LipsyncError(RuntimeError):
    """A server error (with its gRPC status code) or a bad argument."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class RenderResult:
    frames: int
    audio_seconds: float
    wall_seconds: float
    audio_ms: float = 0.0  # server time computing audio features, summed over batches
    inference_ms: float = 0.0
    composite_ms: float = 0.0
    server_total_ms: float = 0.0
    batches: int = 0
    out: Path | None = None
    frames_dir: Path | None = None
    batch_latencies_ms: list[float] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.wall_seconds if self.wall_seconds else 0.0

    def add(self, response: pb.CompositeBatchResponse) -> None:
        """One batch's frames and server timings."""
        self.frames += len(response.composited_frames)
        self.batches += 1
        self.audio_ms += response.audio_processing_ms
        self.inference_ms += response.inference_time_ms
        self.composite_ms += response.composite_time_ms
        self.server_total_ms += response.total_time_ms

    @property
    def real_time_factor(self) -> float:
        """Wall time over audio duration: below 1 renders faster than real time."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else 0.0

    def summary(self) -> str:
        lines = [
            f"frames           {self.frames} ({self.batches} batches)",
            f"audio            {self.audio_seconds:.2f} s of speech; features {self.audio_ms:.0f} ms on the server",
            f"inference        {self.inference_ms:.0f} ms (server, summed over batches)",
            f"compositing      {self.composite_ms:.0f} ms (server, summed over batches)",
            f"total            {self.wall_seconds:.2f} s wall",
            f"throughput       {self.fps:.1f} frames/s",
            f"real-time factor {self.real_time_factor:.2f} (wall / audio; below 1 is faster than real time)",
        ]
        if self.out:
            lines.append(f"video            {self.out}")
        if self.frames_dir:
            lines.append(f"frames           {self.frames_dir}/")
        return "\n".join(lines)


class _Metadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token (``authorization: Bearer``) to every call, over TLS or plain text alike."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *self.metadata],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


def open_channel(
    server: str, options: list[tuple[str, Any]], *, token: str | None = None, tls: ClientTls | None = None
) -> tuple[grpc.Channel, grpc.Channel]:
    """A sync channel to ``server`` (TLS when ``tls`` is given) that sends ``token`` on every call.

    Returns the raw channel (to close) and the one to make stubs from.
    """
    try:
        raw = sync_channel(server, tls, options)
    except TlsError as exc:
        raise LipsyncError(str(exc)) from None
    if not token:
        return raw, raw
    return raw, grpc.intercept_channel(raw, _Metadata([("authorization", f"Bearer {token}")]))


class LipsyncClient:
    """A connection to a compositing server (or the load balancer in front of several).

    ``token`` is sent as ``authorization: Bearer <token>`` on every call; ``tls`` (a ClientTls) makes the channel
    TLS, with the system's roots unless it names a CA file, and a client certificate for mutual TLS.
    """

    def __init__(
        self, server: str, timeout: float = 120.0, *, token: str | None = None, tls: ClientTls | None = None
    ) -> None:
        self.server = server
        self.timeout = timeout
        options = retrying(
            [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
        )
        self._raw_channel, self.channel = open_channel(server, options, token=token, tls=tls)
        self.stub = compositing_pb2_grpc.CompositingServiceStub(self.channel)

    def __enter__(self) -> LipsyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._raw_channel.close()

    def _call(self, method: Callable, request: object, timeout: float | None = None) -> object:
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise LipsyncError(f"{exc.code().name}: {exc.details()}", exc.code()) from None

    def composite(self, request: pb.CompositeBatchRequest, timeout: float | None = None) -> pb.CompositeBatchResponse:
        """One batch (``InferBatchComposite``); see ``lipsync_client.retry`` for what is retried and how."""
        return self._batch_answer(None, request, timeout)

    def _batch_answer(
        self, future: grpc.Future | None, request: pb.CompositeBatchRequest, timeout: float | None
    ) -> pb.CompositeBatchResponse:
        """The answer of ``future`` (a call of ``request`` in flight, or None to make one), asking again when
        the answer was cut in transit: the batch is a pure function of the request."""
        for attempt in range(REASKS + 1):
            if future is None:
                future = self.stub.InferBatchComposite.future(request, timeout=timeout or self.timeout)
            try:
                return future.result()
            except grpc.RpcError as exc:
                if attempt < REASKS and cut_in_transit(exc):
                    future = None
                    continue
                raise LipsyncError(f"{exc.code().name}: {exc.details()}", exc.code()) from None
        raise AssertionError("unreachable")  # the loop returns or raises

    def health(self) -> pb.HealthResponse:
        return self._call(self.stub.Health, pb.HealthRequest(), timeout=10)

    def models(self) -> list[pb.ModelInfo]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout=30).models)

    def session(
        self,
        model: str,
        *,
        start_frame: int = 0,
        idle_frames: bool = False,
        drop_late_frames: bool = False,
        jpeg_quality: int = 0,
        max_batch_frames: int = 0,
        **options: Any,
    ) -> LipsyncSession:
        """A real-time session (``StreamSession``): see ``lipsync_client.session.LipsyncSession``."""
        from .session import LipsyncSession

        return LipsyncSession(
            self,
            model,
            start_frame=start_frame,
            idle_frames=idle_frames,
            drop_late_frames=drop_late_frames,
            jpeg_quality=jpeg_quality,
            max_batch_frames=max_batch_frames,
            **options,
        )

    def stream(self, model: str, audio: str | Path | np.ndarray, **options: Any) -> StreamResult:
        """Speech through a session as a live source would: see ``lipsync_client.session.stream``."""
        from .session import stream

        return stream(self, model, audio, **options)

    def render(
        self,
        model: str,
        audio: str | Path | np.ndarray,
        *,
        out: str | Path | None = None,
        frames_dir: str | Path | None = None,
        batch_size: int = 16,
        concurrency: int = 2,
        start_frame: int = 0,
        progress: Callable[[int, int], None] | None = None,
    ) -> RenderResult:
        """Render speech (a file, or 16 kHz mono float32 samples) to an MP4 and/or JPEG frames.

        The utterance goes in batches of ``batch_size`` frames, ``concurrency``
        at a time; each batch carries the samples its frames depend on
        (``required_samples``), so the frames equal those of one whole request.
        """
        if batch_size < 1 or concurrency < 1 or start_frame < 0:
            raise LipsyncError(
                f"batch_size, concurrency, start_frame: expected >= 1, >= 1, >= 0; got {batch_size}, {concurrency}, "
                f"{start_frame}"
            )
        if out is None and frames_dir is None:
            raise LipsyncError("out, frames_dir: give at least one")
        samples = speech_samples(audio)
        total = utterance_frames(len(samples)) if len(samples) >= 3000 else 0
        if not total:
            raise LipsyncError("audio: too short (at least 0.19 s of speech)")
        frames_path = Path(frames_dir) if frames_dir else None
        if frames_path:
            frames_path.mkdir(parents=True, exist_ok=True)
        writer = Mp4Writer(out, samples) if out else None
        result = RenderResult(
            0, len(samples) / SAMPLE_RATE, 0.0, out=Path(out) if out else None, frames_dir=frames_path
        )
        started = time.perf_counter()
        try:
            for first, response in self._batches(model, samples, total, batch_size, concurrency, start_frame, result):
                for i, data in enumerate(response.composited_frames):
                    if writer:
                        writer.add_jpeg(data)
                    if frames_path:
                        (frames_path / f"{first + i:06d}.jpg").write_bytes(data)
                result.add(response)
                if progress:
                    progress(result.frames, total)
        finally:
            if writer:
                writer.close()
        result.wall_seconds = time.perf_counter() - started
        return result

    def _batches(
        self,
        model: str,
        samples: np.ndarray,
        total: int,
        batch_size: int,
        concurrency: int,
        start_frame: int,
        result: RenderResult,
    ) -> Iterator[tuple[int, pb.CompositeBatchResponse]]:
        """The utterance's batches in order, ``concurrency`` in flight, each with the samples its frames need;
        every answer's latency goes into ``result``."""
        pending: collections.deque[tuple[int, float, pb.CompositeBatchRequest, Future]] = collections.deque()
        firsts = iter(range(0, total, batch_size))
        try:
            while True:
                while len(pending) < concurrency and (first := next(firsts, None)) is not None:
                    request = batch_request(model, samples, first, min(batch_size, total - first), start_frame)
                    call = self.stub.InferBatchComposite.future(request, timeout=self.timeout)
                    pending.append((first, time.perf_counter(), request, call))
                if not pending:
                    return
                first, sent, request, future = pending.popleft()
                response = self._batch_answer(future, request, None)
                result.batch_latencies_ms.append((time.perf_counter() - sent) * 1000)
                yield first, response
        finally:
            for *_, future in pending:
                future.cancel()


def speech_samples(audio: str | Path | np.ndarray) -> np.ndarray:
    """16 kHz mono float32: a file decoded (any common format), or samples as given."""
    if isinstance(audio, np.ndarray):
        return audio.astype(np.float32)
    try:
        return read_speech(audio)
    except MediaError as exc:
        raise LipsyncError(str(exc)) from None


def batch_request(
    model: str, samples: np.ndarray, first: int, count: int, start_frame: int
) -> pb.CompositeBatchRequest:
    """Frames ``first .. first + count`` of an utterance, with exactly the samples they depend on."""
    lo, hi = required_samples(first, count, len(samples))
    return pb.CompositeBatchRequest(
        model_id=model,
        raw_audio=samples[lo:hi].tobytes(),
        audio_encoding=inference_pb2.AUDIO_FLOAT32,
        sample_rate=SAMPLE_RATE,
        audio_offset_samples=lo,
        utterance_samples=len(samples),
        first_frame=first,
        batch_size=count,
        start_frame_idx=start_frame + first,
    )
