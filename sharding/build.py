"""Build one dataset's shards: pair, probe (decode, bucket, frame rule), plan shards, encode, write the manifest.

Probing and encoding run in-process or through Ray Data (CPU probe tasks, one encode actor per worker with a GPU
when there is one), so the same build scales from a workstation to a cluster. Planning happens between the two on
the driver, so a rerun plans the same shards and skips the finished ones.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from tqdm import tqdm

from longcat_dist.data.format import (
    FORMAT_VERSION,
    BucketInfo,
    Manifest,
    ShardInfo,
    bucket_name,
    latent_shape,
    shard_relpath,
)
from longcat_dist.data.pixels import MediaError, read_image
from longcat_dist.encoders import vae_config_fingerprint
from sharding.buckets import bucket_size, usable_frames
from sharding.encode import EncodeActor, Encoders, EncoderSpec, encode_shard, sidecar_path, text_encoder_info
from sharding.media import read_video
from sharding.output_root import check_output_root, remove_leftover_temp_files, root_fingerprint
from sharding.pairing import pair_clips, require_paired

logger = logging.getLogger(__name__)


class BuildError(ValueError):
    """A build that cannot go ahead: nothing left to encode."""


@dataclass(frozen=True)
class DatasetSpec:
    """One video dataset to build."""

    dataset_id: str
    clip_dir: Path
    start_frame_dir: Path
    out_root: Path
    caption_strategy: str = "textfile"
    instance_prompt: str | None = None
    resolution: int = 480
    frames: int = 93
    min_frames: int | None = None  # None: the requested frame count
    alignment: int = 64


@dataclass(frozen=True)
class BuildOptions:
    """How to build: encoders, shard size, parallelism."""

    encoders: EncoderSpec = field(default_factory=EncoderSpec)
    samples_per_shard: int = 64
    skip_unpaired: bool = False
    num_encode_workers: int = 1
    use_ray: bool = False


@dataclass
class BuildSummary:
    """What one build did."""

    dataset_id: str
    root: Path
    samples: int = 0
    shards: int = 0
    reused_shards: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    seconds: float = 0.0

    def describe(self) -> str:
        """A short report for the terminal."""
        rate = self.samples / self.seconds if self.seconds else 0.0
        lines = [f"{self.dataset_id}: {self.samples} samples in {self.shards} shards "
                 f"({self.reused_shards} reused) -> {self.root} in {self.seconds:.1f} s ({rate:.2f} samples/s)"]  # fmt: skip
        lines.append(f"  skipped {len(self.skipped)} inputs" + (":" if self.skipped else ""))
        lines += [f"    {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def probe(row: dict) -> dict:
    """A pair row -> the same row with its bucket, frame count and fps, or with a skip reason."""
    try:
        frames, fps = read_video(Path(row["clip"]), max_frames=row["want_frames"])
        read_image(Path(row["start_frame"]))
    except MediaError as err:
        return {**row, "skip": str(err)}
    count = usable_frames(frames.shape[0], row["want_frames"], row["min_frames"])
    if count is None:
        reason = f"{frames.shape[0]} frames, fewer than the minimum {row['min_frames']}"
        return {**row, "skip": f"{row['clip']}: {reason}"}
    height, width = int(frames.shape[1]), int(frames.shape[2])
    size = bucket_size(height, width, row["resolution"], row["alignment"])
    return {**row, "height": height, "width": width, "fps": fps, "frames": count, "bucket_size": list(size),
            "bucket": bucket_name(count, *size)}  # fmt: skip


def plan_shards(clips: list[dict], dataset_id: str, samples_per_shard: int) -> list[dict]:
    """Probed clips -> shards {"path", "bucket", "clips"}: per bucket, by key, samples_per_shard at most."""
    ordered = sorted(clips, key=lambda c: (c["bucket"], c["key"]))
    shards = []
    for bucket, members in groupby(ordered, key=lambda c: c["bucket"]):
        members = list(members)
        for index, start in enumerate(range(0, len(members), samples_per_shard)):
            shards.append({"path": shard_relpath(dataset_id, bucket, index), "bucket": bucket,
                           "clips": members[start : start + samples_per_shard]})  # fmt: skip
    return shards


def build_params(dataset: DatasetSpec) -> dict:
    """The parameters that shape the samples, as the manifest records them under `build`."""
    # The instance prompt is every caption only under that strategy; elsewhere it changes no sample.
    prompt = dataset.instance_prompt if dataset.caption_strategy == "instanceprompt" else None
    return {"resolution": dataset.resolution, "frames": dataset.frames,
            "min_frames": dataset.min_frames or dataset.frames, "alignment": dataset.alignment,
            "caption_strategy": dataset.caption_strategy, "instance_prompt": prompt}  # fmt: skip


def expected_fingerprint(dataset: DatasetSpec, encoders: EncoderSpec) -> dict[str, object]:
    """What this build's manifest will record about how it was built, from configs alone (no weights read)."""
    vae = vae_config_fingerprint(encoders.vae_path, tiny=encoders.tiny)
    return root_fingerprint(dataset.dataset_id, vae, text_encoder_info(encoders), build_params(dataset))


def check_dataset_root(dataset: DatasetSpec, encoders: EncoderSpec) -> None:
    """Refuse dataset.out_root when its manifest was built another way; changes nothing on disk."""
    check_output_root(dataset.out_root, expected_fingerprint(dataset, encoders))


