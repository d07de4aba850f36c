"""The DiT block's fp32 islands as fused Triton kernels, forward and backward (spec §2.4.4-2.4.5, §2.5, §2.8, §2.12).

AdaLN modulation, the gated residual add, the per-head q/k RMSNorm and RoPE each read their bf16 inputs once, compute
in fp32 registers in the order of the torch reference (layers.modulate, transformer._gated_add, layers.RMSNormFp32,
rope.apply_rope) and write their output once; the torch code materialises several fp32 copies of the activation per
op. Kernels are launched with enable_fp_fusion=False: the reference rounds every product before the add after it,
an FMA would not. Per-frame (and RMSNorm weight) gradients are summed in per-program partials, then in torch, so
the backward is deterministic.

q/k RMSNorm and RoPE are two kernels, not one: the KV cache records k after the norm and before RoPE (§2.11), and
DeepSpeed ZeRO-3 gathers the norm's weight only inside the norm module's own forward. The price is one extra bf16
round trip of q and k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
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
    """out = x·cos + rot(x)·sin per interleaved pair; TRANSPOSE applies the transposed map (the backward)."""
    lead, block = tl.program_id(0), tl.program_id(1)
    x_rows, tokens, rmask = _head_tile(lead, block, size1, size2, x_s0, x_s1, x_s2, HEAD_ROWS)
    out_rows, _, _ = _head_tile(lead, block, size1, size2, o_s0, o_s1, o_s2, HEAD_ROWS)
    cols = tl.arange(0, BLOCK_D)
    partner = cols ^ 1
    mask = rmask[:, None] & (cols < head_dim)[None, :]
    table = tokens.to(tl.int64)[:, None] * head_dim
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(x_ptr + x_rows[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + table + cols[None, :], mask=mask, other=0.0)
    even = (cols % 2 == 0)[None, :]
    if TRANSPOSE:
        # rot^T(u) = (u1, -u0) for u = g·sin: each sin belongs to the partner's column.
        sin = tl.load(sin_ptr + table + partner[None, :], mask=mask, other=0.0)
        rotated = tl.where(even, x_partner, -x_partner)
    else:
        # rot(x) = (-x1, x0)
        sin = tl.load(sin_ptr + table + cols[None, :], mask=mask, other=0.0)
        rotated = tl.where(even, -x_partner, x_partner)
    out = x * cos + rotated * sin
    out = _round(out, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + out_rows[:, None] + cols[None, :], out, mask=mask)


# ---------------------------------------------------------------- launches


def _interpreted() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels then run on the CPU, in numpy)."""
    return isinstance(_rope_kernel, InterpretedFunction)


