"""The layout changes nothing: 2 workers x batch 1 (ZeRO-3) and 1 worker x batch 1 x 2 accumulation steps train
the same LoRA as 1 worker x batch 2."""

import pytest
from safetensors.torch import load_file
from train_helpers import make_config

from launch.train import run_training

pytestmark = pytest.mark.integration

# The two layouts sum the same per-sample gradients in a different order (all-reduce vs batched matmuls): the
# gradients agree to ~3e-7 relative, not bitwise. Adam with a tiny epsilon divides by |g| and turns that rounding
# noise on near-zero gradients into whole lr-sized updates, so the test uses adam_epsilon = 1e-3, which keeps the
# update proportional to the gradient; the weights then agree to RTOL of their largest value.
RTOL = 1e-5  # measured: max |diff| 1.9e-8 on lora_B weights up to 2.5e-2 (8e-7 relative)


def test_worker_layouts_train_the_same_lora(local_ray, pair_shards, tmp_path):
    # pair_shards: 2 one-sample shards, so each epoch is one optimizer step over both samples in either layout.
    common = dict(max_train_steps=3, checkpointing_steps=100, caption_dropout_probability=0.5, learning_rate=1e-2,
                  adam_epsilon=1e-3)  # fmt: skip
    two = make_config(
        tmp_path / "two", pair_shards, num_workers=2, train_batch_size=1, zero_stage=3, **common
    )
    one = make_config(tmp_path / "one", pair_shards, num_workers=1, train_batch_size=2, **common)
    accum = make_config(tmp_path / "accum", pair_shards, num_workers=1, train_batch_size=1,
                        gradient_accumulation_steps=2, **common)  # fmt: skip
    for cfg in (two, one, accum):
        assert run_training(cfg).metrics["step"] == 3
    b = load_file(str(tmp_path / "one" / "out" / "lora.safetensors"))
    for other in ("two", "accum"):
        _assert_close(load_file(str(tmp_path / other / "out" / "lora.safetensors")), b)


def _assert_close(a, b):
    assert a.keys() == b.keys()
    scale = max(b[k].abs().max().item() for k in b if "lora_B" in k)
    assert scale > 1e-5  # training moved lora_B away from zero
    worst = max((a[k] - b[k]).abs().max().item() for k in a if "lora_B" in k)
    assert worst <= RTOL * scale, f"max |diff| {worst:.3g} > {RTOL} x {scale:.3g}"
    worst_a = max((a[k] - b[k]).abs().max().item() for k in a if "lora_A" in k)
    assert worst_a <= RTOL * max(b[k].abs().max().item() for k in b if "lora_A" in k)
