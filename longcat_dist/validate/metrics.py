"""Validation metrics: latent-space error against the ground-truth clip and first-frame drift in pixels."""

from __future__ import annotations

import math

import torch

# Pixels live in [-1, 1], so the peak-to-peak range for pixel PSNR is 2.
PIXEL_RANGE = 2.0


def psnr(mse: float, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB for a mean squared error and a peak-to-peak range."""
    if mse <= 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def latent_errors(generated: torch.Tensor, ground_truth: torch.Tensor) -> dict[str, float]:
    """MSE and PSNR of generated vs ground-truth latents [16, T, h, w] over the noise frames (frame 0 is pinned).

    The PSNR peak is the ground truth's own range, since normalized latents have no fixed scale.
    """
    if generated.shape != ground_truth.shape:
        raise ValueError(
            f"latent_errors: generated {tuple(generated.shape)} and ground truth {tuple(ground_truth.shape)} differ."
        )
    generated = generated[:, 1:].float()
    ground_truth = ground_truth[:, 1:].float()
    mse = torch.mean((generated - ground_truth) ** 2).item()
    data_range = (ground_truth.max() - ground_truth.min()).item()
    return {"latent_mse": mse, "latent_psnr": psnr(mse, data_range)}


def first_frame_drift(generated_frames: torch.Tensor, start_frame: torch.Tensor) -> dict[str, float]:
    """Mean absolute error and PSNR between generated frame 0 [3, F, H, W] and the start frame [3, H, W], in [-1, 1]."""
    first = generated_frames[:, 0].float()
    if first.shape != start_frame.shape:
        raise ValueError(
            f"first_frame_drift: frame 0 {tuple(first.shape)} vs start frame {tuple(start_frame.shape)}."
        )
    difference = first - start_frame.float()
    return {
        "first_frame_mae": difference.abs().mean().item(),
        "first_frame_psnr": psnr(torch.mean(difference**2).item(), PIXEL_RANGE),
    }
