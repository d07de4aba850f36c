"""Block-sparse attention kernel vs the dense fp32 reference, at tiny sizes (Triton interpreter on CPU)."""

import math

import pytest
import torch
from bsa_checks import TOLERANCE, assert_matches_reference, random_qkv, relative_error

from longcat_dist.kernels import (
    BlockGrid,
    block_sparse_attention,
    bsa_triton,
    reference_block_sparse_attention,
)
from longcat_dist.kernels.bsa_select import pool_blocks, select_blocks_on_grid
from longcat_dist.kernels.bsa_select_triton import (
    pool_blocks_kernel,
    topk_blocks_kernel,
    transpose_selection_kernel,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    "batch, heads, head_dim, latent_shape, dtype, kwargs",
    [
        # Ragged grid (no axis a multiple of 4), no cond, two heads.
        (1, 2, 32, (5, 6, 7), BF16, dict(sparsity=0.5)),
        # One cond frame: cond and noise frames chunked separately; B > 1.
        (2, 1, 32, (5, 6, 7), FP16, dict(num_cond_latents=1, sparsity=0.5)),
        # Two cond frames, ragged time on both sides of the split, head dim 64.
        (1, 2, 64, (7, 5, 4), BF16, dict(num_cond_latents=2, sparsity=0.6)),
        # Head dim 128, full blocks, force_diagonal.
        (1, 1, 128, (4, 4, 8), BF16, dict(num_cond_latents=1, sparsity=0.5, force_diagonal=True)),
        # A non-cubic chunk (32-token blocks).
        (1, 2, 32, (6, 6, 5), FP16, dict(num_cond_latents=1, sparsity=0.7, chunk_shape=(2, 4, 4))),
    ],
)
def test_forward_and_gradients_match_reference(batch, heads, head_dim, latent_shape, dtype, kwargs):
    assert_matches_reference(batch, heads, head_dim, latent_shape, dtype, DEVICE, **kwargs)


@pytest.mark.parametrize("tile_tokens", [32, 64])
def test_every_loop_tile_width_matches_reference(monkeypatch, tile_tokens):
    # 32-token blocks, so the loops step over one or two blocks at a time; 3 blocks per noise q-block and
    # transposed lists of every length leave the last step half-empty.
    for table in (bsa_triton.FWD_LAUNCH, bsa_triton.DQ_LAUNCH, bsa_triton.DKDV_LAUNCH):
        monkeypatch.setitem(table, 32, bsa_triton.Launch(tile_tokens, 4, 2))
    kw = dict(num_cond_latents=2, sparsity=0.8, chunk_shape=(2, 4, 4))
    assert_matches_reference(1, 2, 32, (7, 5, 6), BF16, DEVICE, **kw)


def test_pool_kernel_matches_torch_pooling():
    grid = BlockGrid((7, 5, 6), num_cond_latents=2, chunk_shape=(4, 4, 4))
    x = torch.randn(2, 3, 210, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE, BF16)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # strided like a head view of [B, N, nh, hd]
    torch.testing.assert_close(pool_blocks_kernel(x, grid), pool_blocks(x, grid))


