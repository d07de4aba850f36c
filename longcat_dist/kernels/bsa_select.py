"""Block geometry and top-k block selection for block-sparse attention (spec §3.2), in plain torch (on CUDA
the block pooling runs as the Triton kernel of bsa_select_triton).

Blocks: the (T, Hp, Wp) token grid is cut into chunk_shape cubes, ordered (block-t, block-h, block-w). With
`num_cond_latents = n_c > 0` the cond frames [0, n_c) and the noise frames [n_c, T) are chunked in time
*separately*, so no block mixes cond and noise tokens even when n_c is not a multiple of the chunk's t: the cond
frames form their own block rows (the first `num_cond_blocks` blocks). Blocks at the far edge of any axis (and the
last cond/noise time chunk) may be partial; they keep their place in the block order and count only real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_HEAD_DIMS = (32, 64, 128)


@dataclass(frozen=True)
class BlockGrid:
    """How a (T, Hp, Wp) token grid with n_c leading cond frames is cut into 3-D blocks."""

    latent_shape: tuple[int, int, int]
    num_cond_latents: int
    chunk_shape: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def block_size(self) -> int:
        return math.prod(self.chunk_shape)

    @property
    def cond_tblocks(self) -> int:
        return -(-self.num_cond_latents // self.chunk_shape[0])

    @property
    def tblocks(self) -> int:
        noise_frames = self.latent_shape[0] - self.num_cond_latents
        return self.cond_tblocks + -(-noise_frames // self.chunk_shape[0])

    @property
    def hblocks(self) -> int:
        return -(-self.latent_shape[1] // self.chunk_shape[1])

    @property
    def wblocks(self) -> int:
        return -(-self.latent_shape[2] // self.chunk_shape[2])

    @property
    def num_blocks(self) -> int:
        return self.tblocks * self.hblocks * self.wblocks

    @property
    def num_cond_blocks(self) -> int:
        return self.cond_tblocks * self.hblocks * self.wblocks

    def block_token_counts(self, device: torch.device) -> torch.Tensor:
        """Real tokens per block (partial edge blocks count fewer), [M] float32."""
        T, Hp, Wp = self.latent_shape
        ct, ch, cw = self.chunk_shape
        n_c = self.num_cond_latents
        t = torch.cat([_chunk_lengths(n_c, ct, device), _chunk_lengths(T - n_c, ct, device)])
        h, w = _chunk_lengths(Hp, ch, device), _chunk_lengths(Wp, cw, device)
        return (t[:, None, None] * h[None, :, None] * w[None, None, :]).flatten().float()  # [M]

    def token_block_ids(self, device: torch.device) -> torch.Tensor:
        """Block id of every token in (t, h, w) raster order, [N] int64."""
        T, Hp, Wp = self.latent_shape
        ct, ch, cw = self.chunk_shape
        n_c = self.num_cond_latents
        t = torch.arange(T, device=device)
        bt = torch.where(t < n_c, t // ct, self.cond_tblocks + (t - n_c).clamp(min=0) // ct)
        bh = torch.arange(Hp, device=device) // ch
        bw = torch.arange(Wp, device=device) // cw
        ids = (bt[:, None, None] * self.hblocks + bh[None, :, None]) * self.wblocks + bw[None, None, :]
        return ids.flatten()  # [N]


class BlockSelection(NamedTuple):
    """Per-(batch, head, q-block) lists of selected key blocks."""

    # [B, nh, M, n_sel] int32: cond blocks first, otherwise in no set order; entries past counts[m] hold M (unused)
    indices: torch.Tensor
    counts: torch.Tensor  # [M] int32: blocks used by q-block m (cond rows select among cond blocks only)


# Largest block count for which the Triton top-k beats torch.topk (H200, bench/attention.py: 728 blocks 0.43 vs
# 0.60 ms; 1,540 blocks 2.04 vs 1.74 ms).
TOPK_KERNEL_MAX_BLOCKS = 1024


def num_selected(num_key_blocks: int, sparsity: float) -> int:
    """Blocks kept per q-block: the official int((1 - sparsity) * Nk), but never 0 (the official kernel then
    returns silent zeros)."""
    return max(1, int((1.0 - sparsity) * num_key_blocks))


def check_inputs(
    caller: str,
    tensors: dict[str, torch.Tensor],
    latent_shape: tuple[int, int, int],
    num_cond_latents: int,
    sparsity: float,
    chunk_shape: tuple[int, int, int],
    dtypes: tuple[torch.dtype, ...],
) -> BlockGrid:
    """Validate attention inputs and arguments; return the block grid. Raises ValueError naming the problem."""
    for name, value in (("latent_shape", latent_shape), ("chunk_shape", chunk_shape)):
        if len(value) != 3 or not all(isinstance(x, int) and x > 0 for x in value):
            raise ValueError(
                f"{caller}: {name}={value!r} must be three positive ints (T, Hp, Wp) / (t, h, w)."
            )
    if not all(c & (c - 1) == 0 for c in chunk_shape) or not 16 <= math.prod(chunk_shape) <= 128:
        raise ValueError(
            f"{caller}: chunk_shape={chunk_shape} must be powers of two with 16 <= t*h*w <= 128 "
            "(one block is one matrix tile of the kernel); the default is (4, 4, 4)."
        )
    T = latent_shape[0]
    if not isinstance(num_cond_latents, int) or not 0 <= num_cond_latents <= T:
        raise ValueError(f"{caller}: num_cond_latents={num_cond_latents!r} must be an int in [0, T={T}].")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"{caller}: sparsity={sparsity!r} must be in [0, 1) (the fraction of blocks skipped)."
        )
    q = tensors["q"]
    num_tokens = math.prod(latent_shape)
    if q.dim() != 4 or q.shape[2] != num_tokens:
        raise ValueError(
            f"{caller}: q has shape {tuple(q.shape)}; expected [B, heads, tokens, head_dim] with tokens = "
            f"T*Hp*Wp = {num_tokens} from latent_shape={latent_shape}."
        )
    for name, x in tensors.items():
        if x.shape != q.shape:
            raise ValueError(
                f"{caller}: {name} has shape {tuple(x.shape)}, q has {tuple(q.shape)}; they must match."
            )
        if x.dtype not in dtypes:
            raise ValueError(
                f"{caller}: {name} has dtype {x.dtype}; supported: {', '.join(map(str, dtypes))}."
            )
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"{caller}: {name} is {x.dtype} on {x.device}, q is {q.dtype} on {q.device}; must match."
            )
    return BlockGrid(tuple(latent_shape), num_cond_latents, tuple(chunk_shape))


def pool_blocks(x: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Mean of every block's real tokens, [B, nh, N, hd] -> [B, nh, M, hd] float32, without padded copies."""
    T, Hp, Wp = grid.latent_shape
    ct, ch, cw = grid.chunk_shape
    n_c = grid.num_cond_latents
    x = x.unflatten(2, (T, Hp, Wp))  # [B, nh, T, Hp, Wp, hd]
    x = _chunk_sum(x, 4, cw)  # [B, nh, T, Hp, wblocks, hd] float32: later stages work on this smaller tensor
    x = _chunk_sum(x, 3, ch)  # [B, nh, T, hblocks, wblocks, hd]
    x = torch.cat([_chunk_sum(x[:, :, :n_c], 2, ct), _chunk_sum(x[:, :, n_c:], 2, ct)], dim=2)
    return x.flatten(2, 4) / grid.block_token_counts(x.device)[:, None]  # [B, nh, M, hd]


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    latent_shape: tuple[int, int, int],
    num_cond_latents: int = 0,
    sparsity: float = 0.9375,
    chunk_shape: tuple[int, int, int] = (4, 4, 4),
    force_diagonal: bool = False,
) -> BlockSelection:
    """Top-k key blocks per (batch, head, q-block) by mean-pooled q·k (spec §3.2); no gradient, no host sync."""
    grid = check_inputs(
        "select_blocks",
        {"q": q, "k": k},
        latent_shape,
        num_cond_latents,
        sparsity,
        chunk_shape,
        (*KERNEL_DTYPES, torch.float32),
    )
    return select_blocks_on_grid(q, k, grid, sparsity, force_diagonal)


