"""Block geometry, pooling, top-k selection and its transpose (plain torch; no kernels run here)."""

import math

import pytest
import torch

from longcat_dist.kernels import BlockGrid, num_selected, select_blocks
from longcat_dist.kernels.bsa_select import pool_blocks
from longcat_dist.kernels.bsa_triton import Launch, issued_key_tiles, transpose_selection


def _explicit_pool(x: torch.Tensor, grid: BlockGrid) -> torch.Tensor:
    """Mean over each block's tokens, one block at a time from the token -> block map."""
    ids = grid.token_block_ids(x.device)
    return torch.stack([x[:, :, ids == j].float().mean(dim=2) for j in range(grid.num_blocks)], dim=2)


def test_cond_and_noise_frames_are_chunked_separately():
    grid = BlockGrid((7, 5, 6), num_cond_latents=2, chunk_shape=(4, 4, 4))
    assert (grid.cond_tblocks, grid.tblocks, grid.hblocks, grid.wblocks) == (1, 3, 2, 2)
    assert grid.num_blocks == 12 and grid.num_cond_blocks == 4
    frame_of_token = torch.arange(7).repeat_interleave(30)
    block_row = grid.token_block_ids(torch.device("cpu")) // 4  # block-t of every token
    # Frames 0-1 (cond) form block row 0; noise frames 2-5 row 1; frame 6 alone row 2.
    assert block_row[frame_of_token < 2].eq(0).all()
    assert block_row[(frame_of_token >= 2) & (frame_of_token < 6)].eq(1).all()
    assert block_row[frame_of_token == 6].eq(2).all()
    counts = grid.block_token_counts(torch.device("cpu"))
    # Row 0: 2 frames x {4,1} rows x {4,2} cols; row 2: 1 frame.
    assert counts.tolist() == [32, 16, 8, 4, 64, 32, 16, 8, 16, 8, 4, 2]
    assert counts.sum().item() == 7 * 5 * 6


def test_pooled_means_of_partial_blocks_use_the_real_token_count():
    grid = BlockGrid((5, 6, 7), num_cond_latents=1, chunk_shape=(4, 4, 4))
    ones = torch.ones(1, 1, 5 * 6 * 7, 8, dtype=torch.bfloat16)
    # A mean of ones is 1 in every block, however few real tokens it has (dividing by 64 would give less).
    torch.testing.assert_close(pool_blocks(ones, grid), torch.ones(1, 1, grid.num_blocks, 8))
    x = torch.randn(2, 3, 5 * 6 * 7, 8)
    torch.testing.assert_close(pool_blocks(x, grid), _explicit_pool(x, grid))


@pytest.mark.parametrize(
    "num_key_blocks, sparsity, expected", [(728, 0.9375, 45), (16, 0.9375, 1), (15, 0.9375, 1), (8, 0.5, 4)]
)
def test_num_selected_truncates_but_never_reaches_zero(num_key_blocks, sparsity, expected):
    assert num_selected(num_key_blocks, sparsity) == expected


@pytest.mark.parametrize("force_diagonal", [False, True])
def test_selection_is_the_top_k_of_pooled_scores_with_cond_rows_restricted(force_diagonal):
    grid = BlockGrid((7, 5, 6), num_cond_latents=2, chunk_shape=(4, 4, 4))  # M = 12, 4 cond blocks
    q, k = torch.randn(2, 2, 2, 210, 16).unbind(0)
    sel = select_blocks(
        q, k, latent_shape=(7, 5, 6), num_cond_latents=2, sparsity=0.6, force_diagonal=force_diagonal
    )
    n_sel, n_sel_cond = num_selected(12, 0.6), num_selected(4, 0.6)
    assert sel.indices.shape == (2, 2, 12, n_sel) and sel.indices.dtype == torch.int32
    assert sel.counts.tolist() == [n_sel_cond] * 4 + [n_sel] * 8
    scores = _explicit_pool(q, grid) @ _explicit_pool(k, grid).transpose(-1, -2)  # [B, nh, M, M]
    for b in range(2):
        for h in range(2):
            for m in range(12):
                picked = sel.indices[b, h, m, : sel.counts[m]].tolist()
                assert len(set(picked)) == len(picked)
                allowed = scores[b, h, m, :4] if m < 4 else scores[b, h, m]
                expected = set(allowed.topk(sel.counts[m].item()).indices.tolist())
                if force_diagonal and m not in expected:
                    expected = set(allowed.topk(sel.counts[m].item() - 1).indices.tolist()) | {m}
                assert set(picked) == expected
                assert (sel.indices[b, h, m, sel.counts[m] :] == 12).all()


