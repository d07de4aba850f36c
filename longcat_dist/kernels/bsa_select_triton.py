"""Triton kernel of block selection on CUDA (spec §3.2): the block means of q and k.

It computes what bsa_select.pool_blocks computes (up to float32 summation order), 2.5-4x faster at the training
shapes: it reads every block once, where the torch path builds float32 chunk sums in three passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longcat_dist.kernels.bsa_select import BlockGrid
from longcat_dist.kernels.bsa_triton import block_rows, chunk_kwargs, geometry_args


@triton.jit
def _pool_kernel(
    X, Out, s_xb, s_xh, s_xn, nh, num_blocks, T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks,
    HEAD_DIM: tl.constexpr, CHUNK_T: tl.constexpr, CHUNK_H: tl.constexpr, CHUNK_W: tl.constexpr,
):  # fmt: skip
    """Mean of one block's real tokens of one (batch, head), in float32."""
    BLOCK: tl.constexpr = CHUNK_T * CHUNK_H * CHUNK_W
    block = tl.program_id(0)
    bh = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    rows, valid = block_rows(
        block,
        tl.arange(0, BLOCK),
        T,
        Hp,
        Wp,
        n_cond,
        cond_tblocks,
        hblocks,
        wblocks,
        CHUNK_T,
        CHUNK_H,
        CHUNK_W,
    )
    X += (bh // nh).to(tl.int64) * s_xb + (bh % nh).to(tl.int64) * s_xh
    x = tl.load(X + rows[:, None] * s_xn + d[None, :], mask=valid[:, None], other=0.0)
    mean = tl.sum(x.to(tl.float32), 0) / tl.sum(valid.to(tl.float32), 0)  # [HEAD_DIM]
    tl.store(Out + (bh.to(tl.int64) * num_blocks + block) * HEAD_DIM + d, mean)


def pool_blocks_kernel(x: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """bsa_select.pool_blocks as one launch: [B, nh, N, hd] (hd a power of two) -> [B, nh, M, hd] float32."""
    B, nh, _, hd = x.shape
    out = torch.empty(B, nh, grid.num_blocks, hd, device=x.device, dtype=torch.float32)
    _pool_kernel[(grid.num_blocks, B * nh)](
        x, out, *x.stride()[:3], nh, grid.num_blocks, *geometry_args(grid), **chunk_kwargs(grid, x.shape[-1]),
    )  # fmt: skip
    return out
