"""gRPC glue for the compositing service: messages in, CompositingCore, messages out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np

from lipsync_protocol.errors import InvalidArgument, ResourceExhausted, Unavailable
from lipsync_protocol.speech import RawAudio, encoding_name
from lipsync_protocol.tensors import frombuffer, numpy_dtype
from lipsync_protocol.timing import FPS, SAMPLE_RATE
from service_common import request_log
from service_common.grpc_glue import deadline_of, translate_errors, translate_stream_errors
from shared_proto import compositing_pb2 as pb
from shared_proto import compositing_pb2_grpc as pb_grpc

from .avatars import AvatarEntry
from .core import CompositingCore
from .session import SessionOptions, SessionStats, StreamSession

log = logging.getLogger(__name__)


def session_options(config: pb.SessionConfig, core: CompositingCore) -> SessionOptions:
    limit = core.config.session_max_batch_frames
    if not 0 <= config.max_batch_frames <= limit:
        raise InvalidArgument(
            f"max_batch_frames: expected 0..{limit} (session.max_batch_frames), got {config.max_batch_frames}"
        )
    return SessionOptions(
        model_id=config.model_id,
        start_frame_idx=config.start_frame_idx,
        fps=config.fps or FPS,
        output_format=config.output_format or core.config.output_format,
        jpeg_quality=config.jpeg_quality or core.config.jpeg_quality,
        encoding=encoding_name(config.audio_encoding),
        sample_rate=config.sample_rate or SAMPLE_RATE,
        idle_frames=config.idle_frames,
        drop_late_frames=config.drop_late_frames,
        max_batch_frames=config.max_batch_frames or limit,
    )


class SessionServicerMixin:
    """StreamSession: the request stream feeds a StreamSession; its frames are the response stream."""

    core: CompositingCore
    active_sessions: int = 0
    open_sessions: set[StreamSession]

    async def end_sessions(self) -> None:
        """The replica is stopping: every open session sends the frames it has made, then ends with UNAVAILABLE.
        The client opens a new session (the load balancer picks another replica) and goes on from there."""
        for session in list(self.open_sessions):
            session.fail(
                Unavailable(
                    f"session {session.session_id}: this replica is shutting down; the frames made so far were sent. "
                    "Open a new session to continue (another replica takes it)",
                    retry_after_ms=0,
                )
            )

    @translate_stream_errors
    async def StreamSession(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SessionResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "config":
            raise InvalidArgument("config: the first SessionRequest must carry SessionConfig")
        with self._session_slot():
            session = StreamSession(
                self.core,
                session_options(first.config, self.core),
                buffer_frames=self.core.config.session_buffer_frames,
                max_audio_ahead_s=self.core.config.session_max_audio_ahead_s,
            )
            reader = None
            try:
                await session.start()
                self.open_sessions.add(session)
                yield pb.SessionResponse(started=started_message(session))
                reader = asyncio.create_task(read_requests(session, request_iterator))
                async for frame in session.frames():
                    yield pb.SessionResponse(frame=frame.to_proto())
                request_log.note(model=session.options.model_id, frames=session.stats.frames)
                yield pb.SessionResponse(ended=ended_message(session.stats))
            finally:
                if reader is not None:
                    reader.cancel()
                self.open_sessions.discard(session)
                await session.close()

    @contextlib.contextmanager
    def _session_slot(self) -> Iterator[None]:
        """One of the replica's ``session.max_sessions``, held while the session lasts."""
        if self.active_sessions >= self.core.config.max_sessions:
            raise ResourceExhausted(
                f"sessions: {self.active_sessions} open on this replica (session.max_sessions); retry later",
                retry_after_ms=1000,
            )
        self.active_sessions += 1
        try:
            yield
        finally:
            self.active_sessions -= 1


async def read_requests(session: StreamSession, requests: AsyncIterator[pb.SessionRequest]) -> None:
    """The client's side of a session after its config: audio and controls until it closes; a bad message (or
    a failure feeding it) ends the session with its status."""
    try:
        async for request in requests:
            kind = request.WhichOneof("message")
            if kind == "audio":
                await session.feed(request.audio.data)
            elif kind == "control":
                if request.control.interrupt:
                    session.interrupt()
                if request.control.end_of_input:
                    session.end_of_input()
            else:
                raise InvalidArgument("config: SessionConfig may only be sent first")
        session.close_input()
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        session.fail(exc)


def started_message(session: StreamSession) -> pb.SessionStarted:
    height, width = session.avatar.frame_shape
    return pb.SessionStarted(
        session_id=session.session_id,
        frame_width=width,
        frame_height=height,
        fps=session.options.fps,
        num_background_frames=session.avatar.num_frames,
    )


def ended_message(stats: SessionStats) -> pb.SessionEnded:
    return pb.SessionEnded(
        frames=stats.frames,
        speech_frames=stats.speech_frames,
        idle_frames=stats.idle_frames,
        dropped_frames=stats.dropped_frames,
        audio_seconds=stats.audio_samples / SAMPLE_RATE,
    )


