"""The one-slot validation queue: non-blocking submit, newest request wins, failures are counted."""

import threading
import time

import pytest

from longcat_dist.validate.queue import ValidationQueue, ValidationRequest


class GatedRun:
    """A validation body that records each request and waits for the test to let it finish."""

    def __init__(self, fail_steps=()):
        self.started = []
        self.release = threading.Event()
        self.fail_steps = set(fail_steps)
        self.first_started = threading.Event()

    def __call__(self, request):
        self.started.append(request.step)
        self.first_started.set()
        if not self.release.wait(timeout=30):
            raise TimeoutError("test never released the validation")
        if request.step in self.fail_steps:
            raise RuntimeError(f"boom at step {request.step}")


@pytest.fixture
def gated():
    run = GatedRun()
    queue = ValidationQueue(run)
    yield run, queue
    run.release.set()
    queue.close(timeout=10)


def test_submit_returns_while_a_validation_runs_and_the_newest_request_wins(gated):
    run, queue = gated
    queue.submit(ValidationRequest(10, "a"))
    assert run.first_started.wait(timeout=10)
    began = time.perf_counter()
    assert queue.submit(ValidationRequest(20, "b")) is False
    assert queue.submit(ValidationRequest(30, "c")) is True  # replaces step 20, which never started
    assert time.perf_counter() - began < 0.5, "submit must not wait for the running validation"
    assert queue.state()["running_step"] == 10 and queue.state()["pending_step"] == 30
    run.release.set()
    assert queue.drain(timeout=10)
    assert run.started == [10, 30]
    state = queue.state()
    assert (state["submitted"], state["replaced"], state["completed"], state["failed"]) == (3, 1, 2, 0)


def test_a_failing_validation_is_counted_and_the_queue_goes_on():
    run = GatedRun(fail_steps={1})
    reported = []
    queue = ValidationQueue(run, on_failure=lambda request, trace: reported.append((request.step, trace)))
    try:
        run.release.set()
        queue.submit(ValidationRequest(1, "x"))
        assert queue.drain(timeout=10)
        queue.submit(ValidationRequest(2, "y"))
        assert queue.drain(timeout=10)
        state = queue.state()
        assert state["failed"] == 1 and state["completed"] == 1
        assert state["failures"] == [{"step": 1, "error": "RuntimeError: boom at step 1"}]
        assert reported[0][0] == 1 and "boom at step 1" in reported[0][1]
    finally:
        queue.close(timeout=10)


def test_a_failing_failure_report_does_not_stop_the_worker():
    run = GatedRun(fail_steps={1})
    run.release.set()

    def broken_report(request, trace):
        raise OSError("disk full")

    queue = ValidationQueue(run, on_failure=broken_report)
    try:
        queue.submit(ValidationRequest(1, "x"))
        assert queue.drain(timeout=10)
        assert queue.state()["failed"] == 1
        queue.submit(ValidationRequest(3, "z"))
        assert queue.drain(timeout=10)
        assert run.started[-1] == 3
    finally:
        queue.close(timeout=10)


def test_seen_knows_running_pending_and_last_done(gated):
    run, queue = gated
    queue.submit(ValidationRequest(5, "p"))
    assert run.first_started.wait(timeout=10)
    assert queue.seen(ValidationRequest(5, "p"))
    assert not queue.seen(ValidationRequest(5, "other"))
    run.release.set()
    assert queue.drain(timeout=10)
    assert queue.seen(ValidationRequest(5, "p"))


def test_closed_queue_refuses_requests():
    queue = ValidationQueue(lambda request: None)
    queue.close(timeout=10)
    with pytest.raises(RuntimeError, match="step 4 was not queued"):
        queue.submit(ValidationRequest(4, None))
