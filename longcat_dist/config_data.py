"""The multidatabackend.json schema: SimpleTuner-style dataset entries, each checked alone and as a set."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longcat_dist.config_values import (
    NO_VALUE,
    PIXEL_MULTIPLE,
    ConfigError,
    check_frames,
    check_range,
    coerce,
    read_json_file,
    resolve_relative,
    suggest,
)

logger = logging.getLogger(__name__)

# The shard builder reads files itself, so only on-disk datasets make sense; SimpleTuner's remote types do not.
DATASET_TYPES = ("video", "image", "conditioning", "text_embeds")
CAPTION_STRATEGIES = ("textfile", "filename", "instanceprompt")
RESOLUTION_TYPES = ("pixel", "pixel_area")

# SimpleTuner dataset keys that mean nothing here: accepted, kept in DatasetConfig.extra, listed in one warning.
DATASET_KNOWN_IGNORED = frozenset(
    {
        "crop", "crop_style", "crop_aspect", "crop_aspect_buckets", "minimum_image_size", "maximum_image_size",
        "target_downsample_size", "minimum_aspect_ratio", "maximum_aspect_ratio", "max_upscale_threshold",
        "prepend_instance_prompt", "only_instance_prompt", "metadata_backend", "metadata_update_interval",
        "skip_file_discovery", "scan_for_errors", "write_batch_size", "text_encoder_batch_size", "default",
        "text_embeds", "image_embeds", "conditioning_image_embeds", "cache_dir_conditioning_image_embeds",
        "vae_cache_clear_each_epoch", "probability", "preserve_data_backend_cache", "hash_filenames",
        "conditioning_type", "source_dataset_id", "caption_shuffle", "disable_multiline_split",
        "text_cache_ondemand", "text_cache_disable", "cache_file_suffix", "aws_bucket_name", "aws_region_name",
        "aws_endpoint_url", "aws_access_key_id", "aws_secret_access_key", "aws_data_prefix",
    }
)  # fmt: skip
DATASET_KEYS = frozenset(
    {
        "id", "type", "dataset_type", "instance_data_dir", "caption_strategy", "instance_prompt", "is_i2v",
        "conditioning_data", "resolution", "resolution_type", "video", "cache_dir_vae", "cache_dir",
        "disabled", "disable", "repeats",
    }
)  # fmt: skip
VIDEO_KEYS = frozenset({"num_frames", "min_frames", "max_frames", "is_i2v"})
VIDEO_KNOWN_IGNORED = frozenset({"bucket_strategy", "frame_interval"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class DatasetConfig:
    """One multidatabackend.json entry; relative paths are already resolved against that file's directory."""

    id: str
    dataset_type: str  # "video" | "image" | "conditioning" | "text_embeds"
    instance_data_dir: Path | None = None
    caption_strategy: str | None = None  # "textfile" | "filename" | "instanceprompt"
    is_i2v: bool = False
    conditioning_data: tuple[str, ...] = ()
    resolution: int | None = None  # short side of the buckets, pixels
    resolution_type: str | None = None
    num_frames: int | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    # For video datasets: the root of this dataset's shards, a local path or a URL that WebDataset reads
    # (s3://bucket/prefix, pipe:...) kept as the string it is.
    cache_dir_vae: Path | str | None = None
    cache_dir: Path | None = None
    disabled: bool = False
    repeats: int = 0
    instance_prompt: str | None = None
    extra: dict = field(default_factory=dict)  # known SimpleTuner keys that longcat-dist does not use


def _label(index: int, entry: dict) -> str:
    """How a dataset is named in messages: its id when it has a usable one, else its list position."""
    ident = entry.get("id")
    return f"[{index}]" if not isinstance(ident, str) or not ident else ident


def _split_keys(entry: dict, known: frozenset, ignored: frozenset, where: Path, label: str) -> dict:
    """Reject unknown keys (with a suggestion) and return the known-but-ignored ones."""
    for key in entry:
        if key not in known and key not in ignored:
            raise ConfigError(where, f"{label}.{key}", entry[key], "unknown dataset key", suggest(key, known))
    return {k: v for k, v in entry.items() if k in ignored}


