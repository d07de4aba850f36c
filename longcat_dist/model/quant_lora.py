"""PEFT's LoRA Linear around a frozen Fp8Linear / Int8Linear (registered through lora_custom_module_mapping)."""

import torch
from torch import nn

from longcat_dist.model.lora_linear import FastLoraLinear


class QuantLoraLinear(FastLoraLinear):
    """out = quantized_base(x) + lora_B(lora_A(dropout(x))) * scaling; the LoRA keeps its own dtype."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, None]:
        # PEFT would cast the adapter to the base weight's dtype; e4m3 or int8 is no dtype for a trainable
        # adapter, so only the device is taken and the adapter's dtype is left to the trainer.
        return base_layer.qscale.device, None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            f"cannot merge a LoRA into a {self.get_base_layer().precision} base: the codes would be re-quantized. "
            "Save the LoRA on its own, or merge it into the bf16 base."
        )

    def unmerge(self) -> None:
        raise ValueError("a LoRA on a quantized base is never merged, so there is nothing to unmerge")
