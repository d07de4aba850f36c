"""Triton kernels of block selection on CUDA (spec §3.2): the block means of q and k, and the top-k of the scores.

The pooling computes what bsa_select.pool_blocks computes (up to float32 summation order), 2.5-4x faster at the
training shapes: it reads every block once, where the torch path builds float32 chunk sums in three passes. The
top-k picks the same sets as torch.topk (ties: the lowest block ids), with cond blocks listed first.
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


# One program per score row: the row (up to TOPK_KERNEL_MAX_BLOCKS columns) lives in one program's registers and
# every step of the select is a reduction across it. Warps per program: fewer warps keep more of a reduction inside
# a warp (no shared-memory round trip). 4 is what the 32-step version was timed with; bench/attention.py prints
# the time at 1, 2, 4 and 8 (topk_kernel_by_warps_ms).
TOPK_WARPS = 4


@triton.jit
def _topk_kernel(
    S, Out, num_blocks, num_cond, n_sel, n_sel_cond, COLS: tl.constexpr
):  # fmt: skip
    """The k largest of one score row's first n_cols columns, as column ids, cond columns (< num_cond) first:
    a noise row's n_sel of all columns, a cond row's n_sel_cond of the cond columns.

    A radix select, no sort: the scores' float bits map to uint32 keys in the same order; the k-th largest key is
    built from the top bit down, two bits per step; one prefix sum places the columns above it (then the first
    ties, lowest ids first) in the output.
    """
    row = tl.program_id(0).to(tl.int64)
    is_cond_row = row % num_blocks < num_cond
    n_cols = tl.where(is_cond_row, num_cond, num_blocks)
    k = tl.where(is_cond_row, n_sel_cond, n_sel)
    c = tl.arange(0, COLS)
    in_row = c < n_cols
    bits = tl.load(S + row * num_blocks + c, mask=in_row, other=0.0).to(tl.int32, bitcast=True)
    # Negative floats order backwards in their bits: flipping them all (and setting the sign bit of the others)
    # gives unsigned keys in the order of the floats; padding gets key 0, below every score.
    key = tl.where(bits < 0, ~bits, bits | -(2**31)).to(tl.uint32, bitcast=True)
    key = tl.where(in_row, key, 0)
    thr = tl.zeros([], tl.uint32)  # the largest key built so far with count(key >= thr) >= k
    # Two bits per step: the three candidates' counts share one int64 reduction (21 bits each, counts <= 1,024),
    # so 16 reductions instead of the 32 of one bit per step: the select is a chain of reductions.
    for step in tl.static_range(16):
        shift: tl.constexpr = 30 - 2 * step
        c1 = thr | tl.full([], 1 << shift, tl.uint32)  # explicit: 3 << 30 does not fit an int32 literal
        c2 = thr | tl.full([], 2 << shift, tl.uint32)
        c3 = thr | tl.full([], 3 << shift, tl.uint32)
        packed = (
            (key >= c1).to(tl.int64) + ((key >= c2).to(tl.int64) << 21) + ((key >= c3).to(tl.int64) << 42)
        )
        counts = tl.sum(packed, 0)
        n1, n2, n3 = counts & 0x1FFFFF, (counts >> 21) & 0x1FFFFF, counts >> 42
        thr = tl.where(n3 >= k, c3, tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, thr)))
    above = key > thr
    tie = key == thr
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= k - tl.sum(above.to(tl.int32), 0)))
    cond = take & (c < num_cond)
    noise = take & (c >= num_cond)
    num_cond_taken = tl.sum(cond.to(tl.int32), 0)
    slot = (
        tl.where(cond, tl.cumsum(cond.to(tl.int32), 0), num_cond_taken + tl.cumsum(noise.to(tl.int32), 0)) - 1
    )
    tl.store(Out + row * n_sel + slot, c, mask=take)


def topk_blocks_kernel(
    scores: torch.Tensor, indices: torch.Tensor, num_cond: int, n_sel: int, n_sel_cond: int
) -> None:
    """Fill indices [B, nh, M, n_sel] int32 (pre-filled with M) with the top-k of scores [B, nh, M, M] float32,
    contiguous: noise rows take n_sel of all blocks, cond rows n_sel_cond of the cond blocks; cond blocks first."""
    B, nh, M, _ = scores.shape
    _topk_kernel[(B * nh * M,)](
        scores, indices, M, num_cond, n_sel, n_sel_cond, COLS=triton.next_power_of_2(M), num_warps=TOPK_WARPS
    )


@triton.jit
def _mark_pairs_kernel(IDX, COUNTS, BITS, OFFSETS, num_blocks, n_sel, words, MAX_SEL: tl.constexpr):
    """Record the pairs of one (batch·head, q-block m) row of the selection: for each listed k-block j, bit m of
    j's row of BITS ([B·nh, M, words] int32, zeroed) and one more pair in OFFSETS[bh, j + 1] ([B·nh, M + 1]
    int32, zeroed; a prefix sum makes offsets of it). Both are order-free (or, add of ints), so the result does
    not depend on which program runs first."""
    r = tl.program_id(0)
    bh = r // num_blocks
    m = r % num_blocks
    s = tl.arange(0, MAX_SEL)
    listed = s < tl.load(COUNTS + m)
    j = tl.load(IDX + r.to(tl.int64) * n_sel + s, mask=listed, other=0)
    bit = tl.full([MAX_SEL], 1, tl.int32) << (m % 32)  # bit 31 wraps to the sign bit, as intended
    tl.atomic_or(BITS + (bh.to(tl.int64) * num_blocks + j) * words + m // 32, bit, mask=listed)
    count = OFFSETS + bh.to(tl.int64) * (num_blocks + 1) + 1 + j
    tl.atomic_add(count, tl.full([MAX_SEL], 1, tl.int32), mask=listed)


@triton.jit
def _list_pairs_kernel(BITS, OFFSETS, QLIST, num_blocks, words, pairs_per_head, WORDS: tl.constexpr):
    """Write k-block j's q-blocks, ascending, into QLIST[bh, OFFSETS[bh, j]:]: the set bits of its BITS row,
    placed by a prefix sum."""
    r = tl.program_id(0)
    bh = r // num_blocks
    w = tl.arange(0, WORDS)
    row_bits = tl.load(BITS + r.to(tl.int64) * words + w, mask=w < words, other=0)
    b = tl.arange(0, 32)
    flags = tl.reshape((row_bits[:, None] >> b[None, :]) & 1, [WORDS * 32])  # flag of q-block 32·w + b
    q = tl.arange(0, WORDS * 32)
    start = tl.load(OFFSETS + bh.to(tl.int64) * (num_blocks + 1) + r % num_blocks)
    slot = start + tl.cumsum(flags, 0) - 1
    tl.store(QLIST + bh.to(tl.int64) * pairs_per_head + slot, q, mask=flags != 0)


def transpose_selection_kernel(
    indices: torch.Tensor, counts: torch.Tensor, num_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """bsa_triton.transpose_selection in three launches and a cumsum, no sort: every pair sets one bit of a
    [k-block, q-block] bitmap per (batch, head) and counts for its k-block; offsets are the counts' prefix sums;
    each k-block's row of set bits, read in order, is its ascending q-list. Same result as the sort (the list
    past offsets[:, -1] is not written)."""
    B, nh, M, n_sel = indices.shape
    indices = indices.contiguous()
    words = -(-num_blocks // 32)
    bits = torch.zeros(B * nh, num_blocks, words, device=indices.device, dtype=torch.int32)
    offsets = torch.zeros(B * nh, num_blocks + 1, device=indices.device, dtype=torch.int32)
    _mark_pairs_kernel[(B * nh * M,)](
        indices, counts, bits, offsets, num_blocks, n_sel, words, MAX_SEL=triton.next_power_of_2(n_sel),
    )  # fmt: skip
    offsets.cumsum_(1)  # the pair counts of k-blocks 0..j-1 in column j
    q_list = torch.empty(B * nh, num_blocks * n_sel, device=indices.device, dtype=torch.int32)
    _list_pairs_kernel[(B * nh * num_blocks,)](
        bits, offsets, q_list, num_blocks, words, q_list.shape[-1], WORDS=triton.next_power_of_2(words),
    )  # fmt: skip
    return q_list, offsets
