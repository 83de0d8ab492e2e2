"""Bounded, non-blocking batching in front of any exporter, with retry and backoff."""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque

from kernel_side.export.base import SpanExporter
from kernel_side.model import SpanRecord

logger = logging.getLogger(__name__)


class BatchExporter:
    """Queues spans from the hot path and exports them in batches from a daemon thread.

    ``submit`` never blocks on I/O: it appends under a short lock or, when ``max_queue`` spans
    are already waiting, refuses and counts the drop. A failed batch stays at the head of the
    queue and is retried with exponential backoff (``backoff_initial_s`` doubling up to
    ``backoff_max_s``, with jitter) until it has been failing for ``max_retry_s`` seconds (or,
    when ``max_retries`` is set, after that many retries); then it is dropped and counted.
    While the destination is down, new spans keep filling the queue up to its bound, so an
    outage shorter than ``max_retry_s`` that the queue can absorb loses nothing.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue: int = 20000,
        max_batch: int = 512,
        interval_s: float = 0.2,
        max_retries: int | None = None,
        max_retry_s: float = 60.0,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError("BatchExporter: max_queue and max_batch must be at least 1")
        self._exporter = exporter
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._interval_s = interval_s
        self._max_retries = max_retries
        self._max_retry_s = max_retry_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s

        self._queue: deque[SpanRecord] = deque()
        lock = threading.Lock()
        # submit() takes the bare lock: Condition's __enter__/__exit__ are Python frames, a
        # measurable share of the agent's per-span cost.
        self._lock = lock
        # Two conditions on one lock, so a wake-up meant for the worker never lands on a flusher.
        self._work = threading.Condition(lock)
        self._done = threading.Condition(lock)
        # Set only by shutdown; a separate Event so backoff sleeps are not woken by every submit.
        self._stopping = threading.Event()
        self._closed = False  # the same as _stopping.is_set(), read without a call by submit()
        self._deadline = 0.0
        self._flush_waiters = 0
        # Sequence numbers: spans ever accepted, and spans that have left the queue either way.
        self._accepted = 0
        self._settled = 0

        self._exported = 0
        self._dropped_queue_full = 0
        self._dropped_retries_exhausted = 0
        self._dropped_shutdown = 0
        self._export_failures = 0
        self._retries = 0

        self._thread = threading.Thread(target=self._run, name="ebpf-bridge-export", daemon=True)
        self._thread.start()

    def submit(self, span: SpanRecord) -> bool:
        """Queue ``span``; False (and counted) when the queue is full or after shutdown."""
        with self._lock:
            if self._closed:
                self._dropped_shutdown += 1
                return False
            size = len(self._queue)
            if size >= self._max_queue:
                self._dropped_queue_full += 1
                return False
            self._queue.append(span)
            self._accepted += 1
            # Wake the worker only on the transitions it waits for, not on every span.
            if size == 0 or size + 1 == self._max_batch:
                self._work.notify()
            return True

    def submit_many(self, spans: list[SpanRecord]) -> int:
        """Queue ``spans`` in order under one lock round; returns how many were queued. Those
        past the queue's room, or all of them after shutdown, are dropped and counted."""
        with self._lock:
            if self._closed:
                self._dropped_shutdown += len(spans)
                return 0
            size = len(self._queue)
            room = max(self._max_queue - size, 0)
            taken = spans if len(spans) <= room else spans[:room]
            n = len(taken)
            self._queue.extend(taken)
            self._accepted += n
            self._dropped_queue_full += len(spans) - n
            # The same transitions submit() wakes the worker on: the queue stopped being
            # empty, or reached a full batch.
            if n and (size == 0 or size < self._max_batch <= size + n):
                self._work.notify()
            return n

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export everything submitted before this call; True if all of it was exported.

        Returns False on timeout (for instance while the destination is down and the batch is
        backing off) or if spans were dropped after exhausting retries while waiting.
        """
        deadline = time.monotonic() + timeout_s
        with self._work:
            target = self._accepted
            dropped_before = self._dropped_retries_exhausted + self._dropped_shutdown
            self._flush_waiters += 1
            self._work.notify()
            try:
                done = self._done.wait_for(
                    lambda: self._settled >= target, timeout=max(deadline - time.monotonic(), 0)
                )
            finally:
                self._flush_waiters -= 1
            dropped_now = self._dropped_retries_exhausted + self._dropped_shutdown
            return done and dropped_now == dropped_before

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Export what is queued (within ``timeout_s``), then shut the wrapped exporter down.

        Spans still queued at the deadline are dropped and counted. Idempotent.
        """
        with self._work:
            if self._stopping.is_set():
                return
            self._deadline = time.monotonic() + timeout_s
            self._closed = True
            self._stopping.set()
            self._work.notify()
        self._thread.join(timeout_s)
        # Closing the exporter also aborts an export still in flight past the deadline.
        self._exporter.shutdown()
        # The worker sleeps until exactly the deadline before counting what it drops: give it
        # a moment to finish that accounting, so stats() after shutdown() are final.
        self._thread.join(2.0)

    def stats(self) -> dict[str, int]:
        """Counters since creation, plus the current queue length."""
        with self._work:
            return {
                "exported": self._exported,
                "dropped_queue_full": self._dropped_queue_full,
                "dropped_retries_exhausted": self._dropped_retries_exhausted,
                "dropped_shutdown": self._dropped_shutdown,
                "export_failures": self._export_failures,
                "retries": self._retries,
                "queued": len(self._queue),
            }

    def _ready(self) -> bool:
        return (
            self._stopping.is_set()
            or len(self._queue) >= self._max_batch
            or (self._flush_waiters > 0 and bool(self._queue))
        )

    def _give_up(self, attempt: int, failing_since: float) -> bool:
        if self._max_retries is not None and attempt > self._max_retries:
            return True
        return time.monotonic() - failing_since >= self._max_retry_s

    def _run(self) -> None:
        attempt = 0
        failing_since = 0.0
        while True:
            with self._work:
                self._work.wait_for(lambda: bool(self._queue) or self._stopping.is_set())
                # Let a partial batch accumulate for up to one interval.
                self._work.wait_for(self._ready, timeout=self._interval_s)
                if self._stopping.is_set() and (
                    not self._queue or time.monotonic() >= self._deadline
                ):
                    self._drop_rest_at_shutdown()
                    return
                batch = list(itertools.islice(self._queue, self._max_batch))
            ok = self._export(batch)
            delay = 0.0
            with self._work:
                if ok:
                    self._exported += len(batch)
                    attempt = 0
                else:
                    self._export_failures += 1
                    attempt += 1
                    if attempt == 1:
                        failing_since = time.monotonic()
                    if not self._give_up(attempt, failing_since):
                        self._retries += 1
                        delay = self._backoff_delay(attempt)
                        # Not settled: the batch stays at the head of the queue for the retry.
                        batch = []
                    else:
                        logger.warning(
                            "dropping %d spans after %d failed export attempts",
                            len(batch),
                            attempt,
                        )
                        self._dropped_retries_exhausted += len(batch)
                        attempt = 0
                # Only this thread removes from the left, so the head is still this batch.
                for _ in batch:
                    self._queue.popleft()
                self._settled += len(batch)
                if batch:
                    self._done.notify_all()
            if delay:
                self._sleep_backoff(delay)

    def _export(self, batch: list[SpanRecord]) -> bool:
        try:
            return self._exporter.export(batch)
        except Exception:
            # A bug in one exporter must not kill the thread and silently stop all export.
            logger.exception("exporter %r raised", self._exporter)
            return False

    def _backoff_delay(self, attempt: int) -> float:
        delay = min(self._backoff_initial_s * 2.0 ** (attempt - 1), self._backoff_max_s)
        # Jitter spreads the retries of many agents after a shared Collector restarts.
        return delay * random.uniform(0.8, 1.0)

    def _sleep_backoff(self, delay: float) -> None:
        if self._stopping.is_set():
            # Shutting down: keep retrying, but never sleep past the deadline.
            time.sleep(min(delay, max(self._deadline - time.monotonic(), 0)))
        else:
            # Returns early when shutdown starts, which then retries at once until its deadline.
            self._stopping.wait(delay)

    def _drop_rest_at_shutdown(self) -> None:
        if self._queue:
            logger.warning("dropping %d spans still queued at shutdown", len(self._queue))
            self._dropped_shutdown += len(self._queue)
            self._settled += len(self._queue)
            self._queue.clear()
            self._done.notify_all()
