"""Self- and cross-attention of the DiT, and the one place that picks an attention backend (spec §2.6, §2.7, §2.10).

Backends compute the same attention except `bsa`, the block-sparse approximation of spec §3:
  sdpa      torch scaled_dot_product_attention (flash / cuDNN / memory-efficient kernels on GPU, maths on CPU):
            the official model's dense attention, the backend for bitwise comparisons with it
  xformers  xformers.ops.memory_efficient_attention, when installed
  bsa       longcat_dist.kernels.block_sparse_attention (Triton); used for grids with more than one latent frame
  auto      bsa for video on CUDA in bf16/fp16 with a head dim the kernel supports, sdpa otherwise
A backend that was asked for by name and cannot run here is an error, never a silent fallback. The official
config's enable_bsa / enable_flashattn* flags are not read: the backend named here decides.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy

from longcat_dist.model.layers import RMSNormFp32, use_fused_elementwise
from longcat_dist.model.rope import apply_rope, rope_cos_sin

BACKENDS = ("auto", "sdpa", "xformers", "bsa")


@dataclass(frozen=True)
class BSAParams:
    """Block-sparse attention settings: the fraction of key blocks skipped and the (t, h, w) block shape."""

    sparsity: float = 0.9375
    chunk_shape: tuple[int, int, int] = (4, 4, 4)


@dataclass(frozen=True)
class AttentionSettings:
    """The backend (auto | sdpa | xformers | bsa), its BSA parameters, and whether the block's fp32 islands
    (modulation, gated residuals, q/k norm, RoPE) run as fused Triton kernels on CUDA tensors.

    The fused kernels are off in the model by default, so that it reproduces the official numerics bit for bit;
    training turns them on (config `fused_elementwise`, default true): they differ from the torch code in at most
    one bf16 ulp of a term on 2e-5 of the elements and cut ~65 ms of a 207 ms block step (docs/PERFORMANCE.md).

    keep_packed_kv: the block-sparse backward reuses the forward's K/V copies (see block_sparse_attention); the
    DiT sets it for the blocks whose checkpoint recomputes attention, where those copies live only briefly."""

    backend: str = "auto"
    bsa: BSAParams = BSAParams()
    fused_elementwise: bool = False
    keep_packed_kv: bool = False


def resolve_backend(name: str, bsa: BSAParams | None = None) -> AttentionSettings:
    """Check that a backend can run in this process and return its settings."""
    if name not in BACKENDS:
        raise ValueError(f"attention_implementation={name!r} is unknown; use one of {list(BACKENDS)}")
    if name == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ValueError(
            "attention_implementation='xformers' was requested but the xformers package is not installed; "
            "install it or use 'sdpa'"
        )
    if name == "bsa":
        from longcat_dist.kernels import bsa_triton

        if not torch.cuda.is_available() and not bsa_triton.interpreted():
            raise ValueError(
                "attention_implementation='bsa' needs a CUDA GPU for its Triton kernel (or TRITON_INTERPRET=1 "
                "for tiny CPU tests); use 'sdpa' on this machine"
            )
    return AttentionSettings(name, bsa or BSAParams())


def dense_attention(q: Tensor, k: Tensor, v: Tensor, backend: str, mask: Tensor | None = None) -> Tensor:
    """Softmax attention with scale 1/sqrt(hd); q [B, nh, Nq, hd], k/v [B, nh, Nk, hd] -> [B, nh, Nq, hd]."""
    if backend == "xformers":
        import xformers.ops as xops

        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _use_bsa(q: Tensor, frames: int, backend: str) -> bool:
    """Whether this call runs block-sparse: always for "bsa" video, for "auto" where the kernel applies."""
    if frames <= 1 or backend not in ("bsa", "auto"):
        return False
    if backend == "bsa":
        return True
    from longcat_dist.kernels.bsa_select import KERNEL_DTYPES, KERNEL_HEAD_DIMS

    return q.is_cuda and q.dtype in KERNEL_DTYPES and q.shape[-1] in KERNEL_HEAD_DIMS


_SELF_ATTENTION_DEPTH = [0]  # > 0 while self_attention runs its dense kernels


def in_self_attention() -> bool:
    """True inside self_attention's dense calls (the selective-checkpoint policy saves exactly those outputs)."""
    return _SELF_ATTENTION_DEPTH[0] > 0


# The aten ops torch's scaled_dot_product_attention dispatches to, by backend.
_SDPA_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
)


# The block-sparse path's torch custom ops that the checkpoint policy reads, registered under these names by
# longcat_dist.kernels.bsa (named here so that this module does not import Triton).
BSA_SELECT_OP = "longcat::bsa_select"
BSA_ATTENTION_OP = "longcat::bsa_attention"


