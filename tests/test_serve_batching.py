"""deeplab.serve.batching: the request queue of `deeplab serve` without HTTP or a model.

Same-size jobs share a batch, others never do; a lone job does not wait for the window; a full
queue refuses at once with a Retry-After; a failing batch fails its jobs and the worker lives on;
closing fails the waiting jobs instead of leaving them hanging.
"""

from __future__ import annotations

import threading
import time

import pytest

from deeplab.serve.batching import BatchingQueue, QueueClosed, QueueFull


class _Recorder:
    """run_batch that records each batch's payloads, optionally blocking until released."""

    def __init__(self, gate: threading.Event | None = None, fail_on: object = None) -> None:
        self.batches: list[list] = []
        self.gate = gate
        self.fail_on = fail_on
        self.entered = threading.Event()

    def __call__(self, jobs):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never released the gate"
        payloads = [j.payload for j in jobs]
        self.batches.append(payloads)
        if self.fail_on in payloads:
            raise ValueError(f"cannot do {self.fail_on}")
        return [f"done {p}" for p in payloads]


def test_jobs_of_one_key_share_a_batch_and_keys_never_mix():
    gate = threading.Event()
    rec = _Recorder(gate)
    q = BatchingQueue(rec, workers=1, capacity=32, max_batch=3, batch_window=0.05)
    try:
        first = q.submit("A", "a0")
        assert rec.entered.wait(5)  # the worker holds a0; the rest queue up behind it
        jobs = [q.submit(k, p) for k, p in [("A", "a1"), ("B", "b1"), ("A", "a2"), ("A", "a3"), ("B", "b2"),
                                             ("A", "a4")]]
        assert q.depth == 6 and q.outstanding == 7
        gate.set()
        assert [j.future.result(10) for j in [first, *jobs]] == [
            "done a0", "done a1", "done b1", "done a2", "done a3", "done b2", "done a4"]
    finally:
        q.close()
    # FIFO by the first job of each batch, at most max_batch per batch, one key per batch.
    assert rec.batches == [["a0"], ["a1", "a2", "a3"], ["b1", "b2"], ["a4"]]
    assert [j.batch_size for j in jobs] == [3, 2, 3, 3, 2, 1]
    assert q.outstanding == 0


def test_a_lone_request_does_not_wait_for_the_window():
    rec = _Recorder()
    q = BatchingQueue(rec, workers=1, capacity=4, max_batch=8, batch_window=2.0)
    try:
        t0 = time.perf_counter()
        assert q.submit("A", 1).future.result(10) == "done 1"
        assert time.perf_counter() - t0 < 1.0  # not the 2 s window
    finally:
        q.close()


def test_concurrent_requests_wait_for_each_other_within_the_window():
    """Two same-size jobs submitted together while a third (another size) is in flight share a
    batch even though the second comes after the worker took the first."""
    gate = threading.Event()
    rec = _Recorder(gate)
    q = BatchingQueue(rec, workers=2, capacity=8, max_batch=4, batch_window=1.0)
    try:
        busy = q.submit("B", "b")  # worker 1 blocks on it: a request in flight
        assert rec.entered.wait(5)
        rec.entered.clear()
        gate_b = threading.Timer(0.2, lambda: q.submit("A", "a2"))
        a1 = q.submit("A", "a1")  # worker 2 takes it, sees "b" in flight and waits for more "A"
        gate_b.start()
        time.sleep(0.5)
        gate.set()
        assert a1.future.result(10) == "done a1" and busy.future.result(10) == "done b"
        gate_b.join()
    finally:
        q.close()
    assert ["a1", "a2"] in rec.batches


def test_a_full_queue_refuses_at_once_with_retry_after():
    gate = threading.Event()
    rec = _Recorder(gate)
    q = BatchingQueue(rec, workers=1, capacity=2, max_batch=1, batch_window=0)
    try:
        running = q.submit("A", 0)
        assert rec.entered.wait(5)
        waiting = [q.submit("A", 1), q.submit("A", 2)]
        t0 = time.perf_counter()
        with pytest.raises(QueueFull) as e:
            q.submit("A", 3)
        assert time.perf_counter() - t0 < 0.5
        assert e.value.retry_after >= 1 and "queue is full (2 requests waiting)" in str(e.value)
        gate.set()
        assert [j.future.result(10) for j in (running, *waiting)] == ["done 0", "done 1", "done 2"]
        assert q.submit("A", 4).future.result(10) == "done 4"  # room again
    finally:
        q.close()


def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on():
    gate = threading.Event()
    rec = _Recorder(gate, fail_on="bad")
    q = BatchingQueue(rec, workers=1, capacity=8, max_batch=4, batch_window=0)
    try:
        first = q.submit("A", "first")
        assert rec.entered.wait(5)
        bad, good = q.submit("A", "bad"), q.submit("A", "good")  # one batch
        gate.set()
        assert first.future.result(10) == "done first"
        for job in (bad, good):
            with pytest.raises(ValueError, match="cannot do bad"):
                job.future.result(10)
        assert q.submit("A", "later").future.result(10) == "done later"
    finally:
        q.close()


def test_close_fails_waiting_jobs_and_refuses_new_ones():
    gate = threading.Event()
    rec = _Recorder(gate)
    q = BatchingQueue(rec, workers=1, capacity=8, max_batch=1, batch_window=0)
    running = q.submit("A", 0)
    assert rec.entered.wait(5)
    waiting = q.submit("A", 1)
    closer = threading.Thread(target=q.close)
    closer.start()
    with pytest.raises(QueueClosed):
        waiting.future.result(5)
    gate.set()
    closer.join(10)
    assert running.future.result(5) == "done 0"
    with pytest.raises(QueueClosed):
        q.submit("A", 2)


@pytest.mark.parametrize("kwargs", [{"workers": 0}, {"capacity": 0}, {"max_batch": 0}, {"batch_window": -1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BatchingQueue(lambda jobs: jobs, **kwargs)
