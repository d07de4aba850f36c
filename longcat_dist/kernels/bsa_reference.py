"""Dense masked reference for block-sparse attention, in plain torch float32: defines the kernel's output and
gradients (spec §3.2, "equivalent dense reference")."""

from __future__ import annotations

import math

import torch

from longcat_dist.kernels.bsa_select import KERNEL_DTYPES, BlockGrid, check_inputs, select_blocks_on_grid


def reference_block_sparse_attention(
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
    """softmax(QKᵀ/sqrt(hd) + block mask)·V in float32, returned in q's dtype; differentiable. O(N²) memory."""
    grid = check_inputs(
        "reference_block_sparse_attention",
        {"q": q, "k": k, "v": v},
        latent_shape,
        num_cond_latents,
        sparsity,
        chunk_shape,
        (*KERNEL_DTYPES, torch.float32),
    )
    selection = select_blocks_on_grid(q.detach(), k.detach(), grid, sparsity, force_diagonal)
    allowed = block_mask_to_token_mask(selection.indices, selection.counts, grid)  # [B, nh, N, N] bool
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, nh, N, N]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (probs @ v.float()).to(q.dtype)


def block_mask_to_token_mask(indices: torch.Tensor, counts: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Expand selected (q-block, k-block) pairs to a token-level mask, [B, nh, N, N] bool."""
    B, nh, num_blocks, n_sel = indices.shape
    used = torch.arange(n_sel, device=indices.device)[None, :] < counts[:, None]  # [M, n_sel]
    # Unused slots point at the extra column M, which is dropped.
    columns = torch.where(used, indices.long(), num_blocks)
    blocks = torch.zeros(B, nh, num_blocks, num_blocks + 1, dtype=torch.bool, device=indices.device)
    blocks.scatter_(-1, columns, True)
    token_blocks = grid.token_block_ids(indices.device)  # [N]
    return blocks[:, :, token_blocks][:, :, :, token_blocks]