def _block_major_slots(grid: BlockGrid) -> torch.Tensor:
    """Slot of every token in the block-major copies (block · BLOCK + offset in the block), from the token grid."""
    T, Hp, Wp = grid.latent_shape
    ct, ch, cw = grid.chunk_shape
    n_c = grid.num_cond_latents
    t = torch.arange(T)
    t0 = torch.where(t < n_c, t // ct * ct, n_c + (t - n_c).clamp(min=0) // ct * ct)
    lt = (t - t0)[:, None, None]
    lh = (torch.arange(Hp) % ch)[None, :, None]
    lw = (torch.arange(Wp) % cw)[None, None, :]
    local = ((lt * ch + lh) * cw + lw).flatten()
    return grid.token_block_ids(torch.device("cpu")) * grid.block_size + local


@pytest.mark.parametrize("chunk_shape", [(4, 4, 4), (2, 4, 4)])
def test_block_major_copies_hold_every_block_zero_padded(chunk_shape):
    """pack_kv and the dQ kernel's copies: each token in its block's slot, padding zero (lse +inf, bias -inf)."""
    grid = BlockGrid((5, 6, 7), num_cond_latents=1, chunk_shape=chunk_shape)
    B, nh, hd, N, M = 2, 2, 32, grid.num_tokens, grid.num_blocks
    qkv = torch.randn(B, N, 3, nh, hd, generator=torch.Generator().manual_seed(9)).to(DEVICE, FP16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as in the model
    slots = _block_major_slots(grid).to(DEVICE)
    slots_per_head = M * grid.block_size

    def block_major(x, fill=0.0):  # [B, nh, N, ...] -> [B·nh·M·BLOCK, ...]
        out = x.new_full((B, nh, slots_per_head, *x.shape[3:]), fill)
        out[:, :, slots] = x
        return out.flatten(0, 2)

    packed = bsa_triton.pack_kv(k, v, grid)
    assert torch.equal(packed.k, block_major(k)) and torch.equal(packed.v, block_major(v))
    want_bias = torch.full((slots_per_head,), float("-inf"), device=DEVICE)
    want_bias[slots] = 0.0
    assert torch.equal(packed.bias, want_bias)

    selection = select_blocks_on_grid(q, k, grid, 0.5, False)
    out, lse = bsa_triton.attention_forward(q, k, v, grid, selection)
    do = torch.randn(B, nh, N, hd, generator=torch.Generator().manual_seed(10)).to(DEVICE, FP16)
    _, rows = bsa_triton.backward_dq(do, q, k, v, out, lse, grid, selection)
    assert torch.equal(rows.q, block_major(q)) and torch.equal(rows.do, block_major(do))
    assert torch.equal(rows.lse, block_major(lse.view(B, nh, N), float("inf")))
    delta = (out.float() * do.float()).sum(-1)
    torch.testing.assert_close(rows.delta, block_major(delta), rtol=1e-5, atol=1e-5)


def test_peaked_scores_whose_running_max_jumps_match_reference():
    """Large q and k make sharp softmaxes whose row maxima grow by far more than 2^8 from one key tile to the
    next: the forward's online rescaling must carry them (a kernel that skipped it mid-loop gives NaN here)."""
    latent_shape, kw = (5, 8, 8), dict(num_cond_latents=1, sparsity=0.5)
    q, k, v = random_qkv(1, 2, 320, 32, FP16, DEVICE, seed=11)
    q, k = (x.detach().mul(4).requires_grad_() for x in (q, k))  # scores of std ~ 16 / sqrt(32) * 32 = 90
    out = block_sparse_attention(q, k, v, latent_shape=latent_shape, **kw)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = reference_block_sparse_attention(q32, k32, v32, latent_shape=latent_shape, **kw)
    assert relative_error(out, ref) < TOLERANCE[FP16]
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(12)).to(DEVICE, FP16)
    for got, want in zip(
        torch.autograd.grad(out, (q, k, v), d_out), torch.autograd.grad(ref, (q32, k32, v32), d_out.float())
    ):
        assert relative_error(got, want) < TOLERANCE[FP16]


@pytest.mark.parametrize("ties, num_cond", [(False, 4), (True, 4), (False, 0)])
def test_topk_kernel_picks_the_largest_scores_with_cond_blocks_first(ties, num_cond):
    B, nh, M, n_sel, n_sel_cond = 2, 3, 20, 5, 2
    gen = torch.Generator().manual_seed(13)
    scores = (
        torch.randint(0, 3, (B, nh, M, M), generator=gen).float()
        if ties
        else torch.randn(B, nh, M, M, generator=gen) * 1e3
    )
    if not ties:  # the float-to-key map at the extremes: infinities (force_diagonal's +inf), tiny magnitudes
        scores[0, 0, :, 7] = float("inf")
        scores[0, 1, :, 3] = float("-inf")
        scores[1, 2, :, :6] = torch.tensor([1e-30, -1e-30, 3e-38, -3e-38, 1e-45, -1e-45])
    scores = scores.to(DEVICE)
    got = torch.full((B, nh, M, n_sel), M, dtype=torch.int32, device=DEVICE)
    topk_blocks_kernel(scores, got, num_cond, n_sel, n_sel_cond)
    groups = [(slice(num_cond, M), M, n_sel)] + [(slice(0, num_cond), num_cond, n_sel_cond)] * (num_cond > 0)
    for rows, cols, k in groups:
        picked = got[:, :, rows, :k].long()
        assert (got[:, :, rows, k:] == M).all()  # slots past k untouched
        assert (picked.sort(-1).values.diff(dim=-1) > 0).all() and (picked < cols).all()  # k distinct columns
        row_scores = scores[:, :, rows, :cols]
        taken = torch.zeros_like(row_scores, dtype=torch.bool).scatter_(-1, picked, True)
        lowest_taken = row_scores.masked_fill(~taken, float("inf")).amin(-1)
        highest_left = row_scores.masked_fill(taken, float("-inf")).amax(-1)
        assert (lowest_taken >= highest_left).all()  # no unpicked score beats a picked one
        if not ties:
            want = row_scores.topk(k, dim=-1).indices
            assert torch.equal(picked.sort(-1).values, want.sort(-1).values)
        is_cond = picked < num_cond
        assert not (is_cond[..., 1:] & ~is_cond[..., :-1]).any()  # cond blocks first


@pytest.mark.parametrize("latent_shape, num_cond", [((7, 6, 10), 1), ((9, 17, 16), 2)])
def test_transpose_kernel_lists_the_same_q_blocks_as_the_sort(latent_shape, num_cond):
    """The bitmap transposition against the sort (bsa_triton.transpose_by_sort, the CPU path), including q-block
    ids past 31 (a second bitmap word) and rows with unused slots (cond rows select fewer blocks)."""
    q, k = torch.randn(
        2, 2, 3, math.prod(latent_shape), 16, generator=torch.Generator().manual_seed(14)
    ).unbind(0)
    grid = BlockGrid(latent_shape, num_cond, (4, 4, 4))
    sel = select_blocks_on_grid(q, k, grid, 0.6, False)
    want_list, want_offsets = bsa_triton.transpose_by_sort(sel, grid.num_blocks)
    got_list, got_offsets = transpose_selection_kernel(
        sel.indices.to(DEVICE), sel.counts.to(DEVICE), grid.num_blocks
    )
    assert torch.equal(got_offsets.cpu(), want_offsets)
    used = torch.arange(want_list.shape[-1]) < want_offsets[:, -1:]  # entries past the last offset: unwritten
    assert torch.equal(got_list.cpu()[used], want_list[used])


def test_few_key_blocks_never_give_zeros():
    # 4 blocks, 2 of them cond: the official rule int(0.0625 * Nk) keeps 0 blocks and returns zeros.
    out = assert_matches_reference(1, 2, 32, (5, 8, 4), FP16, DEVICE, num_cond_latents=1, sparsity=0.9375)
    assert (out.float().norm(dim=-1) > 0).all()


def test_force_diagonal_changes_the_result_when_the_diagonal_is_not_picked():
    latent_shape = (4, 8, 8)  # 4 blocks, 1 kept per q-block
    q, k, v = random_qkv(1, 4, 256, 32, BF16, DEVICE, seed=3)
    kw = dict(latent_shape=latent_shape, sparsity=0.75)
    plain = block_sparse_attention(q, k, v, **kw)
    diag = block_sparse_attention(q, k, v, force_diagonal=True, **kw)
    want = reference_block_sparse_attention(q.float(), k.float(), v.float(), force_diagonal=True, **kw)
    assert relative_error(diag, want) < 2e-2
    # With 4 heads x 4 q-blocks picking 1 of 4 blocks at random, some pick is off the diagonal.
    assert relative_error(plain, diag) > 0.1


def test_strided_inputs_from_a_packed_qkv_projection():
    """q, k, v as the model makes them: views of one [B, N, 3, nh, hd] tensor, not contiguous."""
    batch, heads, head_dim, latent_shape = 1, 2, 32, (3, 6, 5)
    num_tokens = 90
    qkv = torch.randn(batch, num_tokens, 3, heads, head_dim, generator=torch.Generator().manual_seed(5))
    qkv = qkv.to(DEVICE, BF16).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, nh, N, hd], strided
    assert not q.is_contiguous()
    kw = dict(latent_shape=latent_shape, num_cond_latents=1, sparsity=0.5)
    got = block_sparse_attention(q, k, v, **kw)
    qkv32 = qkv.detach().float().requires_grad_()
    want = reference_block_sparse_attention(*qkv32.permute(2, 0, 3, 1, 4).unbind(0), **kw)
    assert relative_error(got, want) < 2e-2
    # Token-major output: merging the heads for the output projection is a view, not a copy.
    assert got.transpose(1, 2).is_contiguous()
    # Gradients reach the packed projection through the views (the kernels write them by their own strides).
    d_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE, BF16)
    (grad,) = torch.autograd.grad(got, qkv, d_out)
    (want_grad,) = torch.autograd.grad(want, qkv32, d_out.float())
    assert relative_error(grad, want_grad) < 2e-2


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(latent_shape=(4, 4, 5)), "latent_shape"),
        (dict(latent_shape=(4, 4)), "latent_shape"),
        (dict(chunk_shape=(3, 4, 4)), "chunk_shape"),
        (dict(chunk_shape=(8, 8, 8)), "chunk_shape"),
        (dict(num_cond_latents=5), "num_cond_latents"),
        (dict(sparsity=1.0), "sparsity"),
    ],
)
def test_bad_arguments_name_the_problem(change, message):
    q, k, v = random_qkv(1, 1, 64, 32, BF16, DEVICE)
    kw = dict(latent_shape=(4, 4, 4)) | change
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(q, k, v, **kw)


