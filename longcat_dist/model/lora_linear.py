"""PEFT's LoRA Linear with a leaner forward: the low-rank update folded into one addmm on the base output.

PEFT computes `(base(x) + lora_B(lora_A(x.float())) * s).to(bf16)` with fp32 adapters: it writes an fp32 copy of
the input, an fp32 [tokens, out] product, its scaled copy and an fp32 sum before rounding back, about 8 bytes per
output element four times over (measured: ~20 ms of a 142 ms production block on the H200). Here the update is
`addmm(base(x), (x @ Aᵀ)·s, Bᵀ)`: operands in the activation dtype, as under torch.autocast, fp32 accumulation,
the adapters' gradients returned in fp32, and no tensor of [tokens, out] besides the output. With an fp32 model
every operand is fp32 and the result equals PEFT's to rounding order.

Used when the plain vanilla-LoRA forward applies (one active adapter, no dropout, not merged, no variant, weights
not partitioned by ZeRO-3); anything else takes PEFT's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with fp32 accumulation and an fp32 result; bf16/fp16 operands stay in their dtype on CUDA."""
    if a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())  # exact widening: the same products and an fp32 sum


class LoraUpdate(torch.autograd.Function):
    """out = base_out + s·(x Aᵀ) Bᵀ over the last dim; gradients for x, base_out, A and B."""

    @staticmethod
    def forward(ctx, x: Tensor, base_out: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
        dtype = base_out.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        hidden = _mm_fp32(x2, a.t())  # [tokens, r] fp32
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), (hidden * scaling).to(dtype), b.t())
        ctx.save_for_backward(x, hidden, lora_a, lora_b)
        ctx.scaling, ctx.dtype = scaling, dtype
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, hidden, lora_a, lora_b = ctx.saved_tensors
        scaling, dtype = ctx.scaling, ctx.dtype
        g2 = grad.reshape(-1, grad.shape[-1]).to(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        grad_b = _mm_fp32(g2.t(), hidden.to(dtype)).mul_(scaling)  # [out, r]
        grad_hidden = _mm_fp32(g2, b).mul_(scaling).to(dtype)  # [tokens, r]
        grad_a = _mm_fp32(grad_hidden.t(), x2)  # [r, in]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_hidden, a).view(x.shape).to(x.dtype)
        return grad_x, grad, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None


class FastLoraLinear(LoraLinear):
    """PEFT's LoRA Linear (same parameters, state dict and export) whose vanilla forward is LoraUpdate."""

    def _fast_adapter(self) -> str | None:
        """The one active adapter when LoraUpdate computes exactly what PEFT's forward would, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant:
            return None
        if not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
        if hasattr(weight_a, "ds_id") or hasattr(weight_b, "ds_id"):
            return None  # ZeRO-3 gathers these only inside their own modules' forward
        if self.lora_A[name].bias is not None or self.lora_B[name].bias is not None:
            return None
        return name

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        name = None if args or kwargs else self._fast_adapter()
        if name is None:
            return super().forward(x, *args, **kwargs)
        base_out = self.base_layer(x)
        return LoraUpdate.apply(
            x, base_out, self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name])
        )
