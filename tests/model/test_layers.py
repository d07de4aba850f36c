"""The fp32 islands and cast orders of spec §2.12, op by op, on a bf16 model on the CPU.

Each test states the rule as fp32 maths on the same bf16 inputs and asserts bitwise equality, then shows that a
bf16 computation of the same op gives a different answer on these inputs, so a region computed in bf16 would fail.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longcat_dist.model.layers import (
    NORM_EPS,
    LayerNormFp32,
    RMSNormFp32,
    modulate,
    timestep_frequencies,
)
from tests.model.test_transformer import inputs, tiny_model

BF16 = torch.bfloat16


def bf16_model():
    return tiny_model().to(BF16)


def record_io(model, names: list[str]) -> tuple[dict, list]:
    """Forward hooks that keep (first input, output) of each named submodule; returns (records, handles)."""
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        hook = lambda mod, args, out, name=name: records.__setitem__(name, (args[0], out))  # noqa: E731
        handles.append(module.register_forward_hook(hook))
    return records, handles


FP32_LINEARS = [
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "blocks.0.adaLN_modulation.1",
    "blocks.1.adaLN_modulation.1",
    "final_layer.adaLN_modulation.1",
    "final_layer.linear",
]


def test_fp32_linears_run_in_fp32_on_upcast_bf16_weights_inside_the_forward():
    model = bf16_model()
    latents, timesteps, text = inputs()
    records, handles = record_io(model, FP32_LINEARS)
    with torch.no_grad():
        model(latents, timesteps, text, num_cond_latents=1)
    for handle in handles:
        handle.remove()
    for name in FP32_LINEARS:
        x, out = records[name]
        weight, bias = model.get_submodule(name).weight, model.get_submodule(name).bias
        assert weight.dtype == BF16, name
        # final_layer.linear's input is the bf16 modulated activation (upcast inside); the others get fp32.
        assert x.dtype == (BF16 if name == "final_layer.linear" else torch.float32), name
        assert out.dtype == torch.float32, name
        assert torch.equal(out, F.linear(x.float(), weight.float(), bias.float())), name
        in_bf16 = F.linear(x.to(BF16), weight, bias).float()
        assert not torch.equal(out, in_bf16), f"{name}: a bf16 Linear would give the same answer"


def test_timestep_mlp_input_is_the_fp32_sinusoid_of_bf16_rounded_timesteps():
    model = bf16_model()
    timesteps = torch.tensor([[0.0, 998.27, 333.3]])
    records, handles = record_io(model, ["t_embedder.mlp.0"])
    t_emb = model._embed_timesteps(timesteps, 1, 3)
    handles[0].remove()
    half = model.config.frequency_embedding_size // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps.to(BF16).float().flatten()[:, None] * freqs[None]
    assert torch.equal(records["t_embedder.mlp.0"][0], torch.cat([args.cos(), args.sin()], -1))
    assert t_emb.dtype == torch.float32 and t_emb.shape == (1, 3, model.config.adaln_tembed_dim)


def test_frequency_table_is_built_on_the_cpu_whatever_the_default_device():
    with torch.device("meta"):
        freqs = timestep_frequencies(64)
    assert freqs.device.type == "cpu" and freqs.dtype == torch.float32
    assert torch.equal(freqs, timestep_frequencies(64))


def test_modulate_is_fp32_maths_with_one_cast_at_the_end():
    gen = torch.Generator().manual_seed(0)
    frames, per_frame, channels = 3, 8, 64
    x = (torch.randn(2, frames * per_frame, channels, generator=gen) * 3).to(BF16)
    shift = torch.randn(2, frames, 1, channels, generator=gen)
    scale = torch.randn(2, frames, 1, channels, generator=gen)
    norm = LayerNormFp32(channels, elementwise_affine=False)
    out = modulate(norm, x, shift, scale, frames)
    normed = F.layer_norm(x.float(), (channels,), eps=NORM_EPS).view(2, frames, per_frame, channels)
    expected = (normed * (1 + scale) + shift).view_as(x).to(BF16)
    assert out.dtype == BF16 and torch.equal(out, expected)
    # Rounding the norm or shift/scale to bf16 first changes the result.
    normed_bf16 = normed.to(BF16)
    in_bf16 = (normed_bf16 * (1 + scale.to(BF16)) + shift.to(BF16)).view_as(x)
    assert not torch.equal(out, in_bf16)
    assert not torch.equal(out, (normed_bf16.float() * (1 + scale) + shift).view_as(x).to(BF16))


def test_rms_norm_rounds_to_bf16_before_the_weight_multiply():
    gen = torch.Generator().manual_seed(0)
    norm = RMSNormFp32(32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=gen) + 1)
    norm = norm.to(BF16)
    x = (torch.randn(4, 2, 16, 32, generator=gen) * 5).to(BF16)
    x32 = x.float()
    normed32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + NORM_EPS)
    out = norm(x)
    assert out.dtype == BF16
    assert torch.equal(out, normed32.to(BF16) * norm.weight)  # spec order: fp32 norm -> bf16 -> bf16 weight
    assert not torch.equal(out, (normed32 * norm.weight.float()).to(BF16))  # weight applied in fp32
    x_bf16_rms = torch.rsqrt(x.square().mean(-1, keepdim=True) + NORM_EPS)
    assert not torch.equal(out, x * x_bf16_rms * norm.weight)  # everything in bf16


def test_layer_norm_runs_in_fp32_with_upcast_affine_and_casts_back():
    gen = torch.Generator().manual_seed(0)
    norm = LayerNormFp32(256, elementwise_affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256, generator=gen))
        norm.bias.copy_(torch.randn(256, generator=gen))
    norm = norm.to(BF16)
    x = (torch.randn(4, 64, 256, generator=gen) * 4 + 2).to(BF16)
    out = norm(x)
    expected = F.layer_norm(x.float(), (256,), norm.weight.float(), norm.bias.float(), NORM_EPS).to(BF16)
    assert out.dtype == BF16 and torch.equal(out, expected)
    # torch's bf16 LayerNorm also accumulates in fp32 and agrees almost everywhere: on these inputs it differs in
    # 3 of 65,536 elements, which is what tells the two apart.
    in_bf16 = F.layer_norm(x, (256,), norm.weight, norm.bias, NORM_EPS)
    assert not torch.equal(out, in_bf16)
