"""Frozen fp8 / int8 base weights for LoRA training: the layers, model conversion, save and load.

The block Linears of the DiT (qkv, proj, cross-attention q/kv/proj, SwiGLU w1/w2/w3) hold 1-byte codes plus one fp32
scale per output channel, about 1 byte per parameter. Norms, embedders, the modulation Linears (fp32 islands, spec
§2.12) and the final layer keep their own precision. The arithmetic lives in
quant_autograd.py (matmuls, autograd) and quant_kernels.py (quantization kernels).

Distribution: codes, scales and biases are buffers, never parameters. DeepSpeed casts, partitions and broadcasts
parameters only, so under ZeRO-1/2 every rank keeps the whole quantized base (about 14 GB in fp8 for 13.6 B),
identical because every rank loads the same checkpoint. ZeRO-3 would partition the parameters around our buffers and
never gather them: check_zero_stage rejects it.
"""

import importlib
import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from longcat_dist.model.quant_autograd import FP8_DIM_MULTIPLE, quantized_linear
from longcat_dist.model.quant_kernels import CODE_DTYPE, quantize_weight

logger = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp8", "int8")
PRECISION_ALIASES = {"no_change": "bf16", "fp8-torchao": "fp8", "int8-quanto": "int8"}
# Block Linears only. Everything else (adaLN_modulation: an fp32 island; t/y/x embedders; final_layer) stays.
_QUANTIZED_NAME = re.compile(
    r"(?:^|\.)blocks\.\d+\.(?:attn\.(?:qkv|proj)|cross_attn\.(?:q_linear|kv_linear|proj)|ffn\.w[123])$"
)
CONFIG_NAME = "quantization_config.json"
INDEX_NAME = "quantized_model.safetensors.index.json"
SHARD_NAME = "quantized_model-{index:05d}-of-{count:05d}.safetensors"
FORMAT_VERSION = 1
# The official int8 tooling writes shards of about 4 GB (spec §8).
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


def resolve_precision(name: str) -> str:
    """Map a base_model_precision value (or one of its aliases) to one of PRECISIONS."""
    if name in PRECISIONS:
        return name
    if name in PRECISION_ALIASES:
        resolved = PRECISION_ALIASES[name]
        logger.info(
            "base_model_precision %r runs as %r (longcat_dist's own quantized linears)", name, resolved
        )
        return resolved
    raise ValueError(
        f"base_model_precision {name!r} is unknown: use one of {list(PRECISIONS)} "
        f"or an alias {sorted(PRECISION_ALIASES)}"
    )


def should_quantize(name: str) -> bool:
    """True for the DiT's block Linears (dotted module name), False for every higher-precision layer."""
    return _QUANTIZED_NAME.search(name) is not None


def check_zero_stage(precision: str, stage: int) -> None:
    """Raise if this DeepSpeed ZeRO stage cannot train on a base of this precision."""
    precision = resolve_precision(precision)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage {stage!r} is not a DeepSpeed ZeRO stage (0, 1, 2 or 3)")
    if stage == 3 and precision != "bf16":
        raise ValueError(
            f"zero_stage 3 cannot run with base_model_precision {precision!r}: ZeRO-3 partitions parameters and "
            "gathers them around each module, but the quantized base lives in buffers that the layers read "
            "directly. Use zero_stage 2 (the quantized base is replicated on every rank) or bf16 with ZeRO-3."
        )


