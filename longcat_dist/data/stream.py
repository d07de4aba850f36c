"""Stream shard batches to one training rank: a per-epoch plan from the manifests, then WebDataset reading.

The plan is a pure function of the manifests, world size, DataLoader workers, batch size, seed and epoch. It splits
every bucket's shards (or, when there are fewer shards than streams, residue classes of their samples) over the
streams, one stream per (rank, DataLoader worker), with no overlap, and gives every stream the same number of
batches, so every rank runs the same number of steps and no collective waits on a rank that ran dry. Each batch
holds samples of one bucket. Samples that do not fill a whole batch on every stream are dropped and counted.

Resuming: a rank's position is (epoch, step in epoch). DataLoader workers hand out batches in turn, so step i of
a rank came from worker i % W; a resumed loader rotates the workers so that its first worker is the one that was
next, and each worker replays its shards without decoding up to where it stopped.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from longcat_dist.data.format import (
    MANIFEST_NAME,
    NULL_TEXT_NAME,
    Manifest,
    ShardFormatError,
    decode_sample,
    load_null_text,
)
from longcat_dist.flow import sample_seed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSource:
    """One shard of one bucket of one dataset, as a URL that WebDataset opens (a path or a pipe: command)."""

    group: str  # "<dataset id>/<bucket name>": a batch never mixes groups
    url: str
    num_samples: int


@dataclass(frozen=True)
class Unit:
    """What one stream reads of a shard: samples whose index in the shard is k modulo m (m = 1: all)."""

    shard: int  # index into the source list
    k: int
    m: int
    num_samples: int


@dataclass(frozen=True)
class StreamPlan:
    """One stream's epoch: its units per group and the group of each of its batches, in order."""

    units: dict[str, tuple[Unit, ...]]
    order: tuple[str, ...]


@dataclass(frozen=True)
class EpochPlan:
    """All streams of one epoch; streams[rank * workers + worker]."""

    streams: tuple[StreamPlan, ...]
    batches_per_stream: int
    steps_per_rank: int
    dropped_samples: int


def _rng(*parts: object) -> random.Random:
    return random.Random(sample_seed(0, "\x1f".join(map(str, parts)), 0))


