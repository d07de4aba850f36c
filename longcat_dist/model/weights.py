"""Reading and writing the DiT in the official `dit/` layout: config.json + safetensors (sharded, with an index).

Loading builds the model on the meta device and materialises it one top-level module (or block) at a time, so a
`linear_transform` (e.g. fp8 quantization) sees each bf16 Linear once and the full bf16 model never sits in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SHARD_NAME = "diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"

LinearTransform = Callable[[str, nn.Linear], nn.Module]


def resolve_dit_dir(path: str | Path) -> Path:
    """The directory that holds the DiT: `path` itself, or `path/dit` for the official checkpoint root."""
    path = Path(path)
    for candidate in (path, path / "dit"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"{path}: no DiT found: expected {CONFIG_NAME} plus {WEIGHTS_NAME} (or {INDEX_NAME} and its shards) "
        "in this directory or in its dit/ subfolder (the official LongCat-Video layout)"
    )


def weight_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing the 'weight_map' object of a safetensors index")
        files = {name: directory / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{index} names the shard {file.name}, which is not in {directory}")
        return files
    single = directory / WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(f"{directory}: neither {INDEX_NAME} nor {WEIGHTS_NAME} is present")
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def _key_summary(keys: set[str]) -> str:
    shown = sorted(keys)[:8]
    more = f" and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return ", ".join(shown) + more


def check_keys(expected: dict[str, torch.Size], found: dict[str, Path], source: Path) -> None:
    """Strict loading: the checkpoint holds exactly the model's keys."""
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_key_summary(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_key_summary(unexpected)}")
        raise ValueError(
            f"{source}: the checkpoint does not match the model config ({'; '.join(parts)}). "
            "Check that config.json belongs to these weights."
        )


def _transform_linears(module: nn.Module, prefix: str, transform: LinearTransform) -> None:
    for name, child in list(module.named_children()):
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Linear):
            setattr(module, name, transform(full, child))
        else:
            _transform_linears(child, full, transform)


def _load_module(
    module: nn.Module,
    prefix: str,
    files: dict[str, Path],
    handles: dict[Path, object],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Materialise one module from meta and fill it from the checkpoint."""
    module.to(dtype=dtype).to_empty(device=device)
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = f"{prefix}.{name}"
        path = files[key]
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        value = handles[path].get_tensor(key)
        if value.shape != tensor.shape:
            raise ValueError(
                f"{path}: {key} has shape {list(value.shape)}; the model expects {list(tensor.shape)}"
            )
        with torch.no_grad():
            tensor.copy_(value)


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The materialisation units: every block, then the other top-level modules."""
    units = [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    return units + [(name, child) for name, child in model.named_children() if name != "blocks"]


def build_random(
    cls: type[nn.Module],
    config,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int = 0,
    linear_transform: LinearTransform | None = None,
) -> nn.Module:
    """`cls(config)` with random weights (N(0, 0.02), norm weights 1), materialised unit by unit like a load.

    For benchmarks of the production size without a checkpoint: built on meta, so a quantizing `linear_transform`
    sees each bf16 Linear once and the full bf16 model never sits in memory. The same seed gives the same weights
    on every rank of one GPU type.
    """
    with torch.device("meta"):
        model = cls(config)
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    for prefix, module in _units(model):
        module.to(dtype=dtype).to_empty(device=device)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
        if linear_transform is not None:
            _transform_linears(module, prefix, linear_transform)
    return model


def load_pretrained(
    cls: type[nn.Module],
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    linear_transform: LinearTransform | None = None,
) -> nn.Module:
    """Build `cls` from a `dit/` directory, strictly, one top-level module or block at a time."""
    from longcat_dist.model.transformer import DiTConfig

    directory = resolve_dit_dir(path)
    config = DiTConfig.from_json(directory / CONFIG_NAME)
    with torch.device("meta"):
        model = cls(config)
    files = weight_files(directory)
    check_keys({k: v.shape for k, v in model.state_dict().items()}, files, directory)
    device = torch.device(device)
    units = _units(model)
    handles: dict[Path, object] = {}
    for prefix, module in tqdm(units, desc="load DiT", unit="module", leave=False, disable=len(units) < 16):
        _load_module(module, prefix, files, handles, dtype, device)
        if linear_transform is not None:
            _transform_linears(module, prefix, linear_transform)
    handles.clear()
    logger.info("loaded the DiT from %s (%d tensors, %s)", directory, len(files), dtype)
    return model


def save_pretrained(model: nn.Module, directory: str | Path, *, max_shard_size_bytes: int) -> None:
    """Write config.json and the weights, sharded with an index once they exceed max_shard_size_bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_NAME, metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, start=1):
        file = SHARD_NAME.format(index=index, count=len(shards))
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index_doc, indent=2) + "\n")
