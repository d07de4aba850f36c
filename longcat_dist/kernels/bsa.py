"""Block-sparse attention for training (spec §3): top-k 3-D block selection + fused Triton forward/backward.

Semantics beyond the official kernel: any (T, Hp, Wp) grid (partial edge blocks are masked in the kernel), the
cond/noise split of spec §2.10 in one launch (cond frames chunked on their own, see bsa_select), and at least one
key block per query block, so no query ever gets the official kernel's silent zeros.

The selection, the forward and the backward are torch custom ops with fake implementations: activation
checkpointing can keep their outputs, and torch.compile traces them as single nodes (fullgraph; tested).
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
    num_selected,
    select_blocks_on_grid,
)
from longcat_dist.model.attention import BSA_ATTENTION_OP, BSA_SELECT_OP

# The selection and the attention are torch custom ops, so a selective-checkpoint policy can see them as single
# ops and keep their outputs through the recompute (the Triton launches inside are invisible to torch's dispatch).
# Their names live with that policy (model.attention), which must not import Triton; the backward's, which no
# policy reads, lives here.
BSA_ATTENTION_BACKWARD_OP = "longcat::bsa_attention_backward"


@torch.library.custom_op(BSA_SELECT_OP, mutates_args=())
def _select_op(
    q: torch.Tensor,
    k: torch.Tensor,
    latent_shape: list[int],
    num_cond_latents: int,
    chunk_shape: list[int],
    sparsity: float,
    force_diagonal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """select_blocks_on_grid as one op: (indices [B, nh, M, n_sel] int32, counts [M] int32)."""
    grid = BlockGrid(tuple(latent_shape), num_cond_latents, tuple(chunk_shape))
    indices, counts = select_blocks_on_grid(q, k, grid, sparsity, force_diagonal)
    return indices, counts


@_select_op.register_fake
def _(q, k, latent_shape, num_cond_latents, chunk_shape, sparsity, force_diagonal):
    grid = BlockGrid(tuple(latent_shape), num_cond_latents, tuple(chunk_shape))
    n_sel = num_selected(grid.num_blocks, sparsity)
    indices = q.new_empty(*q.shape[:2], grid.num_blocks, n_sel, dtype=torch.int32)
    return indices, q.new_empty(grid.num_blocks, dtype=torch.int32)


@torch.library.custom_op(BSA_ATTENTION_OP, mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    latent_shape: list[int],
    num_cond_latents: int,
    chunk_shape: list[int],
    keep_packed_kv: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward kernel as one op: (Out token-major [B, N, nh, hd], base-2 lse [B·nh, N] float32), then the
    block-major K, V and key bias it ran on (bsa_triton.PackedKV) if keep_packed_kv, else three empty tensors.

    The copies are outputs because a custom op's backward sees only its inputs and outputs."""
    grid = BlockGrid(tuple(latent_shape), num_cond_latents, tuple(chunk_shape))
    out, lse, packed = bsa_triton.forward_token_major(q, k, v, grid, BlockSelection(indices, counts))
    if not keep_packed_kv:
        packed = bsa_triton.PackedKV(
            k.new_empty(0, k.shape[-1]), v.new_empty(0, v.shape[-1]), lse.new_empty(0)
        )
    return out, lse, *packed


@_attention_op.register_fake
def _(q, k, v, indices, counts, latent_shape, num_cond_latents, chunk_shape, keep_packed_kv):
    B, nh, N, hd = q.shape
    grid = BlockGrid(tuple(latent_shape), num_cond_latents, tuple(chunk_shape))
    slots = grid.num_blocks * grid.block_size if keep_packed_kv else 0
    return (
        q.new_empty(B, N, nh, hd),
        q.new_empty(B * nh, N, dtype=torch.float32),
        k.new_empty(B * nh * slots, hd),
        v.new_empty(B * nh * slots, hd),
        q.new_empty(slots, dtype=torch.float32),
    )


def _attention_setup(ctx, inputs, output):
    q, k, v, indices, counts, latent_shape, num_cond_latents, chunk_shape, _ = inputs
    out, lse, k_packed, v_packed, key_bias = output
    ctx.save_for_backward(q, k, v, out, lse, indices, counts, k_packed, v_packed, key_bias)
    ctx.geometry = (latent_shape, num_cond_latents, chunk_shape)
    ctx.mark_non_differentiable(lse, k_packed, v_packed, key_bias)


@torch.library.custom_op(BSA_ATTENTION_BACKWARD_OP, mutates_args=())
def _attention_backward_op(
    d_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    k_packed: torch.Tensor,
    v_packed: torch.Tensor,
    key_bias: torch.Tensor,
    latent_shape: list[int],
    num_cond_latents: int,
    chunk_shape: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dQ and dK/dV kernels as one op (so that traced graphs, torch.compile's included, see one node); the
    forward's K/V copies when it kept them (else empty: the backward packs K/V again)."""
    grid = BlockGrid(tuple(latent_shape), num_cond_latents, tuple(chunk_shape))
    do = d_out.transpose(1, 2)  # [B, nh, N, hd] view, like Out
    if do.stride(-1) != 1:
        do = do.contiguous()
    selection = BlockSelection(indices, counts)
    packed = bsa_triton.PackedKV(k_packed, v_packed, key_bias) if k_packed.numel() else None
    return bsa_triton.attention_backward(do, q, k, v, out.transpose(1, 2), lse, grid, selection, packed)


@_attention_backward_op.register_fake
def _(
    d_out, q, k, v, out, lse, indices, counts, k_packed, v_packed, key_bias,
    latent_shape, num_cond_latents, chunk_shape,
):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # as the kernels allocate them


def _attention_backward(ctx, d_out, *_non_differentiable):
    dq, dk, dv = _attention_backward_op(d_out, *ctx.saved_tensors, *ctx.geometry)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd(BSA_ATTENTION_OP, _attention_backward, setup_context=_attention_setup)


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
    keep_packed_kv: bool = False,
) -> torch.Tensor:
    """Block-sparse self-attention over a (T, Hp, Wp) token grid; q, k, v [B, nh, N, hd] bf16/fp16, RoPE applied.

    Args:
        latent_shape: (T, Hp, Wp) of the whole sequence; N = T·Hp·Wp in (t, h, w) raster order.
        num_cond_latents: leading cond frames; their queries attend only to cond keys.
        sparsity: fraction of key blocks skipped; each q-block keeps max(1, int((1 - sparsity)·Nk)).
        chunk_shape: (t, h, w) of one block; powers of two, 16..128 tokens.
        force_diagonal: always keep each q-block's own key block.
        keep_packed_kv: save the forward's block-major K/V copies for the backward instead of packing again
            (0.37 ms less at the 480p training shape, two K-sized tensors more for as long as autograd keeps the
            call's saved tensors). Worth it where that is short: a checkpointed block whose recompute runs the
            attention, which is how the DiT sets it.
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
    # Any strides with a contiguous head dim: the kernels address every tensor (gradients included) with its own
    # strides, so v can stay a view of the fused qkv projection instead of being copied.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    shape, chunk = list(grid.latent_shape), list(grid.chunk_shape)
    indices, counts = _select_op(
        q.detach(), k.detach(), shape, num_cond_latents, chunk, sparsity, force_diagonal
    )
    out, *_ = _attention_op(q, k, v, indices, counts, shape, num_cond_latents, chunk, keep_packed_kv)
    return out.transpose(1, 2)  # [B, nh, N, hd] view of the token-major output
