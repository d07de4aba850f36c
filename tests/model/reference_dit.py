"""An independent, deliberately plain re-statement of spec §2 used to check the model's forward pass.

It reads the model's parameters by their checkpoint names and recomputes the output with different code paths:
explicit per-frame loops, complex-number RoPE, masked softmax attention written out, and an unpatchify loop.
`reference_forward` is fp32 only (the precision islands are identities there); `reference_forward_bf16` below
restates the bf16 dtype rules of §2.12 op by op for bitwise comparison.
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


# ---------------------------------------------------------------------------------------------------------------
# The same forward pass with spec §2.12's dtype rules written out op by op, for bitwise comparison in bf16.
# Bitwise parity only holds between identical kernels, so this part calls the primitives any implementation calls
# (conv3d, linear, layer_norm, scaled_dot_product_attention) on whole-batch tensors (rule 7); what it restates
# independently is every cast, every fp32 island and the order of the elementwise maths around them.

EPS = 1e-6


def _linear(p: dict, name: str, x: Tensor) -> Tensor:
    """A Linear in the model dtype (rule 4)."""
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def _linear_fp32(p: dict, name: str, x: Tensor) -> Tensor:
    """A Linear inside the official autocast(fp32) regions: input and weights upcast (rule 2)."""
    return F.linear(x.float(), p[f"{name}.weight"].float(), p[f"{name}.bias"].float())


def _rms_bf16(x: Tensor, weight: Tensor) -> Tensor:
    """Normalised in fp32, rounded to x's dtype, then scaled by the weight in that dtype (rule 5)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + EPS)).to(x.dtype) * weight