def _video_block(entry: dict, where: Path, label: str) -> tuple[dict, dict]:
    """Return the `video` sub-object's used keys and its ignored keys."""
    block = entry.get("video", {})
    if not isinstance(block, dict):
        raise ConfigError(where, f"{label}.video", block, 'expected an object such as {"num_frames": 93}')
    ignored = _split_keys(block, VIDEO_KEYS, VIDEO_KNOWN_IGNORED, where, f"{label}.video")
    return {k: v for k, v in block.items() if k in VIDEO_KEYS}, ignored


def _is_i2v(entry: dict, video: dict, where: Path, label: str) -> bool:
    """Read is_i2v from the top level or the video block (SimpleTuner accepts both); they must agree."""
    top = coerce(entry["is_i2v"], bool, where, f"{label}.is_i2v") if "is_i2v" in entry else None
    inner = coerce(video["is_i2v"], bool, where, f"{label}.video.is_i2v") if "is_i2v" in video else None
    if top is not None and inner is not None and top != inner:
        raise ConfigError(where, f"{label}.is_i2v", top, f"disagrees with video.is_i2v = {inner}")
    return bool(top if top is not None else inner)


def _path(value: Any, base: Path, where: Path, key: str) -> Path | None:
    """Coerce an optional path and resolve it against `base` when relative."""
    path = coerce(value, Path | None, where, key)
    return None if path is None else resolve_relative(path, base)


def _shard_root(value: Any, base: Path, where: Path, key: str) -> Path | str | None:
    """A shard root: URLs (scheme://... or pipe:...) stay strings; anything else is a path."""
    if isinstance(value, str) and ("://" in value or value.startswith("pipe:")):
        return value
    return _path(value, base, where, key)


def _parse_dataset(index: int, entry: Any, where: Path) -> DatasetConfig:
    """Type-check one entry and build its DatasetConfig (cross-entry rules come later)."""
    if not isinstance(entry, dict):
        raise ConfigError(where, f"[{index}]", entry, "each dataset must be a JSON object")
    label = _label(index, entry)
    extra = _split_keys(entry, DATASET_KEYS, DATASET_KNOWN_IGNORED, where, label)
    video, video_extra = _video_block(entry, where, label)
    extra.update({f"video.{k}": v for k, v in video_extra.items()})
    get = lambda key, hint, default=None: coerce(entry.get(key, default), hint, where, f"{label}.{key}")
    if "id" not in entry:
        raise ConfigError(where, f"{label}.id", NO_VALUE, "every dataset needs an id")
    dataset_id = get("id", str)
    dataset_type = get("dataset_type", str, "image")
    if dataset_type not in DATASET_TYPES:
        rule = f"unsupported dataset_type; longcat-dist reads {', '.join(DATASET_TYPES)}"
        raise ConfigError(where, f"{label}.dataset_type", dataset_type, rule)
    caption = get("caption_strategy", str | None)
    caption = "instanceprompt" if caption == "instance_prompt" else caption
    if caption is not None and caption not in CAPTION_STRATEGIES:
        rule = f"unsupported caption_strategy; use one of {', '.join(CAPTION_STRATEGIES)}"
        raise ConfigError(where, f"{label}.caption_strategy", caption, rule)
    source_type = get("type", str, "local")
    if dataset_type != "text_embeds" and source_type != "local":
        hint = "copy the data to a local or mounted directory; the shard builder reads files from disk"
        raise ConfigError(where, f"{label}.type", source_type, "only type 'local' is supported", hint)
    base = where.parent
    num = lambda key: coerce(video.get(key), int | None, where, f"{label}.video.{key}")
    return DatasetConfig(
        id=dataset_id,
        dataset_type=dataset_type,
        instance_data_dir=_path(entry.get("instance_data_dir"), base, where, f"{label}.instance_data_dir"),
        caption_strategy=caption,
        is_i2v=_is_i2v(entry, video, where, label),
        conditioning_data=_conditioning_ids(entry.get("conditioning_data"), where, label),
        resolution=_resolution(entry.get("resolution"), where, label),
        resolution_type=get("resolution_type", str | None),
        num_frames=num("num_frames"),
        # SimpleTuner: an unset min_frames equals num_frames.
        min_frames=num("min_frames" if "min_frames" in video else "num_frames"),
        max_frames=num("max_frames"),
        cache_dir_vae=_shard_root(entry.get("cache_dir_vae"), base, where, f"{label}.cache_dir_vae"),
        cache_dir=_path(entry.get("cache_dir"), base, where, f"{label}.cache_dir"),
        disabled=get("disabled", bool, entry.get("disable", False)),
        repeats=get("repeats", int, 0),
        instance_prompt=get("instance_prompt", str | None),
        extra=extra,
    )