@torch.no_grad()
def select_blocks_on_grid(
    q: torch.Tensor, k: torch.Tensor, grid: BlockGrid, sparsity: float, force_diagonal: bool
) -> BlockSelection:
    """select_blocks on validated inputs."""
    num_blocks, num_cond = grid.num_blocks, grid.num_cond_blocks
    scores = _pool(q, grid) @ _pool(k, grid).transpose(-1, -2)  # [B, nh, M, M] raw dot, no scale
    if force_diagonal:
        scores.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    n_sel, n_sel_cond = num_selected(num_blocks, sparsity), num_selected(num_cond, sparsity)
    rows = torch.arange(num_blocks, device=q.device)
    counts = torch.where(rows < num_cond, n_sel_cond, n_sel).to(torch.int32)  # [M]
    # Noise queries pick among all blocks; cond queries only among cond blocks (spec §2.10), fewer of them,
    # and their unused slots hold M. Not sorted (sorting cost as much as the top-k itself at 704p), only cond
    # blocks moved first. On CUDA, up to TOPK_KERNEL_MAX_BLOCKS blocks, a Triton radix select does it all in two
    # launches (faster there than torch.topk, slower above: docs/perf_attention.md); else torch.topk and a
    # stable partition.
    indices = torch.full_like(scores[..., :n_sel], num_blocks, dtype=torch.int32)  # [B, nh, M, n_sel]
    if scores.is_cuda and num_blocks <= TOPK_KERNEL_MAX_BLOCKS:
        from longcat_dist.kernels.bsa_select_triton import topk_blocks_kernel  # imports this module

        topk_blocks_kernel(scores, indices, num_cond, n_sel, n_sel_cond)
        return BlockSelection(indices, counts)
    indices[:, :, num_cond:] = scores[:, :, num_cond:].topk(n_sel, dim=-1, sorted=False).indices
    if num_cond:
        indices[:, :, num_cond:] = _cond_first(indices[:, :, num_cond:], num_cond)
        cond_scores = scores[:, :, :num_cond, :num_cond]
        indices[:, :, :num_cond, :n_sel_cond] = cond_scores.topk(n_sel_cond, dim=-1, sorted=False).indices
    return BlockSelection(indices, counts)


