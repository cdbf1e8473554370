"""Dynamic batching: concurrent requests for one model on one device share a forward pass.

Many clients each sending a few frames (streaming sessions send one or two at a time) waste a GPU when every
request runs alone. Requests wait in a queue; a batch closes when it holds ``max_batch_frames`` frames or when
its oldest request has waited ``max_queue_delay_ms``, and only when a device worker is free to run it (so
under load batches grow instead of queueing). Each request gets its own frames back, in order.

- **Fair.** Each client (its token's name, or its peer address) has its own FIFO queue, and batches are filled
  round-robin over the clients, the starting client rotating from batch to batch. A client with many requests
  queued cannot starve another's single one. A request too large for what is left of a batch waits for the
  next, where it goes first once its client's turn comes, so it never starves either (a request larger than
  ``max_batch_frames`` runs alone).
- **Deadlines.** A request whose deadline passes while it waits is answered DEADLINE_EXCEEDED and not run; one
  whose caller went away is dropped.
- **Bounded.** More than ``max_queue_frames`` frames waiting: RESOURCE_EXHAUSTED at once, with a retry hint.
- **Timings.** Per request: ``queue_ms`` from arrival to the start of its batch's run, ``audio_ms`` its own
  features, ``inference_ms`` the shared forward pass; ``batch_frames`` says how many frames that pass had.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from lipsync_protocol.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, ServiceError
from lipsync_protocol.geometry import Geometry
from lipsync_protocol.speech import RawAudio

from .audio import batch_features
from .config import BatchingConfig
from .engine import DeviceWorkers, LipSyncModel, current_worker
from .inputs import Crop, fill_from_crops
from .tensors import to_model_input, to_output_dtype

log = logging.getLogger(__name__)


@dataclass
class BatchedResult:
    outputs: np.ndarray
    queue_ms: float
    audio_ms: float
    inference_ms: float
    worker_id: int
    utterance_frames: int
    batch_frames: int
    batch_requests: int


@dataclass
class _Item:
    visual: np.ndarray | list[Crop]  # [n, 6, H, W] uint8 or float32, validated; or n crops
    audio: np.ndarray | RawAudio  # [n, ...] float32 windows, or speech
    output_dtype: np.dtype
    client: str
    deadline: float | None  # monotonic
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def frames(self) -> int:
        return len(self.visual)


@dataclass
class Done:
    """What ``run_requests`` gives back, one entry per request (``errors[k]`` set: request k did not run)."""

    outputs: list[np.ndarray | None]
    audio_ms: list[float]
    utterance_frames: list[int]
    errors: list[ServiceError | None]
    forward_ms: float


class Batcher:
    """The queue and batch former for one model on one device; lives on one event loop."""

    def __init__(self, model: LipSyncModel, pool: DeviceWorkers, config: BatchingConfig) -> None:
        self.model = model
        self.pool = pool
        self.config = config
        self._queues: collections.OrderedDict[str, collections.deque[_Item]] = collections.OrderedDict()
        self._queued_frames = 0
        self._changed = asyncio.Event()
        self._slots = asyncio.Semaphore(pool.device.workers)
        self._dispatcher: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self.batches = 0
        self.batched_frames = 0

    @property
    def queued_frames(self) -> int:
        return self._queued_frames

    async def submit(
        self,
        visual: np.ndarray | list[Crop],
        audio: np.ndarray | RawAudio,
        output_dtype: np.dtype,
        client: str = "",
        deadline: float | None = None,
    ) -> BatchedResult:
        frames = len(visual)
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded(f"model {self.model.model_id}: the request's deadline passed before it was queued")
        if self._queued_frames + frames > self.config.max_queue_frames:
            raise ResourceExhausted(
                f"model {self.model.model_id} on {self.model.device.label}: {self._queued_frames} frames already "
                f"waiting to be batched (limit batching.max_queue_frames={self.config.max_queue_frames}); retry later",
                retry_after_ms=max(10, int(self.config.max_queue_delay_ms * 4)),
            )
        future = asyncio.get_running_loop().create_future()
        item = _Item(visual, audio, np.dtype(output_dtype), client, deadline, future)
        self._queues.setdefault(client, collections.deque()).append(item)
        self._queued_frames += frames
        self._changed.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()  # still queued: the dispatcher drops it
            raise

    # -- forming batches -----------------------------------------------------------------------------------

    def _expire(self) -> None:
        """Drop the requests whose caller left, and answer those whose deadline passed (they are not run)."""
        now = time.monotonic()
        for client, queue in list(self._queues.items()):
            kept = collections.deque()
            for item in queue:
                if item.future.done():
                    self._queued_frames -= item.frames
                elif item.deadline is not None and item.deadline <= now:
                    self._queued_frames -= item.frames
                    waited = (time.perf_counter() - item.arrived) * 1000.0
                    item.future.set_exception(
                        DeadlineExceeded(
                            f"model {self.model.model_id}: the request's deadline passed after {waited:.0f} ms "
                            "waiting to be batched; it was not run"
                        )
                    )
                else:
                    kept.append(item)
            if kept:
                self._queues[client] = kept
            else:
                del self._queues[client]

    def _oldest_wait_ms(self) -> float:
        oldest = min(queue[0].arrived for queue in self._queues.values())
        return (time.perf_counter() - oldest) * 1000.0

    def _take(self) -> list[_Item]:
        """A batch: round-robin over the clients from the one after last batch's first, FIFO within each."""
        limit = self.config.max_batch_frames
        batch: list[_Item] = []
        frames = 0
        progress = True
        while progress and self._queues:
            progress = False
            for client in list(self._queues):
                queue = self._queues.get(client)
                if not queue:
                    continue
                item = queue[0]
                if batch and frames + item.frames > limit:
                    continue
                queue.popleft()
                if not queue:
                    del self._queues[client]
                batch.append(item)
                frames += item.frames
                progress = True
                if frames >= limit:
                    break
            if frames >= limit:
                break
        self._queued_frames -= frames
        # The first client of this batch goes to the back: the next batch starts with someone else.
        if batch and batch[0].client in self._queues:
            self._queues.move_to_end(batch[0].client)
        return batch

    async def _dispatch(self) -> None:
        """Runs while anything is queued: wait for a worker, let the batch fill (or time out), launch it."""
        try:
            while True:
                self._expire()
                if not self._queues:
                    return
                await self._slots.acquire()
                try:
                    while True:
                        self._expire()
                        if not self._queues:
                            break
                        wait = self.config.max_queue_delay_ms - self._oldest_wait_ms()
                        if self._queued_frames >= self.config.max_batch_frames or wait <= 0:
                            break
                        self._changed.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), wait / 1000.0)
                    batch = self._take()
                except BaseException:
                    self._slots.release()
                    raise
                if not batch:
                    self._slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._run(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        except asyncio.CancelledError:
            raise
        except Exception:  # never leave callers waiting on a dead dispatcher
            log.exception("batcher for %s failed", self.model.model_id)
            self._fail_all(RuntimeError("the batcher failed"))

    def _fail_all(self, exc: BaseException) -> None:
        for queue in self._queues.values():
            for item in queue:
                if not item.future.done():
                    item.future.set_exception(exc)
        self._queues.clear()
        self._queued_frames = 0

    # -- running a batch ------------------------------------------------------------------------------------

    async def _run(self, batch: list[_Item]) -> None:
        try:
            started = time.perf_counter()
            run = await self.pool.run(run_requests, self.model, [(i.visual, i.audio, i.output_dtype) for i in batch])
            done: Done = run.value
            frames = sum(i.frames for i in batch)
            self.batches += 1
            self.batched_frames += frames
            run_started = started + run.queue_ms / 1000.0
            for k, item in enumerate(batch):
                if item.future.done():
                    continue
                if done.errors[k] is not None:
                    item.future.set_exception(done.errors[k])
                    continue
                item.future.set_result(
                    BatchedResult(
                        outputs=done.outputs[k],
                        queue_ms=(run_started - item.arrived) * 1000.0,
                        audio_ms=done.audio_ms[k],
                        inference_ms=done.forward_ms,
                        worker_id=run.worker_id,
                        utterance_frames=done.utterance_frames[k],
                        batch_frames=frames,
                        batch_requests=len(batch),
                    )
                )
        except BaseException as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._slots.release()
            self._changed.set()


def run_requests(
    model: LipSyncModel, items: list[tuple[np.ndarray | list[Crop], np.ndarray | RawAudio, np.dtype]]
) -> Done:
    """Worker-thread part of a forward pass for one request or a batch of them: each request's audio features,
    then one forward pass over all their frames, then each request's output conversion.

    A request's visual input is the whole model input as sent (uint8 or float32 [n, 6, H, W]) or crops (sent or
    held, inference_service/inputs.py) whose masked half is built here. A request that turns out invalid here
    (NaN pixels, speech the encoder cannot use) fails alone: the others still run.
    """
    worker = current_worker()
    valid: list[tuple[np.ndarray | list[Crop], np.ndarray]] = []
    done = Done([], [], [], [], 0.0)
    for visual, audio, _ in items:
        started = time.perf_counter()
        utterance = 0
        try:
            if isinstance(audio, RawAudio):
                audio, utterance = batch_features(audio, len(visual), lambda c: model.encode_audio(c, worker))
            if isinstance(visual, np.ndarray) and visual.dtype == np.float32 and not np.isfinite(visual).all():
                raise InvalidArgument("visual_frames: contains NaN or infinity")
        except ServiceError as exc:
            done.errors.append(exc)
        else:
            done.errors.append(None)
            valid.append((visual, audio))
        done.audio_ms.append((time.perf_counter() - started) * 1000.0)
        done.utterance_frames.append(utterance)
    if not valid:
        done.outputs = [None] * len(items)
        return done
    visual_in = model_input(model, [v for v, _ in valid])
    audio_in = valid[0][1] if len(valid) == 1 else np.concatenate([a for _, a in valid])
    started = time.perf_counter()
    out = model.run(visual_in, np.ascontiguousarray(audio_in, dtype=np.float32), worker)
    done.forward_ms = (time.perf_counter() - started) * 1000.0
    at = 0
    for k, (visual, _, dtype) in enumerate(items):
        if done.errors[k] is None:
            done.outputs.append(to_output_dtype(out[at : at + len(visual)], dtype, owned=True))
            at += len(visual)
        else:
            done.outputs.append(None)
    return done


def model_input(model: LipSyncModel, visuals: list[np.ndarray | list[Crop]]) -> np.ndarray | list[Crop]:
    """The forward pass's image input: on the device from held crops when the model builds it there (``prep``),
    else float32 [B, 6, H, W] on the host, each request converted straight into its rows (no per-request float
    copies to join).

    Crops are written into the worker's reusable input buffer (``InputBuffers``), whose masked rectangle stays
    zero from one run to the next: only the real channels and the strips around the mask are written.
    """
    if model.prep is not None and all(isinstance(v, list) for v in visuals):
        return [crop for v in visuals for crop in v]  # type: ignore[union-attr]
    if len(visuals) == 1 and isinstance(visuals[0], np.ndarray):
        return to_model_input(visuals[0])
    # Only a run of crops alone leaves every frame's mask zero for the next one.
    crops_only = model.crop_geometry() if all(isinstance(v, list) for v in visuals) else None
    out, zeroed = _BUFFERS.get((sum(len(v) for v in visuals), *model.visual_shape), crops_only)
    at = 0
    for visual in visuals:
        rows = out[at : at + len(visual)]
        if isinstance(visual, list):
            fill_from_crops(rows, visual, model.crop_geometry(), mask_zeroed=zeroed)
        elif visual.dtype == np.uint8:
            np.divide(visual, np.float32(255.0), out=rows, dtype=np.float32)
        else:
            rows[...] = visual
        at += len(visual)
    return out


class InputBuffers:
    """Each worker thread's float input buffers, by shape (the last few), remembering for which geometry the
    masked rectangle of every frame is still zero. A buffer is only used by its thread, for one run at a time
    (ORT reads its inputs during ``run`` and keeps nothing)."""

    KEEP = 4

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, shape: tuple[int, ...], geometry: Geometry | None) -> tuple[np.ndarray, bool]:
        """A buffer of ``shape`` and whether its mask is already zero for ``geometry`` (None: the caller writes
        whole inputs, so after this run the mask can no longer be assumed zero)."""
        buffers: collections.OrderedDict = getattr(self._local, "buffers", None) or collections.OrderedDict()
        self._local.buffers = buffers
        found = buffers.pop(shape, None)
        if found is None:
            found = [np.empty(shape, np.float32), None]
        while len(buffers) >= self.KEEP:
            buffers.popitem(last=False)
        buffers[shape] = found
        zeroed = geometry is not None and found[1] == geometry
        found[1] = geometry  # what the mask will hold after this run, if the run writes crops only
        return found[0], zeroed


_BUFFERS = InputBuffers()
