"""The micro-batcher (docs/architecture.md#batching): a bounded queue of images, one worker thread
that runs a predict callable, futures for results.

A batch closes when it holds max_batch_size images or when the oldest waiting image has waited
max_delay; images whose request has expired or gone are dropped before compute. A batch runs as one
predict call per distinct request shape (scores and heatmaps), so each image pays for what its own
request asked. Capacity is reserved at admission (`reserve`), before the body is read, so an admitted
request is not refused later for room. The event loop never runs torch work.
"""

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from opentelemetry.context import Context

from service.serve.detector import Outcome
from service.serve.errors import ServiceError
from service.serve.metrics import ModelMetrics
from service.serve.tracing import Tracing

log = logging.getLogger("fisherguard")
RunBatch = Callable[[torch.Tensor, Sequence[str], Sequence[str]], list[Outcome]]


@dataclass
class Job:
    x: torch.Tensor  # (C, H, W)
    scores: frozenset[str]
    heatmaps: frozenset[str]
    deadline: float  # time.monotonic()
    future: asyncio.Future[Outcome]
    trace: Context | None = None  # the request's trace context, when tracing is on
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    compute_s: float = 0.0


@dataclass
class Reservation:
    """Queue room held for one admitted request, in images, until its images are queued or it ends."""

    batcher: "Batcher"
    images: int
    open: bool = True

    def extend(self, n: int) -> None:
        """Holds n more images, or 503 `overloaded` when they do not fit."""
        b = self.batcher
        if b.closing:
            raise ServiceError(503, "shutting_down", "the service is shutting down", retry_after=1)
        if b.occupied + n > b.max_queue:
            raise ServiceError(
                503, "overloaded", f"queue holds {b.occupied} of {b.max_queue} images; {self.images + n} do not fit", retry_after=1
            )
        b.reserved += n
        self.images += n

    def release(self) -> None:
        if self.open:
            self.batcher.reserved -= self.images
            self.open = False