def _conditioning_ids(value: Any, where: Path, label: str) -> tuple[str, ...]:
    """conditioning_data may be one id or a list of ids (SimpleTuner accepts both)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    return coerce(value, tuple[str, ...], where, f"{label}.conditioning_data")


def _resolution(value: Any, where: Path, label: str) -> int | None:
    """A pixel resolution (short side); megapixel floats from resolution_type 'area' are refused."""
    if isinstance(value, float) and not value.is_integer():
        hint = "give the short side in pixels, e.g. 480, with resolution_type 'pixel_area'"
        raise ConfigError(
            where, f"{label}.resolution", value, "megapixel resolutions are not supported", hint
        )
    return coerce(value, int | None, where, f"{label}.resolution")


def _check_entry(ds: DatasetConfig, where: Path) -> None:
    """Rules that one entry must satisfy on its own."""
    key = lambda name: f"{ds.id}.{name}"
    if ds.dataset_type != "text_embeds" and not _SAFE_NAME.match(ds.id):
        rule = "ids of data datasets name shard files: use letters, digits, '.', '_' and '-'"
        raise ConfigError(where, key("id"), ds.id, rule)
    if ds.dataset_type in ("video", "image", "conditioning") and ds.instance_data_dir is None:
        raise ConfigError(where, key("instance_data_dir"), NO_VALUE, f"a {ds.dataset_type} dataset needs one")
    if ds.dataset_type == "video":
        _check_video(ds, where)
    elif ds.num_frames is not None or ds.min_frames is not None or ds.max_frames is not None:
        raise ConfigError(where, key("video"), NO_VALUE, "only video datasets take a video block")
    if ds.caption_strategy == "instanceprompt" and not ds.instance_prompt:
        raise ConfigError(
            where, key("instance_prompt"), ds.instance_prompt, "caption_strategy instanceprompt needs it"
        )
    if ds.resolution is not None:
        check_range(where, key("resolution"), ds.resolution, lo=PIXEL_MULTIPLE)
        if ds.resolution % PIXEL_MULTIPLE:
            low = ds.resolution - ds.resolution % PIXEL_MULTIPLE
            rule = f"must be divisible by {PIXEL_MULTIPLE} (it is the buckets' short side)"
            raise ConfigError(where, key("resolution"), ds.resolution, rule, f"use {low} or {low + 16}")
    if ds.resolution_type is not None and ds.resolution_type not in RESOLUTION_TYPES:
        rule = f"expected one of {', '.join(RESOLUTION_TYPES)} ('area' in megapixels is not supported)"
        raise ConfigError(where, key("resolution_type"), ds.resolution_type, rule)
    check_range(where, key("repeats"), ds.repeats, lo=0)


def _check_video(ds: DatasetConfig, where: Path) -> None:
    """Frame counts and the shard location of a video dataset."""
    key = lambda name: f"{ds.id}.{name}"
    if ds.cache_dir_vae is None and not ds.disabled:
        hint = 'longcat-dist writes this dataset\'s shards (its latent cache) there, e.g. "cache/clips"'
        raise ConfigError(where, key("cache_dir_vae"), NO_VALUE, "a video dataset needs cache_dir_vae", hint)
    if ds.caption_strategy is None:
        raise ConfigError(
            where, key("caption_strategy"), None, "a video dataset needs captions", "use textfile"
        )
    if ds.num_frames is not None:
        check_frames(ds.num_frames, key("video.num_frames"), where)
    if ds.min_frames is not None and ds.num_frames is not None and ds.min_frames < ds.num_frames:
        rule = f"must be >= video.num_frames = {ds.num_frames} (a shorter clip cannot fill the bucket)"
        raise ConfigError(where, key("video.min_frames"), ds.min_frames, rule)
    if ds.max_frames is not None and ds.max_frames < (ds.min_frames or ds.num_frames or 1):
        rule = "must be >= video.min_frames and video.num_frames"
        raise ConfigError(where, key("video.max_frames"), ds.max_frames, rule)


def _check_links(datasets: tuple[DatasetConfig, ...], where: Path) -> None:
    """Rules across entries: unique ids, I2V conditioning links, one shard root per dataset."""
    by_id: dict[str, DatasetConfig] = {}
    for ds in datasets:
        if ds.id in by_id:
            raise ConfigError(where, f"{ds.id}.id", ds.id, "duplicate dataset id; every id must be unique")
        by_id[ds.id] = ds
    shard_roots: dict[Path, str] = {}
    for ds in datasets:
        key = lambda name, ds=ds: f"{ds.id}.{name}"
        if ds.is_i2v and ds.dataset_type != "video":
            raise ConfigError(where, key("is_i2v"), True, "only video datasets can be image-to-video")
        if ds.conditioning_data and not ds.is_i2v:
            hint = 'set "is_i2v": true (inside "video" or at the top level) on this dataset'
            raise ConfigError(
                where, key("conditioning_data"), list(ds.conditioning_data), "needs is_i2v", hint
            )
        if ds.dataset_type == "video" and not ds.disabled:
            if not ds.is_i2v:
                hint = 'add "is_i2v": true and "conditioning_data": ["<start-frame dataset id>"]'
                raise ConfigError(
                    where, key("is_i2v"), False, "longcat-dist trains image-to-video only", hint
                )
            if ds.cache_dir_vae in shard_roots:
                other = shard_roots[ds.cache_dir_vae]
                raise ConfigError(
                    where, key("cache_dir_vae"), str(ds.cache_dir_vae), f"also used by '{other}'"
                )
            shard_roots[ds.cache_dir_vae] = ds.id
        if ds.is_i2v:
            _check_conditioning(ds, by_id, where)


def _check_conditioning(ds: DatasetConfig, by_id: dict[str, DatasetConfig], where: Path) -> None:
    """An I2V dataset names at least one enabled conditioning/image dataset that exists."""
    key = f"{ds.id}.conditioning_data"
    if not ds.conditioning_data:
        hint = 'name the start-frame dataset, e.g. "conditioning_data": ["start-frames"]'
        raise ConfigError(where, key, [], "an is_i2v dataset needs conditioning_data", hint)
    for ref in ds.conditioning_data:
        target = by_id.get(ref)
        if target is None:
            raise ConfigError(where, key, ref, "no dataset has this id", f"ids: {', '.join(sorted(by_id))}")
        if target.dataset_type not in ("conditioning", "image"):
            rule = (
                f"names '{ref}', a {target.dataset_type} dataset; it must be a conditioning or image dataset"
            )
            raise ConfigError(where, key, ref, rule)
        if target.disabled and not ds.disabled:
            raise ConfigError(
                where, key, ref, "names a disabled dataset", f"enable '{ref}' or disable '{ds.id}'"
            )


def _warn_ignored(datasets: tuple[DatasetConfig, ...], where: Path) -> None:
    """One warning that lists every SimpleTuner key this project accepts but does not use."""
    listed = [f"{ds.id}: {', '.join(sorted(ds.extra))}" for ds in datasets if ds.extra]
    if listed:
        logger.warning(
            "%s: ignoring SimpleTuner keys that longcat-dist does not use: %s", where, "; ".join(listed)
        )


def load_data_backends(path: str | Path) -> tuple[DatasetConfig, ...]:
    """Load and validate a SimpleTuner-style multidatabackend.json list."""
    where = Path(path).expanduser().resolve()
    entries = read_json_file(where, "data backend config")
    if not isinstance(entries, list) or not entries:
        hint = "multidatabackend.json is a JSON list of dataset objects, as in configs/multidatabackend.json.example"
        raise ConfigError(where, "", type(entries).__name__, "expected a non-empty JSON list", hint)
    datasets = tuple(_parse_dataset(i, entry, where) for i, entry in enumerate(entries))
    for ds in datasets:
        _check_entry(ds, where)
    _check_links(datasets, where)
    if not any(ds.dataset_type == "video" and not ds.disabled for ds in datasets):
        raise ConfigError(where, "", NO_VALUE, "no enabled video dataset to train on")
    _warn_ignored(datasets, where)
    return datasets
