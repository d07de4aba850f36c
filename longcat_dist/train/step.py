"""One flow-matching micro-step of image-to-video LoRA training: draws, noising, DiT call, noise-frame loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from longcat_dist import flow
from longcat_dist.data.stream import Batch

NUM_COND_LATENTS = 1  # I2V: the clean start-frame latent is latent frame 0
PATCH_AREA = 4  # the DiT's 1x2x2 patches: tokens per latent frame = h * w / 4


@dataclass(frozen=True)
class FlowSettings:
    """The TrainConfig values the step needs."""

    seed: int
    shift: float
    timestep_sampling: flow.TimestepSampling = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    caption_dropout_probability: float = 0.0
    text_length: int | None = None  # pad every text to this many tokens (the text encoder's max_length)


def flow_loss(
    model: Callable[..., Tensor],
    batch: Batch,
    *,
    epoch: int,
    settings: FlowSettings,
    null_texts: Mapping[str, Tensor],
    device: torch.device,
) -> tuple[Tensor, int]:
    """The loss of one batch and its video token count; every draw is a function of (seed, sample key, epoch)."""
    draws = flow.draw_batch(
        settings.seed,
        batch.keys,
        epoch,
        batch.video.shape[1:],
        shift=settings.shift,
        timestep_sampling=settings.timestep_sampling,
        logit_mean=settings.logit_mean,
        logit_std=settings.logit_std,
        caption_dropout_probability=settings.caption_dropout_probability,
    )
    video = batch.video.to(device)  # [B, 16, T, h, w] bf16
    noise = draws.noise.to(device)  # [B, 16, T, h, w] fp32
    sigmas = draws.sigmas.to(device)  # [B]
    noisy = flow.noise_latents(video, batch.cond.to(device), sigmas, noise)  # [B, 16, T, h, w] fp32
    frames = video.shape[2]
    timesteps = flow.frame_timesteps(sigmas, frames, NUM_COND_LATENTS)  # [B, T]
    nulls = [null_texts[key.split("/", 1)[0]] for key in batch.keys]
    texts = flow.drop_captions(batch.texts, draws.drop_caption, nulls)
    text, mask = flow.pad_text(texts, settings.text_length)  # [B, 1, L, D], [B, L]
    pred = model(noisy, timesteps, text.to(device), mask.to(device), num_cond_latents=NUM_COND_LATENTS)
    loss = flow.noise_frame_loss(pred, flow.flow_target(video, noise), NUM_COND_LATENTS)
    tokens = video.shape[0] * frames * video.shape[3] * video.shape[4] // PATCH_AREA
    return loss, tokens
