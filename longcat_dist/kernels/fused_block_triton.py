"""Triton kernels of the fused fp32 islands (longcat_dist.kernels.fused_block holds the autograd wrappers)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Modulation and gated add keep whole token rows (C channels) in registers, so x is read once. One program owns
# FRAME_ROWS tokens of one latent frame and loads that frame's fp32 shift/scale/gate vectors (16 KB each at C = 4096)
# once for all of them; at the training shape (37,440 tokens) that is 1,170 programs, ~9 per H100 SM. The backward
# writes one partial per-frame sum per program (S / FRAME_ROWS per frame). Rows wider than MAX_CHANNELS would spill.
FRAME_ROWS = 32
MAX_CHANNELS = 16384
# A program walks its tokens ROW_TILE_VALUES // C rows at a time (at least one): one row at C = 4096, its whole
# chunk for narrow test models, where the Triton interpreter pays per loop step.
ROW_TILE_VALUES = 4096
# 16 fp32 values per thread: 8 warps for a 4096-channel row.
VALUES_PER_THREAD = 16
MAX_WARPS = 16
# Head-vector kernels (RMSNorm, RoPE) take HEAD_ROWS vectors of one (batch, head) per program: 32 x 128 = 4,096
# values, 16 per thread at 4 warps. Programs of neighbouring heads run the same tokens, so the RoPE cos/sin tile
# they share is read from L2, not HBM.
HEAD_ROWS = 32
HEAD_WARPS = 4
MAX_HEAD_DIM = 256


def _row_warps(block: int) -> int:
    return min(MAX_WARPS, max(1, block // (32 * VALUES_PER_THREAD)))


@triton.jit
def _round(value, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 value rounded to dtype to nearest even, as the GPU converts."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            # Triton 3.9's interpreter truncates fp32 -> bf16: round the bits first (exact for normal numbers).
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            value = bits.to(tl.float32, bitcast=True)
    return value.to(dtype)


# ---------------------------------------------------------------- per-frame kernels: modulation and gated add


@triton.jit
def _frame_tile(frame_id, chunk, start, tokens_per_frame, channels, cmask, FRAME_ROWS: tl.constexpr,
                ROW_TILE: tl.constexpr):  # fmt: skip
    """Rows [B·N] and element offsets/mask [ROW_TILE, BLOCK_C] of tokens start.. of this program's chunk."""
    token = chunk * FRAME_ROWS + start + tl.arange(0, ROW_TILE)
    row = frame_id.to(tl.int64) * tokens_per_frame + token
    rmask = token < tokens_per_frame
    cols = tl.arange(0, cmask.shape[0])
    return row, rmask, row[:, None] * channels + cols[None, :], rmask[:, None] & cmask[None, :]


