"""Admission, batching and backpressure between the HTTP layer and the model.

One request (a list of encoded images) goes through three stages:

1. **Admission.** Its images are counted against ``max_queue_images`` (images
   admitted and not yet answered). A request that would exceed it is refused
   at once with :class:`Overloaded` instead of queueing without bound.
2. **Preprocessing.** Every image is decoded, resized and cropped in a thread
   pool (Pillow releases the GIL, so decoding scales across cores). All images
   of a request are validated before any reaches the model: one bad image
   fails the whole request with the lowest bad index (``InvalidImage``), and
   the model never spends time on a request that will be refused anyway.
   While the model works on one batch, the pool is already preparing the
   images of the requests behind it.
3. **Batching.** The prepared crops join one FIFO queue of single images. A
   single model thread takes whatever is queued, up to ``batch_size``, and runs
   it: it never waits for a batch to fill when the model is idle, a long
   request is split into several batches, and images of concurrent requests
   share batches (the backend returns the same vector for an image whatever
   else is in its batch).

A request whose caller went away (its ``embed`` coroutine was cancelled) is
removed from the queue at once; its images are not preprocessed or run.
A model exception fails only the requests with an image in that batch
(``ServiceError``, 500); the thread carries on. If the thread itself dies,
every waiting request fails, :attr:`Batcher.alive` turns false and new
requests are refused with :class:`NotReady` instead of hanging.

Pure asyncio plus one thread; nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from embedding_service.errors import NotReady, Overloaded, ServiceError

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the batcher needs from the model (``embedding_service.model``)."""

    def forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def warmup(self, batch_size: int) -> None: ...


Preprocess = Callable[[str, int], np.ndarray]
"""``(encoded image, index in its request) -> uint8 crop (H, W, 3)``; raises InvalidImage."""

BatchObserver = Callable[[int, float], None]
"""Called after every batch with ``(number of images, forward seconds)``."""


@dataclass(frozen=True)
class EmbedResult:
    """Backend outputs for one request, in input order, and where its time went.

    ``cls`` and ``patch_mean`` have shape (n_images, hidden), float32,
    unnormalised (pool them with ``embedding_service.model.pool``). Times are
    seconds: ``queue_time`` from admission until the model started on the
    request's first image (includes ``preprocess_time``), ``inference_time``
    from then until its last image came out of the model.
    """

    cls: np.ndarray
    patch_mean: np.ndarray
    preprocess_time: float
    queue_time: float
    inference_time: float


class _Job:
    """One admitted request, shared between the event loop and the model thread."""

    def __init__(self, n: int, loop: asyncio.AbstractEventLoop, admitted_at: float) -> None:
        self.n = n
        self.remaining = n
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.admitted_at = admitted_at
        self.preprocessed_at = admitted_at
        self.first_start: float | None = None
        self.last_end = admitted_at
        self.cls: np.ndarray | None = None
        self.patch_mean: np.ndarray | None = None
        # Set on the event loop when the caller gives up, read by the model thread.
        self.abandoned = False

    def finish(self, error: BaseException | None = None) -> None:
        """Resolve the future from any thread (once; later calls are no-ops)."""
        _settle(self.loop, self.future, error)


def _settle(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], error: BaseException | None
) -> None:
    """Resolve ``future`` from any thread, unless it is already done."""

    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    # A closed loop means nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)


@dataclass(frozen=True)
class _Item:
    job: _Job
    index: int
    crop: np.ndarray