def checkpoint_policy(save_attention: bool):
    """The selective-checkpoint policy of a block: what its recompute takes from the first forward.

    Always the block-sparse selection (two small int32 tensors, ~4 MB per block at 93x480x832: its pooling and
    top-k are not run again). With save_attention also self-attention's outputs (the BSA op, or the SDPA calls
    of self-attention but not of cross-attention): one [N, C] activation per block more, no attention forward in
    the recompute.
    """

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        name = op.name() if hasattr(op, "name") else ""
        if name == BSA_SELECT_OP:
            return CheckpointPolicy.MUST_SAVE
        if save_attention and (name == BSA_ATTENTION_OP or (op in _SDPA_OPS and in_self_attention())):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def self_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    num_cond_tokens: int,
    latent_shape: tuple[int, int, int],
    settings: AttentionSettings,
) -> Tensor:
    """Bidirectional attention with the I2V split: cond queries see only cond keys, noise queries see all keys.

    q, k, v [B, nh, N, hd] with RoPE applied; latent_shape (T, Hp, Wp) of the N tokens.
    """
    frames, height, width = latent_shape
    if _use_bsa(q, frames, settings.backend):
        from longcat_dist.kernels import block_sparse_attention

        return block_sparse_attention(
            q,
            k,
            v,
            latent_shape=latent_shape,
            num_cond_latents=num_cond_tokens // (height * width),
            sparsity=settings.bsa.sparsity,
            chunk_shape=settings.bsa.chunk_shape,
            keep_packed_kv=settings.keep_packed_kv,
        )
    backend = "xformers" if settings.backend == "xformers" else "sdpa"
    _SELF_ATTENTION_DEPTH[0] += 1
    try:
        if num_cond_tokens == 0:
            return dense_attention(q, k, v, backend)
        m = num_cond_tokens
        cond = dense_attention(q[:, :, :m], k[:, :, :m], v[:, :, :m], backend)
        noise = dense_attention(q[:, :, m:], k, v, backend)
    finally:
        _SELF_ATTENTION_DEPTH[0] -= 1
    return torch.cat([cond, noise], dim=2)


class SelfAttention(nn.Module):
    """Fused qkv, per-head q/k RMSNorm, 3-D RoPE, attention and output projection (§2.6)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNormFp32(self.head_dim)
        self.k_norm = RMSNormFp32(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        latent_shape: tuple[int, int, int],
        num_cond_tokens: int,
        settings: AttentionSettings,
        kv_cache: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, N, C] -> ([B, N, C], (k, v)): k after q/k-norm and before RoPE, as the KV cache records it.

        With kv_cache (k, v) of n_c cond frames, x holds only noise tokens and latent_shape counts the noise frames.
        """
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, nh, N, hd] each
        fused = use_fused_elementwise(x, settings.fused_elementwise)
        q, k = self.q_norm(q, fused), self.k_norm(k, fused)
        new_kv = (k, v)
        frames, height, width = latent_shape
        if kv_cache is not None:
            k_cache, v_cache = (
                c.to(device=x.device, dtype=x.dtype).expand(batch, -1, -1, -1) for c in kv_cache
            )
            cache_frames = k_cache.shape[2] // (height * width)
            k, v = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
            cos, sin = rope_cos_sin(self.head_dim, (cache_frames + frames, height, width), x.device)
            start = cache_frames * height * width
            q = apply_rope(q, cos[start:], sin[start:], fused)
            k = apply_rope(k, cos, sin, fused)
            if settings.backend == "bsa":
                raise ValueError("the KV-cache path runs dense attention only; use attention backend 'sdpa'")
            out = dense_attention(q, k, v, "xformers" if settings.backend == "xformers" else "sdpa")
        else:
            cos, sin = rope_cos_sin(self.head_dim, tuple(latent_shape), x.device)
            q, k = apply_rope(q, cos, sin, fused), apply_rope(k, cos, sin, fused)
            out = self_attention(
                q, k, v, num_cond_tokens=num_cond_tokens, latent_shape=latent_shape, settings=settings
            )
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)), new_kv


class CrossAttention(nn.Module):
    """Video-to-text attention with per-sample text lengths and no RoPE (§2.7)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNormFp32(self.head_dim)
        self.k_norm = RMSNormFp32(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, text: Tensor, text_lengths: list[int], backend: str, fused: bool = False
    ) -> Tensor:
        """x [B, N', C]; text [ΣL_b, C] packed over the batch; sample b attends only to its L_b tokens.

        fused: q/k norms as Triton kernels (see use_fused_elementwise).
        """
        batch, tokens, dim = x.shape
        q = self.q_linear(x).view(batch, tokens, self.num_heads, self.head_dim)
        q = self.q_norm(q, fused).transpose(1, 2)
        # kv of the packed text in one matmul, as the official model does (§2.12 rule 7).
        kv = self.kv_linear(text).view(-1, 2, self.num_heads, self.head_dim)
        k, v = self.k_norm(kv[:, 0], fused), kv[:, 1]  # [ΣL, nh, hd]
        longest = max(text_lengths)
        mask = None
        if all(length == longest for length in text_lengths):
            k = k.view(batch, longest, self.num_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, longest, self.num_heads, self.head_dim).transpose(1, 2)
        else:
            k, v, mask = _pad_packed(k, v, text_lengths)
        out = dense_attention(q, k, v, "xformers" if backend == "xformers" else "sdpa", mask)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def _pad_packed(k: Tensor, v: Tensor, lengths: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Packed [ΣL, nh, hd] keys/values -> padded [B, nh, Lmax, hd] and a key mask [B, 1, 1, Lmax]."""
    longest = max(lengths)
    keys = torch.nn.utils.rnn.pad_sequence(list(k.split(lengths)), batch_first=True)
    values = torch.nn.utils.rnn.pad_sequence(list(v.split(lengths)), batch_first=True)
    positions = torch.arange(longest, device=k.device)
    mask = positions[None, :] < torch.tensor(lengths, device=k.device)[:, None]  # [B, Lmax]
    return keys.transpose(1, 2), values.transpose(1, 2), mask[:, None, None, :]
