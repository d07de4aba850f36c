"""Fused fp32-island kernels vs the model's torch code, forward and gradients (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from longcat_dist.kernels import fused_block
from longcat_dist.kernels.fused_block import fused_gated_add, fused_modulate, fused_rms_norm, fused_rope
from longcat_dist.model import layers
from longcat_dist.model.layers import NORM_EPS, LayerNormFp32, RMSNormFp32, modulate
from longcat_dist.model.rope import apply_rope, rope_angles
from longcat_dist.model.transformer import TINY_DIT, DiTConfig, LongCatVideoTransformer3DModel, _gated_add

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16, FP32 = torch.bfloat16, torch.float32
# bf16 outputs: at most this fraction of elements differ from the reference, and never by more than one bf16 ulp.
# The kernels compute the reference's operations in its order; only the fp32 reductions (LayerNorm mean/variance,
# RMS) are summed in another order. Measured here (interpreter vs torch on the CPU, 3 seeds): modulate 9e-5 (1 of
# 10,656 elements, in one seed), the others 0.
BF16_ULP_FRACTION = {"modulate": 2e-3, "gated_add": 0.0, "rms_norm": 2e-3, "rope": 0.0}
# Gradients of bf16 inputs: the same reductions, plus per-frame / weight sums in another order.
BF16_GRAD_TOL = dict(rtol=2e-2, atol=2e-2)
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
FP32_GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns as integers that count ulps across zero."""
    bits = t.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_within_one_ulp(
    name: str, out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor | None = None
) -> float:
    """Assert bf16 out and ref differ by at most one ulp on at most BF16_ULP_FRACTION[name]; return the fraction.

    magnitude: for a result that is a sum (modulate's normed·(1 + scale) + shift), the size of its terms; one ulp
    is then counted at that size, because a sum that cancels to near zero carries the terms' rounding, not its own.
    """
    out, ref = out.cpu(), ref.cpu()
    distance = (_ordered(out) - _ordered(ref)).abs()
    fraction = (distance > 0).float().mean().item()
    if magnitude is None:
        assert distance.max().item() <= 1, f"{name}: {distance.max().item()} bf16 ulps apart"
    else:
        excess = (out.float() - ref.float()).abs() - magnitude.cpu().float() * 2.0**-7
        assert excess.max().item() <= 0, f"{name}: differs by more than one bf16 ulp of its terms"
    assert fraction <= BF16_ULP_FRACTION[name], f"{name}: {fraction:.4f} of elements one ulp apart"
    return fraction


def check_forward(name: str, out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == BF16:
        assert_within_one_ulp(name, out, ref, magnitude)
    else:
        torch.testing.assert_close(out, ref, **FP32_TOL)


def modulate_terms(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frames: int) -> torch.Tensor:
    """|normed·(1 + scale)| + |shift| in fp32: the size of the two terms modulate adds, per element of its output."""
    normed = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=NORM_EPS)
    normed = normed.view(x.shape[0], frames, -1, x.shape[-1])
    return ((normed * (1 + scale)).abs() + shift.abs()).view(x.shape)


