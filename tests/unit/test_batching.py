"""Dynamic batching with the real demo model on the CPU: shared passes, fairness, deadlines, bounds, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support import wait_until_async

from inference_service.batching import Batcher
from inference_service.config import BatchingConfig, OnnxConfig
from inference_service.devices import Device
from inference_service.engine import DeviceWorkers, LipSyncModel
from inference_service.tensors import to_model_input
from lipsync_protocol.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted

CPU = Device("cpu", -1, "cpu", 0, 1)


@pytest.fixture(scope="module")
def model(models_dir: Path) -> LipSyncModel:
    return LipSyncModel("demo", models_dir / "demo" / "model.onnx", CPU, OnnxConfig(intra_op_threads=1))


def request(frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    visual = rng.integers(0, 256, (frames, 6, 320, 320), np.uint8)
    audio = rng.uniform(0, 1, (frames, 32, 16, 16)).astype(np.float32)
    return visual, audio


def alone(model: LipSyncModel, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
    return model.run(to_model_input(visual), audio)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_a_pass_and_get_their_own_frames(model: LipSyncModel) -> None:
    async def main():
        pool = DeviceWorkers(CPU, 64)
        batcher = Batcher(model, pool, BatchingConfig(True, max_batch_frames=8, max_queue_delay_ms=50))
        requests = [request(n, seed) for seed, n in enumerate([1, 2, 3, 2])]
        try:
            results = await asyncio.gather(
                *(batcher.submit(v, a, np.dtype(np.float32), client=f"c{i}") for i, (v, a) in enumerate(requests))
            )
        finally:
            pool.shutdown()
        return requests, results, batcher

    requests, results, batcher = run(main())
    assert batcher.batches == 1 and batcher.batched_frames == 8
    for (visual, audio), result in zip(requests, results, strict=True):
        assert result.batch_frames == 8 and result.batch_requests == 4
        assert result.outputs.shape == (len(visual), 3, 320, 320)
        np.testing.assert_allclose(result.outputs, alone(model, visual, audio), atol=1e-5)
        assert result.queue_ms >= 0 and result.inference_ms > 0


def test_batches_close_at_max_frames_and_a_large_request_runs_alone(model: LipSyncModel) -> None:
    async def main():
        pool = DeviceWorkers(CPU, 64)
        batcher = Batcher(model, pool, BatchingConfig(True, max_batch_frames=4, max_queue_delay_ms=100))
        try:
            sizes = [3, 2, 6, 1]
            results = await asyncio.gather(
                *(batcher.submit(*request(n, i), np.dtype(np.uint8), client="one") for i, n in enumerate(sizes))
            )
        finally:
            pool.shutdown()
        return [r.batch_frames for r in results], [r.outputs.dtype for r in results]

    frames, dtypes = run(main())
    # FIFO within a client: [3] (2 does not fit), then [2], then [6] alone (over the limit), then [1].
    assert frames == [3, 2, 6, 1] and all(d == np.uint8 for d in dtypes)


def test_a_busy_client_cannot_starve_another(model: LipSyncModel) -> None:
    async def main():
        pool = DeviceWorkers(CPU, 64)
        batcher = Batcher(model, pool, BatchingConfig(True, max_batch_frames=4, max_queue_delay_ms=5))
        order: list[str] = []

        async def one(client: str, seed: int) -> None:
            await batcher.submit(*request(1, seed), np.dtype(np.uint8), client=client)
            order.append(client)

        try:
            flood = [asyncio.create_task(one("greedy", i)) for i in range(24)]
            await asyncio.sleep(0)
            late = asyncio.create_task(one("polite", 99))
            await asyncio.gather(*flood, late)
        finally:
            pool.shutdown()
        return order

    order = run(main())
    # 24 queued frames of one client form 6 batches of 4; the other's single frame goes in the first or second.
    assert order.index("polite") < 8, order


def test_deadline_cancellation_bound_and_one_bad_request(model: LipSyncModel) -> None:
    async def main():
        pool = DeviceWorkers(CPU, 64)
        slow = Batcher(
            model, pool, BatchingConfig(True, max_batch_frames=64, max_queue_delay_ms=300, max_queue_frames=5)
        )
        try:
            with pytest.raises(DeadlineExceeded, match="before it was queued"):
                await slow.submit(*request(1, 0), np.dtype(np.uint8), deadline=time.monotonic() - 1)
            # A deadline half the queue delay away: it passes while the request waits for its batch to close
            # (300 ms), with as much room before it as after.
            with pytest.raises(DeadlineExceeded, match="waiting to be batched"):
                await slow.submit(*request(1, 1), np.dtype(np.uint8), deadline=time.monotonic() + 0.15)
            assert slow.batches == 0  # it was not run
            waiting = asyncio.create_task(slow.submit(*request(4, 2), np.dtype(np.uint8)))
            assert await wait_until_async(lambda: slow.queued_frames == 4), slow.queued_frames
            with pytest.raises(ResourceExhausted, match=r"batching\.max_queue_frames=5") as err:
                await slow.submit(*request(2, 3), np.dtype(np.uint8))
            assert err.value.retry_after_ms > 0
            waiting.cancel()
            # The next request (it fits beside the cancelled one's 4 frames) is batched alone: the cancelled
            # request was dropped, not run, whenever the dispatcher looked again.
            probe = await slow.submit(*request(1, 6), np.dtype(np.uint8))
            assert probe.batch_requests == 1 and probe.batch_frames == 1
            assert slow.queued_frames == 0 and slow.batches == 1  # the cancelled request was dropped

            fast = Batcher(model, pool, BatchingConfig(True, max_batch_frames=8, max_queue_delay_ms=30))
            good = request(2, 4)
            bad_visual = np.full((1, 6, 320, 320), np.nan, np.float32)
            results = await asyncio.gather(
                fast.submit(*good, np.dtype(np.float32)),
                fast.submit(bad_visual, request(1, 5)[1], np.dtype(np.float32)),
                return_exceptions=True,
            )
        finally:
            pool.shutdown()
        return good, results

    good, results = run(main())
    assert isinstance(results[1], InvalidArgument) and "NaN" in results[1].message
    np.testing.assert_allclose(results[0].outputs, alone(model, *good), atol=1e-5)  # the good one still ran


def test_eager_batching_never_delays_a_lone_request_but_grows_while_the_worker_is_busy(model: LipSyncModel) -> None:
    async def main():
        pool = DeviceWorkers(CPU, 64)
        batcher = Batcher(model, pool, BatchingConfig(True, max_batch_frames=16, max_queue_delay_ms=0))
        hold = threading.Event()
        try:
            # The baseline: the same worker pool's own hand-over of a job, with no batcher in front of it.
            handover = [(await pool.run(lambda: None)).queue_ms for _ in range(5)]
            lone = [await batcher.submit(*request(1, i), np.dtype(np.uint8)) for i in range(5)]
            busy = asyncio.create_task(pool.run(hold.wait, 60))  # the only worker is taken until `hold` is set
            assert await wait_until_async(lambda: pool.active == 1)
            first = asyncio.create_task(batcher.submit(*request(1, 1), np.dtype(np.uint8), client="a"))
            # The first one is taken (a batch of its own, waiting for the worker); the rest queue behind it.
            assert await wait_until_async(lambda: pool.queued == 1 and batcher.queued_frames == 0)
            rest = [
                asyncio.create_task(batcher.submit(*request(1, 2 + i), np.dtype(np.uint8), client=f"c{i}"))
                for i in range(5)
            ]
            assert await wait_until_async(lambda: batcher.queued_frames == 5), batcher.queued_frames
            hold.set()
            results = await asyncio.gather(first, *rest)
            await busy
        finally:
            hold.set()
            pool.shutdown()
        return handover, lone, results

    handover, lone, results = run(main())
    assert all(r.batch_frames == 1 for r in lone)
    # Not delayed: the quickest of a few lone requests waits about what the pool's own hand-over takes (a delay in
    # the batcher would show in every one of them; a noisy machine only in some), far below any batching delay.
    waited = min(r.queue_ms for r in lone)
    assert waited < 5 * min(handover) + 20, (waited, handover)
    assert results[0].batch_frames == 1 and {r.batch_frames for r in results[1:]} == {5}


def test_reused_input_buffers_keep_the_mask_zero_only_while_that_is_true(model) -> None:
    """A worker's buffer is reused run after run; a run that wrote whole inputs (an old client's masked channels)
    makes the next run of crops write the mask again, and every run's input is the exact one."""
    from inference_service.batching import model_input
    from inference_service.inputs import crops_of, fill_from_crops
    from lipsync_protocol.geometry import DEFAULT

    rng = np.random.default_rng(4)
    crops = crops_of(rng.integers(0, 256, (2, 3, 320, 320), dtype=np.uint8))
    expected = np.empty((2, 6, 320, 320), np.float32)
    fill_from_crops(expected, crops, DEFAULT)
    whole = rng.integers(0, 256, (1, 6, 320, 320), dtype=np.uint8)  # masked channels full of pixels
    for visuals in ([crops], [crops], [whole, crops[:1]], [crops], [crops]):
        built = model_input(model, visuals)
        if len(visuals) == 1:
            np.testing.assert_array_equal(built, expected)
        else:
            np.testing.assert_array_equal(built[1:], expected[:1])
            np.testing.assert_array_equal(built[:1], whole / np.float32(255.0))
