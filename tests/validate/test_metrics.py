"""Latent MSE/PSNR over the noise frames and first-frame drift in pixel space."""

import math

import pytest
import torch

from longcat_dist.validate.metrics import first_frame_drift, latent_errors, psnr


def test_latent_errors_skip_the_pinned_frame_and_use_the_truth_range():
    truth = torch.zeros(16, 3, 2, 2)
    truth[0, 1, 0, 0], truth[0, 1, 0, 1] = -1.0, 1.0  # range 2 over the noise frames
    generated = truth.clone()
    generated[:, 0] += 100.0  # frame 0 differences must not count
    generated[:, 1:] += 0.5
    errors = latent_errors(generated, truth)
    assert errors["latent_mse"] == pytest.approx(0.25)
    assert errors["latent_psnr"] == pytest.approx(10 * math.log10(4 / 0.25))


def test_latent_errors_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(16, 3, 2, 2\).*\(16, 2, 2, 2\)"):
        latent_errors(torch.zeros(16, 3, 2, 2), torch.zeros(16, 2, 2, 2))


def test_first_frame_drift_compares_frame_zero_only():
    start = torch.zeros(3, 4, 4)
    video = torch.ones(3, 5, 4, 4)
    video[:, 0] = 0.1
    drift = first_frame_drift(video, start)
    assert drift["first_frame_mae"] == pytest.approx(0.1)
    assert drift["first_frame_psnr"] == pytest.approx(psnr(0.01, 2.0))
    assert first_frame_drift(torch.zeros(3, 2, 4, 4), start)["first_frame_psnr"] == math.inf