def test_bad_tensors_name_the_problem():
    q, k, v = random_qkv(1, 1, 64, 32, BF16, DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q.float(), k.float(), v.float(), latent_shape=(4, 4, 4))
    with pytest.raises(ValueError, match="v has shape"):
        block_sparse_attention(q, k, v[:, :, :32], latent_shape=(4, 4, 4))
    q48, k48, v48 = random_qkv(1, 1, 64, 48, BF16, DEVICE)
    with pytest.raises(ValueError, match="head_dim=48"):
        block_sparse_attention(q48, k48, v48, latent_shape=(4, 4, 4))


def test_custom_ops_pass_torch_opcheck():
    """Schema, fake (meta) implementations, autograd registration and traced dispatch of the three BSA ops."""
    from longcat_dist.kernels import bsa

    q, k, v = random_qkv(1, 2, 4 * 8 * 8, 32, BF16, DEVICE, seed=7)
    geometry = ([4, 8, 8], 1, [4, 4, 4])
    select_args = (q.detach(), k.detach(), geometry[0], 1, geometry[2], 0.5, False)
    indices, counts = bsa._select_op(*select_args)
    checks = [(bsa._select_op, select_args)]
    for keep_packed_kv in (False, True):
        forward_args = (q, k, v, indices, counts, *geometry, keep_packed_kv)
        out, lse, *packed = (x.detach() for x in bsa._attention_op(*forward_args))
        assert all(x.numel() > 0 for x in packed) == keep_packed_kv
        backward_args = (torch.randn_like(out), *(x.detach() for x in (q, k, v, out)), lse, indices, counts)
        checks += [
            (bsa._attention_op, forward_args),
            (bsa._attention_backward_op, (*backward_args, *packed, *geometry)),
        ]
    for op, args in checks:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)


