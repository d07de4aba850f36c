"""The bf16 DiT on CUDA at the production head dim against the dtype-faithful reference (spec §2.12)."""

from __future__ import annotations

import pytest
import torch

from longcat_dist.model.transformer import DiTConfig, LongCatVideoTransformer3DModel
from tests.model.reference_dit import reference_forward_bf16

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def random_model(seed: int = 0, **config) -> LongCatVideoTransformer3DModel:
    """A bf16 CUDA model with default-initialised matrices and random norms and biases, dense SDPA attention."""
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LongCatVideoTransformer3DModel(DiTConfig(**config))
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # matrices keep their fan-in scaling so activations stay O(1) at width 4096
                param.add_(torch.randn_like(param) * 0.1)
    model = model.to(torch.bfloat16).eval()
    model.set_attention_backend("sdpa")
    return model


@pytest.mark.parametrize(
    "config",
    [
        dict(depth=2),  # production width: hidden 4096, 32 heads of 128, FFN 11008, caption 4096
        dict(hidden_size=256, num_heads=2, depth=2, caption_channels=64, adaln_tembed_dim=32),
    ],
    ids=["hidden4096", "hidden256"],
)
@pytest.mark.parametrize("num_cond", [0, 1])
def test_bf16_forward_equals_the_dtype_faithful_reference_bitwise_on_cuda(config, num_cond):
    model = random_model(**config)
    gen = torch.Generator(device="cuda").manual_seed(1)
    batch, frames, text_len = 2, 5, 64
    latents = torch.randn(batch, 16, frames, 16, 24, device="cuda", generator=gen)  # grid (5, 8, 12)
    timesteps = torch.rand(batch, frames, device="cuda", generator=gen) * 1000
    timesteps[:, :num_cond] = 0
    text = torch.randn(batch, 1, text_len, model.config.caption_channels, device="cuda", generator=gen)
    mask = torch.ones(batch, text_len, dtype=torch.long, device="cuda")
    mask[0, 40:] = 0  # zero-pad mode: padded tokens become zero vectors that still take part
    with torch.no_grad():
        ours = model(latents, timesteps, text, mask, num_cond_latents=num_cond)
        theirs = reference_forward_bf16(model, latents, timesteps, text, num_cond, mask)
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.abs().mean() > 0.1  # a live output, not zeros
    assert torch.equal(ours, theirs), f"max |diff| {(ours - theirs).abs().max().item():.3g}"