def _remove_stale(root: Path, dataset_id: str, planned: set[str]) -> None:
    """Delete this dataset's shards from an earlier plan that this plan no longer has."""
    for tar in root.glob(f"*/{dataset_id}-*.tar"):
        if tar.relative_to(root).as_posix() not in planned:
            logger.info("removing stale shard %s", tar)
            tar.unlink()
            sidecar_path(tar).unlink(missing_ok=True)


def _manifest(
    dataset: DatasetSpec, fingerprint: dict, shards: list[dict], records: dict[str, dict]
) -> Manifest:
    buckets: dict[str, BucketInfo] = {}
    for shard in shards:
        clip = shard["clips"][0]
        height, width = clip["bucket_size"]
        bucket = buckets.setdefault(shard["bucket"], BucketInfo(shard["bucket"], clip["frames"], height, width,
                                                                latent_shape(clip["frames"], height, width)))  # fmt: skip
        record = records[shard["path"]]
        bucket.shards.append(ShardInfo(shard["path"], record["num_samples"], record["sha256"]))
    ordered = [buckets[name] for name in sorted(buckets)]
    return Manifest(FORMAT_VERSION, dataset.dataset_id, {**fingerprint["vae"], "posterior": "mode"},
                    fingerprint["text_encoder"], ordered, sum(b.num_samples for b in ordered),
                    build_params(dataset))  # fmt: skip


def _run_local(rows: list[dict], shards_of, spec: EncoderSpec, root: Path) -> Iterator[dict]:
    probed = [probe(row) for row in rows]
    shards = shards_of(probed)
    encoders = Encoders(spec)
    encoders.write_null_text(root)
    yield {"fingerprint": encoders.fingerprint}
    for shard in shards:
        yield encode_shard(encoders, root, shard)


def _run_ray(rows: list[dict], shards_of, spec: EncoderSpec, root: Path, workers: int) -> Iterator[dict]:
    import ray

    items = ray.data.from_items([{"row": json.dumps(r)} for r in rows])
    probed = [json.loads(r["row"]) for r in items.map(_probe_json).take_all()]
    shards = shards_of(probed)
    jobs = [{"shard": json.dumps({"null_text": True})}] + [{"shard": json.dumps(s)} for s in shards]
    gpus = 1 if spec.device.startswith("cuda") else 0
    encoded = ray.data.from_items(jobs, override_num_blocks=len(jobs)).map(
        EncodeActor, fn_constructor_args=(spec, str(root)), concurrency=workers, num_gpus=gpus, num_cpus=1
    )
    for row in encoded.iter_rows():
        record = json.loads(row["record"])
        yield {"fingerprint": record["fingerprint"]} if record.get("null_text") else record


def _probe_json(item: dict) -> dict:
    return {"row": json.dumps(probe(json.loads(item["row"])))}


def build_dataset(dataset: DatasetSpec, options: BuildOptions) -> BuildSummary:
    """Build (or finish building) one dataset's shards under dataset.out_root."""
    started = time.perf_counter()
    summary = BuildSummary(dataset.dataset_id, dataset.out_root)
    spec = options.encoders
    check_dataset_root(dataset, spec)
    dataset.out_root.mkdir(parents=True, exist_ok=True)
    remove_leftover_temp_files(dataset.out_root)
    pairing = pair_clips(dataset.clip_dir, dataset.start_frame_dir, caption_strategy=dataset.caption_strategy,
                         instance_prompt=dataset.instance_prompt)  # fmt: skip
    require_paired(pairing, dataset.dataset_id, options.skip_unpaired)
    summary.skipped += [(stem, reason) for stem, reason in pairing.unpaired]
    summary.skipped += [(stem, "start frame without a clip") for stem in pairing.orphan_frames]
    rows = [{"key": p.key, "clip": str(p.clip), "start_frame": str(p.start_frame), "caption": p.caption,
             "want_frames": dataset.frames, "min_frames": dataset.min_frames or dataset.frames,
             "resolution": dataset.resolution, "alignment": dataset.alignment} for p in pairing.pairs]  # fmt: skip
    plan: list[dict] = []

    def shards_of(probed: list[dict]) -> list[dict]:
        summary.skipped.extend((c["clip"], c["skip"]) for c in probed if "skip" in c)
        good = [c for c in probed if "skip" not in c]
        if not good:
            raise BuildError(
                f"dataset {dataset.dataset_id}: no usable clips in {dataset.clip_dir}; see the skips"
            )
        plan.extend(plan_shards(good, dataset.dataset_id, options.samples_per_shard))
        _remove_stale(dataset.out_root, dataset.dataset_id, {s["path"] for s in plan})
        return plan

    if options.use_ray:
        results = _run_ray(rows, shards_of, spec, dataset.out_root, options.num_encode_workers)
    else:
        results = _run_local(rows, shards_of, spec, dataset.out_root)
    records, fingerprint = _collect(results, len(rows), dataset.dataset_id)
    manifest = _manifest(dataset, fingerprint, plan, records)
    manifest.save(dataset.out_root)
    summary.samples, summary.shards = manifest.total_samples, len(plan)
    summary.reused_shards = sum(1 for r in records.values() if r["reused"])
    summary.seconds = time.perf_counter() - started
    return summary


def _collect(results: Iterable[dict], total: int, dataset_id: str) -> tuple[dict[str, dict], dict]:
    """Drain the encode results with a progress bar; returns the shard records by path and the fingerprint."""
    records: dict[str, dict] = {}
    fingerprint: dict = {}
    with tqdm(total=total, unit="clip", desc=f"encode {dataset_id}", leave=False) as bar:
        for record in results:
            if "path" not in record:
                fingerprint = record["fingerprint"]
                continue
            records[record["path"]] = record
            bar.update(record["num_samples"])
    return records, fingerprint
