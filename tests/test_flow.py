"""Flow-matching math: sigma shift, per-sample draws, noising, timesteps, target sign, loss mask, text batches."""

import math

import pytest
import torch

from longcat_dist import flow

SHAPE = (16, 3, 4, 4)  # [C, T, H, W]


def test_shift_sigmas_formula_and_monotone():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    sig = flow.shift_sigmas(u, 12.0)
    assert sig[0] == 0 and sig[-1] == 1
    assert torch.all(sig[1:] > sig[:-1])
    # u = 0.5 -> 12*0.5 / (1 + 11*0.5) = 6 / 6.5
    assert sig[50].item() == pytest.approx(6 / 6.5, abs=1e-12)
    # Shift 12 pushes sigmas towards noise: every interior sigma is above u.
    assert torch.all(sig[1:-1] > u[1:-1])
    assert torch.allclose(flow.shift_sigmas(u, 1.0), u)


def test_scheduler_table_values():
    # Spec §4.3: shift-12 sigmas of linspace(1, 0.001, 50) end with 0.20777 and 0.01187.
    s = torch.linspace(1, 0.001, 50)
    sig = flow.shift_sigmas(s, 12.0)
    assert sig[-2].item() == pytest.approx(0.20777, abs=1e-4)
    assert sig[-1].item() == pytest.approx(0.01187, abs=1e-4)


def test_draws_depend_only_on_seed_key_epoch():
    a = flow.draw_batch(7, ["x/1", "x/2"], 0, SHAPE, shift=12.0, caption_dropout_probability=0.5)
    b = flow.draw_batch(7, ["x/2"], 0, SHAPE, shift=12.0, caption_dropout_probability=0.5)
    assert torch.equal(a.noise[1], b.noise[0]) and a.sigmas[1] == b.sigmas[0]
    assert a.drop_caption[1] == b.drop_caption[0]
    c = flow.draw_batch(7, ["x/2"], 1, SHAPE, shift=12.0)
    d = flow.draw_batch(8, ["x/2"], 0, SHAPE, shift=12.0)
    assert not torch.equal(b.noise, c.noise) and not torch.equal(b.noise, d.noise)


def test_logit_normal_concentrates_mid_u():
    keys = [f"k{i}" for i in range(400)]
    uni = flow.draw_batch(0, keys, 0, (1, 1, 1, 1), shift=1.0).sigmas
    ln = flow.draw_batch(0, keys, 0, (1, 1, 1, 1), shift=1.0, timestep_sampling="logit_normal").sigmas
    assert uni.std() > ln.std() + 0.05
    assert abs(ln.mean().item() - 0.5) < 0.05
    with pytest.raises(ValueError, match="timestep_sampling"):
        flow.draw_sample(0, "k", 0, (1, 1, 1, 1), shift=1.0, timestep_sampling="beta")


def test_caption_dropout_rate():
    keys = [f"k{i}" for i in range(2000)]
    drop = flow.draw_batch(3, keys, 0, (1, 1, 1, 1), shift=12.0, caption_dropout_probability=0.2).drop_caption
    rate = drop.float().mean().item()
    assert abs(rate - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 2000)
    none = flow.draw_batch(3, keys[:50], 0, (1, 1, 1, 1), shift=12.0, caption_dropout_probability=0.0)
    assert not none.drop_caption.any()
    null = torch.zeros(1, 4)
    texts = [torch.ones(3, 4), torch.full((2, 4), 2.0)]
    out = flow.drop_captions(texts, torch.tensor([True, False]), [null, null])
    assert out[0] is null and out[1] is texts[1]


def test_noising_keeps_cond_frame_clean_and_follows_definition():
    torch.manual_seed(0)
    video = torch.randn(2, *SHAPE).bfloat16()
    cond = torch.randn(2, 16, 1, 4, 4).bfloat16()
    draws = flow.draw_batch(1, ["a", "b"], 0, SHAPE, shift=12.0)
    x = flow.noise_latents(video, cond, draws.sigmas, draws.noise)
    assert torch.equal(x[:, :, :1], cond.float())
    sig = draws.sigmas.view(-1, 1, 1, 1, 1)
    assert torch.allclose(x[:, :, 1:], ((1 - sig) * video.float() + sig * draws.noise)[:, :, 1:])


def test_target_sign_matches_flow_definition():
    # d x_sigma / d sigma = eps - x0, and the DiT predicts the data-ward velocity x0 - eps.
    torch.manual_seed(1)
    x0, eps = torch.randn(1, *SHAPE), torch.randn(1, *SHAPE)
    cond = x0[:, :, :1]
    sig, h = torch.tensor([0.4]), 1e-3
    ahead = flow.noise_latents(x0, cond, sig + h, eps)
    behind = flow.noise_latents(x0, cond, sig - h, eps)
    velocity = (behind - ahead) / (2 * h)  # moving towards data: sigma decreasing
    target = flow.flow_target(x0, eps)
    assert torch.allclose(velocity[:, :, 1:], target[:, :, 1:], atol=1e-3)
    # One exact Euler step from sigma to 0 with the target recovers x0.
    x = flow.noise_latents(x0, cond, sig, eps)
    assert torch.allclose((x + sig.view(-1, 1, 1, 1, 1) * target)[:, :, 1:], x0[:, :, 1:], atol=1e-5)


def test_timesteps_zero_on_cond_frame():
    t = flow.frame_timesteps(torch.tensor([0.5, 1.0]), num_frames=4)
    assert t.shape == (2, 4)
    assert torch.equal(t[:, 0], torch.zeros(2))
    assert torch.equal(t[:, 1:], torch.tensor([[500.0] * 3, [1000.0] * 3]))


def test_loss_ignores_cond_frame_and_averages_per_sample():
    pred, target = torch.zeros(2, *SHAPE), torch.zeros(2, *SHAPE)
    pred[:, :, 0] = 100.0  # cond frame: anything goes
    assert flow.noise_frame_loss(pred, target) == 0
    pred[0, :, 1:] = 1.0
    assert flow.noise_frame_loss(pred, target).item() == pytest.approx(0.5)
    # A batch's loss is the mean of its single-sample losses (data-parallel equivalence).
    singles = [flow.noise_frame_loss(pred[i : i + 1], target[i : i + 1]) for i in range(2)]
    assert flow.noise_frame_loss(pred, target) == torch.stack(singles).mean()


def test_pad_text_pads_to_batch_max_with_mask():
    texts = [torch.ones(3, 4), torch.full((5, 4), 2.0)]
    embeds, mask = flow.pad_text(texts)
    assert embeds.shape == (2, 1, 5, 4) and mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert torch.equal(embeds[0, 0, 3:], torch.zeros(2, 4)) and torch.equal(embeds[1, 0], texts[1])
    with pytest.raises(ValueError, match="widths"):
        flow.pad_text([torch.ones(3, 4), torch.ones(3, 5)])
    fixed, fixed_mask = flow.pad_text(texts[:1], length=6)
    assert fixed.shape == (1, 1, 6, 4) and fixed_mask.tolist() == [[1, 1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="pad length 4"):
        flow.pad_text(texts, length=4)
