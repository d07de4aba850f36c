"""Pure sampler math: shifted sigmas, per-frame timesteps, CFG-Zero*, text padding, frame counts."""

import pytest
import torch

from longcat_dist.validate.sampler import (
    cfg_zero_star,
    latent_frames_for,
    model_timesteps,
    pad_text,
    shifted_sigmas,
)


def test_shift12_sigmas_match_the_official_values():
    sigmas = shifted_sigmas(50, 12.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,)
    expected_head = torch.tensor([1.0, 0.99827, 0.99647])
    expected_tail = torch.tensor([0.34347, 0.20777, 0.01187, 0.0])
    torch.testing.assert_close(sigmas[:3], expected_head, atol=1e-5, rtol=0)
    torch.testing.assert_close(sigmas[-4:], expected_tail, atol=1e-5, rtol=0)
    assert torch.all(sigmas[1:] < sigmas[:-1]), "sigmas must decrease strictly"


def test_bf16_timesteps_match_the_official_values():
    sigmas = shifted_sigmas(50, 12.0)
    firsts = [model_timesteps(s, 1, 3)[0, 1].item() for s in sigmas[:4]]
    lasts = [model_timesteps(s, 1, 3)[0, 1].item() for s in sigmas[-4:-1]]
    assert firsts == [1000.0, 1000.0, 996.0, 996.0]
    assert lasts == [344.0, 208.0, 11.875]


def test_timesteps_are_zero_on_the_cond_frame_only():
    timesteps = model_timesteps(torch.tensor(0.5), 2, 4)
    assert timesteps.shape == (2, 4)
    assert torch.equal(timesteps[:, 0], torch.zeros(2))
    assert torch.equal(timesteps[:, 1:], torch.full((2, 3), 500.0))


def test_shift_one_is_the_plain_linear_schedule():
    torch.testing.assert_close(shifted_sigmas(4, 1.0)[:-1], torch.linspace(1.0, 0.001, 4))


@pytest.mark.parametrize("steps, shift", [(0, 12.0), (10, 0.0)])
def test_schedule_rejects_bad_arguments(steps, shift):
    with pytest.raises(ValueError, match="num_steps|shift"):
        shifted_sigmas(steps, shift)


def _cfg_zero_star_reference(v_cond, v_uncond, guidance):
    """The formula of spec §4.4 written out for one sample at a time, in float64."""
    out = []
    for c, u in zip(v_cond.double(), v_uncond.double()):
        scale = (c * u).sum() / ((u * u).sum() + 1e-8)
        out.append(scale * u + guidance * (c - scale * u))
    return torch.stack(out)


def test_cfg_zero_star_matches_its_formula_per_sample():
    generator = torch.Generator().manual_seed(0)
    v_cond = torch.randn(3, 16, 4, 6, 8, generator=generator)
    # Give the samples very different scales so that a shared (batch-wide) projection would be caught.
    v_uncond = torch.randn(3, 16, 4, 6, 8, generator=generator) * torch.tensor([0.1, 1.0, 7.0]).view(
        3, 1, 1, 1, 1
    )
    guided = cfg_zero_star(v_cond, v_uncond, 4.0)
    assert guided.dtype == torch.float32
    torch.testing.assert_close(
        guided.double(), _cfg_zero_star_reference(v_cond, v_uncond, 4.0), rtol=1e-5, atol=1e-5
    )
    single = cfg_zero_star(v_cond[2:], v_uncond[2:], 4.0)
    torch.testing.assert_close(guided[2:], single)


def test_cfg_zero_star_with_guidance_one_is_the_conditional_branch():
    v_cond, v_uncond = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 16, 2, 4, 4)
    torch.testing.assert_close(cfg_zero_star(v_cond, v_uncond, 1.0), v_cond)


def test_pad_text_pads_right_and_masks():
    a, b = torch.ones(2, 8), torch.full((5, 8), 2.0)
    text, mask = pad_text([a, b], length=6)
    assert text.shape == (2, 1, 6, 8) and mask.shape == (2, 6) and mask.dtype == torch.int64
    assert mask.tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert torch.equal(text[0, 0, :2], a) and torch.count_nonzero(text[0, 0, 2:]) == 0
    assert torch.equal(text[1, 0, :5], b)


def test_pad_text_rejects_too_long_and_mixed_widths():
    with pytest.raises(ValueError, match="more than the text length 3"):
        pad_text([torch.ones(4, 8)], length=3)
    with pytest.raises(ValueError, match="different widths"):
        pad_text([torch.ones(4, 8), torch.ones(4, 9)])


@pytest.mark.parametrize("frames, latents", [(93, 24), (1, 1), (5, 2), (94, 24), (96, 24), (97, 25)])
def test_latent_frames_follow_the_4k_plus_1_rule(frames, latents):
    assert latent_frames_for(frames) == latents
