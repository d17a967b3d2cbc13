"""Dynamic batching: concurrent requests gathered into one model call, a bounded queue.

One task takes the first waiting request, then more while they fit in `max_batch` images and
`max_wait_ms` has not passed (a request is never split), runs the model on the one model thread
and hands each request its rows. A full queue is refused at once (`QueueFull` -> 503); a failed
call fails its requests, not the task. `run` puts other model work (Grad-CAM) on that thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
log = logging.getLogger("ctscan.serve")


class QueueFull(Exception):
    """The request queue is at its limit (or the batcher has stopped): retry later."""


@dataclass
class _Item:
    images: np.ndarray  # (k, 1, S, S) uint8
    future: asyncio.Future[np.ndarray]
    queued: float  # time.perf_counter() when submitted


class Batcher:
    """Runs `model(images) -> scores` for many concurrent callers, a few model calls at a time."""

    def __init__(
        self,
        model: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 8,
        max_wait_ms: float = 0.0,
        queue_size: int = 256,
        enabled: bool = True,
        on_batch: Callable[[list[float], list[int], float, float], None] | None = None,
    ) -> None:
        self.model = model
        self.max_batch = max(1, max_batch) if enabled else 1
        self.max_wait = max_wait_ms / 1000.0 if enabled else 0.0
        self.queue_size = queue_size
        self.on_batch = on_batch  # (queue waits, sizes, wall s, cpu s) for the metrics
        self.cpu_clock: Callable[[], float] = time.thread_time  # on the model thread, per call
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctscan-model")

    async def start(self) -> None:
        """Start the batching task (call from the running event loop)."""
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._task = asyncio.create_task(self._run(), name="ctscan-batcher")

    async def stop(self) -> None:
        """Refuse new requests, answer every queued one, then stop the task and the model thread."""
        self._closed = True
        if self._queue is not None and self._task is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """The model's rows for `images` (k, 1, S, S); QueueFull when the queue is at its limit."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        if self._closed:
            raise QueueFull()
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(images, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFull() from None
        return await future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the model thread, between model calls (not queued, not batched)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carry: _Item | None = None  # taken from the queue, did not fit the last call
        while True:
            items = [carry or await self._queue.get()]
            size, carry = len(items[0].images), None
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                wait = deadline - loop.time()
                try:
                    if wait <= 0:
                        item = self._queue.get_nowait()
                    else:
                        item = await asyncio.wait_for(self._queue.get(), wait)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if size + len(item.images) > self.max_batch:
                    carry = item  # opens the next call
                    break
                items.append(item)
                size += len(item.images)
            await self._call(loop, items)
            for _ in items:
                self._queue.task_done()

    def _timed(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        cpu = self.cpu_clock()
        return self.model(images), self.cpu_clock() - cpu

    async def _call(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        start = time.perf_counter()
        try:
            images = np.concatenate([item.images for item in items])
            scores, cpu = await loop.run_in_executor(self._executor, self._timed, images)
            if len(scores) != len(images):
                raise RuntimeError(f"the model gave {len(scores)} rows for {len(images)} images")
        except Exception as exc:  # the model failed: every waiting request hears why
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        seconds = time.perf_counter() - start
        row = 0
        for item in items:
            k = len(item.images)
            if not item.future.done():  # a caller that went away no longer waits
                item.future.set_result(scores[row : row + k])
            row += k
        if self.on_batch is not None:
            try:
                waits = [start - item.queued for item in items]
                self.on_batch(waits, [len(item.images) for item in items], seconds, cpu)
            except Exception:  # metrics must never stop the batching task
                log.exception("the on_batch callback failed")
