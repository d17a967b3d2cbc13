"""Dynamic batching: concurrent requests gathered into one model call, a bounded queue.

Each request puts its images (k, 1, S, S) on an asyncio queue and awaits a future. One task
takes the first waiting request, then keeps taking requests until `max_batch` images are
gathered or `max_wait_ms` has passed since the first, runs the model once on a worker thread
(the event loop stays free) and hands each request its rows. With batching off the task runs
each request alone, still on the one model thread. A full queue is refused at once
(`QueueFull` -> 503 with Retry-After) instead of growing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


class QueueFull(Exception):
    """The request queue is at its limit: the caller should retry later."""


@dataclass
class _Item:
    images: np.ndarray  # (k, 1, S, S) uint8
    future: asyncio.Future[np.ndarray]


class Batcher:
    """Runs `model(images) -> scores` for many concurrent callers, a few model calls at a time."""

    def __init__(
        self,
        model: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        enabled: bool = True,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch = max(1, max_batch) if enabled else 1
        self.max_wait = max_wait_ms / 1000.0 if enabled else 0.0
        self.queue_size = queue_size
        self.on_batch = on_batch  # (images in the call, seconds) for the metrics
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctscan-model")

    async def start(self) -> None:
        """Start the batching task (call from the running event loop)."""
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._task = asyncio.create_task(self._run(), name="ctscan-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop the task and the model thread."""
        if self._queue is not None and self._task is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    @property
    def pending(self) -> int:
        """Requests waiting in the queue."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """The model's rows for `images` (k, 1, S, S); QueueFull when the queue is at its limit."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(images, future))
        except asyncio.QueueFull:
            raise QueueFull() from None
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            size = len(items[0].images)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    item = (
                        self._queue.get_nowait()
                        if timeout <= 0
                        else await asyncio.wait_for(self._queue.get(), timeout)
                    )
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                items.append(item)
                size += len(item.images)
            await self._call(loop, items)
            for _ in items:
                self._queue.task_done()

    async def _call(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        images = np.concatenate([item.images for item in items])
        start = time.perf_counter()
        try:
            scores = await loop.run_in_executor(self._executor, self.model, images)
        except Exception as exc:  # the model failed: every waiting request hears why
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(images), time.perf_counter() - start)
        row = 0
        for item in items:
            k = len(item.images)
            if not item.future.done():  # a caller that went away no longer waits
                item.future.set_result(scores[row : row + k])
            row += k
