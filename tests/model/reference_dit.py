"""An independent, deliberately plain re-statement of spec §2 used to check the model's forward pass.

It reads the model's parameters by their checkpoint names and recomputes the output with different code paths:
explicit per-frame loops, complex-number RoPE, masked softmax attention written out, and an unpatchify loop.
fp32 only (the precision islands are identities there).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _rms(x: Tensor, weight: Tensor) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight


def _ln(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + 1e-6)
    return out if weight is None else out * weight + bias


def _lin(p: dict, name: str, x: Tensor) -> Tensor:
    bias = p.get(f"{name}.bias")
    out = x @ p[f"{name}.weight"].T
    return out if bias is None else out + bias


def _rope_complex(x: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """RoPE via complex multiplication: pair (x[2i], x[2i+1]) is the complex number x[2i] + i·x[2i+1]."""
    hd = x.shape[-1]
    dhw = 2 * (hd // 6)
    dims = [hd - 2 * dhw, dhw, dhw]
    frames, height, width = grid
    positions = torch.stack(
        torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij"), -1
    ).reshape(-1, 3)
    phases = []
    for axis, dim in enumerate(dims):
        freqs = torch.tensor([10000.0 ** (-2 * i / dim) for i in range(dim // 2)])
        phases.append(positions[:, axis : axis + 1].double() * freqs.double())
    phase = torch.cat(phases, -1)  # [N, hd/2]
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.polar(
        torch.ones_like(phase), phase
    )
    out = torch.stack([z.real, z.imag], -1).flatten(-2)
    return out.float()


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """q [Nq, nh, hd], k/v [Nk, nh, hd], allowed [Nq, Nk] bool -> [Nq, nh, hd]."""
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def reference_forward(model, latents: Tensor, timesteps: Tensor, text: Tensor, num_cond: int) -> Tensor:
    """latents [B, 16, T, H, W], timesteps [B, T], text [B, L, D] (no mask) -> [B, 16, T, H, W]."""
    p = {k: v.float() for k, v in model.state_dict().items()}
    cfg = model.config
    nh, hd = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    outputs = []
    for b in range(latents.shape[0]):
        _, frames, height, width = latents[b].shape
        hp, wp = height // 2, width // 2
        tokens = []  # patchify by explicit loops, (t, h, w) raster
        for t in range(frames):
            for h in range(hp):
                for w in range(wp):
                    patch = latents[b, :, t, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2]  # [16, 2, 2]
                    tokens.append(torch.einsum("cij,ocij->o", patch, p["x_embedder.proj.weight"][:, :, 0]))
        x = torch.stack(tokens) + p["x_embedder.proj.bias"]  # [N, C]
        half = cfg.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        args = timesteps[b][:, None] * freqs[None]
        t_emb = torch.cat([args.cos(), args.sin()], -1)
        t_emb = _lin(p, "t_embedder.mlp.2", F.silu(_lin(p, "t_embedder.mlp.0", t_emb)))  # [T, a]
        y = _lin(
            p, "y_embedder.y_proj.2", F.gelu(_lin(p, "y_embedder.y_proj.0", text[b]), approximate="tanh")
        )
        s = hp * wp
        frame_of = torch.arange(frames * s) // s
        cond = frame_of < num_cond
        allowed = ~cond[:, None] | cond[None, :]  # cond queries see cond keys; noise queries see all
        for i in range(cfg.depth):
            pre = f"blocks.{i}."
            mod = _lin(p, pre + "adaLN_modulation.1", F.silu(t_emb))[frame_of]  # [N, 6C]
            sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, -1)
            h_in = _ln(x) * (1 + sc1) + sh1
            q, k, v = _lin(p, pre + "attn.qkv", h_in).view(-1, 3, nh, hd).unbind(1)
            q = _rope_complex(_rms(q, p[pre + "attn.q_norm.weight"]).transpose(0, 1), (frames, hp, wp))
            k = _rope_complex(_rms(k, p[pre + "attn.k_norm.weight"]).transpose(0, 1), (frames, hp, wp))
            attn = _attend(q.transpose(0, 1), k.transpose(0, 1), v, allowed).reshape(-1, cfg.hidden_size)
            x = x + g1 * _lin(p, pre + "attn.proj", attn)
            c_in = _ln(x, p[pre + "pre_crs_attn_norm.weight"], p[pre + "pre_crs_attn_norm.bias"])
            cq = _rms(
                _lin(p, pre + "cross_attn.q_linear", c_in).view(-1, nh, hd),
                p[pre + "cross_attn.q_norm.weight"],
            )
            ck, cv = _lin(p, pre + "cross_attn.kv_linear", y).view(-1, 2, nh, hd).unbind(1)
            ck = _rms(ck, p[pre + "cross_attn.k_norm.weight"])
            every = torch.ones(len(cq), len(ck), dtype=torch.bool)
            cross = _lin(p, pre + "cross_attn.proj", _attend(cq, ck, cv, every).reshape(-1, cfg.hidden_size))
            x = x + torch.where(cond[:, None], torch.zeros_like(cross), cross)
            f_in = _ln(x) * (1 + sc2) + sh2
            ffn = _lin(
                p, pre + "ffn.w2", F.silu(_lin(p, pre + "ffn.w1", f_in)) * _lin(p, pre + "ffn.w3", f_in)
            )
            x = x + g2 * ffn
        shift, scale = _lin(p, "final_layer.adaLN_modulation.1", F.silu(t_emb))[frame_of].chunk(2, -1)
        feats = _lin(p, "final_layer.linear", _ln(x) * (1 + scale) + shift)  # [N, 64]
        out = torch.zeros(cfg.out_channels, frames, height, width)
        for n in range(frames * s):
            t, h, w = n // s, (n % s) // wp, n % wp
            for j in range(feats.shape[1]):
                hh, ww, c = (j // cfg.out_channels) // 2, (j // cfg.out_channels) % 2, j % cfg.out_channels
                out[c, t, 2 * h + hh, 2 * w + ww] = feats[n, j]
        outputs.append(out)
    return torch.stack(outputs)