class QuantizedLinear(nn.Module):
    """A frozen Linear stored as 1-byte codes [out, in] and fp32 scales [out]: W = codes * scale[:, None].

    The buffers hold the bits in integer dtypes (uint8 for e4m3, int32 for the fp32 scales), so that
    Module.to(dtype), .half() or .bfloat16() never cast them while device moves still apply. `qweight` and
    `qscale` give the real dtypes; state_dict() and load_state_dict() use the real dtypes too.
    """

    precision: str
    codes_key: str  # state-dict name of the codes
    codes_storage: torch.dtype  # integer dtype of the same width that holds them in memory

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, bias_dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            self.codes_key, torch.empty(out_features, in_features, dtype=self.codes_storage, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.int32, device=device))
        bias_tensor = torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None
        self.register_buffer("bias", bias_tensor)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantizedLinear":
        """Quantize a Linear's weight per output channel; the bias is kept as it is."""
        bias = linear.bias
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            device=linear.weight.device,
            bias_dtype=None if bias is None else bias.dtype,
        )
        codes, scale = quantize_weight(linear.weight, cls.precision)
        layer.qweight.copy_(codes)
        layer.qscale.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @property
    def qweight(self) -> torch.Tensor:
        """The codes [out, in] in their real dtype (a view of the stored bits)."""
        return self._buffers[self.codes_key].view(CODE_DTYPE[self.precision])

    @property
    def qscale(self) -> torch.Tensor:
        """The per-output-channel dequantization scales [out], fp32 (a view of the stored bits)."""
        return self._buffers["weight_scale"].view(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.qweight, self.qscale, self.bias, self.precision)

    def _bit_views(self) -> dict[str, tuple[torch.dtype, torch.dtype]]:
        # state-dict name -> (real dtype, storage dtype)
        return {
            self.codes_key: (CODE_DTYPE[self.precision], self.codes_storage),
            "weight_scale": (torch.float32, torch.int32),
        }

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, (real, _) in self._bit_views().items():
            destination[prefix + name] = destination[prefix + name].view(real)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors
    ):
        for name, (real, storage) in self._bit_views().items():
            key = prefix + name
            if key in state_dict and state_dict[key].dtype != storage:
                if state_dict[key].dtype != real:
                    errors.append(f"{key}: dtype {state_dict[key].dtype}, expected {real}")
                    continue
                state_dict[key] = state_dict[key].view(storage)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected, errors
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, precision={self.precision}"
        )


class Fp8Linear(QuantizedLinear):
    """Frozen Linear with e4m3 codes and per-output-channel scales; fp8 tensor-core forward and input gradient."""

    precision = "fp8"
    codes_key = "weight_fp8"
    codes_storage = torch.uint8

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        """Quantize a Linear whose in_features and out_features are multiples of 16 (the fp8 matmul's rule)."""
        if linear.in_features % FP8_DIM_MULTIPLE or linear.out_features % FP8_DIM_MULTIPLE:
            raise ValueError(
                f"fp8 needs in_features and out_features divisible by {FP8_DIM_MULTIPLE} (cuBLASLt fp8 "
                f"matmul), got {linear.in_features} -> {linear.out_features}; keep this layer in bf16 or int8"
            )
        return super().from_linear(linear)


class Int8Linear(QuantizedLinear):
    """Frozen Linear in the official int8 scheme (spec §8: `weight_int8`, `weight_scale`, `bias`)."""

    precision = "int8"
    codes_key = "weight_int8"
    codes_storage = torch.int8


LAYER_CLASSES: dict[str, type[QuantizedLinear]] = {"fp8": Fp8Linear, "int8": Int8Linear}


def quantize_linear(name: str, linear: nn.Linear, precision: str) -> nn.Module:
    """The load-time hook: a quantized copy of `linear` if `name` is a block Linear, else `linear` itself."""
    precision = resolve_precision(precision)
    if precision == "bf16" or not should_quantize(name):
        return linear
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{name}: expected an nn.Linear to quantize, got {type(linear).__name__}")
    try:
        return LAYER_CLASSES[precision].from_linear(linear)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from error


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def quantize_model(model: nn.Module, precision: str) -> nn.Module:
    """Quantize a built model's block Linears in place, one layer at a time (each bf16 weight is freed in turn)."""
    precision = resolve_precision(precision)
    if precision == "bf16":
        return model
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and should_quantize(name)
    ]
    if not targets:
        raise ValueError(
            f"quantize_model({precision!r}): no block Linears (names like blocks.0.attn.qkv) found; quantize the "
            "base model before injecting LoRA (PEFT renames them to ...base_layer)"
        )
    for name in tqdm(
        targets, desc=f"quantize {precision}", unit="linear", leave=False, disable=len(targets) < 64
    ):
        parent, child = _parent(model, name)
        setattr(parent, child, quantize_linear(name, getattr(parent, child), precision))
    kept = sum(isinstance(module, nn.Linear) for module in model.modules())
    logger.info("quantized %d Linears to %s; %d Linears keep their precision", len(targets), precision, kept)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The model's quantized layers by dotted name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str, key: str, source: Path) -> type:
    module_name, _, qualname = path.partition(":")
    try:
        found = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{source}: {key} {path!r} cannot be imported ({error})") from error
    return found


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor.contiguous()
        size += nbytes
    return shards + [current]


