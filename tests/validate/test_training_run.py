"""Validation beside a real training run (Ray Train, DeepSpeed on CPU): it neither blocks nor fails the training."""

import json
import time

import pytest
import ray
from safetensors import safe_open
from validate_helpers import TEXT_DIM, local_ray, random_clips, write_config

from launch import train
from launch.train import JOB_NAMESPACE, run_training
from longcat_dist.config import load_config
from longcat_dist.validate.actor import STATUS_FILE, VALIDATION_ACTOR_NAME
from longcat_dist.validate.gallery import VALIDATION_DIR, step_dir

# A training or validation that hangs fails here in minutes, not at the suite's 15-minute timeout.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# One worker and batch 1 on write_config's tiny DiT; Ray Train reports the final step with its checkpoint only.
TRAINING = {"num_workers": 1, "cpus_per_worker": 1, "dataloader_num_workers": 0, "shuffle_buffer": 2,
            "gradient_checkpointing": False, "report_to": "none", "checkpointing_steps": 1000, "logging_steps": 1000,
            "experiment_name": "t"}  # fmt: skip


@pytest.fixture(scope="module")
def ray_job():
    # The training worker, the validation actor and one CPU to spare for Ray Train's controller.
    with local_ray(num_cpus=3, namespace=JOB_NAMESPACE):
        yield


@pytest.fixture
def removes_the_actor():
    """The launcher drops its handle when it returns; make sure the named actor is gone before the next run."""
    yield
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            actor = ray.get_actor(VALIDATION_ACTOR_NAME, namespace=JOB_NAMESPACE)
        except ValueError:
            return
        ray.kill(actor, no_restart=True)
        time.sleep(0.2)
    raise TimeoutError(f"the validation actor {VALIDATION_ACTOR_NAME} outlived its training run")


def _training_config(tmp_path, eval_text_dim=TEXT_DIM, **changes):
    random_clips(tmp_path, "clips", count=2, seed=1)
    random_clips(tmp_path, "val", count=1, text_dim=eval_text_dim)
    return load_config(write_config(tmp_path, **TRAINING, **changes))


def _final_lora_step(cfg) -> int:
    with safe_open(str(cfg.output_dir / "lora.safetensors"), framework="pt") as handle:
        return int(handle.metadata()["step"])


def test_a_validation_that_raises_is_counted_and_training_finishes(
    ray_job, removes_the_actor, tmp_path, monkeypatch
):
    # A queue that died with the error would leave the launcher's final wait hanging: give up after 2 minutes.
    monkeypatch.setattr(train, "VALIDATION_FINISH_TIMEOUT_S", 120.0)
    # An eval split encoded by another text encoder (width 16; the DiT reads 32): every validation raises.
    cfg = _training_config(tmp_path, eval_text_dim=TEXT_DIM // 2, max_train_steps=4,
                           validation_num_inference_steps=1)  # fmt: skip
    result = run_training(cfg)
    assert result.error is None and result.metrics["step"] == 4
    assert _final_lora_step(cfg) == 4
    status = json.loads((cfg.output_dir / VALIDATION_DIR / STATUS_FILE).read_text())
    assert status["completed"] == 0 and status["failed"] >= 2, status
    # The base model (step 0) and the final LoRA always run; step 2 may have been replaced by the final request.
    failed_steps = {failure["step"] for failure in status["failures"]}
    assert {0, 4} <= failed_steps <= {0, 2, 4}, status
    assert all("encoder_hidden_states must be" in failure["error"] for failure in status["failures"]), status
    error = (step_dir(cfg.output_dir, 4) / "error.txt").read_text()
    assert str(cfg.output_dir / "lora.safetensors") in error and "Traceback" in error
    assert "Failed validation steps (see error.txt): 0" in (cfg.output_dir / "index.html").read_text()


def test_training_keeps_stepping_while_a_validation_runs(ray_job, removes_the_actor, tmp_path):
    # 200 Euler steps with CFG: most of a second per validation on CPU; a training step of the tiny DiT: ~10 ms.
    cfg = _training_config(
        tmp_path, max_train_steps=30, validation_steps=5, validation_num_inference_steps=200
    )
    result = run_training(cfg)
    assert result.error is None and result.metrics["step"] == 30
    # Rank 0 exports a LoRA every validation_steps steps (the last one into output_dir): when training got there.
    exported = {step: (cfg.output_dir / "loras" / f"step-{step:07d}" / "lora.safetensors").stat().st_mtime
                for step in range(5, 30, 5)}  # fmt: skip
    exported[30] = (cfg.output_dir / "lora.safetensors").stat().st_mtime
    reports = [
        json.loads(path.read_text()) for path in (cfg.output_dir / VALIDATION_DIR).glob("step_*/metrics.json")
    ]
    assert {0, 30} <= {report["step"] for report in reports}, reports
    # The validations of LoRAs that training handed over (step 0, the base model, is the launcher's).
    during = {
        report["step"]: [step for step, at in exported.items()
                         if report["started_at"] < at < report["started_at"] + report["seconds"]]
        for report in reports if report["step"] > 0
    }  # fmt: skip
    # Two exports inside one validation: training went through validation_steps more steps while it ran.
    assert any(len(steps) >= 2 for steps in during.values()), (during, exported, reports)
