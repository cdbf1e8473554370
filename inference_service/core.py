"""The work behind every inference RPC, as a plain class.

The gRPC servicer only translates messages and errors; the compositing
service's in-process mode and the tests call this class directly, so both
paths run the same code.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from service_common.errors import FailedPrecondition, InvalidArgument

from . import __version__
from .audio import RawAudio
from .batching import Batcher, Done, run_requests
from .config import BatchingConfig, InferenceConfig
from .devices import Device, select_devices
from .engine import DeviceWorkers, LipSyncModel
from .registry import LoadOutcome, ModelEntry, ModelRegistry
from .tensors import audio_windows, batch_of

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
class DeviceStatus:
    device: Device
    loaded_models: int
    used_memory_bytes: int
    active_runs: int
    queued_runs: int
    frames_in_flight: int


class InferenceCore:
    def __init__(self, config: InferenceConfig, devices: list[Device] | None = None) -> None:
        self.config = config
        self.devices = devices if devices is not None else select_devices(config)
        self.registry = ModelRegistry(config, self.devices)
        self.workers = {d.label: DeviceWorkers(d, config.max_queue_per_device) for d in self.devices}
        self.batchers: dict[tuple[str, str], Batcher] = {}
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
        visual: np.ndarray,
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
        """
        if batch_size < 0:
            raise InvalidArgument(
                f"batch_size: expected 0 (infer) or 1..{self.config.max_batch_size}, got {batch_size}"
            )
        if visual.dtype not in (np.uint8, np.float32):
            raise InvalidArgument(f"visual_frames: expected uint8 or float32, got {visual.dtype}")
        if np.dtype(output_dtype) not in (np.uint8, np.float32):
            raise InvalidArgument(f"output_dtype: expected uint8 or float32, got {np.dtype(output_dtype)}")
        use_features = audio_features is not None and audio_features.size > 0
        if not use_features and raw_audio is None:
            raise InvalidArgument("audio_features: required (float32 [32,16,16] or [B,32,16,16]), or raw_audio")
        entry, load = await self._checkout(model_id)
        counted = 0  # frames this request has added to its device's count (least-loaded placement reads it)
        try:
            model = entry.model
            frames_in = batch_of(visual.reshape(-1), model.visual_shape, batch_size, "visual_frames")
            frames = frames_in.shape[0]
            if frames > self.config.max_batch_size:
                raise InvalidArgument(
                    f"batch_size: expected at most {self.config.max_batch_size} frames "
                    f"(server.max_batch_size), got {frames}"
                )
            if use_features:
                audio: np.ndarray | RawAudio = audio_windows(
                    audio_features.reshape(-1), model.audio_shape, frames, audio_shape
                )
            else:
                if model.encoder is None:
                    raise FailedPrecondition(
                        f"raw_audio: model {model_id!r} has no audio encoder (set models.{model_id}.audio_encoder_path "
                        "or the top-level audio_encoder_path); send audio_features"
                    )
                raw_audio.check(frames)
                audio = raw_audio
            self.registry.begin_frames(entry, frames)
            counted = frames
            if entry.spec.batching.enabled:
                shared = await self._batcher(model, entry.spec.batching).submit(
                    frames_in, audio, np.dtype(output_dtype), client, deadline
                )
                result = InferResult(
                    shared.outputs,
                    shared.inference_ms,
                    shared.queue_ms,
                    shared.audio_ms,
                    shared.worker_id,
                    model.device,
                    load,
                    shared.utterance_frames,
                    shared.batch_frames,
                    shared.batch_requests,
                )
            else:
                pool = self.workers[model.device.label]
                items = [(frames_in, audio, np.dtype(output_dtype))]
                run = await pool.run(run_requests, model, items, deadline=deadline)
                done: Done = run.value
                if done.errors[0] is not None:
                    raise done.errors[0]
                result = InferResult(
                    done.outputs[0],
                    run.run_ms - done.audio_ms[0],  # conversions and the forward pass
                    run.queue_ms,
                    done.audio_ms[0],
                    run.worker_id,
                    model.device,
                    load,
                    done.utterance_frames[0],
                    frames,
                    1,
                )
        except BaseException:
            self.registry.release(entry)
            raise
        finally:
            self.registry.end_frames(entry, counted)
        self.registry.release(entry, frames, result.inference_ms)
        return result

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
