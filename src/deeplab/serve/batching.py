"""A bounded request queue served by a fixed number of inference worker threads, with batching.

Each HTTP request becomes one :class:`Job` (a decoded image and its options). Worker threads take
the oldest job and, when other requests are outstanding, wait up to ``batch_window`` seconds for
more jobs with the same :attr:`Job.batch_key` (image size and the options that change the
forward pass), up to ``max_batch``; the group goes through the network as one batch and each job
is finished (upsampling, argmax, the CRF) on its own. A full queue raises :class:`QueueFull` at
once, so that the service answers 503 instead of letting requests pile up.

The forward pass of a batch gives each image the logits it would get alone (PyTorch's CPU
convolutions are computed per image), so a batched answer equals ``deeplab segment``'s; the
tests check the labels.

This module knows nothing of HTTP: :class:`BatchingQueue` takes a ``run_batch`` callable that
turns a list of jobs into a list of results.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchingQueue", "Job", "QueueFull", "QueueClosed"]


class QueueFull(RuntimeError):
    """The queue holds ``capacity`` waiting jobs already; ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueClosed(RuntimeError):
    """The service is shutting down and takes no more jobs."""


@dataclass
class Job:
    """One request's work: the input, its options and where its result goes.

    Attributes:
        batch_key: jobs of equal keys may share a forward pass (image height and width, flip,
            multi-scale scales: what the network sees).
        payload: whatever ``run_batch`` needs (the image, the options).
        future: resolved with ``run_batch``'s result for this job, or its exception.
        submitted: ``time.perf_counter()`` when queued.
        started: when a worker took it (set by the queue).
        batch_size: how many jobs shared its forward pass (set by the queue).
    """

    batch_key: Hashable
    payload: Any
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    batch_size: int = 1


class BatchingQueue:
    """Jobs wait here for ``workers`` threads that run them in batches of one image size.

    Args:
        run_batch: ``jobs -> results`` (one per job, same order), run on a worker thread; an
            exception fails every job of the batch with it.
        workers: inference threads (each runs one batch at a time).
        capacity: most jobs waiting for a worker; one more raises :class:`QueueFull`.
        max_batch: most jobs in one forward pass (1: no batching).
        batch_window: seconds a worker waits for more jobs of its first job's key, and only
            while other requests are outstanding (a lone client never waits).
        on_batch: called with the batch size after each batch (metrics).
    """

    def __init__(self, run_batch: Callable[[list[Job]], list[Any]], *, workers: int = 1, capacity: int = 64,
                 max_batch: int = 8, batch_window: float = 0.01,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_window < 0:
            raise ValueError(f"batch_window must be >= 0 seconds, got {batch_window}")
        self._run_batch = run_batch
        self.capacity = capacity
        self.max_batch = max_batch
        self.batch_window = batch_window
        self._on_batch = on_batch
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._outstanding = 0  # submitted and not yet resolved (queued or running)
        # Recent seconds per job, for Retry-After: an exponential average of the batches' times.
        self._seconds_per_job = 1.0
        self._threads = [threading.Thread(target=self._work, name=f"deeplab-infer-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ state for metrics

    @property
    def depth(self) -> int:
        """Jobs waiting for a worker."""
        return len(self._jobs)

    @property
    def outstanding(self) -> int:
        """Jobs queued or running."""
        return self._outstanding

    @property
    def workers(self) -> int:
        return len(self._threads)

    # ------------------------------------------------------------------ submitting

    def submit(self, batch_key: Hashable, payload: Any) -> Job:
        """Queue a job; its ``future`` resolves with the result.

        Raises:
            QueueFull: ``capacity`` jobs are waiting already.
            QueueClosed: :meth:`close` was called.
        """
        job = Job(batch_key, payload)
        with self._cond:
            if self._closed:
                raise QueueClosed("the service is shutting down")
            if len(self._jobs) >= self.capacity:
                # The wait until the queue has room: the jobs ahead, shared by the workers.
                wait = len(self._jobs) * self._seconds_per_job / len(self._threads)
                raise QueueFull(f"the inference queue is full ({self.capacity} requests waiting): retry later",
                                retry_after=max(1, round(wait)))
            self._jobs.append(job)
            self._outstanding += 1
            self._cond.notify()
        return job

    def close(self, timeout: float = 5.0) -> None:
        """Take no more jobs, fail the waiting ones with :class:`QueueClosed`, stop the workers."""
        with self._cond:
            self._closed = True
            waiting = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in waiting:
            self._resolve(job, error=QueueClosed("the service is shutting down"))
        for t in self._threads:
            t.join(timeout)

    # ------------------------------------------------------------------ the workers

    def _take_same_key(self, batch: list[Job]) -> None:
        key = batch[0].batch_key
        if not self._jobs:
            return
        kept: deque[Job] = deque()
        while self._jobs:
            job = self._jobs.popleft()
            if len(batch) < self.max_batch and job.batch_key == key:
                batch.append(job)
            else:
                kept.append(job)
        self._jobs = kept

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch = [self._jobs.popleft()]
            self._take_same_key(batch)
            deadline = time.perf_counter() + self.batch_window
            # Wait for more only while other requests are in flight (queued with another size,
            # or running on another worker): a lone client's request goes at once, without
            # paying the window. Under load, the requests that came in while the workers were
            # busy are taken from the queue above without waiting at all.
            while len(batch) < self.max_batch and self._outstanding > len(batch):
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
                self._take_same_key(batch)
            return batch

    def _resolve(self, job: Job, result: Any = None, error: BaseException | None = None) -> None:
        with self._cond:
            self._outstanding -= 1
        if job.future.set_running_or_notify_cancel():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            t0 = time.perf_counter()
            for job in batch:
                job.started = t0
                job.batch_size = len(batch)
            try:
                results = self._run_batch(batch)
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} jobs")
                error = None
            except Exception as e:  # every job of the batch gets the error; the worker lives on
                results, error = [None] * len(batch), e
            seconds = time.perf_counter() - t0
            with self._cond:
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * seconds / len(batch)
            if self._on_batch is not None:
                self._on_batch(len(batch))
            for job, result in zip(batch, results):
                self._resolve(job, result, error)
