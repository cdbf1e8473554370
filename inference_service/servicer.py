"""gRPC glue for the inference service: messages in, InferenceCore, messages out."""

from __future__ import annotations

import grpc
import numpy as np
from google.protobuf import message_factory

from lipsync_protocol.errors import InvalidArgument
from lipsync_protocol.inputs import FULL_CHANNELS
from lipsync_protocol.speech import RawAudio
from lipsync_protocol.tensors import frombuffer, numpy_dtype
from lipsync_protocol.wire import encode_batch_response, serialize_response
from service_common import request_log
from service_common.grpc_glue import deadline_of, translate_errors
from service_common.metrics import ServiceMetrics, report_batch
from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc as pb_grpc

from .core import InferenceCore, InputsMissing, VisualBatch
from .registry import ModelEntry


def model_stats(entry: ModelEntry) -> pb.ModelStats:
    return pb.ModelStats(
        usage_count=entry.usage_count,
        last_used_unix_ms=entry.last_used_unix_ms,
        total_inference_time_ms=entry.total_inference_ms,
        memory_bytes=entry.memory_bytes,
        loaded_unix_ms=entry.loaded_unix_ms,
        total_frames=entry.total_frames,
        mean_inference_time_ms=entry.mean_inference_ms,
        device=entry.model.device.label,
        load_time_ms=entry.load_time_ms,
    )


def client_of(context: grpc.aio.ServicerContext) -> str:
    """Who a request is for, to share batches fairly: the end client a compositing replica names in
    ``x-client-id``, else the caller's token name, else its address."""
    for key, value in context.invocation_metadata() or ():
        if key == request_log.CLIENT_KEY and value:
            return str(value)[:128]
    return request_log.client_name() or context.peer() or ""


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, core: InferenceCore, metrics: ServiceMetrics | None = None) -> None:
        self.core = core
        self.metrics = metrics

    @translate_errors
    async def InferBatch(
        self, request: pb.InferBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.InferBatchResponse | bytes:
        visual_dtype = numpy_dtype(request.visual_dtype, "visual_dtype")
        output_dtype = numpy_dtype(request.output_dtype, "output_dtype")
        visual_bytes = request.visual_frames  # each read of a bytes field copies it: read once
        keys = list(request.visual_keys)
        if not visual_bytes and not keys:
            raise InvalidArgument("visual_frames: required ([B,6,320,320] float32 or uint8), or visual_keys")
        visual = VisualBatch(
            frombuffer(visual_bytes, visual_dtype, "visual_frames"),
            request.visual_channels or FULL_CHANNELS,
            keys,
            request.visual_sent,
        )
        audio = frombuffer(request.audio_features, np.float32, "audio_features")
        try:
            result = await self.core.infer(
                request.model_id,
                visual,
                audio,
                batch_size=request.batch_size,
                audio_shape=tuple(request.audio_features_shape),
                raw_audio=RawAudio.of(request),
                output_dtype=output_dtype,
                deadline=deadline_of(context),
                client=client_of(context),
            )
        except InputsMissing as missing:
            return pb.InferBatchResponse(success=False, error=missing.message, missing_visual=missing.positions)
        out = result.outputs
        report_batch(
            self.metrics,
            request.model_id,
            len(out),
            {
                "queue": result.queue_ms,
                "audio": result.audio_ms,
                "inference": result.inference_ms,
                "total": result.queue_ms + result.audio_ms + result.inference_ms,
            },
        )
        head = pb.InferBatchResponse(
            inference_time_ms=result.inference_ms,
            audio_processing_ms=result.audio_ms,
            queue_time_ms=result.queue_ms,
            success=True,
            worker_id=result.worker_id,
            gpu_id=result.device.gpu_id,
            device=result.device.label,
            utterance_frames=result.utterance_frames,
            batch_frames=result.batch_frames,
            batch_requests=result.batch_requests,
        )
        return encode_batch_response(head, out)  # the mouths copied once, straight from the output array

    def _model_info(self, model_id: str) -> pb.ModelInfo:
        entry = self.core.registry.get(model_id)
        if entry is not None:
            return pb.ModelInfo(
                model_id=model_id,
                loaded=True,
                model_path=str(entry.spec.model_path.relative_to(self.core.config.models_root))
                if entry.spec.model_path.is_relative_to(self.core.config.models_root)
                else str(entry.spec.model_path),
                stats=model_stats(entry),
                gpu_id=entry.model.device.gpu_id,
                device=entry.model.device.label,
            )
        spec = self.core.registry.spec_for(model_id)
        path = spec.model_path
        root = self.core.config.models_root
        return pb.ModelInfo(
            model_id=model_id,
            loaded=False,
            model_path=str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
            gpu_id=-1,
        )

    @translate_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(m) for m in self.core.registry.known_ids()])

    @translate_errors
    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.LoadModelResponse:
        outcome = await self.core.load(request.model_id, request.force_reload, request.model_path)
        return pb.LoadModelResponse(
            success=True,
            load_time_ms=0.0 if outcome.already_loaded else outcome.load_time_ms,
            stats=model_stats(outcome.entry),
            evicted=outcome.evicted,
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
        registry = self.core.registry
        ids = [request.model_id] if request.model_id else registry.known_ids()
        entries = registry.entries()
        return pb.GetModelStatsResponse(
            models=[self._model_info(m) for m in ids],
            max_models=self.core.config.max_models,
            loaded_models=len(entries),
            total_memory_bytes=sum(e.memory_bytes for e in entries),
            max_memory_bytes=self.core.config.max_memory_bytes,
        )

    @translate_errors
    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        statuses = self.core.device_status()
        inputs = self.core.inputs.stats()
        devices = [
            pb.DeviceInfo(
                device=s.device.label,
                gpu_id=s.device.gpu_id,
                name=s.device.name,
                total_memory_bytes=s.device.total_memory_bytes,
                used_memory_bytes=s.used_memory_bytes,
                loaded_models=s.loaded_models,
                execution_provider=s.device.provider,
                workers=s.device.workers,
                active_runs=s.active_runs,
                queued_runs=s.queued_runs,
            )
            for s in statuses
        ]
        gpus = [
            pb.GPUInfo(
                gpu_id=s.device.gpu_id,
                name=s.device.name,
                total_memory_bytes=s.device.total_memory_bytes,
                used_memory_bytes=s.used_memory_bytes,
                loaded_models=s.loaded_models,
            )
            for s in statuses
            if s.device.kind == "cuda"
        ]
        return pb.HealthResponse(
            healthy=True,
            cuda_available=self.core.cuda_available,
            loaded_models=len(self.core.registry.entries()),
            max_models=self.core.config.max_models,
            gpu_count=len(gpus),
            version=self.core.version,
            gpus=gpus,
            devices=devices,
            input_cache_bytes=inputs.bytes,
            input_cache_max_bytes=inputs.max_bytes,
            input_cache_entries=inputs.entries,
        )


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register the service as the generated code does, but with InferBatch's answers pre-encoded by
    ``lipsync_protocol.wire`` (the same bytes protobuf would write, with the mouths copied once)."""
    service = pb.DESCRIPTOR.services_by_name["InferenceService"]
    handlers = {}
    for method in service.methods:
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=request_type.FromString,
            response_serializer=serialize_response if method.name == "InferBatch" else response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