@triton.jit
def _frame_vector(ptr, frame_id, frames, stride_b, stride_f, cmask):
    """A [1, BLOCK_C] row of a per-frame [B, frames, 1, C] fp32 tensor."""
    cols = tl.arange(0, cmask.shape[0])
    offsets = (frame_id // frames) * stride_b + (frame_id % frames) * stride_f + cols
    return tl.load(ptr + offsets, mask=cmask, other=0.0)[None, :]


@triton.jit
def _modulate_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr, mean_ptr, rstd_ptr,
    tokens_per_frame, channels, frames, mod_stride_b, mod_stride_f, eps,
    FRAME_ROWS: tl.constexpr, ROW_TILE: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    frame_id, chunk = tl.program_id(0), tl.program_id(1)  # frame_id = b·frames + f
    cmask = tl.arange(0, BLOCK_C) < channels
    shift = _frame_vector(shift_ptr, frame_id, frames, mod_stride_b, mod_stride_f, cmask)
    one_plus_scale = 1.0 + _frame_vector(scale_ptr, frame_id, frames, mod_stride_b, mod_stride_f, cmask)
    for start in range(0, FRAME_ROWS, ROW_TILE):
        row, rmask, offsets, mask = _frame_tile(
            frame_id, chunk, start, tokens_per_frame, channels, cmask, FRAME_ROWS, ROW_TILE
        )
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / channels
        centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=1) / channels + eps)
        # (x - mean)·rstd as torch's CUDA layer_norm, then ·(1 + scale) + shift, each rounded in fp32.
        out = centered * rstd[:, None] * one_plus_scale + shift
        tl.store(out_ptr + offsets, _round(out, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)
        tl.store(mean_ptr + row, mean, mask=rmask)
        tl.store(rstd_ptr + row, rstd, mask=rmask)


@triton.jit
def _modulate_bwd_kernel(
    x_ptr, dout_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_part_ptr, dscale_part_ptr,
    tokens_per_frame, channels, frames, mod_stride_b, mod_stride_f,
    FRAME_ROWS: tl.constexpr, ROW_TILE: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    frame_id, chunk = tl.program_id(0), tl.program_id(1)
    cmask = tl.arange(0, BLOCK_C) < channels
    one_plus_scale = 1.0 + _frame_vector(scale_ptr, frame_id, frames, mod_stride_b, mod_stride_f, cmask)
    dshift = tl.zeros([BLOCK_C], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, FRAME_ROWS, ROW_TILE):
        row, rmask, offsets, mask = _frame_tile(
            frame_id, chunk, start, tokens_per_frame, channels, cmask, FRAME_ROWS, ROW_TILE
        )
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=rmask, other=0.0)[:, None]
        xhat = tl.where(mask, x - mean[:, None], 0.0) * rstd
        dshift += tl.sum(dout, axis=0)
        dscale += tl.sum(dout * xhat, axis=0)
        dxhat = dout * one_plus_scale
        dxhat_mean = tl.sum(dxhat, axis=1)[:, None] / channels
        dxhat_xhat_mean = tl.sum(dxhat * xhat, axis=1)[:, None] / channels
        dx = (dxhat - dxhat_mean - xhat * dxhat_xhat_mean) * rstd
        tl.store(dx_ptr + offsets, _round(dx, dx_ptr.dtype.element_ty, INTERPRETED), mask=mask)
    part = (frame_id * tl.num_programs(1) + chunk).to(tl.int64) * channels + tl.arange(0, BLOCK_C)
    tl.store(dshift_part_ptr + part, dshift, mask=cmask)
    tl.store(dscale_part_ptr + part, dscale, mask=cmask)


@triton.jit
def _gated_add_fwd_kernel(
    x_ptr, gate_ptr, update_ptr, out_ptr,
    tokens_per_frame, channels, frames, gate_stride_b, gate_stride_f,
    FRAME_ROWS: tl.constexpr, ROW_TILE: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    frame_id, chunk = tl.program_id(0), tl.program_id(1)
    cmask = tl.arange(0, BLOCK_C) < channels
    gate = _frame_vector(gate_ptr, frame_id, frames, gate_stride_b, gate_stride_f, cmask)
    for start in range(0, FRAME_ROWS, ROW_TILE):
        _, _, offsets, mask = _frame_tile(
            frame_id, chunk, start, tokens_per_frame, channels, cmask, FRAME_ROWS, ROW_TILE
        )
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        update = tl.load(update_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        out = _round(x + gate * update, out_ptr.dtype.element_ty, INTERPRETED)
        tl.store(out_ptr + offsets, out, mask=mask)


@triton.jit
def _gated_add_bwd_kernel(
    dout_ptr, gate_ptr, update_ptr, dupdate_ptr, dgate_part_ptr,
    tokens_per_frame, channels, frames, gate_stride_b, gate_stride_f,
    FRAME_ROWS: tl.constexpr, ROW_TILE: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    frame_id, chunk = tl.program_id(0), tl.program_id(1)
    cmask = tl.arange(0, BLOCK_C) < channels
    gate = _frame_vector(gate_ptr, frame_id, frames, gate_stride_b, gate_stride_f, cmask)
    dgate = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, FRAME_ROWS, ROW_TILE):
        _, _, offsets, mask = _frame_tile(
            frame_id, chunk, start, tokens_per_frame, channels, cmask, FRAME_ROWS, ROW_TILE
        )
        dout = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        update = tl.load(update_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dgate += tl.sum(dout * update, axis=0)
        dupdate = _round(dout * gate, dupdate_ptr.dtype.element_ty, INTERPRETED)
        tl.store(dupdate_ptr + offsets, dupdate, mask=mask)
    part = (frame_id * tl.num_programs(1) + chunk).to(tl.int64) * channels + tl.arange(0, BLOCK_C)
    tl.store(dgate_part_ptr + part, dgate, mask=cmask)


# ---------------------------------------------------------------- per-head kernels: RMSNorm and RoPE


@triton.jit
def _head_tile(lead, block, size1, size2, stride0, stride1, stride2, HEAD_ROWS: tl.constexpr):
    """Offsets of HEAD_ROWS consecutive index-2 rows of a [D0, D1, D2, hd] tensor at (lead // D1, lead % D1)."""
    rows = block * HEAD_ROWS + tl.arange(0, HEAD_ROWS)
    base = (lead // size1).to(tl.int64) * stride0 + (lead % size1).to(tl.int64) * stride1
    return base + rows.to(tl.int64) * stride2, rows, rows < size2


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, weight_ptr, out_ptr, size1, size2, head_dim, eps,
    x_s0, x_s1, x_s2, o_s0, o_s1, o_s2,
    HEAD_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    lead, block = tl.program_id(0), tl.program_id(1)
    x_rows, _, rmask = _head_tile(lead, block, size1, size2, x_s0, x_s1, x_s2, HEAD_ROWS)
    out_rows, _, _ = _head_tile(lead, block, size1, size2, o_s0, o_s1, o_s2, HEAD_ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < head_dim)[None, :]
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / head_dim + eps)
    # Normalised in fp32, rounded to the input dtype, and only then scaled by the weight in that dtype (§2.4.4).
    normed = _round(x * rstd[:, None], dtype, INTERPRETED).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=cols < head_dim, other=0.0).to(tl.float32)
    weight = _round(weight, dtype, INTERPRETED).to(tl.float32)
    out = _round(normed * weight[None, :], dtype, INTERPRETED)
    tl.store(out_ptr + out_rows[:, None] + cols[None, :], out, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    x_ptr, weight_ptr, dout_ptr, dx_ptr, dweight_part_ptr, size1, size2, head_dim, eps,
    x_s0, x_s1, x_s2, d_s0, d_s1, d_s2, dx_s0, dx_s1, dx_s2,
    HEAD_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, WEIGHT_GRAD: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    lead, block = tl.program_id(0), tl.program_id(1)
    x_rows, _, rmask = _head_tile(lead, block, size1, size2, x_s0, x_s1, x_s2, HEAD_ROWS)
    d_rows, _, _ = _head_tile(lead, block, size1, size2, d_s0, d_s1, d_s2, HEAD_ROWS)
    dx_rows, _, _ = _head_tile(lead, block, size1, size2, dx_s0, dx_s1, dx_s2, HEAD_ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < head_dim)[None, :]
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + d_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=cols < head_dim, other=0.0).to(tl.float32)
    weight = _round(weight, dtype, INTERPRETED).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / head_dim + eps)
    xhat = x * rstd[:, None]
    if WEIGHT_GRAD:
        # The reference multiplies in the input dtype, so each product is rounded to it before the sum.
        normed = _round(xhat, dtype, INTERPRETED).to(tl.float32)
        dweight = tl.sum(_round(dout * normed, dtype, INTERPRETED).to(tl.float32), axis=0)
        part = (block * tl.num_programs(0) + lead).to(tl.int64) * head_dim + cols
        tl.store(dweight_part_ptr + part, dweight, mask=cols < head_dim)
    dnormed = _round(dout * weight[None, :], dtype, INTERPRETED).to(tl.float32)
    dnormed_xhat_mean = tl.sum(dnormed * xhat, axis=1) / head_dim
    dx = (dnormed - xhat * dnormed_xhat_mean[:, None]) * rstd[:, None]
    tl.store(dx_ptr + dx_rows[:, None] + cols[None, :], _round(dx, dtype, INTERPRETED), mask=mask)


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, size1, size2, head_dim,
    x_s0, x_s1, x_s2, o_s0, o_s1, o_s2,
    HEAD_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """out = x·cos + rot(x)·sin per interleaved pair; TRANSPOSE applies the transposed map (the backward).

    Rows are loaded whole and split into their even and odd columns (reshape + split), so every load and store is
    contiguous; the sums are the torch code's, term for term (x·cos + (∓x_partner)·sin, no FMA).
    """
    lead, block = tl.program_id(0), tl.program_id(1)
    x_rows, tokens, rmask = _head_tile(lead, block, size1, size2, x_s0, x_s1, x_s2, HEAD_ROWS)
    out_rows, _, _ = _head_tile(lead, block, size1, size2, o_s0, o_s1, o_s2, HEAD_ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < head_dim)[None, :]
    table = tokens.to(tl.int64)[:, None] * head_dim + cols[None, :]
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + table, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + table, mask=mask, other=0.0)
    x_even, x_odd = tl.split(tl.reshape(x, (HEAD_ROWS, BLOCK_D // 2, 2)))
    cos_even, cos_odd = tl.split(tl.reshape(cos, (HEAD_ROWS, BLOCK_D // 2, 2)))
    sin_even, sin_odd = tl.split(tl.reshape(sin, (HEAD_ROWS, BLOCK_D // 2, 2)))
    if TRANSPOSE:
        # rot^T(u) = (u1, -u0) for u = g·sin: each sine belongs to the partner's column.
        out_even = x_even * cos_even + x_odd * sin_odd
        out_odd = x_odd * cos_odd + (-x_even) * sin_even
    else:
        # rot(x) = (-x1, x0)
        out_even = x_even * cos_even + (-x_odd) * sin_even
        out_odd = x_odd * cos_odd + x_even * sin_odd
    out = tl.reshape(tl.join(out_even, out_odd), (HEAD_ROWS, BLOCK_D))
    out = _round(out, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + out_rows[:, None] + cols[None, :], out, mask=mask)


# ---------------------------------------------------------------- launches


def _interpreted() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels then run on the CPU, in numpy)."""
    return isinstance(_rope_kernel, InterpretedFunction)
