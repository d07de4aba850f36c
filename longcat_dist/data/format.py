"""The shard contract, version 1: one sample's bytes, the manifest, the empty-prompt embedding.

Layout under a shard root:
    manifest.json                              the Manifest below
    null_text.safetensors                      the empty-prompt embedding [L_valid, D] bf16
    <bucket>/<dataset_id>-<bucket>-000000.tar  WebDataset shards; every sample of a shard in one bucket

A sample is two tar members: `<key>.latents.safetensors` (tensors `video` [16, T, h, w], `cond` [16, 1, h, w],
`text` [L_valid, D], all bf16) and `<key>.json` (caption, sources, frames, fps, size, bucket). Readers accept only
these members and never unpickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save, save_file
from torch import Tensor

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
NULL_TEXT_NAME = "null_text.safetensors"
LATENTS_EXT = "latents.safetensors"
META_EXT = "json"
LATENT_CHANNELS = 16
VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8
STORE_DTYPE = torch.bfloat16
# What the builder writes in each sample's json; readers only require a JSON object.
META_KEYS = ("caption", "sources", "frames", "fps", "size", "bucket")

# WebDataset splits a member name at the first dot of its base name, so a key must hold no dot and no slash.
_KEY_RULE = re.compile(r"^[A-Za-z0-9_\-]+$")
_SAMPLE_TENSORS = ("video", "cond", "text")


class ShardFormatError(ValueError):
    """A shard, sample or manifest that breaks the shard contract."""


def bucket_name(frames: int, height: int, width: int) -> str:
    """The bucket's name, e.g. "480x832x93" (height x width x frames)."""
    return f"{height}x{width}x{frames}"


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The VAE latent shape [16, T, h, w] of a clip of `frames` frames at height x width."""
    return (
        LATENT_CHANNELS,
        (frames - 1) // VAE_TEMPORAL_FACTOR + 1,
        height // VAE_SPATIAL_FACTOR,
        width // VAE_SPATIAL_FACTOR,
    )


def shard_relpath(dataset_id: str, bucket: str, index: int) -> str:
    """A shard's path relative to the root: `<bucket>/<dataset_id>-<bucket>-<000000>.tar`."""
    return f"{bucket}/{dataset_id}-{bucket}-{index:06d}.tar"


@dataclass
class ShardInfo:
    """One tar file of a bucket."""

    path: str  # relative to the shard root
    num_samples: int
    sha256: str


@dataclass
class BucketInfo:
    """One (frames, height, width) bucket and its shards."""

    name: str
    frames: int
    height: int
    width: int
    latent_shape: tuple[int, int, int, int]  # [16, T, h, w]
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        """Samples over all shards of the bucket."""
        return sum(s.num_samples for s in self.shards)


@dataclass
class Manifest:
    """Everything a reader needs to know about a shard root, stored as manifest.json."""

    format_version: int
    dataset_id: str
    vae: dict  # class, config_hash, latents_mean, latents_std
    text_encoder: dict  # name, max_length, dim
    buckets: list[BucketInfo]
    total_samples: int
    # How the builder made the shards (resolution, frames, ...), so a rebuild can refuse a root built another way.
    # Readers ignore it; manifests written before it existed load with {}.
    build: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """The manifest as indented JSON."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        """Parse and check a manifest; `source` names it in errors (a path or URL)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ShardFormatError(f"manifest {source}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ShardFormatError(f"manifest {source}: expected a JSON object, found {type(data).__name__}")
        version = _field(data, "format_version", int, source)
        if version != FORMAT_VERSION:
            raise ShardFormatError(
                f"manifest {source}: format_version {version} found, this reader reads version {FORMAT_VERSION}; "
                "rebuild the shards with this version of longcat-shards"
            )
        vae = _field(data, "vae", dict, source)
        text_encoder = _field(data, "text_encoder", dict, source)
        _require_keys(vae, ("class", "config_hash", "latents_mean", "latents_std"), f"manifest {source}: vae")
        _require_keys(text_encoder, ("name", "max_length", "dim"), f"manifest {source}: text_encoder")
        buckets = [_bucket_from_dict(b, f"manifest {source}: buckets[{i}]") for i, b in
                   enumerate(_field(data, "buckets", list, source))]  # fmt: skip
        manifest = cls(
            format_version=version,
            dataset_id=_field(data, "dataset_id", str, source),
            vae=vae,
            text_encoder=text_encoder,
            buckets=buckets,
            total_samples=_field(data, "total_samples", int, source),
            build=_field(data, "build", dict, source) if "build" in data else {},
        )
        counted = sum(b.num_samples for b in buckets)
        if counted != manifest.total_samples:
            raise ShardFormatError(
                f"manifest {source}: total_samples is {manifest.total_samples} but its shards hold {counted}"
            )
        return manifest

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        """Read `<root>/manifest.json`."""
        path = Path(root) / MANIFEST_NAME
        if not path.is_file():
            raise ShardFormatError(f"{path}: no manifest; build shards there with `longcat-shards build`")
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))

    def save(self, root: str | Path) -> None:
        """Write `<root>/manifest.json` atomically (temp name + rename)."""
        _atomic_write_bytes(Path(root) / MANIFEST_NAME, self.to_json().encode("utf-8"))

    def bucket(self, name: str) -> BucketInfo:
        """The bucket called `name`."""
        for bucket in self.buckets:
            if bucket.name == name:
                return bucket
        raise ShardFormatError(
            f"dataset {self.dataset_id}: no bucket {name!r}; it has {[b.name for b in self.buckets]}"
        )

    @property
    def text_dim(self) -> int:
        """The text embedding width D."""
        return int(self.text_encoder["dim"])