def check_gradients(inputs: list[torch.Tensor], fused_out, ref_out) -> None:
    """Backpropagate the same random gradient through both outputs and compare every input's gradient."""
    grad = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(7)).to(ref_out)
    fused = torch.autograd.grad(fused_out, inputs, grad)
    ref = torch.autograd.grad(ref_out, inputs, grad)
    for got, want in zip(fused, ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        tol = FP32_GRAD_TOL if want.dtype == FP32 else BF16_GRAD_TOL
        torch.testing.assert_close(got.float(), want.float(), **tol)


def randn(*shape, dtype=FP32, seed=0, scale=1.0):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return t.to(DEVICE, dtype).requires_grad_()


# B = 2, 3 frames of 37 tokens (two FRAME_ROWS chunks, the second ragged), C = 48 (a ragged 64-wide block).
FRAME_SHAPE = (2, 3, 37, 48)


def frame_inputs(dtype):
    batch, frames, per_frame, channels = FRAME_SHAPE
    x = randn(batch, frames * per_frame, channels, dtype=dtype, seed=1, scale=3.0)
    # Per-frame vectors as chunks of one [B, T, 1, 3C] projection, strided like the block's.
    mod = randn(batch, frames, 1, 3 * channels, seed=2, scale=0.5)
    return x, mod, frames


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_modulate_matches_reference(dtype):
    x, mod, frames = frame_inputs(dtype)
    shift, scale, _ = mod.chunk(3, dim=-1)
    norm = LayerNormFp32(x.shape[-1], elementwise_affine=False)
    out = fused_modulate(x, shift, scale, frames, NORM_EPS)
    ref = modulate(norm, x, shift, scale, frames)
    check_forward("modulate", out, ref)
    check_gradients([x, mod], out, ref)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_gated_add_matches_reference(dtype):
    x, mod, frames = frame_inputs(dtype)
    gate = mod.chunk(3, dim=-1)[2]
    update = randn(*x.shape, dtype=dtype, seed=3)
    out = fused_gated_add(x, gate, update, frames)
    ref = _gated_add(x, gate, update, frames)
    check_forward("gated_add", out, ref)
    check_gradients([x, mod, update], out, ref)


def head_views(dtype, head_dim, seed=4):
    """q and k as the self-attention gets them: strided [B, nh, N, hd] views of a [B, N, 3, nh, hd] projection.

    40 tokens: two HEAD_ROWS tiles, the second ragged; the grid (2, 4, 5) for the RoPE table.
    """
    qkv = randn(2, 40, 3, 2, head_dim, dtype=dtype, seed=seed, scale=2.0)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return qkv, q, k, (2, 4, 5)


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_rms_norm_matches_reference(dtype, head_dim):
    qkv, q, _, _ = head_views(dtype, head_dim)
    norm = RMSNormFp32(head_dim).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.mul_(randn(head_dim, dtype=dtype, seed=5).detach())
    out = fused_rms_norm(q, norm.weight, NORM_EPS)
    ref = norm(q)
    check_forward("rms_norm", out, ref)
    check_gradients([qkv, norm.weight], out, ref)


def test_rms_norm_of_packed_text_keys_matches_reference():
    # Cross-attention keys: [ΣL, nh, hd] strided out of the packed kv projection; a frozen weight.
    kv = randn(45, 2, 2, 32, dtype=BF16, seed=6)
    norm = RMSNormFp32(32).to(DEVICE, BF16).requires_grad_(False)
    out = fused_rms_norm(kv[:, 0], norm.weight, NORM_EPS)
    ref = norm(kv[:, 0])
    check_forward("rms_norm", out, ref)
    check_gradients([kv], out, ref)


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_rope_matches_reference(dtype, head_dim):
    qkv, _, k, grid = head_views(dtype, head_dim)
    angles = rope_angles(head_dim, grid).to(DEVICE)
    out = fused_rope(k, angles.cos(), angles.sin())
    ref = apply_rope(k, angles.cos(), angles.sin())
    check_forward("rope", out, ref)
    check_gradients([qkv], out, ref)


def test_rope_backward_takes_each_sine_from_its_own_column():
    # rope_angles repeats each angle over a pair; random angles check the transposed rotation in general.
    qkv, q, _, _ = head_views(FP32, 16)
    angles = torch.rand(40, 16, generator=torch.Generator().manual_seed(8)).to(DEVICE) * 6
    check_gradients([qkv], fused_rope(q, angles.cos(), angles.sin()), apply_rope(q, angles.cos(), angles.sin()))


def test_row_at_a_time_as_on_gpu_matches_reference(monkeypatch):
    # At C = 4096 a program walks its tokens one row per step; force that path (and 4-token chunks) at C = 48.
    monkeypatch.setattr(fused_block, "ROW_TILE_VALUES", 1)
    monkeypatch.setattr(fused_block, "FRAME_ROWS", 4)
    x = randn(2, 3 * 10, 48, dtype=BF16, seed=1, scale=3.0)
    mod = randn(2, 3, 1, 3 * 48, seed=2, scale=0.5)
    update = randn(*x.shape, dtype=BF16, seed=3)
    shift, scale, gate = mod.chunk(3, dim=-1)
    out = fused_modulate(x, shift, scale, 3, NORM_EPS)
    ref = modulate(LayerNormFp32(48, elementwise_affine=False), x, shift, scale, 3)
    check_forward("modulate", out, ref)
    check_gradients([x, mod], out, ref)
    check_gradients([x, mod, update], fused_gated_add(x, gate, update, 3), _gated_add(x, gate, update, 3))


def test_bad_frames_are_reported():
    x, mod, _ = frame_inputs(FP32)
    shift, scale, _ = mod.chunk(3, dim=-1)
    with pytest.raises(ValueError, match="frames=4 must divide"):
        fused_modulate(x, shift, scale, 4, NORM_EPS)


def test_switch_is_off_by_default_cuda_only_and_kept_across_backends():
    model = LongCatVideoTransformer3DModel(DiTConfig(**TINY_DIT))
    assert not model.attention.fused_elementwise  # opt-in until measured on the GPU
    assert not layers.use_fused_elementwise(torch.zeros(1), True)  # the CPU keeps the torch path
    model.set_fused_elementwise(True)
    model.set_attention_backend("sdpa")
    assert model.attention.fused_elementwise


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_tiny_model_with_fused_islands_matches_torch_path(monkeypatch, dtype):
    torch.manual_seed(0)
    model = LongCatVideoTransformer3DModel(DiTConfig(**TINY_DIT)).to(DEVICE, dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.set_attention_backend("sdpa")
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 3, 4, 6, generator=gen).to(DEVICE)
    timesteps = (torch.rand(2, 3, generator=gen) * 1000).to(DEVICE)
    text = torch.randn(2, 1, 5, 32, generator=gen).to(DEVICE)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device=DEVICE)

    def run(fused: bool):
        model.set_fused_elementwise(fused)
        model.zero_grad()
        out = model(latents, timesteps, text, mask, num_cond_latents=1)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    ref_out, ref_grads = run(False)
    monkeypatch.setattr(layers, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    out, grads = run(True)
    # Largest difference relative to the largest value. Measured: fp32 1.2e-6; bf16 2e-3 for the output (under one
    # ulp of it) and 9e-3 for the gradients, where the kernels' rare one-ulp differences pass through bf16 layers.
    # On CUDA the patch embedder's Conv3d runs in TF32 (cuDNN's default): measured 5.8e-5 for its weight gradient.
    bound = (1e-5 if DEVICE == "cpu" else 2e-4) if dtype == FP32 else 3e-2
    for name, got, want in [("output", out, ref_out), *((n, grads[n], ref_grads[n]) for n in grads)]:
        error = (got.float() - want.float()).abs().max() / want.float().abs().max()
        assert error <= bound, f"{name}: {error:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_shape_on_gpu_matches_reference():
    # One frame-row chunk of the production layout: 4 frames of 1,560 tokens, C = 4096, 32 heads of 128.
    x = randn(1, 4 * 1560, 4096, dtype=BF16, seed=1, scale=3.0)
    mod = randn(1, 4, 1, 3 * 4096, seed=2, scale=0.5)
    shift, scale, gate = mod.chunk(3, dim=-1)
    out = fused_modulate(x, shift, scale, 4, NORM_EPS)
    ref = modulate(LayerNormFp32(4096, elementwise_affine=False), x, shift, scale, 4)
    # Measured on the H200: 2e-5 of the elements differ, all within one ulp of the terms (up to 64 ulps of a
    # result that cancels to near zero).
    check_forward("modulate", out, ref, modulate_terms(x, shift, scale, 4))
    check_gradients([x, mod], out, ref)
    check_forward("gated_add", fused_gated_add(x, gate, out, 4), _gated_add(x, gate, out, 4))
    qkv = randn(1, 4 * 1560, 3, 32, 128, dtype=BF16, seed=3, scale=2.0)
    q = qkv.permute(2, 0, 3, 1, 4)[0]
    norm = RMSNormFp32(128).to(DEVICE, BF16)
    check_forward("rms_norm", fused_rms_norm(q, norm.weight, NORM_EPS), norm(q))
    angles = rope_angles(128, (4, 30, 52))
    cos, sin = angles.to(q.device).cos(), angles.to(q.device).sin()
    check_forward("rope", fused_rope(q, cos, sin), apply_rope(q, cos, sin))
    check_gradients([qkv], fused_rope(q, cos, sin), apply_rope(q, cos, sin))
