"""How the compositing service reaches inference: over gRPC, or in the same process.

Both backends return the generated mouths as uint8 [B, 3, 320, 320] already
truncated by the inference side (the reference's ``(x * 255).astype(uint8)``),
so remote and in-process modes give identical frames.

Model inputs go by reference (lipsync_protocol.inputs): each frame's real crop is sent
with its key the first time a target needs it, and only the key afterwards. What each
target holds is tracked here (``HeldKeys``); a target that answers ``missing_visual``
(restarted, evicted, never sent to) gets those pixels again within the same call.

The remote backend keeps one long-lived channel per target with keepalive,
puts a deadline on every call (the smaller of ``timeout_seconds`` and what is
left of the client's own deadline), and retries UNAVAILABLE (or a CANCELLED from the
server's side: InferBatch is pure) with exponential
backoff on the next target, up to ``max_retries``. A single ``dns:///`` target
balances by itself with the round_robin policy over every address it resolves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc
import numpy as np

from lipsync_protocol import channels, errors
from lipsync_protocol.geometry import Geometry
from lipsync_protocol.inputs import REAL_CHANNELS
from lipsync_protocol.speech import RawAudio
from lipsync_protocol.wire import DecodedBatch, decode_batch_response
from service_common import request_log
from shared_proto import inference_pb2 as pb
from shared_proto import inference_pb2_grpc as pb_grpc

from .config import CompositingConfig
from .geometry import real_crop

if TYPE_CHECKING:
    from inference_service.core import InferResult, VisualBatch

log = logging.getLogger(__name__)

MOUTH_SHAPE = (3, 320, 320)
HELD_KEYS = 1 << 18  # keys remembered per target (more than any input cache holds)
REFERENCE_ROUNDS = 3  # calls with missing inputs before all pixels are sent
# InferBatch is pure, so a call is safe to send again: after UNAVAILABLE (refused, unreachable) or a CANCELLED
# that came from the other side (an inference server that stopped with the call in flight; our own
# cancellation surfaces as asyncio.CancelledError instead).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
DOWN_COOLDOWN_S = 1.0  # a target that answered UNAVAILABLE is tried last for this long
_CODES = {
    cls.code: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.ResourceExhausted,
        errors.FailedPrecondition,
        errors.Unimplemented,
        errors.DeadlineExceeded,
        errors.Unavailable,
    )
}


@dataclass
class MouthBatch:
    mouths: Sequence[np.ndarray]  # B of uint8 [3, S, S] (views of the received message over the hop)
    inference_ms: float
    audio_ms: float
    queue_ms: float
    gpu_id: int
    device: str
    utterance_frames: int = 0


@dataclass
class ModelInputs:
    """A batch's image inputs for the hop: each frame's face crop, whose model input goes by its key (pixels
    only for a target that lacks them), or a client's own whole inputs (old clients' visual_frames,
    [B, 6, H, W]), which are sent as they are."""

    keys: list[str]
    crops: list[np.ndarray]
    geometry: Geometry
    full: np.ndarray | None = None

    @property
    def frames(self) -> int:
        return len(self.full) if self.full is not None else len(self.keys)

    def pixels(self, positions: list[int]) -> bytes:
        """The real crops (uint8 [3, s, s] each) of the frames at ``positions``, made only when sent."""
        return b"".join(real_crop(self.crops[i], self.geometry).data for i in positions)


@dataclass
class HopStats:
    """What crossed the hop to inference: calls, frames, bytes each way, model inputs sent as pixels (first
    time a target needed them) and sent again (a target reported them missing)."""

    requests: int = 0
    frames: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    inputs_sent: int = 0
    inputs_resent: int = 0


class HeldKeys:
    """The keys one target is believed to hold: sent to it and not reported missing since (bounded LRU)."""

    def __init__(self, limit: int = HELD_KEYS) -> None:
        self.limit = limit
        self._keys: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    def unsent(self, model_id: str, keys: list[str]) -> list[int]:
        return [i for i, key in enumerate(keys) if (model_id, key) not in self._keys]

    def add(self, model_id: str, keys: list[str]) -> None:
        for key in keys:
            self._keys[(model_id, key)] = None
            self._keys.move_to_end((model_id, key))
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)

    def forget(self, model_id: str, keys: list[str]) -> None:
        for key in keys:
            self._keys.pop((model_id, key), None)


class InferenceBackend(Protocol):
    description: str
    hop: HopStats

    async def start(self) -> None: ...
    async def infer(
        self, model_id: str, inputs: ModelInputs, audio: np.ndarray | RawAudio, deadline: float | None
    ) -> MouthBatch: ...
    async def reachable(self) -> int: ...
    async def load_model(self, model_id: str, force_reload: bool) -> None: ...
    async def unload_model(self, model_id: str) -> None: ...
    async def close(self) -> None: ...


def channel_options(config: CompositingConfig, target: str) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A restarted inference server is found again within about a second.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        ("grpc.enable_retries", 0),  # retries are ours, with the request's deadline in mind
    ]
    if target.startswith("dns:"):
        options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})))
    return options


def to_service_error(exc: grpc.aio.AioRpcError, target: str) -> errors.ServiceError:
    cls = _CODES.get(exc.code(), errors.Internal)
    return cls(f"inference service ({target}): {exc.details() or exc.code().name}")


class RemoteInference:
    def __init__(self, config: CompositingConfig) -> None:
        self.config = config
        self.targets = list(config.inference_targets)
        self.description = config.inference_url
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[pb_grpc.InferenceServiceStub] = []
        self._next = itertools.count()
        self._down_until: list[float] = []  # per target: monotonic time until which it is passed over
        self._held: list[HeldKeys] = []  # per target: the model inputs it holds
        self.hop = HopStats()

    async def start(self) -> None:
        for target in self.targets:
            try:
                channel = channels.aio_channel(target, self.config.inference_tls, channel_options(self.config, target))
            except channels.TlsError as exc:
                raise RuntimeError(str(exc).replace("tls.", "inference_server.tls.")) from None
            self._channels.append(channel)
            self._stubs.append(inference_stub(channel))
            self._down_until.append(0.0)
            self._held.append(HeldKeys())

    def _pick(self, tried: set[int]) -> int:
        """Round robin over the targets this call has not tried, preferring ones not seen down lately."""
        count = len(self._stubs)
        start = next(self._next)
        now = time.monotonic()
        order = [(start + k) % count for k in range(count)]
        for candidates in (
            [i for i in order if i not in tried and self._down_until[i] <= now],
            [i for i in order if i not in tried],
            order,
        ):
            if candidates:
                return candidates[0]
        raise AssertionError("no inference targets")  # pragma: no cover - start() makes at least one

    def _metadata(self) -> list[tuple[str, str]]:
        """The request id passed on (one id across both services' logs), and our token when inference wants one."""
        metadata = request_log.outgoing_metadata()
        if self.config.inference_token:
            metadata.append(("authorization", f"Bearer {self.config.inference_token}"))
        return metadata

    def _timeout(self, deadline: float | None) -> float:
        timeout = self.config.inference_timeout_s
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.DeadlineExceeded("deadline exceeded before the inference call")
            timeout = min(timeout, left)
        return timeout

    async def _call(self, method: str, request: object, deadline: float | None) -> object:
        return (await self._call_on(method, lambda _: request, deadline))[0]

    async def _call_on(self, method: str, build: Callable[[int], object], deadline: float | None) -> tuple[object, int]:
        """One RPC with per-attempt deadlines and retries (RETRYABLE) on the next target; the request is built
        for the target it goes to (``build(index)``), and the answer comes with that target's index."""
        attempts = self.config.inference_max_retries + 1
        last: grpc.aio.AioRpcError | None = None  # the last retryable failure
        attempt = 0
        tried: set[int] = set()
        for attempt in range(attempts):
            index = self._pick(tried)
            tried.add(index)
            target = self.targets[index]
            try:
                timeout = self._timeout(deadline)
            except errors.DeadlineExceeded:
                if last is not None:
                    break  # out of time while inference was unreachable: say why
                raise
            try:
                stub = getattr(self._stubs[index], method)
                return await stub(build(index), timeout=timeout, metadata=self._metadata()), index
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    if deadline is not None and last is not None and deadline - time.monotonic() <= 0.01:
                        break  # the deadline ran out on a retry after UNAVAILABLE: report the cause
                    raise errors.DeadlineExceeded(
                        f"inference service ({target}): no answer within the deadline"
                    ) from None
                if exc.code() not in RETRYABLE:
                    raise to_service_error(exc, target) from None
                last = exc
                self._down_until[index] = time.monotonic() + DOWN_COOLDOWN_S
                if len(tried) < len(self._stubs):
                    continue  # another target may be up: no backoff before trying it
                if attempt + 1 < attempts:
                    delay = min(self.config.inference_retry_backoff_s * (2**attempt), 2.0)
                    if deadline is not None:
                        delay = min(delay, max(deadline - time.monotonic() - 0.001, 0.0))
                    log.warning(
                        "inference %s unavailable (%s); retry %d/%d in %.2f s",
                        target,
                        exc.details(),
                        attempt + 1,
                        attempts - 1,
                        delay,
                    )
                    await asyncio.sleep(delay)
        assert last is not None
        raise errors.Unavailable(
            f"inference service unreachable at {self.description} after {attempt + 1} attempts: {last.details()}",
            retry_after_ms=1000,
        )

    async def infer(
        self, model_id: str, inputs: ModelInputs, audio: np.ndarray | RawAudio, deadline: float | None
    ) -> MouthBatch:
        batch = inputs.frames
        request = pb.InferBatchRequest(model_id=model_id, batch_size=batch, output_dtype=pb.DTYPE_UINT8)
        set_audio(request, audio)
        if inputs.full is not None:
            request.visual_frames = inputs.full.tobytes()
            request.visual_dtype = pb.DTYPE_UINT8 if inputs.full.dtype == np.uint8 else pb.DTYPE_FLOAT32
            response = await self._call("InferBatch", request, deadline)
            self._count(request, response)
        else:
            response = await self._by_reference(request, inputs, deadline)
        self.hop.frames += batch
        return mouths_of(response, batch)

    def _count(self, request: pb.InferBatchRequest, response: DecodedBatch) -> None:
        self.hop.requests += 1
        self.hop.request_bytes += request.ByteSize()
        self.hop.response_bytes += response.nbytes

    async def _by_reference(
        self, request: pb.InferBatchRequest, inputs: ModelInputs, deadline: float | None
    ) -> DecodedBatch:
        """Keys for every frame, pixels for those the chosen target does not hold; a target that says some are
        missing gets them at once (all of them on the last round, which cannot miss)."""
        model_id, keys = request.model_id, inputs.keys
        request.visual_keys.extend(keys)
        request.visual_channels = REAL_CHANNELS
        request.visual_dtype = pb.DTYPE_UINT8
        built: list[pb.InferBatchRequest] = []
        for round_ in range(REFERENCE_ROUNDS):
            last = round_ == REFERENCE_ROUNDS - 1

            def build(index: int, last: bool = last) -> pb.InferBatchRequest:
                sent = list(range(len(keys))) if last else self._held[index].unsent(model_id, keys)
                one = pb.InferBatchRequest()
                one.CopyFrom(request)
                one.visual_sent.extend(sent)
                one.visual_frames = inputs.pixels(sent)
                built.append(one)
                return one

            response, index = await self._call_on("InferBatch", build, deadline)
            self._count(built[-1], response)
            if round_:
                self.hop.inputs_resent += len(built[-1].visual_sent)
            else:
                self.hop.inputs_sent += len(built[-1].visual_sent)
            if not response.head.missing_visual:
                self._held[index].add(model_id, keys)
                return response
            missing = [keys[i] for i in response.head.missing_visual if 0 <= i < len(keys)]
            log.info("inference %s holds %d of %d inputs less than thought; resending", index, len(missing), len(keys))
            self._held[index].forget(model_id, missing)
        raise errors.Internal("inference service: inputs still missing after sending every frame's pixels")

    async def reachable(self) -> int:
        """How many targets answer Health (healthy) within a second, asked at once over their own channels."""

        async def answers(stub: pb_grpc.InferenceServiceStub) -> bool:
            try:
                return (await stub.Health(pb.HealthRequest(), timeout=1.0, metadata=self._metadata())).healthy
            except grpc.aio.AioRpcError:
                return False

        return sum(await asyncio.gather(*(answers(stub) for stub in self._stubs)))

    async def load_model(self, model_id: str, force_reload: bool) -> None:
        for index, stub in enumerate(self._stubs):
            try:
                await stub.LoadModel(
                    pb.LoadModelRequest(model_id=model_id, force_reload=force_reload),
                    timeout=max(self.config.inference_timeout_s, 60.0),
                    metadata=self._metadata(),
                )
            except grpc.aio.AioRpcError as exc:
                raise to_service_error(exc, self.targets[index]) from None

    async def unload_model(self, model_id: str) -> None:
        for index, stub in enumerate(self._stubs):
            try:
                await stub.UnloadModel(
                    pb.UnloadModelRequest(model_id=model_id),
                    timeout=self.config.inference_timeout_s,
                    metadata=self._metadata(),
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise to_service_error(exc, self.targets[index]) from None

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class InProcessInference:
    """The inference service's own engine class, run inside this process: no gRPC hop."""

    def __init__(self, config: CompositingConfig) -> None:
        from inference_service.config import load_config as load_inference_config
        from inference_service.core import InferenceCore

        assert config.inference_config is not None
        # The environment is this service's, so it is not applied to the engine's config: overrides only.
        overrides = list(config.inference_overrides)
        self.core = InferenceCore(load_inference_config(config.inference_config, overrides, environ={}, serving=False))
        self.description = f"in-process ({config.inference_config.name})"
        self.hop = HopStats()  # no bytes cross in process; calls, frames and inputs are counted

    async def start(self) -> None:
        await self.core.start()

    async def infer(
        self, model_id: str, inputs: ModelInputs, audio: np.ndarray | RawAudio, deadline: float | None
    ) -> MouthBatch:
        from inference_service.core import InputsMissing, VisualBatch  # the engine is imported in this mode only

        if inputs.full is not None:
            visual = VisualBatch(inputs.full)
        else:  # by reference, as over the hop: the engine's input cache (on its device) is the same class
            visual = VisualBatch(np.empty(0, np.uint8), REAL_CHANNELS, inputs.keys)
        self.hop.requests += 1
        self.hop.frames += inputs.frames
        try:
            result = await self._run(model_id, visual, audio, deadline)
        except InputsMissing as missing:
            sent = missing.positions
            self.hop.inputs_sent += len(sent)
            pixels = np.frombuffer(inputs.pixels(sent), np.uint8)
            result = await self._run(model_id, VisualBatch(pixels, REAL_CHANNELS, inputs.keys, sent), audio, deadline)
        return MouthBatch(
            result.outputs,
            result.inference_ms,
            result.audio_ms,
            result.queue_ms,
            result.device.gpu_id,
            result.device.label,
            result.utterance_frames,
        )

    async def _run(
        self, model_id: str, visual: VisualBatch, audio: np.ndarray | RawAudio, deadline: float | None
    ) -> InferResult:
        if deadline is not None and deadline - time.monotonic() <= 0:
            raise errors.DeadlineExceeded("deadline exceeded before inference")
        features = None if isinstance(audio, RawAudio) else audio
        coro = self.core.infer(
            model_id,
            visual,
            features,
            batch_size=len(visual.keys) or 0,
            audio_shape=() if features is None else features.shape,
            raw_audio=audio if isinstance(audio, RawAudio) else None,
            output_dtype=np.uint8,
            deadline=deadline,
            client=request_log.client_name(),
        )
        if deadline is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, deadline - time.monotonic())
        except TimeoutError:
            raise errors.DeadlineExceeded("inference did not finish within the deadline") from None

    async def reachable(self) -> int:
        return 1  # the engine in this process

    async def load_model(self, model_id: str, force_reload: bool) -> None:
        await self.core.load(model_id, force_reload)

    async def unload_model(self, model_id: str) -> None:
        with contextlib.suppress(errors.NotFound):
            await self.core.unload(model_id)

    async def close(self) -> None:
        self.core.close()


def set_audio(request: pb.InferBatchRequest, audio: np.ndarray | RawAudio) -> None:
    if isinstance(audio, RawAudio):
        request.raw_audio = audio.data
        request.audio_encoding = pb.AUDIO_FLOAT32 if audio.encoding == "f32le" else pb.AUDIO_PCM_S16LE
        request.sample_rate = audio.sample_rate
        request.audio_offset_samples = audio.offset
        request.utterance_samples = audio.utterance_samples
        request.first_frame = audio.first_frame
    else:
        request.audio_features = audio.tobytes()
        request.audio_features_shape.extend(audio.shape)


def inference_stub(channel: grpc.aio.Channel) -> pb_grpc.InferenceServiceStub:
    """The generated stub, with InferBatch's answers decoded into views of the received bytes (wire.py)."""
    stub = pb_grpc.InferenceServiceStub(channel)
    stub.InferBatch = channel.unary_unary(  # type: ignore[method-assign]
        "/inference.InferenceService/InferBatch",
        request_serializer=pb.InferBatchRequest.SerializeToString,
        response_deserializer=decode_batch_response,
    )
    return stub


def mouths_of(response: DecodedBatch, batch: int) -> MouthBatch:
    head, outputs = response.head, response.outputs
    if len(outputs) != batch:
        raise errors.Internal(f"inference service returned {len(outputs)} outputs for {batch} frames")
    for region in outputs:
        if region.dtype != np.uint8 or region.ndim != 3 or region.shape != outputs[0].shape:
            raise errors.Internal(
                f"inference service returned a {region.dtype} {list(region.shape)} output, expected uint8 [3, H, W] "
                "like the first"
            )
    return MouthBatch(
        outputs,
        head.inference_time_ms,
        head.audio_processing_ms,
        head.queue_time_ms,
        head.gpu_id,
        head.device,
        head.utterance_frames,
    )


def make_backend(config: CompositingConfig) -> InferenceBackend:
    return InProcessInference(config) if config.inference_mode == "in_process" else RemoteInference(config)