def _frame_launch(x: Tensor, frames: int) -> tuple[tuple[int, int], dict]:
    batch, tokens, channels = x.shape
    block = triton.next_power_of_2(channels)
    grid = (batch * frames, triton.cdiv(tokens // frames, FRAME_ROWS))
    meta = dict(
        FRAME_ROWS=FRAME_ROWS,
        ROW_TILE=min(FRAME_ROWS, max(1, ROW_TILE_VALUES // block)),
        BLOCK_C=block,
        INTERPRETED=_interpreted(),
        num_warps=_row_warps(block),
        enable_fp_fusion=False,
    )
    return grid, meta


def _frame_sum(partials: Tensor, x: Tensor, frames: int) -> Tensor:
    """Per-program partial sums [B·frames·chunks, C] -> per-frame sums [B, frames, 1, C]."""
    return partials.view(x.shape[0], frames, -1, x.shape[2]).sum(2, keepdim=True)


def _heads4(t: Tensor, order: tuple[int, ...] = (0, 1, 2, 3)) -> Tensor:
    """A [D1, D2, hd] or [D0, D1, D2, hd] tensor as a 4-D view with its dims in `order` (strides kept)."""
    return (t if t.dim() == 4 else t.unsqueeze(0)).permute(order)


def _longest_third(t: Tensor) -> tuple[int, ...]:
    """A dim order that moves t's longest leading dim third, where the per-head kernels tile; RMSNorm rows are
    independent, so cross-attention's [B, N', nh, hd] queries and [ΣL, nh, hd] keys tile over tokens, not heads."""
    shape = _heads4(t).shape
    longest = max(range(3), key=lambda d: shape[d])
    return (*[d for d in range(3) if d != longest], longest, 3)


def _head_launch(t: Tensor) -> tuple[tuple[int, int], dict]:
    size0, size1, size2, head_dim = t.shape
    block = triton.next_power_of_2(head_dim)
    grid = (size0 * size1, triton.cdiv(size2, HEAD_ROWS))
    meta = dict(
        HEAD_ROWS=HEAD_ROWS,
        BLOCK_D=block,
        INTERPRETED=_interpreted(),
        num_warps=HEAD_WARPS,
        enable_fp_fusion=False,
    )
    return grid, meta


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_unit(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_frames(name: str, x: Tensor, frames: int, per_frame: dict[str, Tensor]) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be [B, N, C]; got {list(x.shape)}")
    batch, tokens, channels = x.shape
    if frames <= 0 or tokens % frames:
        raise ValueError(f"{name}: frames={frames} must divide the N={tokens} tokens of x {list(x.shape)}")
    if channels > MAX_CHANNELS:
        raise ValueError(f"{name}: C={channels} is wider than the kernel's MAX_CHANNELS={MAX_CHANNELS}")
    for key, t in per_frame.items():
        if tuple(t.shape) != (batch, frames, 1, channels) or t.dtype != torch.float32:
            raise ValueError(
                f"{name}: {key} must be float32 [B, frames, 1, C] = {[batch, frames, 1, channels]}; "
                f"got {t.dtype} {list(t.shape)}"
            )


class _Modulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, shift: Tensor, scale: Tensor, frames: int, eps: float) -> Tensor:
        out = torch.empty_like(x)
        mean = x.new_empty(x.shape[:2], dtype=torch.float32)  # [B, N], saved for the backward
        rstd = torch.empty_like(mean)
        grid, meta = _frame_launch(x, frames)
        tokens_per_frame, channels = x.shape[1] // frames, x.shape[2]
        _modulate_fwd_kernel[grid](
            x, shift, scale, out, mean, rstd,
            tokens_per_frame, channels, frames, scale.stride(0), scale.stride(1), eps, **meta,
        )  # fmt: skip
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.frames = frames
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        x, scale, mean, rstd = ctx.saved_tensors
        frames = ctx.frames
        grid, meta = _frame_launch(x, frames)
        dx = torch.empty_like(x)
        dshift = x.new_empty((grid[0] * grid[1], x.shape[2]), dtype=torch.float32)
        dscale = torch.empty_like(dshift)
        _modulate_bwd_kernel[grid](
            x, dout.contiguous(), scale, mean, rstd, dx, dshift, dscale,
            x.shape[1] // frames, x.shape[2], frames, scale.stride(0), scale.stride(1), **meta,
        )  # fmt: skip
        return dx, _frame_sum(dshift, x, frames), _frame_sum(dscale, x, frames), None, None


def fused_modulate(x: Tensor, shift: Tensor, scale: Tensor, frames: int, eps: float) -> Tensor:
    """layers.modulate with an affine-free LayerNormFp32 as one kernel: x [B, N, C]; shift, scale [B, frames, 1, C]
    fp32; returns x's dtype."""
    _check_frames("fused_modulate", x, frames, {"shift": shift, "scale": scale})
    shift, scale = _last_dim_unit(shift), _last_dim_unit(scale)
    if shift.stride() != scale.stride():
        shift, scale = shift.contiguous(), scale.contiguous()
    return _Modulate.apply(x.contiguous(), shift, scale, frames, eps)


class _GatedAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor, update: Tensor, frames: int) -> Tensor:
        out = torch.empty_like(x)
        grid, meta = _frame_launch(x, frames)
        _gated_add_fwd_kernel[grid](
            x, gate, update, out,
            x.shape[1] // frames, x.shape[2], frames, gate.stride(0), gate.stride(1), **meta,
        )  # fmt: skip
        ctx.save_for_backward(gate, update)
        ctx.frames = frames
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        gate, update = ctx.saved_tensors
        frames = ctx.frames
        dout = dout.contiguous()
        grid, meta = _frame_launch(update, frames)
        dupdate = torch.empty_like(update)
        dgate = update.new_empty((grid[0] * grid[1], update.shape[2]), dtype=torch.float32)
        _gated_add_bwd_kernel[grid](
            dout, gate, update, dupdate, dgate,
            update.shape[1] // frames, update.shape[2], frames, gate.stride(0), gate.stride(1), **meta,
        )  # fmt: skip
        # x's gradient is dout itself: the reference's fp32 gradient of x is dout upcast, cast back to x's dtype.
        return dout, _frame_sum(dgate, update, frames), dupdate, None


def fused_gated_add(x: Tensor, gate: Tensor, update: Tensor, frames: int) -> Tensor:
    """transformer._gated_add as one kernel: x + gate·update per frame in fp32, rounded to x's dtype.

    x, update [B, N, C]; gate [B, frames, 1, C] fp32.
    """
    _check_frames("fused_gated_add", x, frames, {"gate": gate})
    if update.shape != x.shape:
        raise ValueError(f"fused_gated_add: update {list(update.shape)} must have x's shape {list(x.shape)}")
    return _GatedAdd.apply(x.contiguous(), _last_dim_unit(gate), update.contiguous(), frames)


def _check_heads(name: str, t: Tensor, dims: tuple[int, ...]) -> None:
    if t.dim() not in dims or t.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"{name}: expected a {' or '.join(map(str, dims))}-D tensor of head vectors (head dim <= {MAX_HEAD_DIM});"
            f" got {list(t.shape)}"
        )


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        order = _longest_third(x)
        x4, out4 = _heads4(x, order), _heads4(out, order)
        grid, meta = _head_launch(x4)
        _rms_norm_fwd_kernel[grid](
            x4,
            weight,
            out4,
            x4.shape[1],
            x4.shape[2],
            x4.shape[3],
            eps,
            *_strides(x4),
            *_strides(out4),
            **meta,
        )
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.order = eps, order
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        x, weight = ctx.saved_tensors
        weight_grad = ctx.needs_input_grad[1]
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        x4, dout4, dx4 = (_heads4(t, ctx.order) for t in (x, _last_dim_unit(dout), dx))
        grid, meta = _head_launch(x4)
        head_dim = x4.shape[3]
        # Unused (a placeholder pointer) without WEIGHT_GRAD.
        dweight = x.new_empty((grid[0] * grid[1], head_dim), dtype=torch.float32) if weight_grad else dx
        _rms_norm_bwd_kernel[grid](
            x4, weight, dout4, dx4, dweight, x4.shape[1], x4.shape[2], head_dim, ctx.eps,
            *_strides(x4), *_strides(dout4), *_strides(dx4), WEIGHT_GRAD=weight_grad, **meta,
        )  # fmt: skip
        if not weight_grad:
            return dx, None, None
        # The reference sums the weight gradient as a tensor of the input dtype, then casts it to the weight's.
        return dx, dweight.sum(0).to(x.dtype).to(weight.dtype), None


def fused_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNormFp32 over the last dim as one kernel: x [..., hd] with 3 or 4 dims (any strides), weight [hd]."""
    _check_heads("fused_rms_norm", x, (3, 4))
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"fused_rms_norm: weight {list(weight.shape)} must be [{x.shape[-1]}]")
    return _RMSNorm.apply(_last_dim_unit(x), weight.contiguous(), eps)


def _rope(x: Tensor, cos: Tensor, sin: Tensor, transpose: bool) -> Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grid, meta = _head_launch(x)
    _rope_kernel[grid](
        x, cos, sin, out, x.shape[1], x.shape[2], x.shape[3], *_strides(x), *_strides(out),
        TRANSPOSE=transpose, **meta,
    )  # fmt: skip
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rope(x, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, dout: Tensor):
        cos, sin = ctx.saved_tensors
        return _rope(_last_dim_unit(dout), cos, sin, transpose=True), None, None


def fused_rope(x: Tensor, angles: Tensor) -> Tensor:
    """rope.apply_rope as one kernel: x [B, nh, N, hd] (any strides), angles [N, hd] fp32; returns x's dtype."""
    _check_heads("fused_rope", x, (4,))
    if tuple(angles.shape) != tuple(x.shape[2:]) or angles.dtype != torch.float32:
        raise ValueError(
            f"fused_rope: angles must be float32 [N, hd] = {list(x.shape[2:])}; got {angles.dtype} {list(angles.shape)}"
        )
    angles = angles.to(device=x.device, non_blocking=True).contiguous()
    # cos and sin by torch on the device, as the reference takes them (§2.12 rule 6).
    return _Rope.apply(_last_dim_unit(x), angles.cos(), angles.sin())