def _split_group(
    sources: list[int], counts: Sequence[int], num_streams: int, rng: random.Random
) -> list[list[Unit]]:
    """Deal one group's shards (sliced when too few) to the streams, least-loaded first."""
    order = list(sources)
    rng.shuffle(order)
    slices = -(-num_streams // len(order))  # ceil: every stream gets something when possible
    units = [Unit(s, k, slices, (counts[s] - k + slices - 1) // slices) for s in order for k in range(slices)]
    units.sort(key=lambda u: -u.num_samples)  # stable: ties keep the shuffled order
    dealt: list[list[Unit]] = [[] for _ in range(num_streams)]
    load = [0] * num_streams
    for unit in units:
        target = min(range(num_streams), key=lambda p: (load[p], p))
        dealt[target].append(unit)
        load[target] += unit.num_samples
    return dealt


def _trim(caps: dict[str, int], total: int) -> dict[str, int]:
    """Lower per-group batch counts until they sum to total, always taking from the largest."""
    quota = dict(caps)
    while sum(quota.values()) > total:
        largest = max(sorted(quota), key=lambda g: quota[g])
        quota[largest] -= 1
    return quota


def plan_epoch(
    sources: Sequence[ShardSource],
    *,
    world_size: int,
    num_workers: int,
    batch_size: int,
    seed: int,
    epoch: int,
) -> EpochPlan:
    """Split the shards of every group over world_size x max(num_workers, 1) streams for one epoch."""
    per_rank = max(num_workers, 1)
    num_streams = world_size * per_rank
    counts = [s.num_samples for s in sources]
    groups = sorted({s.group for s in sources})
    dealt = {
        g: _split_group(
            [i for i, s in enumerate(sources) if s.group == g], counts, num_streams, _rng(seed, epoch, g)
        )
        for g in groups
    }
    caps = [
        {g: sum(u.num_samples for u in dealt[g][p]) // batch_size for g in groups} for p in range(num_streams)
    ]
    batches = min(sum(c.values()) for c in caps)
    if batches == 0:
        raise ValueError(
            f"the shards hold {sum(counts)} samples in {len(groups)} bucket(s), too few to give each of "
            f"{world_size} rank(s) x {per_rank} DataLoader worker(s) one batch of {batch_size} from one bucket: "
            "lower train_batch_size, num_workers or dataloader_num_workers, or add data"
        )
    streams = []
    for p in range(num_streams):
        quota = _trim(caps[p], batches)
        order = [g for g in groups for _ in range(quota[g])]
        _rng(seed, epoch, "order", p).shuffle(order)
        streams.append(StreamPlan({g: tuple(dealt[g][p]) for g in groups}, tuple(order)))
    dropped = sum(counts) - num_streams * batches * batch_size
    return EpochPlan(tuple(streams), batches, batches * per_rank, dropped)


def worker_batches_done(step: int, worker: int, num_workers: int) -> int:
    """How many batches worker `worker` had delivered when its rank had taken `step` batches (turn-taking)."""
    per_rank = max(num_workers, 1)
    return (step - worker + per_rank - 1) // per_rank if step > worker else 0


@dataclass(frozen=True)
class StreamPosition:
    """Where a rank's data stream stands: saved in checkpoints so a resumed run reads on from there."""

    epoch: int
    step_in_epoch: int
    world_size: int
    num_workers: int
    batch_size: int
    seed: int

    def to_dict(self) -> dict[str, int]:
        """JSON-ready."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StreamPosition:
        """Inverse of to_dict."""
        return cls(**{k: int(data[k]) for k in cls.__dataclass_fields__})


class Batch(NamedTuple):
    """One micro-batch of one bucket."""

    keys: list[str]  # "<dataset id>/<sample key>": unique across datasets; seeds the per-sample draws
    group: str
    video: Tensor  # [B, 16, T, h, w] bf16
    cond: Tensor  # [B, 16, 1, h, w] bf16
    texts: list[Tensor]  # B x [L_i, D] bf16


Decoder = Callable[[dict, str], tuple[Tensor, Tensor, Tensor]]  # (raw sample, group) -> (video, cond, text)


def _unit_samples(source: ShardSource, unit: Unit) -> Iterator[dict]:
    """Raw samples (bytes, never decoded by WebDataset) of one unit, checked against the manifest's count."""
    seen = 0
    for index, raw in enumerate(wds.tarfile_samples([{"url": source.url}])):
        seen = index + 1
        if index % unit.m == unit.k:
            yield raw
    if seen != source.num_samples:
        raise ValueError(
            f"shard {source.url} holds {seen} samples but its manifest says {source.num_samples}: "
            "rebuild or re-verify the shards (longcat-shards verify)"
        )


def _group_samples(
    sources: Sequence[ShardSource], units: Sequence[Unit], buffer: int, rng: random.Random
) -> Iterator[dict]:
    stream = (raw for unit in units for raw in _unit_samples(sources[unit.shard], unit))
    if buffer <= 1:
        return stream
    return iter(wds.shuffle(bufsize=buffer, initial=buffer, rng=rng)(stream))


class RankStream(IterableDataset):
    """The batches of one rank for one epoch from `start_step` on; each DataLoader worker reads its own stream."""

    def __init__(self, sources, plan: EpochPlan, *, rank, num_workers, batch_size, shuffle_buffer, seed, epoch,
                 start_step, decode: Decoder) -> None:  # fmt: skip
        super().__init__()
        self.sources, self.plan, self.rank, self.decode = sources, plan, rank, decode
        self.num_workers, self.batch_size, self.buffer = max(num_workers, 1), batch_size, shuffle_buffer
        self.seed, self.epoch, self.start_step = seed, epoch, start_step

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        # Rotate so that this loader's first worker serves the stream that was next when the run stopped.
        worker = ((info.id if info else 0) + self.start_step) % self.num_workers
        stream_index = self.rank * self.num_workers + worker
        stream = self.plan.streams[stream_index]
        skip = worker_batches_done(self.start_step, worker, self.num_workers)
        iters = {
            g: _group_samples(
                self.sources, units, self.buffer, _rng(self.seed, self.epoch, "shuffle", stream_index, g)
            )
            for g, units in stream.units.items()
            if units
        }
        for index, group in enumerate(stream.order):
            raws = [next(iters[group], None) for _ in range(self.batch_size)]
            if any(r is None for r in raws):
                raise RuntimeError(
                    f"group {group} ran out of samples before its planned batches: manifest mismatch"
                )
            if index < skip:
                continue  # replay without decoding
            yield self._collate(group, raws)

    def _collate(self, group: str, raws: list[dict]) -> Batch:
        decoded = [self.decode(raw, group) for raw in raws]
        dataset_id = group.split("/", 1)[0]
        return Batch(
            keys=[f"{dataset_id}/{raw['__key__']}" for raw in raws],
            group=group,
            video=torch.stack([d[0] for d in decoded]),
            cond=torch.stack([d[1] for d in decoded]),
            texts=[d[2] for d in decoded],
        )


def _pass_through(batch: Batch) -> Batch:
    return batch


def rank_batches(
    sources: Sequence[ShardSource],
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    shuffle_buffer: int,
    seed: int,
    epoch: int,
    start_step: int,
    decode: Decoder,
) -> tuple[EpochPlan, Iterator[Batch]]:
    """This rank's plan for the epoch and an iterator over its batches from start_step on."""
    plan = plan_epoch(
        sources, world_size=world_size, num_workers=num_workers, batch_size=batch_size, seed=seed, epoch=epoch
    )
    dataset = RankStream(
        sources, plan, rank=rank, num_workers=num_workers, batch_size=batch_size, shuffle_buffer=shuffle_buffer,
        seed=seed, epoch=epoch, start_step=start_step, decode=decode,
    )  # fmt: skip
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_pass_through)
    return plan, iter(loader)


def shard_url(root: str | Path, relative: str) -> str:
    """A file's URL for WebDataset: a local path, `pipe:aws s3 cp ... -` for s3://, or a pipe: template."""
    root = str(root)
    if root.startswith("pipe:"):
        return root.format(path=relative)  # e.g. "pipe:cat /data/shards/{path}"
    if root.startswith("s3://"):
        return f"pipe:aws s3 cp {root.rstrip('/')}/{relative} -"
    return str(Path(root) / relative)


def _read_bytes(root: str | Path, relative: str) -> tuple[bytes, str]:
    url = shard_url(root, relative)
    if not url.startswith("pipe:") and not Path(url).is_file():
        raise FileNotFoundError(f"{url}: missing; build the shards there with `longcat-shards build`")
    with wds.gopen(url, "rb") as stream:
        return stream.read(), url


def read_manifest(root: str | Path) -> Manifest:
    """The manifest of a shard root given as a path, an s3:// URL or a pipe: template."""
    text, url = _read_bytes(root, MANIFEST_NAME)
    return Manifest.from_json(text.decode("utf-8"), url)


def read_null_text(root: str | Path) -> Tensor:
    """The empty-prompt embedding [L_valid, D] of a shard root (path, s3:// or pipe:), bf16."""
    if not str(root).startswith(("pipe:", "s3://")):
        return load_null_text(root)
    data, url = _read_bytes(root, NULL_TEXT_NAME)
    tensors = load_safetensors_bytes(data)
    if "text" not in tensors or tensors["text"].ndim != 2:
        raise ShardFormatError(f"{url}: expected one tensor 'text' [L_valid, D], found {sorted(tensors)}")
    return tensors["text"]


def dataset_sources(root: str | Path, manifest: Manifest) -> list[ShardSource]:
    """Every shard of a dataset as a ShardSource, grouped by "<dataset id>/<bucket>"."""
    return [
        ShardSource(f"{manifest.dataset_id}/{bucket.name}", shard_url(root, shard.path), shard.num_samples)
        for bucket in manifest.buckets
        for shard in bucket.shards
    ]


class ShardDecoder:
    """(raw sample, group) -> (video, cond, text) through the shard contract; picklable for DataLoader workers."""

    def __init__(self, manifests: Sequence[Manifest]) -> None:
        self.buckets = {f"{m.dataset_id}/{b.name}": (b, m.text_dim) for m in manifests for b in m.buckets}

    def __call__(self, raw: dict, group: str) -> tuple[Tensor, Tensor, Tensor]:
        bucket, text_dim = self.buckets[group]
        sample = decode_sample(raw, bucket, text_dim)
        return sample.video, sample.cond, sample.text
