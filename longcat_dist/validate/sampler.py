"""The official image-to-video sampler: shifted Euler flow matching with CFG-Zero* and a pinned start frame."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from longcat_dist.flow import frame_timesteps, shift_sigmas
from longcat_dist.flow import pad_text as flow_pad_text

LATENT_CHANNELS = 16
# Temporal compression of the Wan VAE: latent frame 0 is video frame 0, then one latent per 4 frames.
VAE_TEMPORAL_STRIDE = 4
# Denominator guard of the CFG-Zero* projection, the official value.
CFG_ZERO_EPS = 1e-8
# The official schedule runs s from 1 down to this value before the shift, then appends sigma = 0.
SIGMA_FLOOR = 0.001


def latent_frames_for(num_video_frames: int) -> int:
    """Latent frames for a clip, after the official snap of the frame count to 4k + 1."""
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames={num_video_frames}: must be >= 1 (e.g. 93).")
    snapped = (num_video_frames - 1) // VAE_TEMPORAL_STRIDE * VAE_TEMPORAL_STRIDE + 1
    return (snapped - 1) // VAE_TEMPORAL_STRIDE + 1


def shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """Sigmas of the official schedule: shift(linspace(1, 0.001, N)) and a final 0, fp32 [N + 1]."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: the sampler needs at least one step.")
    if shift <= 0:
        raise ValueError(f"shift={shift}: the flow shift must be > 0 (LongCat uses 12).")
    sigmas = shift_sigmas(torch.linspace(1.0, SIGMA_FLOOR, num_steps, dtype=torch.float32), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def model_timesteps(sigma: torch.Tensor | float, batch: int, num_latent_frames: int) -> torch.Tensor:
    """Per-frame timesteps [B, T] for one step: 1000 sigma rounded to bf16 (as the DiT does), 0 on the cond frame."""
    sigmas = torch.as_tensor(sigma, dtype=torch.float32).expand(batch)
    return frame_timesteps(sigmas, num_latent_frames).to(torch.bfloat16).float()  # [B, T]


def cfg_zero_star(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """CFG-Zero*: project v_uncond onto v_cond per sample, then guide; fp32, any batch size."""
    v_cond = v_cond.float()
    v_uncond = v_uncond.float()
    # Per sample over every element (cond frame included, as the official code does), shaped to broadcast
    # over all trailing dims, which fixes the official [B,1,1,1]-against-5-D bug for B > 1.
    dims = tuple(range(1, v_cond.dim()))
    dot = (v_cond * v_uncond).sum(dim=dims, keepdim=True)
    norm_sq = (v_uncond * v_uncond).sum(dim=dims, keepdim=True)
    scale = dot / (norm_sq + CFG_ZERO_EPS)  # [B, 1, 1, 1, 1]
    projected = scale * v_uncond
    return projected + guidance * (v_cond - projected)


def pad_text(
    embeddings: Sequence[torch.Tensor], length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompt embeddings [L_b, D] to `length` (default: the longest); text [B, 1, L, D], mask [B, L].

    With the DiT's text_tokens_zero_pad (the default) pass the text encoder's max_length: the official pipeline
    pads every prompt to it, and the pad tokens take part in cross-attention, so the length changes the output.
    """
    text, mask = flow_pad_text(embeddings)
    if length is None or length == text.shape[2]:
        return text, mask
    if text.shape[2] > length:
        raise ValueError(
            f"pad_text: a prompt has {text.shape[2]} tokens, more than the text length {length}."
        )
    extra = length - text.shape[2]
    return F.pad(text, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def pad_prompts(
    prompts: Sequence[torch.Tensor], negatives: Sequence[torch.Tensor], length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad positive and negative embeddings to one common length: (text, mask, negative_text, negative_mask)."""
    if len(prompts) != len(negatives):
        raise ValueError(f"pad_prompts: {len(prompts)} prompts but {len(negatives)} negative prompts.")
    text, mask = pad_text([*prompts, *negatives], length)
    batch = len(prompts)
    return text[:batch], mask[:batch], text[batch:], mask[batch:]


def draw_noise(
    cond_latents: torch.Tensor, num_latent_frames: int, generators: Sequence[torch.Generator] | None
) -> torch.Tensor:
    """Initial noise [B, 16, T, h, w] fp32 on the CPU, one generator per sample so a batch equals separate runs."""
    batch, channels, _, height, width = cond_latents.shape
    if generators is not None and len(generators) != batch:
        raise ValueError(
            f"draw_noise: {len(generators)} generators for a batch of {batch}; give one per sample."
        )
    shape = (1, channels, num_latent_frames, height, width)
    samples = [
        torch.randn(shape, generator=None if generators is None else generators[b], dtype=torch.float32)
        for b in range(batch)
    ]
    return torch.cat(samples)


def _check_inputs(
    cond_latents: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    negative_text: torch.Tensor | None,
    negative_mask: torch.Tensor | None,
    guidance: float,
) -> None:
    if cond_latents.dim() != 5 or cond_latents.shape[1] != LATENT_CHANNELS or cond_latents.shape[2] != 1:
        raise ValueError(f"cond_latents must be [B, 16, 1, h, w]; got {tuple(cond_latents.shape)}.")
    if text.dim() != 4 or text.shape[0] != cond_latents.shape[0] or text.shape[1] != 1:
        raise ValueError(
            f"text must be [B, 1, L, D] with B = {cond_latents.shape[0]}; got {tuple(text.shape)}."
        )
    if guidance <= 1.0:
        return
    if negative_text is None or negative_text.shape != text.shape:
        got = None if negative_text is None else tuple(negative_text.shape)
        raise ValueError(
            f"guidance {guidance} > 1 needs negative_text shaped like text {tuple(text.shape)}; got {got}. "
            "Pad both with pad_prompts."
        )
    if (text_mask is None) != (negative_mask is None):
        raise ValueError("give masks for both text and negative_text, or for neither.")


@torch.no_grad()
def sample_i2v(
    model: nn.Module,
    cond_latents: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    *,
    negative_text: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    num_latent_frames: int = 24,
    num_steps: int = 40,
    guidance: float = 4.0,
    shift: float = 12.0,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample normalized latents [B, 16, T, h, w] (fp32) whose frame 0 is `cond_latents`, bit for bit.

    text/negative_text are [B, 1, L, D] with masks [B, L] (see `pad_prompts`); guidance > 1 runs CFG-Zero* with
    the batch [negative; positive] in one forward, guidance <= 1 runs the conditional branch alone.
    """
    _check_inputs(cond_latents, text, text_mask, negative_text, negative_mask, guidance)
    weight = next(model.parameters())
    device, dtype = weight.device, getattr(model, "dtype", weight.dtype)
    batch = cond_latents.shape[0]
    use_cfg = guidance > 1.0
    # Noise first, then the start frame written over latent frame 0 (spec §5.1 step 6); fp32 all through.
    latents = draw_noise(cond_latents, num_latent_frames, generators).to(device)  # [B, 16, T, h, w]
    latents[:, :, :1] = cond_latents.to(device, torch.float32)
    if use_cfg:
        context = torch.cat([negative_text, text]).to(device, dtype)  # [2B, 1, L, D], official order
        context_mask = None if text_mask is None else torch.cat([negative_mask, text_mask]).to(device)
    else:
        context = text.to(device, dtype)
        context_mask = None if text_mask is None else text_mask.to(device)
    sigmas = shifted_sigmas(num_steps, shift)
    for i in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        model_input = torch.cat([latents, latents]) if use_cfg else latents
        timesteps = model_timesteps(sigmas[i], model_input.shape[0], num_latent_frames).to(device)
        velocity = model(
            model_input.to(dtype), timesteps, context, context_mask, num_cond_latents=1
        ).float()  # [B or 2B, 16, T, h, w], the data-ward velocity x0 - eps
        if use_cfg:
            velocity = cfg_zero_star(velocity[batch:], velocity[:batch], guidance)
        # Euler in fp32 on the noise frames only, x + dsigma * u with u = -v (the DiT's sign is diffusers' negated).
        step = (sigmas[i + 1] - sigmas[i]).item()
        latents[:, :, 1:] = latents[:, :, 1:] + step * -velocity[:, :, 1:]
    return latents
