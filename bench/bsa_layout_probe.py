"""Probe (issue 6): the BSA kernels reading the operands they loop over (K/V for the forward and dQ, Q/dO for
dK/dV) from block-major copies, each block's 64 rows contiguous and zero-padded, instead of gathering them in
place; against the in-place kernels of bsa_triton. Prints a table of kernel times and errors.

Run on one GPU from the repo root:  PYTHONPATH=. python bench/bsa_layout_probe.py --shape train
--variants is a ';' list of MODE,WS,STAGES,WARPS: MODE 0 plain loads of the block-major copy, 1 TMA descriptor
loads of it, 2 in-place loads through a precomputed row table (no masks); WS 1 asks Triton for warp
specialization. Results and the command: docs/perf_attention.md.
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.language as tl

from bench.attention import SPARSITY, _inputs, _rel_err, time_ms
from longcat_dist.kernels import bsa_triton
from longcat_dist.kernels.bsa_select import select_blocks_on_grid
from longcat_dist.kernels.bsa_triton import block_rows, geometry_args


def block_major_rows(grid, device):
    """Token row of every block-major slot [M·BLOCK] (N for padding) and the additive key bias of each slot."""
    M, BLOCK = grid.num_blocks, grid.block_size
    blocks = torch.arange(M, device=device).repeat_interleave(BLOCK)
    local = torch.arange(BLOCK, device=device).repeat(M)
    T, Hp, Wp, n_cond, ctb, hb, wb = geometry_args(grid)
    ct, ch, cw = grid.chunk_shape
    lt, lh, lw = local // (ch * cw), (local // cw) % ch, local % cw
    bt, bh, bw = blocks // (hb * wb), (blocks // wb) % hb, blocks % wb
    cond = bt < ctb
    t0 = torch.where(cond, bt * ct, n_cond + (bt - ctb) * ct)
    t_end = torch.where(cond, torch.full_like(t0, n_cond), torch.full_like(t0, T))
    h0, w0 = bh * ch, bw * cw
    valid = (lt < t_end - t0) & (lh < Hp - h0) & (lw < Wp - w0)
    rows = ((t0 + lt) * Hp + h0 + lh) * Wp + w0 + lw
    safe = torch.where(valid, rows, rows.view(M, BLOCK)[:, :1].expand(M, BLOCK).reshape(-1)).to(torch.int32)
    rows = torch.where(valid, rows, torch.full_like(rows, grid.num_tokens))
    bias = torch.where(valid, 0.0, float("-inf")).float()
    return rows, bias, safe


def to_block_major(x, rows):
    """[B, nh, N, hd] -> contiguous [B, nh, M·BLOCK, hd], zeros in padding slots."""
    B, nh, N, hd = x.shape
    padded = torch.cat([x, x.new_zeros(B, nh, 1, hd)], dim=2)
    return padded.index_select(2, rows)


@triton.jit
def _gather_kernel(
    X, Y, s_xb, s_xh, s_xn, nh, NB, T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks,
    HEAD_DIM: tl.constexpr, CHUNK_T: tl.constexpr, CHUNK_H: tl.constexpr, CHUNK_W: tl.constexpr,
):  # fmt: skip
    """One block of X [B, nh, N, hd] (any strides) into its slot of the block-major Y, zeros in padding rows."""
    BLOCK: tl.constexpr = CHUNK_T * CHUNK_H * CHUNK_W
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    r = tl.arange(0, BLOCK)
    rows, valid = block_rows(
        blk, r, T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks, CHUNK_T, CHUNK_H, CHUNK_W
    )
    x = tl.load(X + b * s_xb + h * s_xh + rows[:, None] * s_xn + d[None, :], mask=valid[:, None], other=0.0)
    row0 = (bh.to(tl.int64) * NB + blk) * BLOCK
    tl.store(Y + (row0 + r)[:, None] * HEAD_DIM + d[None, :], x)


def gather_block_major(x, grid):
    """Triton version of to_block_major."""
    B, nh, N, hd = x.shape
    y = torch.empty(B, nh, grid.num_blocks * grid.block_size, hd, device=x.device, dtype=x.dtype)
    ct, ch, cw = grid.chunk_shape
    _gather_kernel[(grid.num_blocks, B * nh)](
        x, y, *x.stride()[:3], nh, grid.num_blocks, *geometry_args(grid),
        HEAD_DIM=hd, CHUNK_T=ct, CHUNK_H=ch, CHUNK_W=cw, num_warps=4,
    )  # fmt: skip
    return y


@triton.jit
def _kv_tile(K, V, KD, VD, KT, VT, ROWS, slot, blk, s_kn, s_vn, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr):  # fmt: skip
    """K and V tiles of block `blk`: from the block-major copies at `slot` (MODE 0 plain loads, 1 TMA), or in
    place through the row table (MODE 2)."""
    r = tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    row0 = slot * BLOCK
    if MODE == 1:
        k = KD.load([row0.to(tl.int32), 0])
        v = VD.load([row0.to(tl.int32), 0])
    elif MODE == 2:
        k_rows = tl.load(ROWS + blk * BLOCK + r)
        k = tl.load(KT + k_rows[:, None] * s_kn + d[None, :])
        v = tl.load(VT + k_rows[:, None] * s_vn + d[None, :])
    else:
        k = tl.load(K + (row0 + r)[:, None] * HEAD_DIM + d[None, :])
        v = tl.load(V + (row0 + r)[:, None] * HEAD_DIM + d[None, :])
    return k, v


@triton.jit
def _fwd_bm_kernel(
    Q, K, V, KD, VD, KT, VT, ROWS, KBIAS, Out, LSE, IDX, COUNTS, scale_log2,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on, s_ib, s_ih, s_im,
    nh, N, NB, T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks,
    HEAD_DIM: tl.constexpr, CHUNK_T: tl.constexpr, CHUNK_H: tl.constexpr, CHUNK_W: tl.constexpr,
    MODE: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    BLOCK: tl.constexpr = CHUNK_T * CHUNK_H * CHUNK_W
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    r = tl.arange(0, BLOCK)
    geometry = (T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks)
    q_rows, q_valid = block_rows(qblock, r, *geometry, CHUNK_T, CHUNK_H, CHUNK_W)
    q = tl.load(
        Q + b * s_qb + h * s_qh + q_rows[:, None] * s_qn + d[None, :], mask=q_valid[:, None], other=0.0
    )
    IDX += b * s_ib + h * s_ih + qblock * s_im
    KT += b * s_kb + h * s_kh
    VT += b * s_vb + h * s_vh
    count = tl.load(COUNTS + qblock)
    base = bh.to(tl.int64) * NB
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for s in tl.range(0, count, num_stages=STAGES, warp_specialize=WS):
        blk = tl.load(IDX + s)
        k, v = _kv_tile(K, V, KD, VD, KT, VT, ROWS, base + blk, blk, s_kn, s_vn, HEAD_DIM, BLOCK, MODE)
        k_bias = tl.load(KBIAS + blk * BLOCK + r)
        qk = tl.dot(q, tl.trans(k)) * scale_log2 + k_bias[None, :]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        Out + b * s_ob + h * s_oh + q_rows[:, None] * s_on + d[None, :], acc.to(Out.dtype.element_ty),
        mask=q_valid[:, None],
    )  # fmt: skip
    tl.store(LSE + bh.to(tl.int64) * N + q_rows, m_i + tl.math.log2(l_i), mask=q_valid)


@triton.jit
def _dkdv_bm_kernel(
    Q, K, V, DO, QD, DOD, LSEB, DELTAB, QT, DOT, LSE, DELTA, ROWS, QBIAS, DK, DV, QLIST, QOFFSETS, scale_log2, sm_scale,
    s_qb, s_qh, s_qn, s_db, s_dh, s_dn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_gkb, s_gkh, s_gkn, s_gvb, s_gvh, s_gvn, pairs_per_head,
    nh, N, NB, T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks,
    HEAD_DIM: tl.constexpr, CHUNK_T: tl.constexpr, CHUNK_H: tl.constexpr, CHUNK_W: tl.constexpr,
    MODE: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Q, dO, lse (+inf in padding), Δ are block-major [B·nh·NB·BLOCK, ...]; K, V gathered once in place."""
    BLOCK: tl.constexpr = CHUNK_T * CHUNK_H * CHUNK_W
    kblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    r = tl.arange(0, BLOCK)
    geometry = (T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks)
    k_rows, k_valid = block_rows(kblock, r, *geometry, CHUNK_T, CHUNK_H, CHUNK_W)
    rows = k_rows[:, None]
    k = tl.load(K + b * s_kb + h * s_kh + rows * s_kn + d[None, :], mask=k_valid[:, None], other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + rows * s_vn + d[None, :], mask=k_valid[:, None], other=0.0)
    QLIST += bh.to(tl.int64) * pairs_per_head
    QOFFSETS += bh.to(tl.int64) * (NB + 1) + kblock
    QT += b * s_qb + h * s_qh
    DOT += b * s_db + h * s_dh
    LSE += bh.to(tl.int64) * N
    DELTA += bh.to(tl.int64) * N
    end = tl.load(QOFFSETS + 1)
    base = bh.to(tl.int64) * NB
    dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for i in tl.range(tl.load(QOFFSETS), end, num_stages=STAGES, warp_specialize=WS):
        qb = tl.load(QLIST + i)
        row0 = (base + qb) * BLOCK
        if MODE == 2:
            q_rows = tl.load(ROWS + qb * BLOCK + r)
            q = tl.load(QT + q_rows[:, None] * s_qn + d[None, :])
            do = tl.load(DOT + q_rows[:, None] * s_dn + d[None, :])
            lse = tl.load(LSE + q_rows) - tl.load(QBIAS + qb * BLOCK + r)
            delta = tl.load(DELTA + q_rows)
        else:
            if MODE == 1:
                q = QD.load([row0.to(tl.int32), 0])
                do = DOD.load([row0.to(tl.int32), 0])
            else:
                q = tl.load(Q + (row0 + r)[:, None] * HEAD_DIM + d[None, :])
                do = tl.load(DO + (row0 + r)[:, None] * HEAD_DIM + d[None, :])
            lse = tl.load(LSEB + row0 + r)
            delta = tl.load(DELTAB + row0 + r)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * scale_log2 - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    dk *= sm_scale
    tl.store(
        DK + b * s_gkb + h * s_gkh + rows * s_gkn + d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=k_valid[:, None],
    )
    tl.store(
        DV + b * s_gvb + h * s_gvh + rows * s_gvn + d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=k_valid[:, None],
    )