def _field(data: dict, key: str, kind: type, where: str):
    if key not in data:
        raise ShardFormatError(f"manifest {where}: missing key {key!r}")
    value = data[key]
    # bool is an int subclass; a count or version given as true/false is a mistake.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ShardFormatError(f"manifest {where}: key {key!r} must be {kind.__name__}, found {value!r}")
    return value


def _require_keys(data: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ShardFormatError(f"{where}: missing keys {missing}")


def _bucket_from_dict(data: object, where: str) -> BucketInfo:
    if not isinstance(data, dict):
        raise ShardFormatError(f"{where}: expected an object, found {data!r}")
    frames, height, width = (_field(data, k, int, where) for k in ("frames", "height", "width"))
    shape = tuple(_field(data, "latent_shape", list, where))
    if shape != latent_shape(frames, height, width):
        raise ShardFormatError(
            f"{where}: latent_shape {list(shape)} does not match {frames} frames at {height}x{width} "
            f"(expected {list(latent_shape(frames, height, width))})"
        )
    shards = []
    for i, s in enumerate(_field(data, "shards", list, where)):
        if not isinstance(s, dict):
            raise ShardFormatError(f"{where}.shards[{i}]: expected an object, found {s!r}")
        shard_where = f"{where}.shards[{i}]"
        shards.append(
            ShardInfo(
                _field(s, "path", str, shard_where),
                _field(s, "num_samples", int, shard_where),
                _field(s, "sha256", str, shard_where),
            )
        )
    return BucketInfo(_field(data, "name", str, where), frames, height, width, shape, shards)  # type: ignore[arg-type]


@dataclass
class Sample:
    """One decoded training sample."""

    key: str
    video: Tensor  # [16, T, h, w] bf16, normalized latents of the clip
    cond: Tensor  # [16, 1, h, w] bf16, normalized latent of the start frame
    text: Tensor  # [L_valid, D] bf16, prompt embedding without padding
    meta: dict


def encode_sample(key: str, video: Tensor, cond: Tensor, text: Tensor, meta: dict) -> dict[str, bytes | str]:
    """One sample as WebDataset members: {"__key__", "latents.safetensors", "json"}."""
    if not _KEY_RULE.match(key):
        raise ShardFormatError(
            f"sample key {key!r}: use only letters, digits, '_' and '-' (no dots or slashes)"
        )
    if video.ndim != 4 or video.shape[0] != LATENT_CHANNELS:
        raise ShardFormatError(
            f"sample {key}: video latents must be [16, T, h, w], found {list(video.shape)}"
        )
    if tuple(cond.shape) != (LATENT_CHANNELS, 1, *video.shape[2:]):
        raise ShardFormatError(
            f"sample {key}: cond must be [16, 1, h, w] like the video, found {list(cond.shape)}"
        )
    if text.ndim != 2 or text.shape[0] < 1:
        raise ShardFormatError(f"sample {key}: text must be [L_valid >= 1, D], found {list(text.shape)}")
    tensors = {
        name: t.detach().to("cpu", STORE_DTYPE).contiguous()
        for name, t in zip(_SAMPLE_TENSORS, (video, cond, text))
    }
    try:
        meta_bytes = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    except TypeError as err:
        raise ShardFormatError(f"sample {key}: meta must be JSON-serializable ({err})") from err
    return {"__key__": key, LATENTS_EXT: save(tensors), META_EXT: meta_bytes}


def decode_sample(raw: dict, bucket: BucketInfo, text_dim: int) -> Sample:
    """A raw WebDataset sample (bytes, no default decoders) to a Sample, checked against its bucket."""
    key = raw.get("__key__", "?")
    where = f"sample {key!r} of {raw.get('__url__', '?')}"
    # Metadata keys (__key__, __url__, __local_path__) come from WebDataset itself; members must be ours.
    unknown = sorted(
        k for k in raw if not (k.startswith("__") and k.endswith("__")) and k not in (LATENTS_EXT, META_EXT)
    )
    if unknown:
        raise ShardFormatError(
            f"{where}: unexpected members {unknown}; only {LATENTS_EXT!r} and {META_EXT!r} are read"
        )
    for ext in (LATENTS_EXT, META_EXT):
        if ext not in raw:
            raise ShardFormatError(f"{where}: missing member {ext!r}")
    try:
        tensors = load_safetensors_bytes(bytes(raw[LATENTS_EXT]))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ShardFormatError(f"{where}: {LATENTS_EXT} is not a valid safetensors file ({err})") from err
    if sorted(tensors) != sorted(_SAMPLE_TENSORS):
        raise ShardFormatError(f"{where}: tensors {sorted(tensors)} found, expected {list(_SAMPLE_TENSORS)}")
    video, cond, text = (tensors[n] for n in _SAMPLE_TENSORS)
    for name, t in tensors.items():
        if t.dtype != STORE_DTYPE:
            raise ShardFormatError(f"{where}: tensor {name!r} is {t.dtype}, the contract stores bfloat16")
    expected_cond = (LATENT_CHANNELS, 1, *bucket.latent_shape[2:])
    if tuple(video.shape) != tuple(bucket.latent_shape) or tuple(cond.shape) != expected_cond:
        raise ShardFormatError(
            f"{where}: video {list(video.shape)} / cond {list(cond.shape)} do not match bucket {bucket.name} "
            f"(video {list(bucket.latent_shape)}, cond {list(expected_cond)})"
        )
    if text.ndim != 2 or text.shape[0] < 1 or text.shape[1] != text_dim:
        raise ShardFormatError(f"{where}: text {list(text.shape)} is not [L_valid >= 1, {text_dim}]")
    try:
        meta = json.loads(bytes(raw[META_EXT]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardFormatError(f"{where}: {META_EXT} is not UTF-8 JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}: {META_EXT} must hold an object, found {type(meta).__name__}")
    if meta.get("bucket", bucket.name) != bucket.name:
        raise ShardFormatError(
            f"{where}: meta says bucket {meta['bucket']!r} but it was read as {bucket.name!r}"
        )
    return Sample(key=key, video=video, cond=cond, text=text, meta=meta)


def save_null_text(root: str | Path, text: Tensor) -> None:
    """Write the empty-prompt embedding [L_valid, D] to `<root>/null_text.safetensors` (bf16, atomic)."""
    if text.ndim != 2 or text.shape[0] < 1:
        raise ShardFormatError(f"null text embedding must be [L_valid >= 1, D], found {list(text.shape)}")
    path = Path(root) / NULL_TEXT_NAME
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"text": text.detach().to("cpu", STORE_DTYPE).contiguous()}, str(tmp))
    os.replace(tmp, path)


def load_null_text(root: str | Path) -> Tensor:
    """Read the empty-prompt embedding [L_valid, D] bf16 from a shard root."""
    path = Path(root) / NULL_TEXT_NAME
    if not path.is_file():
        raise ShardFormatError(f"{path}: missing; rebuild the shards with `longcat-shards build`")
    tensors = load_file(str(path))
    text = tensors.get("text")
    if text is None or text.ndim != 2 or text.dtype != STORE_DTYPE:
        raise ShardFormatError(
            f"{path}: expected one bfloat16 tensor 'text' [L_valid, D], found {sorted(tensors)}"
        )
    return text


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
