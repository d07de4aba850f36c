"""bench/bsa_layout_probe.py: the block-major kernel variants it times agree with the production BSA kernels."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import bsa_layout_probe as probe  # noqa: E402
from longcat_dist.kernels.bsa_select import BlockGrid  # noqa: E402


def test_block_major_variants_match_the_in_place_kernels_on_a_ragged_grid():
    torch.manual_seed(0)
    # 6x8 tokens per frame, 5 frames with 1 cond: partial time blocks on both sides of the cond boundary.
    grid = BlockGrid((5, 6, 8), 1, (2, 2, 4))
    B, nh, hd = 2, 2, 32
    qkv = torch.randn(B, grid.num_tokens, 3, nh, hd).to(torch.float16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # strided views, as in the model
    do = torch.randn(B, nh, grid.num_tokens, hd).to(torch.float16)
    # plain loads, TMA descriptors, and the row-table gather, all at 2 stages and 4 warps
    table = probe.run_suite(q, k, v, do, grid, 0.5, "0,0,2,4;1,0,2,4;2,0,2,4", check_only=True)
    errors = {name: err for name, _, err in table}
    assert errors["gather error"] == 0.0
    checked = [name for name in errors if name.startswith(("fwd ", "dq ", "dkdv "))]
    assert len(checked) == 9, errors  # every variant of every kernel ran
    assert all(errors[name] < 1e-3 for name in checked), errors