@triton.jit
def _dq_bm_kernel(
    Q, K, V, KD, VD, KT, VT, ROWS, KBIAS, Out, DO, DQ, LSE, DELTA, IDX, COUNTS, scale_log2, sm_scale,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on, s_db, s_dh, s_dn,
    s_gb, s_gh, s_gn, s_ib, s_ih, s_im,
    nh, N, NB, T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks,
    HEAD_DIM: tl.constexpr, CHUNK_T: tl.constexpr, CHUNK_H: tl.constexpr, CHUNK_W: tl.constexpr,
    MODE: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    BLOCK: tl.constexpr = CHUNK_T * CHUNK_H * CHUNK_W
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    r = tl.arange(0, BLOCK)
    geometry = (T, Hp, Wp, n_cond, cond_tblocks, hblocks, wblocks)
    q_rows, q_valid = block_rows(qblock, r, *geometry, CHUNK_T, CHUNK_H, CHUNK_W)
    row_mask = q_valid[:, None]
    q = tl.load(Q + b * s_qb + h * s_qh + q_rows[:, None] * s_qn + d[None, :], mask=row_mask, other=0.0)
    o = tl.load(Out + b * s_ob + h * s_oh + q_rows[:, None] * s_on + d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + q_rows[:, None] * s_dn + d[None, :], mask=row_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row_stats = bh.to(tl.int64) * N + q_rows
    tl.store(DELTA + row_stats, delta, mask=q_valid)
    lse = tl.load(LSE + row_stats, mask=q_valid, other=0.0)
    IDX += b * s_ib + h * s_ih + qblock * s_im
    KT += b * s_kb + h * s_kh
    VT += b * s_vb + h * s_vh
    count = tl.load(COUNTS + qblock)
    base = bh.to(tl.int64) * NB
    dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for s in tl.range(0, count, num_stages=STAGES, warp_specialize=WS):
        blk = tl.load(IDX + s)
        k, v = _kv_tile(K, V, KD, VD, KT, VT, ROWS, base + blk, blk, s_kn, s_vn, HEAD_DIM, BLOCK, MODE)
        k_bias = tl.load(KBIAS + blk * BLOCK + r)
        qk = tl.dot(q, tl.trans(k)) * scale_log2 + k_bias[None, :]
        p = tl.math.exp2(qk - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq *= sm_scale
    tl.store(
        DQ + b * s_gb + h * s_gh + q_rows[:, None] * s_gn + d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_mask,
    )


def _looped_operands(a_bm, b_bm, grid, mode):
    """The two block-major operands a kernel loops over as 2-D [rows, hd] tensors, and what its MODE reads
    them through: TMA descriptors of one block (MODE 1) or the tensors themselves."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    a2, b2 = a_bm.view(-1, a_bm.shape[-1]), b_bm.view(-1, b_bm.shape[-1])
    if mode != 1:
        return a2, b2, a2, b2
    block = [grid.block_size, a2.shape[-1]]
    return a2, b2, TensorDescriptor.from_tensor(a2, block), TensorDescriptor.from_tensor(b2, block)


def forward_bm(q, k_bm, v_bm, kbias, grid, selection, mode, ws, stages, warps, k, v, rows):
    B, nh, N, hd = q.shape
    out = torch.empty(B, N, nh, hd, device=q.device, dtype=q.dtype)
    o = out.transpose(1, 2)
    lse = torch.empty(B * nh, N, device=q.device, dtype=torch.float32)
    idx = selection.indices
    k2, v2, kd, vd = _looped_operands(k_bm, v_bm, grid, mode)
    ct, ch, cw = grid.chunk_shape
    _fwd_bm_kernel[(grid.num_blocks, B * nh)](
        q, k2, v2, kd, vd, k, v, rows, kbias, o, lse, idx, selection.counts, bsa_triton._LOG2E / math.sqrt(hd),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *idx.stride()[:3], nh, N, grid.num_blocks, *geometry_args(grid),
        HEAD_DIM=hd, CHUNK_T=ct, CHUNK_H=ch, CHUNK_W=cw, MODE=mode, WS=ws, STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return out, lse


def dkdv_bm(
    q_bm,
    do_bm,
    lse_bm,
    delta_bm,
    k,
    v,
    grid,
    transposed,
    mode,
    ws,
    stages,
    warps,
    q,
    do,
    lse,
    delta,
    rows,
    kbias,
):
    B, nh, N, hd = k.shape
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    q2, do2, qd, dod = _looped_operands(q_bm, do_bm, grid, mode)
    q_list, q_offsets = transposed
    ct, ch, cw = grid.chunk_shape
    sm_scale = 1.0 / math.sqrt(hd)
    _dkdv_bm_kernel[(grid.num_blocks, B * nh)](
        q2, k, v, do2, qd, dod, lse_bm, delta_bm, q, do, lse, delta, rows, kbias, dk, dv, q_list, q_offsets,
        sm_scale * bsa_triton._LOG2E, sm_scale, *q.stride()[:3], *do.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], q_list.shape[-1],
        nh, N, grid.num_blocks, *geometry_args(grid),
        HEAD_DIM=hd, CHUNK_T=ct, CHUNK_H=ch, CHUNK_W=cw, MODE=mode, WS=ws, STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return dk, dv


def dq_bm(q, k_bm, v_bm, kbias, o, do, lse, grid, selection, mode, ws, stages, warps, k, v, rows):
    B, nh, N, hd = q.shape
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    idx = selection.indices
    k2, v2, kd, vd = _looped_operands(k_bm, v_bm, grid, mode)
    ct, ch, cw = grid.chunk_shape
    sm_scale = 1.0 / math.sqrt(hd)
    _dq_bm_kernel[(grid.num_blocks, B * nh)](
        q, k2, v2, kd, vd, k, v, rows, kbias, o, do, dq, lse, delta, idx, selection.counts,
        sm_scale * bsa_triton._LOG2E, sm_scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        *idx.stride()[:3], nh, N, grid.num_blocks, *geometry_args(grid),
        HEAD_DIM=hd, CHUNK_T=ct, CHUNK_H=ch, CHUNK_W=cw, MODE=mode, WS=ws, STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return dq, delta


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="train")
    parser.add_argument("--variants", default="2,0,2,4;2,0,3,4;0,0,2,4;1,0,2,4;1,0,3,4")
    parser.add_argument("--check-only", action="store_true")
    args = parser.parse_args()
    q, k, v, do, grid = _inputs(args.shape, "random")
    run_suite(q, k, v, do, grid, SPARSITY, args.variants, args.check_only)


def run_suite(q, k, v, do, grid, sparsity, variants, check_only):
    timed = (lambda fn: 0.0) if check_only else time_ms
    selection = select_blocks_on_grid(q, k, grid, sparsity, False)
    rows, kbias, safe = block_major_rows(grid, q.device)
    o_ref, lse_ref = bsa_triton.forward_token_major(q, k, v, grid, selection)
    o4 = o_ref.transpose(1, 2)
    dq_ref, delta = bsa_triton.backward_dq(do, q, k, v, o4, lse_ref, grid, selection)
    transposed = bsa_triton.transpose_selection(selection, grid.num_blocks)
    dk_ref, dv_ref = bsa_triton.backward_dkdv(do, q, k, v, lse_ref, delta, grid, transposed)
    table = [
        ("reference fwd", timed(lambda: bsa_triton.forward_token_major(q, k, v, grid, selection)), 0.0),
        (
            "reference dq",
            timed(lambda: bsa_triton.backward_dq(do, q, k, v, o4, lse_ref, grid, selection)),
            0.0,
        ),
        (
            "reference dkdv",
            timed(lambda: bsa_triton.backward_dkdv(do, q, k, v, lse_ref, delta, grid, transposed)),
            0.0,
        ),
        ("to_block_major, torch index_select (one tensor)", timed(lambda: to_block_major(k, rows)), 0.0),
        ("to_block_major, Triton gather (one tensor)", timed(lambda: gather_block_major(k, grid)), 0.0),
        ("gather error", 0.0, _rel_err(gather_block_major(k, grid), to_block_major(k, rows))),
    ]
    k_bm, v_bm, q_bm, do_bm = (to_block_major(x, rows) for x in (k, v, q, do))
    B, nh, N, _ = q.shape
    lse_bm = torch.cat([lse_ref.view(B * nh, N), lse_ref.new_full((B * nh, 1), float("inf"))], 1)[:, rows]
    delta_bm = torch.cat([delta.view(B * nh, N), delta.new_zeros(B * nh, 1)], 1)[:, rows]
    lse_bm, delta_bm = lse_bm.contiguous(), delta_bm.contiguous()
    for spec in variants.split(";"):
        mode, ws, stages, warps = (int(x) for x in spec.split(","))
        name = f"mode{mode} ws{ws} st{stages} w{warps}"
        launch = (mode, bool(ws), stages, warps)
        runs = {
            "fwd": (
                lambda launch=launch: forward_bm(q, k_bm, v_bm, kbias, grid, selection, *launch, k, v, safe),
                (o_ref, lse_ref),
            ),
            "dq": (
                lambda launch=launch: dq_bm(
                    q, k_bm, v_bm, kbias, o4, do, lse_ref, grid, selection, *launch, k, v, safe
                ),
                (dq_ref, delta),
            ),
            "dkdv": (
                lambda launch=launch: dkdv_bm(
                    q_bm,
                    do_bm,
                    lse_bm,
                    delta_bm,
                    k,
                    v,
                    grid,
                    transposed,
                    *launch,
                    q,
                    do,
                    lse_ref,
                    delta,
                    safe,
                    kbias,
                ),
                (dk_ref, dv_ref),
            ),
        }
        for kernel, (fn, want) in runs.items():
            try:
                got = fn()
                err = max(_rel_err(g, w) for g, w in zip(got, want))
                table.append((f"{kernel} {name}", timed(fn), err))
                print(table[-1], flush=True)
            except Exception as error:
                print(f"{kernel} {name}: failed {type(error).__name__}: {str(error)[-300:]}", flush=True)
    print("| kernel | ms | rel err |\n|---|---|---|")
    for name, ms, err in table:
        print(f"| {name} | {ms:.2f} | {err:.1e} |")
    return table


if __name__ == "__main__":
    main()
