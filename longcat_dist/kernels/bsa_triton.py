"""Triton kernels of block-sparse attention: forward, dQ (+ the row terms Δ), dK/dV (spec §3.3-3.4, own design).

One program owns one 3-D block (a tile of BLOCK = t·h·w tokens) of one (batch, head). The program's own block is
gathered from q/k/v in place: its rows are computed from its (block-t, block-h, block-w) position, and rows past
the grid edge or past the cond/noise boundary are masked, so ragged grids need no padded inputs.

The blocks a program loops over (the selected K/V blocks of the forward and dQ, the Q/dO blocks that picked a
key block in dK/dV) come from block-major copies instead: [B·nh·M·BLOCK, hd], each block's rows contiguous and
zero-padded to BLOCK, so a loop step is one contiguous (TMA on Hopper) load instead of a 3-D gather. `pack_kv`
makes the K/V copies; the dQ kernel writes the Q, dO, lse and Δ copies of its own block as it goes. Padded keys
are masked by a per-slot bias (0 or -inf), padded queries by lse = +inf. Every block holds at least one real
token, so every real query row sees at least one finite score.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from longcat_dist.kernels.bsa_select import BlockGrid, BlockSelection


class Launch(NamedTuple):
    """Launch settings of one kernel: tile width in tokens (whole blocks per loop step), warps, pipeline depth,
    and optionally a cap on registers per thread (more programs per SM when the compiler fits under it)."""

    tile_tokens: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None


class PackedKV(NamedTuple):
    """Block-major copies of K and V ([B·nh·M·BLOCK, hd], zeros in padding rows) and the additive key bias of
    every slot of one (batch, head) ([M·BLOCK] float32: 0 for a real token, -inf for padding)."""

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor


class PackedRows(NamedTuple):
    """Block-major copies of what dK/dV loops over, written by the dQ kernel: Q and dO [B·nh·M·BLOCK, hd]
    (zeros in padding), the base-2 lse (+inf in padding) and Δ (0 in padding) [B·nh·M·BLOCK] float32."""

    q: torch.Tensor
    do: torch.Tensor
    lse: torch.Tensor
    delta: torch.Tensor


# Per head dim, measured with bf16 at the training shape (bench/attention.py --sweep; see docs/perf_attention.md):
# H100 for all, H200 again for head dim 128 (block-major loads, 2026-12-03). One 64-token block is the natural
# wgmma m64 tile, so one warpgroup (4 warps) per program; stages hide the latency of the looped-over loads. At head
# dim 128 a cap of 168 registers per thread makes the forward 3 % and dQ 2 % faster, and dK/dV 2.6x slower.
FWD_LAUNCH = {32: Launch(64, 4, 3), 64: Launch(64, 4, 3), 128: Launch(64, 4, 2, 168)}
DQ_LAUNCH = {32: Launch(64, 4, 2), 64: Launch(64, 4, 2), 128: Launch(64, 4, 2, 168)}
DKDV_LAUNCH = {32: Launch(64, 4, 2), 64: Launch(64, 4, 2), 128: Launch(64, 4, 2)}

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """tl.dot, with the operands upcast to float32 under TRITON_INTERPRET: Triton 3.9's interpreter multiplies
    bf16 as raw uint16. The operands are already rounded to the input dtype, so results match the GPU's MMA."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


