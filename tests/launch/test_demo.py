"""The demo end to end on CPU (fewer clips and steps than `make demo`): the loss must clearly drop."""

import json

import pytest
from safetensors import safe_open

from launch import demo

pytestmark = pytest.mark.integration

# Measured on the demo data: the mean loss of the last 20 steps is well under 0.8 x that of the first 20.
MAX_LOSS_RATIO = 0.8


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
