"""Checks shared by the CPU (interpreter) and GPU tests of block-sparse attention."""

from __future__ import annotations

import torch

from longcat_dist.kernels import block_sparse_attention, reference_block_sparse_attention, select_blocks

# ‖kernel − fp32 reference‖ / ‖reference‖ allowed per input dtype: the kernel rounds P (and dS) to the input
# dtype before the second matmul and rounds its outputs, as flash attention does.
TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def random_qkv(batch, heads, num_tokens, head_dim, dtype, device, seed=0):
    """Fresh random q, k, v [B, nh, N, hd] (never zeros: they would hide unwritten outputs)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, heads, num_tokens, head_dim)
    return [
        torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_() for _ in range(3)
    ]


def assert_matches_reference(
    batch, heads, head_dim, latent_shape, dtype, device, seed=0, **kwargs
) -> torch.Tensor:
    """Forward and dQ, dK, dV of the kernel against the float32 dense reference; returns the kernel output."""
    num_tokens = latent_shape[0] * latent_shape[1] * latent_shape[2]
    q, k, v = random_qkv(batch, heads, num_tokens, head_dim, dtype, device, seed)
    out = block_sparse_attention(q, k, v, latent_shape=latent_shape, **kwargs)
    assert out.shape == q.shape and out.dtype == dtype
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    grads = torch.autograd.grad(out, (q, k, v), d_out)

    # The fp32 reference must see the same selection (selection works on exactly upcast values).
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    sel = select_blocks(q.detach(), k.detach(), latent_shape=latent_shape, **kwargs)
    sel32 = select_blocks(q32.detach(), k32.detach(), latent_shape=latent_shape, **kwargs)
    assert torch.equal(sel.indices, sel32.indices), "selection differs between bf16/fp16 and fp32 inputs"
    ref = reference_block_sparse_attention(q32, k32, v32, latent_shape=latent_shape, **kwargs)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), d_out.float())

    tol = TOLERANCE[dtype]
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        err = relative_error(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.1e}"
    return out
