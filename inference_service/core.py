"""The work behind every inference RPC, as a plain class.

The gRPC servicer only translates messages and errors; the compositing
service's in-process mode and the tests call this class directly, so both
paths run the same code.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lipsync_protocol.errors import FailedPrecondition, InvalidArgument
from lipsync_protocol.inputs import FULL_CHANNELS, REAL_CHANNELS, check_key
from lipsync_protocol.speech import RawAudio
from lipsync_protocol.tensors import audio_windows, batch_of
from service_common.registry import RegistryEvents

from . import __version__
from .batching import Batcher, Done, run_requests
from .config import BatchingConfig, InferenceConfig
from .devices import Device, select_devices
from .engine import DeviceWorkers, LipSyncModel
from .inputs import Crop, InputCache, crops_of
from .registry import LoadOutcome, ModelEntry, ModelRegistry

log = logging.getLogger(__name__)


@dataclass
class InferResult:
    outputs: np.ndarray  # [B, 3, H, W], float32 or uint8
    inference_ms: float
    queue_ms: float
    audio_ms: float
    worker_id: int
    device: Device
    load: LoadOutcome | None  # set when this request loaded the model
    utterance_frames: int = 0  # with raw audio: frames the reference renders for the utterance
    batch_frames: int = 0  # frames of the forward pass it was part of
    batch_requests: int = 1


@dataclass
class VisualBatch:
    """A request's image input as it came: ``pixels`` (flat or shaped) hold whole model inputs (``channels`` 6,
    uint8 or float32) or real crops (3, uint8). With ``keys`` (one per frame) the inputs go by reference: the
    pixels are those of the frames at positions ``sent`` (ascending), kept under their keys; the other frames'
    are read from the input cache."""

    pixels: np.ndarray
    channels: int = FULL_CHANNELS
    keys: Sequence[str] = ()
    sent: Sequence[int] = field(default_factory=tuple)


class InputsMissing(FailedPrecondition):
    """Some referenced inputs are not held here; nothing ran. The caller sends those frames' pixels again (the
    servicer answers OK with ``missing_visual``, a documented answer rather than a failure)."""

    def __init__(self, model_id: str, positions: list[int]) -> None:
        super().__init__(
            f"visual_keys: model {model_id!r} holds no input for {len(positions)} of the frames "
            f"(positions {positions[:8]}{'...' if len(positions) > 8 else ''}); send their pixels"
        )
        self.positions = positions


@dataclass
class DeviceStatus:
    device: Device
    loaded_models: int
    used_memory_bytes: int
    active_runs: int
    queued_runs: int
    frames_in_flight: int


class InferenceCore:
    def __init__(
        self, config: InferenceConfig, devices: list[Device] | None = None, events: RegistryEvents | None = None
    ) -> None:
        self.config = config
        self.devices = devices if devices is not None else select_devices(config)
        self.registry = ModelRegistry(config, self.devices, events=events)
        self.workers = {d.label: DeviceWorkers(d, config.max_queue_per_device) for d in self.devices}
        self.batchers: dict[tuple[str, str], Batcher] = {}
        self.inputs = InputCache(config.input_cache_bytes)
        self.version = __version__

    @property
    def cuda_available(self) -> bool:
        return any(d.kind == "cuda" for d in self.devices)

    async def start(self) -> None:
        """Preload configured models off the event loop."""
        if self.config.audio_encoder_path is not None:
            log.info(
                "audio encoder for models that name none: %s (%s)",
                self.config.audio_encoder_path,
                self.config.audio_encoder_origin,
            )
        await asyncio.to_thread(self.registry.preload)

    def close(self) -> None:
        for pool in self.workers.values():
            pool.shutdown()

    # -- InferBatch --------------------------------------------------------

    async def _checkout(self, model_id: str) -> tuple[ModelEntry, LoadOutcome | None]:
        entry = self.registry.try_checkout(model_id)
        if entry is not None:
            return entry, None
        return await asyncio.to_thread(self.registry.checkout, model_id)

    async def infer(
        self,
        model_id: str,
        visual: np.ndarray | VisualBatch,
        audio_features: np.ndarray | None,
        *,
        batch_size: int = 0,
        audio_shape: tuple[int, ...] | list[int] = (),
        raw_audio: RawAudio | None = None,
        output_dtype: type | np.dtype = np.float32,
        deadline: float | None = None,
        client: str = "",
    ) -> InferResult:
        """Run a batch. ``visual`` is flat or shaped uint8/float32; shapes are checked here.

        Audio is either model features (``audio_features``, which win when both are given) or speech
        (``raw_audio``), turned into features on the model's device by its audio encoder. ``deadline`` is on
        the monotonic clock: a batch still waiting for a worker when it passes is not run. With the model's
        ``batching`` enabled, the request shares a forward pass with others (``client`` keeps that fair).
        ``visual`` is a VisualBatch for real crops or inputs by reference (InputsMissing: some are not held).
        """
        if isinstance(visual, np.ndarray):
            visual = VisualBatch(visual)
        output = np.dtype(output_dtype)
        use_features = audio_features is not None and audio_features.size > 0
        self._check_request(visual, batch_size, output, use_features or raw_audio is not None)
        entry, load = await self._checkout(model_id)
        counted = 0  # frames this request has added to its device's count (least-loaded placement reads it)
        try:
            model = entry.model
            frames_in = self._visual_input(model, visual, batch_size)
            audio = self._audio_input(
                model, len(frames_in), audio_features if use_features else None, audio_shape, raw_audio
            )
            self.registry.begin_frames(entry, len(frames_in))
            counted = len(frames_in)
            if entry.spec.batching.enabled:
                batcher = self._batcher(model, entry.spec.batching)
                shared = await batcher.submit(frames_in, audio, output, client, deadline)
                result = InferResult(
                    outputs=shared.outputs,
                    inference_ms=shared.inference_ms,
                    queue_ms=shared.queue_ms,
                    audio_ms=shared.audio_ms,
                    worker_id=shared.worker_id,
                    device=model.device,
                    load=load,
                    utterance_frames=shared.utterance_frames,
                    batch_frames=shared.batch_frames,
                    batch_requests=shared.batch_requests,
                )
            else:
                result = await self._run_alone(model, frames_in, audio, output, deadline, load)
        except BaseException:
            self.registry.release(entry)
            raise
        finally:
            self.registry.end_frames(entry, counted)
        self.registry.release(entry, counted, result.inference_ms)
        return result

    def _check_request(self, visual: VisualBatch, batch_size: int, output: np.dtype, has_audio: bool) -> None:
        """What needs no model: fail in microseconds, before a checkout or a load."""
        if batch_size < 0:
            raise InvalidArgument(
                f"batch_size: expected 0 (infer) or 1..{self.config.max_batch_size}, got {batch_size}"
            )
        if visual.pixels.dtype not in (np.uint8, np.float32):
            raise InvalidArgument(f"visual_frames: expected uint8 or float32, got {visual.pixels.dtype}")
        if visual.channels not in (FULL_CHANNELS, REAL_CHANNELS):
            raise InvalidArgument(f"visual_channels: expected 6 (or 0) or 3, got {visual.channels}")
        if output not in (np.uint8, np.float32):
            raise InvalidArgument(f"output_dtype: expected uint8 or float32, got {output}")
        if not has_audio:
            raise InvalidArgument("audio_features: required (float32 [32,16,16] or [B,32,16,16]), or raw_audio")

    def _audio_input(
        self,
        model: LipSyncModel,
        frames: int,
        features: np.ndarray | None,
        shape: tuple[int, ...] | list[int],
        raw: RawAudio | None,
    ) -> np.ndarray | RawAudio:
        """The batch's audio: windows [frames, 32, 16, 16] as sent, or speech the model's encoder will turn into
        them on the worker."""
        if frames > self.config.max_batch_size:
            raise InvalidArgument(
                f"batch_size: expected at most {self.config.max_batch_size} frames (server.max_batch_size), "
                f"got {frames}"
            )
        if features is not None:
            return audio_windows(features.reshape(-1), model.audio_shape, frames, shape)
        if model.encoder is None:
            raise FailedPrecondition(
                f"raw_audio: model {model.model_id!r} has no audio encoder (set models.{model.model_id}."
                "audio_encoder_path or the top-level audio_encoder_path); send audio_features"
            )
        assert raw is not None  # _check_request saw one or the other
        raw.check(frames)
        return raw

    async def _run_alone(
        self,
        model: LipSyncModel,
        visual: np.ndarray | list[Crop],
        audio: np.ndarray | RawAudio,
        output: np.dtype,
        deadline: float | None,
        load: LoadOutcome | None,
    ) -> InferResult:
        """One forward pass of this request's frames alone, on a worker of the model's device."""
        run = await self.workers[model.device.label].run(
            run_requests, model, [(visual, audio, output)], deadline=deadline
        )
        done: Done = run.value
        if done.errors[0] is not None:
            raise done.errors[0]
        return InferResult(
            outputs=done.outputs[0],
            inference_ms=run.run_ms - done.audio_ms[0],  # conversions and the forward pass
            queue_ms=run.queue_ms,
            audio_ms=done.audio_ms[0],
            worker_id=run.worker_id,
            device=model.device,
            load=load,
            utterance_frames=done.utterance_frames[0],
            batch_frames=len(visual),
            batch_requests=1,
        )

    def _visual_input(self, model: LipSyncModel, visual: VisualBatch, batch_size: int) -> np.ndarray | list[Crop]:
        """The frames' model inputs: whole [B, 6, H, W] arrays, or crops (sent now, or held under their keys)."""
        flat = visual.pixels.reshape(-1)
        if not visual.keys:
            if visual.channels == FULL_CHANNELS:
                return batch_of(flat, model.visual_shape, batch_size, "visual_frames")
            return crops_of(
                batch_of(self._crop_pixels(visual), model.crop_geometry().crop_shape, batch_size, "visual_frames")
            )
        keys = list(visual.keys)
        if batch_size and len(keys) != batch_size:
            raise InvalidArgument(f"visual_keys: batch_size is {batch_size} but {len(keys)} keys were sent")
        if visual.channels != REAL_CHANNELS:
            raise InvalidArgument("visual_channels: inputs by reference (visual_keys) are real crops; expected 3")
        for i, key in enumerate(keys):
            try:
                check_key(key, f"visual_keys[{i}]")
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
        sent = [int(p) for p in visual.sent]
        if any(b <= a for a, b in itertools.pairwise(sent)) or (sent and not 0 <= sent[0] <= sent[-1] < len(keys)):
            raise InvalidArgument(f"visual_sent: expected ascending positions in 0..{len(keys) - 1}, got {sent[:16]}")
        shape = model.crop_geometry().crop_shape
        crops: list[Crop | None] = [None] * len(keys)
        if sent:
            pixels = batch_of(self._crop_pixels(visual), shape, len(sent), "visual_frames")
            for position, frame in zip(sent, pixels, strict=True):
                crops[position] = self.inputs.store(model.model_id, keys[position], frame)
        elif flat.size:
            raise InvalidArgument("visual_frames: pixels were sent but visual_sent names no frame for them")
        wanted = [i for i in range(len(keys)) if crops[i] is None]
        for position, crop in zip(
            wanted, self.inputs.lookup(model.model_id, [keys[i] for i in wanted], shape), strict=True
        ):
            crops[position] = crop
        missing = [i for i in wanted if crops[i] is None]
        if missing:
            raise InputsMissing(model.model_id, missing)
        return crops  # type: ignore[return-value]

    @staticmethod
    def _crop_pixels(visual: VisualBatch) -> np.ndarray:
        if visual.pixels.dtype != np.uint8:
            raise InvalidArgument("visual_dtype: real crops (visual_channels 3) are uint8 pixels; expected DTYPE_UINT8")
        return visual.pixels.reshape(-1)

    def _batcher(self, model: LipSyncModel, config: BatchingConfig) -> Batcher:
        """The model's batcher on its device; a reloaded model gets a new one (the old one ends when idle)."""
        key = (model.model_id, model.device.label)
        batcher = self.batchers.get(key)
        if batcher is None or batcher.model is not model or batcher.config != config:
            batcher = self.batchers[key] = Batcher(model, self.workers[model.device.label], config)
        return batcher

    # -- management --------------------------------------------------------

    async def load(self, model_id: str, force_reload: bool = False, model_path: str = "") -> LoadOutcome:
        return await asyncio.to_thread(self.registry.load, model_id, force_reload, model_path)

    async def unload(self, model_id: str) -> None:
        await asyncio.to_thread(self.registry.unload, model_id)
        self.inputs.drop_model(model_id)

    def device_status(self) -> list[DeviceStatus]:
        entries = self.registry.entries()
        out = []
        for device in self.devices:
            mine = [e for e in entries if e.model.device.label == device.label]
            pool = self.workers[device.label]
            used = self.registry.device_bytes(device)
            frames = self.registry.frames_in_flight(device)
            out.append(DeviceStatus(device, len(mine), used, pool.active, pool.queued, frames))
        return out
