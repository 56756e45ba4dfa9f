"""Dynamic batching: requests wait in a bounded queue; one worker takes up to `max_batch_size`
of them (waiting at most `max_wait_ms` for the batch to fill) and scores them in one forward
pass on the model thread. A full queue refuses at once (503), a slow answer times out (504):
the service never hangs. The scorer can be replaced at any time; a batch keeps the scorer it
started with, so requests in flight finish on the old model."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from defectvlm.config import ServeParams
from defectvlm.serve.metrics import ServeMetrics
from defectvlm.serve.model import ImageInput, Scorer

log = logging.getLogger("defectvlm.serve")


class Unavailable(Exception):
    """503: no model yet, or the queue is full. `retry_after` in seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Batcher:
    def __init__(self, limits: ServeParams, metrics: ServeMetrics):
        self.limits = limits
        self.metrics = metrics
        self.scorer: Scorer | None = None
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.queue: asyncio.Queue | None = None
        self.generating = 0
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.limits.queue_size)
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
        self.model_thread.shutdown(wait=False, cancel_futures=True)

    def swap(self, scorer: Scorer) -> None:
        previous, self.scorer = self.scorer, scorer
        self.metrics.model_loaded(scorer.version, previous.version if previous else None)

    def _require_model(self) -> Scorer:
        if self.scorer is None:
            raise Unavailable("the model is still loading", retry_after=5)
        return self.scorer

    async def score(self, item: ImageInput) -> dict:
        self._require_model()
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise Unavailable(f"over capacity: {self.limits.queue_size} requests already waiting") from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return await asyncio.wait_for(future, self.limits.request_timeout_s)

    async def generate(self, messages: list[dict], max_new_tokens: int) -> tuple[tuple[str, int], Scorer]:
        scorer = self._require_model()
        if self.generating >= self.limits.queue_size:
            raise Unavailable(f"over capacity: {self.generating} chat requests already waiting")
        self.generating += 1
        try:
            work = asyncio.get_running_loop().run_in_executor(
                self.model_thread, scorer.generate, messages, max_new_tokens
            )
            return await asyncio.wait_for(work, self.limits.request_timeout_s), scorer
        finally:
            self.generating -= 1

    async def _next_batch(self) -> list[tuple[ImageInput, asyncio.Future]]:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.max_wait_ms / 1000
        while len(batch) < self.limits.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        self.metrics.queue_depth.set(self.queue.qsize())
        return [(item, future) for item, future in batch if not future.done()]  # timed-out requests drop out

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            scorer = self.scorer
            self.metrics.batch_size.observe(len(batch))
            try:
                results = await loop.run_in_executor(self.model_thread, scorer.score, [item for item, _ in batch])
            except Exception as exc:  # a model failure fails this batch, not the service
                log.exception("scoring a batch of %d failed", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
