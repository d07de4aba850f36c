"""DeepSpeed config filling, the lr schedule, and the non-finite loss guard on a real one-process engine."""

import json
import math

import pytest
import torch
from torch import nn

from longcat_dist.train import engine as ds

ZERO2 = ds.CONFIG_DIR / "zero2.json"


def _config(**kw):
    values = dict(zero_stage=2, micro_batch_size=2, gradient_accumulation_steps=3, world_size=4, max_grad_norm=1.0,
                  learning_rate=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)  # fmt: skip
    return ds.deepspeed_config(ZERO2, **{**values, **kw})


def test_auto_values_are_filled_from_the_train_config():
    cfg = _config()
    assert cfg["train_batch_size"] == 2 * 3 * 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.99] and cfg["gradient_clipping"] == 1.0
    assert "auto" not in json.dumps(cfg)
    assert _config(zero_stage=3)["zero_optimization"]["stage"] == 3  # the default file switches to zero3.json


def test_bad_deepspeed_configs_name_file_and_key(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "wall_clock_breakdown": "auto"}))
    with pytest.raises(ds.DeepSpeedConfigError, match="ds.json: key 'wall_clock_breakdown'"):
        ds.deepspeed_config(bad, **{**dict(zero_stage=2, micro_batch_size=1, gradient_accumulation_steps=1,
                            world_size=1, max_grad_norm=1.0, learning_rate=1.0, betas=(0.9, 0.9), eps=1e-8,
                            weight_decay=0.0)})  # fmt: skip
    with pytest.raises(ds.DeepSpeedConfigError, match="stage = 2 but zero_stage = 3"):
        ds.fill_deepspeed_config({"zero_optimization": {"stage": 2}}, {"zero_optimization.stage": 3}, bad)


def test_lr_schedules():
    kw = dict(base_lr=1.0, warmup_steps=4, total_steps=14)
    assert ds.lr_at(0, scheduler="constant", **kw) == 1.0
    assert [ds.lr_at(s, scheduler="constant_with_warmup", **kw) for s in (0, 3, 9)] == [0.25, 1.0, 1.0]
    cosine = [ds.lr_at(s, scheduler="cosine", **kw) for s in range(15)]
    assert cosine[1] == 0.5 and cosine[4] == 1.0 and cosine[9] == pytest.approx(0.5)
    assert cosine[14] == pytest.approx(0.0, abs=1e-12) and all(a >= b for a, b in zip(cosine[4:], cosine[5:]))
    with pytest.raises(ValueError, match="'linear'"):
        ds.lr_at(0, base_lr=1.0, scheduler="linear", warmup_steps=0, total_steps=1)


@pytest.mark.integration
def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(gloo_process_group):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    engine = ds.build_engine(model, _config(world_size=1, gradient_accumulation_steps=1, micro_batch_size=1))
    stepper = ds.GuardedStepper(engine, max_nonfinite_in_row=3)
    x = torch.ones(1, 4)
    before = model.weight.detach().clone()
    assert stepper(engine(x).sum() * math.nan, lr=0.1).skipped
    assert torch.equal(model.weight, before)  # a skipped step changes nothing
    good = stepper(engine(x).sum(), lr=0.1)
    assert good.stepped and not good.skipped and good.grad_norm > 0 and stepper.nonfinite_in_row == 0
    assert not torch.equal(model.weight, before)
    assert stepper(engine(x).sum() * math.inf, lr=0.1).skipped
    assert stepper(engine(x).sum() * math.nan, lr=0.1).skipped
    with pytest.raises(ds.NonFiniteLossError, match="3 micro-steps in a row"):
        stepper(engine(x).sum() * math.nan, lr=0.1)
    assert stepper.nonfinite_total == 4


@pytest.mark.integration
def test_a_small_max_grad_norm_clips_the_applied_update(gloo_process_group):
    # The loss 0.5 * |w|^2 has gradient w, norm 5 at w = (3, 4). AdamW's first step is lr * g / (|g| + eps) for the
    # clipped g: with eps = 1 (and |g| << 1 after clipping) the update stays proportional to the clipped gradient.
    max_norm, lr, eps = 1e-3, 0.5, 1.0
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    config = _config(world_size=1, gradient_accumulation_steps=1, micro_batch_size=1, max_grad_norm=max_norm,
                     learning_rate=lr, eps=eps, weight_decay=0.0)  # fmt: skip
    engine = ds.build_engine(model, config)
    before = model.weight.detach().clone()
    outcome = ds.GuardedStepper(engine, max_nonfinite_in_row=1)(
        0.5 * engine.module.weight.pow(2).sum(), lr=lr
    )
    assert outcome.grad_norm == pytest.approx(5.0)  # the reported norm is the one before clipping
    clipped = before * max_norm / (5.0 + 1e-6)  # DeepSpeed divides by (norm + 1e-6) / max_grad_norm
    torch.testing.assert_close(model.weight - before, -lr * clipped / (clipped.abs() + eps))
    unclipped = -lr * before / (before.abs() + eps)  # what the step would have been without clipping
    assert (model.weight - before).norm() < 1e-3 * unclipped.norm()
