"""Tiny shard sets written through the shard contract (format.encode_sample + WebDataset's TarWriter)."""

from pathlib import Path

import pytest
import torch
import webdataset as wds

from longcat_dist.data import format as fmt

TEXT_DIM = 8


def write_shards(
    root: Path, dataset_id: str, buckets: dict[tuple[int, int, int], list[int]], text_dim: int = TEXT_DIM
) -> fmt.Manifest:
    """Write a shard root: {(frames, height, width): [samples per shard]}; video[0, 0, 0, 0] holds the sample index."""
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    infos, index = [], 0
    for (frames, height, width), sizes in buckets.items():
        name = fmt.bucket_name(frames, height, width)
        shape = fmt.latent_shape(frames, height, width)
        bucket = fmt.BucketInfo(name, frames, height, width, shape)
        for shard_index, size in enumerate(sizes):
            rel = fmt.shard_relpath(dataset_id, name, shard_index)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            with wds.TarWriter(str(root / rel), encoder=False) as sink:
                for _ in range(size):
                    video = torch.randn(shape, generator=gen)
                    video[0, 0, 0, 0] = index  # identifies the sample in tests (exact in bf16 below 256)
                    text = torch.randn(1 + index % 3, text_dim, generator=gen)  # variable length
                    meta = {"caption": f"clip {index}", "bucket": name}
                    sink.write(fmt.encode_sample(f"s{index:05d}", video, video[:, :1], text, meta))
                    index += 1
            bucket.shards.append(fmt.ShardInfo(rel, size, fmt.sha256_file(root / rel)))
        infos.append(bucket)
    vae = {"class": "tiny", "config_hash": "0", "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}
    text_encoder = {"name": "tiny", "max_length": 8, "dim": text_dim}
    manifest = fmt.Manifest(fmt.FORMAT_VERSION, dataset_id, vae, text_encoder, infos, index)
    manifest.save(root)
    fmt.save_null_text(root, torch.zeros(1, text_dim))
    return manifest


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    """Two buckets with uneven shard sizes: 5 + 1 + 3 samples, and 4 + 2."""
    root = tmp_path_factory.mktemp("uneven")
    write_shards(root, "uneven", {(5, 16, 16): [5, 1, 3], (1, 16, 32): [4, 2]})
    return root
