"""Dynamic batching: the `Batcher` on its own, in asyncio, without a server or a model.

A model that answers each image with its own pixel value lets every caller check that it got
its own rows back. The served behaviour (calls of several images with batching on, one image
without, 503 on a full queue) is tested against the real server in test_serve_api.py and
test_serve_torch.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np

from ctscan.serve.batching import Batcher, QueueFull

SIZE = 4
T = TypeVar("T")


def _images(value: int, k: int = 1) -> np.ndarray:
    """k images (k, 1, SIZE, SIZE) filled with `value`."""
    return np.full((k, 1, SIZE, SIZE), value, dtype=np.uint8)


class RecordingModel:
    """scores = each image's pixel value; records the batch size of every call."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.fail_on = fail_on

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        self.threads.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        values = images.reshape(len(images), -1)[:, :1].astype(np.float64)  # (B, 1)
        if self.fail_on is not None and (values == self.fail_on).any():
            raise ValueError(f"image value {self.fail_on} breaks the model")
        return values


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_every_caller_gets_its_own_rows_from_gathered_calls() -> None:
    model = RecordingModel()

    async def main() -> list[np.ndarray]:
        batcher = Batcher(model, max_batch=64, max_wait_ms=50)
        await batcher.start()
        sizes = [1, 2, 3, 1, 2]
        results = await asyncio.gather(
            *(batcher.submit(_images(10 * i + 1, k)) for i, k in enumerate(sizes))
        )
        await batcher.stop()
        return results

    results = _run(main())
    for i, rows in enumerate(results):
        assert rows.shape == ([1, 2, 3, 1, 2][i], 1)
        assert (rows == 10 * i + 1).all()  # its own images, not a neighbour's
    assert sum(model.calls) == 9 and len(model.calls) < 5  # gathered
    assert all(name.startswith("ctscan-model") for name in model.threads)


def test_a_call_never_holds_more_than_max_batch_images() -> None:
    model = RecordingModel()

    async def main() -> list[np.ndarray]:
        batcher = Batcher(model, max_batch=4, max_wait_ms=50)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(_images(i, 3)) for i in range(5)))
        await batcher.stop()
        return results

    results = _run(main())
    assert model.calls == [3, 3, 3, 3, 3]  # 3 + 3 > 4: each request opens its own call
    assert [int(r[0, 0]) for r in results] == [0, 1, 2, 3, 4]


def test_a_request_larger_than_max_batch_is_not_split() -> None:
    model = RecordingModel()

    async def main() -> np.ndarray:
        batcher = Batcher(model, max_batch=4, max_wait_ms=5)
        await batcher.start()
        rows = await batcher.submit(_images(7, 10))
        await batcher.stop()
        return rows

    assert _run(main()).shape == (10, 1)
    assert model.calls == [10]


def test_batching_off_runs_each_request_alone() -> None:
    model = RecordingModel()

    async def main() -> None:
        batcher = Batcher(model, max_batch=64, max_wait_ms=50, enabled=False)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(_images(i, 2)) for i in range(6)))
        await batcher.stop()

    _run(main())
    assert model.calls == [2] * 6


def test_a_model_error_reaches_every_waiter_of_that_call_and_the_batcher_goes_on() -> None:
    model = RecordingModel(fail_on=66)

    async def main() -> tuple[list[object], np.ndarray]:
        batcher = Batcher(model, max_batch=64, max_wait_ms=50)
        await batcher.start()
        outcomes = await asyncio.gather(
            batcher.submit(_images(1)),
            batcher.submit(_images(66)),
            batcher.submit(_images(3)),
            return_exceptions=True,
        )
        after = await batcher.submit(_images(5))
        await batcher.stop()
        return outcomes, after

    outcomes, after = _run(main())
    assert model.calls[0] == 3  # one call held all three
    assert all(isinstance(o, ValueError) and "66" in str(o) for o in outcomes)
    assert (after == 5).all()


def test_a_full_queue_refuses_at_once() -> None:
    model = RecordingModel(delay=0.2)

    async def main() -> list[object]:
        batcher = Batcher(model, max_batch=1, max_wait_ms=0, queue_size=1)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(_images(1)))
        await asyncio.sleep(0.05)  # the model is busy with the first
        outcomes = await asyncio.gather(
            batcher.submit(_images(2)), batcher.submit(_images(3)), return_exceptions=True
        )
        await first
        await batcher.stop()
        return list(outcomes)

    outcomes = _run(main())
    assert isinstance(outcomes[1], QueueFull)  # the queue held one: the third is refused
    assert isinstance(outcomes[0], np.ndarray) and (outcomes[0] == 2).all()


def test_stop_answers_what_is_queued_then_refuses() -> None:
    model = RecordingModel(delay=0.02)

    async def main() -> tuple[list[np.ndarray], object]:
        batcher = Batcher(model, max_batch=2, max_wait_ms=1)
        await batcher.start()
        waiting = [asyncio.ensure_future(batcher.submit(_images(i))) for i in range(7)]
        await asyncio.sleep(0)  # all queued
        await batcher.stop()
        assert all(w.done() for w in waiting)  # stop returned only after every answer
        try:
            await asyncio.wait_for(batcher.submit(_images(9)), 2)  # never a hang
            late: object = None
        except QueueFull as exc:
            late = exc
        return [w.result() for w in waiting], late

    results, late = _run(main())
    assert [int(r[0, 0]) for r in results] == list(range(7))
    assert isinstance(late, QueueFull)


def test_a_failing_metrics_callback_does_not_stop_the_batcher() -> None:
    model = RecordingModel()

    def broken(waits: list[float], sizes: list[int], wall: float, cpu: float) -> None:
        raise RuntimeError("metrics are down")

    async def main() -> list[np.ndarray]:
        batcher = Batcher(model, max_batch=8, max_wait_ms=1, on_batch=broken)
        await batcher.start()
        first = await batcher.submit(_images(1))
        second = await asyncio.wait_for(batcher.submit(_images(2)), 5)
        await batcher.stop()
        return [first, second]

    assert [int(r[0, 0]) for r in _run(main())] == [1, 2]


def test_run_executes_on_the_model_thread() -> None:
    async def main() -> str:
        batcher = Batcher(RecordingModel())
        await batcher.start()
        name = await batcher.run(lambda: threading.current_thread().name)
        await batcher.stop()
        return name

    assert _run(main()).startswith("ctscan-model")