def test_transposed_selection_lists_every_pair_once():
    q, k = torch.randn(2, 2, 3, 420, 16).unbind(0)
    sel = select_blocks(q, k, latent_shape=(7, 6, 10), num_cond_latents=1, sparsity=0.5)
    num_blocks = sel.indices.shape[2]
    q_list, offsets = transpose_selection(sel, num_blocks)
    for bh in range(6):
        b, h = divmod(bh, 3)
        want = {(j, m) for m in range(num_blocks) for j in sel.indices[b, h, m, : sel.counts[m]].tolist()}
        got = []
        for j in range(num_blocks):
            members = q_list[bh, offsets[bh, j] : offsets[bh, j + 1]].tolist()
            assert members == sorted(members)
            got += [(j, m) for m in members]
        assert len(got) == len(want) and set(got) == want


@pytest.mark.parametrize("tile_tokens", [64, 128])
def test_issued_key_tiles_count_short_cond_blocks_four_to_a_tile(tile_tokens):
    grid = BlockGrid((7, 6, 10), num_cond_latents=1, chunk_shape=(4, 4, 4))  # 6 cond blocks of 16 rows
    q, k = torch.randn(2, 2, 3, grid.num_tokens, 16).unbind(0)
    sel = select_blocks(q, k, latent_shape=grid.latent_shape, num_cond_latents=1, sparsity=0.5)
    launch = Launch(tile_tokens, 4, 2)  # 128-token tiles: two blocks, or eight cond blocks, per tile
    per_tile, group = (4, 1) if tile_tokens == 64 else (8, 2)
    want = 0
    for b in range(2):
        for h in range(3):
            for m in range(grid.num_blocks):
                listed = sel.indices[b, h, m, : sel.counts[m]].tolist()
                cond = sum(j < grid.num_cond_blocks for j in listed)
                want += math.ceil(cond / per_tile) + math.ceil((len(listed) - cond) / group)
    assert issued_key_tiles(sel, grid, launch).item() == want
    # Without cond frames every tile holds GROUP blocks.
    plain = BlockGrid((7, 6, 10), 0, (4, 4, 4))
    sel = select_blocks(q, k, latent_shape=plain.latent_shape, sparsity=0.5)
    assert issued_key_tiles(sel, plain, launch).item() == 6 * plain.num_blocks * math.ceil(
        sel.counts[0] / group
    )


def test_selection_gets_no_gradient():
    q, k = (torch.randn(1, 1, 64, 16, requires_grad=True) for _ in range(2))
    sel = select_blocks(q, k, latent_shape=(4, 4, 4))
    assert not sel.indices.requires_grad


def test_noise_rows_list_their_cond_blocks_first_and_keep_the_top_k_set():
    """The kernels pack short cond blocks several to a tile, so each row lists its cond blocks first."""
    grid = BlockGrid((9, 8, 8), num_cond_latents=1, chunk_shape=(4, 4, 4))  # 4 cond + 12 noise blocks
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 3, grid.num_tokens, 16, generator=gen) for _ in range(2))
    kw = dict(latent_shape=grid.latent_shape, num_cond_latents=1, sparsity=0.5)
    sel = select_blocks(q, k, **kw)
    noise = sel.indices[:, :, grid.num_cond_blocks :].long()  # [B, nh, 12, 8]
    is_cond = noise < grid.num_cond_blocks
    # Once a row reaches a noise block, no cond block follows.
    assert not (is_cond[..., 1:] & ~is_cond[..., :-1]).any()
    assert is_cond.any() and (~is_cond).any()  # both kinds occur, so the order was tested
    scores = pool_blocks(q, grid) @ pool_blocks(k, grid).transpose(-1, -2)
    want = scores[:, :, grid.num_cond_blocks :].topk(noise.shape[-1], dim=-1).indices
    assert torch.equal(noise.sort(-1).values, want.sort(-1).values)
