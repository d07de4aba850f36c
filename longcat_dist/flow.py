"""Flow matching for image-to-video LoRA training: sigmas, per-sample draws, noising, target and loss.

Convention (spec §4.3): x_sigma = (1 - sigma) * x0 + sigma * eps, and the DiT predicts x0 - eps.
All functions are pure; the training step wires them together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

TimestepSampling = Literal["uniform", "logit_normal"]
NUM_TRAIN_TIMESTEPS = 1000  # the DiT sees timesteps in 0..1000 (spec §2.9.1)


def shift_sigmas(u: Tensor, shift: float) -> Tensor:
    """Map u in [0, 1] to sigma = s*u / (1 + (s-1)*u): the scheduler's shift, applied to training draws."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_seed(seed: int, key: str, epoch: int) -> int:
    """A 63-bit seed that depends only on (run seed, sample key, epoch): never on rank or batch position."""
    digest = hashlib.sha256(f"{seed}\x1f{epoch}\x1f{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class FlowDraws:
    """The random choices of one batch, each row a pure function of (seed, key, epoch)."""

    sigmas: Tensor  # [B] float32
    noise: Tensor  # [B, C, T, H, W] float32
    drop_caption: Tensor  # [B] bool


def draw_sample(
    seed: int,
    key: str,
    epoch: int,
    latent_shape: Sequence[int],
    *,
    shift: float,
    timestep_sampling: TimestepSampling = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    caption_dropout_probability: float = 0.0,
) -> tuple[float, Tensor, bool]:
    """Draw (sigma, noise, drop_caption) for one sample; the draw order is fixed so old runs replay exactly."""
    gen = torch.Generator().manual_seed(sample_seed(seed, key, epoch))
    if timestep_sampling == "uniform":
        u = torch.rand((), generator=gen, dtype=torch.float64)
    elif timestep_sampling == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn((), generator=gen, dtype=torch.float64))
    else:
        raise ValueError(f"timestep_sampling = {timestep_sampling!r}: expected 'uniform' or 'logit_normal'")
    drop = bool(torch.rand((), generator=gen, dtype=torch.float64) < caption_dropout_probability)
    noise = torch.randn(tuple(latent_shape), generator=gen, dtype=torch.float32)  # [C, T, H, W]
    sigma = float(shift_sigmas(u, shift))
    return sigma, noise, drop


def draw_batch(
    seed: int,
    keys: Sequence[str],
    epoch: int,
    latent_shape: Sequence[int],
    **kwargs,
) -> FlowDraws:
    """draw_sample for every key of a batch, stacked; kwargs as draw_sample's."""
    rows = [draw_sample(seed, key, epoch, latent_shape, **kwargs) for key in keys]
    return FlowDraws(
        sigmas=torch.tensor([r[0] for r in rows], dtype=torch.float32),
        noise=torch.stack([r[1] for r in rows]),
        drop_caption=torch.tensor([r[2] for r in rows], dtype=torch.bool),
    )


def noise_latents(video: Tensor, cond_latents: Tensor, sigmas: Tensor, noise: Tensor) -> Tensor:
    """x = (1 - sigma) * x0 + sigma * eps on every frame, then the clean start-frame latent as frame 0."""
    x0 = video.float()
    sig = sigmas.float().view(-1, 1, 1, 1, 1)
    noisy = (1.0 - sig) * x0 + sig * noise  # [B, C, T, H, W]
    num_cond = cond_latents.shape[2]
    noisy[:, :, :num_cond] = cond_latents.float()
    return noisy


def frame_timesteps(sigmas: Tensor, num_frames: int, num_cond_latents: int = 1) -> Tensor:
    """Per-latent-frame timesteps 1000 * sigma, with 0 for the clean cond frames (the official pipeline's)."""
    timesteps = (NUM_TRAIN_TIMESTEPS * sigmas.float()).view(-1, 1).repeat(1, num_frames)  # [B, T]
    timesteps[:, :num_cond_latents] = 0.0
    return timesteps


def flow_target(video: Tensor, noise: Tensor) -> Tensor:
    """The DiT's regression target x0 - eps (the official sign, spec §2.9.4)."""
    return video.float() - noise.float()


def noise_frame_loss(pred: Tensor, target: Tensor, num_cond_latents: int = 1) -> Tensor:
    """MSE over the noise frames only; per-sample means averaged, so a batch equals its data-parallel split."""
    diff = pred.float()[:, :, num_cond_latents:] - target.float()[:, :, num_cond_latents:]
    return diff.pow(2).flatten(1).mean(dim=1).mean()


def drop_captions(texts: Sequence[Tensor], drop: Tensor, null_texts: Sequence[Tensor]) -> list[Tensor]:
    """Replace the text of every dropped sample by the empty-prompt embedding of its dataset."""
    return [null if bool(d) else text for text, d, null in zip(texts, drop, null_texts, strict=True)]


def pad_text(texts: Sequence[Tensor], length: int | None = None) -> tuple[Tensor, Tensor]:
    """Stack embeddings [L_i, D] as [B, 1, L, D] zero-padded to `length` (default: the batch max), with mask [B, L].

    With text_tokens_zero_pad the DiT attends to the zero pad tokens too (spec §2.9.3), so its output depends on
    L: a fixed length (the text encoder's max_length, as the official pipeline pads) makes a sample's loss
    independent of the batch it is in.
    """
    if not texts:
        raise ValueError("pad_text needs at least one embedding")
    dims = {t.shape[-1] for t in texts}
    if len(dims) != 1:
        raise ValueError(f"text embeddings of one batch have different widths {sorted(dims)}")
    longest = max(t.shape[0] for t in texts)
    if length is not None and longest > length:
        raise ValueError(f"a text embedding has {longest} tokens, more than the pad length {length}")
    max_len = longest if length is None else length
    embeds = texts[0].new_zeros(len(texts), 1, max_len, dims.pop())  # [B, 1, L, D]
    mask = torch.zeros(len(texts), max_len, dtype=torch.long)  # [B, L]
    for i, text in enumerate(texts):
        embeds[i, 0, : text.shape[0]] = text
        mask[i, : text.shape[0]] = 1
    return embeds, mask
