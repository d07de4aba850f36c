"""The DeepSpeed engine of one worker: config from JSON + TrainConfig values, lr schedule, guarded optimizer step.

Precision: DeepSpeed sees only the LoRA weights, which stay fp32 (its own bf16 mode would cast them to bf16), so its
bf16/fp16 sections stay off; the frozen base runs in bf16 on GPU by the model's own dtype.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON that cannot be filled: names the file, the key and the rule."""


def deepspeed_config_path(path: str | Path, zero_stage: int) -> Path:
    """The JSON to use: the stage's file of configs/deepspeed when the default zero2.json is set with stage 3."""
    path = Path(path)
    if path.resolve() == (CONFIG_DIR / "zero2.json").resolve() and zero_stage == 3:
        return CONFIG_DIR / "zero3.json"
    return path


def fill_deepspeed_config(raw: dict, values: dict[str, Any], source: str | Path) -> dict:
    """Replace every "auto" by its value (keys as dotted paths); any "auto" left over is an error."""
    config = copy.deepcopy(raw)

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".")
            elif value == "auto":
                if path not in values:
                    raise DeepSpeedConfigError(
                        f"{source}: key '{path}' is \"auto\" but no config value fills it"
                    )
                node[key] = values[path]

    walk(config, "")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    wanted = values.get("zero_optimization.stage", stage)
    if stage != wanted:
        raise DeepSpeedConfigError(
            f"{source}: zero_optimization.stage = {stage} but zero_stage = {wanted}: make them agree "
            '(or write "auto" in the JSON)'
        )
    for section in ("bf16", "fp16"):
        if config.get(section, {}).get("enabled") is True:
            raise DeepSpeedConfigError(
                f"{source}: '{section}.enabled' must stay false: DeepSpeed would cast the fp32 LoRA weights; the "
                "base precision comes from mixed_precision / base_model_precision"
            )
    return config


def deepspeed_config(
    path: str | Path,
    *,
    zero_stage: int,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    max_grad_norm: float,
    learning_rate: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> dict:
    """Read the DeepSpeed JSON for this stage and fill its "auto" values."""
    source = deepspeed_config_path(path, zero_stage)
    try:
        raw = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DeepSpeedConfigError(f"{source}: cannot read the DeepSpeed config ({err})") from None
    values = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": max_grad_norm,
        "optimizer.params.lr": learning_rate,
        "optimizer.params.betas": list(betas),
        "optimizer.params.eps": eps,
        "optimizer.params.weight_decay": weight_decay,
        "zero_optimization.stage": zero_stage,
    }
    return fill_deepspeed_config(raw, values, source)


def lr_at(step: int, *, base_lr: float, scheduler: str, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): constant, linear warmup, or warmup then cosine to 0."""
    if scheduler == "constant":
        return base_lr
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if scheduler == "constant_with_warmup":
        return base_lr * warm
    if scheduler == "cosine":
        if step < warmup_steps:
            return base_lr * warm
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"lr_scheduler {scheduler!r}: expected 'constant', 'constant_with_warmup' or 'cosine'")


def build_engine(model: nn.Module, config: dict):
    """deepspeed.initialize over the trainable parameters (the LoRA weights) on the existing process group."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: inject LoRA before building the engine")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    return engine


def comm_seconds() -> float | None:
    """Seconds spent in DeepSpeed's collectives so far, or None unless its comms logger is on.

    Turn it on with `"comms_logger": {"enabled": true, "prof_all": true}` in the DeepSpeed JSON. Each collective then
    waits for its result before the next op (that is how DeepSpeed times it), so a run that measures this loses the
    overlap of communication with compute: use it to measure, not to train.
    """
    from deepspeed.comm import comm

    logger_ = comm.comms_logger
    if not logger_.enabled:
        return None
    # comms_dict: {op name: {message bytes: [count, [latency ms], [algbw], [busbw]]}}
    total_ms = sum(sum(record[1]) for sizes in logger_.comms_dict.values() for record in sizes.values())
    return total_ms / 1000.0


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every parameter group (the schedule is ours, not DeepSpeed's)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank: all ranks then take the same branch."""
    flag = torch.tensor([1.0 if bool(torch.isfinite(loss).all()) else 0.0], device=loss.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class StepOutcome:
    """What one micro-step did."""

    skipped: bool  # non-finite loss on some rank: no backward, no step
    stepped: bool  # an optimizer step happened (end of the accumulation window)
    grad_norm: float | None


class GuardedStepper:
    """backward + step that skips micro-batches whose loss is non-finite on any rank, and stops after a streak."""

    def __init__(self, engine, max_nonfinite_in_row: int) -> None:
        self.engine, self.max_in_row = engine, max_nonfinite_in_row
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0

    def __call__(self, loss: torch.Tensor, lr: float) -> StepOutcome:
        """Run backward and the engine step for `loss` unless some rank's loss is non-finite."""
        if not all_finite(loss):
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            logger.warning("non-finite loss (%d in a row): micro-step skipped", self.nonfinite_in_row)
            if self.nonfinite_in_row >= self.max_in_row:
                raise NonFiniteLossError(
                    f"the loss was non-finite {self.nonfinite_in_row} micro-steps in a row "
                    f"(max_nonfinite_steps_in_row = {self.max_in_row}): stopping. Lower learning_rate, keep "
                    "max_grad_norm > 0, or check the shards for NaN latents (longcat-shards verify)"
                )
            return StepOutcome(skipped=True, stepped=False, grad_norm=None)
        self.nonfinite_in_row = 0
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            set_lr(self.engine, lr)
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if boundary else None
        return StepOutcome(skipped=False, stepped=boundary, grad_norm=None if norm is None else float(norm))