class Batcher:
    """Queue of images in front of one model thread.

    Parameters
    ----------
    backend : object with ``forward(uint8 (B, H, W, 3)) -> (cls, patch_mean)``
        and ``warmup(batch_size)``; only the model thread calls them.
    preprocess : ``(encoded image, index) -> uint8 (H, W, 3)``, run in a pool of
        ``preprocess_workers`` threads; raises ``InvalidImage``.
    batch_size : most images per forward pass.
    max_queue_images : most images admitted and not yet answered.
    on_batch : optional metrics hook, ``(images in batch, forward seconds)``.
    """

    def __init__(
        self,
        backend: Backend,
        preprocess: Preprocess,
        *,
        batch_size: int,
        max_queue_images: int,
        preprocess_workers: int,
        retry_after_seconds: int = 1,
        on_batch: BatchObserver | None = None,
    ) -> None:
        if batch_size < 1 or max_queue_images < 1 or preprocess_workers < 1:
            raise ValueError("batch_size, max_queue_images and preprocess_workers must be >= 1")
        self.backend = backend
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.max_queue_images = max_queue_images
        self.retry_after_seconds = retry_after_seconds
        self.on_batch = on_batch
        self._pool = ThreadPoolExecutor(preprocess_workers, thread_name_prefix="preprocess")
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._jobs: set[_Job] = set()  # enqueued and not yet answered
        self._depth = 0  # images admitted and not yet answered
        self._closing = False
        self._death: BaseException | None = None
        self._thread: threading.Thread | None = None

    # --- state ---------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Images admitted and not yet answered (decoding, queued or in the model)."""
        return self._depth

    @property
    def alive(self) -> bool:
        """True while the model thread runs and accepts work."""
        return (
            self._thread is not None
            and self._thread.is_alive()
            and self._death is None
            and not self._closing
        )

    @property
    def death(self) -> BaseException | None:
        """Why the model thread stopped, if it died."""
        return self._death

    # --- lifecycle -------------------------------------------------------------

    async def start(self, *, warmup: bool = True) -> None:
        """Start the model thread; with ``warmup``, return once a full batch has run."""
        if self._thread is not None:
            raise RuntimeError("batcher already started")
        loop = asyncio.get_running_loop()
        warmed: asyncio.Future[None] = loop.create_future()

        def on_warm(error: BaseException | None) -> None:
            _settle(loop, warmed, error)

        self._thread = threading.Thread(
            target=self._run, args=(on_warm if warmup else None,), name="model", daemon=True
        )
        self._thread.start()
        if warmup:
            await warmed

    async def close(self) -> None:
        """Stop the model thread after its current batch; fail whatever is still queued."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._fail_all(NotReady("the embedding service is shutting down"))
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- requests --------------------------------------------------------------

    async def embed(self, images: Sequence[str]) -> EmbedResult:
        """Embed one request's images; see the module docstring for the stages.

        Raises ``Overloaded`` (queue full), ``InvalidImage`` (lowest bad index),
        ``NotReady`` (model thread not running) or ``ServiceError`` (the model
        failed on a batch holding one of these images).
        """
        self._check_running()
        n = len(images)
        if n == 0:
            raise ValueError("a request needs at least one image")
        with self._cond:
            if self._depth + n > self.max_queue_images:
                raise Overloaded(
                    f"the queue holds {self._depth} images and takes at most "
                    f"{self.max_queue_images}; retry after {self.retry_after_seconds} s",
                    retry_after=self.retry_after_seconds,
                )
            self._depth += n
        loop = asyncio.get_running_loop()
        job = _Job(n, loop, time.perf_counter())
        try:
            crops = await self._preprocess_all(images, loop)
            job.preprocessed_at = time.perf_counter()
            self._enqueue(job, crops)
            await job.future
        except BaseException:
            job.abandoned = True
            self._discard(job)
            raise
        finally:
            with self._cond:
                self._depth -= n
        assert job.cls is not None and job.patch_mean is not None and job.first_start is not None
        return EmbedResult(
            cls=job.cls,
            patch_mean=job.patch_mean,
            preprocess_time=job.preprocessed_at - job.admitted_at,
            queue_time=job.first_start - job.admitted_at,
            inference_time=job.last_end - job.first_start,
        )

    def _check_running(self) -> None:
        if self._death is not None:
            raise NotReady(f"the model worker died: {self._death!r}")
        if self._closing:
            raise NotReady("the embedding service is shutting down")
        if self._thread is None:
            raise NotReady("the model is not loaded yet")

    async def _preprocess_all(
        self, images: Sequence[str], loop: asyncio.AbstractEventLoop
    ) -> list[np.ndarray]:
        futures = [
            loop.run_in_executor(self._pool, self.preprocess, image, i)
            for i, image in enumerate(images)
        ]
        try:
            # In input order, so the first failure seen is the lowest bad index.
            return [await f for f in futures]
        finally:
            for f in futures:  # after a failure or cancellation: skip what has not started
                f.cancel()

    def _enqueue(self, job: _Job, crops: list[np.ndarray]) -> None:
        with self._cond:
            self._check_running()
            self._jobs.add(job)
            self._queue.extend(_Item(job, i, crop) for i, crop in enumerate(crops))
            self._cond.notify()

    def _discard(self, job: _Job) -> None:
        """Forget an abandoned or failed job: its queued images are never run."""
        with self._cond:
            self._jobs.discard(job)
            if any(item.job is job for item in self._queue):
                self._queue = collections.deque(i for i in self._queue if i.job is not job)

    def _fail_all(self, error: ServiceError) -> None:
        with self._cond:
            jobs, self._jobs = self._jobs, set()
            self._queue.clear()
        for job in jobs:
            job.finish(error)

    # --- the model thread ----------------------------------------------------------

    def _run(self, on_warm: Callable[[BaseException | None], None] | None) -> None:
        # Warm-up runs on this thread too: thread-local state of the backend
        # (torch's thread settings, CUDA streams) is the same as in serving.
        try:
            if on_warm is not None:
                try:
                    self.backend.warmup(self.batch_size)
                except BaseException as exc:
                    on_warm(exc)
                    raise
                on_warm(None)
            while (batch := self._next_batch()) is not None:
                self._run_batch(batch)
        except BaseException as exc:
            log.critical("the model worker died", exc_info=True)
            self._death = exc
            self._fail_all(ServiceError(f"the model worker died: {exc!r}"))

    def _next_batch(self) -> list[_Item] | None:
        """Block until work is queued; take it at once, up to ``batch_size`` images."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            batch: list[_Item] = []
            while self._queue and len(batch) < self.batch_size:
                item = self._queue.popleft()
                if not item.job.abandoned:
                    batch.append(item)
            return batch

    def _run_batch(self, batch: list[_Item]) -> None:
        if not batch:
            return
        started = time.perf_counter()
        try:
            cls, patch_mean = self.backend.forward(np.stack([item.crop for item in batch]))
        except Exception as exc:
            log.exception("model forward failed on a batch of %d images", len(batch))
            error = ServiceError(f"the model failed on this batch: {exc!r}")
            for job in {item.job for item in batch}:
                job.abandoned = True
                self._discard(job)
                job.finish(error)
            return
        ended = time.perf_counter()
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), ended - started)
            except Exception:
                log.exception("batch observer failed")
        for row, item in enumerate(batch):
            job = item.job
            if job.abandoned:
                continue
            if job.cls is None:
                job.cls = np.empty((job.n, cls.shape[1]), np.float32)
                job.patch_mean = np.empty((job.n, patch_mean.shape[1]), np.float32)
            assert job.patch_mean is not None
            job.cls[item.index] = cls[row]
            job.patch_mean[item.index] = patch_mean[row]
            if job.first_start is None:
                job.first_start = started
            job.last_end = ended
            job.remaining -= 1
            if job.remaining == 0:
                with self._cond:
                    self._jobs.discard(job)
                job.finish()
