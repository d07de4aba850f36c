"""Tiny shard sets written through the shard contract (longcat_dist.data.synthetic)."""

from pathlib import Path

import pytest

from longcat_dist.data import format as fmt
from longcat_dist.data.synthetic import write_synthetic_shards

TEXT_DIM = 8


def write_shards(
    root: Path, dataset_id: str, buckets: dict[tuple[int, int, int], list[int]], text_dim: int = TEXT_DIM
) -> fmt.Manifest:
    """Write a shard root: {(frames, height, width): [samples per shard]}; video[0, 0, 0, 0] holds the sample index."""
    return write_synthetic_shards(root, dataset_id, buckets, text_dim=text_dim)


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    """Two buckets with uneven shard sizes: 5 + 1 + 3 samples, and 4 + 2."""
    root = tmp_path_factory.mktemp("uneven")
    write_shards(root, "uneven", {(5, 16, 16): [5, 1, 3], (1, 16, 32): [4, 2]})
    return root
