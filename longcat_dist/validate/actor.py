"""The validation Ray actor: own resources, a one-slot queue, restarts after crashes, a gallery at the end."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ray

from longcat_dist.config import TrainConfig
from longcat_dist.validate.gallery import VALIDATION_DIR, write_gallery
from longcat_dist.validate.queue import ValidationQueue, ValidationRequest
from longcat_dist.validate.runner import ValidationRunner, ValidationSettings, settings_from_config

logger = logging.getLogger(__name__)

VALIDATION_ACTOR_NAME = "longcat-validation"
# Ray restarts the actor process this many times after a crash (OOM, segfault, node loss) before giving up.
MAX_RESTARTS = 3
# submit and status must answer while finish waits for the last validation, so the actor is threaded.
MAX_CONCURRENCY = 4
STATUS_FILE = "status.json"


class ValidationActor:
    """Loads the base model once, then validates the newest submitted LoRA in a background thread."""

    def __init__(self, settings: ValidationSettings) -> None:
        logging.basicConfig(level=settings.log_level)
        self._settings = settings
        self._status_path = settings.output_dir / VALIDATION_DIR / STATUS_FILE
        self._restarts = self._previous_restarts()
        if self._restarts:
            logger.warning("validation actor restarted after a crash (restart %d); queued requests were lost",
                           self._restarts)  # fmt: skip
        self._runner = ValidationRunner(settings)
        self._queue = ValidationQueue(
            self._runner.run, on_failure=self._runner.record_failure, on_done=self._write_status
        )
        self._write_status(self._queue.state())

    def _previous_restarts(self) -> int:
        if not ray.is_initialized() or not ray.get_runtime_context().was_current_actor_reconstructed:
            return 0
        try:
            return int(json.loads(self._status_path.read_text()).get("restarts", 0)) + 1
        except (OSError, ValueError):
            return 1

    def _write_status(self, state: dict[str, Any]) -> None:
        self._status_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._status_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({**state, "restarts": self._restarts}, indent=2))
        os.replace(temporary, self._status_path)

    def submit(self, step: int, lora_path: str | None) -> bool:
        """Queue a validation of the LoRA at `lora_path` (step `step`); returns at once (True: replaced one)."""
        return self._queue.submit(ValidationRequest(int(step), lora_path))

    def finish(self, final_step: int, final_lora_path: str | None) -> dict[str, Any]:
        """Validate the final LoRA (unless already done), wait for it, write index.html; returns the status."""
        request = ValidationRequest(int(final_step), final_lora_path)
        if not self._queue.seen(request):
            self._queue.submit(request)
        self._queue.drain()
        gallery = write_gallery(self._settings.output_dir)
        return {**self.status(), "gallery": str(gallery)}

    def status(self) -> dict[str, Any]:
        """Counts (submitted, replaced, completed, failed, failures), running/pending steps and restarts."""
        return {**self._queue.state(), "restarts": self._restarts}

    def shutdown(self) -> None:
        """Stop the worker thread after the running validation and flush summaries."""
        self._queue.close()
        self._runner.close()


def start_validation_actor(cfg: TrainConfig) -> ray.actor.ActorHandle | None:
    """Start the named validation actor in the caller's namespace; None when validation is off (validation_steps 0).

    Call after ray.init. The actor holds validation_num_gpus (fractional allowed; 0 in the CPU demo).
    """
    if cfg.validation_steps == 0:
        logger.info("validation is off (validation_steps = 0)")
        return None
    settings = settings_from_config(cfg)
    remote = ray.remote(ValidationActor).options(
        name=VALIDATION_ACTOR_NAME,
        namespace=ray.get_runtime_context().namespace,
        num_cpus=1,
        num_gpus=cfg.validation_num_gpus,
        max_restarts=MAX_RESTARTS,
        max_task_retries=1,
        max_concurrency=MAX_CONCURRENCY,
    )
    logger.info(
        "starting validation actor (%s GPU) every %d steps", cfg.validation_num_gpus, cfg.validation_steps
    )
    return remote.remote(settings)
