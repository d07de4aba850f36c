"""LoRA on the LongCat DiT through PEFT: inject, read out, export (PEFT/diffusers and official formats), load.

Targets are names of Linears inside the DiT blocks ("qkv", "proj", "q_linear", "kv_linear", "ffn.w1", ...), matched
on the dotted path below `blocks.<i>.` so that "proj" never catches `x_embedder.proj` (a Conv3d). "y_embedder" selects
the caption projection's Linears. LoRA weights are kept in fp32 whatever the base dtype.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ADAPTER = "default"
DIFFUSERS_PREFIX = "transformer."  # diffusers stores a transformer LoRA under this prefix
OFFICIAL_SEP = "___lorahyphen___"  # spec §7: "." in a module path is written as this
OFFICIAL_PREFIX = "lora" + OFFICIAL_SEP
_BLOCK_NAME = re.compile(r"blocks\.\d+\.(.+)")
_REQUIRED_METADATA = ("rank", "alpha", "targets", "base_model", "step")


def _lora_base_types() -> tuple[type[nn.Module], ...]:
    """Layer types LoRA may wrap: nn.Linear plus the frozen quantized Linears when quant.py is there."""
    try:
        from longcat_dist.model.quant import QuantizedLinear
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, QuantizedLinear)


def _custom_module_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """Our LoRA layer classes by base type: quantized Linears first, then nn.Linear (lora_linear.FastLoraLinear)."""
    from longcat_dist.model.lora_linear import FastLoraLinear

    try:
        from longcat_dist.model.quant import lora_custom_module_mapping
    except ImportError:
        return {nn.Linear: FastLoraLinear}
    return {**lora_custom_module_mapping(), nn.Linear: FastLoraLinear}


def _matches(name: str, targets: Sequence[str]) -> bool:
    block = _BLOCK_NAME.fullmatch(name)
    if block is not None:
        inner = block.group(1)
        return any(inner == t or inner.endswith("." + t) for t in targets)
    return "y_embedder" in targets and name.startswith("y_embedder.")


def target_module_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full dotted names of the Linears that the short target names select; every target must select one."""
    base_types = _lora_base_types()
    names = [n for n, m in model.named_modules() if isinstance(m, base_types) and _matches(n, targets)]
    for target in targets:
        if not any(_matches(n, [target]) for n in names):
            raise ValueError(
                f"LoRA target {target!r} matches no Linear of the model: use a block Linear such as 'qkv', "
                "'proj', 'q_linear', 'kv_linear', 'ffn.w1', or 'y_embedder'"
            )
    return names


def _exact_names_regex(names: Sequence[str]) -> str:
    # PEFT full-matches a string target_modules against each module name.
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _inject(
    model: nn.Module, names: Sequence[str], ranks: dict[str, int], alpha: float, dropout: float
) -> None:
    """Wrap exactly `names` with PEFT LoRA layers (rank per name) and make only the LoRA weights trainable."""
    base_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(
        r=base_rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=_exact_names_regex(names),
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != base_rank},
    )
    config._register_custom_module(_custom_module_mapping())
    for param in model.parameters():
        param.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for module in lora_layers(model).values():
        for param in [*module.lora_A[ADAPTER].parameters(), *module.lora_B[ADAPTER].parameters()]:
            param.data = param.data.float()  # trainable weights in fp32 even on a bf16 base
            param.requires_grad_(True)


def inject_lora(
    model: nn.Module, *, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0
) -> nn.Module:
    """Add PEFT LoRA layers (fp32, trainable) to the selected Linears in place; the base is frozen."""
    if rank < 1:
        raise ValueError(f"LoRA rank {rank} must be >= 1")
    names = target_module_names(model, targets)
    _inject(model, names, dict.fromkeys(names, rank), alpha, dropout)
    model.lora_settings = {"rank": rank, "alpha": float(alpha), "targets": list(targets)}
    logger.info("LoRA r=%d alpha=%s on %d Linears (%s)", rank, alpha, len(names), ", ".join(targets))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The model's PEFT LoRA layers by the dotted name of the Linear they wrap."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA weights in the PEFT/diffusers key format: transformer.<module>.lora_A/lora_B.weight (fp32 copies)."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{DIFFUSERS_PREFIX}{name}.lora_A.weight"] = (
            layer.lora_A[ADAPTER].weight.detach().float().clone()
        )
        state[f"{DIFFUSERS_PREFIX}{name}.lora_B.weight"] = (
            layer.lora_B[ADAPTER].weight.detach().float().clone()
        )
    if not state:
        raise ValueError("the model has no LoRA layers: call inject_lora (or load_lora) first")
    return state


def _metadata(model: nn.Module, metadata: dict, fmt: str) -> dict[str, str]:
    """String metadata for safetensors: the model's LoRA settings completed by the caller's fields."""
    merged = {**getattr(model, "lora_settings", {}), **metadata, "format": fmt}
    missing = [k for k in _REQUIRED_METADATA if k not in merged]
    if missing:
        raise ValueError(f"LoRA export metadata lacks {missing}: pass them in metadata=")
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in merged.items()}


