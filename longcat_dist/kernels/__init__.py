"""Custom kernels: block-sparse attention (Triton) with its selection and dense reference."""

from longcat_dist.kernels.bsa import block_sparse_attention
from longcat_dist.kernels.bsa_reference import reference_block_sparse_attention
from longcat_dist.kernels.bsa_select import BlockGrid, BlockSelection, num_selected, select_blocks

__all__ = [
    "BlockGrid",
    "BlockSelection",
    "block_sparse_attention",
    "num_selected",
    "reference_block_sparse_attention",
    "select_blocks",
]