class CompositingServicer(SessionServicerMixin, pb_grpc.CompositingServiceServicer):
    def __init__(self, core: CompositingCore) -> None:
        self.core = core
        self.open_sessions: set[StreamSession] = set()

    @translate_errors
    async def InferBatchComposite(
        self, request: pb.CompositeBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompositeBatchResponse:
        visual = None
        visual_bytes = request.visual_frames  # each read of a bytes field copies it: read once
        if visual_bytes:
            visual = frombuffer(visual_bytes, numpy_dtype(request.visual_dtype, "visual_dtype"), "visual_frames")
        audio = frombuffer(request.audio_features, np.float32, "audio_features")
        result = await self.core.composite_batch(
            request.model_id,
            audio,
            batch_size=request.batch_size,
            start_frame_idx=request.start_frame_idx,
            audio_shape=tuple(request.audio_features_shape),
            visual_frames=visual,
            raw_audio=RawAudio.of(request),
            deadline=deadline_of(context),
        )
        request_log.note(
            model=request.model_id,
            frames=len(result.frames),
            prepare=result.prepare_ms,
            inference_call=result.inference_call_ms,
            queue=result.queue_ms,
            audio=result.audio_ms,
            inference=result.inference_ms,
            compositing=result.composite_ms,
            encode=result.encode_ms,
            total=result.total_ms,
        )
        return pb.CompositeBatchResponse(
            composited_frames=result.frames,
            inference_time_ms=result.inference_ms,
            composite_time_ms=result.composite_ms,
            total_time_ms=result.total_ms,
            audio_processing_ms=result.audio_ms,
            model_loaded=result.model_loaded,
            model_load_time_ms=result.model_load_ms,
            success=True,
            gpu_id=result.gpu_id,
            frame_indices=result.frame_indices,
            prepare_time_ms=result.prepare_ms,
            queue_time_ms=result.queue_ms,
            inference_call_ms=result.inference_call_ms,
            device=result.device,
            cache_hits=result.cache_hits,
            cache_misses=result.cache_misses,
            utterance_frames=result.utterance_frames,
            spliced_frames=result.spliced_frames,
        )

    def _stats(self, entry: AvatarEntry | None, model_id: str) -> pb.ModelStats:
        cache = self.core.cache.stats(model_id)
        stats = pb.ModelStats(
            cache_hits=cache.hits,
            cache_misses=cache.misses,
            cached_frames=cache.frames,
            cache_bytes=cache.bytes,
            cache_evictions=cache.evictions,
            memory_bytes=cache.bytes + cache.encoded_bytes,
            cache_encoded_bytes=cache.encoded_bytes,
        )
        spliced, full = self.core.jpeg_counts.get(model_id, (0, 0))
        stats.jpeg_spliced_frames, stats.jpeg_full_frames = spliced, full
        if entry is not None:
            stats.usage_count = entry.usage_count
            stats.last_used_unix_ms = entry.last_used_unix_ms
            stats.total_inference_time_ms = entry.total_inference_ms
            stats.loaded_unix_ms = entry.loaded_unix_ms
            stats.total_frames = entry.total_frames
            stats.mean_inference_time_ms = entry.mean_inference_ms
            stats.load_time_ms = entry.load_time_ms
        return stats

    def _info(self, model_id: str) -> pb.ModelInfo:
        spec = self.core.avatars.spec(model_id)
        entry = self.core.avatars.get(model_id)
        root = self.core.config.models_root

        def shown(path) -> str:
            return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

        info = pb.ModelInfo(
            model_id=model_id,
            loaded=entry is not None,
            model_path=spec.model_path,
            background_dir=shown(spec.background),
            crop_rects_path=shown(spec.crop_rects_path),
            stats=self._stats(entry, model_id),
        )
        if entry is not None:
            info.num_frames = entry.avatar.num_frames
            info.frame_height, info.frame_width = entry.avatar.frame_shape
        return info

    @translate_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._info(m) for m in sorted(self.core.config.models)])

    @translate_errors
    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.LoadModelResponse:
        entry, loaded, load_ms = await self.core.load(request.model_id, request.force_reload)
        return pb.LoadModelResponse(
            success=True,
            load_time_ms=load_ms if loaded else 0.0,
            stats=self._stats(entry, request.model_id),
        )

    @translate_errors
    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        await self.core.unload(request.model_id)
        return pb.UnloadModelResponse(success=True)

    @translate_errors
    async def GetModelStats(
        self, request: pb.GetModelStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelStatsResponse:
        ids = [request.model_id] if request.model_id else sorted(self.core.config.models)
        infos = [self._info(m) for m in ids]
        return pb.GetModelStatsResponse(
            models=infos,
            max_models=self.core.config.max_models,
            loaded_models=len(self.core.avatars.entries()),
            total_memory_bytes=self.core.cache.total_bytes,
            max_memory_bytes=self.core.config.background_cache_bytes,
        )

    @translate_errors
    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        reachable = await self.core.backend.reachable()
        inference_ok = reachable > 0
        hop = self.core.backend.hop
        return pb.HealthResponse(
            healthy=inference_ok,
            inference_server_healthy=inference_ok,
            loaded_models=len(self.core.avatars.entries()),
            max_models=self.core.config.max_models,
            version=self.core.version,
            inference_server_url=self.core.backend.description,
            inference_mode=self.core.config.inference_mode,
            cache_bytes=self.core.cache.total_bytes,
            cache_max_bytes=self.core.config.background_cache_bytes,
            active_sessions=self.active_sessions,
            jpeg_spliced_frames=self.core.compositor.counts.spliced,
            jpeg_full_frames=self.core.compositor.counts.full,
            inference_servers_reachable=reachable,
            hop_requests=hop.requests,
            hop_frames=hop.frames,
            hop_request_bytes=hop.request_bytes,
            hop_response_bytes=hop.response_bytes,
            hop_inputs_sent=hop.inputs_sent,
            hop_inputs_resent=hop.inputs_resent,
        )