def save_quantized(
    model: nn.Module, directory: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Write a quantized base: safetensors shards + index, quantization_config.json and the model's config.json."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no Fp8Linear/Int8Linear; run quantize_model first")
    precisions = sorted({layer.precision for layer in layers.values()})
    if len(precisions) != 1:
        raise ValueError(f"save_quantized: the model mixes precisions {precisions}; one checkpoint holds one")
    config = getattr(model, "config", None)
    if not hasattr(config, "to_json") or not hasattr(type(config), "from_json"):
        raise ValueError(
            f"save_quantized: {type(model).__name__}.config needs to_json/from_json so that load_quantized can "
            "rebuild the model without its bf16 weights"
        )
    state = model.state_dict()
    adapter_keys = [key for key in state if "lora_" in key or ".base_layer." in key]
    if adapter_keys:
        raise ValueError(f"save_quantized: save the base before injecting LoRA (found {adapter_keys[0]!r})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _shards(state, max_shard_bytes)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = SHARD_NAME.format(index=index, count=len(shards))
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index_json, indent=2))
    config.to_json(directory / "config.json")
    quant_config = {
        "format_version": FORMAT_VERSION,
        "precision": precisions[0],
        "scheme": "per-output-channel symmetric: codes [out, in] and fp32 weight_scale [out]; W = codes * scale",
        "codes_dtype": str(CODE_DTYPE[precisions[0]]).removeprefix("torch."),
        "model_class": _class_path(type(model)),
        "config_class": _class_path(type(config)),
        "quantized_modules": sorted(layers),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(quant_config, indent=2))
    logger.info("saved %d %s layers in %d shards to %s", len(layers), precisions[0], len(shards), directory)


def _read_quant_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: not a quantized checkpoint (write one with save_quantized)"
        )
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {config.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    if config.get("precision") not in LAYER_CLASSES:
        raise ValueError(
            f"{path}: precision {config.get('precision')!r} is not one of {sorted(LAYER_CLASSES)}"
        )
    for key in ("model_class", "config_class", "quantized_modules"):
        if key not in config:
            raise ValueError(f"{path}: key {key!r} is missing")
    return config


def _key_list(keys: set[str]) -> str:
    return f"{sorted(keys)[:5]} ({len(keys)} in all)"


def load_quantized(directory: str | Path, device: str | torch.device) -> nn.Module:
    """Rebuild a model written by save_quantized on `device`, without ever creating its bf16 weights."""
    directory = Path(directory)
    quant_config = _read_quant_config(directory / CONFIG_NAME)
    model_cls = _import_class(quant_config["model_class"], "model_class", directory / CONFIG_NAME)
    config_cls = _import_class(quant_config["config_class"], "config_class", directory / CONFIG_NAME)
    config = config_cls.from_json(directory / "config.json")
    layer_cls = LAYER_CLASSES[quant_config["precision"]]
    with torch.device("meta"):
        model = model_cls(config)
        for name in quant_config["quantized_modules"]:
            parent, child = _parent(model, name)
            linear = getattr(parent, child, None)
            if not isinstance(linear, nn.Linear):
                raise ValueError(
                    f"{directory / CONFIG_NAME}: quantized module {name!r} is not a Linear of the model"
                )
            setattr(
                parent,
                child,
                layer_cls(linear.in_features, linear.out_features, bias=linear.bias is not None),
            )
    expected = set(model.state_dict())
    weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
    loaded: set[str] = set()
    for file_name in tqdm(sorted(set(weight_map.values())), desc="load quantized", unit="shard", leave=False):
        tensors = load_file(str(directory / file_name), device=str(device))
        unexpected = set(tensors) - expected
        if unexpected:
            raise ValueError(
                f"{directory / file_name}: keys the model does not have: {_key_list(unexpected)}"
            )
        model.load_state_dict(tensors, strict=False, assign=True)
        loaded |= set(tensors)
    missing = expected - loaded
    if missing:
        raise ValueError(f"{directory}: keys missing from the checkpoint: {_key_list(missing)}")
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise ValueError(
            f"{directory}: {left_on_meta[:5]} were not loaded (non-persistent state of the model?)"
        )
    return model


def checkpoint_precision(directory: str | Path) -> str:
    """The precision recorded in a quantized checkpoint's quantization_config.json."""
    return _read_quant_config(Path(directory) / CONFIG_NAME)["precision"]


def lora_custom_module_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """{Fp8Linear: ..., Int8Linear: ...} for LoraConfig._register_custom_module, so PEFT LoRA wraps our layers."""
    # PEFT takes seconds to import; only LoRA training pays for it.
    from longcat_dist.model.quant_lora import QuantLoraLinear

    return {Fp8Linear: QuantLoraLinear, Int8Linear: QuantLoraLinear}
