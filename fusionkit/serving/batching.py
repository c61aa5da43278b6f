"""Dynamic micro-batching: gather concurrent requests into one forward pass.

A prediction server answers many small requests; running each alone leaves most of a
forward pass's throughput unused. `MicroBatcher` queues single samples and hands them to a
worker thread in batches of up to ``max_batch`` samples, waiting at most ``max_wait_ms`` after
the first for more to arrive. The event loop never runs the model: it only queues, gathers and
hands out results, so it keeps accepting requests while a batch runs.

Nothing here imports torch or a web framework.

Examples:
    >>> import asyncio
    >>> async def demo():
    ...     batcher = MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch=8, max_wait_ms=2)
    ...     batcher.start()
    ...     try:
    ...         return await asyncio.gather(*(batcher.submit(x) for x in range(3)))
    ...     finally:
    ...         await batcher.close()
    >>> asyncio.run(demo())
    [0, 2, 4]
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["MicroBatcher"]

logger = logging.getLogger(__name__)


class MicroBatcher:
    """Queue samples from concurrent callers and run them in batches on one worker thread.

    Args:
        run: Samples → one result per sample, in order; an item of the returned list that is
            an `Exception` is raised to that sample's caller alone. Runs on the worker thread.
        max_batch: Most samples per call of ``run``; 1 runs every sample alone (no batching).
        max_wait_ms: After the first sample of a batch arrives, how long to wait for more
            before running the batch (0: take only what is already queued).

    Attributes:
        batches: Calls of ``run`` so far.
        samples: Samples run so far.
        largest: The largest batch run so far.

    Raises:
        ValueError: ``max_batch`` below 1 or ``max_wait_ms`` below 0.

    Examples:
        >>> batcher = MicroBatcher(lambda xs: [len(xs)] * len(xs), max_batch=4, max_wait_ms=5)
        >>> batcher.max_batch
        4
    """

    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {max_wait_ms}")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.batches = 0
        self.samples = 0
        self.largest = 0
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fusionkit-predict")
        self._pending: collections.deque[tuple[Any, asyncio.Future[Any]]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start gathering batches on the running event loop (call it from a coroutine)."""
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, sample: Any) -> Any:
        """Queue one sample and wait for its result.

        Args:
            sample: What ``run`` takes one of.

        Returns:
            The sample's result.

        Raises:
            RuntimeError: The batcher is not started, or was closed before the sample ran.
            Exception: Whatever ``run`` raised for the batch, or returned for this sample.
        """
        if self._task is None or self._task.done() or self._arrived is None:
            raise RuntimeError("the micro-batcher is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((sample, future))
        self._arrived.set()
        return await future

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread, between batches (e.g. a warm-up).

        Returns:
            What ``fn`` returns.
        """
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def close(self) -> None:
        """Stop gathering: fail samples still queued, let a running batch finish."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown, True)

    async def _gather(self) -> list[tuple[Any, asyncio.Future[Any]]]:
        """The next batch: wait for a first sample, then up to ``max_wait_ms`` for more."""
        assert self._arrived is not None
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_ms / 1000
        while len(self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = []
        while self._pending and len(batch) < self.max_batch:
            sample, future = self._pending.popleft()
            if not future.cancelled():  # its caller went away (client disconnected)
                batch.append((sample, future))
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            work = loop.run_in_executor(self.executor, self._run, [s for s, _ in batch])
            try:
                results = await asyncio.shield(work)
            except asyncio.CancelledError:
                # Closing: the batch already runs on the worker; its callers still get answers.
                self._deliver(batch, await work)
                raise
            self._deliver(batch, results)

    def _run(self, samples: list[Any]) -> Sequence[Any]:
        """``run`` on the worker thread; an error of the whole batch goes to every sample."""
        try:
            results = self.run(samples)
            if len(results) != len(samples):
                raise RuntimeError(f"{len(samples)} samples gave {len(results)} results")
            return results
        except Exception as error:
            logger.exception("a batch of %d samples failed", len(samples))
            return [error] * len(samples)

    def _deliver(
        self, batch: list[tuple[Any, asyncio.Future[Any]]], results: Sequence[Any]
    ) -> None:
        self.batches += 1
        self.samples += len(batch)
        self.largest = max(self.largest, len(batch))
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
