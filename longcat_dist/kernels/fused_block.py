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
from torch import Tensor

from longcat_dist.kernels.fused_block_triton import (
    FRAME_ROWS,
    HEAD_ROWS,
    HEAD_WARPS,
    MAX_CHANNELS,
    MAX_HEAD_DIM,
    ROW_TILE_VALUES,
    _gated_add_bwd_kernel,
    _gated_add_fwd_kernel,
    _interpreted,
    _modulate_bwd_kernel,
    _modulate_fwd_kernel,
    _rms_norm_bwd_kernel,
    _rms_norm_fwd_kernel,
    _rope_kernel,
    _row_warps,
)


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


def fused_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """rope.apply_rope as one kernel: x [B, nh, N, hd] (any strides), cos/sin [N, hd] fp32; returns x's dtype."""
    _check_heads("fused_rope", x, (4,))
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != tuple(x.shape[2:]) or table.dtype != torch.float32:
            raise ValueError(
                f"fused_rope: {name} must be float32 [N, hd] = {list(x.shape[2:])}; "
                f"got {table.dtype} {list(table.shape)}"
            )
    # cos and sin as torch takes them on the device (rope.rope_cos_sin), as the reference does (§2.12 rule 6).
    return _Rope.apply(_last_dim_unit(x), cos.to(x.device).contiguous(), sin.to(x.device).contiguous())
