"""Block-sparse attention for training (spec §3): top-k 3-D block selection + fused Triton forward/backward.

Semantics beyond the official kernel: any (T, Hp, Wp) grid (partial edge blocks are masked in the kernel), the
cond/noise split of spec §2.10 in one launch (cond frames chunked on their own, see bsa_select), and at least one
key block per query block, so no query ever gets the official kernel's silent zeros.
"""

from __future__ import annotations

import torch

from longcat_dist.kernels import bsa_triton
from longcat_dist.kernels.bsa_select import (
    KERNEL_DTYPES,
    KERNEL_HEAD_DIMS,
    BlockGrid,
    BlockSelection,
    check_inputs,
    select_blocks_on_grid,
)


class _BlockSparseAttention(torch.autograd.Function):
    """Thin autograd wrapper: the selection is an input (no gradient flows through it)."""

    @staticmethod
    def forward(ctx, q, k, v, grid: BlockGrid, selection: BlockSelection):
        o, lse = bsa_triton.attention_forward(q, k, v, grid, selection)
        ctx.save_for_backward(q, k, v, o, lse, *selection)
        ctx.grid = grid
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, indices, counts = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        selection = BlockSelection(indices, counts)
        dq, dk, dv = bsa_triton.attention_backward(do, q, k, v, o, lse, ctx.grid, selection)
        return dq, dk, dv, None, None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    latent_shape: tuple[int, int, int],
    num_cond_latents: int = 0,
    sparsity: float = 0.9375,
    chunk_shape: tuple[int, int, int] = (4, 4, 4),
    force_diagonal: bool = False,
) -> torch.Tensor:
    """Block-sparse self-attention over a (T, Hp, Wp) token grid; q, k, v [B, nh, N, hd] bf16/fp16, RoPE applied.

    Args:
        latent_shape: (T, Hp, Wp) of the whole sequence; N = T·Hp·Wp in (t, h, w) raster order.
        num_cond_latents: leading cond frames; their queries attend only to cond keys.
        sparsity: fraction of key blocks skipped; each q-block keeps max(1, int((1 - sparsity)·Nk)).
        chunk_shape: (t, h, w) of one block; powers of two, 16..128 tokens.
        force_diagonal: always keep each q-block's own key block.
    """
    grid = check_inputs(
        "block_sparse_attention",
        {"q": q, "k": k, "v": v},
        latent_shape,
        num_cond_latents,
        sparsity,
        chunk_shape,
        KERNEL_DTYPES,
    )
    head_dim = q.shape[-1]
    if head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"block_sparse_attention: head_dim={head_dim} is not supported by the kernel; "
            f"supported: {KERNEL_HEAD_DIMS}. Use reference_block_sparse_attention for small experiments."
        )
    if q.device.type != "cuda" and not bsa_triton.interpreted():
        raise ValueError(
            f"block_sparse_attention: q is on {q.device}; the Triton kernel needs CUDA, or TRITON_INTERPRET=1 set "
            "before longcat_dist is imported (tiny CPU tests). reference_block_sparse_attention runs anywhere."
        )
    # Contiguous inputs: the backward allocates dq/dk/dv like q/k/v and addresses them with the inputs' strides,
    # so a strided view (v sliced out of the fused qkv projection) would send the gradient writes out of bounds.
    q, k, v = (x.contiguous() for x in (q, k, v))
    selection = select_blocks_on_grid(q.detach(), k.detach(), grid, sparsity, force_diagonal)
    return _BlockSparseAttention.apply(q, k, v, grid, selection)
