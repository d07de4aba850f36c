"""FastLoraLinear: the folded LoRA update against PEFT's own forward, in fp32 exactly and in bf16 by its rule."""

import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLinear
from torch import nn

from longcat_dist.model import lora
from longcat_dist.model.lora_linear import FastLoraLinear
from longcat_dist.model.quant import quantize_model
from longcat_dist.model.quant_lora import QuantLoraLinear
from longcat_dist.model.transformer import TINY_DIT, DiTConfig, LongCatVideoTransformer3DModel


class _Net(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"qkv": nn.Linear(24, 40)})]).to(dtype)


def _layer(dtype: torch.dtype, dropout: float = 0.0, rank: int = 4) -> FastLoraLinear:
    torch.manual_seed(0)
    net = lora.inject_lora(_Net(dtype), rank=rank, alpha=2 * rank, targets=("qkv",), dropout=dropout)
    layer = net.blocks[0]["qkv"]
    with torch.no_grad():  # B starts at zero; give it values so the update shows in every output
        layer.lora_B["default"].weight.normal_(0, 0.5)
    return layer


def _grads(layer: nn.Module, forward, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = forward(layer, x)
    weights = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return (out, *torch.autograd.grad(out, [x, *weights], grad))


def test_inject_wraps_plain_and_quantized_linears_in_the_fast_layer():
    assert type(_layer(torch.float32)) is FastLoraLinear
    model = quantize_model(LongCatVideoTransformer3DModel(DiTConfig(**TINY_DIT)), "fp8")
    lora.inject_lora(model, rank=4, alpha=4, targets=("qkv", "proj"))
    layers = lora.lora_layers(model)
    assert layers and all(type(m) is QuantLoraLinear for m in layers.values())
    assert isinstance(layers["blocks.0.attn.qkv"], FastLoraLinear)


def test_fp32_output_and_gradients_equal_peft():
    layer = _layer(torch.float32)
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(2, 7, 40, generator=torch.Generator().manual_seed(2))
    fast = _grads(layer, FastLoraLinear.forward, x, grad)
    peft = _grads(layer, PeftLinear.forward, x, grad)
    assert layer._fast_adapter() == "default"
    for name, got, want in zip(["out", "x", "A", "B"], fast, peft):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_follows_its_rule_and_stays_near_peft(device):
    """bf16 base: operands rounded to bf16 (A, B, the rank-r hidden), fp32 sums, one rounding of the output.

    On CUDA the bf16 operands go to cuBLAS as they are (mm with out_dtype=float32); on the CPU they are widened.
    """
    layer = _layer(torch.bfloat16).to(device)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(3)).bfloat16().to(device)
    grad = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(4)).bfloat16().to(device)
    out, dx, da, db = _grads(layer, FastLoraLinear.forward, x, grad)
    assert out.dtype == dx.dtype == torch.bfloat16 and da.dtype == db.dtype == torch.float32

    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.bfloat16().double()

    with torch.no_grad():
        base = layer.base_layer(x).double()
        hidden = x.double() @ wide(a).T
        want = (base + wide(hidden * scaling) @ wide(b).T).bfloat16()
        g = grad.double()
        grad_hidden = wide((g @ wide(b)) * scaling)
        want_db = scaling * (g.flatten(0, 1).T @ wide(hidden).flatten(0, 1))
        want_da = grad_hidden.flatten(0, 1).T @ x.double().flatten(0, 1)
    torch.testing.assert_close(out.double(), want.double(), rtol=8e-3, atol=1e-2)  # one bf16 rounding apart
    torch.testing.assert_close(db.double(), want_db, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(da.double(), want_da, rtol=1e-4, atol=1e-4)
    # And within bf16 error of PEFT's fp32-adapter forward.
    peft = _grads(layer, PeftLinear.forward, x, grad)
    for name, got, want in zip(["out", "x", "A", "B"], (out, dx, da, db), peft):
        error = (got.double() - want.double()).abs().max() / want.double().abs().max()
        assert error < 2e-2, f"{name}: {error:.2e}"


@pytest.mark.parametrize("case", ["dropout", "disabled", "zero3", "kwargs"])
def test_what_the_fold_cannot_express_takes_peft_forward(case):
    layer = _layer(torch.float32, dropout=0.5 if case == "dropout" else 0.0)
    if case == "disabled":
        layer.enable_adapters(False)
    if case == "zero3":
        layer.lora_A["default"].weight.ds_id = 0
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(5))
    if case == "kwargs":
        assert layer._fast_adapter() == "default"
        with pytest.raises(ValueError):  # PEFT's forward checks its own arguments
            layer(x, adapter_names=["default"] * 4 + ["x"])
        return
    assert layer._fast_adapter() is None
    layer.eval()
    torch.testing.assert_close(layer(x), PeftLinear.forward(layer, x))


def test_tiny_dit_with_fast_lora_matches_peft_forward_and_gradients():
    torch.manual_seed(0)
    model = LongCatVideoTransformer3DModel(DiTConfig(**TINY_DIT))
    lora.inject_lora(model, rank=4, alpha=4, targets=("qkv", "proj", "q_linear", "kv_linear"))
    for layer in lora.lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.1)
    latents = torch.randn(1, 16, 3, 4, 4)
    timestep = torch.full((1, 3), 0.5)
    text = torch.randn(1, 1, 6, TINY_DIT["caption_channels"])
    mask = torch.ones(1, 6, dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        out = model(latents, timestep, text, mask, num_cond_latents=1)
        return out, torch.autograd.grad(out.square().mean(), params)

    fast_out, fast_grads = run()
    original = FastLoraLinear.forward
    FastLoraLinear.forward = PeftLinear.forward
    try:
        peft_out, peft_grads = run()
    finally:
        FastLoraLinear.forward = original
    torch.testing.assert_close(fast_out, peft_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(fast_grads, peft_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
