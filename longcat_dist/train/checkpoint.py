"""Training state on disk without pickles: LoRA fp32 weights + Adam moments (safetensors) and a JSON of counters.

DeepSpeed's own checkpoints are torch pickles; instead every rank takes part in gathering the full (unpartitioned)
fp32 weights and optimizer moments of the trainable parameters through deepspeed.utils' safe_* accessors, which
work for ZeRO-1/2/3, and rank 0 writes them. Restoring scatters them back the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

STATE_NAME = "train_state.safetensors"
META_NAME = "train_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam / AdamW state besides the step count


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def gather_train_state(engine: Any, model: nn.Module) -> dict[str, Tensor]:
    """Full fp32 weights and Adam moments of every trainable parameter; a collective: call it on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    has_moments = optimizer_step_count(engine) > 0  # Adam creates its state lazily, at the first step
    state: dict[str, Tensor] = {}
    for name, param in _trainable(model).items():
        full = safe_get_full_fp32_param(param).detach().float().cpu().clone()
        state[f"param/{name}"] = full
        for moment in MOMENTS:
            value = safe_get_full_optimizer_state(param, moment) if has_moments else torch.zeros_like(full)
            state[f"{moment}/{name}"] = value.detach().float().cpu().clone().view(full.shape)
    return state


def optimizer_step_count(engine: Any) -> int:
    """Adam's step counter (the same for every parameter group under DeepSpeed's flat groups)."""
    for value in engine.optimizer.optimizer.state.values():
        if "step" in value:
            return int(value["step"])
    return 0


def save_train_state(directory: str | Path, state: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write the tensors and the JSON counters into `directory`, atomically (temp dir + rename)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / STATE_NAME))
    (tmp / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The JSON counters of a saved training state."""
    path = Path(directory) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a longcat-dist checkpoint (no {META_NAME})")
    return json.loads(path.read_text())


def _init_adam_state(engine: Any, step: int) -> None:
    """Create Adam's lazy state (zero moments, the saved step count) so the moments can be set before a step."""
    base = engine.optimizer.optimizer
    # ZeRO-3 hands the base optimizer its fp32 partitions only for the step itself (param_groups are empty
    # between steps); ZeRO-1/2 keep them in param_groups.
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is None:
        flats = [flat for group in base.param_groups for flat in group["params"]]
    for flat in flats:
        state = base.state[flat]
        state["step"] = torch.tensor(float(step))
        for moment in MOMENTS:
            state.setdefault(moment, torch.zeros_like(flat, memory_format=torch.preserve_format))
    # ZeRO-1/2 link each parameter to its slice of the optimizer state only after the first step; do it now.
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def restore_train_state(engine: Any, model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Load weights, moments and step count into the engine on every rank (a collective); returns the counters."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    directory = Path(directory)
    meta = read_meta(directory)
    state = load_file(str(directory / STATE_NAME))
    params = _trainable(model)
    expected = {f"{kind}/{name}" for name in params for kind in ("param", *MOMENTS)}
    if set(state) != expected:
        raise ValueError(
            f"{directory / STATE_NAME}: tensors do not match this model's LoRA "
            f"(e.g. {sorted(set(state) ^ expected)[:3]}): was it saved with other lora_rank / lora_targets?"
        )
    _init_adam_state(engine, int(meta["optimizer_steps"]))
    for name, param in params.items():
        safe_set_full_fp32_param(param, state[f"param/{name}"])
        # The optimizer's fp32 copy is not the module's weight: set that too (ZeRO-3 re-partitions it on exit).
        with GatheredParameters([param], modifier_rank=0):
            param.data.copy_(state[f"param/{name}"].to(param.dtype))
        for moment in MOMENTS:
            safe_set_full_optimizer_state(param, state[f"{moment}/{name}"], moment)
    return meta
