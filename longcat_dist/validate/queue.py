"""A one-slot validation queue served by a worker thread: submit never waits, the newest request wins."""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationRequest:
    """Validate the LoRA saved at `lora_path` after training step `step` (no LoRA: the base model)."""

    step: int
    lora_path: str | None


@dataclass
class QueueCounts:
    """What happened to the requests so far; failures keep the step and the error line."""

    submitted: int = 0
    replaced: int = 0
    completed: int = 0
    failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)


class ValidationQueue:
    """Runs `run(request)` on one worker thread with at most one request waiting behind the running one.

    A submit while a request waits replaces it (training only cares about the newest LoRA). A request that
    raises is logged and counted, and the worker carries on with the next one.
    """

    def __init__(
        self,
        run: Callable[[ValidationRequest], Any],
        on_failure: Callable[[ValidationRequest, str], None] | None = None,
        on_done: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._run = run
        self._on_failure = on_failure
        self._on_done = on_done
        self._condition = threading.Condition()
        self._pending: ValidationRequest | None = None
        self._running: ValidationRequest | None = None
        self._last_done: ValidationRequest | None = None
        self._closed = False
        self.counts = QueueCounts()
        self._thread = threading.Thread(target=self._serve, name="validation-worker", daemon=True)
        self._thread.start()

    def submit(self, request: ValidationRequest) -> bool:
        """Queue a request without waiting; returns True when it replaced a request that had not started."""
        with self._condition:
            if self._closed:
                raise RuntimeError(f"validation queue is closed; step {request.step} was not queued.")
            replaced = self._pending is not None
            if replaced:
                logger.info("validation: step %d replaces queued step %d", request.step, self._pending.step)
                self.counts.replaced += 1
            self._pending = request
            self.counts.submitted += 1
            self._condition.notify_all()
            return replaced

    def seen(self, request: ValidationRequest) -> bool:
        """Whether this exact request is queued, running or the last one done."""
        with self._condition:
            return request in (self._pending, self._running, self._last_done)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing runs or waits; returns False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: self._pending is None and self._running is None, timeout)

    def state(self) -> dict[str, Any]:
        """Counts plus the running and pending steps (None when idle)."""
        with self._condition:
            return {
                "submitted": self.counts.submitted,
                "replaced": self.counts.replaced,
                "completed": self.counts.completed,
                "failed": self.counts.failed,
                "failures": list(self.counts.failures),
                "running_step": None if self._running is None else self._running.step,
                "pending_step": None if self._pending is None else self._pending.step,
            }

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, let the running one end, and join the worker."""
        with self._condition:
            self._closed = True
            self._pending = None
            self._condition.notify_all()
        self._thread.join(timeout)

    def _serve(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending is not None or self._closed)
                if self._closed:
                    return
                self._running, self._pending = self._pending, None
            request = self._running
            error = None
            try:
                self._run(request)
            except Exception as exc:  # a failed validation must never stop the queue or training
                error = f"{type(exc).__name__}: {exc}"
                self._report_failure(request, traceback.format_exc())
            with self._condition:
                if error is None:
                    self.counts.completed += 1
                else:
                    self.counts.failed += 1
                    self.counts.failures.append({"step": request.step, "error": error})
                self._last_done, self._running = request, None
            if self._on_done is not None:
                self._call_safely(self._on_done, self.state())
            with self._condition:
                self._condition.notify_all()

    def _report_failure(self, request: ValidationRequest, trace: str) -> None:
        logger.error("validation of step %d failed:\n%s", request.step, trace)
        if self._on_failure is not None:
            self._call_safely(self._on_failure, request, trace)

    @staticmethod
    def _call_safely(hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # hooks only report; a broken report must not stop the worker
            logger.exception("validation: a report hook failed")