def _modulate_bf16(x: Tensor, shift: Tensor, scale: Tensor, frames: int) -> Tensor:
    """x [B, N, C] model dtype; shift/scale [B, T, 1, C] fp32; all maths fp32, one cast at the end (rule 3)."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=EPS).unflatten(1, (frames, -1))  # [B, T, S, C]
    return (normed * (1 + scale) + shift).flatten(1, 2).to(x.dtype)


def _gated_bf16(x: Tensor, gate: Tensor, update: Tensor, frames: int) -> Tensor:
    """bf16(x + gate ⊙ update) with the product and the sum in fp32 (rule 3)."""
    out = x.float().unflatten(1, (frames, -1)) + gate * update.float().unflatten(1, (frames, -1))
    return out.flatten(1, 2).to(x.dtype)


def _rope_table_cpu(hd: int, grid: tuple[int, int, int]) -> Tensor:
    """Spec §2.5 angles [N, hd], built on the CPU in fp32 (rule 6) by gathering per-axis rows."""
    dhw = 2 * (hd // 6)
    frames, height, width = grid
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    parts = []
    for positions, size, dim in ((t, frames, hd - 2 * dhw), (h, height, dhw), (w, width, dhw)):
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
        axis = torch.arange(size, dtype=torch.float32, device="cpu")[:, None] * inv[None]  # [n, dim/2]
        parts.append(axis[positions.flatten()])
    half = torch.cat(parts, -1)  # [N, hd/2]
    return torch.stack([half, half], -1).flatten(-2)


def _rope_bf16(x: Tensor, table: Tensor) -> Tensor:
    """GPT-J rotation in fp32 with cos/sin taken on x's device, rounded back to x's dtype."""
    angles = table.to(x.device)
    cos, sin = angles.cos()[:, 0::2], angles.sin()[:, 0::2]
    x32 = x.float()
    even, odd = x32[..., 0::2], x32[..., 1::2]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1).flatten(-2).to(x.dtype)


def _sdpa_split(q: Tensor, k: Tensor, v: Tensor, cond_tokens: int) -> Tensor:
    """Cond queries see cond keys only; noise queries see every key (§2.10)."""
    if cond_tokens == 0:
        return F.scaled_dot_product_attention(q, k, v)
    m = cond_tokens
    cond = F.scaled_dot_product_attention(q[:, :, :m], k[:, :, :m], v[:, :, :m])
    return torch.cat([cond, F.scaled_dot_product_attention(q[:, :, m:], k, v)], dim=2)


def _block_bf16(
    p: dict, pre: str, x: Tensor, y: Tensor, t_emb: Tensor, grid, cfg, cond_tokens: int
) -> Tensor:
    """One block of §2.8; x [B, N, C] model dtype, y packed text [B·L, C], t_emb [B, T, a] fp32."""
    batch, tokens, dim = x.shape
    nh, hd, frames = cfg.num_heads, dim // cfg.num_heads, grid[0]
    mod = _linear_fp32(p, pre + "adaLN_modulation.1", F.silu(t_emb))[:, :, None]  # [B, T, 1, 6C] fp32
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, -1)
    qkv = _linear(p, pre + "attn.qkv", _modulate_bf16(x, sh1, sc1, frames)).view(batch, tokens, 3, nh, hd)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, nh, N, hd]
    table = _rope_table_cpu(hd, grid)
    q = _rope_bf16(_rms_bf16(q, p[pre + "attn.q_norm.weight"]), table)
    k = _rope_bf16(_rms_bf16(k, p[pre + "attn.k_norm.weight"]), table)
    attn = _sdpa_split(q, k, v, cond_tokens).transpose(1, 2).reshape(batch, tokens, dim)
    x = _gated_bf16(x, g1, _linear(p, pre + "attn.proj", attn), frames)
    w, b = p[pre + "pre_crs_attn_norm.weight"], p[pre + "pre_crs_attn_norm.bias"]
    c_in = F.layer_norm(x.float(), (dim,), w.float(), b.float(), EPS).to(x.dtype)[:, cond_tokens:]
    cq = _linear(p, pre + "cross_attn.q_linear", c_in).view(batch, -1, nh, hd)
    cq = _rms_bf16(cq, p[pre + "cross_attn.q_norm.weight"]).transpose(1, 2)
    ckv = _linear(p, pre + "cross_attn.kv_linear", y).view(-1, 2, nh, hd)
    ck = _rms_bf16(ckv[:, 0], p[pre + "cross_attn.k_norm.weight"]).view(batch, -1, nh, hd).transpose(1, 2)
    cv = ckv[:, 1].reshape(batch, -1, nh, hd).transpose(1, 2)
    cross = F.scaled_dot_product_attention(cq, ck, cv).transpose(1, 2).reshape(batch, -1, dim)
    cross = _linear(p, pre + "cross_attn.proj", cross)
    x = x + torch.cat([cross.new_zeros(batch, cond_tokens, dim), cross], 1)  # plain model-dtype add, no gate
    f_in = _modulate_bf16(x, sh2, sc2, frames)
    ffn = _linear(
        p, pre + "ffn.w2", F.silu(_linear(p, pre + "ffn.w1", f_in)) * _linear(p, pre + "ffn.w3", f_in)
    )
    return _gated_bf16(x, g2, ffn, frames)


def reference_forward_bf16(
    model, latents: Tensor, timesteps: Tensor, text: Tensor, num_cond: int, mask: Tensor | None = None
) -> Tensor:
    """latents [B, 16, T, H, W], timesteps [B, T], text [B, 1, L, D], mask [B, L] (zero-pad mode) -> fp32 out.

    Runs in the model's own dtype and device, under the spec's mixed-precision rules.
    """
    p = dict(model.state_dict())
    cfg = model.config
    dtype = p["x_embedder.proj.weight"].dtype
    batch, _, frames, height, width = latents.shape
    grid = (frames, height // 2, width // 2)
    x = F.conv3d(latents.to(dtype), p["x_embedder.proj.weight"], p["x_embedder.proj.bias"], stride=(1, 2, 2))
    x = x.flatten(2).transpose(1, 2)  # [B, N, C]
    half = cfg.frequency_embedding_size // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device="cpu") / half)
    rounded = timesteps.to(dtype).float().flatten()  # rule 1: bf16 rounding before the sinusoid
    args = rounded[:, None] * freqs.to(latents.device)[None]
    t_emb = torch.cat([args.cos(), args.sin()], -1)
    t_emb = _linear_fp32(p, "t_embedder.mlp.2", F.silu(_linear_fp32(p, "t_embedder.mlp.0", t_emb)))
    t_emb = t_emb.view(batch, frames, -1)  # [B, T, a] fp32
    y = _linear(p, "y_embedder.y_proj.0", text.to(dtype))
    y = _linear(p, "y_embedder.y_proj.2", F.gelu(y, approximate="tanh"))[:, 0]  # [B, L, C]
    if mask is not None:
        if not cfg.text_tokens_zero_pad:
            raise NotImplementedError(
                "the bf16 reference covers the production text_tokens_zero_pad mode only"
            )
        y = y * mask[:, :, None].to(dtype)
    y = y.reshape(-1, cfg.hidden_size)  # packed [B·L, C]
    cond_tokens = num_cond * grid[1] * grid[2]
    for i in range(cfg.depth):
        x = _block_bf16(p, f"blocks.{i}.", x, y, t_emb, grid, cfg, cond_tokens)
    shift, scale = _linear_fp32(p, "final_layer.adaLN_modulation.1", F.silu(t_emb))[:, :, None].chunk(2, -1)
    feats = _linear_fp32(p, "final_layer.linear", _modulate_bf16(x, shift, scale, frames))  # [B, N, 64] fp32
    channels = cfg.out_channels
    out = feats.new_zeros(batch, channels, frames, height, width)
    for hh in range(2):
        for ww in range(2):
            part = feats[..., (hh * 2 + ww) * channels : (hh * 2 + ww + 1) * channels]
            out[:, :, :, hh::2, ww::2] = part.view(batch, *grid, channels).permute(0, 4, 1, 2, 3)
    return out
