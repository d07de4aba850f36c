"""The validation actor on a local Ray: non-blocking submits, newest request wins, failures counted, restarts."""

import time

import pytest
import ray
import torch
from validate_helpers import local_ray, random_clips, shut_down_leftover_ray, write_config, write_lora

from longcat_dist.config import load_config
from longcat_dist.validate.actor import VALIDATION_ACTOR_NAME, start_validation_actor
from longcat_dist.validate.gallery import step_dir

NAMESPACE = "validate-test"


@pytest.fixture(scope="module")
def ray_session():
    # One GPU as Ray counts it (this host has none): enough to place an actor that asks for a fraction of one.
    with local_ray(num_cpus=2, num_gpus=1, namespace=NAMESPACE):
        yield


def _wait_for(actor, predicate, timeout=120.0):
    deadline, state = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            state = ray.get(actor.status.remote(), timeout=timeout)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            state = None  # the actor is being restarted; ask again
        if state is not None and predicate(state):
            return state
        time.sleep(0.05)
    raise TimeoutError(f"actor state never matched; last {state}")


def _config(tmp_path, clips=2, **changes):
    path = write_config(tmp_path, **changes)
    random_clips(tmp_path, count=clips)
    return load_config(path)


def test_a_ray_left_up_by_an_earlier_test_is_shut_down_with_a_warning():
    assert not ray.is_initialized()
    # What a careless earlier module leaves behind.
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.warns(UserWarning, match="an earlier test left Ray initialized"):
            shut_down_leftover_ray()  # what local_ray does first, so that its ray.init succeeds
        assert not ray.is_initialized()
    finally:
        ray.shutdown()


def test_no_actor_when_validation_is_off(tmp_path):
    assert start_validation_actor(_config(tmp_path, validation_steps=0)) is None
    assert not ray.is_initialized(), "with validation off no Ray call may start a Ray on its own"


@pytest.mark.integration
def test_a_fractional_gpu_count_is_accepted_and_held_by_the_actor(ray_session, tmp_path):
    cfg = _config(tmp_path, use_gpu=True, validation_num_gpus=0.5)
    assert cfg.validation_num_gpus == 0.5
    handle = start_validation_actor(cfg)
    try:
        _wait_for(handle, lambda s: s["submitted"] == 0)  # constructed, so placed with its resources
        deadline = time.monotonic() + 30  # the cluster's resource view follows the raylet with a short delay
        while ray.available_resources().get("GPU") != 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ray.available_resources().get("GPU") == 0.5, "the actor must hold half of the one GPU"
    finally:
        ray.kill(handle, no_restart=True)


class TinyTrainer:
    """Stands in for training rank 0: plain Adam steps, timed."""

    def __init__(self):
        self.model = torch.nn.Linear(32, 32)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.step = 0

    def train_step(self):
        loss = self.model(torch.randn(8, 32)).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step += 1


@pytest.mark.integration
def test_training_keeps_stepping_while_validation_runs_and_the_newest_request_wins(ray_session, tmp_path):
    # 20 steps with CFG over 2 clips: seconds on CPU, long against a tiny training step.
    cfg = _config(tmp_path, validation_num_inference_steps=20)
    loras = {
        k: str(write_lora(cfg, tmp_path / f"lora-{k}.safetensors", step=k, seed=k)) for k in (2, 4, 6, 8, 10)
    }
    handle = start_validation_actor(cfg)  # the launcher keeps this handle: the actor lives as long as it
    actor = ray.get_actor(VALIDATION_ACTOR_NAME, namespace=NAMESPACE)  # as training rank 0 finds it
    assert actor._actor_id == handle._actor_id
    try:
        _wait_for(actor, lambda s: s["submitted"] == 0)  # the base model and eval split are loaded
        trainer, replaced, latencies = TinyTrainer(), {}, []
        while trainer.step < 8:
            trainer.train_step()
            if trainer.step % cfg.validation_steps == 0:
                began = time.perf_counter()
                replaced[trainer.step] = ray.get(actor.submit.remote(trainer.step, loras[trainer.step]))
                latencies.append(time.perf_counter() - began)
            if trainer.step == 2:
                _wait_for(actor, lambda s: s["running_step"] == 2)
        during = ray.get(actor.status.remote())
        assert during["running_step"] == 2, "training must reach step 8 while step 2 still validates"
        assert during["pending_step"] == 8
        assert max(latencies) < 1.0, f"submit must not wait for a validation; took {latencies}"
        assert replaced == {2: False, 4: False, 6: True, 8: True}
        final = ray.get(actor.finish.remote(10, loras[10]), timeout=300)
    finally:
        ray.kill(actor, no_restart=True)
    # The final request came while step 2 still ran, so it replaced step 8 in the queue too.
    assert (final["submitted"], final["replaced"], final["completed"], final["failed"]) == (5, 3, 2, 0)
    for step in (2, 10):
        assert (step_dir(cfg.output_dir, step) / "metrics.json").is_file()
    for step in (4, 6, 8):
        assert not step_dir(cfg.output_dir, step).exists(), f"step {step} was replaced and must not run"
    page = (cfg.output_dir / "index.html").read_text()
    assert page.count("<video") == 2 * 2 and 'src="validation/step_0000010/clip1.mp4"' in page


@pytest.mark.integration
def test_a_failing_validation_is_counted_and_a_crashed_actor_restarts(ray_session, tmp_path):
    cfg = _config(tmp_path, validation_num_inference_steps=2)
    handle = start_validation_actor(cfg)
    try:
        ray.get(handle.submit.remote(2, str(tmp_path / "no-such-lora.safetensors")), timeout=120)
        state = _wait_for(handle, lambda s: s["failed"] == 1)
        assert state["failures"][0]["step"] == 2 and "no-such-lora" in state["failures"][0]["error"]
        assert "no-such-lora" in (step_dir(cfg.output_dir, 2) / "error.txt").read_text()
        # A crash of the actor process (OOM, segfault) as Ray sees it: Ray starts it again from its constructor.
        # ray.kill returns before the process is gone, so wait for the restarted actor to answer.
        ray.kill(handle, no_restart=False)
        state = _wait_for(handle, lambda s: s["restarts"] > 0)
        assert state["restarts"] == 1 and state["failed"] == 0, "a restarted actor starts a fresh queue"
        lora_path = write_lora(cfg, tmp_path / "lora-4.safetensors", step=4)
        final = ray.get(handle.finish.remote(4, str(lora_path)), timeout=300)
    finally:
        ray.kill(handle, no_restart=True)
    assert final["completed"] == 1 and final["restarts"] == 1
    page = (cfg.output_dir / "index.html").read_text()
    assert "Failed validation steps (see error.txt): 2" in page and page.count("<video") == 2