def export_lora(model: nn.Module, path: str | Path, *, metadata: dict) -> None:
    """Write the LoRA as safetensors in the PEFT/diffusers key format, with rank, alpha, targets, base_model, step."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model), str(path), metadata=_metadata(model, metadata, "peft"))


def official_name(module_name: str) -> str:
    """blocks.0.attn.qkv -> lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv."""
    return OFFICIAL_PREFIX + module_name.replace(".", OFFICIAL_SEP)


def export_official_lora(model: nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    """Write the LoRA in the official LongCat-Video format (spec §7): lora_down, lora_up, alpha_scale per module."""
    state = {}
    for name, layer in lora_layers(model).items():
        key = official_name(name)
        state[f"{key}.lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().float().clone()  # [r, in]
        state[f"{key}.lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().float().clone()  # [out, r]
        state[f"{key}.alpha_scale"] = torch.tensor(float(layer.scaling[ADAPTER]), dtype=torch.float32)
    if not state:
        raise ValueError("the model has no LoRA layers: call inject_lora (or load_lora) first")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    save_file(state, str(path), metadata={**meta, "format": "longcat-official"})


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found")
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}


def _from_peft(
    path: Path, state: dict[str, Tensor], meta: dict[str, str]
) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{module: (A [r, in], B [out, r], scale)} from PEFT/diffusers keys; alpha from metadata, else alpha = r."""
    alpha = json.loads(meta["alpha"]) if "alpha" in meta else None
    modules = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key[: -len(".lora_A.weight")]
        name = stem.removeprefix(DIFFUSERS_PREFIX).removeprefix("base_model.model.")
        if f"{stem}.lora_B.weight" not in state:
            raise ValueError(f"{path}: key {key} has no matching {stem}.lora_B.weight")
        down, up = state[key], state[f"{stem}.lora_B.weight"]
        rank = down.shape[0]
        modules[name] = (down, up, (alpha if alpha is not None else rank) / rank)
    return modules


def _from_official(path: Path, state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{module: (A, B, scale)}; split ups (lora_up.blocks.i) become one block-diagonal B (same product)."""
    modules = {}
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        name = stem.removeprefix(OFFICIAL_PREFIX).replace(OFFICIAL_SEP, ".")
        down = state[key]  # [n*r, in]
        if f"{stem}.lora_up.weight" in state:
            up = state[f"{stem}.lora_up.weight"]
        else:
            blocks = sorted(
                (k for k in state if k.startswith(f"{stem}.lora_up.blocks.")),
                key=lambda k: int(k.split(".")[-2]),
            )
            if not blocks:
                raise ValueError(f"{path}: {key} has no lora_up weight")
            up = torch.block_diag(*[state[k] for k in blocks])  # [out, n*r]
        if f"{stem}.alpha_scale" not in state:
            raise ValueError(f"{path}: {stem} has no alpha_scale (the official format requires one)")
        modules[name] = (down, up, float(state[f"{stem}.alpha_scale"]))
    return modules


def read_lora(path: str | Path) -> tuple[dict[str, tuple[Tensor, Tensor, float]], dict[str, str]]:
    """Read either format into {module name: (A [r, in], B [out, r], scale)} plus the file's metadata."""
    path = Path(path)
    state, meta = _read(path)
    is_official = any(OFFICIAL_SEP in k for k in state)
    modules = _from_official(path, state) if is_official else _from_peft(path, state, meta)
    if not modules:
        raise ValueError(
            f"{path}: no LoRA weights found (expected *.lora_A.weight / *.lora_B.weight or the official "
            "lora___lorahyphen___*.lora_down.weight keys)"
        )
    return modules, meta


def _check_shapes(path: Path, name: str, module: nn.Module, down: Tensor, up: Tensor) -> None:
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    if down.shape[1] != base.in_features or up.shape[0] != base.out_features or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"{path}: LoRA for {name} has A {tuple(down.shape)}, B {tuple(up.shape)}, but the layer is "
            f"{base.in_features} -> {base.out_features}: the LoRA was trained on another model configuration"
        )


def _merge(model: nn.Module, path: Path, modules: dict[str, tuple[Tensor, Tensor, float]]) -> None:
    for name, (down, up, scale) in modules.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"{path}: cannot merge into {name} ({type(layer).__name__}); merge needs a plain nn.Linear "
                "(a bf16/fp32 base without LoRA layers); load with merge=False instead"
            )
        _check_shapes(path, name, layer, down, up)
        delta = scale * (up.float() @ down.float())  # [out, in]
        layer.weight.data = (layer.weight.data.float() + delta.to(layer.weight.device)).to(layer.weight.dtype)


def load_lora(model: nn.Module, path: str | Path, *, merge: bool = False) -> nn.Module:
    """Apply a LoRA file (either format) to the model: as LoRA layers, or folded into the weights with merge."""
    path = Path(path)
    modules, meta = read_lora(path)
    missing = [n for n in modules if n not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"{path}: LoRA names modules the model lacks, e.g. {missing[:3]}")
    if merge:
        _merge(model, path, modules)
        return model
    layers = lora_layers(model)
    if not layers:
        ranks = {n: d.shape[0] for n, (d, _, _) in modules.items()}
        _inject(model, list(modules), ranks, alpha=1.0, dropout=0.0)
        targets = json.loads(meta["targets"]) if "targets" in meta else sorted(modules)
        rank = max(ranks.values())
        model.lora_settings = {
            "rank": rank,
            "alpha": json.loads(meta.get("alpha", str(rank))),
            "targets": targets,
        }
        layers = lora_layers(model)
    if set(layers) != set(modules):
        raise ValueError(
            f"{path}: LoRA modules differ from the model's LoRA layers ({len(modules)} vs {len(layers)}), "
            f"e.g. {sorted(set(layers) ^ set(modules))[:3]}"
        )
    for name, (down, up, scale) in modules.items():
        layer = layers[name]
        _check_shapes(path, name, layer, down, up)
        layer.lora_A[ADAPTER].weight.data.copy_(down)
        layer.lora_B[ADAPTER].weight.data.copy_(up)
        layer.scaling[ADAPTER] = scale
    return model
