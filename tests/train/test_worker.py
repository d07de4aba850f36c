"""Ray Train + DeepSpeed on CPU: a 2-worker ZeRO-2 run end to end, and resuming it after a worker dies."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import make_config

from launch.train import run_training

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


def test_worker_killed_mid_run_resumes_to_the_same_lora(zero2_run, tiny_shards, tmp_path):
    # A worker process exits at step 3 (after the step-2 checkpoint, mid-epoch); Ray restarts the group from
    # checkpoint 2 with its stream position, and the run must end exactly where the uninterrupted one did.
    marker = tmp_path / "failed-once"
    result = run_training(make_config(tmp_path, tiny_shards),
                          test_knobs={"fail_once_at_step": 3, "fail_marker": str(marker)})  # fmt: skip
    assert marker.read_text() == "3" and result.error is None and result.metrics["step"] == 4
    resumed = load_file(str(tmp_path / "out" / "lora.safetensors"))
    reference = load_file(str(zero2_run[0] / "out" / "lora.safetensors"))
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_base_trains_on_two_ray_workers(local_ray, tiny_shards, tmp_path, precision):
    # ZeRO-2 replicates the 1-byte base on each rank; the LoRA on top trains and stays identical across ranks.
    result = run_training(make_config(tmp_path, tiny_shards, base_model_precision=precision))
    assert result.error is None and result.metrics["step"] == 4
    workers = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "workers").glob("rank-*.json"))]
    assert len(workers) == 2 and workers[0]["final_lora_sha256"] == workers[1]["final_lora_sha256"]
    # Every Linear of the tiny DiT's 2 blocks (qkv, proj, q_linear, kv_linear, cross proj, w1, w2, w3) is 1-byte.
    assert [(w["base_model_precision"], w["quantized_linears"]) for w in workers] == [(precision, 16)] * 2
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(0 < r["loss"] < 10 for r in rows)
    lora_weights = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert any(key.endswith("lora_B.weight") and value.abs().max() > 0 for key, value in lora_weights.items())
