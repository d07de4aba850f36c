"""Shard roots of random latents written through the shard contract: for tests and benchmarks, not for training.

Each sample's `video[0, 0, 0, 0]` holds its index (exact in bf16 below 256), so a test can tell which samples a rank
read; everything else is N(0, 1).
"""

from __future__ import annotations

from pathlib import Path

import torch
import webdataset as wds

from longcat_dist.data import format as fmt


def write_synthetic_shards(
    root: str | Path,
    dataset_id: str,
    buckets: dict[tuple[int, int, int], list[int]],
    *,
    text_dim: int,
    text_tokens: int | None = None,
    max_length: int = 8,
    seed: int = 0,
) -> fmt.Manifest:
    """Write a shard root: {(frames, height, width) in pixels: [samples per shard]}.

    Captions have `text_tokens` valid tokens each, or 1 to 3 (varying by sample) when None; `max_length` is the text
    encoder's padded length that the manifest records (training pads every caption to it).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
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
                    video[0, 0, 0, 0] = index
                    length = text_tokens if text_tokens is not None else 1 + index % 3
                    text = torch.randn(length, text_dim, generator=gen)
                    meta = {"caption": f"clip {index}", "bucket": name}
                    sink.write(fmt.encode_sample(f"s{index:05d}", video, video[:, :1], text, meta))
                    index += 1
            bucket.shards.append(fmt.ShardInfo(rel, size, fmt.sha256_file(root / rel)))
        infos.append(bucket)
    vae = {"class": "synthetic", "config_hash": "0", "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}
    text_encoder = {"name": "synthetic", "max_length": max_length, "dim": text_dim}
    manifest = fmt.Manifest(fmt.FORMAT_VERSION, dataset_id, vae, text_encoder, infos, index)
    manifest.save(root)
    fmt.save_null_text(root, torch.zeros(1, text_dim))
    return manifest
