"""3-D rotary position embedding of the DiT's self-attention (spec §2.5).

The head dim is split into (t, h, w) parts of 44/42/42 for hd = 128; each part is a standard RoPE over that axis'
integer positions with base 10000, and pairs are interleaved (GPT-J style). The angle tables are built on the CPU in
fp32 and cached per grid: the official model does so, and building them on the GPU changes bf16 outputs (§2.12);
their cos and sin are then taken once per grid on the device (rope_cos_sin).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

ROPE_BASE = 10000.0


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """The (t, h, w) split of the head dim: h and w get 2·floor(hd/6) each, t the rest."""
    if head_dim % 8 != 0:
        raise ValueError(
            f"head_dim={head_dim}: the 3-D RoPE needs a head dim divisible by 8 (hidden_size / num_heads), "
            "e.g. 128 in production or 32 in the tiny test model"
        )
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(num_positions: int, dim: int) -> Tensor:
    """Angles [num_positions, dim] of one axis, each frequency repeated twice (interleaved pairs)."""
    # device="cpu" explicitly, so that a default-device context (torch.device("cuda")) cannot move the build.
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    inv_freq = 1.0 / ROPE_BASE**exponents  # [dim/2]
    positions = torch.arange(num_positions, dtype=torch.float32, device="cpu")
    angles = torch.outer(positions, inv_freq)  # [n, dim/2]
    return angles.repeat_interleave(2, dim=1)


@functools.lru_cache(maxsize=32)
def rope_angles(head_dim: int, grid: tuple[int, int, int]) -> Tensor:
    """Per-token angle table [T·Hp·Wp, head_dim] (fp32, CPU) for a (T, Hp, Wp) grid in (t, h, w) raster order."""
    frames, height, width = grid
    dim_t, dim_h, dim_w = rope_dims(head_dim)
    ang_t = _axis_angles(frames, dim_t)[:, None, None, :].expand(frames, height, width, dim_t)
    ang_h = _axis_angles(height, dim_h)[None, :, None, :].expand(frames, height, width, dim_h)
    ang_w = _axis_angles(width, dim_w)[None, None, :, :].expand(frames, height, width, dim_w)
    table = torch.cat([ang_t, ang_h, ang_w], dim=-1).reshape(frames * height * width, head_dim)
    return table.contiguous()


def rotate_pairs(x: Tensor) -> Tensor:
    """rot(x): (x0, x1) -> (-x1, x0) for every interleaved pair of the last dim."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


@functools.lru_cache(maxsize=8)
def rope_cos_sin(head_dim: int, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin [T·Hp·Wp, head_dim] fp32 of rope_angles, on `device`, computed there by torch and cached per grid.

    The reference takes cos/sin of the CPU-built table on the device (§2.12 rule 6); building them once per grid
    removes a 19 MB host-to-device copy and two transcendental passes from every attention call.
    """
    # Normal tensors even when first asked for under inference_mode (validation), so training may save them.
    with torch.inference_mode(False), torch.no_grad():
        angles = rope_angles(head_dim, grid).clone().to(device)
        return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, fused: bool = False) -> Tensor:
    """Rotate x [B, nh, N, hd] by the tables cos, sin [N, hd] (fp32, on x's device) in fp32; keeps x's dtype.

    fused: one Triton kernel (longcat_dist.kernels.fused_block) instead of the torch ops.
    """
    if fused:
        from longcat_dist.kernels.fused_block import fused_rope

        return fused_rope(x, cos, sin)
    x32 = x.float()
    return (x32 * cos + rotate_pairs(x32) * sin).to(x.dtype)
