"""Block-sparse attention on CUDA at full training grids against the dense fp32 reference (needs ~40 GB)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bsa_checks import assert_matches_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize(
    "batch, heads, head_dim, latent_shape, dtype, kwargs",
    [
        # The 480x832 training grid (24 latent frames x 30 x 52 tokens, 1 cond frame) at production sparsity.
        (1, 1, 128, (24, 30, 52), torch.bfloat16, dict(num_cond_latents=1)),
        # The 704x1280 token grid (44 x 80), 2 cond frames, fp16, head dim 64.
        (1, 2, 64, (8, 44, 80), torch.float16, dict(num_cond_latents=2)),
        # B > 1, several heads, force_diagonal.
        (2, 2, 128, (12, 30, 52), torch.bfloat16, dict(num_cond_latents=1, force_diagonal=True)),
        # Head dim 32, few key blocks (the official kernel returns zeros here).
        (1, 4, 32, (5, 8, 12), torch.bfloat16, dict(num_cond_latents=1)),
    ],
)
def test_full_size_matches_reference(batch, heads, head_dim, latent_shape, dtype, kwargs):
    out = assert_matches_reference(batch, heads, head_dim, latent_shape, dtype, "cuda", **kwargs)
    assert (out.float().norm(dim=-1) > 0).all()
    torch.cuda.empty_cache()


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="needs compute-sanitizer")
@pytest.mark.parametrize("tool", ["memcheck", "initcheck"])
def test_compute_sanitizer_finds_nothing_on_small_cases(tool):
    """No out-of-bounds access (memcheck) and no read of memory nothing wrote (initcheck: the block-major
    copies come from torch.empty, so every slot the kernels read must have been written, padding included)."""
    case = Path(__file__).with_name("bsa_sanitize_case.py")
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    }
    run = subprocess.run(
        ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", sys.executable, str(case)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    report = run.stdout + run.stderr
    assert run.returncode == 0 and "bsa sanitize cases ok" in report, report[-4000:]
    assert "ERROR SUMMARY: 0 errors" in report, report[-4000:]


@pytest.mark.parametrize("latent_shape", [(24, 30, 52), (24, 44, 80)])
def test_selection_kernels_match_torch_at_training_grids(latent_shape):
    """The top-k kernel picks torch.topk's sets (random scores have no ties) and the bitmap transposition gives
    the sort's lists, at the 480p and 704p grids (32 heads)."""
    from longcat_dist.kernels import bsa_triton
    from longcat_dist.kernels.bsa_select import BlockGrid, BlockSelection, num_selected
    from longcat_dist.kernels.bsa_select_triton import topk_blocks_kernel, transpose_selection_kernel

    grid = BlockGrid(latent_shape, 1, (4, 4, 4))
    M, num_cond = grid.num_blocks, grid.num_cond_blocks
    n_sel, n_sel_cond = num_selected(M, 0.9375), num_selected(num_cond, 0.9375)
    scores = torch.randn(1, 32, M, M, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    indices = torch.full((1, 32, M, n_sel), M, device="cuda", dtype=torch.int32)
    topk_blocks_kernel(scores, indices, num_cond, n_sel, n_sel_cond)
    want = scores[:, :, num_cond:].topk(n_sel, dim=-1).indices.sort(-1).values
    assert torch.equal(indices[:, :, num_cond:].long().sort(-1).values, want)
    want_cond = scores[:, :, :num_cond, :num_cond].topk(n_sel_cond, dim=-1).indices.sort(-1).values
    assert torch.equal(indices[:, :, :num_cond, :n_sel_cond].long().sort(-1).values, want_cond)
    counts = torch.where(torch.arange(M, device="cuda") < num_cond, n_sel_cond, n_sel).to(torch.int32)
    selection = BlockSelection(indices, counts)
    want_list, want_offsets = bsa_triton.transpose_by_sort(selection, M)
    got_list, got_offsets = transpose_selection_kernel(indices, counts, M)
    assert torch.equal(got_offsets, want_offsets)
    used = torch.arange(want_list.shape[-1], device="cuda") < want_offsets[:, -1:]
    assert torch.equal(got_list[used], want_list[used])
