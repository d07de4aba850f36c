"""What validation samples: the held-out eval split read from its shards, or one prompt with a start frame.

An eval sample's start image is re-read from the path its meta records (`sources[1]`), for first-frame drift.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import torch
from torch import Tensor

from longcat_dist.data.format import (
    BucketInfo,
    Manifest,
    ShardFormatError,
    decode_sample,
    load_null_text,
)
from longcat_dist.data.pixels import MediaError
from longcat_dist.validate.media import load_start_frame

logger = logging.getLogger(__name__)

# Each validation samples every item with 40 full-size steps; a handful of clips is what a person watches.
MAX_EVAL_SAMPLES = 4


@dataclass
class EvalItem:
    """One clip to generate: its start-frame latent, prompt embedding and, from shards, the ground truth."""

    key: str
    caption: str
    cond_latents: Tensor  # [16, 1, h, w] normalized
    text: Tensor  # [L_valid, D]
    truth: Tensor | None = None  # [16, T, h, w] normalized latents of the real clip
    start_pixels: Tensor | None = None  # [3, H, W] in [-1, 1] when the start frame image is readable


def _shard_members(path: Path) -> Iterator[dict]:
    """Raw WebDataset-style samples {"__key__", "__url__", ext: bytes} of one tar, in file order."""
    current: dict | None = None
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = Path(member.name).name
            key, _, ext = base.partition(".")
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": str(path)}
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current


def _start_image(meta: dict, bucket: BucketInfo) -> tuple[Tensor | None, str | None]:
    """The start frame the builder encoded (meta `sources[1]`) as [3, H, W], or None and why it is not there."""
    sources = meta.get("sources")
    if not isinstance(sources, list) or len(sources) < 2:
        return None, "its meta names no start frame (sources[1])"
    try:
        return load_start_frame(Path(sources[1]), bucket.height, bucket.width), None
    except MediaError as err:
        return None, str(err)


def _bucket_samples(
    root: Path, bucket: BucketInfo, manifest: Manifest
) -> Iterator[tuple[EvalItem, str | None]]:
    for shard in bucket.shards:
        path = root / shard.path
        if not path.is_file():
            raise ShardFormatError(
                f"{path}: listed in {root}/manifest.json but missing; rebuild the eval shards"
            )
        for raw in _shard_members(path):
            sample = decode_sample(raw, bucket, manifest.text_dim)
            start, problem = _start_image(sample.meta, bucket)
            caption = str(sample.meta.get("caption", ""))
            yield EvalItem(sample.key, caption, sample.cond, sample.text, sample.video, start), problem


def read_eval_split(root: Path, limit: int = MAX_EVAL_SAMPLES) -> tuple[list[EvalItem], Tensor, Manifest]:
    """The first `limit` samples of an eval shard root (manifest order), its empty-prompt embedding, its manifest."""
    manifest = Manifest.load(root)
    every_item = chain.from_iterable(_bucket_samples(root, bucket, manifest) for bucket in manifest.buckets)
    items, problems = [], []
    for item, problem in islice(every_item, limit):
        items.append(item)
        if problem is not None:
            problems.append(f"{item.key}: {problem}")
    if not items:
        raise ShardFormatError(
            f"{root}: the eval split holds no samples; check eval_dataset_id and its shards"
        )
    if manifest.total_samples > len(items):
        logger.info(
            "validation uses %d of the %d eval samples in %s", len(items), manifest.total_samples, root
        )
    if problems:
        # The generated frame 0 is the cond latent itself, so against its decode the drift is 0 by construction.
        logger.info(
            "validation: first-frame drift of %d of %d eval samples in %s is against the VAE decode of the cond "
            "latent, not the start image (%s)", len(problems), len(items), root, "; ".join(problems),
        )  # fmt: skip
    return items, load_null_text(root), manifest


def prompt_item(
    prompt_text: Tensor, caption: str, start_pixels: Tensor, cond_latents: Tensor, key: str = "prompt"
) -> EvalItem:
    """An item from a free prompt: its embedding [L, D], the start frame [3, H, W] and its latent [16, 1, h, w]."""
    if cond_latents.shape[-2:] != (start_pixels.shape[-2] // 8, start_pixels.shape[-1] // 8):
        raise ValueError(
            f"start frame {tuple(start_pixels.shape)} and its latent {tuple(cond_latents.shape)} disagree (VAE /8)."
        )
    return EvalItem(key, caption, cond_latents.to(torch.bfloat16), prompt_text, None, start_pixels)
