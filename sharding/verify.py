"""`verify` and `inspect`: re-read a shard root against its manifest; show what the model will see."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from pathlib import Path

import torch
import webdataset as wds
from tqdm import tqdm

from longcat_dist.data.format import (
    BucketInfo,
    Manifest,
    Sample,
    ShardFormatError,
    decode_sample,
    load_null_text,
    sha256_file,
)
from sharding.media import to_uint8, write_image, write_video


def _samples(root: Path, bucket: BucketInfo, shard_path: str, text_dim: int) -> Iterator[Sample]:
    for raw in wds.tarfile_samples([{"url": str(root / shard_path)}]):
        yield decode_sample(raw, bucket, text_dim)


def verify(root: Path) -> list[str]:
    """Every mismatch between the shards on disk and the manifest, as lines; empty when all is well."""
    try:
        manifest = Manifest.load(root)
        null_text = load_null_text(root)
    except ShardFormatError as err:
        return [str(err)]
    problems = []
    if null_text.shape[1] != manifest.text_dim:
        problems.append(f"null text width {null_text.shape[1]} != manifest text dim {manifest.text_dim}")
    listed = {s.path for b in manifest.buckets for s in b.shards}
    problems += [f"{tar.relative_to(root)}: shard not listed in the manifest" for tar in sorted(root.glob("*/*.tar"))
                 if tar.relative_to(root).as_posix() not in listed]  # fmt: skip
    keys: set[str] = set()
    shards = [(b, s) for b in manifest.buckets for s in b.shards]
    for bucket, shard in tqdm(shards, unit="shard", desc="verify", leave=False):
        path = root / shard.path
        if not path.is_file():
            problems.append(f"{shard.path}: missing")
            continue
        if sha256_file(path) != shard.sha256:
            problems.append(f"{shard.path}: sha256 differs from the manifest")
        count = 0
        try:
            for sample in _samples(root, bucket, shard.path, manifest.text_dim):
                count += 1
                if sample.key in keys:
                    problems.append(f"{shard.path}: sample key {sample.key!r} appears twice in the dataset")
                keys.add(sample.key)
        except (ShardFormatError, OSError, ValueError) as err:
            problems.append(f"{shard.path}: {err}")
            continue
        if count != shard.num_samples:
            problems.append(f"{shard.path}: {count} samples, manifest says {shard.num_samples}")
    return problems


def _stats(values: list[int]) -> str:
    if not values:
        return "-"
    return f"min {min(values)} / mean {statistics.fmean(values):.1f} / max {max(values)}"


def inspect(root: Path) -> str:
    """Per-bucket counts, latent shapes, bytes and caption length stats, as a table."""
    manifest = Manifest.load(root)
    lines = [f"dataset {manifest.dataset_id}: {manifest.total_samples} samples, text encoder "
             f"{manifest.text_encoder['name']} (dim {manifest.text_dim}), VAE {manifest.vae['class']}"]  # fmt: skip
    for bucket in manifest.buckets:
        size = sum((root / s.path).stat().st_size for s in bucket.shards)
        words, tokens = [], []
        for shard in bucket.shards:
            for sample in _samples(root, bucket, shard.path, manifest.text_dim):
                words.append(len(str(sample.meta.get("caption", "")).split()))
                tokens.append(int(sample.text.shape[0]))
        lines.append(
            f"  {bucket.name}: {bucket.num_samples} samples in {len(bucket.shards)} shards, latents "
            f"{list(bucket.latent_shape)}, {size / 2**20:.2f} MiB; caption words {_stats(words)}; "
            f"text tokens {_stats(tokens)}"
        )
    return "\n".join(lines)


def find_sample(root: Path, key: str) -> tuple[Manifest, Sample]:
    """The sample called key, searched over every shard."""
    manifest = Manifest.load(root)
    for bucket in manifest.buckets:
        for shard in bucket.shards:
            for sample in _samples(root, bucket, shard.path, manifest.text_dim):
                if sample.key == key:
                    return manifest, sample
    raise KeyError(f"{root}: no sample with key {key!r}")


def contact_sheet(frames: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> one uint8 grid image [rows * H, columns * W, 3]."""
    count, height, width = frames.shape[:3]
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    sheet = torch.zeros(rows * height, columns * width, 3, dtype=torch.uint8)
    for index in range(count):
        r, c = divmod(index, columns)
        sheet[r * height : (r + 1) * height, c * width : (c + 1) * width] = frames[index]
    return sheet


def render_sample(vae, sample: Sample, out_dir: Path) -> tuple[Path, Path]:
    """Decode a sample's latents to frames; write `<key>.mp4` and `<key>.png` (cond frame first on the sheet)."""
    from longcat_dist.encoders import decode_latents

    out_dir.mkdir(parents=True, exist_ok=True)
    video = to_uint8(decode_latents(vae, sample.video[None])[0])  # [F, H, W, 3]
    cond = to_uint8(decode_latents(vae, sample.cond[None])[0])  # [1, H, W, 3]
    mp4, png = out_dir / f"{sample.key}.mp4", out_dir / f"{sample.key}.png"
    write_video(mp4, video, float(sample.meta.get("fps") or 15.0))
    write_image(png, contact_sheet(torch.cat([cond, video])))
    return mp4, png
