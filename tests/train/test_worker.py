"""Ray Train + DeepSpeed on CPU: a 2-worker ZeRO-2 run end to end, resuming it after a worker dies or a rerun,
and a run that stops on non-finite losses without Ray retrying it."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_helpers import TINY_TEXT_DIM, make_config, poison_shards, read_workers, write_shards

from launch.train import run_training
from longcat_dist.train.engine import NonFiniteLossError

pytestmark = pytest.mark.integration


def test_two_worker_zero2_run_writes_lora_checkpoints_and_metrics(zero2_run):
    tmp_path, result = zero2_run
    assert result.error is None and result.metrics["step"] == 4
    out = tmp_path / "out"
    with safe_open(str(out / "lora.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
        assert len(list(handle.keys())) == 2 * 10  # A and B on the 10 default target Linears of the tiny DiT
    assert meta["step"] == "4" and meta["rank"] == "4"
    assert (out / "lora_official.safetensors").is_file() and (out / "loss.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 and r["grad_norm"] >= 0 for r in rows)
    checkpoints = sorted(p.name for p in (tmp_path / "ray" / "t").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-0000002", "checkpoint-0000004"]
    state = json.loads((tmp_path / "ray" / "t" / checkpoints[-1] / "train_state.json").read_text())
    assert state["run"]["global_step"] == 4 and state["optimizer_steps"] == 4
    assert state["run"]["epoch"] == 0 and state["run"]["step_in_epoch"] == 4  # 6 steps per epoch: mid-epoch
    # TensorBoard gets every step (Ray only every logging_steps-th).
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    for tag in ("train/loss", "train/lr", "train/tokens_per_s", "train/data_wait_s"):
        assert [e.step for e in scalars.Scalars(tag)] == [1, 2, 3, 4], tag
    assert [e.value for e in scalars.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows])


def test_worker_killed_mid_run_resumes_to_the_same_lora(zero2_run, tiny_shards, tmp_path):
    # A worker process exits at step 3 (after the step-2 checkpoint, mid-epoch); Ray restarts the group from
    # checkpoint 2 with its stream position, and the run must end exactly where the uninterrupted one did.
    marker = tmp_path / "failed-once"
    result = run_training(make_config(tmp_path, tiny_shards),
                          test_knobs={"fail_once_at_step": 3, "fail_marker": str(marker)})  # fmt: skip
    assert marker.read_text() == "3" and result.error is None and result.metrics["step"] == 4
    # The restarted group started from checkpoint 2, not from step 0.
    assert [w["start_step"] for w in read_workers(tmp_path / "out")] == [2, 2]
    resumed = load_file(str(tmp_path / "out" / "lora.safetensors"))
    reference = load_file(str(zero2_run[0] / "out" / "lora.safetensors"))
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


def test_zero3_worker_killed_mid_run_resumes_to_the_same_lora(local_ray, tiny_shards, tmp_path):
    # ZeRO-3 partitions the LoRA weights and their optimizer state: the checkpoint gathers them and the restore
    # scatters them back, so a resumed run must still end bit-identical to the uninterrupted one.
    uninterrupted = run_training(make_config(tmp_path / "whole", tiny_shards, zero_stage=3))
    assert uninterrupted.error is None and uninterrupted.metrics["step"] == 4
    marker = tmp_path / "failed-once"
    result = run_training(make_config(tmp_path / "killed", tiny_shards, zero_stage=3),
                          test_knobs={"fail_once_at_step": 3, "fail_marker": str(marker)})  # fmt: skip
    assert marker.read_text() == "3" and result.error is None and result.metrics["step"] == 4
    assert [w["start_step"] for w in read_workers(tmp_path / "killed" / "out")] == [2, 2]
    resumed = load_file(str(tmp_path / "killed" / "out" / "lora.safetensors"))
    reference = load_file(str(tmp_path / "whole" / "out" / "lora.safetensors"))
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


def test_rerunning_the_same_command_resumes_from_its_last_checkpoint(zero2_run, tiny_shards, tmp_path):
    # Same storage_path and experiment_name: the second run starts at the first one's last step (its checkpoint), and
    # with the constant lr of these runs 2 + 2 steps train the same LoRA as the 4 steps of the reference run.
    first = run_training(make_config(tmp_path, tiny_shards, max_train_steps=2))
    assert first.error is None and first.metrics["step"] == 2
    second = run_training(make_config(tmp_path, tiny_shards, max_train_steps=4))
    assert second.error is None and second.metrics["step"] == 4
    assert [(w["start_step"], w["final_step"]) for w in read_workers(tmp_path / "out")] == [(2, 4), (2, 4)]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    resumed = load_file(str(tmp_path / "out" / "lora.safetensors"))
    reference = load_file(str(zero2_run[0] / "out" / "lora.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[key], value) for key, value in reference.items())


def test_nonfinite_losses_stop_the_run_without_retries(local_ray, tmp_path):
    # Every latent is NaN: after max_nonfinite_steps_in_row skipped micro-steps the workers end the run themselves
    # (Ray would retry a raised error max_failures times, replaying the same streak) and the driver raises it.
    shards = tmp_path / "nan_shards"
    write_shards(shards, "tiny", {(5, 16, 16): [4, 4]}, text_dim=TINY_TEXT_DIM)
    poison_shards(shards)
    cfg = make_config(tmp_path, shards, max_nonfinite_steps_in_row=2, max_failures=3)
    # A retried worker error would end in Ray's own failure (after 3 restarts), not in the workers' message.
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps_in_row = 2"):
        run_training(cfg)
    workers = read_workers(tmp_path / "out")
    assert [(w["start_step"], w["stopped_at_step"]) for w in workers] == [(0, 0), (0, 0)]
    assert all("2 micro-steps in a row" in w["stopped"] for w in workers)
    assert not (tmp_path / "out" / "lora.safetensors").exists()  # a stopped run leaves no final LoRA


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_base_trains_on_two_ray_workers(local_ray, tiny_shards, tmp_path, precision):
    # ZeRO-2 replicates the 1-byte base on each rank; the LoRA on top trains and stays identical across ranks.
    result = run_training(make_config(tmp_path, tiny_shards, base_model_precision=precision))
    assert result.error is None and result.metrics["step"] == 4
    workers = read_workers(tmp_path / "out")
    assert len(workers) == 2 and workers[0]["final_lora_sha256"] == workers[1]["final_lora_sha256"]
    # Every Linear of the tiny DiT's 2 blocks (qkv, proj, q_linear, kv_linear, cross proj, w1, w2, w3) is 1-byte.
    assert [(w["base_model_precision"], w["quantized_linears"]) for w in workers] == [(precision, 16)] * 2
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(0 < r["loss"] < 10 for r in rows)
    lora_weights = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert any(key.endswith("lora_B.weight") and value.abs().max() > 0 for key, value in lora_weights.items())


def test_build_model_applies_the_speed_settings_of_the_config(tmp_path):
    """fused_elementwise (default true) and gradient_checkpointing_save_attention reach the model."""
    from longcat_dist.model.lora_linear import FastLoraLinear
    from longcat_dist.train.worker import build_model

    default = build_model(make_config(tmp_path / "a", tmp_path / "shards"), torch.device("cpu"))
    assert default.attention.fused_elementwise and not default.checkpoint_saves_attention
    cfg = make_config(tmp_path / "b", tmp_path / "shards", fused_elementwise=False, gradient_checkpointing=True,
                      gradient_checkpointing_save_attention=True)  # fmt: skip
    model = build_model(cfg, torch.device("cpu"))
    assert not model.attention.fused_elementwise and model.checkpoint_saves_attention
    assert model.checkpoint_interval == 1
    assert all(type(layer) is FastLoraLinear for layer in model.modules() if hasattr(layer, "lora_A"))