def _cond_first(indices: torch.Tensor, num_cond: int) -> torch.Tensor:
    """Reorder each row of block ids so that cond blocks (ids < num_cond) come first, each class in its
    original order: a stable partition in a few elementwise passes (a sort of the rows costs as much as the
    top-k). The kernels pack several short cond blocks into one tile, so they need them together."""
    is_cond = indices < num_cond
    cond_rank = is_cond.cumsum(-1)
    num_cond_listed = cond_rank[..., -1:]
    noise_rank = (~is_cond).cumsum(-1) + num_cond_listed
    return indices.scatter(-1, torch.where(is_cond, cond_rank, noise_rank) - 1, indices)


def _pool(x: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """pool_blocks, by the Triton kernel on CUDA (2.5-4x faster: it reads each block once; the torch chunk sums make
    float32 intermediates). Kernel and reference both select through here, so on one device they agree."""
    if x.is_cuda and x.shape[-1] in KERNEL_HEAD_DIMS:
        from longcat_dist.kernels.bsa_select_triton import pool_blocks_kernel  # imports this module

        return pool_blocks_kernel(x, grid)
    return pool_blocks(x, grid)


def _chunk_lengths(length: int, chunk: int, device: torch.device) -> torch.Tensor:
    """Lengths of the chunks that cut [0, length) into pieces of `chunk` (the last may be shorter), int64."""
    starts = torch.arange(0, length, chunk, device=device)
    return (length - starts).clamp(max=chunk)


def _chunk_sum(x: torch.Tensor, dim: int, chunk: int) -> torch.Tensor:
    """Sum consecutive runs of `chunk` entries along `dim` in float32; a shorter last run is summed as is."""
    length = x.shape[dim]
    full = length - length % chunk
    parts = []
    if full:
        # Splitting one dimension is always a view, so no copy of x is made even for strided inputs.
        parts.append(
            x.narrow(dim, 0, full).unflatten(dim, (full // chunk, chunk)).sum(dim + 1, dtype=torch.float32)
        )
    if length > full:
        parts.append(x.narrow(dim, full, length - full).sum(dim, keepdim=True, dtype=torch.float32))
    if not parts:  # an empty cond or noise range
        shape = list(x.shape)
        shape[dim] = 0
        return x.new_zeros(shape, dtype=torch.float32)
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