def test_kept_kv_copies_give_the_same_gradients_and_skip_the_second_pack(monkeypatch):
    """keep_packed_kv: the backward runs on the forward's K/V copies (one pack_kv per call instead of two) and
    returns the same gradients bit for bit."""
    q, k, v = random_qkv(1, 2, 5 * 6 * 7, 32, BF16, DEVICE, seed=15)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(16)).to(DEVICE, BF16)
    packs = []
    real_pack = bsa_triton.pack_kv
    monkeypatch.setattr(bsa_triton, "pack_kv", lambda *a: packs.append(1) or real_pack(*a))
    results = {}
    for keep in (False, True):
        packs.clear()
        out = block_sparse_attention(
            q, k, v, latent_shape=(5, 6, 7), num_cond_latents=1, sparsity=0.5, keep_packed_kv=keep
        )
        results[keep] = (out, *torch.autograd.grad(out, (q, k, v), d_out))
        assert len(packs) == (1 if keep else 2)
    for kept, repacked in zip(results[True], results[False]):
        assert torch.equal(kept, repacked)


def test_compiles_as_one_graph_with_the_same_results():
    """torch.compile(fullgraph=True) traces through the ops (no graph break) and reproduces eager bit for bit."""
    q, k, v = random_qkv(1, 2, 4 * 8 * 8, 32, BF16, DEVICE, seed=8)

    def attention(q, k, v):
        return block_sparse_attention(q, k, v, latent_shape=(4, 8, 8), num_cond_latents=1, sparsity=0.5)

    eager = attention(q, k, v)
    eager_grads = torch.autograd.grad(eager.float().square().sum(), (q, k, v))
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)(q, k, v)
    compiled_grads = torch.autograd.grad(compiled.float().square().sum(), (q, k, v))
    assert torch.equal(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads):
        assert torch.equal(got, want)