def lower_priority(nice: int) -> None:
    """Raises the calling thread's nice value by `nice` (Linux schedules threads, so only this thread and
    the compute threads it starts later are affected): the event loop then wins the CPU over the engine."""
    if nice > 0 and hasattr(os, "setpriority"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        metrics: ModelMetrics,
        engine_nice: int = 0,
        tracing: Tracing | None = None,
    ) -> None:
        self.run_batch, self.max_batch, self.max_delay_s, self.max_queue = run_batch, max_batch, max_delay_s, max_queue
        self.metrics, self.tracing = metrics, tracing or Tracing()
        self.reserved = 0  # images admitted but not queued yet
        self.queue: deque[Job] = deque()
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fisherguard-engine", initializer=lower_priority, initargs=(engine_nice,)
        )
        self.task: asyncio.Task[None] | None = None
        self.closing = False

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="fisherguard-batcher")
        self.task.add_done_callback(self._on_exit)

    def _on_exit(self, task: asyncio.Task[None]) -> None:
        """If the loop ever ends while the service runs (it should not), it is restarted; /readyz
        answers 503 until then."""
        if not self.closing:
            self.start()

    @property
    def occupied(self) -> int:
        """Images queued or held for admitted requests."""
        return len(self.queue) + self.reserved

    def reserve(self, n: int = 1) -> Reservation | None:
        """Room for n images of an admitted request, or None when the queue cannot hold them."""
        if self.closing or self.occupied + n > self.max_queue:
            return None
        self.reserved += n
        return Reservation(self, n)

    def submit(
        self, images: Sequence[torch.Tensor], scores: frozenset[str], heatmaps: frozenset[str], deadline: float, held: Reservation
    ) -> list[Job]:
        """Queues all images of one request into the room its reservation holds (extending it first
        when there are more images than it holds), then releases the reservation."""
        if len(images) > held.images:
            held.extend(len(images) - held.images)
        if self.closing:
            raise ServiceError(503, "shutting_down", "the service is shutting down", retry_after=1)
        held.release()
        loop = asyncio.get_running_loop()
        trace = self.tracing.current()  # the request's span: its images' queue spans go under it
        jobs = [Job(x, scores, heatmaps, deadline, loop.create_future(), trace) for x in images]
        self.queue.extend(jobs)
        self.metrics.queue_depth.set(len(self.queue))
        self.wakeup.set()
        return jobs

    async def _loop(self) -> None:
        while not (self.closing and not self.queue):
            batch: list[Job] = []
            try:
                batch = await self._collect()
                if batch:
                    await self._run(batch)
            except Exception as e:  # the loop must survive anything: the batch's requests get a 500, the log the traceback
                log.exception("a batch of %d images failed: %s", len(batch), type(e).__name__)
                for job in batch:
                    if not job.future.done():
                        job.future.set_result(
                            ServiceError(500, "internal_error", f"the batch failed ({type(e).__name__}; the server's log has it)")
                        )

    async def _collect(self) -> list[Job]:
        """Waits for work, then up to max_delay from the oldest image while the batch is not full."""
        while not self.queue:
            if self.closing:
                return []
            self.wakeup.clear()
            await self.wakeup.wait()
        close_at = self.queue[0].enqueued + self.max_delay_s
        while len(self.queue) < self.max_batch and (remaining := close_at - time.monotonic()) > 0 and not self.closing:
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), remaining)
            except TimeoutError:
                break
        batch: list[Job] = []
        now = time.monotonic()
        while self.queue and len(batch) < self.max_batch:
            job = self.queue.popleft()
            if job.future.done():  # the request was cancelled: client gone or deadline passed
                self.metrics.dropped.labels("cancelled").inc()
            elif job.deadline <= now:
                self.metrics.dropped.labels("deadline").inc()
                job.future.set_result(
                    ServiceError(503, "queue_timeout", "the request's deadline passed while it was queued", retry_after=1)
                )
            else:
                job.started = now
                batch.append(job)
        self.metrics.queue_depth.set(len(self.queue))
        return batch

    async def _run(self, batch: list[Job]) -> None:
        """One predict call per request shape in the batch: an image pays only for its own request's names."""
        shapes: dict[tuple[frozenset[str], frozenset[str]], list[Job]] = {}
        for job in batch:
            shapes.setdefault((job.scores, job.heatmaps), []).append(job)
        for (scores, heatmaps), jobs in shapes.items():
            await self._predict(jobs, sorted(scores), sorted(heatmaps))

    async def _predict(self, batch: list[Job], scores: list[str], heatmaps: list[str]) -> None:
        x = torch.stack([j.x for j in batch])
        links = [self.tracing.queued(j.trace, j.enqueued, j.started, self.metrics.name) for j in batch]
        t0 = time.monotonic()
        with self.tracing.batch(links, self.metrics.name, len(batch), scores):
            outcomes = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, x, scores, heatmaps)
        elapsed = time.monotonic() - t0
        m = self.metrics
        m.batches.inc()
        m.batch_size.observe(len(batch))
        m.compute_seconds.observe(elapsed)
        for job, outcome in zip(batch, outcomes, strict=True):
            m.queue_wait.observe(job.started - job.enqueued)
            m.images.labels("ok" if not isinstance(outcome, ServiceError) else "error").inc()
            job.compute_s = elapsed
            if not job.future.done():
                job.future.set_result(outcome)

    async def retire(self, timeout_s: float) -> None:
        """After a reload swapped a new version in: the requests admitted here still bring their images
        and get them scored by this version; once none is held or queued (or timeout_s passes), stops."""
        end = time.monotonic() + timeout_s
        while (self.reserved or self.queue) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        await self.stop(max(0.0, end - time.monotonic()) + 1.0)

    async def stop(self, timeout_s: float) -> None:
        """Stops admitting; queued and running images finish within timeout_s, then the loop ends."""
        self.closing = True
        self.wakeup.set()
        if self.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.task), timeout_s)
            except TimeoutError:
                self.task.cancel()
        for job in self.queue:
            if not job.future.done():
                job.future.set_result(ServiceError(503, "shutting_down", "the service shut down before this image ran", retry_after=1))
        self.queue.clear()
        self.executor.shutdown(wait=False)
