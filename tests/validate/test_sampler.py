"""The I2V sampler on the real tiny DiT: pinned cond frame, CFG paths, batching, and the official loop."""

import pytest
import torch

from longcat_dist.model.transformer import TINY_DIT, DiTConfig, LongCatVideoTransformer3DModel
from longcat_dist.validate.sampler import pad_prompts, sample_i2v, shifted_sigmas

TEXT_LENGTH = 6
FRAMES = 3
STEPS = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LongCatVideoTransformer3DModel(DiTConfig(**TINY_DIT)).eval()


def _inputs(batch, seed=1):
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 16, 1, 4, 4, generator=gen).to(torch.bfloat16)
    prompts = [torch.randn(2 + b, 32, generator=gen) for b in range(batch)]
    negatives = [torch.randn(1, 32, generator=gen) for _ in range(batch)]
    return cond, *pad_prompts(prompts, negatives, TEXT_LENGTH)


def _generators(batch, seed=7):
    return [torch.Generator().manual_seed(seed + b) for b in range(batch)]


def _official_loop(model, cond, text, mask, neg_text, neg_mask, guidance, generator):
    """Spec §5.1 step 7 for B = 1, written out as the official pipeline does it."""
    latents = torch.randn(1, 16, FRAMES, 4, 4, generator=generator)
    latents[:, :, 0:1] = cond.float()
    use_cfg = guidance > 1
    emb = torch.cat([neg_text, text]) if use_cfg else text
    emb_mask = torch.cat([neg_mask, mask]) if use_cfg else mask
    sigmas = shifted_sigmas(STEPS, 12.0)
    for i in range(STEPS):
        inp = torch.cat([latents] * 2) if use_cfg else latents
        ts = torch.full((inp.shape[0], FRAMES), 1000 * sigmas[i].item()).to(torch.bfloat16)
        ts[:, 0] = 0
        v = model(inp, ts.float(), emb, emb_mask, num_cond_latents=1)
        if use_cfg:
            v_u, v_c = v.chunk(2)
            s = (v_c * v_u).sum() / ((v_u * v_u).sum() + 1e-8)
            v = s * v_u + guidance * (v_c - s * v_u)
        latents[:, :, 1:] = latents[:, :, 1:] + (sigmas[i + 1] - sigmas[i]) * (-v[:, :, 1:])
    return latents


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_matches_the_official_loop_and_keeps_the_cond_frame_bit_identical(model, guidance):
    cond, text, mask, neg_text, neg_mask = _inputs(1)
    out = sample_i2v(model, cond, text, mask, negative_text=neg_text, negative_mask=neg_mask,
                     num_latent_frames=FRAMES, num_steps=STEPS, guidance=guidance,
                     generators=_generators(1))  # fmt: skip
    assert out.dtype == torch.float32 and out.shape == (1, 16, FRAMES, 4, 4)
    assert torch.equal(out[:, :, :1], cond.float()), "the cond frame must never change"
    noise = torch.randn(1, 16, FRAMES, 4, 4, generator=_generators(1)[0])
    assert (out[:, :, 1:] - noise[:, :, 1:]).abs().mean() > 0.01, "the noise frames must have been denoised"
    expected = _official_loop(model, cond, text, mask, neg_text, neg_mask, guidance, _generators(1)[0])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_guidance_one_is_the_conditional_path_with_one_forward_per_step(model):
    cond, text, mask, neg_text, neg_mask = _inputs(1)
    calls, handle = _count_forwards(model)
    try:
        plain = sample_i2v(model, cond, text, mask, num_latent_frames=FRAMES, num_steps=STEPS, guidance=1.0,
                           generators=_generators(1))  # fmt: skip
        assert calls == [1] * STEPS, "guidance 1 must run one single-batch forward per step"
        calls.clear()
        guided = sample_i2v(model, cond, text, mask, negative_text=neg_text, negative_mask=neg_mask,
                            num_latent_frames=FRAMES, num_steps=STEPS, guidance=4.0,
                            generators=_generators(1))  # fmt: skip
        assert calls == [2] * STEPS, "CFG must batch [negative; positive] in one forward per step"
    finally:
        handle.remove()
    assert not torch.allclose(plain, guided, atol=1e-3), "guidance 4 must change the result"


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_a_batch_equals_separate_runs(model, guidance):
    cond, text, mask, neg_text, neg_mask = _inputs(3)
    batched = sample_i2v(model, cond, text, mask, negative_text=neg_text, negative_mask=neg_mask,
                         num_latent_frames=FRAMES, num_steps=STEPS, guidance=guidance,
                         generators=_generators(3))  # fmt: skip
    for b in range(3):
        one = slice(b, b + 1)
        single = sample_i2v(model, cond[one], text[one], mask[one], negative_text=neg_text[one],
                            negative_mask=neg_mask[one], num_latent_frames=FRAMES, num_steps=STEPS,
                            guidance=guidance, generators=_generators(3)[b : b + 1])  # fmt: skip
        torch.testing.assert_close(batched[one], single, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_text_padding_length_changes_the_output_as_in_the_official_model(model):
    # text_tokens_zero_pad: pad tokens are zero vectors that still take part in cross-attention.
    cond, *_ = _inputs(1)
    prompt = [torch.randn(2, 32, generator=torch.Generator().manual_seed(3))]
    short_text, short_mask, _, _ = pad_prompts(prompt, prompt, None)
    long_text, long_mask, _, _ = pad_prompts(prompt, prompt, TEXT_LENGTH)
    kwargs = dict(num_latent_frames=FRAMES, num_steps=2, guidance=1.0)
    short = sample_i2v(model, cond, short_text, short_mask, generators=_generators(1), **kwargs)
    long = sample_i2v(model, cond, long_text, long_mask, generators=_generators(1), **kwargs)
    assert not torch.allclose(short, long, atol=1e-6)


def test_bad_inputs_name_the_rule(model):
    cond, text, mask, neg_text, neg_mask = _inputs(1)
    with pytest.raises(ValueError, match=r"cond_latents must be \[B, 16, 1, h, w\]"):
        sample_i2v(model, cond[:, :8], text, mask, guidance=1.0)
    with pytest.raises(ValueError, match="needs negative_text shaped like text"):
        sample_i2v(model, cond, text, mask, guidance=4.0)
    with pytest.raises(ValueError, match="masks for both"):
        sample_i2v(model, cond, text, mask, negative_text=neg_text, guidance=4.0)
    with pytest.raises(ValueError, match="2 prompts but 1 negative"):
        pad_prompts([torch.ones(1, 32)] * 2, [torch.ones(1, 32)])
