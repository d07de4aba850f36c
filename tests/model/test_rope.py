"""Properties of the 3-D RoPE (spec §2.5)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_dist.model.rope import apply_rope, rope_angles, rope_dims

head_dims = st.sampled_from([8, 16, 24, 32, 64, 128])
grids = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))


def test_production_split_is_44_42_42():
    assert rope_dims(128) == (44, 42, 42)
    assert [rope_dims(hd) for hd in (8, 16, 24, 32)] == [(4, 2, 2), (8, 4, 4), (8, 8, 8), (12, 10, 10)]


@pytest.mark.parametrize("head_dim", [4, 12, 20])
def test_head_dims_not_divisible_by_8_are_rejected(head_dim):
    with pytest.raises(ValueError, match="divisible by 8"):
        rope_dims(head_dim)


@settings(max_examples=40, deadline=None)
@given(head_dims, grids)
def test_table_layout_follows_the_token_raster_and_interleaves_pairs(head_dim, grid):
    table = rope_angles(head_dim, grid)
    frames, height, width = grid
    dim_t, dim_h, _ = rope_dims(head_dim)
    assert table.shape == (frames * height * width, head_dim) and table.device.type == "cpu"
    assert torch.equal(table[:, 0::2], table[:, 1::2])  # each frequency twice, side by side
    token = lambda t, h, w: (t * height + h) * width + w  # noqa: E731
    last = token(frames - 1, height - 1, width - 1)
    # The first pair of each axis rotates by exactly the position (frequency 1).
    assert table[last, 0] == frames - 1
    assert table[last, dim_t] == height - 1
    assert table[last, dim_t + dim_h] == width - 1


@settings(max_examples=40, deadline=None)
@given(head_dims, grids, st.integers(0, 2**31 - 1))
def test_rotation_preserves_norms(head_dim, grid, seed):
    x = torch.randn(
        1, 2, grid[0] * grid[1] * grid[2], head_dim, generator=torch.Generator().manual_seed(seed)
    )
    table = rope_angles(head_dim, grid)
    rotated = apply_rope(x, table.cos(), table.sin())
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(head_dims, st.integers(0, 2**31 - 1))
def test_scores_depend_only_on_relative_positions(head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)
    table = rope_angles(head_dim, (4, 4, 4))
    index = lambda t, h, w: (t * 4 + h) * 4 + w  # noqa: E731

    def score(qpos, kpos):
        rq = apply_rope(q[None, None, None], table[index(*qpos)][None].cos(), table[index(*qpos)][None].sin())
        rk = apply_rope(k[None, None, None], table[index(*kpos)][None].cos(), table[index(*kpos)][None].sin())
        return (rq * rk).sum()

    torch.testing.assert_close(score((0, 1, 0), (1, 2, 1)), score((2, 1, 2), (3, 2, 3)), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score((0, 0, 0), (1, 0, 0)), score((0, 0, 0), (3, 0, 0)), atol=1e-4)


def test_bf16_input_is_rotated_in_fp32_and_returned_in_bf16():
    x = torch.randn(1, 1, 8, 32)
    table = rope_angles(32, (2, 2, 2))
    out = apply_rope(x.to(torch.bfloat16), table.cos(), table.sin())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), apply_rope(x, table.cos(), table.sin()), rtol=2e-2, atol=2e-2)


def test_bf16_rotation_is_fp32_maths_with_one_cast():
    x = (torch.randn(2, 2, 3 * 4 * 4, 32, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    table = rope_angles(32, (3, 4, 4))
    cos, sin = table.cos()[:, 0::2], table.sin()[:, 0::2]
    even, odd = x.float()[..., 0::2], x.float()[..., 1::2]
    expected = (
        torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1).flatten(-2).to(torch.bfloat16)
    )
    out = apply_rope(x, table.cos(), table.sin())
    assert torch.equal(out, expected)
    cos16, sin16 = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    even16, odd16 = x[..., 0::2], x[..., 1::2]
    in_bf16 = torch.stack([even16 * cos16 - odd16 * sin16, odd16 * cos16 + even16 * sin16], -1).flatten(-2)
    assert not torch.equal(out, in_bf16)


def test_table_is_built_on_the_cpu_whatever_the_default_device():
    """Spec §2.12 rule 6: a default-device context (e.g. torch.device("cuda")) must not move the build."""
    with torch.device("meta"):
        table = rope_angles.__wrapped__(128, (3, 4, 5))  # uncached, so the build runs inside the context
    assert table.device.type == "cpu" and table.dtype == torch.float32
    assert torch.equal(table, rope_angles(128, (3, 4, 5)))


def test_device_tables_made_under_inference_mode_serve_training():
    """rope_cos_sin is cached; a first call from validation (inference_mode) must not poison training's autograd."""
    from longcat_dist.model.rope import rope_cos_sin

    rope_cos_sin.cache_clear()
    with torch.inference_mode():
        cos, sin = rope_cos_sin(32, (2, 2, 2), torch.device("cpu"))
    assert not cos.is_inference() and not sin.is_inference()
    assert rope_cos_sin(32, (2, 2, 2), torch.device("cpu"))[0] is cos  # cached
    table = rope_angles(32, (2, 2, 2))
    assert torch.equal(cos, table.cos()) and torch.equal(sin, table.sin())
    x = torch.randn(1, 2, 8, 32, requires_grad=True)
    apply_rope(x, cos, sin).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
