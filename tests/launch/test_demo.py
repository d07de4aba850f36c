"""The demo end to end on CPU (fewer clips and steps than `make demo`): the loss must clearly drop."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from launch import demo
from sharding.demo_data import make_demo_data

pytestmark = pytest.mark.integration

# Measured on the demo data: the mean loss of the last 20 steps is well under 0.8 x that of the first 20.
MAX_LOSS_RATIO = 0.8


def test_a_second_demo_starts_over_and_keeps_the_data(tmp_path):
    # A rerun with the same storage_path and experiment_name would resume the finished run and train nothing.
    out = tmp_path.resolve()
    backends = make_demo_data(out / "data", train=1, val=1)  # the clips only: the config needs their folders
    data_files = sorted((out / "data").rglob("*"))
    cfg = demo.demo_config(out, backends)
    earlier = [Path(cfg.storage_path) / cfg.experiment_name / "checkpoint-0000200" / "train_state.json",
               Path(cfg.logging_dir) / "events.out.tfevents.1", out / "validation" / "step_0000200" / "metrics.json",
               out / "loras" / "step-0000100" / "lora.safetensors", out / "workers" / "rank-0.json"]  # fmt: skip
    earlier += [out / name for name in ("metrics.jsonl", "loss.png", "lora.safetensors", "lora_official.safetensors",
                                        "index.html")]  # fmt: skip
    for path in earlier:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from the run before")
    demo.clear_previous_run(cfg)
    assert [p for p in earlier if p.exists()] == []
    assert sorted((out / "data").rglob("*")) == data_files


def test_demo_trains_and_the_loss_drops(tmp_path):
    first, last = demo.run_demo(tmp_path, {"max_train_steps": 120}, num_cpus=4, train_clips=8)
    assert last < MAX_LOSS_RATIO * first, (first, last)
    for name in ("lora.safetensors", "lora_official.safetensors", "loss.png", "metrics.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    with safe_open(str(tmp_path / "lora.safetensors"), framework="pt") as handle:
        assert handle.metadata()["step"] == "120" and handle.metadata()["rank"] == "16"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_workers"] == 2 and config["zero_stage"] == 2
    # Validation ran beside training: the base model (step 0), step 100 and the final LoRA, with videos and a gallery.
    validation = tmp_path / "validation"
    reports = {
        int(p.parent.name.split("_")[1]): json.loads(p.read_text())
        for p in validation.glob("step_*/metrics.json")
    }
    assert {0, 120} <= set(reports), sorted(reports)
    assert all(list((validation / f"step_{step:07d}").glob("*.mp4")) for step in reports)
    assert "step_0000120" in (tmp_path / "index.html").read_text()
    before, after = reports[0]["mean"]["latent_mse"], reports[120]["mean"]["latent_mse"]
    print(f"validation latent MSE: base {before:.4f} -> trained {after:.4f}")
    assert after < before, (before, after)
