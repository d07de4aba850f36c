"""The DiT's small modules: fp32 islands, norms, embedders, SwiGLU and the final layer (spec §2.4, §2.12).

Module and parameter names follow the official checkpoint. The fp32 islands are modules of their own (not functional
calls on a child's weight from the parent) so that DeepSpeed ZeRO-3 gathers their parameters in their own forward.
On CUDA they can run as fused Triton kernels (longcat_dist.kernels.fused_block) that compute the same maths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-6
# Device types whose tensors take the fused kernels when a model enables them. The CPU keeps the torch code, so CPU
# results do not depend on the switch; tests add "cpu" to run the kernels under TRITON_INTERPRET=1.
FUSED_DEVICE_TYPES = ("cuda",)


def use_fused_elementwise(x: Tensor, enabled: bool) -> bool:
    """Whether the fp32 islands on x run as fused Triton kernels: when enabled, and only on CUDA tensors."""
    return enabled and x.device.type in FUSED_DEVICE_TYPES


class Fp32Linear(nn.Linear):
    """A Linear computed in fp32 with its weights upcast: the official autocast(fp32) regions (§2.12 rule 2)."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 (affine parameters upcast), cast back to the input dtype."""

    def __init__(self, dim: int, elementwise_affine: bool):
        super().__init__(dim, eps=NORM_EPS, elementwise_affine=elementwise_affine)

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class RMSNormFp32(nn.Module):
    """RMSNorm normalised in fp32, cast back to the input dtype, and only then scaled by the weight (§2.4.4)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        """x [..., dim]; fused: one Triton kernel (x with 3 or 4 dims) instead of the torch ops."""
        if fused:
            from longcat_dist.kernels.fused_block import fused_rms_norm

            return fused_rms_norm(x, self.weight, NORM_EPS)
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + NORM_EPS)).to(x.dtype)
        return normed * self.weight.to(x.dtype)


def modulate(
    norm: LayerNormFp32, x: Tensor, shift: Tensor, scale: Tensor, frames: int, fused: bool = False
) -> Tensor:
    """AdaLN in fp32: norm(x)·(1 + scale) + shift per latent frame, cast back to x's dtype.

    x [B, N, C] with N = frames·S; shift, scale [B, frames, 1, C] fp32. fused: one Triton kernel instead of the
    torch ops (norm must then be affine-free, as every modulation norm is).
    """
    if fused:
        from longcat_dist.kernels.fused_block import fused_modulate

        return fused_modulate(x, shift, scale, frames, norm.eps)
    batch, tokens, channels = x.shape
    x32 = norm(x.float()).view(batch, frames, tokens // frames, channels)
    return (x32 * (1 + scale) + shift).view(batch, tokens, channels).to(x.dtype)


class PatchEmbed3D(nn.Module):
    """Conv3d patchify: [B, 16, T, H, W] -> [B, T·Hp·Wp, C] in (t, h, w) raster order."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def timestep_frequencies(size: int) -> Tensor:
    """The sinusoid's frequencies [size/2], built on the CPU in fp32 (§2.12 rule 6), whatever the default device."""
    half = size // 2
    return torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device="cpu") / half)


class TimestepEmbedder(nn.Module):
    """Sinusoid [cos, sin] of raw 0..1000 timesteps followed by an fp32 MLP (§2.4.2)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            Fp32Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            Fp32Linear(hidden_size, hidden_size),
        )

    def forward(self, timesteps: Tensor) -> Tensor:
        """timesteps [M] (fp32) -> embeddings [M, hidden] fp32."""
        freqs = timestep_frequencies(self.frequency_embedding_size).to(timesteps.device)
        args = timesteps.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_embedding_size % 2:
            embedding = F.pad(embedding, (0, 1))
        return self.mlp(embedding)


class CaptionEmbedder(nn.Module):
    """Text projection Linear -> GELU(tanh) -> Linear in the model dtype (§2.4.3)."""

    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.y_proj = nn.Sequential(
            nn.Linear(in_channels, hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, caption: Tensor) -> Tensor:
        return self.y_proj(caption)


def ffn_hidden_size(hidden_size: int, mlp_ratio: float) -> int:
    """SwiGLU width: two thirds of hidden·ratio, rounded up to a multiple of 256 (4096 -> 11008)."""
    hidden = int(2 * int(hidden_size * mlp_ratio) / 3)
    return 256 * math.ceil(hidden / 256)


class FeedForward(nn.Module):
    """SwiGLU: w2(SiLU(w1 x) ⊙ w3 x), no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class FinalLayer(nn.Module):
    """Per-frame (shift, scale) modulation and the fp32 output Linear: [B, N, C] -> [B, N, patch·out] fp32."""

    def __init__(self, hidden_size: int, patch_features: int, adaln_tembed_dim: int):
        super().__init__()
        self.norm_final = LayerNormFp32(hidden_size, elementwise_affine=False)
        self.linear = Fp32Linear(hidden_size, patch_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Fp32Linear(adaln_tembed_dim, 2 * hidden_size))

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        """x [B, N, C]; t_emb [B, T, a] fp32."""
        frames = t_emb.shape[1]
        shift, scale = self.adaLN_modulation(t_emb).unsqueeze(2).chunk(2, dim=-1)  # [B, T, 1, C] each
        return self.linear(modulate(self.norm_final, x, shift, scale, frames))