@triton.jit
def block_rows(
    block, local, T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks,
    CHUNK_T: tl.constexpr, CHUNK_H: tl.constexpr, CHUNK_W: tl.constexpr,
):  # fmt: skip
    """Token rows of tile entries `local` (offsets inside a block) of `block` (scalar or per entry), and which of
    them are real (see bsa_select for the block layout)."""
    # Rows run in (t, h, w) order inside the block; the compiler hoists the loop-invariant part.
    local_t = local // (CHUNK_H * CHUNK_W)
    local_h = (local // CHUNK_W) % CHUNK_H
    local_w = local % CHUNK_W
    bt = block // (hblocks * wblocks)
    bh = (block // wblocks) % hblocks
    bw = block % wblocks
    is_cond = bt < cond_tblocks
    t0 = tl.where(is_cond, bt * CHUNK_T, n_cond + (bt - cond_tblocks) * CHUNK_T)
    t_end = tl.where(is_cond, n_cond, T)
    h0 = bh * CHUNK_H
    w0 = bw * CHUNK_W
    rows = ((t0 + local_t) * Hp + h0 + local_h) * Wp + w0 + local_w
    valid = (local_t < t_end - t0) & (local_h < Hp - h0) & (local_w < Wp - w0)
    return rows, valid


@triton.jit
def _listed_slots(LIST, start, end, base, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """The GROUP (1 or 2) blocks LIST[start : start + GROUP] side by side in one tile: their slots in one
    (batch, head)'s tables (block·BLOCK + local), the first block's first row in the block-major copies
    ((base + block)·BLOCK), and which entries are listed (a second block at or past `end` is not: the last step
    of an odd-length list)."""
    local = tl.arange(0, BLOCK)
    first = tl.load(LIST + start)
    slots = first * BLOCK + local
    listed = local < BLOCK
    if GROUP == 2:
        # Clamped rather than masked: LIST[end - 1] is always in bounds, and its entries are masked out. The two
        # blocks are interleaved, which is harmless: the kernels treat a tile's rows as an unordered set.
        second = tl.load(LIST + tl.minimum(start + 1, end - 1))
        slots = tl.reshape(tl.join(slots, second * BLOCK + local), [2 * BLOCK])
        # Joined as int8: the interpreter cannot load through a mask that was joined as booleans.
        second_listed = tl.full([BLOCK], 1, tl.int8) * (start + 1 < end).to(tl.int8)
        listed = tl.reshape(tl.join(tl.full([BLOCK], 1, tl.int8), second_listed), [2 * BLOCK]) != 0
    return slots, (base + first) * BLOCK, listed


@triton.jit
def _packed_tile(X, XD, rows, row0, listed, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, TMA: tl.constexpr):
    """Rows `rows` of a block-major copy: one TMA load of the block at row0 (GROUP 1, TMA), else a plain load,
    masked only when a second block may be unlisted."""
    d = tl.arange(0, HEAD_DIM)
    if TMA:
        x = XD.load([row0.to(tl.int32), 0])
    elif GROUP == 2:
        x = tl.load(X + rows[:, None] * HEAD_DIM + d[None, :], mask=listed[:, None], other=0.0)
    else:
        x = tl.load(X + rows[:, None] * HEAD_DIM + d[None, :])
    return x


@triton.jit
def _pack_kernel(
    K, V, KP, VP, BIAS, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, nh, num_blocks,
    T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks,
    HEAD_DIM: tl.constexpr, CHUNK_T: tl.constexpr, CHUNK_H: tl.constexpr, CHUNK_W: tl.constexpr,
):  # fmt: skip
    """One block of K and V (any strides) into its slot of the block-major copies; the (batch, head) 0 programs
    also write the block's key bias."""
    BLOCK: tl.constexpr = CHUNK_T * CHUNK_H * CHUNK_W
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    local = tl.arange(0, BLOCK)
    rows, valid = block_rows(
        block, local, T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks, CHUNK_T, CHUNK_H, CHUNK_W
    )
    slot_rows = ((bh.to(tl.int64) * num_blocks + block) * BLOCK + local)[:, None] * HEAD_DIM + d[None, :]
    mask = valid[:, None]
    k = tl.load(K + b * s_kb + h * s_kh + rows[:, None] * s_kn + d[None, :], mask=mask, other=0.0)
    tl.store(KP + slot_rows, k)
    v = tl.load(V + b * s_vb + h * s_vh + rows[:, None] * s_vn + d[None, :], mask=mask, other=0.0)
    tl.store(VP + slot_rows, v)
    if bh == 0:
        tl.store(BIAS + block * BLOCK + local, tl.where(valid, 0.0, float("-inf")))


@triton.jit
def _cond_slots(LIST, start, end, BLOCK: tl.constexpr, COND_ROWS: tl.constexpr, TILE: tl.constexpr):
    """TILE // COND_ROWS cond blocks LIST[start : ...] side by side in one tile, COND_ROWS rows each: a cond
    block's real tokens are its first rows (it is short in time, the outermost axis of a block), so its slot's
    first COND_ROWS rows hold them all. Returns their slots in one (batch, head)'s tables and which are listed."""
    r = tl.arange(0, TILE)
    j = start + r // COND_ROWS
    listed = j < end
    block = tl.load(LIST + j, mask=listed, other=0)
    return block * BLOCK + r % COND_ROWS, listed


@triton.jit
def _cond_count(LIST, count, num_cond_blocks, MAX_SEL: tl.constexpr):
    """How many of the `count` listed blocks are cond blocks (the selection lists them first)."""
    j = tl.arange(0, MAX_SEL)
    listed = tl.load(LIST + j, mask=j < count, other=num_cond_blocks)
    return tl.sum((listed < num_cond_blocks).to(tl.int32), 0)


@triton.jit
def _cond_kv_tile(IDX, s, end, KP, VP, KBIAS, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, COND_ROWS: tl.constexpr, TILE: tl.constexpr):  # fmt: skip
    """K, V and key bias of the short cond blocks IDX[s : s + TILE // COND_ROWS] side by side (see _cond_slots);
    entries of blocks at or past `end` are zero keys with bias -inf."""
    d = tl.arange(0, HEAD_DIM)
    slots, listed = _cond_slots(IDX, s, end, BLOCK, COND_ROWS, TILE)
    k = tl.load(KP + slots[:, None] * HEAD_DIM + d[None, :], mask=listed[:, None], other=0.0)
    v = tl.load(VP + slots[:, None] * HEAD_DIM + d[None, :], mask=listed[:, None], other=0.0)
    return k, v, tl.load(KBIAS + slots, mask=listed, other=float("-inf"))


@triton.jit
def _listed_kv_tile(IDX, s, end, base, KP, VP, KD, VD, KBIAS, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """K, V and key bias of the GROUP blocks IDX[s : s + GROUP] (see _listed_slots and _packed_tile)."""
    slots, row0, listed = _listed_slots(IDX, s, end, base, BLOCK, GROUP)
    k = _packed_tile(KP, KD, slots, row0, listed, HEAD_DIM, GROUP, TMA)
    v = _packed_tile(VP, VD, slots, row0, listed, HEAD_DIM, GROUP, TMA)
    return k, v, tl.load(KBIAS + slots, mask=listed, other=float("-inf"))


@triton.jit
def _fwd_step(q, k, v, k_bias, m_i, l_i, acc, scale_log2, UPCAST_DOT: tl.constexpr):
    """One online-softmax step over a key tile; padded (and unlisted) keys get -inf through the additive bias."""
    qk = _dot(q, tl.trans(k), UPCAST_DOT) * scale_log2 + k_bias[None, :]  # [BLOCK, tile]
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # 0 on the first step: m_i starts at -inf
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT)
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, KP, VP, KD, VD, KBIAS, Out, LSE, IDX, COUNTS, scale_log2,
    s_qb, s_qh, s_qn, s_ob, s_oh, s_on, s_ib, s_ih, s_im,
    nh, N, T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CHUNK_T: tl.constexpr, CHUNK_H: tl.constexpr,
    CHUNK_W: tl.constexpr, UPCAST_DOT: tl.constexpr, TMA: tl.constexpr, COND_ROWS: tl.constexpr,
    MAX_SEL: tl.constexpr,
):  # fmt: skip
    """Out and base-2 log-sum-exp of one q-block over its selected k-blocks (online softmax): the cond blocks
    first, several to a tile when they are short (COND_ROWS < the tile), then the rest GROUP at a time."""
    BLOCK: tl.constexpr = CHUNK_T * CHUNK_H * CHUNK_W
    TILE: tl.constexpr = GROUP * BLOCK
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    num_blocks = tl.num_programs(0)
    geometry = (T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks)
    q_rows, q_valid = block_rows(qblock, tl.arange(0, BLOCK), *geometry, CHUNK_T, CHUNK_H, CHUNK_W)
    q = tl.load(
        Q + b * s_qb + h * s_qh + q_rows[:, None] * s_qn + d[None, :], mask=q_valid[:, None], other=0.0
    )
    base = bh.to(tl.int64) * num_blocks
    KP += base * BLOCK * HEAD_DIM
    VP += base * BLOCK * HEAD_DIM
    IDX += b * s_ib + h * s_ih + qblock * s_im
    count = tl.load(COUNTS + qblock)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    first = 0
    if COND_ROWS < TILE:
        first = _cond_count(IDX, count, cond_tblocks * hblocks * wblocks, MAX_SEL)
        for s in range(0, first, TILE // COND_ROWS):
            k, v, k_bias = _cond_kv_tile(IDX, s, first, KP, VP, KBIAS, HEAD_DIM, BLOCK, COND_ROWS, TILE)
            m_i, l_i, acc = _fwd_step(q, k, v, k_bias, m_i, l_i, acc, scale_log2, UPCAST_DOT)
    for s in range(first, count, GROUP):
        k, v, k_bias = _listed_kv_tile(
            IDX, s, count, base, KP, VP, KD, VD, KBIAS, HEAD_DIM, BLOCK, GROUP, TMA
        )
        m_i, l_i, acc = _fwd_step(q, k, v, k_bias, m_i, l_i, acc, scale_log2, UPCAST_DOT)
    acc = acc / l_i[:, None]
    tl.store(
        Out + b * s_ob + h * s_oh + q_rows[:, None] * s_on + d[None, :],
        acc.to(Out.dtype.element_ty),
        mask=q_valid[:, None],
    )
    tl.store(LSE + bh.to(tl.int64) * N + q_rows, m_i + tl.math.log2(l_i), mask=q_valid)


@triton.jit
def _dq_step(q, do, k, v, k_bias, lse, delta, dq, scale_log2, UPCAST_DOT: tl.constexpr):
    """dQ's contribution of one key tile (before the softmax scale)."""
    qk = _dot(q, tl.trans(k), UPCAST_DOT) * scale_log2 + k_bias[None, :]
    p = tl.math.exp2(qk - lse[:, None])  # [BLOCK, tile]; padded rows: lse = +inf, p = 0
    dp = _dot(do, tl.trans(v), UPCAST_DOT)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, UPCAST_DOT)


@triton.jit
def _dq_kernel(
    Q, KP, VP, KD, VD, KBIAS, Out, DO, DQ, LSE, QP, DOP, LSEP, DELTAP, IDX, COUNTS, scale_log2, sm_scale,
    s_qb, s_qh, s_qn, s_ob, s_oh, s_on, s_db, s_dh, s_dn, s_gb, s_gh, s_gn, s_ib, s_ih, s_im,
    nh, N, T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CHUNK_T: tl.constexpr, CHUNK_H: tl.constexpr,
    CHUNK_W: tl.constexpr, UPCAST_DOT: tl.constexpr, TMA: tl.constexpr, COND_ROWS: tl.constexpr,
    MAX_SEL: tl.constexpr,
):  # fmt: skip
    """dQ of one q-block, key tiles as in the forward; also writes the block's slot of the block-major Q, dO,
    lse and Δ = rowsum(Out·dO), which the dK/dV kernel loops over afterwards."""
    BLOCK: tl.constexpr = CHUNK_T * CHUNK_H * CHUNK_W
    TILE: tl.constexpr = GROUP * BLOCK
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    local = tl.arange(0, BLOCK)
    num_blocks = tl.num_programs(0)
    geometry = (T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks)
    q_rows, q_valid = block_rows(qblock, local, *geometry, CHUNK_T, CHUNK_H, CHUNK_W)
    row_mask = q_valid[:, None]
    q = tl.load(Q + b * s_qb + h * s_qh + q_rows[:, None] * s_qn + d[None, :], mask=row_mask, other=0.0)
    o = tl.load(Out + b * s_ob + h * s_oh + q_rows[:, None] * s_on + d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + q_rows[:, None] * s_dn + d[None, :], mask=row_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK], 0 in padding rows
    lse = tl.load(LSE + bh.to(tl.int64) * N + q_rows, mask=q_valid, other=float("inf"))
    base = bh.to(tl.int64) * num_blocks
    slot_rows = (base + qblock) * BLOCK + local
    tl.store(QP + slot_rows[:, None] * HEAD_DIM + d[None, :], q)
    tl.store(DOP + slot_rows[:, None] * HEAD_DIM + d[None, :], do)
    tl.store(LSEP + slot_rows, lse)
    tl.store(DELTAP + slot_rows, delta)
    KP += base * BLOCK * HEAD_DIM
    VP += base * BLOCK * HEAD_DIM
    IDX += b * s_ib + h * s_ih + qblock * s_im
    count = tl.load(COUNTS + qblock)
    dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    first = 0
    if COND_ROWS < TILE:
        first = _cond_count(IDX, count, cond_tblocks * hblocks * wblocks, MAX_SEL)
        for s in range(0, first, TILE // COND_ROWS):
            k, v, k_bias = _cond_kv_tile(IDX, s, first, KP, VP, KBIAS, HEAD_DIM, BLOCK, COND_ROWS, TILE)
            dq = _dq_step(q, do, k, v, k_bias, lse, delta, dq, scale_log2, UPCAST_DOT)
    for s in range(first, count, GROUP):
        k, v, k_bias = _listed_kv_tile(
            IDX, s, count, base, KP, VP, KD, VD, KBIAS, HEAD_DIM, BLOCK, GROUP, TMA
        )
        dq = _dq_step(q, do, k, v, k_bias, lse, delta, dq, scale_log2, UPCAST_DOT)
    dq *= sm_scale
    tl.store(
        DQ + b * s_gb + h * s_gh + q_rows[:, None] * s_gn + d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_mask,
    )


@triton.jit
def _dkdv_kernel(
    K, V, QP, DOP, QD, DOD, LSEP, DELTAP, DK, DV, QLIST, QOFFSETS, scale_log2, sm_scale,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_gkb, s_gkh, s_gkn, s_gvb, s_gvh, s_gvn, pairs_per_head,
    nh, T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CHUNK_T: tl.constexpr, CHUNK_H: tl.constexpr,
    CHUNK_W: tl.constexpr, UPCAST_DOT: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """dK and dV of one k-block over the q-blocks that selected it (the transposed selection), GROUP at a time.

    Grid (k-blocks, B·nh): the programs in flight share one or two heads, whose Q/dO copies then stay in L2; with
    heads fastest dK/dV is 28 % slower (docs/perf_attention.md)."""
    BLOCK: tl.constexpr = CHUNK_T * CHUNK_H * CHUNK_W
    kblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    num_blocks = tl.num_programs(0)
    geometry = (T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks)
    k_rows, k_valid = block_rows(kblock, tl.arange(0, BLOCK), *geometry, CHUNK_T, CHUNK_H, CHUNK_W)
    rows = k_rows[:, None]
    k = tl.load(K + b * s_kb + h * s_kh + rows * s_kn + d[None, :], mask=k_valid[:, None], other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + rows * s_vn + d[None, :], mask=k_valid[:, None], other=0.0)
    base = bh.to(tl.int64) * num_blocks
    QP += base * BLOCK * HEAD_DIM
    DOP += base * BLOCK * HEAD_DIM
    LSEP += base * BLOCK
    DELTAP += base * BLOCK
    QLIST += bh.to(tl.int64) * pairs_per_head
    QOFFSETS += bh.to(tl.int64) * (num_blocks + 1) + kblock
    end = tl.load(QOFFSETS + 1)
    dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for i in range(tl.load(QOFFSETS), end, GROUP):
        slots, row0, listed = _listed_slots(QLIST, i, end, base, BLOCK, GROUP)
        q = _packed_tile(QP, QD, slots, row0, listed, HEAD_DIM, GROUP, TMA)
        do = _packed_tile(DOP, DOD, slots, row0, listed, HEAD_DIM, GROUP, TMA)
        # Padded or unlisted q rows have lse = +inf, so their P is exactly 0 and they add nothing to dK/dV.
        # Padded k rows are never stored, so they need no mask here.
        lse = tl.load(LSEP + slots, mask=listed, other=float("inf"))
        delta = tl.load(DELTAP + slots, mask=listed, other=0.0)
        p_t = tl.math.exp2(
            _dot(k, tl.trans(q), UPCAST_DOT) * scale_log2 - lse[None, :]
        )  # [BLOCK, GROUP·BLOCK]
        dv += _dot(p_t.to(do.dtype), do, UPCAST_DOT)
        dp_t = _dot(v, tl.trans(do), UPCAST_DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, UPCAST_DOT)
    dk *= sm_scale
    dk_ptrs = DK + b * s_gkb + h * s_gkh + rows * s_gkn + d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=k_valid[:, None])
    dv_ptrs = DV + b * s_gvb + h * s_gvh + rows * s_gvn + d[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=k_valid[:, None])


def geometry_args(grid: BlockGrid) -> tuple[int, ...]:
    """The grid's scalars that block_rows takes, in its order."""
    T, Hp, Wp = grid.latent_shape
    return (T, Hp, Wp, grid.num_cond_latents, grid.cond_tblocks, grid.hblocks, grid.wblocks)


def chunk_kwargs(grid: BlockGrid, head_dim: int) -> dict[str, int]:
    """The compile-time tile shape of a kernel that gathers blocks with block_rows."""
    ct, ch, cw = grid.chunk_shape
    return dict(HEAD_DIM=head_dim, CHUNK_T=ct, CHUNK_H=ch, CHUNK_W=cw)


def _group(grid: BlockGrid, launch: Launch) -> int:
    # Block sizes and tile widths are powers of two, so GROUP blocks fill the tile exactly; at most two.
    return min(2, max(1, launch.tile_tokens // grid.block_size))


def _launch_kwargs(grid: BlockGrid, head_dim: int, launch: Launch, device: torch.device) -> dict[str, int]:
    registers = {} if launch.max_registers is None or interpreted() else {"maxnreg": launch.max_registers}
    group = _group(grid, launch)
    return dict(
        **chunk_kwargs(grid, head_dim),
        GROUP=group,
        UPCAST_DOT=interpreted(),
        TMA=group == 1 and uses_tma(device),
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        **registers,
    )


def _selection_kwargs(grid: BlockGrid, selection: BlockSelection, launch: Launch) -> dict[str, int]:
    """Compile-time settings of the kernels that loop over a selection: COND_ROWS, the rows that hold a cond
    block's real tokens when cond blocks are short in time (one cond latent frame: 16 of 64), so that several
    share a tile; the whole tile when they are not. MAX_SEL bounds the listed blocks per q-block."""
    cond_rows = short_cond_rows(grid)
    tile = _group(grid, launch) * grid.block_size
    return dict(
        COND_ROWS=tile if cond_rows is None else cond_rows,
        MAX_SEL=triton.next_power_of_2(selection.indices.shape[-1]),
    )


def short_cond_rows(grid: BlockGrid) -> int | None:
    """Leading rows of a block that hold all of a cond block's tokens, when that is fewer than the block: cond
    blocks span at most num_cond_latents frames, and time is a block's outermost axis. None when there are no
    cond frames or they fill whole blocks."""
    ct, ch, cw = grid.chunk_shape
    rows = triton.next_power_of_2(min(grid.num_cond_latents, ct)) * ch * cw
    return rows if 0 < grid.num_cond_latents and rows < grid.block_size else None


def issued_key_tiles(selection: BlockSelection, grid: BlockGrid, launch: Launch) -> torch.Tensor:
    """Key tiles the forward (or dQ) kernel runs over all (batch, head, q-block) rows, as a 0-d int64 tensor:
    the short cond blocks TILE // COND_ROWS to a tile, the rest GROUP to a tile (see _selection_kwargs)."""
    group, cond_rows = _group(grid, launch), short_cond_rows(grid)
    counts = selection.counts.long()  # [M]
    if cond_rows is None:
        return (-(-counts // group)).sum() * selection.indices.shape[0] * selection.indices.shape[1]
    used = torch.arange(selection.indices.shape[-1], device=counts.device) < counts[:, None]
    cond = ((selection.indices < grid.num_cond_blocks) & used).sum(-1)  # [B, nh, M]
    per_tile = group * grid.block_size // cond_rows
    return (-(-cond // per_tile) + -(-(counts - cond) // group)).sum()


def interpreted() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels then run on the CPU, in numpy)."""
    return isinstance(_fwd_kernel, InterpretedFunction)


def uses_tma(device: torch.device) -> bool:
    """Whether the kernels load whole blocks through TMA descriptors: on Hopper and later, and under the
    interpreter (which runs them, so the CPU tests cover that path too)."""
    return interpreted() or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def _descriptors(a: torch.Tensor, b: torch.Tensor, grid: BlockGrid, tma: bool) -> tuple:
    """TMA descriptors of one block of the 2-D block-major copies a and b, or the copies themselves when the
    kernel loads them with plain loads (the descriptor arguments are then unused)."""
    if not tma:
        return a, b
    from triton.tools.tensor_descriptor import TensorDescriptor

    block = [grid.block_size, a.shape[-1]]
    return TensorDescriptor.from_tensor(a, block), TensorDescriptor.from_tensor(b, block)


def pack_kv(k: torch.Tensor, v: torch.Tensor, grid: BlockGrid) -> PackedKV:
    """Block-major copies of k, v [B, nh, N, hd] (any strides with a contiguous head dim), in one launch."""
    B, nh, _, hd = k.shape
    rows = B * nh * grid.num_blocks * grid.block_size
    kp = torch.empty(rows, hd, device=k.device, dtype=k.dtype)
    vp = torch.empty(rows, hd, device=v.device, dtype=v.dtype)
    bias = torch.empty(grid.num_blocks * grid.block_size, device=k.device, dtype=torch.float32)
    _pack_kernel[(grid.num_blocks, B * nh)](
        k, v, kp, vp, bias, *k.stride()[:3], *v.stride()[:3], nh, grid.num_blocks, *geometry_args(grid),
        **chunk_kwargs(grid, hd), num_warps=4,
    )  # fmt: skip
    return PackedKV(kp, vp, bias)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: BlockGrid, selection: BlockSelection
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns Out [B, nh, N, hd] (a view of token-major storage, see
    forward_token_major) and the base-2 lse [B·nh, N] float32."""
    out, lse, _ = forward_token_major(q, k, v, grid, selection)
    return out.transpose(1, 2), lse


def forward_token_major(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: BlockGrid, selection: BlockSelection
) -> tuple[torch.Tensor, torch.Tensor, PackedKV]:
    """Pack K/V, launch the forward kernel; returns Out token-major [B, N, nh, hd], the base-2 lse [B·nh, N]
    float32 and the K/V copies (which the backward can take instead of packing again).

    Token-major, so the model's merge of the heads before the output projection is a view, not a strided copy.
    """
    B, nh, N, hd = q.shape
    out = torch.empty(B, N, nh, hd, device=q.device, dtype=q.dtype)
    o = out.transpose(1, 2)  # [B, nh, N, hd] view the kernel writes through
    lse = torch.empty(B * nh, N, device=q.device, dtype=torch.float32)
    packed = pack_kv(k, v, grid)
    idx = selection.indices
    launch = FWD_LAUNCH[hd]
    kwargs = _launch_kwargs(grid, hd, launch, q.device) | _selection_kwargs(grid, selection, launch)
    _fwd_kernel[(grid.num_blocks, B * nh)](
        q, packed.k, packed.v, *_descriptors(packed.k, packed.v, grid, kwargs["TMA"]), packed.bias, o, lse, idx,
        selection.counts, _LOG2E / math.sqrt(hd), *q.stride()[:3], *o.stride()[:3], *idx.stride()[:3],
        nh, N, *geometry_args(grid), **kwargs,
    )  # fmt: skip
    return out, lse, packed


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    grid: BlockGrid,
    selection: BlockSelection,
    packed: PackedKV | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the dQ then the dK/dV kernel; returns dQ, dK, dV in the inputs' dtype. packed: the forward's K/V
    copies, if it kept them."""
    dq, rows = backward_dq(do, q, k, v, o, lse, grid, selection, packed)
    dk, dv = backward_dkdv(k, v, rows, grid, transpose_selection(selection, grid.num_blocks))
    return dq, dk, dv


def backward_dq(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    grid: BlockGrid,
    selection: BlockSelection,
    packed: PackedKV | None = None,
) -> tuple[torch.Tensor, PackedRows]:
    """Pack K/V again unless `packed` holds the forward's copies, launch the dQ kernel; returns dQ and the
    block-major rows the dK/dV kernel loops over."""
    B, nh, N, hd = q.shape
    sm_scale = 1.0 / math.sqrt(hd)
    # q's strides where q is dense, else contiguous: the kernel addresses dq by its own strides.
    dq = torch.empty_like(q)
    num_rows = B * nh * grid.num_blocks * grid.block_size
    rows = PackedRows(
        q.new_empty(num_rows, hd),
        do.new_empty(num_rows, hd),
        lse.new_empty(num_rows),
        lse.new_empty(num_rows),
    )
    if packed is None:
        packed = pack_kv(k, v, grid)
    idx = selection.indices
    launch = DQ_LAUNCH[hd]
    kwargs = _launch_kwargs(grid, hd, launch, q.device) | _selection_kwargs(grid, selection, launch)
    _dq_kernel[(grid.num_blocks, B * nh)](
        q, packed.k, packed.v, *_descriptors(packed.k, packed.v, grid, kwargs["TMA"]), packed.bias, o, do, dq,
        lse, *rows, idx, selection.counts, sm_scale * _LOG2E, sm_scale,
        *q.stride()[:3], *o.stride()[:3], *do.stride()[:3], *dq.stride()[:3], *idx.stride()[:3],
        nh, N, *geometry_args(grid), **kwargs,
    )  # fmt: skip
    return dq, rows


def backward_dkdv(
    k: torch.Tensor,
    v: torch.Tensor,
    rows: PackedRows,
    grid: BlockGrid,
    transposed: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the dK/dV kernel over the transposed selection (see transpose_selection) and the block-major rows
    of backward_dq; returns dK, dV."""
    B, nh, N, hd = k.shape
    sm_scale = 1.0 / math.sqrt(hd)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    q_list, q_offsets = transposed
    kwargs = _launch_kwargs(grid, hd, DKDV_LAUNCH[hd], k.device)
    _dkdv_kernel[(grid.num_blocks, B * nh)](
        k, v, rows.q, rows.do, *_descriptors(rows.q, rows.do, grid, kwargs["TMA"]), rows.lse, rows.delta,
        dk, dv, q_list, q_offsets, sm_scale * _LOG2E, sm_scale,
        *k.stride()[:3], *v.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], q_list.shape[-1],
        nh, *geometry_args(grid), **kwargs,
    )  # fmt: skip
    return dk, dv


def transpose_selection(selection: BlockSelection, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each k-block, the ascending q-blocks that selected it, as CSR per (batch, head), without host sync.

    Returns q_list [B·nh, M·n_sel] int32 and offsets [B·nh, M+1] int32: k-block j's q-blocks are
    q_list[bh, offsets[bh, j]:offsets[bh, j+1]]; entries past offsets[bh, M] are never read. On CUDA a bitmap
    kernel (bsa_select_triton.transpose_selection_kernel, the same lists), else a sort: unused slots (value M)
    sort to the end.
    """
    if selection.indices.is_cuda:
        from longcat_dist.kernels.bsa_select_triton import transpose_selection_kernel  # imports this module

        return transpose_selection_kernel(selection.indices, selection.counts, num_blocks)
    return transpose_by_sort(selection, num_blocks)


def transpose_by_sort(selection: BlockSelection, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transpose_selection by a stable sort of the pairs by k-block (any device)."""
    B, nh, _, n_sel = selection.indices.shape
    pairs = selection.indices.reshape(B * nh, num_blocks * n_sel)  # k-block of pair (m, s) at m·n_sel + s
    k_sorted, order = torch.sort(pairs, dim=-1, stable=True)  # stable: q-blocks stay ascending per k-block
    q_list = (order // n_sel).to(torch.int32)
    bounds = (
        torch.arange(num_blocks + 1, device=pairs.device, dtype=pairs.dtype).expand(B * nh, -1).contiguous()
    )
    offsets = torch.searchsorted(k_sorted, bounds).to(torch.int32)
    return q_list, offsets
